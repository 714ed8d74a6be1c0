"""
Fine-tune a pre-trained ELIP model on a downstream task, then evaluate it on the test split(s).

    python train_downstream.py --task retrieval          # the embedded world's version, CPU, minutes
    python train_downstream.py --task vqa --prune true   # keep the token pruning downstream (a study)
    python train_downstream.py --task vqa --pretrained none   # the same from random weights
    torchrun --nproc_per_node 4 train_downstream.py --task retrieval --preset albef_coco \\
        --pretrained out/pretrain/checkpoint.pt --train_file coco_train.json \\
        --test_file coco_val.json,coco_test.json --image_root /data/coco
    python train_downstream.py --task retrieval --preset albef_coco --evaluate true \\
        --pretrained out/retrieval_albef_coco/checkpoint.pt --test_file coco_test.json ...

Tasks, each on ELIP's pre-trained encoders (heads.py, vqa.py, tasks.py):
  retrieval  ITC + ITM with every caption of an image a positive; ITC ranks all pairs and the
             top eval_k are re-scored by the ITM match logit (ALBEF) or by it plus the ITC
             cosine (BLIP, --retrieval_score itm_itc); TR/IR R@1/5/10, and the ITC-only figures
  vqa        ALBEF's / BLIP's answer decoder (vqa.py), the answer list ranked by its likelihood
             (top vqa_k by the first token, then the whole answer); or --vqa_head classifier:
             the answer list classified on the fusion [CLS], BCE on VQA soft scores
  nlvr       the sentence fused with each image, the two [CLS] concatenated: true / false
  ve         SNLI-VE: fusion [CLS] -> contradiction / neutral / entailment
  caption    the decoder with the prompt "a picture of "; greedy and beam search within BLIP's
             length limits (prompt included), BLEU-4 and CIDEr-D as the COCO evaluation
nlvr, ve and vqa (ALBEF's decoder) distil from a momentum model as ALBEF (--distill; --run.alpha).
With no --train_file/--test_file the data is the embedded world's version of the task; with them,
the ALBEF/BLIP JSON files (and --answer_list for VQA); each test file is scored on its own.
Every field of DownstreamConfig (and of the nested RunConfig) is a flag, as in train_pretrain.py;
--task with --preset sets that task's defaults (TASK_PRESETS): "world" (the default) for the
embedded world, or the official fine-tuning of ALBEF (albef; retrieval: albef_coco,
albef_flickr) or BLIP (blip; retrieval: blip_coco, blip_flickr) with resolution, batch, epochs,
learning rate, schedule and text lengths as their configurations (BLIP's VQA, which ELIP did not
release, as BLIP's own repository has it). The pre-trained position embeddings are interpolated
to --img_size on load. The training loop is train() below; trainer.py holds its helpers.

--evaluate true skips training: it scores a fine-tuned checkpoint of this script (or a
pre-trained one: the heads stay untrained) given as --pretrained, on every --test_file.

Model selection over the epochs (--select; each preset as its official script):
  last              test once after the last epoch (ALBEF's and BLIP's VQA; the world's presets)
  best              after every epoch, score the validation set (--val_file; on the embedded
                    world its val split); keep best.pt beside checkpoint.pt whenever the selection
                    metric (SELECT_METRIC) improves; test the best epoch's weights (ALBEF's SNLI-VE
                    and NLVR2; also salesforce ALBEF's and BLIP's own retrieval and captioning)
  test_every_epoch  test after every epoch, report the last (ELIP's retrieval and captioning: its
                    copies of those scripts comment the validation out)

Writes to out_dir (out/<task>): checkpoint.pt (the fine-tuned model; --resume auto continues it),
best.pt (--select best: the best epoch's weights; --evaluate true scores it), log.jsonl (with a
record of every epoch's evaluation), metrics.json (per test file: the metrics beside a chance or
majority baseline and the evaluation time; the training time, the weight-loading report and the
epochs' scores), predictions.json (per test file; none for retrieval) and, per test file <name>
(its file name without extension; "world"), what the official evaluation reads:
vqa_result_<name>.json for the VQA server, caption_result_<name>.json for the COCO caption
evaluation, nlvr_result_<name>.csv for NLVR2's scorer (tasks.official_results).
"""
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm import tqdm

import data
import eval as evaluation
import trainer
import world
import world_aids
from config import check_paths, config_from_dict, parse_config
from heads import load_pretrained
from model import ModelConfig
from pruning import PruneConfig
from tasks import (build_model, build_sets, evaluate_task, grow_vocabulary, load_source,
                   official_results, task_collates, task_dataset)
from tokenizer import Tokenizer
from trainer import (RunConfig, alpha_at, autocast_and_scaler, build_optimizer, gather_objects,
                     load_checkpoint, log_json, lr_at)


