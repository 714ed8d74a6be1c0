"""
Experiments of several runs, each one command; every run is a subprocess of train_downstream.py,
train_pretrain.py or lab.analysis in its own folder under --out_dir, and a run whose result file
exists is not run again, so a command that stopped continues where it was. One check trains in
this process instead (pooled, a few minutes).

    python -m lab.experiments transfer   # each world task fine-tuned from the pre-training
                                         # checkpoint and from scratch, 3 seeds each
    python -m lab.experiments guidance   # text guidance's test on the clutter world: elip (lam 0.8,
                                         # 0.6, 1.0), evit, random, none; 3 seeds each
    python -m lab.experiments speed --base REV   # the default run of this code and of an older
                                         # revision (git), side by side: time and R mean
    python -m lab.experiments pooled     # what the tiny ViT learns from scratch when told
                                         # directly which shapes, colours, places a scene holds
    python -m lab.experiments transfer --help   # every flag

Figures are printed as the mean and the sample standard deviation over the seeds (mean ± sd),
and written with each seed's value to out_dir/summary.json.
"""
import io
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import world
from config import parse_config, run_subcommand
from lab import probes
from model import ModelConfig, build_vit
from pruning import PruneConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # where the runs start


def log(msg):
    print(msg, flush=True)


def run(cmd, out_dir, result, log_name, threads, dry_run):
    """Run `cmd` (a script or -m module, and its flags) unless out_dir/result exists; its output
    goes to out_dir/log_name. Returns the seconds it took (0 when skipped)."""
    cmd = [sys.executable, *cmd]
    if os.path.exists(os.path.join(out_dir, result)):
        log(f"done already: {os.path.join(out_dir, result)}")
        return 0.0
    log("$ " + shlex.join(["python", *cmd[1:]]))
    if dry_run:
        return 0.0
    os.makedirs(out_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}     # BLAS and torch alike
    t0 = time.time()
    with open(os.path.join(out_dir, log_name), "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: the run failed (exit {proc.returncode}): see "
                         f"{os.path.join(out_dir, log_name)}")
    log(f"  {time.time() - t0:.0f} s")
    return time.time() - t0


def spread(values):
    """{mean, sd (sample standard deviation; 0 for one value), values}."""
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "values": values}


def fmt(s, digits):
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def write_summary(out_dir, summary, table):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log("\n" + table)
    log(f"wrote {os.path.join(out_dir, 'summary.json')}")


# ---- transfer: pre-trained against from scratch, on every downstream task of the world ----
@dataclass
class TransferConfig:
    preset: str = "full"             # full | quick (a small run that checks the harness)
    pretrained: str = "out/pretrain/checkpoint.pt"   # the pre-trained row's checkpoint
    tasks: tuple[str, ...] = ("retrieval", "vqa", "nlvr", "ve", "caption")  # the tasks fine-tuned
    seeds: tuple[int, ...] = (0, 1, 2)   # fine-tuning seeds (head and from-scratch weights, data
                                     # order, crops)
    epochs: int = 0                  # of every task; 0: the task's preset (train_downstream.py)
    max_steps: int = 0               # per run; 0: all the epochs
    world_train: int = 0             # the world's training scenes; 0: the task's preset
    world_test: int = 0              # and test scenes; 0: the task's preset
    threads: int = 1                 # per run
    out_dir: str = "out/transfer"    # every run's out_dir under it, and the summary
    dry_run: bool = False            # print the commands, run nothing


TRANSFER_PRESETS = {"full": {}, "quick": dict(tasks=("vqa",), seeds=(0, 1), max_steps=20)}
# the figures of each task: (name, key in metrics.json, digits)
HEADLINE = {
    "retrieval": [("R mean", "r_mean", 2), ("R mean, ITC only", "itc.r_mean", 2)],
    "vqa": [("VQA score", "vqa_score", 3)],
    "nlvr": [("accuracy", "accuracy", 3)],
    "ve": [("accuracy", "accuracy", 3)],
    "caption": [("CIDEr-D, greedy", "greedy_cider_d", 3), ("BLEU-4, greedy", "greedy_bleu4", 3),
                ("CIDEr-D, beam", "beam_cider_d", 3)],
}
# VQA question kinds, by their first words (world.QUESTIONS)
VQA_KINDS = {"what color": "colour", "what shape": "shape", "how many": "count",
             "is there": "exists", "where is": "where", "what size": "size"}


