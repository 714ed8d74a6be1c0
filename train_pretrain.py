"""
Pre-train ALBEF/BLIP with ELIP's text-guided vision-token pruning.

    python train_pretrain.py                      # tiny model on the embedded world, CPU, minutes
    python train_pretrain.py --prune.method none  # the same without pruning
    python train_pretrain.py --prune.preset tome_paper   # the paper's ToMe row (or evit_paper)
    torchrun --nproc_per_node 4 train_pretrain.py --preset albef \\
        --train_files coco.json,vg.json,cc3m.json,sbu.json --image_root /data/images \\
        --vocab bert-base-uncased/vocab.txt --init_bert bert-base-uncased/model.safetensors \\
        --init_vit deit_base_patch16_224-b5f2ef4d.pth

Every field of TrainConfig (and of the nested ModelConfig, PruneConfig and RunConfig) is a flag,
by its full dotted name (`--model.prune.lam 0.6`) or any unambiguous suffix (`--lam 0.6`).
The config is saved in every checkpoint; `--resume auto` continues from out_dir/checkpoint.pt.
"""
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import eval as evaluation
import metrics
import model as model_lib
import world
from config import parse_config
from model import ELIPModel, ModelConfig, MomentumStep
from pruning import token_counts
from text_encoder import load_bert_weights
from tokenizer import BLIP_TOKENS, Tokenizer
from trainer import (RunConfig, alpha_at, distributed, fit, gather_objects, load_checkpoint,
                     log_json, resume_config, seed_everything)
from vit import load_vit_weights


@dataclass
class TrainConfig:
    preset: str = "tiny"             # tiny | albef | blip: a consistent set of the fields below
    # data: ALBEF-format JSON files; none given = the embedded world (no download)
    train_files: tuple[str, ...] = ()
    image_root: str = ""             # image paths in the JSON files are relative to this
    check_images: bool = True        # check that every image file exists before training (the
                                     # ranks split the files); false: a missing one is skipped
                                     # when read, like an unreadable one (--max_bad_images)
    world_seed: int = 0
    world_variant: str = "default"   # default | clutter (many small objects: text guidance's test)
    world_train: int = 6000          # scenes in the embedded world's train split
    world_test: int = 200            # scenes in its test split (zero-shot retrieval at the end)
    crop_scale: tuple[float, ...] = (0.8, 1.0)   # random-crop area; ALBEF's (0.2, 1.0) would crop
                                     # named objects out of the world's small scenes
    randaug_n: int = 0               # RandAugment with ALBEF's ten operations: how many per
                                     # image (0 = off; ALBEF, BLIP: 2)
    randaug_m: int = 7               # and their strength, of 10 (ALBEF 7, BLIP 5)
    swap_left_right: bool = True     # a mirrored image's caption swaps left and right, so it
                                     # stays true (ALBEF and BLIP mirror the image alone)
    caption_style: str = "albef"     # caption cleaning: albef (data.pre_caption) | blip
                                     # (data.pre_caption_blip)
    max_words: int = 30              # a caption keeps its first max_words words; model.max_len
                                     # then caps its tokens
    pad_to_max_len: bool = False     # pad every caption to model.max_len tokens (BLIP), not to
                                     # the batch's longest (the padding is masked: same results)
    vocab: str = ""                  # BERT vocab.txt; empty = built from the embedded world
    init_vit: str = ""               # DeiT/timm checkpoint for the ViT (both online and momentum)
    init_bert: str = ""              # Hugging Face BERT weights for the text encoder(s)
    init_from: str = ""              # a checkpoint of train_pretrain.py to start from: its weights
                                     # and vocabulary, in a new run (optimizer, schedule, data)
    eval_k: int = 16                 # zero-shot retrieval: ITC candidates re-scored by ITM
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.caption_style not in ("albef", "blip"):
            raise ValueError(f"caption_style {self.caption_style!r} is not one of albef, blip")
        if self.randaug_n < 0 or self.max_words < 1:
            raise ValueError(f"randaug_n {self.randaug_n} must be >= 0 and max_words "
                             f"{self.max_words} >= 1")


