"""The `albef` and `blip` presets against ELIP's official pre-training code, value by value,
and the real-data fine-tuning presets against its downstream code.

The official values are written out here with the file and line they come from, in the
official ELIP repository (github.com/guoyang9/ELIP, commit 2d6b65b): ALBEF/... is ELIP-ALBEF,
BLIP/... is ELIP-BLIP. The schedules are re-computed by replaying the official training loops,
written here independently of trainer.py.
"""
import json
import math

import pytest
import torch
from PIL import Image

import data
import world_aids
import randaug
import tasks
from config import parse_config
from model import ELIPModel, ModelConfig
from tokenizer import Tokenizer
from train_downstream import TASK_PRESETS, DownstreamConfig
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
    assert sorted(randaug.RANDAUG_OPS) == sorted(ops) and len(set(ops)) == 10


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


# ---- downstream: the real-data presets of train_downstream.py ----------------------------
# ELIP's ALBEF/configs/*.yaml and BLIP/configs/*.yaml (commit 2d6b65b, as above). ELIP released
# no BLIP VQA: that preset is BLIP's own, github.com/salesforce/BLIP (commit 056a169), "sBLIP/".
ALBEF_FT = {
    "img_size": 384,                    # ALBEF/configs/*.yaml image_res (Retrieval_coco.yaml:8)
    "crop_scale": (0.5, 1.0),           # ALBEF/dataset/__init__.py:26 train_transform
    "randaug_n": 2,                     # ALBEF/dataset/__init__.py:28 RandomAugment(2, 7)
    "randaug_m": 7,
    "run.weight_decay": 0.02,           # ALBEF/configs/*.yaml optimizer (Retrieval_coco.yaml:23)
    "run.decay": "albef",               # ALBEF/optim/optim_factory.py:28-34
    "run.schedule": "albef",            # ALBEF/Retrieval.py:38-39,61-62 (timm cosine per epoch)
    "run.warmup_lr": 1e-5,              # ALBEF/configs/*.yaml schedular (Retrieval_coco.yaml:24)
    "run.min_lr": 1e-6,
    "run.warmup_steps": 1 * 100,        # warmup_epochs 1 x step_size 100 (ALBEF/Retrieval.py:38-39)
    "run.alpha": 0.4,                   # ALBEF/configs/*.yaml alpha (Retrieval_coco.yaml:19)
    "run.alpha_ramp_epochs": 1.0,       # warm_up: True (Retrieval_coco.yaml:21; Retrieval.py:46-49)
    "max_words": 30,                    # ALBEF/dataset/caption_dataset.py:16,50 max_words=30
    "eval_max_words": 30,
    "drop_path": 0.0,                   # ALBEF/models/model_retrieval.py:21-23: ViT default 0
    "prune": False,                     # ALBEF/models/model_retrieval.py:21-23: no prune_state
    "caption_style": "albef",           # ALBEF/dataset/utils.py pre_caption, pre_question
    "swap_left_right": False,           # ALBEF/dataset/__init__.py:27 flips the image alone
}
ALBEF_DISTILL = {
    "distill": True,                    # ALBEF/configs/{VQA,VE,NLVR}.yaml distill: True
    "momentum": 0.995,                  # ALBEF/models/model_ve.py:50, model_vqa.py:46,
                                        # model_nlvr.py:54
}
BLIP_FT = {
    "img_size": 384,                    # BLIP/configs/retrieval_*.yaml:24 image_size
    "crop_scale": (0.5, 1.0),           # BLIP/data/__init__.py:11 min_scale=0.5, :16
    "randaug_n": 2,                     # BLIP/data/__init__.py:18 RandomAugment(2, 5)
    "randaug_m": 5,
    "run.weight_decay": 0.05,           # BLIP/configs/retrieval_coco.yaml:31
    "run.decay": "all",                 # BLIP/train_retrieval.py:261 AdamW(model.parameters())
    "run.schedule": "epoch_cosine",     # BLIP/train_retrieval.py:274; BLIP/utils.py:2-6
    "run.min_lr": 0.0,                  # BLIP/configs/retrieval_coco.yaml:32
    "max_words": 30,                    # BLIP/data/coco_karpathy_dataset.py:12,86 max_words=30
    "eval_max_words": 30,
    "drop_path": 0.0,                   # BLIP/models/blip_retrieval.py:30 create_vit(.., 0)
    "prune": False,                     # BLIP/models/blip_retrieval.py:30: no prune_state
    "caption_style": "blip",            # BLIP/data/utils.py pre_caption, pre_question
    "swap_left_right": False,           # BLIP/data/__init__.py:17 flips the image alone
}
OFFICIAL_DOWNSTREAM = {
    ("retrieval", "albef_coco"): {
        **ALBEF_FT,
        "run.batch_size": 16,           # ALBEF/configs/Retrieval_coco.yaml:9 batch_size_train
        "eval_batch_size": 64,          # ALBEF/configs/Retrieval_coco.yaml:10
        "eval_k": 256,                  # ALBEF/configs/Retrieval_coco.yaml:17 k_test
        "run.lr": 1e-5,                 # ALBEF/configs/Retrieval_coco.yaml:23
        "run.epochs": 5,                # ALBEF/configs/Retrieval_coco.yaml:24
        "max_len": 30,                  # ALBEF/Retrieval.py:90 max_length=30, truncation
        "retrieval_score": "itm",       # ALBEF/Retrieval.py:121-174 ITM logit[:, 1] only
        "negative_all_rank": False,     # ALBEF/models/model_retrieval.py: local batch
        "select": "test_every_epoch",   # ALBEF/Retrieval.py:320-357: val and checkpoint_best
                                        # commented out, test every epoch (sALBEF: best val)
    },
    ("retrieval", "albef_flickr"): {
        **ALBEF_FT,
        "run.batch_size": 16,           # ALBEF/configs/Retrieval_flickr.yaml:9
        "eval_batch_size": 64,          # ALBEF/configs/Retrieval_flickr.yaml:10
        "eval_k": 128,                  # ALBEF/configs/Retrieval_flickr.yaml:17
        "run.lr": 1e-5,                 # ALBEF/configs/Retrieval_flickr.yaml:23
        "run.epochs": 5,                # ALBEF/configs/Retrieval_flickr.yaml:24
        "max_len": 30,                  # ALBEF/Retrieval.py:90
        "retrieval_score": "itm",       # ALBEF/Retrieval.py:121-174
        "negative_all_rank": False,
        "select": "test_every_epoch",   # ALBEF/Retrieval.py:320-357
    },
    ("vqa", "albef"): {
        **ALBEF_FT, **ALBEF_DISTILL,
        "vqa_answer_seps": 2,           # ALBEF/VQA.py:82-83 answer + '[SEP]', then the tokenizer's
        "run.batch_size": 16,           # ALBEF/configs/VQA.yaml:12
        "eval_batch_size": 16,          # ALBEF/configs/VQA.yaml:13
        "vqa_k": 128,                   # ALBEF/configs/VQA.yaml:14 k_test
        "run.lr": 2e-5,                 # ALBEF/configs/VQA.yaml:24
        "run.epochs": 8,                # ALBEF/configs/VQA.yaml:25
        "run.warmup_steps": 4 * 100,    # ALBEF/configs/VQA.yaml:25 warmup_epochs 4 x 100
        "vqa_head": "decoder",          # ALBEF/models/model_vqa.py:30-33 answer decoder
        "max_len": 25,                  # ALBEF/VQA.py:45 max_length=25, truncation
        "max_words": 30,                # ALBEF/dataset/vqa_dataset.py:9 max_ques_words=30
        "eval_max_words": 50,           # ALBEF/dataset/vqa_dataset.py:23 (test)
        "vg_weight": 0.5,               # ALBEF/dataset/vqa_dataset.py:66
        "select": "last",               # ALBEF/VQA.py:227: one test after the last epoch
    },
    ("ve", "albef"): {
        **ALBEF_FT, **ALBEF_DISTILL,
        "run.batch_size": 16,           # ALBEF/configs/VE.yaml:8
        "eval_batch_size": 32,          # ALBEF/configs/VE.yaml:9
        "run.alpha_ramp_epochs": 0.0,   # ALBEF/configs/VE.yaml:13 warm_up: False
        "run.lr": 2e-5,                 # ALBEF/configs/VE.yaml:17
        "run.epochs": 3,                # ALBEF/configs/VE.yaml:18
        "max_len": 512,                 # ALBEF/VE.py:47,86 no truncation (BERT's 512 positions)
        "max_words": 30,                # ALBEF/dataset/ve_dataset.py:9
        "select": "best",               # ALBEF/VE.py:184-216: val and test every epoch,
                                        # checkpoint_best by val acc
    },
    ("nlvr", "albef"): {
        **ALBEF_FT, **ALBEF_DISTILL,
        "run.batch_size": 8,            # ALBEF/configs/NLVR.yaml:8
        "eval_batch_size": 8,           # ALBEF/NLVR.py:124 batch_size for every loader
        "run.alpha_ramp_epochs": 1.0,   # ALBEF/configs/NLVR.yaml:14 warm_up: True
        "run.lr": 2e-5,                 # ALBEF/configs/NLVR.yaml:17
        "run.epochs": 10,               # ALBEF/configs/NLVR.yaml:18
        "max_len": 512,                 # ALBEF/NLVR.py:47,86 no truncation
        "max_words": 30,                # ALBEF/dataset/nlvr_dataset.py:15
        "select": "best",               # ALBEF/NLVR.py:173-193: the best val acc kept
    },
    ("retrieval", "blip_coco"): {
        **BLIP_FT,
        "run.batch_size": 16,           # BLIP/configs/retrieval_coco.yaml:11
        "eval_batch_size": 32,          # BLIP/configs/retrieval_coco.yaml:12
        "run.lr": 1e-5,                 # BLIP/configs/retrieval_coco.yaml:15 init_lr
        "run.alpha": 0.4,               # BLIP/configs/retrieval_coco.yaml:26
        "run.alpha_ramp_epochs": 1.0,   # BLIP/train_retrieval.py:46-49
        "eval_k": 256,                  # BLIP/configs/retrieval_coco.yaml:27 k_test
        "negative_all_rank": True,      # BLIP/configs/retrieval_coco.yaml:28
        "run.epochs": 3,                # BLIP/configs/retrieval_coco.yaml:33 max_epoch
        "max_len": 35,                  # BLIP/models/blip_retrieval.py:80; train_retrieval.py:87
        "retrieval_score": "itm_itc",   # BLIP/train_retrieval.py:123-155 ITM + ITC
        "select": "test_every_epoch",   # BLIP/train_retrieval.py:278-298: val and
                                        # checkpoint_best commented out (sBLIP: best val r_mean)
    },
    ("retrieval", "blip_flickr"): {
        **BLIP_FT,
        "run.batch_size": 16,           # BLIP/configs/retrieval_flickr.yaml:11
        "eval_batch_size": 32,          # BLIP/configs/retrieval_flickr.yaml:12
        "run.lr": 1e-5,                 # BLIP/configs/retrieval_flickr.yaml:15
        "run.alpha": 0.4,               # BLIP/configs/retrieval_flickr.yaml:26
        "run.alpha_ramp_epochs": 1.0,   # BLIP/train_retrieval.py:46-49
        "eval_k": 128,                  # BLIP/configs/retrieval_flickr.yaml:27
        "negative_all_rank": False,     # BLIP/configs/retrieval_flickr.yaml:28
        "run.epochs": 5,                # BLIP/configs/retrieval_flickr.yaml:33
        "max_len": 35,                  # BLIP/models/blip_retrieval.py:80
        "max_words": 30,                # BLIP/data/flickr30k_dataset.py:12,53
        "retrieval_score": "itm_itc",
        "select": "test_every_epoch",   # BLIP/train_retrieval.py:278-298
    },
    ("caption", "blip"): {
        **BLIP_FT,
        "run.batch_size": 16,           # BLIP/configs/caption_coco.yaml:12
        "eval_batch_size": 32,          # BLIP/train_caption.py:106 batch_size * 2
        "run.lr": 1e-5,                 # BLIP/configs/caption_coco.yaml:13
        "img_size": 384,                # BLIP/configs/caption_coco.yaml:21
        "max_length": 20,               # BLIP/configs/caption_coco.yaml:24
        "min_length": 5,                # BLIP/configs/caption_coco.yaml:25
        "beam": 3,                      # BLIP/configs/caption_coco.yaml:26 num_beams
        "prompt": "a picture of ",      # BLIP/configs/caption_coco.yaml:27
        "run.epochs": 6,                # BLIP/configs/caption_coco.yaml:32
        "max_len": 40,                  # BLIP/models/blip.py:110 max_length=40
        "repetition_penalty": 1.0,      # BLIP/models/blip.py:128 default
        "select": "test_every_epoch",   # BLIP/train_caption.py:139-167: val and checkpoint_best
                                        # commented out (sBLIP: best val CIDEr + BLEU-4)
    },
    ("vqa", "blip"): {
        **BLIP_FT,
        "run.batch_size": 16,           # sBLIP/configs/vqa.yaml:11
        "eval_batch_size": 32,          # sBLIP/configs/vqa.yaml:12
        "run.lr": 2e-5,                 # sBLIP/configs/vqa.yaml:15 init_lr
        "img_size": 480,                # sBLIP/configs/vqa.yaml:17
        "vqa_k": 128,                   # sBLIP/configs/vqa.yaml:19 k_test (inference 'rank')
        "run.weight_decay": 0.05,       # sBLIP/configs/vqa.yaml:23
        "run.min_lr": 0.0,              # sBLIP/configs/vqa.yaml:24
        "run.epochs": 10,               # sBLIP/configs/vqa.yaml:25
        "run.decay": "all",             # sBLIP/train_vqa.py:136 AdamW(model.parameters())
        "run.schedule": "epoch_cosine",  # sBLIP/train_vqa.py:148
        "crop_scale": (0.5, 1.0),       # sBLIP/data/__init__.py:14 min_scale=0.5, :19
        "randaug_n": 2,                 # sBLIP/data/__init__.py:21 RandomAugment(2, 5)
        "randaug_m": 5,
        "drop_path": 0.1,               # sBLIP/models/blip_vqa.py:26 drop_path_rate=0.1
        "max_len": 35,                  # sBLIP/models/blip_vqa.py:42 max_length=35
        "max_words": 50,                # sBLIP/data/utils.py:31 max_ques_words=50 (train and
        "eval_max_words": 50,           # test: sBLIP/data/vqa_dataset.py:53,60)
        "vg_weight": 0.2,               # sBLIP/data/vqa_dataset.py:75
        "vqa_head": "decoder",          # sBLIP/models/blip_vqa.py:31-34
        "distill": False,               # sBLIP/models/blip_vqa.py: no momentum model
        "select": "last",               # sBLIP/train_vqa.py:172: one test after the last epoch
    },
}


