"""
What the two training scripts' loops call: the optimisation and run settings (RunConfig, nested in
both scripts' configs), DDP set-up, mixed precision, the optimizer and learning-rate schedule,
per-rank seeds, the step plan and its data, entries with unreadable images, interrupts
(SIGINT, SIGTERM), the losses' log, and atomic resumable checkpoints.

Single process is the plain default; DDP starts only when torchrun sets RANK, and every
collective sits behind that check.
"""
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import data
from config import config_from_dict


@dataclass
class RunConfig:
    # optimisation
    epochs: int = 5                  # passes over the training set
    max_steps: int = 0               # stop after this many optimizer steps (0 = all epochs)
    batch_size: int = 32             # samples per process in a micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 5e-4                 # the peak learning rate of AdamW
    min_lr: float = 1e-5             # where the schedule ends
    weight_decay: float = 0.02       # AdamW's, on the parameters `decay` picks
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
    grad_clip: float = 0.0           # clip the gradient's norm to this (0 = off)
    amp: str = "auto"                # auto (bf16 or fp16 on GPU, off on CPU) | bf16 | fp16 | off
    tf32: bool = True                # on a GPU, fp32 matmuls on TF32 tensor cores (as PyTorch
                                     # 1.8-1.11 did by default, where ALBEF and BLIP were trained)
    # run
    out_dir: str = "out/pretrain"    # checkpoint.pt, log.jsonl and the results go here
    ckpt_every: int = 100            # steps between checkpoints (0 = by time only); one is also
                                     # written at the end and on an interrupt
    ckpt_minutes: float = 15.0       # and at most this many minutes apart (0 = by steps only)
    resume: str = ""                 # a checkpoint path, or "auto": out_dir/checkpoint.pt if it
                                     # exists, else a fresh start
    overwrite: bool = False          # start afresh in an out_dir that holds a checkpoint
    log_every: int = 10              # steps between log lines (the losses are read from the
                                     # device only then)
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
        at_least = dict(epochs=1, batch_size=1, grad_accum=1, log_every=1, max_steps=0,
                        warmup_steps=0, ckpt_every=0, num_workers=0, threads=0, dist_timeout=1,
                        bad_images_floor=0)
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} {getattr(self, name)} must be >= {low}")
        for name in ("lr", "min_lr", "weight_decay", "warmup_lr", "grad_clip", "ckpt_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0")
        for name in ("alpha", "max_bad_images", "lr_decay_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must lie in [0, 1]")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp {self.amp!r} is not one of auto, bf16, fp16, off")


# flags that may differ from the checkpoint's config when a run resumes: they change neither
# the model nor the optimisation
SAFE_ON_RESUME = ("run.resume", "run.max_steps", "run.threads", "run.num_workers",
                  "run.log_every", "run.ckpt_every", "run.ckpt_minutes", "run.dist_timeout",
                  "run.max_bad_images", "run.bad_images_floor", "run.overwrite", "run.tf32")


# ---- distributed, seeds, precision ------------------------------------------------------
@contextlib.contextmanager
def distributed(timeout_minutes: int = 60):
    """DDP when launched by torchrun (RANK in the environment), else a plain single process.
    Yields (rank, world_size, device). A clean end waits for every rank, then tears the process
    group down. An error (an interrupt's exit too) ends the process at once with its message and
    code (end_now), without the interpreter's teardown: the other ranks may never arrive, and
    freeing DDP's reducer there can deadlock in gloo's threads or abort in them."""
    if "RANK" not in os.environ:
        yield 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return
    device = torch.device("cpu")
    if torch.cuda.is_available():
        # LOCAL_RANK picks among the GPUs this process sees; a scheduler that shows each task
        # its own single GPU (CUDA_VISIBLE_DEVICES per task) leaves device 0 for every rank
        count = torch.cuda.device_count()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if count > 1 else 0)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    except BaseException as e:
        end_now(e)
    dist.barrier()
    dist.destroy_process_group()


