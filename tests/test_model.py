"""The pre-training model on the tiny preset: losses, momentum encoders, queues, pruning mode, and
MomentumStep in trainer.fit's loop."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from model import ELIPModel, ModelConfig, MomentumStep
from pruning import PruneConfig
from trainer import RunConfig, fit


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
    assert set(out) == set(losses) | {"loss", "queue"}
    image_feat_m, text_feat_m, idx = out.pop("queue")          # for MomentumStep
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
        assert torch.equal(p_m, mu * b + (1 - mu) * p)


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
    images, ids, mask = batch()
    step = MomentumStep(m)
    out = step.take(m(images, ids, mask))
    assert "queue" not in out and int(m.queue_ptr) == 0 and not m.queue_filled.any()  # no state
    with torch.no_grad():
        expect = m.image_feat(m.encode_image(images, momentum=True), momentum=True)
    step.after_step()
    assert torch.allclose(m.image_queue[:, :6], expect.T, atol=1e-5)
    assert int(m.queue_ptr) == 6 and step.pending == []


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


@pytest.mark.parametrize("kw, reads", [
    (dict(queue_size=0, distill=False, itc_online_batch=True), False),     # the tiny preset
    (dict(queue_size=20, distill=False, itc_online_batch=True), True),     # the queue
    (dict(queue_size=0, distill=True, itc_online_batch=True), True),       # distillation
    (dict(queue_size=0, distill=False, itc_online_batch=False), True),     # ALBEF's candidates
])
def test_momentum_encoders_run_and_update_only_when_a_loss_reads_them(kw, reads):
    m = tiny(**kw).train()
    calls = []
    for enc in (m.visual_encoder_m, m.text_encoder_m):
        enc.register_forward_hook(lambda *a: calls.append(1))
    step = MomentumStep(m)
    before = [p.clone() for p in m.momentum_params()]
    out = step.take(m(*batch()))
    out["loss"].backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    step.after_step()
    assert m.reads_momentum == reads and bool(calls) == reads
    moved = any(not torch.equal(a, b) for a, b in zip(before, m.momentum_params()))
    assert moved == reads


@dataclass
class FitConfig:
    run: RunConfig


def test_grad_accum_updates_momentum_and_queue_once_per_optimizer_step(tmp_path):
    """Two micro-batches of 3 per step: after the step the teacher is m * old + (1 - m) * new
    (not m ** 2), every micro-batch saw the same queue, and the pointer moved by 6 at once."""
    m = tiny(queue_size=20)
    images, ids, mask = batch(B=6)
    momentum = MomentumStep(m)
    with torch.no_grad():      # the step's momentum features, by the teacher before the step
        feats_m = m.image_feat(m.encode_image(images, momentum=True), momentum=True)   # (6, E)
    old = [p.clone() for p in m.momentum_params()]
    seen_ptr = []

    def loss_fn(model, batch, step, steps_per_epoch):
        seen_ptr.append(int(m.queue_ptr))
        return momentum.take(model(*batch))

    run = RunConfig(batch_size=3, grad_accum=2, max_steps=1, warmup_steps=1, lr=1e-3,
                    out_dir=str(tmp_path))
    fit(FitConfig(run), m, list(zip(images, ids, mask)), lambda b: [torch.stack(t) for t in zip(*b)],
        loss_fn, torch.device("cpu"), 0, 1, lambda msg: None, after_step=momentum.after_step)
    assert seen_ptr == [0, 0] and int(m.queue_ptr) == 6 and int(m.queue_filled.sum()) == 6
    mu = m.cfg.momentum
    new = [p for online, _ in m.online_momentum_pairs() for p in online.parameters()]
    assert not torch.equal(new[0], old[0])                   # the step moved the online weights
    for p_m, o, p in zip(m.momentum_params(), old, new):
        assert torch.equal(p_m, mu * o + (1 - mu) * p)
    # the queue holds the six samples' features (in the sampler's order), each once
    match = (m.image_queue[:, :6].T[:, None] - feats_m[None]).abs().amax(-1) < 1e-5   # (6, 6)
    assert torch.equal(match.sum(0), torch.ones(6, dtype=torch.long))
    assert torch.equal(match.sum(1), torch.ones(6, dtype=torch.long))
