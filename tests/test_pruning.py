"""Invariants of the token reduction (pruning.py) and of the ViT that applies it."""
import pytest
import torch

import bench
import pruning
from pruning import PruneConfig, prune_and_merge, token_counts
from vit import VisionTransformer


def tiny_vit(method="elip", **kw):
    cfg = PruneConfig(method=method, **kw)
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=4,
                             prune=cfg)


def layer_lengths(vit, images, text_cls):
    """Sequence length entering each layer in the real (grad-enabled) forward pass; the ELIP
    look-ahead runs under no_grad and is left out."""
    lens = []
    hooks = [b.register_forward_pre_hook(
        lambda m, a: lens.append(a[0].shape[1]) if torch.is_grad_enabled() else None)
        for b in vit.blocks]
    vit(images, text_cls)
    for h in hooks:
        h.remove()
    return lens


def test_token_counts_official_schedule():
    cfg = PruneConfig()
    assert token_counts(196, 12, cfg) == [197, 197, 178, 178] + [129] * 6 + [80, 80]
    assert token_counts(256, 12, cfg) == [257, 257, 232, 232] + [168] * 6 + [104, 104]
    assert token_counts(196, 12, PruneConfig(merge=False)) == ([197, 197, 177, 177] + [128] * 6
                                                               + [79, 79])
    assert token_counts(196, 12, PruneConfig(method="none")) == [197] * 12


@pytest.mark.parametrize("name", sorted(pruning.PRUNE_PRESETS))
def test_presets_build_valid_configs_and_their_lengths(name):
    cfg = PruneConfig(**pruning.PRUNE_PRESETS[name])
    cfg.check(12)
    expected = {
        "elip": [197, 197, 178, 178] + [129] * 6 + [80, 80],
        # EViT keeps 0.7 of the current tokens at layers 3, 6, 9: of the 196 patches int(196 *
        # 0.7) = 137, int(196 * 0.49) = 96, int(196 * 0.343) = 67, plus [CLS] and the fused token
        "evit_paper": [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3,
        "tome_paper": [197 - 13 * i for i in range(12)],
    }[name]
    assert token_counts(196, 12, cfg) == expected
    if name == "elip":
        assert cfg == PruneConfig()                                 # the defaults are the official
    # the real forward of a depth-12 ViT on 14 x 14 patches
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=56, patch_size=4, embed_dim=48, depth=12, num_heads=4,
                            prune=cfg).train()
    assert vit.num_patches == 196
    assert layer_lengths(vit, torch.randn(1, 3, 56, 56), torch.randn(1, 48)) == expected


@pytest.mark.parametrize("method", pruning.METHODS)
def test_vit_lengths_follow_token_counts(method):
    vit = tiny_vit(method, tome_r=6).train()
    lens = layer_lengths(vit, torch.randn(2, 3, 32, 32), torch.randn(2, 48))
    assert lens == token_counts(vit.num_patches, 12, vit.prune)
    changed = {i for i in range(1, 12) if lens[i] != lens[i - 1]}
    assert changed <= set(pruning.cut_layers(vit.prune, 12))       # the layers tokens change at


def score_norm(cfg, blocks, layer, x, x_prev, text_cls):
    """x (B, 1+N, D) -> scores (B, N): the tokens' norms, a made-up scoring method."""
    return x[:, 1:].norm(dim=-1)


def merge_last_pair(cfg, blocks, layer, x, size):
    """x (B, 1+N, D), size (B, 1+N) or None -> x (B, N, D), size (B, N), None: the last two
    tokens averaged into one by size, a made-up merger."""
    size = x.new_ones(x.shape[:2]) if size is None else size                   # (B, 1+N)
    pair = size[:, -2:].sum(1, keepdim=True)                                    # (B, 1)
    last = (x[:, -2:] * size[:, -2:, None]).sum(1, keepdim=True) / pair[..., None]   # (B, 1, D)
    return torch.cat([x[:, :-2], last], 1), torch.cat([size[:, :-2], pair], 1), None


def last_pair_left(cfg, layer, n):
    return n - 1


@pytest.fixture
def made_up_methods(monkeypatch):
    """A new scorer and a new merger added as the module docstring says, one function (or one
    Merger) and one entry each; METHODS as importing pruning.py would then compute it."""
    monkeypatch.setitem(pruning.SCORERS, "norm", score_norm)
    monkeypatch.setitem(pruning.MERGERS, "last_pair",
                        pruning.Merger(merge_last_pair, last_pair_left))
    monkeypatch.setattr(pruning, "METHODS", ("none", *pruning.SCORERS, *pruning.MERGERS))


