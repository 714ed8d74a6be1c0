"""
The training loop shared by pre-training and fine-tuning, and what it needs: the optimisation and
run settings (RunConfig, nested in both scripts' configs), DDP set-up, mixed precision, the
optimizer and learning-rate schedule, per-rank seeds, atomic resumable checkpoints and the JSON log.

Single process is the plain default; DDP starts only when torchrun sets RANK, and every
collective sits behind that check.
"""
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import time
import traceback
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from config import config_from_dict


@dataclass
class RunConfig:
    # optimisation
    epochs: int = 5
    max_steps: int = 0               # stop after this many optimizer steps (0 = all epochs)
    batch_size: int = 32             # per process
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.02
    decay: str = "matrices"          # which parameters weight decay acts on: matrices (2-D and
                                     # up) | albef (all but 1-D ones and *.bias) | all (BLIP)
    schedule: str = "cosine"         # cosine (per step) | albef | blip (as their pre-training
                                     # code steps it) | epoch_cosine (BLIP's fine-tuning); lr_at
    warmup_steps: int = 50           # cosine: linear warmup from 0, then cosine to min_lr;
                                     # albef, blip: the warmup's iterations in epoch 0
    warmup_lr: float = 0.0           # albef, blip: the lr the warmup starts from
    lr_decay_rate: float = 0.9       # blip: lr * lr_decay_rate ** epoch after epoch 0
    alpha: float = 0.4               # distillation weight, ramped up over the first epochs
    alpha_ramp_epochs: float = 1.0   # epochs of alpha's linear ramp from 0 (ALBEF 1, BLIP 2;
                                     # 0 = none)
    grad_clip: float = 0.0           # 0 = off
    amp: str = "auto"                # auto (bf16 or fp16 on GPU, off on CPU) | bf16 | fp16 | off
    # run
    out_dir: str = "out/pretrain"
    ckpt_every: int = 500            # steps between checkpoints (one is always written at the end)
    resume: str = ""                 # a checkpoint path, or "auto" for out_dir/checkpoint.pt
    log_every: int = 10
    num_workers: int = 0             # DataLoader worker processes per rank
    seed: int = 0                    # rank r seeds its generators with seed + r
    threads: int = 0                 # torch.set_num_threads on CPU (0 = leave torch's default)
    dist_timeout: int = 60           # minutes a collective may wait for the other ranks
    max_bad_images: float = 0.001    # an entry whose image cannot be read is skipped (the next
                                     # entry replaces it) and logged; the run stops once more than
                                     # this fraction of the entries were skipped ...
    bad_images_floor: int = 20       # ... and more than this many

    def __post_init__(self):
        if self.decay not in ("matrices", "albef", "all"):
            raise ValueError(f"decay {self.decay!r} is not one of matrices, albef, all")
        if self.schedule not in ("cosine", "albef", "blip", "epoch_cosine"):
            raise ValueError(f"schedule {self.schedule!r} is not one of cosine, albef, blip, "
                             f"epoch_cosine")
        if self.schedule == "albef" and self.warmup_steps % ALBEF_LR_STAIR:
            raise ValueError(f"warmup_steps {self.warmup_steps}: the albef schedule warms up in "
                             f"stairs of {ALBEF_LR_STAIR} iterations, so it must be a multiple")


# flags that may differ from the checkpoint's config when a run resumes: they change neither
# the model nor the optimisation
SAFE_ON_RESUME = ("run.resume", "run.max_steps", "run.threads", "run.num_workers",
                  "run.log_every", "run.ckpt_every", "run.dist_timeout", "run.max_bad_images",
                  "run.bad_images_floor")