# what --select best maximises on the validation set (the sum of these scores, averaged over the
# validation files), as the official scripts select: retrieval R mean, the mean of the six
# recalls (ALBEF's Retrieval.py, BLIP's train_retrieval.py: val r_mean); SNLI-VE and NLVR2
# accuracy (ALBEF's VE.py, NLVR.py); captioning CIDEr + BLEU-4 of the beam search (BLIP's
# train_caption.py). VQA has none: ALBEF and BLIP train on its val split.
SELECT_METRIC = {"retrieval": ("r_mean",), "ve": ("accuracy",), "nlvr": ("accuracy",),
                 "caption": ("beam_cider_d", "beam_bleu4")}


@dataclass
class DownstreamConfig:
    task: str = "retrieval"          # retrieval | vqa | nlvr | ve | caption
    preset: str = "world"            # with --task, selects TASK_PRESETS: world | albef | blip
                                     # (retrieval: albef_coco | albef_flickr | blip_coco | blip_flickr)
    pretrained: str = "out/pretrain/checkpoint.pt"   # a checkpoint of train_pretrain.py (or, with
                                     # --evaluate true, a fine-tuned one of this script); none:
                                     # the tiny preset's architecture from random weights
    scratch_like: str = ""           # with --pretrained none: a train_pretrain.py checkpoint whose
                                     # architecture and vocabulary (not weights) to start from
    vocab: str = ""                  # with a released ALBEF, BLIP or ELIP file as --pretrained:
                                     # the BERT vocab.txt it was trained with (bert-base-uncased)
    head_dim: int = 64               # with a released file: the width of an attention head,
                                     # which no weight shows (64 in every released model)
    evaluate: bool = False           # no training: evaluate --pretrained on every test file
    # data: ALBEF/BLIP JSON files (several: comma-separated; test files are scored one by one);
    # none given = the embedded world
    train_file: tuple[str, ...] = ()    # the task's training files
    test_file: tuple[str, ...] = ()     # its test files, each scored on its own
    val_file: tuple[str, ...] = ()      # --select best: the validation files (the selection
                                        # metric is their mean); none = the world's val split
    image_root: str = ""             # image paths in the JSON files are relative to this
    answer_list: str = ""            # VQA: a JSON list of answers; empty = the world's answers,
                                     # or every answer of the training files
    world_seed: int = 0              # the embedded world's seed
    world_train: int = 1000          # scenes (image pairs for nlvr) in the world's train split
    world_test: int = 200            # and in its test split
    world_val: int = 200             # and in its val split (--select best), whose compositions
                                     # are in neither of the others
    img_size: int = 0                # fine-tuning resolution (ALBEF, BLIP: 384); 0 = pre-training's
    max_len: int = 0                 # text tokens, a longer text is cut (ALBEF: retrieval 30, VQA
                                     # 25, SNLI-VE and NLVR2 512, i.e. uncut; BLIP: retrieval and
                                     # VQA 35, captioning 40); 0 = pre-training's
    max_words: int = 30              # a training text keeps its first max_words words, before
                                     # the tokenizer (ALBEF, BLIP: 30; BLIP's VQA: 50)
    eval_max_words: int = 30         # and a test text (ALBEF's and BLIP's VQA: 50)
    caption_style: str = "albef"     # text cleaning of captions and questions: albef
                                     # (data.pre_caption, pre_question) | blip (pre_caption_blip,
                                     # pre_question_blip: commas, apostrophes, '?' and '-' stay)
    drop_path: float = 0.0           # the ViT's stochastic depth in fine-tuning, rising to this
                                     # in the last block (BLIP's VQA: 0.1; ALBEF, BLIP: 0)
    crop_scale: tuple[float, ...] = (0.8, 1.0)   # random-crop area (ALBEF: 0.5,1.0)
    randaug_n: int = 0               # RandAugment operations per training image (ALBEF, BLIP: 2)
    randaug_m: int = 7               # and their strength, of 10 (ALBEF 7, BLIP 5)
    swap_left_right: bool = True     # a mirrored training image's texts swap left and right, so
                                     # they stay true (ALBEF and BLIP mirror the image alone)
    prune: bool = False              # keep the pre-training pruning schedule, in evaluation too
    negative_all_rank: bool = False  # retrieval: ITM negatives from every rank (BLIP on COCO)
    vqa_head: str = "decoder"        # VQA: decoder (ALBEF/BLIP's answer decoder) | classifier
    vqa_answer_seps: int = 1         # VQA decoder: [SEP] tokens ending each answer (ALBEF: 2, the
                                     # "[SEP]" it appends and the tokenizer's own; BLIP: 1)
    vg_weight: float = 0.5           # VQA: the weight of a Visual Genome answer (BLIP: 0.2)
    distill: bool = True             # ALBEF's momentum distillation in nlvr, ve and vqa with an
                                     # ALBEF checkpoint's decoder (BLIP's VQA has none)
    momentum: float = 0.995          # the momentum model's EMA rate, once per optimizer step
    # evaluation
    select: str = "last"             # which epoch is tested: last | best (on the validation set,
                                     # kept as best.pt) | test_every_epoch (test after every
                                     # epoch, report the last)
    retrieval_score: str = "itm"     # itm: the ITM match logit (ALBEF); itm_itc: plus ITC (BLIP)
    eval_k: int = 16                 # retrieval: ITC candidates re-scored (ALBEF, BLIP: 256 COCO,
                                     # 128 Flickr30K)
    vqa_k: int = 128                 # VQA decoder: answers re-scored by their whole sequence
    eval_batch_size: int = 64        # test samples per process in a batch
    sweep: str = ""                  # with --task retrieval --evaluate true: retrieval under
                                     # each pruning budget of a list such as
                                     # "none;elip:0.9,0.65,0.4;evit:0.7,0.5,0.3;tome:4" (keep
                                     # ratios at the model's prune_layers, or ToMe's r): recall
                                     # against token-layers kept and time, as a table in the log
                                     # and in sweep.json (eval.sweep_retrieval)
    beam: int = 3                    # captioning: beam size
    max_length: int = 20             # captioning: tokens in all, [CLS] and prompt included (BLIP)
    min_length: int = 5              # captioning: no [SEP] before this many tokens in all (BLIP)
    length_penalty: float = 1.0      # captioning: the best beam by score / length ** this
    repetition_penalty: float = 1.0  # captioning: Hugging Face's (BLIP's beam search: 1.0)
    prompt: str = "a picture of "    # captioning (BLIP)
    run: RunConfig = field(default_factory=lambda: RunConfig(
        epochs=2, lr=1e-4, min_lr=1e-6, warmup_steps=20, out_dir="out/retrieval"))

    def __post_init__(self):
        if self.retrieval_score not in ("itm", "itm_itc"):
            raise ValueError(f"retrieval_score {self.retrieval_score!r} is not itm or itm_itc")
        if self.vqa_head not in ("decoder", "classifier"):
            raise ValueError(f"vqa_head {self.vqa_head!r} is not decoder or classifier")
        if self.caption_style not in ("albef", "blip"):
            raise ValueError(f"caption_style {self.caption_style!r} is not one of albef, blip")
        if self.vqa_answer_seps < 1:
            raise ValueError(f"vqa_answer_seps {self.vqa_answer_seps} must be >= 1")
        if self.select not in ("last", "best", "test_every_epoch"):
            raise ValueError(f"select {self.select!r} is not one of last, best, test_every_epoch")
        if self.select == "best" and self.task not in SELECT_METRIC:
            raise ValueError(f"select best: {self.task} has no selection metric (ALBEF and BLIP "
                             f"train VQA on its val split and test after the last epoch)")
        if self.val_file and self.select != "best":
            raise ValueError("val_file is read with select best only")
        if self.select == "best" and not (self.val_file or self.evaluate) and (
                self.train_file or self.world_val < 1):
            raise ValueError("select best needs validation data: val_file (on the embedded "
                             "world, world_val >= 1 scenes of its val split)")
        if self.sweep and not (self.task == "retrieval" and self.evaluate):
            raise ValueError("--sweep needs --task retrieval --evaluate true")
        if self.sweep:
            evaluation.sweep_budgets(self.sweep, PruneConfig())      # refuse a bad item now
        if min(self.max_words, self.eval_max_words) < 1:
            raise ValueError(f"max_words {self.max_words} and eval_max_words "
                             f"{self.eval_max_words} must be >= 1")


