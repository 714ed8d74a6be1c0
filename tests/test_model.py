"""The pre-training model on the tiny preset: losses, momentum encoders, queues, pruning mode;
BLIP's tied decoder and [ENC]/[DEC] tokens; ITM's negatives; the queues under DDP;
momentum_step once per optimizer step; fp32 similarities under autocast; the paper presets
apart from the embedded world's aids (tests/test_world_aids.py tests those)."""
import copy
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import model as model_module
import world_aids
from model import PRESETS, ELIPModel, ModelConfig, similarity
from pruning import PruneConfig
from trainer import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(losses=("itc", "itm", "mlm"), fusion_layers=2, itc_online_batch=False, **kw):
    """ELIPModel at toy size; with itc_online_batch, the world's model with that aid alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(losses=losses, fusion_layers=fusion_layers,
                      text_layers=2 if fusion_layers else 3, img_size=32,
                      **{"vocab_size": 40, "queue_size": 20, **kw})
    if itc_online_batch:
        return world_aids.WorldModel(cfg, world_aids.WorldAids(itc_online_batch=True))
    return ELIPModel(cfg)


def batch(B=6, T=10):
    """A named batch as data.collate gives it: "image" (B, 3, 32, 32), "text_ids", "text_mask"."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[: B // 2, T - 3:] = 0
    ids[mask == 0] = 0
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "text_ids": ids, "text_mask": mask}


def ema_close(got, want):
    """momentum_update's foreach kernels against the per-tensor formula: not bitwise (the two
    roundings of m * p_m + (1 - m) * p fall differently), within two fp32 ulps of the tensor's
    scale, 2.4e-7 relative; a wrong rate (m ** 2: 1 - m off by 2x) is 1e-3 off and more."""
    return (got - want).abs().max() <= 2 ** -22 * want.abs().max()


@pytest.mark.parametrize("losses, fusion", [(("itc", "itm", "mlm"), 2), (("itc", "itm", "lm"), 0)])
def test_losses_finite_and_backprop(losses, fusion):
    m = tiny(losses, fusion).train()
    out = m(batch())
    assert set(out) == set(losses) | {"loss", "queue"}
    image_feat_m, text_feat_m, idx = out.pop("queue")          # for momentum_step
    assert image_feat_m.shape == text_feat_m.shape == (6, m.cfg.embed_dim)
    assert idx.tolist() == [-1] * 6 and not image_feat_m.requires_grad
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
        out = m(batch())
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
        assert ema_close(p_m, mu * b + (1 - mu) * p)
        assert not torch.equal(p_m, b)                 # it moved (by 0.01 * 1.0: far past ulps)


@pytest.mark.parametrize("method", ["elip", "none"])
def test_foreach_momentum_update_equals_the_per_tensor_loop(method):
    """The two foreach kernels against ALBEF's _momentum_update, pair by pair and name by name
    (a misaligned pairing of online and momentum tensors would mix weights of other shapes or
    layers), every momentum tensor, online ones untouched, after the weights moved apart."""
    m = tiny(prune=PruneConfig(method=method))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ref = copy.deepcopy(m)
    online_before = [p.clone() for o, _ in m.online_momentum_pairs() for p in o.parameters()]
    m.momentum_update()
    mu, n = ref.cfg.momentum, 0
    with torch.no_grad():
        for (o, o_m), (ref_o, ref_m) in zip(m.online_momentum_pairs(), ref.online_momentum_pairs()):
            names = [k for k, _ in o_m.named_parameters()]
            assert names == [k for k, _ in o.named_parameters()]
            for (k, p), p_m, got in zip(ref_o.named_parameters(), ref_m.parameters(),
                                        o_m.parameters()):
                p_m.mul_(mu).add_((1 - mu) * p)                 # ALBEF's loop
                assert ema_close(got, p_m), k
                n += 1
    assert n == len(m.momentum_params()) > 100
    online_after = [p for o, _ in m.online_momentum_pairs() for p in o.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(online_after, online_before))


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


def test_forward_returns_momentum_features_and_momentum_step_enqueues_them():
    m = tiny().train()
    b = batch()
    out = m(b)
    queued = [out.pop("queue")]
    assert int(m.queue_ptr) == 0 and not m.queue_filled.any()       # the forward wrote nothing
    with torch.no_grad():
        expect = m.image_feat(m.encode_image(b["image"], momentum=True), momentum=True)
    m.momentum_step(queued)
    assert torch.allclose(m.image_queue[:, :6], expect.T, atol=1e-5)
    assert int(m.queue_ptr) == 6 and int(m.queue_filled.sum()) == 6
    m.momentum_step([])                     # a step without queued features writes nothing
    assert int(m.queue_ptr) == 6 and int(m.queue_filled.sum()) == 6