def question_kind(question):
    kind = next((k for p, k in VQA_KINDS.items() if question.startswith(p)), None)
    return kind or ("left" if " to the left of " in question else "above")


def accuracy_by_kind(run_dir, judge):
    """{kind: accuracy} of a run on the world from its predictions.json, judge(prediction) giving
    (kind, right)."""
    with open(os.path.join(run_dir, "predictions.json")) as f:
        preds = json.load(f)["world"]
    hits = {}
    for kind, right in map(judge, preds):
        hits.setdefault(kind, []).append(right)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def vqa_by_kind(run_dir, rec):
    """{question kind: accuracy} of a VQA run on the world."""
    cfg = rec["config"]
    entries = world.world_entries("vqa", "test", cfg["world_test"], cfg["world_seed"])
    truth = {e["question_id"]: (question_kind(e["question"]), e["answer"][0]) for e in entries}
    return accuracy_by_kind(run_dir, lambda p: (truth[p["question_id"]][0],
                                                p["answer"] == truth[p["question_id"]][1]))


# NLVR2 statement kinds: the world.STATEMENTS template a statement was said from, each slot
# matching only its own words ("a {colour} {shape}" must not match "a red object")
SLOT_WORDS = {"colour": world.COLOURS, "shape": world.SHAPES, "side": ("left", "right"),
              "n": world.NUMBERS, "k": world.NUMBERS, "m": world.NUMBERS}


def statement_kind(sentence):
    for template, _ in world.STATEMENTS:
        # (the templates are words and slots only: nothing to escape)
        pattern = re.sub(r"\{(\w+)\}", lambda s: f"({'|'.join(SLOT_WORDS[s[1]])})", template)
        if re.fullmatch(re.sub(r"\ba (?=\()", "an? ", pattern), sentence):
            return template
    raise ValueError(f"not a statement of the world: {sentence!r}")


def nlvr_by_kind(run_dir):
    """{statement template: accuracy} of an NLVR2 run on the world."""
    return accuracy_by_kind(run_dir, lambda p: (statement_kind(p["sentence"]),
                                                p["prediction"] == p["label"]))


def lookup(metrics, key):
    for part in key.split("."):
        metrics = metrics[part]
    return metrics


def transfer_runs(cfg):
    """[(task, row, seed, out_dir, command)] with row "pre-trained" or "from scratch"."""
    runs = []
    for task in cfg.tasks:
        for row, source in (("pre-trained", cfg.pretrained), ("from scratch", "none")):
            for seed in cfg.seeds:
                out = os.path.join(cfg.out_dir, task, "scratch" if source == "none" else "pretrained",
                                   f"seed{seed}")
                cmd = ["train_downstream.py", "--task", task, "--pretrained", source,
                       "--seed", str(seed), "--threads", str(cfg.threads), "--out_dir", out]
                # from scratch: the pre-trained checkpoint's architecture, untrained
                cmd += ["--scratch_like", cfg.pretrained] if source == "none" else []
                for flag in ("epochs", "max_steps", "world_train", "world_test"):
                    if getattr(cfg, flag):
                        cmd += [f"--{flag}", str(getattr(cfg, flag))]
                runs.append((task, row, seed, out, cmd))
    return runs