# The official fine-tuning of each backbone (ELIP's ALBEF/configs/*.yaml and BLIP/configs/*.yaml;
# ALBEF's VQA.yaml and VE.yaml as salesforce/ALBEF has them): 384 px, random crops of 50-100% of
# the area, RandAugment, a flip that mirrors the image alone (the world's presets also swap left
# and right in its texts, which name sides: the mirrored scene would make them false); ALBEF:
# AdamW wd 0.02 (its optim_factory rule), timm's cosine stepped per epoch after warmup_epochs x
# 100 steps from warmup_lr; BLIP: AdamW wd 0.05 on every parameter, cosine per epoch from lr to
# 0, its own text cleaning (BLIP/data/utils.py). alpha ramps up over epoch 0 (SNLI-VE: warm_up
# False). The tested epoch (--select) as ELIP's scripts choose it:
# ALBEF's SNLI-VE and NLVR2 validate every epoch and keep the best (VE.py:184-216,
# NLVR.py:173-193); ELIP's retrieval and captioning (ALBEF/Retrieval.py:320-357,
# BLIP/train_retrieval.py:278-298, train_caption.py:139-167) test every epoch with the
# validation commented out, where ALBEF's and BLIP's own keep the best on validation (--select
# best --val_file); VQA tests once after the last epoch (ALBEF/VQA.py:227, BLIP's train_vqa.py).
ALBEF = dict(img_size=384, crop_scale=(0.5, 1.0), randaug_n=2, randaug_m=7, weight_decay=0.02,
             decay="albef", schedule="albef", warmup_lr=1e-5, warmup_steps=100, min_lr=1e-6,
             alpha=0.4, alpha_ramp_epochs=1.0, num_workers=4, swap_left_right=False)
