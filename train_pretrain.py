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
The config is saved in every checkpoint; `--resume auto` continues from out_dir/checkpoint.pt
(and starts afresh when there is none). Ctrl-C or SIGTERM stops every rank at the same step,
writes the checkpoint and prints the command that resumes it.

Your own data on the small model: `--train_files my.json --image_root imgs --test_files
held_out.json`; the vocabulary is built from the corpus's captions (or --vocab), the world-only
objects loss switches off, and the held-out set is scored zero-shot at the end.
"""
import contextlib
import dataclasses
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
import released
import trainer
import world_aids
import world
from config import check_paths, parse_config
from model import ELIPModel, ModelConfig
from pruning import token_counts
from text_encoder import load_bert_weights
from tokenizer import BLIP_TOKENS, Tokenizer
from trainer import RunConfig, alpha_at, autocast_and_scaler, build_optimizer, lr_at
from vit import load_vit_weights
from world_aids import WorldAids, WorldModel, WorldPretrainDataset


@dataclass
class TrainConfig:
    preset: str = "tiny"             # tiny | albef | blip: a consistent set of the fields below
    # data: ALBEF-format JSON files; none given = the embedded world (no download)
    train_files: tuple[str, ...] = ()   # JSON lists of {"image", "caption": str or [str]}
    test_files: tuple[str, ...] = ()    # held-out retrieval files ({"image", "caption": [str]}
                                        # per image), scored zero-shot at the end
    image_root: str = ""             # image paths in the JSON files are relative to this
    check_images: bool = True        # check that every image file exists before training (the
                                     # ranks split the files); false: a missing one is skipped
                                     # when read, like an unreadable one (--max_bad_images)
    world_seed: int = 0              # the embedded world's seed (the same scenes on every machine)
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
    vocab: str = ""                  # BERT vocab.txt; empty = built from the training captions
                                     # (the embedded world's words by default)
    init_vit: str = ""               # DeiT/timm checkpoint for the ViT (both online and momentum)
    init_bert: str = ""              # Hugging Face BERT weights for the text encoder(s)
    init_from: str = ""              # a checkpoint to start from, in a new run (optimizer,
                                     # schedule, data): this script's (its weights and vocabulary)
                                     # or a released ALBEF/BLIP/ELIP pre-training file (with --vocab)
    eval_k: int = 16                 # zero-shot retrieval: ITC candidates re-scored by ITM
    model: ModelConfig = field(default_factory=ModelConfig)
    aids: WorldAids = field(default_factory=WorldAids)   # the tiny preset's (world_aids.py)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.caption_style not in ("albef", "blip"):
            raise ValueError(f"caption_style {self.caption_style!r} is not one of albef, blip")
        if self.randaug_n < 0 or self.max_words < 1:
            raise ValueError(f"randaug_n {self.randaug_n} must be >= 0 and max_words "
                             f"{self.max_words} >= 1")


TRAIN_PRESETS = {
    "tiny": dataclasses.asdict(world_aids.TINY),
    # ELIP's pre-training as its official code runs it, on 4 GPUs: ALBEF/configs/Pretrain.yaml
    # with ALBEF/Pretrain.py, BLIP/configs/pretrain.yaml with BLIP/pretrain.py (in full fp32)
    "albef": dict(crop_scale=(0.2, 1.0), randaug_n=2, randaug_m=7, swap_left_right=False,
                  max_words=30, batch_size=40, epochs=20, lr=1e-4, weight_decay=0.02,
                  decay="albef", schedule="albef", warmup_lr=1e-5, warmup_steps=1000,
                  min_lr=1e-5, alpha=0.4, alpha_ramp_epochs=1.0, amp="off", seed=42,
                  num_workers=8, ckpt_every=0, log_every=50, eval_k=256),
    "blip": dict(crop_scale=(0.2, 1.0), randaug_n=2, randaug_m=5, swap_left_right=False,
                 caption_style="blip", max_words=30, pad_to_max_len=True, batch_size=42,
                 epochs=15, lr=1e-4, weight_decay=0.05, decay="all", schedule="blip",
                 warmup_lr=1e-6, warmup_steps=3000, min_lr=1e-6, lr_decay_rate=0.9, alpha=0.4,
                 alpha_ramp_epochs=2.0, amp="off", seed=42, num_workers=8, ckpt_every=0,
                 log_every=50, eval_k=256),
}
PRESETS = {k: {**model_lib.PRESETS[k], **TRAIN_PRESETS[k]} for k in TRAIN_PRESETS}


def make_tokenizer(cfg, train_set, log):
    """A BERT vocab.txt (--vocab), or whole words: every word the embedded world can say, or
    every word of the training captions; with blip_tokens, BLIP's [DEC] and [ENC] appended.
    Says what share of the training text becomes [UNK]."""
    captions = [c for item in train_set.items for c in item["captions"]]
    if cfg.vocab:
        tok = Tokenizer.from_file(cfg.vocab)
    elif cfg.train_files:
        tok = Tokenizer.build(captions)
        log(f"vocabulary: the {tok.vocab_size - 5} words of the training captions (--vocab "
            f"takes a BERT vocab.txt instead)")
    else:
        tok = Tokenizer.build([" ".join(world.World(cfg.world_seed).vocabulary())])
    unk = unknown_share(tok, captions[:20_000])
    log(f"[UNK] is {unk:.1%} of the training captions' tokens"
        + (": too many, the model cannot read them (give --vocab a vocabulary that covers "
           "them)" if unk > 0.05 else ""))
    return tok.add_tokens(BLIP_TOKENS) if cfg.model.blip_tokens else tok


def unknown_share(tok, texts) -> float:
    ids = [i for t in texts for i in tok.encode(t)[1:-1]]     # without [CLS] and [SEP]
    return sum(i == tok.unk_id for i in ids) / max(1, len(ids))


def build_train_set(cfg, rank, world_size):
    """The training entries, every one checked before any step: the JSON files, or the embedded
    world (with what the aids read); each rank checks its share of the image files."""
    mc = cfg.model
    source = list(cfg.train_files) or world.world_entries("pretrain", "train", cfg.world_train,
                                                          cfg.world_seed, cfg.world_variant)
    try:
        transform = data.create_transform(mc.img_size, True, cfg.crop_scale, cfg.randaug_n,
                                          cfg.randaug_m)
        kw = dict(image_root=cfg.image_root or None, transform=transform,
                  max_words=cfg.max_words, check_images=False, swap_words=cfg.swap_left_right,
                  clean=data.pre_caption_blip if cfg.caption_style == "blip" else data.pre_caption)
        train_set = (WorldPretrainDataset(source, cfg.aids, mc.patch_size, **kw) if cfg.aids.on
                     else data.PretrainDataset(source, **kw))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.check_images:
        found = trainer.gather_objects(train_set.missing_images(rank, world_size), world_size)
        missing, first = sum(n for n, _ in found), [m for _, ms in found for m in ms]
        if missing:
            raise SystemExit(f"error: {missing} image files do not exist: {'; '.join(first)}"
                             + (" ..." if missing > len(first) else ""))
    return train_set


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


def load_start(cfg, train_set, log) -> dict:
    """--init_from: a checkpoint of this script, or a released ALBEF, BLIP or ELIP pre-training
    file (released.py), converted, which must imply the architecture the flags give; its
    vocabulary is --vocab's (the files hold none)."""
    start = trainer.load_checkpoint(cfg.init_from)
    if "vocab" in start:
        return start
    mc = cfg.model
    try:
        conv = released.to_ours(released.unwrap(start), img_size=mc.img_size,
                                head_dim=mc.vision_width // mc.vision_heads)
    except ValueError as e:
        raise SystemExit(f"error: --init_from {cfg.init_from}: {e}") from None
    if conv.task != "pretrain":
        raise SystemExit(f"error: --init_from {cfg.init_from} is a fine-tuned {conv.task} model "
                         f"({conv.layout}): pre-training starts from a pre-training checkpoint")
    if not cfg.vocab:
        raise SystemExit(f"error: --init_from {cfg.init_from} is a released {conv.layout} "
                         f"checkpoint, which holds no vocabulary: give --vocab the BERT vocab.txt "
                         f"it was trained with")
    differ = [f"--{k} {v} (the flags: {getattr(mc, k)})" for k, v in conv.config.items()
              if k not in ("vocab_size", "losses") and getattr(mc, k) != v]
    if differ:
        raise SystemExit(f"error: --init_from {cfg.init_from} holds another architecture than "
                         f"the flags give: it implies {'; '.join(differ)}")
    log(f"--init_from {cfg.init_from}: a released {conv.layout} checkpoint, converted "
        f"({len(conv.dropped)} tied copies and position-id buffers left out)")
    return {"model": conv.state, "vocab": make_tokenizer(cfg, train_set, log).vocab}


def build_model(cfg, ckpt, start, device, log):
    """ELIPModel (or, with the tiny preset's aids, WorldModel) with its weights: a resumed run's,
    --init_from's, or the pretrained ViT and BERT given, else random."""
    mc = cfg.model
    model = (WorldModel(mc, cfg.aids) if cfg.aids.on else ELIPModel(mc)).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt.pop("model"))      # the host copy goes as soon as it is loaded
    elif start is not None:
        try:
            model.load_state_dict(start.pop("model"))
        except RuntimeError as e:
            raise SystemExit(f"error: --init_from {cfg.init_from} holds another architecture than "
                             f"the flags give: {str(e).splitlines()[1].strip()}") from None
        log(f"weights and vocabulary from {cfg.init_from}"
            + (f" (its step {start['step']})" if "step" in start else ""))
    else:
        init_weights(model, cfg.init_vit, cfg.init_bert, log)
    return model