def test_a_new_method_is_one_function_and_one_entry(made_up_methods):
    for method in ("norm", "last_pair"):
        test_vit_lengths_follow_token_counts(method)
    assert token_counts(64, 12, PruneConfig(method="last_pair")) == [65 - i for i in range(12)]
    # the forward keeps the tokens the scorer ranks highest: the largest norms entering layer 2
    vit = tiny_vit("norm").train()
    seen = []
    vit.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    _, sources = vit.forward_features(torch.randn(2, 3, 32, 32))
    K = int(64 * 0.9)
    assert torch.equal(sources[2][:, :K], pruning.top_k_in_order(seen[0][:, 1:].norm(dim=-1), K))
    # the benchmark measures it by default, and its lengths follow token_counts
    cfg = bench.BenchConfig(prune=PruneConfig(tome_r=6))
    assert {"norm", "last_pair"} <= set(cfg.methods)
    prunes = bench.method_prune_configs(cfg, vit.num_patches, 12)
    for method in ("norm", "last_pair"):
        vit = tiny_vit(method)
        fig = bench.train_step_figures(lambda b: vit(torch.randn(b, 3, 32, 32)).mean(), vit,
                                       vit.blocks, 2)
        assert fig["lengths"] == token_counts(64, 12, prunes[method])


def test_prune_and_merge_invariants():
    torch.manual_seed(0)
    B, N, D, K = 3, 10, 5, 4
    x = torch.randn(B, 1 + N, D, requires_grad=True)
    scores = torch.rand(B, N, requires_grad=True)
    out, keep = prune_and_merge(x, scores, K)
    assert out.shape == (B, 1 + K + 1, D)
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.all(keep[:, 1:] > keep[:, :-1])                       # ascending
    for b in range(B):                                                 # independent reference
        top = sorted(scores[b].argsort(descending=True)[:K].tolist())
        assert keep[b].tolist() == top
        assert torch.equal(out[b, 1:1 + K], x[b, 1 + keep[b]])
        rest = [i for i in range(N) if i not in top]
        w = scores[b, rest].detach()
        w = w / (w.sum() + 1e-6)
        assert abs(w.sum().item() - 1) < 1e-5
        merged = (w[:, None] * x[b, 1 + torch.tensor(rest)]).sum(0)
        assert torch.allclose(out[b, -1], merged, atol=1e-6)
    out.sum().backward()
    assert scores.grad is None
    # every token either kept (gradient 1) or merged (gradient = its weight, all > 0 here)
    assert torch.all(x.grad[:, 1:].abs().sum(-1) > 0)
    assert torch.allclose(x.grad[:, 0], torch.ones(B, D))


def test_prune_and_merge_gradient_is_the_analytic_one():
    # kept rows ([CLS] included) get the gradient of their output row; every dropped row gets its
    # Eq. 4 weight times the gradient of the merged row; the scores get none
    torch.manual_seed(0)
    B, N, D, K = 3, 10, 5, 4
    x = torch.randn(B, 1 + N, D, requires_grad=True)
    scores = torch.rand(B, N, requires_grad=True)
    grad = torch.randn(B, 1 + K + 1, D)
    out, keep = prune_and_merge(x, scores, K)
    out.backward(grad)
    expected = torch.zeros(B, 1 + N, D)
    for b in range(B):
        expected[b, 0] = grad[b, 0]
        expected[b, 1 + keep[b]] = grad[b, 1:1 + K]
        rest = torch.tensor([i for i in range(N) if i not in keep[b].tolist()])
        w = scores[b, rest].detach() / (scores[b, rest].detach().sum() + 1e-6)
        expected[b, 1 + rest] = w[:, None] * grad[b, -1]
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert scores.grad is None
    # prune only: the dropped rows get nothing
    x.grad = None
    prune_and_merge(x, scores, K, merge=False)[0].backward(grad[:, :-1])
    kept_rows = torch.cat([torch.zeros(B, 1, dtype=torch.long), 1 + keep], 1)     # (B, 1+K)
    expected = torch.zeros(B, 1 + N, D).scatter(1, kept_rows[..., None].expand(-1, -1, D),
                                                grad[:, :-1])
    assert torch.equal(x.grad, expected)


def test_prune_and_merge_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: prune_and_merge(x, scores, 3)[0], (x,))
    assert torch.autograd.gradcheck(lambda x: prune_and_merge(x, scores, 3, merge=False)[0], (x,))


def test_prune_and_merge_edge_cases():
    x, s = torch.randn(2, 7, 3), torch.rand(2, 6)
    out, keep = prune_and_merge(x, s, 6)
    assert out is x and keep.tolist() == [list(range(6))] * 2
    out, keep = prune_and_merge(x, s, 2, merge=False)
    assert out.shape == (2, 3, 3)
    assert torch.equal(out[:, 1:], torch.stack([x[b, 1 + keep[b]] for b in range(2)]))
    x_view = torch.randn(2, 3, 7).transpose(1, 2)                      # not contiguous
    assert torch.equal(prune_and_merge(x_view, s, 2)[0],
                       prune_and_merge(x_view.contiguous(), s, 2)[0])