BLIP = dict(img_size=384, crop_scale=(0.5, 1.0), randaug_n=2, randaug_m=5, weight_decay=0.05,
            decay="all", schedule="epoch_cosine", lr=1e-5, min_lr=0.0, alpha=0.4,
            alpha_ramp_epochs=1.0, num_workers=4, caption_style="blip", swap_left_right=False)
TASK_PRESETS = {
    # the embedded world: each task fine-tunes and evaluates in minutes on a 2-core CPU from the
    # tiny pre-training checkpoint (NLVR2, the longest, 14 on one thread). Explicit flags
    # override them.
    ("retrieval", "world"): dict(out_dir="out/retrieval", world_train=1000, epochs=1, lr=3e-4),
    ("vqa", "world"): dict(out_dir="out/vqa", world_train=1200, epochs=4, lr=5e-4),
    # NLVR2 and SNLI-VE: a lower rate keeps what pre-training learnt (NLVR2 at 3e-4 or 1e-4
    # stayed at chance); NLVR2 takes ALBEF's 10 epochs (after 4 it was still near chance)
    ("nlvr", "world"): dict(out_dir="out/nlvr", world_train=1200, epochs=10, lr=5e-5,
                            distill=False),
    ("ve", "world"): dict(out_dir="out/ve", world_train=1600, epochs=2, lr=5e-5,
                          alpha_ramp_epochs=0.0),
    ("caption", "world"): dict(out_dir="out/caption", world_train=900, epochs=2, lr=3e-4),
    # per GPU: batch_size (train), eval_batch_size (test)
    # ALBEF's retrieval evaluation cuts a caption at 30 tokens; its training tokenizer call names
    # max_length 30 without truncation, which cuts nothing: here both cut at 30
    ("retrieval", "albef_coco"): {**ALBEF, "out_dir": "out/retrieval_albef_coco", "lr": 1e-5,
                                  "batch_size": 16, "eval_batch_size": 64, "epochs": 5,
                                  "eval_k": 256, "max_len": 30, "select": "test_every_epoch"},
    ("retrieval", "albef_flickr"): {**ALBEF, "out_dir": "out/retrieval_albef_flickr", "lr": 1e-5,
                                    "batch_size": 16, "eval_batch_size": 64, "epochs": 5,
                                    "eval_k": 128, "max_len": 30,
                                    "select": "test_every_epoch"},
    # ALBEF cuts a training question at 25 tokens and keeps a test question (<= 50 words) whole:
    # here both are cut at 25
    ("vqa", "albef"): {**ALBEF, "out_dir": "out/vqa_albef", "lr": 2e-5, "warmup_steps": 400,
                       "batch_size": 16, "eval_batch_size": 16, "epochs": 8, "max_len": 25,
                       "eval_max_words": 50, "vqa_answer_seps": 2},
    # ALBEF's SNLI-VE and NLVR2 tokenize without truncation: 512 (BERT's positions) cuts nothing
    ("ve", "albef"): {**ALBEF, "out_dir": "out/ve_albef", "lr": 2e-5, "batch_size": 16,
                      "eval_batch_size": 32, "epochs": 3, "alpha_ramp_epochs": 0.0,
                      "max_len": 512, "select": "best"},
    ("nlvr", "albef"): {**ALBEF, "out_dir": "out/nlvr_albef", "lr": 2e-5, "batch_size": 8,
                        "eval_batch_size": 8, "epochs": 10, "max_len": 512,
                        "select": "best"},
    ("retrieval", "blip_coco"): {**BLIP, "out_dir": "out/retrieval_blip_coco", "batch_size": 16,
                                 "eval_batch_size": 32, "epochs": 3, "eval_k": 256,
                                 "negative_all_rank": True, "retrieval_score": "itm_itc",
                                 "max_len": 35, "select": "test_every_epoch"},
    ("retrieval", "blip_flickr"): {**BLIP, "out_dir": "out/retrieval_blip_flickr",
                                   "batch_size": 16, "eval_batch_size": 32, "epochs": 5,
                                   "eval_k": 128, "retrieval_score": "itm_itc", "max_len": 35,
                                   "select": "test_every_epoch"},
    ("caption", "blip"): {**BLIP, "out_dir": "out/caption_blip", "batch_size": 16,
                          "eval_batch_size": 32, "epochs": 6, "max_len": 40, "beam": 3,
                          "max_length": 20, "min_length": 5, "repetition_penalty": 1.0,
                          "select": "test_every_epoch"},
    # ELIP released no BLIP VQA: these are BLIP's own (its configs/vqa.yaml, train_vqa.py,
    # models/blip_vqa.py, data/vqa_dataset.py): 480 px, drop path 0.1 in the ViT, a Visual
    # Genome answer weighs 0.2, questions of <= 50 words cut at 35 tokens, no distillation
    ("vqa", "blip"): {**BLIP, "out_dir": "out/vqa_blip", "img_size": 480, "lr": 2e-5,
                      "batch_size": 16, "eval_batch_size": 32, "epochs": 10, "drop_path": 0.1,
                      "vg_weight": 0.2, "max_len": 35, "max_words": 50, "eval_max_words": 50,
                      "vqa_k": 128, "distill": False},
}
# evaluation settings may change when a fine-tuning run resumes
SAFE_ON_RESUME = ("test_file", "eval_k", "eval_batch_size", "eval_max_words", "beam",
                  "max_length", "min_length", "length_penalty", "repetition_penalty",
                  "retrieval_score", "vqa_k")