def test_online_vit_prunes_in_training_only_and_momentum_never():
    m = tiny()
    lens = {}
    for name in ("visual_encoder", "visual_encoder_m"):
        getattr(m, name).norm.register_forward_hook(
            lambda mod, i, o, name=name: lens.__setitem__(name, o.shape[1]))
    m.train()
    m(batch())
    assert lens == {"visual_encoder": 1 + 6 + 1, "visual_encoder_m": 1 + 16}   # int(0.4 * 16) kept
    m.eval()
    with torch.no_grad():
        m(batch())
    assert lens["visual_encoder"] == 17


def test_masking_never_touches_pad_or_cls():
    m = tiny(mlm_prob=0.9)
    ids = batch(B=64, T=20)["text_ids"]
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
    b = batch()
    images, ids, mask = b["image"], b["text_ids"], b["text_mask"]
    torch.manual_seed(3)
    out = m(b)
    torch.manual_seed(3)
    text = m.encode_text(ids, mask)
    f, g = m.image_feat(m.encode_image(images, text[:, 0])), m.text_feat(text)
    sim = f @ g.T / m.temp
    labels = torch.arange(len(f))
    clip = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
    assert torch.allclose(out["itc"], clip, atol=1e-5)


def test_no_queue_means_in_batch_negatives_only():
    m = tiny(("itc",), queue_size=0).train()
    out = m(batch())
    assert "queue" not in out                                # nothing to write
    out["loss"].backward()
    assert torch.isfinite(out["itc"]) and m.image_queue.shape == (m.cfg.embed_dim, 0)


@pytest.mark.parametrize("hard", [True, False])
def test_itm_negatives_follow_similarity_only_when_hard(hard):
    """Hard negatives (ALBEF) are drawn from the ITC similarity softmax: a pair that is nearly
    certain under it is always drawn. Uniform negatives ignore the similarity."""
    m = tiny(itm_hard_negatives=hard).train()
    b = batch()
    ids, mask = b["text_ids"], b["text_mask"]
    B, T = ids.shape
    image_feat = torch.eye(B, 64)                       # (B, E) one direction per sample
    text_feat = 10 * image_feat.roll(1, dims=0)         # text j points where image j - 1 does
    sim = image_feat @ text_feat.T / 0.07               # (B, B) image i's likeliest text: i + 1
    drawn = []

    def record(text, mask, image, ids_all):             # stands in for the fusion encoder
        drawn.append(ids_all[2 * B:])                   # the negative texts of the B images
        return torch.zeros(3 * B, 2)

    m.itm_logits = record
    for seed in range(20):
        torch.manual_seed(seed)
        m.itm_loss(torch.randn(B, 5, 128), torch.randn(B, T, 128), ids, mask, sim, sim.T)
    likeliest = ids.roll(-1, dims=0)                    # image i's most similar text: i + 1
    hits = (torch.stack(drawn) == likeliest).all(-1).float().mean()
    assert hits == 1.0 if hard else hits < 0.5


def test_init_std_sets_the_random_weights():
    for std in (0.02, 0.1):
        m = tiny(init_std=std)
        for w in (m.visual_encoder.blocks[0].attn.qkv.weight,
                  m.text_encoder.encoder.layer[0].attention.self.query.weight):
            assert abs(w.std().item() - std) < 0.1 * std


@pytest.mark.parametrize("kw, reads", [
    (dict(queue_size=0, distill=False, itc_online_batch=True), False),     # the tiny preset
    (dict(queue_size=20, distill=False, itc_online_batch=True), True),     # the queue
    (dict(queue_size=0, distill=True), True),                              # distillation
    (dict(queue_size=0, distill=False, itc_online_batch=False), True),     # ALBEF's candidates
])
def test_momentum_encoders_run_and_update_only_when_a_loss_reads_them(kw, reads):
    m = tiny(**kw).train()
    calls = []
    for enc in (m.visual_encoder_m, m.text_encoder_m):
        enc.register_forward_hook(lambda *a: calls.append(1))
    before = [p.clone() for p in m.momentum_params()]
    out = m(batch())
    queued = [out.pop("queue")] if "queue" in out else []
    assert bool(queued) == (m.cfg.queue_size > 0)
    out["loss"].backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    m.momentum_step(queued)
    assert m.reads_momentum == reads and bool(calls) == reads
    moved = any(not torch.equal(a, b) for a, b in zip(before, m.momentum_params()))
    assert moved == reads