def resolved_downstream(task, preset, *flags):
    cfg, _ = parse_config(DownstreamConfig(), ["--task", task, "--preset", preset, *flags],
                          TASK_PRESETS, key=("task", "preset"))
    return cfg


def test_every_real_data_preset_is_checked():
    assert set(OFFICIAL_DOWNSTREAM) == {k for k in TASK_PRESETS if k[1] != "world"}


@pytest.mark.parametrize("task, preset", list(OFFICIAL_DOWNSTREAM))
def test_downstream_preset_equals_the_official_configuration(task, preset):
    cfg = resolved_downstream(task, preset)
    wrong = {k: (get(cfg, k), v) for k, v in OFFICIAL_DOWNSTREAM[(task, preset)].items()
             if get(cfg, k) != v}
    assert not wrong, f"(ours, official): {wrong}"


def test_world_presets_test_the_last_epoch():
    """The embedded world's runs keep their one test after the last epoch (--select last) unless
    asked; --select best there validates on the world's own val split."""
    for task, preset in (k for k in TASK_PRESETS if k[1] == "world"):
        assert resolved_downstream(task, preset).select == "last"
        if task != "vqa":
            assert resolved_downstream(task, preset, "--select", "best").world_val > 0


def test_vqa_presets_reach_the_model_and_the_data(tmp_path):
    """BLIP's VQA: drop path 0.1 in the ViT that fine-tunes, a Visual Genome answer weighs 0.2,
    questions keep 50 words; ALBEF's: 0.5, 30 words in training and 50 in testing. Words are cut
    by the datasets, tokens (max_len) by the model's config."""
    Image.new("RGB", (8, 8)).save(tmp_path / "0.jpg")
    question = " ".join(f"w{i}" for i in range(60)) + "?"
    (tmp_path / "train.json").write_text(json.dumps([
        {"question_id": 0, "question": question, "answer": ["red"] * 10, "image": "0.jpg",
         "dataset": "vqa"},
        {"question_id": 1, "question": question, "answer": "blue", "image": "0.jpg",
         "dataset": "vg"}]))
    (tmp_path / "test.json").write_text(json.dumps([
        {"question_id": 2, "question": question, "image": "0.jpg", "dataset": "vqa"}]))
    tok = Tokenizer.build(["red blue"])
    files = ["--train_file", str(tmp_path / "train.json"), "--test_file",
             str(tmp_path / "test.json"), "--image_root", str(tmp_path), "--img_size", "32"]
    for preset, vg, train_words, test_words, drop_path in [("blip", 0.2, 50, 50, 0.1),
                                                           ("albef", 0.5, 30, 50, 0.0)]:
        cfg = resolved_downstream("vqa", preset, *files)
        blip = preset == "blip"
        mc = tasks.downstream_model_config(ModelConfig(
            vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id, mask_id=tok.mask_id,
            img_size=16, patch_size=16, vision_width=32, text_width=32, vision_heads=2,
            text_heads=2, text_mlp=64, vision_depth=4, text_layers=2 if blip else 1,
            fusion_layers=0 if blip else 1, losses=("itc", "itm", "lm" if blip else "mlm"),
            embed_dim=16, queue_size=8, prune=dict(method="none")), cfg)
        assert (mc.img_size, mc.max_len) == (32, cfg.max_len)
        model = tasks.build_model(cfg, mc, tok, ["red", "blue"], world_aids.WorldAids())
        rates = [block.drop_path for block in model.visual_encoder.blocks]
        assert rates[0] == 0 and rates[-1] == pytest.approx(drop_path)
        assert model.distill == (not blip)
        train_set, test_sets, _ = tasks.build_sets(cfg, mc)
        assert train_set[0]["weights"] == [1.0] and train_set[1]["weights"] == [vg]  # VQA; VG
        assert len(train_set.items[0]["question"].split()) == train_words
        assert train_set.clean is (data.pre_question_blip if blip else data.pre_question)
        (test_set,) = test_sets.values()
        assert len(test_set.items[0]["question"].split()) == test_words


@pytest.mark.parametrize("task,preset,clean", [("retrieval", "albef_coco", "pre_caption"),
                                               ("retrieval", "blip_coco", "pre_caption_blip"),
                                               ("caption", "blip", "pre_caption_blip")])
def test_caption_cleaning_follows_the_backbone(tmp_path, task, preset, clean):
    """ALBEF's presets clean captions as ALBEF, BLIP's as BLIP (commas, apostrophes stay)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "0.jpg")
    cfg = resolved_downstream(task, preset)
    entries = [{"image": "0.jpg", "caption": "A dog's ball, red.", "image_id": 0}]
    for train in (True, False):
        dataset = tasks.train_or_test_dataset(cfg, entries, str(tmp_path), None, train, None, 30)
        assert dataset.clean is getattr(data, clean)
    assert dataset.items[0]["captions"] == [getattr(data, clean)("A dog's ball, red.")]
