"""
Pre-train ALBEF/BLIP with ELIP's text-guided vision-token pruning.

    python train_pretrain.py                      # tiny model on the embedded world, CPU, minutes
    python train_pretrain.py --prune.method none  # the same without pruning
    torchrun --nproc_per_node 4 train_pretrain.py --preset albef \
        --train_files coco.json,vg.json,cc3m.json,sbu.json --image_root /data/images \
        --vocab bert-base-uncased/vocab.txt --init_bert bert-base-uncased/model.safetensors \
        --init_vit deit_base_patch16_224.pth

Every field of TrainConfig (and of the nested ModelConfig and PruneConfig) is a flag:
`--field value` or `--field=value`, by its full dotted name (`--model.prune.lam 0.6`) or any
unambiguous suffix (`--prune.lam 0.6`, `--lam 0.6`). A preset sets a consistent group of fields;
explicit flags override it. The config is saved in every checkpoint; `--resume` takes it back.
The helpers above `main` (flags, DDP, optimizer, schedule, checkpoints) are shared with
train_downstream.py.
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import eval as evaluation
import model as model_lib
from model import ELIPModel, ModelConfig
from pruning import token_counts
from text_encoder import Tokenizer, load_bert_weights
from vit import load_vit_weights


@dataclass
class TrainConfig:
    preset: str = "tiny"
    # data: ALBEF-format JSON files; none given = the embedded world (no download)
    train_files: tuple = ()
    image_root: str = ""
    world_seed: int = 0
    world_train: int = 6000          # scenes in the embedded world's train split
    world_test: int = 200            # scenes in its test split (zero-shot retrieval at the end)
    crop_scale: tuple = (0.8, 1.0)   # random-crop area; ALBEF's (0.2, 1.0) would crop named objects
                                     # out of the world's small scenes (the albef/blip presets use it)
    vocab: str = ""                  # BERT vocab.txt; empty = built from the embedded world
    init_vit: str = ""               # DeiT/timm checkpoint for the ViT (both online and momentum)
    init_bert: str = ""              # Hugging Face BERT weights for the text encoder(s)
    # optimisation
    epochs: int = 5
    max_steps: int = 0               # stop after this many optimizer steps (0 = all epochs)
    batch_size: int = 32             # per process
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.02
    warmup_steps: int = 50
    alpha: float = 0.4               # distillation weight, ramped up over the first epoch
    grad_clip: float = 0.0           # 0 = off
    amp: str = "auto"                # auto (bf16 or fp16 on GPU, off on CPU) | bf16 | fp16 | off
    # run
    out_dir: str = "out/pretrain"
    ckpt_every: int = 500            # steps between checkpoints (one is always written at the end)
    resume: str = ""                 # a checkpoint path, or "auto" for out_dir/checkpoint.pt
    log_every: int = 10
    eval_k: int = 16                 # ITC candidates re-scored by ITM in retrieval evaluation
    num_workers: int = 0
    seed: int = 0
    threads: int = 0                 # torch.set_num_threads on CPU (0 = leave torch's default)
    model: ModelConfig = field(default_factory=ModelConfig)


TRAIN_PRESETS = {
    "tiny": dict(),
    # the ELIP paper's settings: 4 GPUs x 40 (ALBEF) or x 42 (BLIP), AdamW lr 1e-4, cosine
    "albef": dict(crop_scale=(0.2, 1.0), batch_size=40, lr=1e-4, min_lr=1e-5, weight_decay=0.02,
                  epochs=30, warmup_steps=1000, num_workers=8, ckpt_every=5000, log_every=50, eval_k=256),
    "blip": dict(crop_scale=(0.2, 1.0), batch_size=42, lr=1e-4, min_lr=1e-6, weight_decay=0.05,
                 epochs=20, warmup_steps=3000, num_workers=8, ckpt_every=5000, log_every=50, eval_k=256),
}


# ---- flags ------------------------------------------------------------------------------
def config_leaves(cfg, prefix=""):
    """{dotted name: (owner dataclass, field name)} for every leaf field of a nested config."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(config_leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (cfg, f.name)
    return out


def resolve_flag(leaves, name):
    matches = [k for k in leaves if k == name or k.endswith("." + name)]
    if len(matches) != 1:
        what = "ambiguous, could be " + ", ".join(matches) if matches else "unknown"
        raise SystemExit(f"error: flag --{name} is {what}")
    return leaves[matches[0]]


def parse_value(current, text, name):
    """Parse a flag's text by the type of the field's current value."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return text.lower() == "true"
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            return tuple(kind(v) for v in text.split(",") if v != "")
        return type(current)(text)
    except ValueError as e:
        raise SystemExit(f"error: --{name} {text!r}: {e}")


def parse_config(cfg, argv, presets, key="preset"):
    """Apply the preset named by the field `key` (`--preset`, or `--task` for fine-tuning; from
    `presets`: name -> {flag: value}), then the other flags, to cfg."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r} (flags look like --name value)")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        elif i + 1 < len(argv):
            name, text, i = arg[2:], argv[i + 1], i + 1
        else:
            raise SystemExit(f"error: flag {arg} needs a value")
        pairs.append((name, text))
        i += 1
    leaves = config_leaves(cfg)
    preset = next((t for n, t in pairs if n == key), getattr(cfg, key))
    if preset not in presets:
        raise SystemExit(f"error: --{key} {preset!r} is not one of {sorted(presets)}")
    for name, value in presets[preset].items():
        owner, attr = resolve_flag(leaves, name)
        setattr(owner, attr, value)
    for name, text in pairs:
        owner, attr = resolve_flag(leaves, name)
        setattr(owner, attr, parse_value(getattr(owner, attr), text, name))
    return rebuild(cfg)