# ---- distributed, seeds, precision ------------------------------------------------------
@contextlib.contextmanager
def distributed(timeout_minutes: int = 60):
    """DDP when launched by torchrun (RANK in the environment), else a plain single process.
    Yields (rank, world_size, device). The process group is torn down on the way out, also when
    the run stops with an error: a process that exits with the group alive can abort in gloo's
    C++ threads ("terminate called without an active exception", exit -6) instead of ending
    with the error's message and code 1. A clean end waits for every rank first; an error does
    not, since the other ranks may never arrive."""
    if "RANK" not in os.environ:
        yield 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        yield dist.get_rank(), dist.get_world_size(), device
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gather_objects(obj, world: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank: int):
    """Each rank its own stream (seed + rank, as ALBEF and BLIP): crops, flips, masks, negatives
    and dropout differ between ranks. The sampler's shuffle is seeded apart and stays shared."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def autocast_and_scaler(amp: str, device: torch.device):
    """bf16 autocast where the GPU has it, else fp16 with a gradient scaler; off on CPU."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in ("off", "bf16", "fp16"):
        raise SystemExit(f"error: --amp {amp!r} is not one of auto, bf16, fp16, off")
    if amp == "off":
        return contextlib.nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype),
            torch.amp.GradScaler(device.type, enabled=amp == "fp16"))


# ---- optimizer and schedule -------------------------------------------------------------
def decayed(name: str, p: torch.Tensor, decay: str) -> bool:
    """Whether weight decay acts on parameter `name`: matrices: 2-D and up (not biases, norms,
    the temperature); albef: ALBEF's rule (optim/optim_factory.py), all but 1-D parameters and
    those named *.bias, so the 0-d temperature, pos_embed and cls_token decay; all: BLIP's
    AdamW over model.parameters()."""
    if decay == "matrices":
        return p.dim() >= 2
    if decay == "albef":
        return p.dim() != 1 and not name.endswith(".bias")
    return True


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    decay: str = "matrices"):
    """AdamW; weight decay on the parameters `decayed` picks, none on the rest. The fused kernel
    where the parameters live on a CPU or GPU: one pass over each tensor instead of a dozen
    (the tiny preset's optimizer step, 23 ms on one CPU thread, takes 5 to 7)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if decayed(n, p, decay)],
               "weight_decay": weight_decay},
              {"params": [p for n, p in params if not decayed(n, p, decay)], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for _, p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999),
                             fused=fused or None)


ALBEF_LR_STAIR = 100    # ALBEF's pre-training steps its scheduler every 100 iterations of warmup


def timm_cosine(t: int, run: RunConfig) -> float:
    """The lr of timm's CosineLRScheduler at t (ALBEF's scheduler/cosine_lr.py with
    t_initial = epochs, warmup_t = warmup_steps / 100, one cycle): linear from warmup_lr to lr
    over the warmup, then a cosine from lr to min_lr over `epochs` units, min_lr after."""
    warmup_t = run.warmup_steps // ALBEF_LR_STAIR
    if t < warmup_t:
        return run.warmup_lr + t * (run.lr - run.warmup_lr) / warmup_t
    t -= warmup_t
    if t >= run.epochs:
        return run.min_lr
    return run.min_lr + 0.5 * (run.lr - run.min_lr) * (1 + math.cos(math.pi * t / run.epochs))


def lr_at(step: int, steps_per_epoch: int, run: RunConfig) -> float:
    """The learning rate of optimizer step `step` (from 0), by run.schedule:
    cosine: linear warmup from 0 over warmup_steps, then a cosine from lr to min_lr at the end.
    albef: as ALBEF's Pretrain.py steps timm's cosine scheduler: in epoch 0, to t = i // 100
      after each iteration i = 0, 100, ... <= warmup_steps, so iteration i runs at
      t = (i - 1) // 100 (warmup_lr before the first step); at the start of epoch e >= 1, to
      t = e + warmup_steps / 100: one cosine value per epoch.
    blip: as BLIP's pretrain.py: in epoch 0, min(lr, warmup_lr + (lr - warmup_lr) * i /
      warmup_steps) at iteration i; from epoch e >= 1, max(min_lr, lr * lr_decay_rate ** e).
    epoch_cosine: as BLIP's fine-tuning (cosine_lr_schedule at the start of each epoch in
      train_retrieval.py, train_caption.py): min_lr + (lr - min_lr)(1 + cos(pi e / epochs)) / 2
      for all of epoch e, no warmup. ALBEF fine-tunes with albef, as its pre-training."""
    epoch, i = divmod(step, steps_per_epoch)
    if run.schedule == "albef":
        if epoch > 0:
            return timm_cosine(epoch + run.warmup_steps // ALBEF_LR_STAIR, run)
        return timm_cosine(min(max(0, (i - 1) // ALBEF_LR_STAIR),
                               run.warmup_steps // ALBEF_LR_STAIR), run)
    if run.schedule == "blip":
        if epoch == 0 and i < run.warmup_steps:
            return min(run.lr, run.warmup_lr + (run.lr - run.warmup_lr) * i / run.warmup_steps)
        return max(run.min_lr, run.lr * run.lr_decay_rate ** epoch)
    if run.schedule == "epoch_cosine":
        return run.min_lr + 0.5 * (run.lr - run.min_lr) * (1 + math.cos(math.pi * epoch / run.epochs))
    total = steps_per_epoch * run.epochs
    if step < run.warmup_steps:
        return run.lr * (step + 1) / run.warmup_steps
    t = (step - run.warmup_steps) / max(1, total - run.warmup_steps)
    return run.min_lr + 0.5 * (run.lr - run.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def alpha_at(step: int, steps_per_epoch: int, run: RunConfig) -> float:
    """The distillation weight: alpha, ramped up linearly from 0 over the first
    alpha_ramp_epochs epochs (ALBEF: alpha * min(1, i / len) in epoch 0; BLIP:
    alpha * min(1, step / (2 len)))."""
    if run.alpha_ramp_epochs <= 0:
        return run.alpha
    return run.alpha * min(1.0, step / (run.alpha_ramp_epochs * steps_per_epoch))


# ---- checkpoints and log ----------------------------------------------------------------
def rng_state() -> dict:
    """Every generator's state as plain Python values: it pickles for all_gather_object and
    loads with torch.load(weights_only=True)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_available() else []}


