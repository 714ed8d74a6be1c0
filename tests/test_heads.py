"""ALBEF's momentum distillation in the SNLI-VE and NLVR2 models, on tiny random models: the
loss is (1 - alpha) CE + alpha KD against the momentum model's softmax, computed here by hand
from the two models' logits; the teacher is the momentum copies alone; the EMA update, once per
momentum_step. tasks.build_model builds every model's ViTs as the pre-trained model's (the tiny
preset's ConvStem), so its weights load."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import tasks
import world_aids
from heads import CaptionModel, NLVRModel, VEModel, load_pretrained
from model import ModelConfig
from pruning import PruneConfig
from vit import PatchEmbed
from vqa import VQAModel

CFG = ModelConfig(img_size=16, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
                  vocab_size=20, text_width=32, text_layers=1, fusion_layers=1, text_heads=2,
                  text_mlp=64, text_dropout=0.0, losses=("itc", "itm"),
                  prune=PruneConfig(method="elip", prune_layers=(1,), keep_ratios=(0.5,)))


def perturbed(model_cls):
    """A distilling model whose momentum copies differ from the online modules, in eval mode."""
    torch.manual_seed(0)
    model = model_cls(CFG, distill=True)
    with torch.no_grad():
        for name in model.momentum_names:
            for p in getattr(model, name + "_m").parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(model_cls):
    """A batch as data.collate makes it for the task: its images, "text_ids", "text_mask"."""
    g = torch.Generator().manual_seed(1)
    names = ("image0", "image1") if model_cls is NLVRModel else ("image",)
    images = {name: torch.randn(4, 3, 16, 16, generator=g) for name in names}
    ids = torch.randint(5, 20, (4, 6), generator=g)
    ids[:, 0] = 2                                                       # [CLS]
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {**images, "text_ids": ids, "text_mask": mask}


@pytest.mark.parametrize("model_cls", [VEModel, NLVRModel])
@torch.no_grad()
def test_distillation_loss_by_hand(model_cls):
    model = perturbed(model_cls)
    x = inputs(model_cls)
    labels = torch.tensor([0, 1, 1, 0])
    batch = {**x, "label": labels}
    alpha = 0.4
    out = model(batch, alpha=alpha)
    # the teacher is the momentum copies alone: a model whose online modules are those copies
    teacher = model_cls(CFG, distill=False).eval()
    teacher.load_state_dict({k.replace("_m.", "."): v for k, v in model.state_dict().items()
                             if "_m." in k})
    z, z_m = model.logits(x).tolist(), teacher.logits(x).tolist()
    ce = kd = 0.0
    for row, row_m, y in zip(z, z_m, labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        q = [math.exp(v) for v in row_m]
        q = [v / sum(q) for v in q]
        ce -= log_p[y] / len(z)
        kd -= sum(qi * lpi for qi, lpi in zip(q, log_p)) / len(z)
    name = "ve" if model_cls is VEModel else "nlvr"
    assert out[name] == pytest.approx(ce, rel=1e-5) and out["kd"] == pytest.approx(kd, rel=1e-5)
    assert out["loss"] == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)
    assert abs(kd - ce) > 1e-3                      # the soft targets are not the labels
    # alpha 0: the labels alone; without distill no teacher exists
    assert model(batch, alpha=0.0)["loss"] == pytest.approx(ce, rel=1e-5)
    plain = model_cls(CFG, distill=False)
    assert not hasattr(plain, "cls_head_m") and "kd" not in plain.eval()(batch)


@pytest.mark.parametrize("model_cls", [VEModel, NLVRModel])
def test_momentum_copies_start_equal_never_prune_and_follow_by_ema(model_cls):
    torch.manual_seed(0)
    model = model_cls(CFG, distill=True, momentum=0.9)
    assert model.momentum_names == ("visual_encoder", "text_encoder", "cls_head")
    assert model.visual_encoder.prune.method == "elip"
    assert model.visual_encoder_m.prune.method == "none"           # the teacher sees all tokens
    online, momentum = dict(model.named_parameters()), dict(model.state_dict())
    for name in model.momentum_names:
        for k, p in getattr(model, name).named_parameters():
            assert torch.equal(momentum[f"{name}_m.{k}"], p)
            assert not getattr(model, name + "_m").get_parameter(k).requires_grad
    trainable = [k for k, p in online.items() if p.requires_grad]
    assert not any("_m." in k for k in trainable)
    old = {k: v.clone() for k, v in model.state_dict().items() if "_m." in k}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.momentum_step([])
    for k, v in old.items():
        assert torch.allclose(model.state_dict()[k], 0.9 * v + 0.1 * online[k.replace("_m.", ".")],
                              atol=1e-6), k
    # without distillation there is no teacher, and a step changes nothing
    plain = model_cls(CFG, distill=False)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.momentum_step([])
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("task", ["retrieval", "vqa", "nlvr", "ve", "caption"])
def test_build_model_builds_the_pretrained_vits_and_loads_a_tiny_checkpoint(task):
    """With the tiny preset's aids every ViT of the task's model, online and momentum copies
    alike, has the ConvStem and starts from sine-cosine positions; a checkpoint of the world's
    pre-training model loads into it with only the task's new weights left fresh. Without
    aids, timm's linear patch map."""
    aids = world_aids.TINY
    cfg = SimpleNamespace(task=task, distill=True, momentum=0.995, vqa_head="classifier",
                          vqa_k=4, prompt="a picture of")
    tok = SimpleNamespace(encode=lambda text: [2, 7, 8, 9, 3], sep_id=3)
    mc = dataclasses.replace(CFG, queue_size=0, distill=False)   # the tiny preset's ITC
    torch.manual_seed(0)
    model = tasks.build_model(cfg, mc, tok, ["yes", "no"], aids)
    vits = [m for m in model.modules() if isinstance(m, world_aids.VisionTransformer)]
    assert len(vits) == (1 if task in ("vqa", "caption") else 2)
    grid = int(vits[0].num_patches ** 0.5)
    for vit in vits:
        assert isinstance(vit.patch_embed, world_aids.ConvStem)
        assert torch.allclose(vit.pos_embed[0, 1:], aids.sincos_pos * world_aids.sincos_pos_embed(
            grid, vit.embed_dim))
    if task == "retrieval":   # the pre-training model, without the aids downstream data lacks
        assert isinstance(model, world_aids.WorldModel)
        assert not model.aids.objects and not model.aids.itc_all_captions
        return
    pretrained = world_aids.WorldModel(mc, dataclasses.replace(aids, objects=False,
                                                              itc_all_captions=False))
    weights = load_pretrained(model, pretrained.state_dict())
    assert all(any(p in k for p in model.NEW_PARAMS) for k in weights["initialised"])
    assert any("patch_embed.proj" in k for k in weights["loaded"])
    plain = tasks.build_model(cfg, CFG, tok, ["yes", "no"], world_aids.WorldAids())
    assert all(type(m.patch_embed) is PatchEmbed for m in plain.modules()
               if isinstance(m, world_aids.VisionTransformer))


def test_models_without_a_teacher_step_as_a_no_op():
    """The training loop calls momentum_step after every optimizer step on any model."""
    torch.manual_seed(0)
    for model in (VQAModel(CFG, 3), CaptionModel(CFG, [2, 7], sep_id=3)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.momentum_step([])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
