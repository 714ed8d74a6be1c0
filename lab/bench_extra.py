"""
The efficiency benchmark's research extras, on bench.py's models, inputs and instruments (its
flags are this script's --bench.* flags; any unambiguous suffix works, e.g. --arch, --batch):
  ELIP+   (paper section 4.5) for every method of --methods: the largest batch whose training
          step saves no more activation bytes than `none` at --batch; on the ViT alone and,
          with --whole_model true, on the whole pre-training model
  op      the forward + backward time of pruning.prune_and_merge at each cut of the elip
          schedule, as a share of an elip ViT training step
  timm    training steps of our ViT against timm's VisionTransformer of the same size (no
          pruning), taking turns round by round

    python -m lab.bench_extra                         # ViT-B/16 at 224 px, batch 8
    python -m lab.bench_extra --preset tiny           # a quick look, seconds
"""
import dataclasses
import functools
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import bench
from bench import BenchConfig, log
from config import parse_config
from model import build_vit
from pruning import PruneConfig, prune_and_merge, token_counts

try:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
except ImportError:                  # timm is optional: the comparison is then skipped
    TimmViT = None


@dataclass
class ExtraConfig:
    preset: str = "base"             # base: ViT-B/16 at 224 px; tiny: a quick look, seconds
    bench: BenchConfig = field(default_factory=BenchConfig)   # bench.py's flags
    elip_plus: bool = True           # the ELIP+ batch search of every method of --methods
    op_reps: int = 30                # timed runs of prune_and_merge at each cut (0: skip)
    timm_reps: int = 10              # timed steps of our ViT against timm's (0: skip)
    out: str = "out/bench_extra.json"   # the report, as JSON (--bench.out is not written)

    def __post_init__(self):
        if min(self.op_reps, self.timm_reps) < 0:
            raise ValueError("op_reps and timm_reps must be >= 0 (0: skip)")


PRESETS = {
    "base": dict(),
    "tiny": {"bench.preset": "tiny", "op_reps": 5, "timm_reps": 2},
}


# ---- ELIP+ (paper section 4.5) ---------------------------------------------------------
def activation_bytes(loss_fn, module, batch):
    """Bytes saved for backward by a training forward at `batch` (the backward is not needed)."""
    module.train()
    with bench.saved_tensor_bytes(bench.resident(module)) as saved:
        loss = loss_fn(batch)
    del loss                         # counted while its graph was alive; now let it go
    return sum(saved.values())