def rebuild(cfg):
    """Re-create the nested dataclasses so their __post_init__ checks see the final values:
    a bad pruning schedule is refused here, before any data or model is built."""
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    kw = {k: rebuild(v) if dataclasses.is_dataclass(v) else v for k, v in kw.items()}
    try:
        return type(cfg)(**kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def config_from_dict(cls, d):
    """The inverse of dataclasses.asdict, for configs stored in checkpoints."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        kw[f.name] = config_from_dict(type(sub), value) if dataclasses.is_dataclass(sub) else \
            tuple(value) if isinstance(value, list) else value
    return cls(**kw)


# ---- distributed, precision, optimizer, schedule -------------------------------------
def setup_distributed():
    """DDP when launched by torchrun (RANK in the environment), else a plain single process.
    Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def autocast_and_scaler(amp, device):
    """bf16 autocast where the GPU has it, else fp16 with a gradient scaler; off on CPU."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in ("off", "bf16", "fp16"):
        raise SystemExit(f"error: --amp {amp!r} is not one of auto, bf16, fp16, off")
    if amp == "off":
        return contextlib.nullcontext, torch.amp.GradScaler(enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    ctx = lambda: torch.autocast(device.type, dtype=dtype)
    return ctx, torch.amp.GradScaler(enabled=amp == "fp16")


def build_optimizer(model, lr, weight_decay):
    """AdamW; weight decay on matrices only (not on biases, norms, the temperature)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def lr_at(step, total, cfg):
    """Linear warmup, then cosine decay from lr to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ---- checkpoints -------------------------------------------------------------------------
def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path, **state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def make_tokenizer(vocab, world_seed):
    """A BERT vocab.txt, or a vocabulary built from every word the embedded world can say."""
    if vocab:
        return Tokenizer.from_file(vocab)
    return Tokenizer.build([" ".join(data.World(world_seed).vocabulary())])


def set_vocab(model_cfg, tok):
    model_cfg.vocab_size, model_cfg.pad_id = tok.vocab_size, tok.pad_id
    model_cfg.cls_id, model_cfg.mask_id = tok.cls_id, tok.mask_id


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
            f"unused: {report['unused']}")


def params_fingerprint(model):
    """Two numbers that differ when any parameter differs (used to check DDP ranks agree)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    weights = torch.linspace(1, 2, flat.numel(), dtype=torch.float64)
    return torch.stack([flat.sum(), (flat * weights).sum()])


def log_json(out_dir, rec):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def fit(cfg, model, train_set, collate, loss_fn, device, rank, world, log, ckpt=None,
        extra_state=None, log_extra=None, desc="train"):
    """The training loop shared by pre-training and fine-tuning.
    loss_fn(model, batch, step, steps_per_epoch) -> dict of scalar tensors, "loss" among them.
    Resumes from `ckpt` (a loaded checkpoint) when given; writes out_dir/checkpoint.pt every
    cfg.ckpt_every steps and at the end, with extra_state (e.g. the vocabulary) inside.
    Returns the training time in seconds."""
    master = rank == 0
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training samples cannot fill one step of "
                         f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes")
    total_steps = steps_per_epoch * cfg.epochs
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    autocast, scaler = autocast_and_scaler(cfg.amp, device)
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        log(f"resumed from step {step}")
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False) if world > 1 else model   # queues agree by all_gather
    log(f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
        f"parameters; {len(train_set)} samples; {total_steps} steps of {per_step * world} "
        f"on {world} x {device.type}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if master:
        # a fresh run starts a new log; a resumed one keeps the lines up to its checkpoint's step
        old = []
        if ckpt is not None and os.path.exists(log_path):
            with open(log_path) as f:
                old = [line for line in f if json.loads(line).get("step", 0) <= step]
        with open(log_path, "w") as f:
            f.writelines(old)

    def checkpoint():
        save_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"), model=model.state_dict(),
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        config=dataclasses.asdict(cfg), step=step, rng=rng_state(),
                        **(extra_state or {}))

    # the sampler's order is fixed by (seed, epoch), so a resumed run skips the batches already
    # seen and, with the saved RNG state restored, continues exactly (with num_workers = 0)
    model.train()
    bar = tqdm(total=stop_step, initial=step, disable=not master, desc=desc, dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < stop_step:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)[in_epoch * per_step:]
        loader = DataLoader(torch.utils.data.Subset(train_set, order), batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, collate_fn=collate, drop_last=True,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        if ckpt is not None:
            set_rng_state(ckpt["rng"])
            ckpt = None
        batches = iter(loader)
        for _ in range(in_epoch, min(steps_per_epoch, in_epoch + stop_step - step)):
            lr = lr_at(step, total_steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sums = {}
            for micro in range(cfg.grad_accum):
                batch = [t.to(device, non_blocking=True) for t in next(batches)]
                sync = micro == cfg.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else ddp_model.no_sync()), autocast():
                    out = loss_fn(ddp_model, batch, step, steps_per_epoch)
                scaler.scale(out["loss"] / cfg.grad_accum).backward()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += per_step * world
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()})
            if master and (step % cfg.log_every == 0 or step == stop_step):
                log_json(cfg.out_dir, dict(step=step, epoch=epoch, lr=lr, **sums,
                                           images_per_s=seen / (time.time() - t0),
                                           **(log_extra or {})))
            if master and (step % cfg.ckpt_every == 0 or step == stop_step):
                checkpoint()
    bar.close()

    # the ranks must agree (gradients averaged by DDP, queues fed by all_gather)
    if world > 1:
        fp = params_fingerprint(model).to(device)
        fps = [torch.empty_like(fp) for _ in range(world)]
        dist.all_gather(fps, fp)
        if master:
            rec = {"rank_fingerprints": [f.tolist() for f in fps],
                   "ranks_in_sync": all(torch.equal(f, fps[0]) for f in fps)}
            log_json(cfg.out_dir, rec)
            log(f"DDP ranks hold identical parameters: {rec['ranks_in_sync']}")
    return time.time() - t0