def train(cfg, model, train_set, collate, device, rank, world, log, ckpt=None, extra=None,
          after_epoch=None):
    """The fine-tuning loop, one optimizer step at a time: its micro-batches, each a forward (the
    task's loss, distilled from the momentum model where ALBEF distils) and a backward, then
    AdamW's step, the momentum model's EMA (and, for retrieval, the queue write), the log line,
    at the end of an epoch after_epoch(epoch, step, last) (the model selection: it returns
    whether it evaluated), the checkpoint. Returns the training time in seconds."""
    run, master = cfg.run, rank == 0
    plan = trainer.StepPlan(train_set, run, rank, world)
    optimizer = build_optimizer(model, run.lr, run.weight_decay, run.decay)
    autocast, scaler = autocast_and_scaler(run.amp, device)
    step, skipped = trainer.start_run(ckpt, optimizer, scaler, world, run.out_dir, master, log)
    watch = trainer.Watch(run, world, master, len(train_set), skipped, log)
    ddp_model = trainer.wrap_ddp(model, device, world)
    meter = trainer.Meter(run, master, step, plan.stop_step, cfg.task)
    log(f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
        f"parameters; {len(train_set)} samples; {plan.stop_step} steps of "
        f"{plan.per_step * world} on {world} x {device.type}")
    model.train()
    while step < plan.stop_step:
        epoch, batches = plan.epoch_batches(step, collate, watch.limit + 1, device)
        if ckpt is not None:                  # each rank continues its own random stream
            trainer.set_rng_state(ckpt["rng"][rank])
            ckpt = None
        for _ in range(min(plan.steps_per_epoch - step % plan.steps_per_epoch,
                           plan.stop_step - step)):
            lr = lr_at(step, plan.steps_per_epoch, run)
            for g in optimizer.param_groups:
                g["lr"] = lr
            queued = []
            for micro in range(run.grad_accum):
                batch, stop, due = watch.next(batches, step)
                if stop and micro == 0:       # every rank at the same step boundary
                    trainer.write_checkpoint(cfg, model, optimizer, scaler, step, watch, extra)
                    raise trainer.Interrupted(stop, step)
                batch = data.to_device(batch, device)
                last = micro == run.grad_accum - 1    # DDP averages the gradients only then
                with (contextlib.nullcontext() if last or world == 1 else ddp_model.no_sync()), \
                        autocast():
                    out = ddp_model(batch, alpha=alpha_at(step, plan.steps_per_epoch, run))
                queued += [out.pop("queue")] if "queue" in out else []
                scaler.scale(out["loss"] / run.grad_accum).backward()
                meter.add(out, run.grad_accum)
            if run.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            model.momentum_step(queued)       # the teacher's EMA (and retrieval's queue write)
            step += 1
            meter.step(step, epoch, lr, plan.per_step * world, step == plan.stop_step)
            # the epoch is complete: its evaluation comes before the checkpoint, which keeps it
            scored = step % plan.steps_per_epoch == 0 and after_epoch is not None and \
                after_epoch(epoch, step, step == plan.stop_step)
            if (run.ckpt_every and step % run.ckpt_every == 0) or due or scored or \
                    step == plan.stop_step:
                trainer.write_checkpoint(cfg, model, optimizer, scaler, step, watch, extra)
    watch.close()
    trainer.check_ranks_agree(model, world, run.out_dir, log)
    return meter.close()