def elip_plus_batch(measure, budget, b1, b2, measured=None, min_batch=1):
    """The largest batch whose training-step activation memory fits in `budget` bytes.
    measure(batch) -> bytes; measured: {batch: bytes} already known.
    Fits memory = fixed + per_sample * batch on b1 and b2, solves it for the budget, then checks
    by measuring: steps down while the batch does not fit, up while the next one still does.
    Batches below min_batch are never measured; min_batch - 1 is returned if none fits."""
    measured = dict(measured or {})

    def at(b):
        if b not in measured:
            measured[b] = measure(b)
        return measured[b]

    per_sample = (at(b2) - at(b1)) / (b2 - b1)
    if per_sample <= 0:
        raise ValueError(f"memory does not grow with the batch: {measured}")
    fixed = at(b1) - per_sample * b1
    b = max(min_batch, int((budget - fixed) // per_sample))
    while b >= min_batch and at(b) > budget:
        b -= 1
    while at(b + 1) <= budget:
        b += 1
    return dict(batch=b, bytes=measured.get(b), budget=budget, per_sample_bytes=per_sample,
                fixed_bytes=fixed, measured=dict(sorted(measured.items())))


def elip_plus_methods(cfg, build, batch, device, prunes, min_batch=1):
    """{method: elip_plus_batch's answer} for every method of `prunes` (`none` first), built with
    build(cfg, prune, device); the budget is what `none` saves at `batch`. min_batch: the
    smallest batch the model can train on."""
    out = {}
    for method, prune in prunes.items():
        log(f"[ELIP+] {method}")
        module, _, loss_fn, _ = build(cfg, prune, device)
        measure = functools.partial(activation_bytes, loss_fn, module)
        at_batch = measure(batch)
        budget = at_batch if method == "none" else out["none"]["budget"]
        out[method] = elip_plus_batch(
            measure, budget, b1=batch // 2 if batch // 2 >= min_batch else batch + 1, b2=batch,
            measured={batch: at_batch}, min_batch=min_batch)
    return out


# ---- prune_and_merge's share of a step, and our ViT against timm's -----------------------
def elip_step_seconds(cfg, device):
    """The median time of an elip ViT training step, bench.py's way."""
    module, _, loss_fn, _ = bench.build_vit_bench(
        cfg, dataclasses.replace(cfg.prune, method="elip"), device)
    times = bench.timed_rounds({"elip": (loss_fn, module)}, cfg.batch, device, cfg.warmup,
                               cfg.reps)
    return statistics.median(times["elip"])


def bench_prune_and_merge(cfg, mc, device, reps):
    """Forward + backward time of pruning.prune_and_merge at --batch on the input of each cut of
    the elip schedule (random tokens and scores), the median of `reps` runs after 3 warm-up
    runs, and its share of an elip ViT training step: at each cut and summed over the cuts."""
    step_s = elip_step_seconds(cfg, device)
    M, D = (mc.img_size // mc.patch_size) ** 2, mc.vision_width
    elip = dataclasses.replace(cfg.prune, method="elip")
    counts = token_counts(M, mc.vision_depth, elip)
    g = torch.Generator().manual_seed(cfg.seed)
    cuts = []
    for layer, ratio in zip(elip.prune_layers, elip.keep_ratios):
        length, k = counts[layer - 1], int(M * ratio)
        if k >= length - 1:
            continue                 # the cut keeps every token: prune_and_merge does nothing
        x = torch.randn(cfg.batch, length, D, generator=g).to(device).requires_grad_()
        scores = torch.rand(cfg.batch, length - 1, generator=g).to(device)
        grad = torch.randn(cfg.batch, 1 + k + elip.merge, D, generator=g).to(device)
        times = []
        for rnd in range(3 + reps):
            bench.sync(device)
            start = time.perf_counter()
            prune_and_merge(x, scores, k, elip.merge)[0].backward(grad)
            bench.sync(device)
            if rnd >= 3:
                times.append(time.perf_counter() - start)
            x.grad = None
        seconds = statistics.median(times)
        cuts.append(dict(layer=layer, input_shape=[cfg.batch, length, D], num_keep=k,
                         seconds=seconds, share=seconds / step_s))
    return dict(cuts=cuts, reps=reps, step_s=step_s, share=sum(c["share"] for c in cuts))


def compare_with_timm(cfg, mc, device, reps):
    """Training steps of our ViT and timm's VisionTransformer of the same size (no pruning),
    taking turns after the warm-up rounds: FLOPs, parameters, median times and their ratio."""
    if TimmViT is None:
        return dict(skipped="timm is not installed")
    torch.manual_seed(cfg.seed)
    ours = build_vit(mc, PruneConfig(method="none")).to(device)
    timm_vit = TimmViT(img_size=mc.img_size, patch_size=mc.patch_size, embed_dim=mc.vision_width,
                       depth=mc.vision_depth, num_heads=mc.vision_heads, num_classes=0,
                       drop_path_rate=mc.drop_path).to(device)
    images, _ = bench.vit_inputs(cfg, mc, cfg.batch, device)
    runs = {"ours": (lambda b: ours(images).mean(), ours),
            "timm": (lambda b: timm_vit.forward_features(images).mean(), timm_vit)}
    out = {}
    for name, (loss_fn, module) in runs.items():
        with bench.flop_counter_mode() as flops:
            loss_fn(cfg.batch).backward()
        module.zero_grad(set_to_none=True)
        out[f"{name}_train_flops"] = flops.get_total_flops()
        out[f"{name}_params"] = sum(p.numel() for p in module.parameters())
    times = bench.timed_rounds(runs, cfg.batch, device, cfg.warmup, reps)
    out.update(ours_s=statistics.median(times["ours"]), timm_s=statistics.median(times["timm"]),
               ours_s_all=times["ours"], timm_s_all=times["timm"], reps=reps)
    out["ratio"] = out["ours_s"] / out["timm_s"]
    out["ratio_paired"] = statistics.median(a / b for a, b in zip(times["ours"], times["timm"]))
    return out


# ---- the report ------------------------------------------------------------------------
def format_extra(report):
    cfg = report["config"]["bench"]
    lines = [f"on {report['machine']['device']} ({report['machine']['processor']}), "
             f"{report['machine']['threads']} threads, torch {report['machine']['torch']}"]
    for scope, batch in (("vit", cfg["batch"]), ("whole_model", cfg["whole_batch"])):
        if scope in report.get("elip_plus", {}):
            lines += ["", f"ELIP+ ({scope}): the largest batch whose activations fit in what "
                          f"`none` saves at batch {batch}"]
            lines += [f"  {method:<12}{found['batch']:>6} vs {batch}"
                      for method, found in report["elip_plus"][scope].items()]
    if "prune_and_merge" in report:
        pm = report["prune_and_merge"]
        lines += ["", f"prune_and_merge, forward + backward at batch {cfg['batch']}, median of "
                      f"{pm['reps']}, as a share of the elip ViT training step "
                      f"({pm['step_s']:.3f} s):"]
        lines += [f"  before layer {c['layer']}: {tuple(c['input_shape'])} keep {c['num_keep']}: "
                  f"{c['seconds'] * 1e3:.3f} ms, {100 * c['share']:.3f}%" for c in pm["cuts"]]
        lines.append(f"  all cuts: {100 * pm['share']:.3f}%")
    t = report.get("timm")
    if t and "skipped" in t:
        lines += ["", f"timm comparison skipped: {t['skipped']}"]
    elif t:
        lines += ["", f"ViT training step, method none, ours vs timm (interleaved, median of "
                      f"{t['reps']}): {t['ours_s']:.3f} s vs {t['timm_s']:.3f} s, ratio "
                      f"{t['ratio']:.3f} (paired by round {t['ratio_paired']:.3f}); GFLOP "
                      f"{t['ours_train_flops'] / 1e9:.1f} vs {t['timm_train_flops'] / 1e9:.1f}; "
                      f"params {t['ours_params']:,} vs {t['timm_params']:,}"]
    return "\n".join(lines)


def run_extra(cfg):
    """Every measurement of the report, as a JSON-ready dict."""
    b = cfg.bench
    device = bench.pick_device(b)
    mc = bench.bench_model_config(b, PruneConfig(method="none"))
    prunes = bench.method_prune_configs(b, (mc.img_size // mc.patch_size) ** 2, mc.vision_depth)
    report = dict(config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mc),
                  machine=bench.machine_info(device))
    if cfg.elip_plus:
        report["elip_plus"] = dict(vit=elip_plus_methods(b, bench.build_vit_bench, b.batch,
                                                         device, prunes))
        if b.whole_model:
            report["elip_plus"]["whole_model"] = elip_plus_methods(
                b, bench.build_model_bench, b.whole_batch, device, prunes, min_batch=2)
    if cfg.op_reps:
        log("prune_and_merge's share of the training step")
        report["prune_and_merge"] = bench_prune_and_merge(b, mc, device, cfg.op_reps)
    if cfg.timm_reps:
        log("our ViT against timm's")
        report["timm"] = compare_with_timm(b, mc, device, cfg.timm_reps)
    return report


def main(argv):
    cfg, _ = parse_config(ExtraConfig(), argv, PRESETS, doc=__doc__)
    if cfg.bench.gpu_step:
        raise SystemExit("error: --gpu_step is bench.py's own measurement: run python bench.py "
                         f"--gpu_step {cfg.bench.gpu_step}")
    report = run_extra(cfg)
    bench.write_report(format_extra(report), report, cfg.out)


if __name__ == "__main__":
    main(sys.argv[1:])
