"""The `albef` and `blip` presets against ELIP's official pre-training code, value by value.

The official values are written out here with the file and line they come from, in the
official ELIP repository (github.com/guoyang9/ELIP, commit 2d6b65b): ALBEF/... is ELIP-ALBEF,
BLIP/... is ELIP-BLIP. The schedules are re-computed by replaying the official training loops,
written here independently of trainer.py.
"""
import math

import pytest
import torch

import data
from config import parse_config
from model import ELIPModel, ModelConfig
from train_pretrain import PRESETS, TrainConfig
from trainer import RunConfig, alpha_at, build_optimizer, lr_at

OFFICIAL = {
    "albef": {
        "model.img_size": 256,              # ALBEF/configs/Pretrain.yaml:12 image_res
        "model.vision_width": 768,          # ALBEF/configs/Pretrain.yaml:13
        "model.embed_dim": 256,             # ALBEF/configs/Pretrain.yaml:14
        "run.batch_size": 40,               # ALBEF/configs/Pretrain.yaml:15 (per GPU, 4 GPUs)
        "model.temp": 0.07,                 # ALBEF/configs/Pretrain.yaml:16
        "model.mlm_prob": 0.15,             # ALBEF/configs/Pretrain.yaml:17
        "model.queue_size": 65536,          # ALBEF/configs/Pretrain.yaml:18
        "model.momentum": 0.995,            # ALBEF/configs/Pretrain.yaml:19
        "run.alpha": 0.4,                   # ALBEF/configs/Pretrain.yaml:20
        "run.lr": 1e-4,                     # ALBEF/configs/Pretrain.yaml:22 optimizer
        "run.weight_decay": 0.02,           # ALBEF/configs/Pretrain.yaml:22
        "run.epochs": 20,                   # ALBEF/configs/Pretrain.yaml:23 schedular
        "run.min_lr": 1e-5,                 # ALBEF/configs/Pretrain.yaml:23
        "run.warmup_lr": 1e-5,              # ALBEF/configs/Pretrain.yaml:23
        "run.warmup_steps": 10 * 100,       # ALBEF/configs/Pretrain.yaml:23 warmup_epochs 10,
                                            # x step_size 100 (ALBEF/Pretrain.py:47-48)
        "run.schedule": "albef",            # ALBEF/Pretrain.py:94-95,170-171
        "run.decay": "albef",               # ALBEF/optim/optim_factory.py:31
        "run.alpha_ramp_epochs": 1.0,       # ALBEF/Pretrain.py:61-64
        "run.seed": 42,                     # ALBEF/Pretrain.py:206 (+ rank, :108)
        "run.amp": "off",                   # ALBEF/Pretrain.py:83-86: fp32, no autocast
        "run.grad_clip": 0.0,               # ALBEF/Pretrain.py:85-86: no clipping
        "run.grad_accum": 1,
        "model.prune.prune_layers": (2, 4, 10),          # ALBEF/configs/Pretrain.yaml:27
        "model.prune.keep_ratios": (0.9, 0.65, 0.4),     # ALBEF/configs/Pretrain.yaml:29
        "model.prune.method": "elip",
        "model.prune.lam": 0.8,             # ALBEF/models/vit.py:194
        "model.prune.merge": True,          # ALBEF/models/vit.py:185-222
        "model.drop_path": 0.0,             # ALBEF/models/vit.py:115 default, never set
        "model.patch_size": 16,             # ALBEF/models/model_pretrain.py:41-43 (ViT-B/16)
        "model.vision_depth": 12,
        "model.vision_heads": 12,
        "model.text_width": 768,            # bert-base-uncased (ALBEF/Pretrain.py:204)
        "model.text_heads": 12,
        "model.text_mlp": 3072,
        "model.text_dropout": 0.1,
        "model.text_layers": 6,             # ALBEF/configs/config_bert.json:19 fusion_layer 6
        "model.fusion_layers": 6,
        "model.losses": ("itc", "itm", "mlm"),
        "model.distill": True,              # ALBEF/models/model_pretrain.py:121-128
        "model.itc_online_batch": False,    # ALBEF/models/model_pretrain.py:114-131
        "model.itm_hard_negatives": True,   # ALBEF/models/model_pretrain.py:148-170
        "model.itm_weight_eps": 0.0,        # ALBEF/models/model_pretrain.py:150-154 softmax,
                                            # diagonal zeroed, nothing added
        "model.token_types": True,          # ALBEF/models/xbert.py:175 token_type_embeddings
        "model.blip_tokens": False,         # [CLS] throughout (fusion on the text states)
        "model.tie_decoder": False,         # no decoder
        "model.max_len": 25,                # ALBEF/Pretrain.py:59 max_length=25, truncation
        "pad_to_max_len": False,            # ALBEF/Pretrain.py:59 padding='longest'
        "max_words": 30,                    # ALBEF/dataset/caption_dataset.py:85
        "caption_style": "albef",           # ALBEF/dataset/utils.py pre_caption
        "crop_scale": (0.2, 1.0),           # ALBEF/dataset/__init__.py:18
        "randaug_n": 2,                     # ALBEF/dataset/__init__.py:20 RandomAugment(2, 7)
        "randaug_m": 7,
        "swap_left_right": False,           # ALBEF/dataset/__init__.py:19 flips the image only
    },
    "blip": {
        "model.img_size": 224,              # BLIP/configs/pretrain.yaml:16
        "run.batch_size": 42,               # BLIP/configs/pretrain.yaml:17 (per GPU, 4 GPUs)
        "model.queue_size": 57600,          # BLIP/configs/pretrain.yaml:19
        "run.alpha": 0.4,                   # BLIP/configs/pretrain.yaml:20
        "run.weight_decay": 0.05,           # BLIP/configs/pretrain.yaml:23
        "run.lr": 1e-4,                     # BLIP/configs/pretrain.yaml:24 init_lr
        "run.min_lr": 1e-6,                 # BLIP/configs/pretrain.yaml:25
        "run.warmup_lr": 1e-6,              # BLIP/configs/pretrain.yaml:26
        "run.lr_decay_rate": 0.9,           # BLIP/configs/pretrain.yaml:27
        "run.epochs": 15,                   # BLIP/configs/pretrain.yaml:28 max_epoch
        "run.warmup_steps": 3000,           # BLIP/configs/pretrain.yaml:29
        "run.schedule": "blip",             # BLIP/pretrain.py:48-49,128
        "run.decay": "all",                 # BLIP/pretrain.py:107 AdamW(model.parameters())
        "run.alpha_ramp_epochs": 2.0,       # BLIP/pretrain.py:55-56
        "run.seed": 42,                     # BLIP/pretrain.py:160 (+ rank, :82)
        "run.amp": "off",                   # BLIP/pretrain.py:58-62: fp32, no autocast
        "run.grad_clip": 0.0,
        "run.grad_accum": 1,
        "model.prune.prune_layers": (2, 4, 10),          # BLIP/configs/pretrain.yaml:33
        "model.prune.keep_ratios": (0.9, 0.65, 0.4),     # BLIP/configs/pretrain.yaml:35
        "model.prune.method": "elip",
        "model.prune.lam": 0.8,             # BLIP/models/vit.py:213
        "model.prune.merge": True,
        "model.drop_path": 0.0,             # BLIP/models/blip_pretrain.py:38 create_vit(.., 0)
        "model.patch_size": 16,             # BLIP/models/blip.py:197
        "model.vision_width": 768,          # ViT-B (BLIP/configs/pretrain.yaml:12 vit 'base')
        "model.vision_depth": 12,
        "model.vision_heads": 12,
        "model.text_width": 768,            # bert-base-uncased (BLIP/models/blip_pretrain.py:55)
        "model.text_layers": 12,
        "model.fusion_layers": 0,           # all cross-attend (BLIP/configs/bert_config.json)
        "model.text_heads": 12,
        "model.text_mlp": 3072,
        "model.text_dropout": 0.1,
        "model.embed_dim": 256,             # BLIP/models/blip_pretrain.py:26
        "model.momentum": 0.995,            # BLIP/models/blip_pretrain.py:28
        "model.temp": 0.07,                 # BLIP/models/blip_pretrain.py:88
        "model.losses": ("itc", "itm", "lm"),
        "model.distill": True,              # BLIP/models/blip_pretrain.py:127-134
        "model.itc_online_batch": False,
        "model.itm_hard_negatives": True,   # BLIP/models/blip_pretrain.py:158-162
        "model.itm_weight_eps": 1e-4,       # BLIP/models/blip_pretrain.py:159,161 +1e-4
        "model.token_types": False,         # BLIP/models/med.py:52-58 word + position only
        "model.blip_tokens": True,          # BLIP/models/blip_pretrain.py:148 [ENC], :204 [DEC]
        "model.tie_decoder": True,          # BLIP/models/blip_pretrain.py:95
        "model.label_smoothing": 0.1,       # BLIP/models/med.py:914
        "model.max_len": 30,                # BLIP/models/blip_pretrain.py:102 max_length=30
        "pad_to_max_len": True,             # BLIP/models/blip_pretrain.py:102 'max_length'
        "max_words": 30,                    # BLIP/data/pretrain_dataset.py:57
        "caption_style": "blip",            # BLIP/data/utils.py:10-29 pre_caption
        "crop_scale": (0.2, 1.0),           # BLIP/pretrain.py:90 min_scale=0.2
        "randaug_n": 2,                     # BLIP/data/__init__.py:18 RandomAugment(2, 5)
        "randaug_m": 5,
        "swap_left_right": False,           # BLIP/data/__init__.py:17 flips the image only
    },
}