# ---- model selection over the epochs (--select) -------------------------------------------
def validation_sets(cfg, mc) -> dict:
    """{name: validation set} for --select best: each --val_file, or the world's val split of
    world_val scenes (world.py: a scene composition belongs to one split only, so these are
    neither trained on nor tested). Read as the test sets are."""
    if cfg.select != "best":
        return {}
    transform = data.create_transform(mc.img_size, False)
    splits = {f: [f] for f in cfg.val_file} or {
        "world_val": world.world_entries(cfg.task, "val", cfg.world_val, cfg.world_seed)}
    return {name: task_dataset(cfg, entries, cfg.image_root or None, transform, False, None,
                               cfg.eval_max_words) for name, entries in splits.items()}


def evaluate_epoch(cfg, sets: dict, evaluate, model, extra: dict, master: bool, log,
                   epoch: int, step: int, last: bool) -> bool:
    """The end of an epoch: --select best scores `sets` (the validation sets) and, when the
    selection metric beats the best so far, rank 0 writes best.pt (the weights, the epoch, the
    validation scores, and what --evaluate needs to rebuild the model); test_every_epoch scores
    `sets` (the test sets) but not after the last epoch, which the final test scores. Every rank
    evaluates (eval.py shares the work and runs the model in eval mode, then training mode
    again); the random streams are restored afterwards, so the training goes on as without it.
    extra["select"] (in the checkpoint, so a resumed run keeps it) holds the best so far and
    every epoch's scores. Returns whether it evaluated."""
    state = extra["select"]
    if cfg.select == "last" or (cfg.select == "test_every_epoch" and last):
        return False
    rng = trainer.rng_state()
    scores = {name: evaluate(dataset)[0] for name, dataset in sets.items()}
    trainer.set_rng_state(rng)
    split = "val" if cfg.select == "best" else "test"
    rec = {"step": step, "epoch": epoch, split: scores}
    if cfg.select == "best":
        rec["selection_metric"] = value = sum(
            sum(m[k] for k in SELECT_METRIC[cfg.task]) for m in scores.values()) / len(scores)
        if state["best_epoch"] is None or value > state["best"]:   # ties keep the earlier
            state.update(best=value, best_epoch=epoch)
            if master:
                trainer.save_checkpoint(
                    os.path.join(cfg.run.out_dir, "best.pt"), model=model.state_dict(),
                    config=dataclasses.asdict(cfg), epoch=epoch, step=step, val=scores,
                    **{k: v for k, v in extra.items() if k != "select"})
    state["epochs"].append(rec)
    shown = {name: {k: round(v, 4) for k, v in m.items() if k != "itc"}
             for name, m in scores.items()}
    log(f"epoch {epoch} {split}: {json.dumps(shown)}" + (
        f"; {' + '.join(SELECT_METRIC[cfg.task])} {value:.4f}, the best epoch "
        f"{state['best_epoch']} ({state['best']:.4f})" if cfg.select == "best" else ""))
    if master:
        log_json(cfg.run.out_dir, rec)
    return True


def load_selected(cfg, model, state: dict, log) -> dict:
    """Before the final test: --select best loads the best epoch's weights (best.pt) on every
    rank (rank 0 wrote it before the checkpoint's collective). Returns the selection's record
    for metrics.json."""
    if cfg.select == "best" and state["best_epoch"] is None:
        log("no epoch was completed, so none was validated: the last weights are tested")
    elif cfg.select == "best":
        model.load_state_dict(load_checkpoint(os.path.join(cfg.run.out_dir, "best.pt"))["model"])
        log(f"testing epoch {state['best_epoch']}, the best on validation (best.pt)")
    return {"select": cfg.select, **state}


def load_weights(cfg, model, ckpt, state, fine_tuned: bool, log) -> dict:
    """The model's weights, strictly by name: a resumed run's, or --pretrained's (the task's heads
    start fresh from a pre-training checkpoint; a fine-tuned one must hold every weight), or
    none. Returns the loading report."""
    if ckpt is not None:
        model.load_state_dict(ckpt.pop("model"))      # the host copy goes as soon as it is loaded
        return ckpt["weights"]
    if state is None:
        log("no pre-trained weights (--pretrained none): every weight starts random")
        return dict(loaded=[], initialised=list(model.state_dict()), unused=[], interpolated=[])
    try:
        weights = load_pretrained(model, state)
    except ValueError as e:
        raise SystemExit(f"error: {cfg.pretrained}: {e}") from None
    if fine_tuned and (weights["initialised"] or weights["unused"]):
        raise SystemExit(f"error: {cfg.pretrained} does not match the model it should hold: "
                         f"lacks {weights['initialised'][:8]}, has unused "
                         f"{weights['unused'][:8]}")
    log(f"loaded {len(weights['loaded'])} tensors from {cfg.pretrained}; newly initialised: "
        f"{weights['initialised']}; position embeddings interpolated to {model.cfg.img_size} px: "
        f"{weights['interpolated']}; rows added for new words: {weights['grown']}; unused "
        f"tensors: {len(weights['unused'])} "
        f"({', '.join(sorted({k.split('.')[0] for k in weights['unused']}))})")
    return weights