TRAIN_PRESETS = {
    "tiny": dict(),
    # ELIP's pre-training as its official code runs it, on 4 GPUs: ALBEF/configs/Pretrain.yaml
    # with ALBEF/Pretrain.py, BLIP/configs/pretrain.yaml with BLIP/pretrain.py (in full fp32)
    "albef": dict(crop_scale=(0.2, 1.0), randaug_n=2, randaug_m=7, swap_left_right=False,
                  max_words=30, batch_size=40, epochs=20, lr=1e-4, weight_decay=0.02,
                  decay="albef", schedule="albef", warmup_lr=1e-5, warmup_steps=1000,
                  min_lr=1e-5, alpha=0.4, alpha_ramp_epochs=1.0, amp="off", seed=42,
                  num_workers=8, ckpt_every=5000, log_every=50, eval_k=256),
    "blip": dict(crop_scale=(0.2, 1.0), randaug_n=2, randaug_m=5, swap_left_right=False,
                 caption_style="blip", max_words=30, pad_to_max_len=True, batch_size=42,
                 epochs=15, lr=1e-4, weight_decay=0.05, decay="all", schedule="blip",
                 warmup_lr=1e-6, warmup_steps=3000, min_lr=1e-6, lr_decay_rate=0.9, alpha=0.4,
                 alpha_ramp_epochs=2.0, amp="off", seed=42, num_workers=8, ckpt_every=5000,
                 log_every=50, eval_k=256),
}
PRESETS = {k: {**model_lib.PRESETS[k], **TRAIN_PRESETS[k]} for k in TRAIN_PRESETS}


def make_tokenizer(vocab, world_seed, blip_tokens=False):
    """A BERT vocab.txt, or a vocabulary built from every word the embedded world can say; with
    blip_tokens, BLIP's [DEC] and [ENC] appended."""
    tok = Tokenizer.from_file(vocab) if vocab else \
        Tokenizer.build([" ".join(world.World(world_seed).vocabulary())])
    return tok.add_tokens(BLIP_TOKENS) if blip_tokens else tok


def init_weights(model, init_vit, init_bert, log):
    """Pretrained initialisation (strict loaders); momentum copies start equal to the online."""
    if init_vit:
        unused = load_vit_weights(model.visual_encoder, init_vit)
        model.visual_encoder_m.load_state_dict(model.visual_encoder.state_dict())
        log(f"loaded ViT weights from {init_vit}; unused: {unused}")
    if init_bert:
        encoders = [model.text_encoder] + ([model.text_decoder] if model.text_decoder else [])
        for enc in encoders:
            report = load_bert_weights(enc, init_bert)
        model.text_encoder_m.load_state_dict(model.text_encoder.state_dict())
        log(f"loaded BERT weights from {init_bert}; randomly initialised: {report['missing']}; "
            f"unused: {report['unused']}; rows added for new tokens: {report['grown']}")