def summarise_transfer(cfg, runs):
    """The summary (per task, figure and row: mean, sd, values) and its table."""
    results = {}
    for task, row, seed, out, _ in runs:
        with open(os.path.join(out, "metrics.json")) as f:
            rec = json.load(f)
        metrics = rec["test"]["world"]["metrics"]        # the world's test split
        figures = {name: lookup(metrics, key) for name, key, _ in HEADLINE[task]}
        if task == "vqa":
            figures.update({f"VQA {k} questions, accuracy": v
                            for k, v in vqa_by_kind(out, rec).items()})
        if task == "nlvr":
            figures.update({f"NLVR2 '{k}'": v for k, v in nlvr_by_kind(out).items()})
        for name, value in figures.items():
            results.setdefault(task, {}).setdefault(name, {}).setdefault(row, []).append(value)
    digits = {name: d for figures in HEADLINE.values() for name, _, d in figures}
    w = max(len(name) for figures in results.values() for name in figures) + 2     # the column
    lines = [f"fine-tuning from {cfg.pretrained} and from scratch (--pretrained none), seeds "
             f"{', '.join(map(str, cfg.seeds))}: mean ± sd",
             f"{'task':<10}{'figure':<{w}}{'pre-trained':>18}{'from scratch':>18}"
             f"{'difference':>12}"]
    summary = {"config": asdict(cfg), "tasks": {}}
    for task, figures in results.items():
        for name, rows in figures.items():
            s = {row: spread(v) for row, v in rows.items()}
            summary["tasks"].setdefault(task, {})[name] = s
            d = digits.get(name, 3)
            diff = s["pre-trained"]["mean"] - s["from scratch"]["mean"]
            lines.append(f"{task:<10}{name:<{w}}{fmt(s['pre-trained'], d):>18}"
                         f"{fmt(s['from scratch'], d):>18}{diff:>+12.{d}f}")
    return summary, "\n".join(lines)


def transfer_main(argv):
    cfg, _ = parse_config(TransferConfig(), argv, TRANSFER_PRESETS, doc=TRANSFER_DOC)
    bad = set(cfg.tasks) - set(HEADLINE)
    if bad or not cfg.seeds:
        raise SystemExit(f"error: tasks {sorted(bad)} unknown (choose from {', '.join(HEADLINE)}), "
                         f"or no seeds")
    if not cfg.dry_run and not os.path.isfile(cfg.pretrained):
        raise SystemExit(f"error: --pretrained {cfg.pretrained} does not exist (make one with "
                         f"python train_pretrain.py)")
    runs = transfer_runs(cfg)
    for _, _, _, out, cmd in runs:
        run(cmd, out, "metrics.json", "run.log", cfg.threads, cfg.dry_run)
    if not cfg.dry_run:
        write_summary(cfg.out_dir, *summarise_transfer(cfg, runs))


# ---- guidance: does the text steer the pruning where it matters? --------------------------
@dataclass
class GuidanceConfig:
    preset: str = "full"             # full | quick (a small run that checks the harness)
    methods: tuple[str, ...] = ("elip", "evit", "random", "none")  # pruning methods trained
    lams: tuple[float, ...] = (0.8, 0.6, 1.0)   # elip is trained once per lam (Eq. 1; 1.0 is the
                                     # image [CLS] alone, the look-ahead kept)
    seeds: tuple[int, ...] = (0, 1, 2)  # the runs' seeds
    init_from: str = "out/pretrain/checkpoint.pt"   # every run continues pre-training from this
                                     # checkpoint (the default run's, which knows the world's
                                     # words and shapes) on the clutter world; empty: from scratch
    keep_ratios: tuple[float, ...] = (0.5, 0.3, 0.15)   # of the 64 patches, before layers 2, 4
                                     # and 10: 32, 19 and 9 patches for every method but none
    world_train: int = 1600          # clutter scenes in the training split
    epochs: int = 2                  # (100 steps of 32)
    batch_size: int = 32             # per step
    world_test: int = 100            # test scenes for zero-shot retrieval
    keep_scenes: int = 60            # test scenes (x 5 captions) for the keep fractions
    cover: float = 0.25              # a patch belongs to an object covering this much of it (a
                                     # small object spans 2x2 patches, about a quarter of each)
    threads: int = 1                 # per run
    out_dir: str = "out/guidance"    # every run's out_dir under it, and the summary
    dry_run: bool = False            # print the commands, run nothing


GUIDANCE_PRESETS = {"full": {}, "quick": dict(methods=("elip", "random"), lams=(0.8,),
                                              seeds=(0,), world_train=320, epochs=1,
                                              world_test=50, keep_scenes=20)}