def write_official(out_dir, name, result, log) -> str:
    """Writes tasks.official_results' file for test set `name` (named by its file's base name)
    and returns the file's name; says how many entries lacked the id the file needs."""
    file_name, text, id_name, missing = result
    file_name = file_name.format(os.path.splitext(os.path.basename(name))[0])
    with open(os.path.join(out_dir, file_name), "w") as f:
        f.write(text)
    if missing:
        log(f"warning: {missing} entries of {name} have no {id_name}: {file_name} gives their "
            f"index in the file instead, which the official evaluation will not match")
    return file_name


def test_and_report(cfg, model, train_set, test_sets, collate, tok, device, world, log, extra):
    """Every rank evaluates its share of each test set (eval.py); rank 0 writes metrics.json
    (and predictions.json, and the official evaluation's files) beside the log. Returns the
    names of the files written."""
    files, predictions, official = {}, {}, {}
    for name, test_set in test_sets.items():
        t0 = time.time()
        scores, baseline, kind, preds = evaluate_task(cfg, model, train_set, test_set,
                                                      collate, tok, device, log)
        # every rank read its share of the images: the ones scored black, from all ranks
        blank = [m for ms in gather_objects(test_set.unreadable, world) for m in ms]
        files[name] = {"metrics": scores, "baseline": baseline, "baseline_kind": kind,
                       "test_samples": len(test_set), "eval_seconds": time.time() - t0,
                       "unreadable_images": blank}
        if blank:
            log(f"warning: {len(blank)} samples of {name} read an image that could not be read "
                f"and was scored as a black one: {'; '.join(blank[:5])}"
                + (" ..." if len(blank) > 5 else ""))
        if preds is not None:
            predictions[name] = preds
            official[name] = official_results(cfg.task, test_set, preds)
        log(f"{cfg.task} {name}: {json.dumps({k: v for k, v in scores.items() if k != 'itc'})}"
            f"; baseline ({kind}): {json.dumps(baseline)}")
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return []
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    for name, f in files.items():
        log_json(cfg.run.out_dir, {"task": cfg.task, "test_file": name,
                                   "metrics": f["metrics"], "baseline": f["baseline"]})
    with open(os.path.join(cfg.run.out_dir, "metrics.json"), "w") as f:
        json.dump({"task": cfg.task, "evaluate_only": cfg.evaluate, "test": files,
                   "train_samples": len(train_set) if train_set else 0,
                   "config": dataclasses.asdict(cfg), **extra}, f, indent=1)
    if not predictions:
        return ["metrics.json"]
    with open(os.path.join(cfg.run.out_dir, "predictions.json"), "w") as f:
        json.dump(predictions, f, indent=1)
    return ["metrics.json", "predictions.json"] + [
        write_official(cfg.run.out_dir, name, result, log)
        for name, result in official.items() if result is not None]