def test_cls_row_equals_full_attention_map():
    vit = tiny_vit()
    blk = vit.blocks[3]
    x = torch.randn(2, 17, 48)
    h = blk.norm1(x)
    B, N, D = h.shape
    q, k, _ = blk.attn.qkv(h).view(B, N, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
    full = (q @ k.transpose(-2, -1) * (D // 4) ** -0.5).softmax(-1)   # (B, H, N, N)
    assert torch.allclose(blk.cls_attention(x), full[:, :, 0].mean(1), atol=1e-6)


def elip_scores(vit, x, text_cls, layer=2):
    return pruning.token_scores(vit.prune, vit.blocks, layer, x, x, text_cls)


def test_elip_lam_extremes():
    vit = tiny_vit(lam=1.0)
    x, t = torch.randn(2, 65, 48), torch.randn(2, 48)
    # lam = 1: the image [CLS] alone, the text is ignored
    assert torch.equal(elip_scores(vit, x, t), elip_scores(vit, x, torch.randn(2, 48)))
    # lam = 0: the text [CLS] alone, as if it sat in the image [CLS]'s place
    x_text = torch.cat([t[:, None], x[:, 1:]], 1)
    vision_only_on_text = elip_scores(vit, x_text, t)
    vit.prune.lam = 0.0
    assert torch.allclose(elip_scores(vit, x, t), vision_only_on_text, atol=1e-6)
    x_other = torch.cat([torch.randn(2, 1, 48), x[:, 1:]], 1)
    assert torch.equal(elip_scores(vit, x, t), elip_scores(vit, x_other, t))


def test_elip_forward_keeps_image_cls_and_blocks_text_gradient():
    vit = tiny_vit().train()
    images = torch.randn(2, 3, 32, 32)
    t = torch.randn(2, 48, requires_grad=True)
    out, sources = vit.forward_features(images, t)
    out.sum().backward()
    assert t.grad is None                                               # no path from the text
    # the [CLS] that enters layer 2 is the image's own, not the fused one
    seen = []
    h = vit.blocks[2].register_forward_pre_hook(
        lambda m, a: seen.append(a[0][:, 0].clone()) if torch.is_grad_enabled() else None)
    vit.eval()
    ref = vit.blocks[1](vit.blocks[0](torch.cat([vit.cls_token.expand(2, -1, -1),
                                                  vit.patch_embed(images)], 1) + vit.pos_embed))
    vit.prune.in_eval = True
    vit(images, t)
    h.remove()
    assert torch.allclose(seen[0], ref[:, 0], atol=1e-6)
    assert {i: s.shape[1] for i, s in sources.items()} == {2: 58, 4: 42, 10: 26}


def test_none_is_plain_forward_and_eval_does_not_prune():
    vit = tiny_vit("elip").eval()
    plain = tiny_vit("none").eval()
    images, t = torch.randn(2, 3, 32, 32), torch.randn(2, 48)
    assert torch.equal(vit(images, t), plain(images))
    assert layer_lengths(vit, images, t) == [65] * 12
    vit.train()
    assert layer_lengths(vit, images, t) != [65] * 12


def test_text_guidance_changes_kept_tokens():
    vit = tiny_vit(lam=0.0).train()
    images = torch.randn(2, 3, 32, 32)
    _, s1 = vit.forward_features(images, torch.randn(2, 48) * 10)
    _, s2 = vit.forward_features(images, torch.randn(2, 48) * 10)
    assert not torch.equal(s1[10], s2[10])                             # the last cut


@pytest.mark.parametrize("kw, msg", [
    (dict(method="foo"), "not one of"),
    (dict(prune_layers=(2, 4), keep_ratios=(0.9,)), "same length"),
    (dict(prune_layers=(4, 2, 10)), "increasing"),
    (dict(keep_ratios=(0.9, 1.2, 0.4)), r"\(0, 1\]"),
    (dict(keep_ratios=(0.0, 0.0, 0.0)), r"\(0, 1\]"),
    (dict(keep_ratios=(0.5, 0.65, 0.4)), "must not increase"),
    (dict(lam=1.5), "lam"),
    (dict(tome_r=-1), "tome_r"),
])
def test_bad_config_raises(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PruneConfig(**kw)


def test_schedule_checked_against_depth_and_text_width():
    with pytest.raises(ValueError, match="depth 12"):
        tiny_vit(prune_layers=(2, 4, 12))
    with pytest.raises(ValueError, match="depth 12"):
        tiny_vit(prune_layers=(0, 4, 10))
    vit = tiny_vit().train()
    with pytest.raises(ValueError, match="text width 32 differs from vision width 48"):
        vit(torch.randn(1, 3, 32, 32), torch.randn(1, 32))
    with pytest.raises(ValueError, match="needs the text"):
        vit(torch.randn(1, 3, 32, 32))


def test_tome_preserves_total_size_and_mean():
    torch.manual_seed(0)
    blk = tiny_vit().blocks[0]
    x = torch.randn(2, 17, 48)
    out, size, src = pruning.tome_merge(blk, x, None, 5)
    assert out.shape == (2, 12, 48) and size.shape == (2, 12)
    assert torch.allclose(size.sum(1), torch.full((2,), 17.0))
    # a size-weighted average keeps the size-weighted sum of all tokens
    assert torch.allclose((out * size[..., None]).sum(1), x.sum(1), atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])
    unmerged = src >= 0
    batch = torch.arange(2)[:, None].expand_as(src)                    # (2, N-r)
    assert torch.allclose(out[:, 1:][unmerged], x[:, 1:][batch[unmerged], src[unmerged]])
