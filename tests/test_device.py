"""Host/device mixes, caught on a CPU. Every architecture of model.PRESETS, shrunk, and every
downstream model run forward, backward and the training step's other pieces (optimizer step,
momentum update, queue write, the ranks' fingerprint) on PyTorch's `meta` device: meta tensors
carry shapes and no data, and an op that meets a meta tensor and a CPU one (other than a
0-dim scalar, which CUDA accepts too) raises, as it would between a GPU and the CPU. So a
tensor made without device= inside the model or the step fails here, not on the first GPU."""
import dataclasses

import pytest
import torch

import world_aids
from heads import CaptionModel, NLVRModel, VEModel
from model import PRESETS, ELIPModel, ModelConfig
from pruning import METHODS, PruneConfig
from trainer import build_optimizer, params_fingerprint
from vit import PatchEmbed, VisionTransformer
from vqa import VQADecoderModel, VQAModel
from world_aids import ConvStem

META = torch.device("meta")
B, T, VOCAB = 4, 12, 60


def shrunk(preset, **kw):
    """The preset's architecture and objectives at toy size: losses, queue on/off,
    distillation, drop path, dropout and the BLIP/ALBEF text layout kept; three cuts of the
    pruning schedule in 4 layers."""
    p = {k: v for k, v in PRESETS[preset].items() if k in ModelConfig.__dataclass_fields__}
    prune = PruneConfig(prune_layers=(1, 2, 3), tome_r=2, **kw.pop("prune", {}))
    p.update(img_size=32, patch_size=8, vision_width=32, vision_depth=4, text_width=32,
             vision_heads=2, text_heads=2, text_mlp=64, embed_dim=16, vocab_size=VOCAB, max_len=T,
             dec_id=VOCAB - 2, enc_id=VOCAB - 1,                  # BLIP's [DEC], [ENC]
             text_layers=min(2, p.get("text_layers", 2)),
             fusion_layers=min(1, p.get("fusion_layers", 2)),
             queue_size=min(16, p.get("queue_size", 1024)), prune=prune, **kw)
    return ModelConfig(**p)


def meta_inputs(with_idx=False, device=META):
    batch = dict(image=torch.randn(B, 3, 32, 32, device=device),
                 text_ids=torch.randint(5, VOCAB, (B, T), device=device),
                 text_mask=torch.ones(B, T, dtype=torch.long, device=device))
    if with_idx:
        batch["image_id"] = torch.arange(B, device=device) // 2
    return batch