def test_grad_accum_updates_momentum_and_queue_once_per_optimizer_step():
    """Two micro-batches of 3 per step, by hand as train_pretrain's loop: forward, backward of
    loss / 2, one AdamW step, one momentum_step. After it the teacher is m * old + (1 - m) * new
    (not m ** 2), both micro-batches saw the same (empty) queue and teacher, and the pointer
    moved by 6 at once."""
    m = tiny(queue_size=20).train()
    full = batch(B=6)
    with torch.no_grad():      # the step's momentum features, by the teacher before the step
        feats_m = m.image_feat(m.encode_image(full["image"], momentum=True),
                               momentum=True)                                     # (6, E)
    old = [p.clone() for p in m.momentum_params()]
    opt = build_optimizer(m, 1e-3, 0.02)
    queued, seen = [], []
    for half in (slice(0, 3), slice(3, 6)):
        micro = {k: v[half] for k, v in full.items()}
        seen.append((int(m.queue_ptr), int(m.queue_filled.sum()),
                     m.visual_encoder_m.blocks[0].attn.qkv.weight.clone()))
        out = m(micro)
        queued.append(out.pop("queue"))
        (out["loss"] / 2).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.momentum_step(queued)
    assert [s[:2] for s in seen] == [(0, 0), (0, 0)] and torch.equal(seen[0][2], seen[1][2])
    assert int(m.queue_ptr) == 6 and int(m.queue_filled.sum()) == 6
    mu = m.cfg.momentum
    new = [p for online, _ in m.online_momentum_pairs() for p in online.parameters()]
    assert not torch.equal(new[0], old[0])                   # the step moved the online weights
    for p_m, o, p in zip(m.momentum_params(), old, new):
        assert ema_close(p_m, mu * o + (1 - mu) * p)
    # once, not per micro-batch: a second EMA would leave the teacher m ** 2 of the way, 1e-5
    # of a weight's step off, far past the ulps ema_close allows
    twice = mu * (mu * old[0] + (1 - mu) * new[0]) + (1 - mu) * new[0]
    assert not ema_close(m.momentum_params()[0], twice)
    # the queue holds the six samples' features, in micro-batch order, each once
    assert torch.allclose(m.image_queue[:, :6].T, feats_m, atol=1e-5)
    match = (m.image_queue[:, :6].T[:, None] - feats_m[None]).abs().amax(-1) < 1e-5   # (6, 6)
    assert torch.equal(match.sum(0), torch.ones(6, dtype=torch.long))
    assert torch.equal(match.sum(1), torch.ones(6, dtype=torch.long))


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
    # the similarities over every rank's candidates, as ELIPModel.forward computes them
    everyone = [torch.empty(B, 16) for _ in range(2)]
    torch.distributed.all_gather(everyone, text_feat)
    sim_i2t = image_feat @ torch.cat(everyone).T / 0.001                         # (B, 2B)
    torch.distributed.all_gather(everyone, image_feat)
    sim_t2i = text_feat @ torch.cat(everyone).T / 0.001                          # (B, 2B)
    image_neg, text_neg, ids_neg, mask_neg, (neg_image, neg_text) = m.itm_negatives(
        image_embeds, text_embeds, ids, mask, sim_i2t, sim_t2i, idx)
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
    m.itm_loss(image_embeds, text_embeds, ids, mask, sim_i2t, sim_t2i, idx).backward()
    assert image_embeds.grad.abs().sum() > 0
    torch.distributed.destroy_process_group()


def test_itm_negatives_from_every_rank_with_gradient(tmp_path):
    """negative_all_rank (BLIP's COCO retrieval): on two gloo ranks, every negative is drawn
    from the other rank when the similarities say so, and the loss's gradient reaches that
    rank's embeddings (BLIP's GatherLayer)."""
    torch.multiprocessing.spawn(negatives_on_two_ranks, args=(str(tmp_path / "store"),), nprocs=2)


# ---- BLIP's model: tied decoder, [ENC] and [DEC] -------------------------------------------
def blip_tiny(losses=("itc", "itm", "lm"), **kw):
    """The blip preset's model choices at toy size: [DEC] = 40 and [ENC] = 41 after 40 words."""
    return tiny(losses, fusion_layers=0, **{**dict(vocab_size=42, dec_id=40, enc_id=41,
                                                   token_types=False, blip_tokens=True,
                                                   tie_decoder=True, itm_weight_eps=1e-4), **kw})


# the decoder's weights that BLIP ties to the encoder's: every module whose path lacks
# '/attention' (BLIP's models/blip_pretrain.py tie_encoder_decoder_weights), i.e. all but
# self-attention; the LM head (cls) exists in the decoder only
TIED = re.compile(r"embeddings\.|encoder\.layer\.\d+\.(crossattention|intermediate|output)\.")
UNTIED = re.compile(r"encoder\.layer\.\d+\.attention\.|cls\.")