def guidance_rows(cfg):
    """[(label, method, lam)]: elip once per lam, the others once."""
    return [(f"elip lam {lam}", "elip", lam) for lam in cfg.lams if "elip" in cfg.methods] + \
        [(m, m, cfg.lams[0]) for m in cfg.methods if m != "elip"]


def guidance_runs(cfg):
    """[(label, method, lam, seed, out_dir, pre-training command, keep command or None)]."""
    runs = []
    ratios = ",".join(map(str, cfg.keep_ratios))
    for label, method, lam in guidance_rows(cfg):
        for seed in cfg.seeds:
            out = os.path.join(cfg.out_dir, label.replace(" ", "_"), f"seed{seed}")
            train = ["train_pretrain.py", "--world_variant", "clutter", "--world_train",
                     str(cfg.world_train), "--world_test", str(cfg.world_test), "--epochs",
                     str(cfg.epochs), "--batch_size", str(cfg.batch_size), "--prune.method",
                     method, "--lam", str(lam), "--keep_ratios", ratios, "--seed", str(seed),
                     "--threads", str(cfg.threads), "--out_dir", out]
            train += ["--init_from", cfg.init_from] if cfg.init_from else []
            # the trained method's own choice, elip at every lam of the experiment
            keep = None if method == "none" else [
                "-m", "lab.analysis", "keep", "--checkpoint", os.path.join(out, "checkpoint.pt"),
                "--methods", method, "--lams", ",".join(map(str, (lam, *[x for x in cfg.lams
                                                                        if x != lam]))),
                "--scenes", str(cfg.keep_scenes), "--cover", str(cfg.cover), "--seed",
                str(seed), "--threads", str(cfg.threads), "--out", os.path.join(out, "keep.json")]
            runs.append((label, method, lam, seed, out, train, keep))
    return runs


def summarise_guidance(cfg, runs):
    rows, keep_rows, oracle = {}, {}, None
    for label, method, lam, seed, out, _, keep in runs:
        with open(os.path.join(out, "zero_shot.json")) as f:
            z = json.load(f)
        oracle = z["oracle"]["r_mean"]
        r = rows.setdefault(label, {})
        for name, value in (("R mean", z["zero_shot_retrieval"]["r_mean"]),
                            ("R mean, ITC only", z["zero_shot_retrieval"]["itc"]["r_mean"]),
                            ("train seconds", z["train_seconds"])):
            r.setdefault(name, []).append(value)
        if keep is None:
            continue
        with open(os.path.join(out, "keep.json")) as f:
            report = json.load(f)
        for row in report["rows"]:      # the trained method; elip also at the other lams
            name = label if row["label"] in (label, f"elip lam {lam}") else \
                f"{label} model, {row['label']}"
            k = keep_rows.setdefault(name, {})
            for s in row["stages"]:
                for group in ("named", "other", "all"):
                    k.setdefault(f"{group} {s['layer']}", []).append(s[group])
    rows = {label: {n: spread(v) for n, v in r.items()} for label, r in rows.items()}
    keep_rows = {label: {n: spread(v) for n, v in r.items()} for label, r in keep_rows.items()}
    layers = sorted({int(n.split()[1]) for r in keep_rows.values() for n in r})
    start = f"from {cfg.init_from}" if cfg.init_from else "from scratch"
    lines = [f"clutter world, {start}, {cfg.world_train} scenes x {cfg.epochs} epochs, keep ratios "
             f"{', '.join(map(str, cfg.keep_ratios))}, seeds {', '.join(map(str, cfg.seeds))}: "
             f"mean ± sd",
             f"zero-shot retrieval on {cfg.world_test} test scenes (the oracle's R mean: "
             f"{oracle:.2f})",
             f"{'trained with':<18}{'R mean':>16}{'R mean, ITC':>16}{'train s':>10}"]
    for label, r in rows.items():
        lines.append(f"{label:<18}{fmt(r['R mean'], 2):>16}{fmt(r['R mean, ITC only'], 2):>16}"
                     f"{r['train seconds']['mean']:>10.0f}")
    lines += ["", f"kept fraction of the named objects' / the other objects' / all patches "
              f"entering each cut ({cfg.keep_scenes} test scenes x 5 captions, cover "
              f"{cfg.cover})", f"{'':<34}" + "".join(f"{'layer ' + str(i):^42}" for i in layers)]
    for label, k in keep_rows.items():
        lines.append(f"{label:<34}" + "".join(
            f"{fmt(k[f'named {i}'], 3):>14}{fmt(k[f'other {i}'], 3):>14}{fmt(k[f'all {i}'], 3):>14}"
            for i in layers))
    summary = {"config": asdict(cfg), "oracle_r_mean": oracle, "retrieval": rows,
               "keep": keep_rows}
    return summary, "\n".join(lines)