def train(cfg, model, train_set, collate, device, rank, world, log, ckpt=None, extra=None,
          log_extra=None):
    """The pre-training loop, one optimizer step at a time: its micro-batches, each a forward
    (ITC, ITM, MLM or LM) and a backward, then AdamW's step, the momentum encoders' EMA and the
    queue write, the log line, the checkpoint. `extra` goes into every checkpoint, `log_extra`
    into every log line. Returns the training time in seconds."""
    run, master = cfg.run, rank == 0
    plan = trainer.StepPlan(train_set, run, rank, world)
    optimizer = build_optimizer(model, run.lr, run.weight_decay, run.decay)
    autocast, scaler = autocast_and_scaler(run.amp, device)
    step, skipped = trainer.start_run(ckpt, optimizer, scaler, world, run.out_dir, master, log)
    watch = trainer.Watch(run, world, master, len(train_set), skipped, log)
    ddp_model = trainer.wrap_ddp(model, device, world)
    meter = trainer.Meter(run, master, step, plan.stop_step, "pretrain", log_extra)
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
            model.momentum_step(queued)       # the teacher's EMA and the queue write
            step += 1
            meter.step(step, epoch, lr, plan.per_step * world, step == plan.stop_step)
            if (run.ckpt_every and step % run.ckpt_every == 0) or due or step == plan.stop_step:
                trainer.write_checkpoint(cfg, model, optimizer, scaler, step, watch, extra)
    watch.close()
    trainer.check_ranks_agree(model, world, run.out_dir, log)
    return meter.close()