def test_tied_decoder_shares_exactly_blips_parameters(tmp_path):
    m = blip_tiny()
    enc = dict(m.text_encoder.named_parameters())
    dec = dict(m.text_decoder.named_parameters())
    shared = sorted(n for n, p in dec.items() if n in enc and p is enc[n])
    assert shared == sorted(n for n in dec if TIED.match(n))
    assert len(shared) == 4 + 3 * 16    # word, position, LayerNorm (2); per layer: cross-attention
    #                                     q, k, v, output dense (8) and LayerNorm (2), FFN (6)
    own = [n for n in dec if n not in shared]
    assert all(UNTIED.match(n) for n in own) and len(own) == 3 * 10 + 5
    elsewhere = {id(p) for n, p in m.named_parameters(remove_duplicate=False)
                 if not n.startswith("text_decoder.")}
    assert not {id(dec[n]) for n in own} & elsewhere       # the decoder's own, nobody else's
    # the model and the optimizer see each shared tensor once
    untied = blip_tiny(tie_decoder=False)
    count = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for p in untied.parameters()) - count == sum(dec[n].numel() for n in shared)
    groups = build_optimizer(m, 1e-3, 0.02).param_groups
    in_opt = [p for g in groups for p in g["params"]]
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert len(in_opt) == len({id(p) for p in in_opt}) == len(trainable)
    # the state dict names a shared tensor under both paths; a strict load and a checkpoint
    # round trip keep the tie
    state = m.state_dict()
    assert state["text_decoder.encoder.layer.1.intermediate.dense.weight"].data_ptr() == \
        state["text_encoder.encoder.layer.1.intermediate.dense.weight"].data_ptr()
    torch.save(state, tmp_path / "m.pt")
    other = blip_tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    assert other.text_decoder.embeddings is other.text_encoder.embeddings
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_step_moves_the_shared_weights_together():
    """The decoder's LM loss alone trains the encoder's feed-forward: it is the same tensor. The
    self-attention weights stay apart."""
    for tie in (True, False):
        m = blip_tiny(("lm",), tie_decoder=tie).train()
        opt = build_optimizer(m, 1e-2, 0.0)
        ffn = m.text_encoder.encoder.layer[0].intermediate.dense.weight
        attn = m.text_encoder.encoder.layer[0].attention.self.query.weight
        dec_attn = m.text_decoder.encoder.layer[0].attention.self.query.weight
        before = [w.detach().clone() for w in (ffn, attn, dec_attn)]
        m(batch())["loss"].backward()
        opt.step()
        moved = [not torch.equal(w, b) for w, b in zip((ffn, attn, dec_attn), before)]
        assert moved == [tie, False, True]
        assert (m.text_decoder.encoder.layer[0].intermediate.dense.weight is ffn) == tie
        assert dec_attn is not attn


def test_enc_and_dec_are_placed_where_blip_places_them():
    """BLIP's models/blip_pretrain.py: ITC reads the text encoder's [CLS]; the image-grounded
    encoder (ITM) reads [ENC] at position 0, the decoder (LM) [DEC]; the rest of the ids as they
    are. Without blip_tokens, [CLS] everywhere."""
    b = batch()
    ids = b["text_ids"]
    B = ids.shape[0]
    for blip_tokens in (True, False):
        m = blip_tiny(blip_tokens=blip_tokens).train()
        seen = []
        for name in ("text_encoder", "text_encoder_m", "text_decoder"):
            getattr(m, name).register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: seen.append((name, kwargs["mode"], args[0])),
                with_kwargs=True)
        m(b)
        calls = {(name, mode): x for name, mode, x in seen}
        assert set(calls) == {("text_encoder", "text"), ("text_encoder_m", "text"),
                              ("text_encoder", "multimodal"), ("text_decoder", "multimodal")}
        assert torch.equal(calls["text_encoder", "text"], ids)
        assert torch.equal(calls["text_encoder_m", "text"], ids)
        itm, lm = calls["text_encoder", "multimodal"], calls["text_decoder", "multimodal"]
        assert itm.shape == (3 * B, ids.shape[1])            # positives and both negatives
        assert (itm[:, 0] == (41 if blip_tokens else 2)).all()
        assert (lm[:, 0] == (40 if blip_tokens else 2)).all()
        assert torch.equal(itm[:B, 1:], ids[:, 1:]) and torch.equal(lm[:, 1:], ids[:, 1:])
    with pytest.raises(ValueError, match=r"\[ENC\] and \[DEC\]"):
        blip_tiny(enc_id=-1)
    with pytest.raises(ValueError, match="fusion_layers 0"):
        ModelConfig(vocab_size=10, blip_tokens=True, fusion_layers=2)


