"""
The efficiency benchmark: every token-reduction method of pruning.METHODS measured side by side,
in one run on one machine, on the online ViT of a model.PRESETS architecture (--arch) and, with
--whole_model true, on the whole pre-training model, each figure with its ratio to `none`:
  FLOPs   FlopCounterMode around a training step (forward + backward), and around an inference
          forward (eval mode, PruneConfig(in_eval=True) so the reduction still applies)
  memory  the bytes autograd saves for backward in the training step, each storage once,
          parameters left out; on a GPU also the peak of torch.cuda.max_memory_allocated
  time    the median of training steps after warm-up, torch.set_num_threads fixed, the methods
          taking turns round by round ("paired": the median over rounds of the ratio to `none`)
  tokens  the sequence length entering each layer in the grad-enabled pass (the ELIP look-ahead
          runs under no_grad) against pruning.token_counts, and the ratio of removed token-layers
The --prune flags set the schedule of every scoring method (pruning.SCORERS), so that they
differ only in how they score tokens; ToMe's r is matched to elip's removed token-layers.
With --gpu_step albef (or blip) it measures instead what the paper's Table 1 compares: a whole
training step (forward, backward, AdamW) of that preset's pre-training model at full size and the
paper's per-GPU batch, fp32 with TF32 matmuls as the presets train, `none` against `elip`: seconds
per step and peak CUDA memory, their ratios beside the paper's.
The research extras (the ELIP+ batch, prune_and_merge's share of a step, our ViT against timm's)
are in lab/bench_extra.py.

    python bench.py                                   # ViT-B/16 at 224 px, batch 8
    python bench.py --whole_model true --whole_batch 4
    python bench.py --preset tiny                     # a quick look, seconds
    python bench.py --gpu_step albef                  # Table 1's time and memory, on a GPU
"""
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter

import pruning
import trainer
from config import parse_config
from eval import sync
from model import PRESETS as MODEL_PRESETS
from model import ELIPModel, ModelConfig, build_vit
from pruning import PruneConfig, token_counts
from tokenizer import BLIP_TOKENS


# --gpu_step's batch: the per-GPU batch of ELIP's pre-training configs (ALBEF/configs/
# Pretrain.yaml 40, BLIP/configs/pretrain.yaml 42, on 4 GPUs): Table 1's latency (minutes per
# epoch) and memory (of the 4 GPUs) are those of pre-training runs; its TFLOPs alone are counted
# at batch 36
PAPER_BATCH = {"albef": 40, "blip": 42}
# Table 1's rows without and with ELIP: (latency in minutes per epoch, memory in GB on 4 GPUs)
TABLE1 = {"albef": {"none": (594, 88.1), "elip": (518, 69.6)},
          "blip": {"none": (1102, 90.8), "elip": (960, 74.7)}}
BERT_VOCAB = 30522                   # bert-base-uncased's, both presets' (BLIP adds BLIP_TOKENS)