def end_now(e: BaseException):
    """Exit as Python would on `e` (a SystemExit's message or code, else the traceback and code
    1), but at once (os._exit): no destructor of a half-stopped process group runs."""
    if isinstance(e, SystemExit):
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    else:
        traceback.print_exception(e)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def gather_objects(obj, world: int, group=None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def setup_process(run: RunConfig, rank: int, device: torch.device):
    """Threads, seeds and, on a GPU training in fp32, TF32 matmuls (run.tf32)."""
    if run.threads and device.type == "cpu":
        torch.set_num_threads(run.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if run.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = run.tf32
    seed_everything(run.seed, rank)


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
    """(config, loaded checkpoint or None). With --resume, the run's config comes from the
    checkpoint, and a flag given now that would change the run (anything outside SAFE_ON_RESUME
    and `safe`) is refused, naming the flag; --resume auto starts afresh when out_dir holds no
    checkpoint yet, so a job script that may be resubmitted needs one command. Without
    --resume, an out_dir that holds a checkpoint is refused unless --overwrite true."""
    own = os.path.join(cfg.run.out_dir, "checkpoint.pt")
    if not cfg.run.resume:
        if os.path.exists(own) and not cfg.run.overwrite:
            raise SystemExit(f"error: {own} exists: continue it with --resume auto, or start "
                             f"afresh over it with --overwrite true (or choose another --out_dir)")
        return cfg, None
    if cfg.run.resume == "auto" and not os.path.exists(own):
        if int(os.environ.get("RANK", 0)) == 0:     # torchrun's ranks each read the flags
            print(f"--resume auto: no checkpoint in {cfg.run.out_dir} yet, starting afresh")
        return cfg, None
    path = own if cfg.run.resume == "auto" else cfg.run.resume
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


def ignore_signals(worker_id: int):
    """DataLoader workers leave SIGINT and SIGTERM to their process, which stops the run at a
    step boundary (Watch); a worker killed by Ctrl-C would fail the step instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- the pieces of a training loop ---------------------------------------------------------
class StepPlan:
    """How the training set becomes optimizer steps on this rank: a DistributedSampler shared by
    the ranks (its order fixed by (seed, epoch)), drop_last micro-batches of run.batch_size,
    run.grad_accum of them a step; stop_step ends the run (run.max_steps, or all epochs)."""

    def __init__(self, train_set, run: RunConfig, rank: int, world: int):
        self.train_set, self.run, self.rank = train_set, run, rank
        self.sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=run.seed,
                                          drop_last=True)
        self.per_step = run.batch_size * run.grad_accum
        self.steps_per_epoch = len(self.sampler) // self.per_step
        if self.steps_per_epoch == 0:
            raise SystemExit(f"error: {len(train_set)} training samples cannot fill one step of "
                             f"batch_size {run.batch_size} x grad_accum {run.grad_accum} x "
                             f"{world} processes")
        total = self.steps_per_epoch * run.epochs
        self.stop_step = min(total, run.max_steps) if run.max_steps else total

    def epoch_batches(self, step: int, collate, max_tries: int, device: torch.device):
        """(epoch, iterator of (batch, skipped entries) for the rest of step's epoch). Each
        sample's randomness is fixed by (seed, rank, epoch, index), so a resumed run skips the
        batches already seen and continues exactly, with or without DataLoader workers."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[in_epoch * self.per_step:]
        run = self.run
        # the loader's own draws (worker base seeds) leave the training stream alone
        generator = torch.Generator().manual_seed((run.seed + self.rank) * 100_003 + epoch)
        samples = data.SkipUnreadable(self.train_set, max_tries,
                                      (run.seed % 2**32, self.rank, epoch))
        loader = DataLoader(Subset(samples, order), batch_size=run.batch_size,
                            num_workers=run.num_workers,
                            collate_fn=partial(data.collate_skipping, collate=collate),
                            drop_last=True, pin_memory=device.type == "cuda", generator=generator,
                            worker_init_fn=ignore_signals)
        return epoch, iter(loader)


class Interrupted(Exception):
    """The run stopped on SIGINT or SIGTERM after writing its checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    def exit(self, rank: int, world: int, command: str):
        """Rank 0 says how to resume (`command`: the script and its out_dir); every rank exits
        with 128 + the signal's number, as a shell reports a process ended by it."""
        if rank == 0:
            launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
            print(f"{self}; checkpoint written. Resume with: {launcher} {command} --resume auto",
                  file=sys.stderr)
        raise SystemExit(128 + self.signum) from None


class Watch:
    """What every rank must agree on before each micro-batch, so that all stop or checkpoint at
    the same step: a SIGINT or SIGTERM received by any rank (the run then stops at the next step
    boundary), the entries skipped for an unreadable image (past run.max_bad_images the run
    stops with an error naming the last ones), a loader that failed on any rank, and the ranks'
    clocks for run.ckpt_minutes (the first rank due decides). Under DDP one all_reduce of four
    integers on the CPU (gloo) carries it: no wait for the GPU."""

    def __init__(self, run: RunConfig, world: int, master: bool, entries: int, skipped: dict,
                 log):
        self.run, self.world, self.master, self.entries, self.log = run, world, master, entries, log
        self.skipped = dict(skipped)         # {dataset index: message}, over the whole run
        self.limit = max(run.bad_images_floor, int(run.max_bad_images * entries))
        self.signum, self.last_save = 0, time.time()
        gloo = world > 1 and dist.get_backend() != "gloo"    # NCCL's collectives wait on the GPU
        self.group = dist.new_group(backend="gloo") if gloo else None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.on_signal)

    def close(self):
        """Ctrl-C and SIGTERM end the process again at once (the evaluation after the loop)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_signal(self, signum, frame):
        """The first signal asks for a stop at the next step boundary; a second one stops now."""
        self.signum = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)

    def next(self, batches, step: int) -> tuple:
        """(batch, stop, checkpoint due): the next micro-batch, and what the ranks agreed."""
        try:
            batch, new, failure = *next(batches), None
        except Exception as e:     # one rank's failing loader must not leave the others
            if self.world == 1:    # waiting in the step's collectives
                raise
            traceback.print_exc()
            batch, new, failure = None, [], f"{type(e).__name__}: {e}"
        due = self.run.ckpt_minutes > 0 and time.time() - self.last_save > 60 * self.run.ckpt_minutes
        flags = torch.tensor([len(new), failure is not None, self.signum, due])
        if self.world > 1:
            dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.group)
        if flags[0] or flags[1]:
            self.note(new, failure, step)
        return batch, int(flags[2]), bool(flags[3])

    def note(self, new: list, failure, step: int):
        reports = gather_objects((new, failure), self.world, self.group)
        failures = [f"rank {r}: {f}" for r, (_, f) in enumerate(reports) if f]
        if failures:
            raise SystemExit(f"error: data loading failed on {'; '.join(failures)}")
        fresh = []
        for index, message in (x for new, _ in reports for x in new):
            if index not in self.skipped:
                self.skipped[index] = message
                fresh.append(message)
                self.log(f"skipped an entry: {message}")
        if fresh and self.master:
            log_json(self.run.out_dir, {"step": step + 1, "skipped": fresh,
                                        "skipped_total": len(self.skipped)})
        if len(self.skipped) > self.limit or len(self.skipped) == self.entries:
            last = "; ".join(list(self.skipped.values())[-5:])
            raise SystemExit(f"error: {len(self.skipped)} of the {self.entries} training entries "
                             f"have an image that cannot be read, more than the limit of "
                             f"{self.limit} (--max_bad_images {self.run.max_bad_images} of the "
                             f"entries, at least --bad_images_floor {self.run.bad_images_floor}); "
                             f"the last: {last}")


class Meter:
    """The losses of each step, kept on the device and read (one wait for the GPU) only at
    run.log_every, when the log line is written and the progress bar shows them."""

    def __init__(self, run: RunConfig, master: bool, step: int, stop_step: int, desc: str,
                 extra: dict | None = None):
        self.run, self.master, self.extra = run, master, extra or {}
        self.bar = tqdm(total=stop_step, initial=step, disable=not master, desc=desc,
                        dynamic_ncols=True)
        self.t0, self.images, self.sums = time.time(), 0, {}

    def add(self, out: dict, micro_batches: int):
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() / micro_batches

    def step(self, step: int, epoch: int, lr: float, images: int, last: bool):
        self.images += images
        self.bar.update(1)
        if self.master and (step % self.run.log_every == 0 or last):
            losses = {k: v.item() for k, v in self.sums.items()}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
            log_json(self.run.out_dir, dict(step=step, epoch=epoch, lr=lr, **losses,
                                            images_per_s=self.images / (time.time() - self.t0),
                                            **self.extra))
        self.sums = {}

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.t0


def start_run(ckpt, optimizer, scaler, world: int, out_dir: str, master: bool, log) -> tuple:
    """(first step, skipped entries): a resumed run's optimizer, scaler and counters from its
    checkpoint, and its log kept up to the checkpoint's step; a fresh run starts a new log."""
    os.makedirs(out_dir, exist_ok=True)
    step, skipped = 0, {}
    if ckpt is not None:
        if ckpt["world_size"] != world:
            raise SystemExit(f"error: the checkpoint was written by {ckpt['world_size']} "
                             f"processes and this run has {world}: the data order and the "
                             f"per-rank random streams would not continue; resume with "
                             f"{ckpt['world_size']} processes")
        optimizer.load_state_dict(ckpt.pop("optimizer"))
        for g in optimizer.param_groups:     # a checkpoint of the unfused AdamW would unfuse it
            g["fused"] = optimizer.defaults["fused"]
        scaler.load_state_dict(ckpt["scaler"])
        step, skipped = ckpt["step"], dict(ckpt.get("skipped_images", []))
        log(f"resumed from step {step}")
    log_path = os.path.join(out_dir, "log.jsonl")
    if master:
        old = []
        if ckpt is not None and os.path.exists(log_path):
            with open(log_path) as f:
                old = [line for line in f if json.loads(line).get("step", 0) <= step]
        with open(log_path, "w") as f:
            f.writelines(old)
    return step, skipped


def wrap_ddp(model: torch.nn.Module, device: torch.device, world: int):
    """DDP over the ranks (gradients averaged in backward). The buffers (the queues) start as rank
    0's, as under ALBEF's and BLIP's DDP, and then agree by all_gather in the model, so DDP need
    not broadcast them at every forward (the flag's name changed in torch 2.14)."""
    if world == 1:
        return model
    renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
    for buffer in [] if renamed else model.buffers():    # the new flag broadcasts them itself
        dist.broadcast(buffer, 0)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})