def pretrain(cfg, ckpt, rank: int, world_size: int, device: torch.device):
    """Pre-training on this process's rank, then the zero-shot evaluation of the embedded world."""
    master = rank == 0
    log = tqdm.write if master else (lambda msg: None)
    if cfg.run.threads and device.type == "cpu":
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed, rank)

    # data: every entry is checked when the dataset is built, before any training step
    mc = cfg.model
    start = load_checkpoint(cfg.init_from) if cfg.init_from and ckpt is None else None
    tok = Tokenizer((ckpt or start)["vocab"]) if ckpt or start else \
        make_tokenizer(cfg.vocab, cfg.world_seed, mc.blip_tokens)
    mc.vocab_size, mc.pad_id, mc.cls_id, mc.mask_id, mc.enc_id, mc.dec_id = (
        tok.vocab_size, tok.pad_id, tok.cls_id, tok.mask_id, tok.enc_id, tok.dec_id)
    mc.object_classes = world.OBJECT_CLASSES
    source = list(cfg.train_files) or world.world_entries("pretrain", "train", cfg.world_train,
                                                          cfg.world_seed, cfg.world_variant)
    try:
        transform = data.create_transform(mc.img_size, True, cfg.crop_scale, cfg.randaug_n,
                                          cfg.randaug_m)
        clean = data.pre_caption_blip if cfg.caption_style == "blip" else data.pre_caption
        train_set = data.PretrainDataset(source, cfg.image_root or None, transform,
                                         max_words=cfg.max_words, clean=clean,
                                         swap_words=cfg.swap_left_right, check_images=False,
                                         all_captions=mc.itc_all_captions,
                                         objects=mc.patch_size if "objects" in mc.losses else 0)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.check_images:
        # millions of files: each rank checks its share, and every rank learns the total
        found = gather_objects(train_set.missing_images(rank, world_size), world_size)
        missing, first = sum(n for n, _ in found), [m for _, ms in found for m in ms]
        if missing:
            raise SystemExit(f"error: {missing} image files do not exist: {'; '.join(first)}"
                             + (" ..." if missing > len(first) else ""))

    # model
    model = ELIPModel(mc).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif start is not None:
        try:
            model.load_state_dict(start["model"])
        except RuntimeError as e:
            raise SystemExit(f"error: --init_from {cfg.init_from} holds another architecture than "
                             f"the flags give: {str(e).splitlines()[1].strip()}") from None
        log(f"weights and vocabulary from {cfg.init_from} (its step {start['step']})")
        del start
    else:
        init_weights(model, cfg.init_vit, cfg.init_bert, log)
    log(f"prune: {mc.prune}")
    counts = token_counts(model.visual_encoder.num_patches, mc.vision_depth, mc.prune)
    stages = sorted({0, *mc.prune.prune_layers}) if mc.prune.method != "tome" else range(len(counts))
    stage_tokens = [counts[i] for i in stages]

    # the momentum update and the queue write, once per optimizer step
    momentum = MomentumStep(model)

    def loss_fn(m, batch, step, steps_per_epoch):
        images, ids, mask, *rest = batch    # then every caption (ids, mask, counts), objects
        captions = rest[:3] if mc.itc_all_captions else None
        objects = rest[-2:] if "objects" in mc.losses else None          # (cover, labels)
        alpha = alpha_at(step, steps_per_epoch, cfg.run)
        return momentum.take(m(images, ids, mask, alpha=alpha, captions=captions,
                               objects=objects))

    # train
    collate = data.make_collate(tok, mc.max_len, cfg.pad_to_max_len)
    train_time = fit(cfg, model, train_set, collate, loss_fn, device, rank, world_size, log, ckpt,
                     extra_state={"vocab": tok.vocab}, log_extra={"stage_tokens": stage_tokens},
                     desc="pretrain", after_step=momentum.after_step)

    # zero-shot retrieval on the embedded world's held-out split (only for the default data);
    # under DDP every rank embeds and re-ranks its share (eval.py), rank 0 reports
    if not cfg.train_files and cfg.world_test > 0:
        test_set = data.for_evaluation(data.RetrievalEvalDataset(
            world.world_entries("retrieval", "test", cfg.world_test, cfg.world_seed,
                                cfg.world_variant), None,
            data.create_transform(mc.img_size, train=False)))
        scores = evaluation.evaluate_retrieval(model, test_set, tok, device, k=cfg.eval_k,
                                               max_len=mc.max_len)
        if master:
            chance = metrics.chance_recall(test_set.img2txt)
            # the ceiling: many captions are true of several test images ("there are two objects")
            truth = world.caption_truth([it["images"][0] for it in test_set.items], test_set.text)
            oracle = metrics.oracle_recall(truth, test_set.img2txt)
            rec = {"zero_shot_retrieval": scores, "chance": chance, "oracle": oracle,
                   "r_mean_of_oracle": scores["r_mean"] / oracle["r_mean"],
                   "itc_r_mean_of_oracle": scores["itc"]["r_mean"] / oracle["r_mean"],
                   "train_seconds": train_time, "prune_method": mc.prune.method,
                   "world_variant": cfg.world_variant}
            log_json(cfg.run.out_dir, rec)
            log(metrics.format_recall(scores, chance, f"zero-shot retrieval, world test split "
                                      f"({len(test_set)} images, prune={mc.prune.method}), "
                                      f"ITM re-ranking of the top {cfg.eval_k}", oracle))
            log(metrics.format_recall(scores["itc"], None, "ITC only", oracle))
            with open(os.path.join(cfg.run.out_dir, "zero_shot.json"), "w") as f:
                json.dump(rec, f, indent=1)


def main(argv=None):
    cfg, given = parse_config(TrainConfig(), sys.argv[1:] if argv is None else argv, PRESETS,
                              doc=__doc__)
    cfg, ckpt = resume_config(cfg, given, safe=("check_images",))
    with distributed(cfg.run.dist_timeout) as (rank, world_size, device):
        pretrain(cfg, ckpt, rank, world_size, device)


if __name__ == "__main__":
    main()