@dataclass
class BenchConfig:
    preset: str = "base"             # base: ViT-B/16 at 224 px; tiny: a quick look, seconds
    arch: str = "albef"              # a model.PRESETS architecture: the ViT and the whole model
    img_size: int = 224              # the image side in pixels (0: the arch's; albef's is 256)
    batch: int = 8                   # of the ViT alone
    methods: tuple[str, ...] = field(default_factory=lambda: pruning.METHODS)  # default: all
                                     # of pruning.METHODS; none always (the reference)
    prune: PruneConfig = field(default_factory=PruneConfig)   # the scoring methods' schedule
    match_tome_r: bool = True        # ToMe's r: the one whose removed token-layers come closest
                                     # to elip's (false: --prune.tome_r)
    reps: int = 5                    # timed training steps per method, after the warm-up
    warmup: int = 1                  # untimed rounds first
    threads: int = 0                 # torch.set_num_threads for the run (0: torch's default)
    whole_model: bool = False        # also measure the whole pre-training model
    whole_batch: int = 4             # of the whole model (>= 2: ITM's negatives)
    whole_vocab: int = 1000          # small: the vocabulary only adds a batch-independent cost
    whole_queue: int = 1024          # the ITC queue, at most the arch's (small, as whole_vocab)
    text_len: int = 30               # tokens of each random text
    device: str = "auto"             # auto: cuda when available, else cpu
    seed: int = 0                    # the random weights and inputs
    out: str = "out/bench.json"      # the report, as JSON
    gpu_step: str = ""               # albef | blip: time that preset's whole training step at
                                     # full size, none against elip, beside Table 1 (needs CUDA
                                     # unless --device cpu; "" = off)
    gpu_batch: int = 0               # --gpu_step's batch (0: the paper's per GPU, that of ELIP's
                                     # pre-training configs: albef 40, blip 42)

    def __post_init__(self):
        if self.arch not in MODEL_PRESETS:
            raise ValueError(f"arch {self.arch!r} is not one of {', '.join(MODEL_PRESETS)}")
        bad = [m for m in self.methods if m not in pruning.METHODS]
        if bad or "none" not in self.methods:
            raise ValueError(f"methods {self.methods}: choose from {pruning.METHODS}, `none` "
                             "included (every figure is also given as a ratio to it)")
        if min(self.batch, self.reps) < 1 or self.whole_batch < 2 or self.warmup < 0:
            raise ValueError("batch and reps must be >= 1, warmup >= 0, whole_batch >= 2 "
                             "(ITM draws each negative from the other samples of the batch)")
        if self.whole_vocab <= 5 or self.text_len < 2:
            raise ValueError("whole_vocab must exceed the 5 special tokens; text_len must be >= 2")
        if self.gpu_step not in ("", *PAPER_BATCH) or self.gpu_batch < 0 or self.gpu_batch == 1:
            raise ValueError(f"gpu_step {self.gpu_step!r}: one of {', '.join(PAPER_BATCH)} or "
                             f"empty; gpu_batch {self.gpu_batch}: 0 or >= 2 (ITM's negatives)")

    @staticmethod
    def presets() -> dict:
        """The named settings the `preset` field selects (lab/bench_extra.py nests this config)."""
        return PRESETS


PRESETS = {
    "base": dict(),
    # the tiny architecture (64 px, patch 8, width 128) with few repetitions: seconds
    "tiny": dict(arch="tiny", img_size=0, batch=4, reps=2, whole_batch=2, whole_vocab=200,
                 text_len=12),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def pick_device(cfg):
    """The device of --device (auto: cuda when available), with --threads set."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                        if cfg.device == "auto" else cfg.device)


def machine_info(device):
    """What the figures were measured on; the load average, as other work slows the timings."""
    return dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                load_start=[round(x, 2) for x in os.getloadavg()])


def bench_model_config(cfg, prune):
    """The ModelConfig of the arch with the bench's image size, text length, vocabulary and
    queue; the arch's prune fields give way to `prune`. ELIP's model only: the tiny preset's
    aids for the world (world_aids.py) are left out."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    arch = {k: v for k, v in MODEL_PRESETS[cfg.arch].items() if k in names and k != "prune"}
    mc = ModelConfig(**arch, prune=prune)
    return dataclasses.replace(mc, img_size=cfg.img_size or mc.img_size, max_len=cfg.text_len,
                               vocab_size=cfg.whole_vocab, enc_id=cfg.whole_vocab - 1,
                               dec_id=cfg.whole_vocab - 2,
                               queue_size=min(cfg.whole_queue, mc.queue_size))


# ---- the measuring instruments ---------------------------------------------------------
def flop_counter_mode():
    """FlopCounterMode that also counts fused attention on CPU. torch's registry has formulas for
    the CUDA attention kernels only, so on CPU F.scaled_dot_product_attention would count 0; the
    CPU kernel gets the same formulas (forward: Q K^T and A V; backward: the scores recomputed,
    then four products, as flash attention does). Matrix products count 2 FLOPs per
    multiply-add; element-wise work (softmax, norms, GELU) is not counted, as in torch's counter."""
    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kw:
                flop_counter.sdpa_backward_flop_count(grad, q, k, v)})


@contextlib.contextmanager
def saved_tensor_bytes(exclude=()):
    """The activation memory of a forward: yields a dict {storage address: bytes}, filled when
    the block ends with the storages autograd still holds for backward (keep the output alive
    until then). A storage counts once, and whole, however many tensors or views of it are
    saved. What a discarded branch of the graph saved (ToMe's matching keys) is gone by then and
    not counted. Storages of the tensors in `exclude` (the parameters) are left out."""
    held, saved = [], {}

    def pack(t):
        # the same storage, without t's grad_fn: returning t itself would make a saved output
        # hold its own graph node, a cycle that outlives a forward that is never backpropagated
        t = t.detach()
        held.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    for t in (ref() for ref in held):
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()