def set_rng_state(s: dict):
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


def save_checkpoint(path: str, **state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def log_json(out_dir: str, rec: dict):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def resume_config(cfg, given: dict, safe=()):
    """With --resume, the run's config comes from the checkpoint. A flag given now that would
    change the run (anything outside SAFE_ON_RESUME and `safe`) is refused, naming the flag."""
    if not cfg.run.resume:
        return cfg, None
    path = os.path.join(cfg.run.out_dir, "checkpoint.pt") if cfg.run.resume == "auto" \
        else cfg.run.resume
    ckpt = load_checkpoint(path)
    saved = config_from_dict(type(cfg), ckpt["config"])
    changed = []
    for dotted, value in given.items():
        old = saved
        for part in dotted.split("."):
            old = getattr(old, part)
        if dotted not in SAFE_ON_RESUME + tuple(safe) and old != value:
            changed.append(f"--{dotted} {value!r} (the checkpoint has {old!r})")
    if changed:
        raise SystemExit(f"error: {path} was written with other settings; resuming cannot "
                         f"change {'; '.join(changed)}. Start a new run (another --out_dir) "
                         f"instead; on resume only {', '.join(SAFE_ON_RESUME + tuple(safe))} "
                         f"may change")
    for dotted, value in given.items():      # the safe ones take the value given now
        owner = saved
        *parents, attr = dotted.split(".")
        for part in parents:
            owner = getattr(owner, part)
        setattr(owner, attr, value)
    return saved, ckpt


def params_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Two numbers that differ when any parameter differs (to check that DDP ranks agree)."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    weights = torch.linspace(1, 2, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), (flat * weights).sum()])


# ---- unreadable images --------------------------------------------------------------------
class SkipUnreadable(Dataset):
    """dataset[i], or, if its image cannot be read (the dataset raises OSError: unreadable,
    truncated, empty or missing file), the next entry's, and so on: returns (sample, [(index,
    message) of each entry skipped]). The skipped entries travel with the sample, so they reach
    the main process from DataLoader workers too. After `max_tries` unreadable entries in a row
    the sample is None: fit stops the run then, as the limit is passed."""

    def __init__(self, dataset, max_tries: int, seed: tuple[int, ...] = ()):
        self.dataset, self.max_tries = dataset, min(max_tries, len(dataset))
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        # each sample draws its crop, flip, caption and RandAugment from its own generator, seeded
        # by (seed, index): the same in the main process as in any worker, so the data do not
        # depend on num_workers and a resumed run draws what the uninterrupted one would
        sample_seed = int(np.random.SeedSequence([*self.seed, i]).generate_state(1, np.uint64)[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)    # the CPU's alone: a GPU's
                                                                # stream is the training's
            skipped = []
            for j in range(i, i + self.max_tries):
                j %= len(self.dataset)
                try:
                    return self.dataset[j], skipped
                except OSError as e:
                    skipped.append((j, str(e)))
            return None, skipped


def collate_skipping(batch, collate):
    """(collate(samples), the entries skipped to get them); (None, ...) if a sample is None."""
    samples, skipped = zip(*batch)
    batch = None if any(s is None for s in samples) else collate(list(samples))
    return batch, [s for ss in skipped for s in ss]


# ---- the loop ---------------------------------------------------------------------------
def fit(cfg, model, train_set, collate, loss_fn, device, rank, world, log, ckpt=None,
        extra_state=None, log_extra=None, desc="train", after_step=None):
    """Train `model` on `train_set` with the settings of cfg.run; cfg (the whole config) is saved
    in every checkpoint. loss_fn(model, batch, step, steps_per_epoch) -> dict of scalar tensors,
    "loss" among them; after_step(), if given, runs once after each optimizer step (the
    momentum encoders' update). Resumes from `ckpt` (a loaded checkpoint) when given; writes
    out_dir/checkpoint.pt every ckpt_every steps and at the end, extra_state inside. An entry
    whose image cannot be read is replaced by the next one (SkipUnreadable) and named in the
    log; past run.max_bad_images every rank stops at the same micro-batch with an error naming
    the last ones. Returns the training time in seconds."""
    run, master = cfg.run, rank == 0
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=run.seed, drop_last=True)
    per_step = run.batch_size * run.grad_accum
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training samples cannot fill one step of "
                         f"batch_size {run.batch_size} x grad_accum {run.grad_accum} x {world} "
                         f"processes")
    total_steps = steps_per_epoch * run.epochs
    stop_step = min(total_steps, run.max_steps) if run.max_steps else total_steps
    optimizer = build_optimizer(model, run.lr, run.weight_decay, run.decay)
    autocast, scaler = autocast_and_scaler(run.amp, device)
    step = 0
    # entries skipped for an unreadable image, {dataset index: message}, over the whole run
    skip_limit = max(run.bad_images_floor, int(run.max_bad_images * len(train_set)))
    skipped = {}
    if ckpt is not None:
        if ckpt["world_size"] != world:
            raise SystemExit(f"error: the checkpoint was written by {ckpt['world_size']} "
                             f"processes and this run has {world}: the data order and the "
                             f"per-rank random streams would not continue; resume with "
                             f"{ckpt['world_size']} processes")
        optimizer.load_state_dict(ckpt["optimizer"])
        for g in optimizer.param_groups:     # a checkpoint of the unfused AdamW would unfuse it
            g["fused"] = optimizer.defaults["fused"]
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        skipped = dict(ckpt.get("skipped_images", []))
        log(f"resumed from step {step}")
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False) if world > 1 else model   # queues agree by all_gather
    log(f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
        f"parameters; {len(train_set)} samples; {total_steps} steps of {per_step * world} "
        f"on {world} x {device.type}")
    os.makedirs(run.out_dir, exist_ok=True)
    log_path = os.path.join(run.out_dir, "log.jsonl")
    if master:
        # a fresh run starts a new log; a resumed one keeps the lines up to its checkpoint's step
        old = []
        if ckpt is not None and os.path.exists(log_path):
            with open(log_path) as f:
                old = [line for line in f if json.loads(line).get("step", 0) <= step]
        with open(log_path, "w") as f:
            f.writelines(old)

    def checkpoint():
        # every rank's random state, so that a resumed run continues each rank's own stream
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if master:
            save_checkpoint(os.path.join(run.out_dir, "checkpoint.pt"), model=model.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            config=dataclasses.asdict(cfg), step=step, rng=rngs,
                            world_size=world, skipped_images=list(skipped.items()),
                            **(extra_state or {}))

    def note_skipped(new, failure):
        """Every rank learns every rank's skipped entries (and whether a loader failed) before
        the micro-batch's forward, so that all ranks stop at the same step or none does."""
        counts = torch.tensor([len(new), failure is not None], device=device)
        if world > 1:
            dist.all_reduce(counts)
        if not counts.any():
            return
        reports = gather_objects((new, failure), world)
        failures = [f for _, f in reports if f]
        if failures:
            raise SystemExit(f"error: data loading failed on {'; '.join(failures)}")
        fresh = []
        for index, message in (x for new, _ in reports for x in new):
            if index not in skipped:
                skipped[index] = message
                fresh.append(message)
                log(f"skipped an entry: {message}")
        if master and fresh:
            log_json(run.out_dir, {"step": step + 1, "skipped": fresh,
                                   "skipped_total": len(skipped)})
        if len(skipped) > skip_limit or len(skipped) == len(train_set):
            last = "; ".join(list(skipped.values())[-5:])
            raise SystemExit(f"error: {len(skipped)} of the {len(train_set)} training entries "
                             f"have an image that cannot be read, more than the limit of "
                             f"{skip_limit} (--max_bad_images {run.max_bad_images} of the "
                             f"entries, at least --bad_images_floor {run.bad_images_floor}); "
                             f"the last: {last}")

    # the sampler's order is fixed by (seed, epoch) and each sample's randomness by (seed, rank,
    # epoch, index), so a resumed run skips the batches already seen and, with the saved RNG
    # states restored, continues exactly, with or without DataLoader workers
    model.train()
    bar = tqdm(total=stop_step, initial=step, disable=not master, desc=desc, dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < stop_step:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)[in_epoch * per_step:]
        # the loader's own draws (worker base seeds) leave the training stream alone
        generator = torch.Generator().manual_seed((run.seed + rank) * 100_003 + epoch)
        samples = SkipUnreadable(train_set, skip_limit + 1, seed=(run.seed % 2**32, rank, epoch))
        loader = DataLoader(Subset(samples, order),
                            batch_size=run.batch_size, num_workers=run.num_workers,
                            collate_fn=partial(collate_skipping, collate=collate),
                            drop_last=True, pin_memory=device.type == "cuda",
                            generator=generator)
        if ckpt is not None:
            set_rng_state(ckpt["rng"][rank])
            ckpt = None
        batches = iter(loader)
        for _ in range(in_epoch, min(steps_per_epoch, in_epoch + stop_step - step)):
            lr = lr_at(step, steps_per_epoch, run)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sums = {}
            for micro in range(run.grad_accum):
                try:
                    batch, new, failure = *next(batches), None
                except Exception as e:   # one rank's failing loader must not leave the others
                    if world == 1:       # waiting in the step's collectives
                        raise
                    traceback.print_exc()
                    batch, new, failure = None, [], f"rank {rank}: {type(e).__name__}: {e}"
                note_skipped(new, failure)
                batch = [t.to(device, non_blocking=True) for t in batch]
                sync = micro == run.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else ddp_model.no_sync()), autocast():
                    out = loss_fn(ddp_model, batch, step, steps_per_epoch)
                scaler.scale(out["loss"] / run.grad_accum).backward()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / run.grad_accum
            if run.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            step += 1
            seen += per_step * world
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()})
            if master and (step % run.log_every == 0 or step == stop_step):
                log_json(run.out_dir, dict(step=step, epoch=epoch, lr=lr, **sums,
                                           images_per_s=seen / (time.time() - t0),
                                           **(log_extra or {})))
            if step % run.ckpt_every == 0 or step == stop_step:
                checkpoint()
    bar.close()

    # the ranks must agree (gradients averaged by DDP, queues fed by all_gather)
    if world > 1:
        fp = params_fingerprint(model)
        fps = [torch.empty_like(fp) for _ in range(world)]
        dist.all_gather(fps, fp)
        if master:
            rec = {"rank_fingerprints": [f.tolist() for f in fps],
                   "ranks_in_sync": all(torch.equal(f, fps[0]) for f in fps)}
            log_json(run.out_dir, rec)
            log(f"DDP ranks hold identical parameters: {rec['ranks_in_sync']}")
    return time.time() - t0