def zero_shot(cfg, model, tok, device, train_time, log):
    """Zero-shot retrieval on the held-out images (the world's test split, or --test_files):
    every rank embeds and re-ranks its share (eval.py), rank 0 reports, beside a random ranking
    and, on the world, beside the oracle that ranks first every image a caption is true of."""
    mc = cfg.model
    entries = list(cfg.test_files) or world.world_entries(
        "retrieval", "test", cfg.world_test, cfg.world_seed, cfg.world_variant)
    try:
        test_set = data.for_evaluation(data.RetrievalEvalDataset(
            entries, cfg.image_root or None, data.create_transform(mc.img_size, train=False)))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    scores = evaluation.evaluate_retrieval(model, test_set, tok, device, k=cfg.eval_k,
                                           max_len=mc.max_len, num_workers=cfg.run.num_workers)
    if not (torch.distributed.is_initialized() and torch.distributed.get_rank() > 0):
        chance, oracle = metrics.chance_recall(test_set.img2txt), None
        if not cfg.test_files:    # many captions are true of several test images
            truth = world.caption_truth([it["images"][0] for it in test_set.items], test_set.text)
            oracle = metrics.oracle_recall(truth, test_set.img2txt)
        rec = {"zero_shot_retrieval": scores, "chance": chance, "oracle": oracle,
               "train_seconds": train_time, "prune_method": mc.prune.method,
               "world_variant": cfg.world_variant, "test_files": list(cfg.test_files)}
        if oracle:
            rec.update(r_mean_of_oracle=scores["r_mean"] / oracle["r_mean"],
                       itc_r_mean_of_oracle=scores["itc"]["r_mean"] / oracle["r_mean"])
        trainer.log_json(cfg.run.out_dir, rec)
        name = ", ".join(cfg.test_files) or "world test split"
        log(metrics.format_recall(scores, chance, f"zero-shot retrieval, {name} ({len(test_set)} "
                                  f"images, prune={mc.prune.method}), ITM re-ranking of the top "
                                  f"{cfg.eval_k}", oracle))
        log(metrics.format_recall(scores["itc"], None, "ITC only", oracle))
        with open(os.path.join(cfg.run.out_dir, "zero_shot.json"), "w") as f:
            json.dump(rec, f, indent=1)