def resume_config(cfg, cls):
    """With --resume, the run's config comes from the checkpoint (only max_steps may change)."""
    if not cfg.resume:
        return cfg, None
    path = os.path.join(cfg.out_dir, "checkpoint.pt") if cfg.resume == "auto" else cfg.resume
    ckpt = load_checkpoint(path)
    saved = config_from_dict(cls, ckpt["config"])
    return dataclasses.replace(saved, resume=cfg.resume, max_steps=cfg.max_steps), ckpt


def main(argv=None):
    cfg = parse_config(TrainConfig(), sys.argv[1:] if argv is None else argv,
                       {k: {**model_lib.PRESETS[k], **TRAIN_PRESETS[k]} for k in TRAIN_PRESETS})
    cfg, ckpt = resume_config(cfg, TrainConfig)
    rank, world, device = setup_distributed()
    master = rank == 0
    log = tqdm.write if master else (lambda msg: None)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    # data: every entry is checked when the dataset is built, before any training step
    tok = Tokenizer(ckpt["vocab"]) if ckpt else make_tokenizer(cfg.vocab, cfg.world_seed)
    set_vocab(cfg.model, tok)
    mc = cfg.model
    source = list(cfg.train_files) or data.world_entries("pretrain", "train", cfg.world_train,
                                                         cfg.world_seed)
    try:
        train_set = data.PretrainDataset(source, cfg.image_root or None,
                                         data.create_transform(mc.img_size, True, cfg.crop_scale),
                                         max_words=mc.max_len)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")

    # model
    model = ELIPModel(mc).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    else:
        init_weights(model, cfg.init_vit, cfg.init_bert, log)
    log(f"prune: {mc.prune}")
    counts = token_counts(model.visual_encoder.num_patches, mc.vision_depth, mc.prune)
    stages = sorted({0, *mc.prune.prune_layers}) if mc.prune.method != "tome" else range(len(counts))
    stage_tokens = [counts[i] for i in stages]

    def loss_fn(m, batch, step, steps_per_epoch):
        images, ids, mask = batch
        alpha = cfg.alpha * min(1.0, step / steps_per_epoch)     # ALBEF's ramp-up in epoch 1
        return m(images, ids, mask, alpha=alpha)

    train_time = fit(cfg, model, train_set, data.make_collate(tok, mc.max_len), loss_fn, device,
                     rank, world, log, ckpt, extra_state={"vocab": tok.vocab},
                     log_extra={"stage_tokens": stage_tokens}, desc="pretrain")

    # zero-shot retrieval on the embedded world's held-out split (only for the default data)
    if master and not cfg.train_files and cfg.world_test > 0:
        test_set = data.RetrievalEvalDataset(
            data.world_entries("retrieval", "test", cfg.world_test, cfg.world_seed), None,
            data.create_transform(mc.img_size, train=False))
        metrics = evaluation.evaluate_retrieval(model, test_set, tok, device, k=cfg.eval_k,
                                                max_len=mc.max_len)
        chance = evaluation.chance_recall(test_set.img2txt)
        rec = {"zero_shot_retrieval": metrics, "chance": chance, "train_seconds": train_time,
               "prune_method": mc.prune.method}
        log_json(cfg.out_dir, rec)
        log(evaluation.format_recall(metrics, chance, f"zero-shot retrieval, world test split "
                                     f"({len(test_set)} images, prune={mc.prune.method}), "
                                     f"ITM re-ranking of the top {cfg.eval_k}"))
        log(evaluation.format_recall(metrics["itc"], None, "ITC only"))
        with open(os.path.join(cfg.out_dir, "zero_shot.json"), "w") as f:
            json.dump(rec, f, indent=1)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