def guidance_main(argv):
    cfg, _ = parse_config(GuidanceConfig(), argv, GUIDANCE_PRESETS, doc=GUIDANCE_DOC)
    if cfg.init_from and not cfg.dry_run and not os.path.isfile(cfg.init_from):
        raise SystemExit(f"error: --init_from {cfg.init_from} does not exist (make it with "
                         f"python train_pretrain.py, or give --init_from '' to start from scratch)")
    runs = guidance_runs(cfg)
    for _, _, _, _, out, train, keep in runs:
        run(train, out, "zero_shot.json", "run.log", cfg.threads, cfg.dry_run)
        if keep is not None:
            run(keep, out, "keep.json", "keep.log", cfg.threads, cfg.dry_run)
    if not cfg.dry_run:
        write_summary(cfg.out_dir, *summarise_guidance(cfg, runs))


# ---- speed: the default run of two code revisions, side by side -----------------------------
@dataclass
class SpeedConfig:
    preset: str = "full"             # full | quick (a small run that checks the harness)
    base: str = ""                   # the older revision (a git commit, tag or branch of this
                                     # repository), run beside the working tree
    reps: int = 1                    # runs of each; the order alternates (base first on even reps)
    max_steps: int = 0               # per run; 0: the whole default run
    threads: int = 0                 # --threads of every run (0: torch's default)
    out_dir: str = "out/speed"       # the runs and their timings


SPEED_PRESETS = {"full": {}, "quick": dict(max_steps=3)}     # quick: checks the harness