def world_inputs(aids, cfg, device=META):
    """What the tiny preset's aids read besides the image and its caption: every caption of
    each image (two here) for ITC over all captions, the objects' patch cover and labels."""
    extra = {}
    if aids.itc_all_captions:
        extra.update(captions_ids=torch.randint(5, VOCAB, (2 * B, T), device=device),
                     captions_mask=torch.ones(2 * B, T, dtype=torch.long, device=device),
                     captions_count=torch.full((B,), 2, device=device))
    if aids.objects:
        M = (cfg.img_size // cfg.patch_size) ** 2
        extra.update(object_cover=torch.rand(B, 3, M, device=device),
                     object_labels=torch.zeros(B, 3, 4, dtype=torch.long, device=device))
    return extra


def preset_aids(preset):
    return world_aids.TINY if preset == "tiny" else world_aids.WorldAids()


def on_meta(model):
    """Built on the CPU (initialisers read values), then moved: every later tensor must follow."""
    return model.to(META).train()


def train_step(model, loss_fn):
    """One optimizer step as the training scripts take it (clipping included), on meta."""
    optimizer = build_optimizer(model, 1e-3, 0.02)
    out = loss_fn()
    assert out["loss"].shape == ()
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_pretraining_step_stays_on_the_device(preset):
    aids = preset_aids(preset)
    model = on_meta(world_aids.build_model(shrunk(preset), aids))
    batch = {**meta_inputs(), **world_inputs(aids, model.cfg)}
    out = train_step(model, lambda: model(batch, alpha=0.4))
    model.momentum_step([out.pop("queue")] if "queue" in out else [])
    assert set(out) == set(model.cfg.losses) | {"loss"} | ({"objects"} if aids.objects else set())
    assert out["loss"].device == META
    assert all(b.device == META for b in model.buffers())
    assert params_fingerprint(model).device == META


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_step_of_every_preset_runs_under_bf16_autocast(preset):
    """As --amp bf16 trains (here on the CPU): the step runs, the losses and the similarity
    logits stay fp32, and the bf16 momentum features go into the fp32 queue."""
    torch.manual_seed(0)
    aids = preset_aids(preset)
    model = world_aids.build_model(shrunk(preset), aids).train()
    batch = {**meta_inputs(device="cpu"), **world_inputs(aids, model.cfg, device="cpu")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_step(model, lambda: model(batch, alpha=0.4))
    model.momentum_step([out.pop("queue")] if "queue" in out else [])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert model.image_queue.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_every_pruning_method_stays_on_the_device(method):
    model = on_meta(world_aids.build_model(shrunk("tiny", prune=dict(method=method)),
                                           world_aids.TINY))
    train_step(model, lambda: model({**meta_inputs(), **world_inputs(world_aids.TINY,
                                                                      model.cfg)}))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("precision", ["bf16 weights", "bf16 autocast"])
def test_every_pruning_method_keeps_the_dtype(method, precision):
    """The ViT alone in bfloat16, its weights cast or under CPU autocast: the tokens entering
    every layer keep the stream's dtype (a float32 tensor made inside the reduction would
    promote them) and the step backpropagates."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                            prune=PruneConfig(method=method, prune_layers=(1, 2, 3), tome_r=2))
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    vit = vit.to(dtype).train()
    seen = []
    for blk in vit.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    images, text_cls = torch.randn(B, 3, 32, 32, dtype=dtype), torch.randn(B, 32, dtype=dtype)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16 autocast"):
        out = vit(images, text_cls)
    out.float().sum().backward()
    assert set(seen) == {dtype} and out.dtype == dtype
    assert all(p.grad.dtype == dtype for p in vit.parameters() if p.grad is not None)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_retrieval_finetuning_stays_on_the_device(preset):
    cfg = dataclasses.replace(shrunk(preset), losses=("itc", "itm"))
    model = on_meta(ELIPModel(cfg))
    out = train_step(model, lambda: model(meta_inputs(with_idx=True), alpha=0.4))
    model.momentum_step([out.pop("queue")] if "queue" in out else [])


@pytest.mark.parametrize("preset", ["albef", "blip"])      # fusion layers, or BLIP's layout
@pytest.mark.parametrize("embed_layer", [PatchEmbed, ConvStem])   # timm's, the tiny preset's
def test_downstream_heads_stay_on_the_device(preset, embed_layer):
    """Every downstream model on its named batch (data.collate's fields), then momentum_step."""
    cfg = dataclasses.replace(shrunk(preset), losses=("itc", "itm"))
    batch = meta_inputs()
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    text = {"text_ids": ids, "text_mask": mask}
    question = {"image": images, "question_ids": ids, "question_mask": mask}
    answer_ids = torch.randint(5, VOCAB, (6, 4), device=META)          # 2, 1, 2 and 1 answers
    answers_batch = {"answers_ids": answer_ids, "answers_mask": torch.ones_like(answer_ids),
                     "answers_count": torch.tensor([2, 1, 2, 1], device=META),
                     "weights": torch.rand(6, device=META)}
    answers = (torch.randint(5, VOCAB, (3, 4)), torch.ones(3, 4, dtype=torch.long))   # the list
    embed = dict(embed_layer=embed_layer)
    cases = [
        (VQAModel(cfg, 7, **embed),
         lambda m: m({**question, "targets": torch.rand(B, 7, device=META)})),
        (VQADecoderModel(cfg, *answers, distill=True, **embed),
         lambda m: m({**question, **answers_batch}, alpha=0.4)),
        (NLVRModel(cfg, distill=True, **embed),
         lambda m: m({"image0": images, "image1": images, **text,
                      "label": torch.randint(2, (B,), device=META)}, alpha=0.4)),
        (VEModel(cfg, distill=True, **embed),
         lambda m: m({"image": images, **text, "label": torch.randint(3, (B,), device=META)},
                     alpha=0.4)),
        (CaptionModel(cfg, [cfg.cls_id, 7, 8], sep_id=3, **embed),
         lambda m: m({"image": images, **text})),
    ]
    for model, forward in cases:
        assert all(isinstance(v.patch_embed, embed_layer) for v in model.modules()
                   if isinstance(v, VisionTransformer))
        model = on_meta(model)
        train_step(model, lambda: forward(model))
        model.momentum_step([])
    decoder = cases[1][0]
    assert decoder.eval().answer_scores(question).shape == (B, 3)


def test_a_host_tensor_in_the_step_is_caught():
    """The check works: a fingerprint with its weights made on the host (no device=) fails."""
    model = on_meta(ELIPModel(shrunk("tiny")))

    def host_fingerprint(model):
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        return (flat * torch.linspace(1, 2, flat.numel(), dtype=torch.float64)).sum()

    with pytest.raises(RuntimeError, match="device"):
        host_fingerprint(model)
    assert params_fingerprint(model).device == META