# the ten operations of both (ALBEF/dataset/__init__.py:20-21; BLIP/data/__init__.py:18-19)
ALBEF_OPS = ['Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness',
             'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate']
BLIP_OPS = ['Identity', 'AutoContrast', 'Brightness', 'Sharpness', 'Equalize',
            'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate']


def resolved(preset, *flags):
    cfg, _ = parse_config(TrainConfig(), ["--preset", preset, *flags], PRESETS)
    return cfg


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("preset", ["albef", "blip"])
def test_preset_equals_the_official_configuration(preset):
    cfg = resolved(preset)
    wrong = {k: (get(cfg, k), v) for k, v in OFFICIAL[preset].items() if get(cfg, k) != v}
    assert not wrong, f"(ours, official): {wrong}"


@pytest.mark.parametrize("preset, ops", [("albef", ALBEF_OPS), ("blip", BLIP_OPS)])
def test_randaugment_is_the_official_one(preset, ops):
    cfg = resolved(preset)
    tf = data.create_transform(cfg.model.img_size, True, cfg.crop_scale, cfg.randaug_n,
                               cfg.randaug_m)
    aug = [t for t in tf.transforms if isinstance(t, data.RandomAugment)]
    assert len(aug) == 1 and (aug[0].n, aug[0].m) == (2, OFFICIAL[preset]["randaug_m"])
    assert sorted(data.RANDAUG_OPS) == sorted(ops) and len(set(ops)) == 10