def revision_tree(rev, out_dir):
    """The files of revision `rev` of this repository (resolved to its commit), extracted once to
    out_dir/tree-<commit>: into a temporary folder first, so an interrupted extraction is redone."""
    proc = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: --base {rev} is not a revision of this repository: "
                         f"{proc.stderr.strip()}")
    tree = os.path.join(out_dir, f"tree-{proc.stdout.strip()[:12]}")
    if not os.path.isdir(tree):
        archive = subprocess.run(["git", "-C", ROOT, "archive", proc.stdout.strip()],
                                 capture_output=True, check=True).stdout
        partial_tree = tree + ".partial"
        shutil.rmtree(partial_tree, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(partial_tree, filter="data")
        os.replace(partial_tree, tree)
    return tree


def timed_run(tree, out, cfg):
    """Run train_pretrain.py of `tree` into `out`: (wall seconds, CPU seconds of the process and
    its workers, the zero-shot record of its log)."""
    cmd = [sys.executable, "train_pretrain.py", "--out_dir", os.path.abspath(out)]
    cmd += ["--max_steps", str(cfg.max_steps)] if cfg.max_steps else []
    cmd += ["--threads", str(cfg.threads)] if cfg.threads else []
    log("$ (cd " + tree + " && " + shlex.join(["python", *cmd[1:]]) + ")")
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    wall, after = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"error: the run in {tree} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        zero_shot = [r for r in map(json.loads, f) if "zero_shot_retrieval" in r]
    if not zero_shot:
        raise SystemExit(f"error: the run in {tree} logged no zero-shot retrieval ({out})")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, zero_shot[-1]


def speed_main(argv):
    cfg, _ = parse_config(SpeedConfig(), argv, SPEED_PRESETS, doc=SPEED_DOC)
    if not cfg.base or cfg.reps < 1:
        raise SystemExit("error: give --base (a git revision of this repository) and reps >= 1")
    trees = {"base": revision_tree(cfg.base, cfg.out_dir), "this": ROOT}
    results = {name: [] for name in trees}
    for rep in range(cfg.reps):
        for name in (list(trees) if rep % 2 == 0 else list(trees)[::-1]):
            wall, cpu, z = timed_run(trees[name], os.path.join(cfg.out_dir, f"{name}{rep}"), cfg)
            r_mean = z["zero_shot_retrieval"]["r_mean"]
            results[name].append({"wall": wall, "cpu": cpu, "r_mean": r_mean,
                                  "chance": z["chance"]["r_mean"]})
            log(f"  {name}: {wall:.0f} s wall, {cpu:.0f} s CPU, R mean {r_mean:.2f}")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in results.items()}
    ratio = med["this"]["wall"] / med["base"]["wall"]
    table = "\n".join(
        [f"default run, {cfg.reps} rep(s) each, medians: base = {cfg.base}, this = the working tree"]
        + [f"{name:>5}: {m['wall']:.0f} s wall, {m['cpu']:.0f} s CPU, R mean {m['r_mean']:.2f} "
           f"({m['r_mean'] / m['chance']:.1f}x chance)" for name, m in med.items()]
        + [f"wall-clock ratio this / base: {ratio:.3f} ({abs(1 - ratio):.0%} "
           f"{'shorter' if ratio <= 1 else 'longer'})"])
    write_summary(cfg.out_dir, {"config": asdict(cfg), "runs": results, "median": med,
                                "wall_ratio": ratio}, table)


# ---- pooled: what the tiny ViT learns from scratch when told directly ---------------------
@dataclass
class PooledConfig:
    preset: str = "full"             # full | quick (a small run that checks the harness)
    steps: int = 900                 # about the default run's 935
    eval_every: int = 100            # steps between evaluations on the test scenes
    batch_size: int = 32             # per step
    lr: float = 5e-4                 # AdamW, constant; the default run's peak
    weight_decay: float = 0.02       # AdamW's
    depth: int = 12                  # the ViT's layers (the tiny preset's 12)
    init_std: float = 0.1            # the tiny preset's
    pool: str = "cls"                # what the labels are read from: cls (the [CLS] token, as ITC
                                     # reads an image) | mean (of the patch tokens)
    world_train: int = 6000          # scenes of the default world to train on
    world_test: int = 400            # and to test on (the test split)
    seed: int = 0                    # of the ViT's and the head's initial weights
    threads: int = 0                 # torch.set_num_threads (0: torch's default)
    out_dir: str = "out/pooled"      # the log and the result


POOLED_PRESETS = {"full": {}, "quick": dict(steps=30, eval_every=10, depth=2, world_train=200,
                                            world_test=100)}


def world_labels(w, split, n, transform):
    """The split's first n scenes: (n, 3, R, R) images as the evaluation sees them, (n, K)
    probes.scene_labels."""
    images = torch.stack([transform(data.load_image(w.path(split, i))) for i in range(n)])
    return images, torch.stack([probes.scene_labels(w.scene(split, i)) for i in range(n)])