def finetune(cfg, ckpt, rank: int, world_size: int, device: torch.device):
    """Set-up (architecture, vocabulary, data, model), the loop, then the test sets, on this
    rank; with --evaluate, the test sets alone."""
    log = tqdm.write if rank == 0 else (lambda msg: None)
    trainer.setup_process(cfg.run, rank, device)
    # the architecture and vocabulary: a resumed run's from its checkpoint, else --pretrained's
    state, answers, tuned = None, None, None
    if ckpt is not None:
        mc, tok = config_from_dict(ModelConfig, ckpt["model_config"]), Tokenizer(ckpt["vocab"])
        aids = world_aids.aids_of(ckpt)
    else:
        mc, aids, tok, state, answers, tuned = load_source(cfg, log)
        if tuned is not None:     # the heads as the run that wrote the checkpoint built them
            cfg = dataclasses.replace(cfg, vqa_head=tuned.get("vqa_head", "classifier"),
                                      distill=tuned.get("distill", False),
                                      vqa_answer_seps=tuned.get("vqa_answer_seps", 1))
    try:    # every entry is checked when the dataset is built, before any training step
        train_set, test_sets, answers = build_sets(cfg, mc, answers)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    answers = answers if cfg.task == "vqa" else []
    if ckpt is None and not cfg.evaluate:
        tok, added = grow_vocabulary(cfg, tok, train_set, answers)
        mc = dataclasses.replace(mc, vocab_size=tok.vocab_size)
        log(f"vocabulary: {len(added)} words of the training set that the checkpoint's "
            f"vocabulary reads as [UNK] added as new tokens, their embedding rows initialised "
            f"afresh ({tok.vocab_size} tokens)" + (f": {', '.join(added[:12])}"
                                                   f"{' ...' if len(added) > 12 else ''}"
                                                   if added else ""))
    train_collate, test_collate = task_collates(cfg, mc, tok, answers)
    model = build_model(cfg, mc, tok, answers, aids).to(device)
    weights = load_weights(cfg, model, ckpt, state, tuned is not None, log)
    del state
    log(f"task {cfg.task}: {len(train_set) if train_set else 0} training samples, test sets "
        f"{', '.join(f'{n} ({len(t)})' for n, t in test_sets.items())}; prune: {mc.prune}")
    if cfg.task == "vqa" and train_set is not None:
        missed = sum(not set(it["answers"]) & set(answers) for it in train_set.items)
        log(f"answer list: {len(answers)} answers; {missed} training questions have no answer in "
            f"it (neither head can give them; the classifier's targets are all zero)")
    if cfg.task == "caption":
        log(f"prompt tokens: {' '.join(tok.vocab[i] for i in model.prompt_ids[0].tolist())}")
    if cfg.sweep:       # retrieval under each pruning budget, instead of one evaluation
        sweep = {name: evaluation.sweep_retrieval(
            model, test_set, tok, device, evaluation.sweep_budgets(cfg.sweep, mc.prune),
            cfg.eval_k, mc.max_len, cfg.eval_batch_size, cfg.retrieval_score == "itm_itc",
            cfg.run.num_workers, log) for name, test_set in test_sets.items()}
        for name, rows in sweep.items():
            log(f"pruning at inference, {name}:\n{evaluation.sweep_table(rows)}")
        if rank == 0:
            os.makedirs(cfg.run.out_dir, exist_ok=True)
            with open(os.path.join(cfg.run.out_dir, "sweep.json"), "w") as f:
                json.dump({"pretrained": cfg.pretrained, "config": dataclasses.asdict(cfg),
                           "test": sweep}, f, indent=1)
        log(f"wrote sweep.json to {cfg.run.out_dir}")
        return
    train_time, selection = 0.0, {}
    if not cfg.evaluate:
        extra = {"vocab": tok.vocab, "model_config": dataclasses.asdict(mc), "weights": weights,
                 "answer_list": answers, "aids": dataclasses.asdict(aids),
                 "select": (ckpt or {}).get("select", {"best": None, "best_epoch": None,
                                                       "epochs": []})}
        sets = test_sets if cfg.select == "test_every_epoch" else validation_sets(cfg, mc)
        evaluate = partial(evaluate_task, cfg, model, train_set, collate=test_collate, tok=tok,
                           device=device, log=log)        # evaluate(dataset): as the final test
        train_time = train(cfg, model, train_set, train_collate, device, rank, world_size, log,
                           ckpt, extra, partial(evaluate_epoch, cfg, sets, evaluate, model, extra,
                                                rank == 0, log))
        selection = load_selected(cfg, model, extra["select"], log)
    written = test_and_report(cfg, model, train_set, test_sets, test_collate, tok, device,
                              world_size, log, extra=dict(
        train_seconds=train_time, selection=selection, prune=dataclasses.asdict(mc.prune),
        img_size=mc.img_size,
        pretrained=cfg.pretrained, weights={k: weights[k] for k in ("initialised", "unused",
                                                                      "interpolated") if k in weights}))
    outputs = ([] if cfg.evaluate else ["checkpoint.pt", "log.jsonl"]) + written
    outputs += ["best.pt"] if selection.get("best_epoch") is not None else []
    log(f"wrote {', '.join(outputs)} to {cfg.run.out_dir}")


def main(argv=None):
    cfg, given = parse_config(DownstreamConfig(), sys.argv[1:] if argv is None else argv,
                              TASK_PRESETS, key=("task", "preset"), doc=__doc__)
    if cfg.evaluate and cfg.run.resume:
        raise SystemExit("error: --evaluate true scores --pretrained; it does not resume")
    check_paths(cfg, ("train_file", "test_file", "val_file", "image_root", "answer_list",
                      "scratch_like", "vocab"))
    ckpt = None
    if not cfg.evaluate:
        cfg, ckpt = trainer.resume_config(cfg, given, safe=SAFE_ON_RESUME)
    with trainer.distributed(cfg.run.dist_timeout) as (rank, world_size, device):
        try:
            finetune(cfg, ckpt, rank, world_size, device)
        except trainer.Interrupted as e:
            e.exit(rank, world_size, f"train_downstream.py --task {cfg.task} --out_dir "
                                     f"{cfg.run.out_dir}")


if __name__ == "__main__":
    main()