# ---- the learning rate, replaying the official loops -------------------------------------
def albef_official_lrs(steps_per_epoch, epochs=20, lr=1e-4, warmup_lr=1e-5, min_lr=1e-5,
                       warmup_epochs=10):
    """The lr of every iteration of ALBEF/Pretrain.py with timm's CosineLRScheduler
    (ALBEF/scheduler/cosine_lr.py:69-96; scheduler_factory.py:26-40: t_initial = epochs,
    cycle_limit 1, warmup_prefix True, decay_rate 1)."""
    def get_lr(t):
        if t < warmup_epochs:
            return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
        t -= warmup_epochs
        i = t // epochs
        if i >= 1:
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - epochs * i) / epochs))

    current = warmup_lr                       # set at construction (cosine_lr.py:63-65)
    out = []
    for epoch in range(epochs):
        if epoch > 0:
            current = get_lr(epoch + warmup_epochs)          # Pretrain.py:170-171
        for i in range(steps_per_epoch):
            out.append(current)                              # optimizer.step() of iteration i
            if epoch == 0 and i % 100 == 0 and i <= warmup_epochs * 100:
                current = get_lr(i // 100)                   # Pretrain.py:94-95, after the step
    return out


def blip_official_lrs(steps_per_epoch, epochs=15, init_lr=1e-4, warmup_lr=1e-6, min_lr=1e-6,
                      decay=0.9, warmup_steps=3000):
    """The lr of every iteration of BLIP/pretrain.py (utils.py:8-18)."""
    out = []
    for epoch in range(epochs):
        current = max(min_lr, init_lr * decay ** epoch)     # pretrain.py:128 step_lr_schedule
        for i in range(steps_per_epoch):
            if epoch == 0:                                   # pretrain.py:48-49
                current = min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)
            out.append(current)
    return out


@pytest.mark.parametrize("steps_per_epoch", [1500, 450, 100])   # warmup inside epoch 0, or cut
def test_albef_lr_every_iteration(steps_per_epoch):
    run = resolved("albef").run
    official = albef_official_lrs(steps_per_epoch)
    ours = [lr_at(s, steps_per_epoch, run) for s in range(len(official))]
    assert ours == pytest.approx(official, rel=1e-12, abs=0)