@pytest.mark.parametrize("make", [tiny, blip_tiny], ids=["albef", "blip"])
def test_itm_weights_are_the_itc_similarities_of_the_batch(make):
    """ALBEF's and BLIP's formula: softmax over the batch of online image features against
    momentum text features (and online text against momentum image), / temperature, + 1e-4 in
    BLIP, the diagonal zeroed."""
    m = make(text_dropout=0.0).train()
    with torch.no_grad():                   # online and momentum encoders apart, as in training
        for p in list(m.text_encoder.parameters()) + list(m.visual_encoder.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    recorded, itm_weights = [], m.itm_weights
    m.itm_weights = lambda *args: recorded.append(itm_weights(*args)) or recorded[-1]
    b = batch()
    images, ids, mask = b["image"], b["text_ids"], b["text_mask"]
    m(b)
    w_i2t, w_t2i = recorded[0]
    with torch.no_grad():                   # the encoders as that forward pass left them
        text = m.encode_text(ids, mask)
        image_feat, text_feat = m.image_feat(m.encode_image(images, text[:, 0])), m.text_feat(text)
        image_feat_m = m.image_feat(m.encode_image(images, momentum=True), momentum=True)
        text_feat_m = m.text_feat(m.encode_text(ids, mask, momentum=True), momentum=True)
    eps, temp, eye = m.cfg.itm_weight_eps, m.temp.clamp(0.001, 0.5), torch.eye(len(ids)).bool()
    assert eps == (1e-4 if make is blip_tiny else 0.0)
    expect_i2t = ((image_feat @ text_feat_m.T / temp).softmax(1) + eps).masked_fill(eye, 0)
    expect_t2i = ((text_feat @ image_feat_m.T / temp).softmax(1) + eps).masked_fill(eye, 0)
    assert torch.allclose(w_i2t, expect_i2t, atol=1e-6) and torch.allclose(w_t2i, expect_t2i, atol=1e-6)
    online = ((image_feat @ text_feat.T / temp).softmax(1) + eps).masked_fill(eye, 0)
    assert (w_i2t - online).abs().max() > 1e-3                    # not online against online
    assert (w_t2i - expect_i2t.T).abs().max() > 1e-3              # t2i is not i2t transposed



@pytest.mark.parametrize("hard", [True, False])
def test_a_batch_of_one_image_draws_a_negative_without_crashing(hard):
    """Retrieval fine-tuning on a tiny batch of one image's captions: every candidate is a
    positive, yet each row still draws one (torch.multinomial fails on a zero row); any other
    batch is left exactly as it was."""
    m = tiny(itm_hard_negatives=hard)
    sim = torch.randn(3, 3)
    all_same = torch.ones(3, 3, dtype=torch.bool)
    for w in m.itm_weights(sim, sim, all_same):
        assert (w.sum(1) > 0).all()
        torch.multinomial(w, 1)
    eye = torch.eye(3, dtype=torch.bool)
    for w in m.itm_weights(sim, sim, eye):
        assert (w[eye] == 0).all() and (w[~eye] > 0).all()


DDP_WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from model import ELIPModel, ModelConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)                    # the same model on both ranks, as DDP starts
m = ELIPModel(ModelConfig(vocab_size=40, img_size=32, queue_size=20, text_dropout=0.0)).train()


def batch(r):                           # rank r's own 3 samples
    g = torch.Generator().manual_seed(100 + r)
    ids = torch.randint(5, 40, (3, 8), generator=g)
    ids[:, 0] = 2
    return {"image": torch.randn(3, 3, 32, 32, generator=g), "text_ids": ids,
            "text_mask": torch.ones_like(ids)}


torch.manual_seed(rank)
with torch.no_grad():                   # every rank's momentum features before the step
    feats = [(m.image_feat(m.encode_image(batch(r)["image"], momentum=True), momentum=True),
              m.text_feat(m.encode_text(batch(r)["text_ids"], batch(r)["text_mask"],
                                        momentum=True), momentum=True))
             for r in range(2)]