def write_checkpoint(cfg, model, optimizer, scaler, step: int, watch: Watch, extra: dict):
    """out_dir/checkpoint.pt with everything a resumed run needs, every rank's random state
    included so that each rank continues its own stream."""
    world = watch.world
    rngs = gather_objects(rng_state(), world, watch.group)
    watch.last_save = time.time()
    if watch.master:
        save_checkpoint(os.path.join(cfg.run.out_dir, "checkpoint.pt"), model=model.state_dict(),
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        config=dataclasses.asdict(cfg), step=step, rng=rngs, world_size=world,
                        skipped_images=list(watch.skipped.items()), **(extra or {}))


def check_ranks_agree(model: torch.nn.Module, world: int, out_dir: str, log):
    """Under DDP, whether every rank holds the same parameters (gradients averaged by DDP,
    queues fed by all_gather), in the log."""
    if world == 1:
        return
    fp = params_fingerprint(model)
    fps = [torch.empty_like(fp) for _ in range(world)]
    dist.all_gather(fps, fp)
    if dist.get_rank() == 0:
        rec = {"rank_fingerprints": [f.tolist() for f in fps],
               "ranks_in_sync": all(torch.equal(f, fps[0]) for f in fps)}
        log_json(out_dir, rec)
        log(f"DDP ranks hold identical parameters: {rec['ranks_in_sync']}")