@contextlib.contextmanager
def layer_lengths(blocks):
    """Yields a list that collects the sequence length entering each of `blocks` in grad-enabled
    calls; the ELIP look-ahead runs the same blocks under no_grad and is left out."""
    lengths = []
    hooks = [b.register_forward_pre_hook(
        lambda m, args: lengths.append(args[0].shape[1]) if torch.is_grad_enabled() else None)
        for b in blocks]
    try:
        yield lengths
    finally:
        for h in hooks:
            h.remove()


def removed_ratio(lengths, num_patches):
    """The fraction of token-layers removed: 1 - sum(lengths) / (depth * (1 + M))."""
    return 1.0 - sum(lengths) / (len(lengths) * (1 + num_patches))


def matching_tome_r(num_patches, depth, ratio):
    """The ToMe r whose removed token-layer ratio comes closest to `ratio`."""
    return min(range(num_patches // 2 + 1), key=lambda r: abs(ratio - removed_ratio(
        token_counts(num_patches, depth, PruneConfig(method="tome", tome_r=r)), num_patches)))


def resident(module):
    """The parameters and buffers: held whatever the batch, so not activations."""
    return [*module.parameters(), *module.buffers()]


def train_step_figures(loss_fn, module, blocks, batch):
    """One instrumented training step (forward + backward) at `batch`: its FLOPs, the bytes saved
    for backward, and the sequence length entering each of `blocks`."""
    module.train()
    with flop_counter_mode() as flops:
        with layer_lengths(blocks) as lengths, saved_tensor_bytes(resident(module)) as saved:
            loss = loss_fn(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return dict(train_flops=flops.get_total_flops(), act_bytes=sum(saved.values()),
                lengths=lengths)


def cuda_step_peak(loss_fn, module, batch, device):
    """Peak CUDA memory of a training step above what was allocated before it: activations,
    gradients and kernel workspace."""
    module.train()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss_fn(batch).backward()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    module.zero_grad(set_to_none=True)
    return peak


def step_seconds(loss_fn, module, batch, device, optimizer=None):
    """Wall time of one training step: forward + backward, and the optimizer's update when one
    is given (the method comparisons leave it out: it is the same for every method)."""
    module.train()
    sync(device)
    start = time.perf_counter()
    loss_fn(batch).backward()
    if optimizer is not None:
        optimizer.step()
    sync(device)
    seconds = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return seconds


def timed_rounds(steps, batch, device, warmup, reps):
    """{name: [seconds of reps training steps]} for steps {name: (loss_fn, module)}, taking turns
    round by round with the order rotated every round, after `warmup` untimed rounds: a load
    that drifts during the run weighs on every entry alike."""
    names, times = list(steps), {name: [] for name in steps}
    for rnd in range(warmup + reps):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            seconds = step_seconds(*steps[name], batch, device)
            if rnd >= warmup:
                times[name].append(seconds)
    return times


# ---- what is measured: the ViT alone, the whole model ----------------------------------
def method_prune_configs(cfg, num_patches, depth):
    """{method: PruneConfig}, `none` first (the reference): --prune's schedule, ToMe's r matched
    to elip's removed token-layers unless --match_tome_r false, and in_eval so that the
    inference forward reduces tokens too."""
    sched = dataclasses.replace(cfg.prune, in_eval=True)
    r = sched.tome_r
    if cfg.match_tome_r:
        elip = token_counts(num_patches, depth, dataclasses.replace(sched, method="elip"))
        r = matching_tome_r(num_patches, depth, removed_ratio(elip, num_patches))
    order = ["none"] + [m for m in cfg.methods if m != "none"]
    return {m: dataclasses.replace(sched, method=m, tome_r=r) for m in order}


def vit_inputs(cfg, mc, batch, device):
    """Random images and a random text [CLS] (read by the text-guided methods only), the same for
    every method."""
    g = torch.Generator().manual_seed(cfg.seed + batch)
    images = torch.randn(batch, 3, mc.img_size, mc.img_size, generator=g)
    return images.to(device), torch.randn(batch, mc.vision_width, generator=g).to(device)


def build_vit_bench(cfg, prune, device):
    """(module, blocks, loss_fn, inference_flops) for the arch's online ViT alone. The loss is
    the mean of the output tokens, so every token that reaches the end gets a gradient."""
    mc = bench_model_config(cfg, prune)
    torch.manual_seed(cfg.seed)
    vit = build_vit(mc, prune).to(device)
    inputs = {}

    def loss_fn(batch):
        if batch not in inputs:
            inputs[batch] = vit_inputs(cfg, mc, batch, device)
        return vit(*inputs[batch]).mean()

    def inference_flops(batch):
        vit.eval()
        with torch.no_grad(), flop_counter_mode() as flops:
            vit(*vit_inputs(cfg, mc, batch, device))
        vit.train()
        return flops.get_total_flops()

    return vit, vit.blocks, loss_fn, inference_flops


def build_model_bench(cfg, prune, device):
    """(module, blocks, loss_fn, None) for the whole pre-training model: random images and texts
    without padding, loss = the sum of its losses, the step's momentum update and queue write
    included; blocks are the online ViT's."""
    mc = bench_model_config(cfg, prune)
    torch.manual_seed(cfg.seed)
    model = ELIPModel(mc).to(device)
    inputs = {}

    def loss_fn(batch):
        if batch not in inputs:
            images, _ = vit_inputs(cfg, mc, batch, device)
            g = torch.Generator().manual_seed(cfg.seed + batch)
            ids = torch.randint(5, cfg.whole_vocab, (batch, cfg.text_len), generator=g)
            ids[:, 0] = mc.cls_id
            inputs[batch] = dict(image=images, text_ids=ids.to(device),
                                 text_mask=torch.ones_like(ids).to(device))
        out = model(inputs[batch], alpha=0.4)
        model.momentum_step([out.pop("queue")] if "queue" in out else [])   # EMA, queue write
        return out["loss"]

    return model, model.visual_encoder.blocks, loss_fn, None


RATIO_KEYS = ("train_flops", "infer_flops", "act_bytes", "cuda_peak_bytes", "step_s")


def measure_methods(cfg, build, batch, device, num_patches, prunes, scope):
    """Every figure of every method in `prunes`, measured with build(cfg, prune, device), and
    each figure's ratio to `none`. All the models stay built for the timed rounds."""
    results, steps = {}, {}
    for method, prune in prunes.items():
        log(f"[{scope}] {method}: building; FLOPs, saved bytes, lengths")
        module, blocks, loss_fn, inference_flops = build(cfg, prune, device)
        torch.manual_seed(cfg.seed)
        fig = train_step_figures(loss_fn, module, blocks, batch)
        fig["token_counts"] = token_counts(num_patches, len(blocks), prune)
        fig["lengths_match_token_counts"] = fig["lengths"] == fig["token_counts"]
        fig["removed_ratio"] = removed_ratio(fig["lengths"], num_patches)
        if inference_flops is not None:
            fig["infer_flops"] = inference_flops(batch)
        if device.type == "cuda":
            fig["cuda_peak_bytes"] = cuda_step_peak(loss_fn, module, batch, device)
        fig["prune"] = dataclasses.asdict(prune)
        results[method], steps[method] = fig, (loss_fn, module)
    log(f"[{scope}] timing {cfg.warmup} + {cfg.reps} rounds of one step per method")
    for method, times in timed_rounds(steps, batch, device, cfg.warmup, cfg.reps).items():
        results[method].update(step_s=statistics.median(times), step_s_all=times)
    for fig in results.values():
        fig["ratio"] = {k: fig[k] / results["none"][k] for k in RATIO_KEYS if k in fig}
        # the median of the ratios within a round, steadier than the ratio of the medians when
        # the load of the machine drifts
        fig["ratio"]["step_s_paired"] = statistics.median(
            a / b for a, b in zip(fig["step_s_all"], results["none"]["step_s_all"]))
    return results


# ---- Table 1's comparison: a whole training step at full size -------------------------
def gpu_step_config(cfg):
    """cfg set to --gpu_step's preset at its own size: its image side, text length and queue,
    BERT's vocabulary, the paper's per-GPU batch (or --gpu_batch)."""
    arch = MODEL_PRESETS[cfg.gpu_step]
    vocab = BERT_VOCAB + (len(BLIP_TOKENS) if arch.get("blip_tokens") else 0)
    return dataclasses.replace(cfg, arch=cfg.gpu_step, img_size=0, text_len=arch["max_len"],
                               whole_vocab=vocab, whole_queue=arch["queue_size"],
                               whole_batch=cfg.gpu_batch or PAPER_BATCH[cfg.gpu_step])


def measure_gpu_step(cfg, prune, device):
    """Seconds per training step (forward, backward, AdamW's update, the momentum encoders' EMA
    and the queue write) after cfg.warmup untimed steps, and the peak of CUDA memory over the
    timed ones: weights, gradients, AdamW's state, momentum encoders, queue and activations, all
    a GPU holds for training (None on a CPU)."""
    model, _, loss_fn, _ = build_model_bench(cfg, prune, device)
    optimizer = trainer.build_optimizer(model, 1e-4, 0.02)   # its values do not change its cost
    for _ in range(cfg.warmup):
        step_seconds(loss_fn, model, cfg.whole_batch, device, optimizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step_seconds(loss_fn, model, cfg.whole_batch, device, optimizer)
             for _ in range(cfg.reps)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(step_s=statistics.median(times), step_s_all=times, peak_bytes=peak)


def run_gpu_step(cfg):
    """--gpu_step: `none` and then `elip` (one model on the GPU at a time: two would not fit at
    the paper's batch), fp32 with TF32 matmuls as the presets train (trainer.setup_process),
    and elip's ratios to none beside the paper's."""
    device = pick_device(cfg)
    if device.type != "cuda" and cfg.device == "auto":
        raise SystemExit("error: --gpu_step needs a CUDA GPU (--device cpu runs the same step "
                         "on the CPU, without the memory figure)")
    trainer.setup_process(trainer.RunConfig(seed=cfg.seed, threads=cfg.threads), 0, device)
    step_cfg = gpu_step_config(cfg)
    results = {}
    for method in ("none", "elip"):
        log(f"[gpu step] {method}: building; {cfg.warmup} + {cfg.reps} steps")
        results[method] = measure_gpu_step(step_cfg, dataclasses.replace(cfg.prune, method=method),
                                           device)
    ratio = {k: None if results["none"][k] is None else results["elip"][k] / results["none"][k]
             for k in ("step_s", "peak_bytes")}
    paper = TABLE1[cfg.gpu_step]
    report = dict(config=dataclasses.asdict(step_cfg),
                  model_config=dataclasses.asdict(bench_model_config(step_cfg, cfg.prune)),
                  machine=machine_info(device),
                  tf32=device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
                  gpu_step=results, ratio=ratio,
                  paper=dict(table1=paper, step_s=paper["elip"][0] / paper["none"][0],
                             peak_bytes=paper["elip"][1] / paper["none"][1]))
    report["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def format_gpu_step(report):
    """The two methods' seconds per step and peak memory, elip / none, and the paper's ratios."""
    cfg, mc, machine, paper = (report["config"], report["model_config"], report["machine"],
                               report["paper"])
    t1 = paper["table1"]

    def row(name, step, peak, digits):
        cells = [f"{x:10.{digits}f}" if x is not None else f"{'-':>10}" for x in (step, peak)]
        return f"{name:<12}" + "".join(cells)

    gib = {m: None if f["peak_bytes"] is None else f["peak_bytes"] / 2 ** 30
           for m, f in report["gpu_step"].items()}
    return "\n".join([
        f"training step of the {cfg['arch']} preset's whole model: {mc['img_size']} px, text "
        f"{mc['text_layers']} + fusion {mc['fusion_layers']} layers, losses "
        f"{'+'.join(mc['losses'])}, vocabulary {mc['vocab_size']}, queue {mc['queue_size']};",
        f"batch {cfg['whole_batch']}, fp32 (TF32 matmuls {'on' if report['tf32'] else 'off'}), "
        f"AdamW; forward, backward and update",
        f"on {machine['device']} ({machine['gpu'] or machine['processor']}), torch "
        f"{machine['torch']}; medians of {cfg['reps']} steps after {cfg['warmup']} warm-up",
        f"{'':<12}{'s/step':>10}{'peak GiB':>10}",
        *(row(m, f["step_s"], gib[m], 3) for m, f in report["gpu_step"].items()),
        row("elip / none", report["ratio"]["step_s"], report["ratio"]["peak_bytes"], 3),
        row("paper", paper["step_s"], paper["peak_bytes"], 2)
        + f"   Table 1: {t1['elip'][0]} / {t1['none'][0]} min per epoch, {t1['elip'][1]} / "
          f"{t1['none'][1]} GB on 4 GPUs",
        "peak: torch.cuda.max_memory_allocated over the timed steps (weights, gradients, AdamW "
        "state, momentum encoders, queue, activations);",
        "the paper's time is a whole epoch's, data loading included"])


# ---- the report ------------------------------------------------------------------------
def format_methods(results):
    """A table of one scope's figures, each with its ratio to `none`, then the lengths."""
    cols = [("train GFLOP", "train_flops", 1e-9), ("infer GFLOP", "infer_flops", 1e-9),
            ("act MiB", "act_bytes", 2 ** -20), ("cuda MiB", "cuda_peak_bytes", 2 ** -20),
            ("step s", "step_s", 1.0)]
    cols = [c for c in cols if c[1] in results["none"]]
    head = f"{'method':<12}" + "".join(f"{name:>13}{'x none':>8}" for name, _, _ in cols) + \
        f"{'paired':>8}{'removed':>9}"
    lines = [head]
    for method, fig in results.items():
        row = f"{method:<12}" + "".join(f"{fig[k] * scale:13.2f}{fig['ratio'][k]:8.3f}"
                                        for _, k, scale in cols)
        lines.append(row + f"{fig['ratio']['step_s_paired']:8.3f}{fig['removed_ratio']:9.3f}")
    lines.append("sequence length entering each layer (grad-enabled pass), and whether it equals "
                 "pruning.token_counts:")
    for method, fig in results.items():
        same = fig["lengths_match_token_counts"]
        lines.append(f"  {method:<12}{' '.join(map(str, fig['lengths']))}  "
                     + ("= token_counts" if same else f"!= token_counts {fig['token_counts']}"))
    return lines


def format_bench(report):
    cfg, machine, mc = report["config"], report["machine"], report["model_config"]
    prune = cfg["prune"]
    lines = [f"efficiency on {machine['device']} ({machine['processor']}), {machine['threads']} "
             f"threads, torch {machine['torch']}; medians of {cfg['reps']} steps after "
             f"{cfg['warmup']} warm-up; memory = bytes saved for backward (parameters excluded)",
             f"load average (1, 5, 15 min) at start {machine['load_start']}, at end "
             f"{machine['load_end']} (this run accounts for about {machine['threads']})",
             f"schedule {tuple(prune['prune_layers'])} keep {tuple(prune['keep_ratios'])} lam "
             f"{prune['lam']} merge {prune['merge']} for {', '.join(pruning.SCORERS)}; "
             f"tome r = {report['tome_r']}",
             "",
             f"ViT alone ({cfg['arch']} architecture): {mc['img_size']} px, patch "
             f"{mc['patch_size']}, width {mc['vision_width']}, depth {mc['vision_depth']}, "
             f"heads {mc['vision_heads']}, drop_path {mc['drop_path']}, batch {cfg['batch']}"]
    lines += format_methods(report["vit"])
    if "whole_model" in report:
        lines += ["", f"whole model (ELIPModel): text {mc['text_layers']} + fusion "
                      f"{mc['fusion_layers']} layers, width {mc['text_width']}, losses "
                      f"{'+'.join(mc['losses'])}; queue {mc['queue_size']} and vocabulary "
                      f"{mc['vocab_size']} (small, to keep it fast), text length "
                      f"{cfg['text_len']}; batch {cfg['whole_batch']}"]
        lines += format_methods(report["whole_model"])
    return "\n".join(lines)


def run_bench(cfg):
    """Every measurement of the report, as a JSON-ready dict."""
    device = pick_device(cfg)
    mc = bench_model_config(cfg, PruneConfig(method="none"))
    num_patches = (mc.img_size // mc.patch_size) ** 2
    prunes = method_prune_configs(cfg, num_patches, mc.vision_depth)
    report = dict(config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mc),
                  tome_r=prunes["none"].tome_r, machine=machine_info(device))
    report["vit"] = measure_methods(cfg, build_vit_bench, cfg.batch, device, num_patches,
                                    prunes, "vit")
    if cfg.whole_model:
        report["whole_model"] = measure_methods(cfg, build_model_bench, cfg.whole_batch, device,
                                                num_patches, prunes, "whole model")
    report["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def write_report(text: str, report: dict, out: str):
    """Print the table, write the figures as JSON to `out`, and say where."""
    print(text)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")


def main(argv):
    cfg, _ = parse_config(BenchConfig(), argv, PRESETS, doc=__doc__)
    if cfg.gpu_step:
        report = run_gpu_step(cfg)
        write_report(format_gpu_step(report), report, cfg.out)
    else:
        report = run_bench(cfg)
        write_report(format_bench(report), report, cfg.out)


if __name__ == "__main__":
    main(sys.argv[1:])
