"""The pre-training model on the tiny preset: losses, momentum encoders, queues, pruning mode."""
import pytest
import torch
import torch.nn.functional as F

from model import ELIPModel, ModelConfig
from pruning import PruneConfig


def tiny(losses=("itc", "itm", "mlm"), fusion_layers=2, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, losses=losses, fusion_layers=fusion_layers,
                      text_layers=2 if fusion_layers else 3, img_size=32, **{"queue_size": 20, **kw})
    return ELIPModel(cfg)


def batch(B=6, T=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[: B // 2, T - 3:] = 0
    ids[mask == 0] = 0
    return torch.randn(B, 3, 32, 32, generator=g), ids, mask


@pytest.mark.parametrize("losses, fusion", [(("itc", "itm", "mlm"), 2), (("itc", "itm", "lm"), 0)])
def test_losses_finite_and_backprop(losses, fusion):
    m = tiny(losses, fusion).train()
    out = m(*batch())
    assert set(out) == set(losses) | {"loss"}
    assert torch.isclose(out["loss"], sum(out[k] for k in losses))
    for k in losses:
        assert torch.isfinite(out[k]) and out[k] > 0
    out["loss"].backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert grads["visual_encoder.blocks.11.mlp.fc2.weight"].abs().sum() > 0
    assert grads["itm_head.weight"].abs().sum() > 0
    assert grads["temp"] is not None
    assert all(p.grad is None for p in m.momentum_params())


def test_each_loss_alone_backpropagates():
    for loss in ("itc", "itm", "mlm"):
        m = tiny((loss,)).train()
        out = m(*batch())
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert m.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_momentum_update_is_ema():
    m = tiny()
    with torch.no_grad():
        for p in m.visual_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.visual_encoder_m.parameters()]
    m.momentum_update()
    mu = m.cfg.momentum
    for p, p_m, b in zip(m.visual_encoder.parameters(), m.visual_encoder_m.parameters(), before):
        assert torch.allclose(p_m, mu * b + (1 - mu) * p, atol=1e-6)


def test_queue_wraps_around():
    m = tiny()                                    # queue of 20
    E = m.cfg.embed_dim
    feats = [torch.nn.functional.normalize(torch.randn(n, E), dim=1) for n in (8, 8, 8)]
    for f in feats:
        m.enqueue(f, -f, idx=torch.arange(len(f)))
    assert int(m.queue_ptr) == 24 % 20
    # slots 16..19 then 0..3 hold the third batch; 4..7 still the first batch's last four
    assert torch.equal(m.image_queue[:, 16:20], feats[2][:4].T)
    assert torch.equal(m.image_queue[:, 0:4], feats[2][4:].T)
    assert torch.equal(m.image_queue[:, 4:8], feats[0][4:].T)
    assert torch.equal(m.text_queue[:, 8:16], -feats[1].T)
    assert m.idx_queue[:4].tolist() == [4, 5, 6, 7]


def test_forward_fills_queue_with_momentum_features():
    m = tiny().train()
    images, ids, mask = batch()
    m(images, ids, mask)
    with torch.no_grad():
        expect = m.image_feat(m.encode_image(images, momentum=True), momentum=True)
    assert torch.allclose(m.image_queue[:, :6], expect.T, atol=1e-5)
    assert int(m.queue_ptr) == 6


def test_online_vit_prunes_in_training_only_and_momentum_never():
    m = tiny()
    lens = {}
    for name in ("visual_encoder", "visual_encoder_m"):
        getattr(m, name).norm.register_forward_hook(
            lambda mod, i, o, name=name: lens.__setitem__(name, o.shape[1]))
    m.train()
    m(*batch())
    assert lens == {"visual_encoder": 1 + 6 + 1, "visual_encoder_m": 1 + 16}   # int(0.4 * 16) kept
    m.eval()
    with torch.no_grad():
        m(*batch())
    assert lens["visual_encoder"] == 17


def test_masking_never_touches_pad_or_cls():
    m = tiny(mlm_prob=0.9)
    _, ids, mask = batch(B=64, T=20)
    masked, labels = m.mask_tokens(ids)
    chosen = labels != -100
    assert not chosen[ids == 0].any() and not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    frac = (masked[chosen] == m.cfg.mask_id).float().mean()
    assert 0.7 < frac < 0.9                                            # ~80% [MASK]


def test_config_refuses_width_mismatch_and_bad_losses():
    with pytest.raises(ValueError, match="text_width 64 differs from vision_width 128"):
        ModelConfig(vocab_size=10, text_width=64)
    with pytest.raises(ValueError, match="losses"):
        ModelConfig(vocab_size=10, losses=("itc", "foo"))
    ModelConfig(vocab_size=10, text_width=64, prune=PruneConfig(method="evit"))   # vision-only ok


def test_itc_online_batch_is_clip_loss_on_an_empty_queue():
    m = tiny(("itc",), itc_online_batch=True, distill=False).train()
    images, ids, mask = batch()
    torch.manual_seed(3)
    out = m(images, ids, mask)
    torch.manual_seed(3)
    text = m.encode_text(ids, mask)
    f, g = m.image_feat(m.encode_image(images, text[:, 0])), m.text_feat(text)
    sim = f @ g.T / m.temp
    labels = torch.arange(len(f))
    clip = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
    assert torch.allclose(out["itc"], clip, atol=1e-5)


def test_no_queue_means_in_batch_negatives_only():
    m = tiny(("itc",), queue_size=0).train()
    out = m(*batch())
    out["loss"].backward()
    assert torch.isfinite(out["itc"]) and m.image_queue.shape == (m.cfg.embed_dim, 0)


@pytest.mark.parametrize("hard", [True, False])
def test_itm_negatives_follow_similarity_only_when_hard(hard):
    """Hard negatives (ALBEF) are drawn from the ITC similarity softmax: a pair that is nearly
    certain under it is always drawn. Uniform negatives ignore the similarity."""
    m = tiny(itm_hard_negatives=hard).train()
    images, ids, mask = batch()
    B, T = ids.shape
    image_feat = torch.eye(B, 64)                       # (B, E) one direction per sample
    text_feat = 10 * image_feat.roll(1, dims=0)         # text j points where image j - 1 does
    drawn = []

    def record(text, mask, image, ids_all):             # stands in for the fusion encoder
        drawn.append(ids_all[2 * B:])                   # the negative texts of the B images
        return torch.zeros(3 * B, 2)

    m.itm_logits = record
    for seed in range(20):
        torch.manual_seed(seed)
        m.itm_loss(torch.randn(B, 5, 128), torch.randn(B, T, 128), ids, mask, image_feat, text_feat)
    likeliest = ids.roll(-1, dims=0)                    # image i's most similar text: i + 1
    hits = (torch.stack(drawn) == likeliest).all(-1).float().mean()
    assert hits == 1.0 if hard else hits < 0.5


def test_init_std_sets_the_random_weights():
    for std in (0.02, 0.1):
        m = tiny(init_std=std)
        for w in (m.visual_encoder.blocks[0].attn.qkv.weight,
                  m.text_encoder.encoder.layer[0].attention.self.query.weight):
            assert abs(w.std().item() - std) < 0.1 * std


def negatives_on_two_ranks(rank, store):
    """One of two gloo ranks (torch.multiprocessing.spawn): BLIP's negatives from every rank."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    torch.manual_seed(rank)
    B, T, other = 3, 4 + rank, 1 - rank           # the ranks pad their texts to other lengths
    m = tiny(losses=("itc", "itm"), negative_all_rank=True, max_len=8, queue_size=0)
    D = m.cfg.text_width
    with torch.no_grad():
        m.temp.fill_(0.001)
    # every sample's text and image lie along the other rank's image and text: the softmax puts
    # all weight on the other rank (the local candidates are e^-1000 behind)
    e = torch.eye(16)
    image_feat, text_feat = e[[other] * B], e[[rank] * B]
    image_embeds = torch.randn(B, 17, D, requires_grad=True)
    text_embeds = torch.randn(B, T, D, requires_grad=True)
    ids, mask = torch.randint(5, 40, (B, T)), torch.ones(B, T, dtype=torch.long)
    idx = torch.arange(B) + 10 * rank
    image_neg, text_neg, ids_neg, mask_neg, (neg_image, neg_text) = m.itm_negatives(
        image_embeds, text_embeds, ids, mask, image_feat, text_feat, idx)
    # rows of the gathered candidates: rank 0's are 0..B-1, rank 1's B..2B-1
    assert all(r // B == other for r in neg_image.tolist() + neg_text.tolist()), (neg_image, neg_text)
    # the embeddings come from the other rank, the texts padded to max_len
    everything = [torch.empty(B, 17, D) for _ in range(2)]
    torch.distributed.all_gather(everything, image_embeds.detach())
    assert torch.equal(image_neg, everything[other][neg_image - other * B])
    assert text_neg.shape == (B, 8, D) and ids_neg.shape == mask_neg.shape == (B, 8)
    assert (mask_neg.sum(1) == 4 + other).all()
    # gradients flow back to the rank that owns the row: each of my rows gets 1 per time the
    # other rank drew it
    (image_neg.sum() + text_neg.sum()).backward()
    drawn = [torch.empty(B, dtype=torch.long) for _ in range(2)]
    torch.distributed.all_gather(drawn, neg_image)
    times = torch.bincount(drawn[other] - rank * B, minlength=B).float()         # (B,)
    assert torch.equal(image_embeds.grad, times[:, None, None].expand(B, 17, D))
    torch.distributed.all_gather(drawn, neg_text)
    times = torch.bincount(drawn[other] - rank * B, minlength=B).float()
    assert torch.equal(text_embeds.grad, times[:, None, None].expand(B, T, D))
    # and the whole ITM loss runs on the padded batch
    image_embeds.grad = None
    m.itm_loss(image_embeds, text_embeds, ids, mask, image_feat, text_feat, idx).backward()
    assert image_embeds.grad.abs().sum() > 0
    torch.distributed.destroy_process_group()


def test_itm_negatives_from_every_rank_with_gradient(tmp_path):
    """negative_all_rank (BLIP's COCO retrieval): on two gloo ranks, every negative is drawn
    from the other rank when the similarities say so, and the loss's gradient reaches that
    rank's embeddings (BLIP's GatherLayer)."""
    torch.multiprocessing.spawn(negatives_on_two_ranks, args=(str(tmp_path / "store"),), nprocs=2)