out = m(batch(rank))
m.momentum_step([out.pop("queue")])     # the step's EMA and queue write
image = torch.cat([f[0] for f in feats]).T
text = torch.cat([f[1] for f in feats]).T
json.dump(dict(ptr=int(m.queue_ptr), filled=m.queue_filled.tolist(),
               image=(m.image_queue[:, :6] - image).abs().max().item(),
               text=(m.text_queue[:, :6] - text).abs().max().item(),
               rest=m.image_queue[:, 6:].abs().max().item()),
          open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def test_ddp_queues_receive_every_ranks_momentum_features(tmp_path):
    """Two gloo ranks, three samples each: after one step both ranks' queues hold rank 0's then
    rank 1's momentum features (all_gather, as ALBEF's and BLIP's concat_all_gather)."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        rec = json.load(open(tmp_path / f"rank{rank}.json"))
        assert rec["ptr"] == 6 and rec["filled"] == [True] * 6 + [False] * 14
        assert rec["image"] < 1e-5 and rec["text"] < 1e-5 and rec["rest"] == 0.0


# ---- parameter counts: ours against the official architectures -----------------------------
def preset_config(name):
    """The albef or blip preset's model with BERT's vocabulary (bert-base-uncased: 30522 tokens,
    [PAD] 0, [CLS] 101, [MASK] 103; BLIP appends [DEC] 30522 and [ENC] 30523)."""
    arch = {k: v for k, v in PRESETS[name].items() if k in ModelConfig.__dataclass_fields__}
    V = 30524 if arch.get("blip_tokens") else 30522
    return ModelConfig(**arch, vocab_size=V, pad_id=0, cls_id=101, mask_id=103, dec_id=V - 2,
                       enc_id=V - 1)


def counts(online_vit, online_text, decoder, heads, momentum):
    """Parameters per part, each tensor once: the decoder counts what it does not share."""
    def n(modules):
        return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())
    text_ids = {id(p) for p in online_text.parameters()}
    own = [] if decoder is None else [p for p in decoder.parameters() if id(p) not in text_ids]
    return dict(vit=n([online_vit]), text=n([online_text]), decoder=sum(p.numel() for p in own),
                heads=n(heads), momentum=n(momentum))


def our_counts(m):
    return counts(m.visual_encoder, m.text_encoder, m.text_decoder,
                  [m.vision_proj, m.text_proj, m.itm_head, torch.nn.ParameterList([m.temp])],
                  [mom for _, mom in m.online_momentum_pairs()])


def tie_like_blip(encoder, decoder):
    """BLIP's tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '', '/attention') on
    Hugging Face modules: each module with a weight whose path lacks '/attention' gives the
    decoder's weight and bias to the encoder's module at the same path."""
    modules = dict(encoder.named_modules())
    for name, mod in decoder.named_modules():
        if "weight" in mod._parameters and "/attention" not in "/" + name.replace(".", "/"):
            modules[name].weight = mod.weight
            if getattr(mod, "bias", None) is not None:
                modules[name].bias = mod.bias


def official_counts(name):
    """The parameters of ALBEF's or BLIP's pre-training model (as ELIP runs it), rebuilt on the
    meta device from public reference code: timm's VisionTransformer and Hugging Face's BERT,
    configured as the official code configures them, with its changes to BERT:
      ALBEF (models/model_pretrain.py): ViT-B/16 at 256 px (configs/Pretrain.yaml), no
        classifier; BertForMaskedLM of bert-base-uncased with cross-attention in layers 6-11 only
        (configs/config_bert.json fusion_layer 6; models/xbert.py); ITC projections to 256, ITM
        head, temperature; momentum ViT, BertForMaskedLM and projections.
      BLIP (models/blip_pretrain.py): ViT-B/16 at 224 px; BertModel without pooler, cross-
        attention in every layer (configs/bert_config.json) and no token-type embeddings (its
        models/med.py BertEmbeddings has none), vocabulary 30524; BertLMHeadModel decoder tied by
        tie_encoder_decoder_weights; projections, ITM head, temperature; momentum ViT, BertModel
        and projections (no momentum decoder).
    Buffers (queues, queue pointer, position ids) are not parameters and not counted."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    nn = torch.nn
    with torch.device("meta"):
        def vit():
            return timm.models.vision_transformer.VisionTransformer(
                img_size=256 if name == "albef" else 224, patch_size=16, embed_dim=768, depth=12,
                num_heads=12, mlp_ratio=4, qkv_bias=True, num_classes=0)

        def bert():      # bert-base-uncased with cross-attention (Hugging Face: decoder only)
            cfg = transformers.BertConfig(vocab_size=30522 if name == "albef" else 30524,
                                          add_cross_attention=True, is_decoder=True)
            if name == "albef":
                text = transformers.BertForMaskedLM(cfg)
                for layer in text.bert.encoder.layer[:6]:
                    del layer.crossattention
                return text, None
            text, dec = transformers.BertModel(cfg, add_pooling_layer=False), None
            dec = transformers.BertLMHeadModel(cfg)
            for model in (text, dec.bert):
                del model.embeddings.token_type_embeddings
            return text, dec

        heads = [nn.Linear(768, 256), nn.Linear(768, 256), nn.Linear(768, 2),
                 nn.ParameterList([nn.Parameter(torch.tensor(0.07))])]
        text, dec = bert()
        if dec is not None:
            tie_like_blip(text, dec.bert)
            assert dec.cls.predictions.decoder.weight is text.embeddings.word_embeddings.weight
        momentum = [vit(), bert()[0], nn.Linear(768, 256), nn.Linear(768, 256)]
        return counts(vit(), text, dec, heads, momentum)


@pytest.mark.parametrize("name", ["albef", "blip"])
def test_parameter_counts_equal_the_official_architectures(name):
    """Part by part, on the meta device (no memory, no weights): ours equal the official models
    rebuilt from timm and Hugging Face (ALBEF: 419,873,911 in all, 209,937,725 trained; BLIP:
    475,892,799 and 252,441,919)."""
    with torch.device("meta"):
        ours = our_counts(ELIPModel(preset_config(name)))
    official = official_counts(name)
    assert ours == official
    total = {"albef": 419_873_911, "blip": 475_892_799}[name]
    assert sum(ours.values()) == total
    assert sum(ours.values()) - ours["momentum"] == {"albef": 209_937_725, "blip": 252_441_919}[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["albef", "blip"])
def test_full_width_preset_trains_and_counts_as_the_official_model(name):
    """A smoke run at full width on the CPU: the preset's model with random weights, three AdamW
    steps on a batch of 2 (random images, random BERT ids), every loss finite; the parameter
    table against the official architecture. Minutes: run it with
    OMP_NUM_THREADS=1 python -m pytest -q -s -m slow tests/test_model.py"""
    torch.manual_seed(0)
    mc = preset_config(name)
    t0 = time.time()
    m = ELIPModel(mc).train()
    built = time.time() - t0
    opt = build_optimizer(m, 1e-4, 0.02)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, mc.img_size, mc.img_size, generator=g)
    ids = torch.randint(1000, 30000, (2, mc.max_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102                                  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    steps = []
    for _ in range(3):
        t0 = time.time()
        out = m({"image": images, "text_ids": ids, "text_mask": mask}, alpha=0.4)
        queued = [out.pop("queue")]
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.momentum_step(queued)
        steps.append((time.time() - t0, {k: round(v.item(), 3) for k, v in out.items()}))
        assert all(torch.isfinite(v) for v in out.values())
    ours, official = our_counts(m), official_counts(name)
    print(f"\n{name}: built in {built:.0f} s; steps (s, losses): {steps}")
    print(f"{'part':<10}{'ours':>14}{'official':>14}")
    for part in ours:
        print(f"{part:<10}{ours[part]:>14,}{official[part]:>14,}")
    print(f"{'total':<10}{sum(ours.values()):>14,}{sum(official.values()):>14,}")
    print(f"{'trained':<10}{sum(ours.values()) - ours['momentum']:>14,}"
          f"{sum(official.values()) - official['momentum']:>14,}")
    assert ours == official


# ---- mixed precision: ITC's logits in fp32, the queue's dtype kept ---------------------------
def test_similarity_is_fp32_under_bf16_autocast():
    """At 1 / temp = 14 bf16 logits are 0.06 apart near the top: model.similarity leaves
    autocast and multiplies in fp32. The bf16 product is the control that this can fail."""
    g = torch.Generator().manual_seed(6)
    a = F.normalize(torch.randn(8, 64, generator=g), dim=1).bfloat16()          # (B, E)
    b = F.normalize(torch.randn(64, 30, generator=g), dim=0).bfloat16()         # (E, N)
    temp = torch.tensor(0.07)
    want = a.float() @ b.float() / temp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = similarity(a, b, temp)
        plain = a @ b / temp                                # what autocast alone would give
    assert got.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert (got - want).abs().max() < 1e-5
    assert (plain.float() - want).abs().max() > 1e-3


def test_itc_under_bf16_autocast_matches_fp32_and_the_queue_stays_fp32(monkeypatch):
    """A forward under bf16 autocast: every similarity the model computes is fp32, though its
    features are bf16; ITC on those features equals the fp32 loss (it would not with bf16
    logits); the bf16 momentum features go into the fp32 queue through momentum_step."""
    m = tiny().train()                              # ALBEF's ITC: momentum candidates, queue of 20
    seen, real = [], model_module.similarity

    def recorded(a, b, t):
        s = real(a, b, t)
        seen.append((a.dtype, s.dtype))
        return s
    monkeypatch.setattr(model_module, "similarity", recorded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch())
    assert len(seen) == 6                       # ITC: 2 distillation + 2 logits; ITM's 2
    assert all(a == torch.bfloat16 and s == torch.float32 for a, s in seen)
    assert all(out[k].dtype == torch.float32 for k in ("itc", "itm", "mlm", "loss"))
    image_m, text_m, idx = out.pop("queue")
    assert image_m.dtype == text_m.dtype == torch.bfloat16
    m.momentum_step([(image_m, text_m, idx)])
    assert m.image_queue.dtype == m.text_queue.dtype == torch.float32
    assert torch.equal(m.image_queue[:, :6], image_m.float().T)
    assert torch.equal(m.text_queue[:, :6], text_m.float().T) and int(m.queue_ptr) == 6
    # ITC on bf16 features (the queue now holds 6 candidates) against fp32 on the same values
    g = torch.Generator().manual_seed(7)
    f = [F.normalize(torch.randn(6, m.cfg.embed_dim, generator=g), dim=1).bfloat16()
         for _ in range(4)]
    with torch.no_grad():
        want = m.itc_loss(*[x.float() for x in f], alpha=0.4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.itc_loss(*f, alpha=0.4)
        monkeypatch.setattr(model_module, "similarity", lambda a, b, t: a @ b / t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            coarse = m.itc_loss(*f, alpha=0.4)      # the control: bf16 logits
    assert got.dtype == torch.float32 and abs(got - want) < 1e-5
    assert abs(coarse.float() - want) > 1e-3


def test_queue_write_of_bf16_features_into_an_fp32_queue():
    m = tiny()                                      # queue of 20, fp32
    g = torch.Generator().manual_seed(8)
    f = F.normalize(torch.randn(8, m.cfg.embed_dim, generator=g), dim=1).bfloat16()
    m.enqueue(f, -f, idx=torch.arange(8))
    assert m.image_queue.dtype == torch.float32 and int(m.queue_ptr) == 8
    assert torch.equal(m.image_queue[:, :8], f.float().T)
    assert torch.equal(m.text_queue[:, :8], -f.float().T)
    assert m.idx_queue[:8].tolist() == list(range(8)) and int(m.queue_filled.sum()) == 8


# ---- the paper presets never reach the embedded world's aids ---------------------------------
def paper_tiny(name):
    """The albef or blip preset's architecture (layers, heads, fusion, BLIP's tokens and tied
    decoder, ELIP's pruning schedule) at toy widths: 64 px images of 16 px patches."""
    arch = {k: v for k, v in PRESETS[name].items() if k in ModelConfig.__dataclass_fields__}
    arch.update(img_size=64, vision_width=64, text_width=64, vision_heads=4, text_heads=4,
                text_mlp=128, embed_dim=32, queue_size=16, vocab_size=42, dec_id=40, enc_id=41,
                prune=PruneConfig(**PruneConfig.presets()["elip"]))
    return ModelConfig(**arch)


def files_run(fn):
    """The source files of every Python function that runs inside fn()."""
    files = set()
    sys.setprofile(lambda frame, event, arg:
                   event == "call" and files.add(frame.f_code.co_filename))
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files


@pytest.mark.parametrize("name", ["albef", "blip"])
def test_paper_preset_forward_never_touches_world_aids(name):
    """world_aids.build_model gives the paper presets a plain ELIPModel (ViT's linear patch map,
    timm's random positions, no object head), and its forward and momentum_step run no line of
    world_aids.py; the tiny preset's WorldModel does, the control that the probe sees it."""
    torch.manual_seed(0)
    mc = paper_tiny(name)
    m = world_aids.build_model(mc, world_aids.WorldAids()).train()
    assert type(m) is ELIPModel and not hasattr(m, "object_head") and not hasattr(m, "aids")
    assert type(m.visual_encoder.patch_embed).__name__ == "PatchEmbed"
    assert not any("object_head" in k for k in m.state_dict())
    b = batch(B=4)
    b["image"] = torch.randn(4, 3, 64, 64)
    result = {}

    def step():
        result["out"] = out = m(b)
        out["loss"].backward()
        m.momentum_step([out.pop("queue")])
    files = files_run(step)
    assert any(f.endswith("model.py") for f in files)
    assert not any(f.endswith("world_aids.py") for f in files), sorted(files)
    assert set(result["out"]) == set(mc.losses) | {"loss"}
    assert all(torch.isfinite(result["out"][k]) for k in mc.losses)
    world = world_aids.build_model(mc, world_aids.WorldAids(conv_stem=True))
    assert isinstance(world, world_aids.WorldModel)
    assert any(f.endswith("world_aids.py") for f in files_run(lambda: world(b)))