def test_albef_lr_at_named_points():
    run, spe = resolved("albef").run, 2000
    cosine = lambda e: 1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * e / 20))    # noqa: E731
    points = {(0, 0): 1e-5, (0, 100): 1e-5, (0, 101): 1.9e-5, (0, 550): 5.5e-5,
              (0, 1000): 9.1e-5, (0, 1001): 1e-4, (0, 1999): 1e-4,
              (1, 0): cosine(1), (1, 1999): cosine(1), (10, 7): cosine(10), (19, 3): cosine(19)}
    for (epoch, i), want in points.items():
        assert lr_at(epoch * spe + i, spe, run) == pytest.approx(want, rel=1e-12), (epoch, i)


@pytest.mark.parametrize("steps_per_epoch", [4000, 1000])
def test_blip_lr_every_iteration(steps_per_epoch):
    run = resolved("blip").run
    official = blip_official_lrs(steps_per_epoch)
    ours = [lr_at(s, steps_per_epoch, run) for s in range(len(official))]
    assert ours == pytest.approx(official, rel=1e-12, abs=0)
    spe = steps_per_epoch
    assert lr_at(0, spe, run) == 1e-6 and lr_at(spe, spe, run) == pytest.approx(9e-5)
    assert lr_at(14 * spe + 5, spe, run) == pytest.approx(1e-4 * 0.9 ** 14)


def test_tiny_lr_is_the_per_step_cosine_as_before():
    run = resolved("tiny").run
    assert run.schedule == "cosine" and run.decay == "matrices" and run.alpha_ramp_epochs == 1

    def before(step, total):                 # the schedule of the tiny runs so far
        if step < run.warmup_steps:
            return run.lr * (step + 1) / run.warmup_steps
        t = (step - run.warmup_steps) / max(1, total - run.warmup_steps)
        return run.min_lr + 0.5 * (run.lr - run.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))

    for spe in (187, 3):
        total = spe * run.epochs
        assert all(lr_at(s, spe, run) == before(s, total) for s in range(total))


# ---- the distillation weight -------------------------------------------------------------
@pytest.mark.parametrize("preset", ["albef", "blip", "tiny"])
def test_alpha_ramp(preset):
    run, spe = resolved(preset).run, 50
    for epoch in range(4):
        for i in range(spe):
            if preset == "blip":             # BLIP/pretrain.py:56
                want = 0.4 * min(1, (epoch * spe + i) / (2 * spe))
            else:                            # ALBEF/Pretrain.py:61-64 (tiny: as before)
                want = 0.4 if epoch > 0 else 0.4 * min(1, i / spe)
            assert alpha_at(epoch * spe + i, spe, run) == pytest.approx(want, rel=1e-12)
    assert alpha_at(0, spe, RunConfig(alpha_ramp_epochs=0)) == 0.4


# ---- which parameters weight decay acts on ----------------------------------------------
def small_model():
    torch.manual_seed(0)
    return ELIPModel(ModelConfig(vocab_size=50, img_size=32, patch_size=16, vision_width=32,
                                 text_width=32, vision_heads=2, text_heads=2, text_mlp=64,
                                 vision_depth=4, text_layers=1, fusion_layers=1, embed_dim=16,
                                 queue_size=8, prune=dict(prune_layers=(2,), keep_ratios=(0.5,))))


def decayed_names(model, decay):
    opt = build_optimizer(model, 1e-4, 0.02, decay)
    ids = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == \
        sum(p.requires_grad for p in model.parameters())          # every trainable one, once
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_groups():
    model = small_model()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # ALBEF/optim/optim_factory.py:28-34: no decay on 1-D parameters and *.bias, frozen skipped
    albef = {n for n, p in trainable.items() if not (len(p.shape) == 1 or n.endswith(".bias"))}
    assert decayed_names(model, resolved("albef").run.decay) == albef
    assert {"temp", "visual_encoder.pos_embed", "visual_encoder.cls_token",
            "visual_encoder.patch_embed.proj.weight"} <= albef
    assert not any(n.endswith(".bias") or "norm" in n.lower() for n in albef)
    # BLIP/pretrain.py:107: every parameter
    assert decayed_names(model, resolved("blip").run.decay) == set(trainable)
    # tiny: matrices only, as before
    assert decayed_names(model, resolved("tiny").run.decay) == \
        {n for n, p in trainable.items() if p.dim() >= 2}
    assert "temp" not in decayed_names(model, "matrices")