def pretrain(cfg, ckpt, rank: int, world_size: int, device: torch.device):
    """Set-up (data, vocabulary, model), the loop, then zero-shot retrieval, on this rank."""
    master = rank == 0
    log = tqdm.write if master else (lambda msg: None)
    trainer.setup_process(cfg.run, rank, device)
    train_set = build_train_set(cfg, rank, world_size)
    start = load_start(cfg, train_set, log) if cfg.init_from and ckpt is None else None
    saved = ckpt or start
    tok = Tokenizer(saved["vocab"]) if saved else make_tokenizer(cfg, train_set, log)
    mc = cfg.model
    mc.vocab_size, mc.pad_id, mc.cls_id, mc.mask_id, mc.enc_id, mc.dec_id = (
        tok.vocab_size, tok.pad_id, tok.cls_id, tok.mask_id, tok.enc_id, tok.dec_id)
    model = build_model(cfg, ckpt, start, device, log)
    del start
    log(f"prune: {mc.prune}")
    counts = token_counts(model.visual_encoder.num_patches, mc.vision_depth, mc.prune)
    collate = data.make_collate(tok, mc.max_len, cfg.pad_to_max_len)
    train_time = train(cfg, model, train_set, collate, device, rank, world_size, log, ckpt,
                       extra={"vocab": tok.vocab},
                       log_extra={"stage_tokens": sorted(set(counts), reverse=True)})
    outputs = ["checkpoint.pt", "log.jsonl"]
    if cfg.test_files or (not cfg.train_files and cfg.world_test > 0):
        zero_shot(cfg, model, tok, device, train_time, log)
        outputs.append("zero_shot.json")
    log(f"wrote {', '.join(outputs)} to {cfg.run.out_dir}")


def own_data(cfg, given: dict):
    """With --train_files, the world-only objects loss switches off (it needs the world's
    object masks), with a line saying so; asked for explicitly, it is an error."""
    if not cfg.train_files or not cfg.aids.objects:
        return cfg
    if "aids.objects" in given:
        raise SystemExit("error: --objects true needs the embedded world's images (object "
                         "masks); it cannot train on --train_files")
    print("--train_files: the objects loss (the embedded world's object labels) is off")
    return dataclasses.replace(cfg, aids=dataclasses.replace(cfg.aids, objects=False))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, given = parse_config(TrainConfig(), argv, PRESETS, doc=__doc__)
    check_paths(cfg, ("train_files", "test_files", "image_root", "vocab", "init_vit",
                              "init_bert", "init_from"))
    cfg = own_data(cfg, given)
    cfg, ckpt = trainer.resume_config(cfg, given, safe=("check_images",))
    with trainer.distributed(cfg.run.dist_timeout) as (rank, world_size, device):
        try:
            pretrain(cfg, ckpt, rank, world_size, device)
        except trainer.Interrupted as e:
            e.exit(rank, world_size, f"train_pretrain.py --out_dir {cfg.run.out_dir}")


if __name__ == "__main__":
    main()