def pooled_main(argv):
    cfg, _ = parse_config(PooledConfig(), argv, POOLED_PRESETS, doc=POOLED_DOC)
    if cfg.pool not in ("cls", "mean") or min(cfg.steps, cfg.eval_every, cfg.batch_size) < 1:
        raise SystemExit(f"error: --pool {cfg.pool!r} is not cls or mean, or steps, eval_every, "
                         f"batch_size are not all >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mc = ModelConfig(vision_depth=cfg.depth, init_std=cfg.init_std,
                     prune=PruneConfig(method="none"))
    w, transform = world.World(0), data.create_transform(mc.img_size, train=False)
    x_train, y_train = world_labels(w, "train", cfg.world_train, transform)
    x_test, y_test = world_labels(w, "test", cfg.world_test, transform)
    vit = build_vit(mc, mc.prune)
    head = torch.nn.Linear(mc.vision_width, y_train.shape[1])
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)

    def predict(images):
        tokens = vit(images)                                                    # (B, 1+M, D)
        return head(tokens[:, 0] if cfg.pool == "cls" else tokens[:, 1:].mean(1))   # (B, K)

    gen, history = torch.Generator().manual_seed(cfg.seed), []
    for step in tqdm(range(1, cfg.steps + 1), desc="pooled"):
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(predict(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            vit.eval()
            with torch.no_grad():
                logits = torch.cat([predict(x) for x in x_test.split(100)])        # (N, K)
            vit.train()
            history.append({"step": step, "loss": loss.item(),
                            **probes.balanced_accuracy(logits, y_test)})
    table = "\n".join(
        [f"balanced accuracy on {cfg.world_test} test scenes (0.5: chance or a constant answer), "
         f"the labels read from {cfg.pool} of a {cfg.depth}-layer ViT trained from scratch",
         f"{'step':>6}{'loss':>8}" + "".join(f"{g:>13}" for g in probes.LABELS)]
        + [f"{h['step']:>6}{h['loss']:>8.3f}" + "".join(f"{h[g]:>13.3f}" for g in probes.LABELS)
           for h in history])
    write_summary(cfg.out_dir, {"config": asdict(cfg), "history": history}, table)


TRANSFER_DOC = """python -m lab.experiments transfer [--flag value ...]

Each task of the embedded world fine-tuned (train_downstream.py with the task's preset) from the
pre-training checkpoint and from scratch (--pretrained none --scratch_like <the checkpoint>:
its architecture and vocabulary, untrained), once per seed; VQA also by question kind, NLVR2 by
statement template. Prints mean ± sd, writes out_dir/summary.json."""
GUIDANCE_DOC = """python -m lab.experiments guidance [--flag value ...]

Text guidance's test: the clutter world (5-7 small objects, captions naming one or two),
pre-trained (train_pretrain.py --world_variant clutter) with each method at the same aggressive
token budget, elip once per lam, and without pruning, once per seed; zero-shot retrieval on the
clutter test split and, with lab.analysis keep, the fractions of the named objects' patches that
each trained model's pruning keeps. Prints mean ± sd, writes out_dir/summary.json."""
SPEED_DOC = """python -m lab.experiments speed --base REV [--flag value ...]

The default run (python train_pretrain.py) of the working tree and of an older revision of this
repository (extracted with git archive), one after the other on the same machine, alternating
their order over --reps: wall-clock and CPU time, zero-shot R mean. Run it on an idle machine.
Writes out_dir/summary.json."""
POOLED_DOC = """python -m lab.experiments pooled [--flag value ...]

The tiny preset's ViT (64 px, patch 8, width 128), from random weights, trained with a linear
head on one pooled vector to say what a scene of the default world holds: which shapes, which
colours, which cells of the 3x3 grid are occupied, which colour at which cell (binary labels,
BCE, AdamW; on the CPU, about 4 minutes for 900 steps with 2 threads). Every --eval_every
steps, the balanced accuracy of each group on the test split, beside the last batch's loss.
It asks whether the encoder can learn a property within the default run's ~900 steps when told
it directly, which pre-training's captions only hint at. Writes out_dir/summary.json."""
COMMANDS = {"transfer": transfer_main, "guidance": guidance_main, "speed": speed_main,
            "pooled": pooled_main}
USAGE = """usage: python -m lab.experiments {transfer,guidance,speed,pooled} [--flag value ...]
  transfer   every world task fine-tuned from the pre-training checkpoint and from scratch
  guidance   text guidance's test on the clutter world (elip, evit, random, none; lam)
  speed      the default run of this code beside an older revision's (--base REV)
  pooled     what the tiny ViT learns from scratch when told what a scene holds
python -m lab.experiments COMMAND --help lists the command's flags"""


def main(argv):
    run_subcommand(COMMANDS, argv, USAGE)


if __name__ == "__main__":
    main(sys.argv[1:])
