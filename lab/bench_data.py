"""
Data benchmarks at corpus scale, on generated files (nothing is downloaded):

    python -m lab.bench_data corpus            # 1M-entry ALBEF JSON: build time, memory per process
    python -m lab.bench_data corpus --storage list   # the same with the entries in a list of dicts
    python -m lab.bench_data loading           # images/s of the albef pre-training transform
    python -m lab.bench_data exist             # the existence check of 1M existing files, 5M entries
    python -m lab.bench_data COMMAND --help    # the command's flags

corpus: writes an ALBEF pre-training JSON of --entries entries ({"image", "caption"}, web-length
captions; the image files do not exist), builds data.PretrainDataset from it without the
existence check (check_images=False, as train_pretrain.py --check_images false), then reads
every entry once through a DataLoader with --workers worker processes, as a training epoch does
without the images. Reports the build time, the main process's resident memory (RSS) before and
after, and each worker's at the end of the epoch: RSS, and its private part (pages the worker
has its own copy of; RSS also counts the pages it still shares with the main process).

loading: writes --images JPEGs of a web photo's size (640 x 480, quality 90: smooth colour
fields with grain, about 120 KB as a real photo) and measures images/s of the albef preset's
pre-training sample (data.PretrainDataset: read, decode, data.create_transform's random resized
crop at the preset's resolution, flip, RandAugment, normalise; the caption cleaned; --randaug_n 0
without RandAugment) in one process, then
through a DataLoader of 1..--workers workers; printed beside what one GPU consumes in ELIP's
ALBEF pre-training (the paper's Table 1, see GPU_IMAGES_PER_S).

exist: creates --files empty files in nested folders (--per_folder a folder, 100 folders in each
top folder) in a temporary folder under --dir, writes an ALBEF JSON listing each of them
--captions times (COCO's layout: an entry per caption), builds data.PretrainDataset from it, and
times the existence check of every entry three ways, in this order: data.missing_images (each
distinct file once, --threads threads), serial_check (one os.path.isfile per entry, one at a
time), data.missing_images on one thread; then reads the entries alone, what every check pays
before its first stat. The first is the first stat of each file since it was
created, but creating the files left their metadata in the kernel's cache: the figures are a
local disk's, where a stat does not wait on a network. The files are deleted at the end.
"""
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

import data
from config import parse_config, run_subcommand
from model import PRESETS as MODEL_PRESETS

# What one GPU consumes: the ELIP paper (arXiv 2309.16738, Table 1) reports ALBEF + ELIP
# pre-training at 518 minutes per epoch on 4 GPUs (A5000, batch 40 per GPU) over ALBEF's 4M
# corpus: about 4.0M images (5.1M image-text pairs). 4.0e6 / (518 * 60 s) / 4 = 32 images/s per
# GPU; 41 if an epoch counts the 5.1M pairs.
GPU_IMAGES_PER_S = {"4.0M images": 4.0e6 / (518 * 60) / 4, "5.1M pairs": 5.1e6 / (518 * 60) / 4}
WORDS = ("a man woman dog cat red blue small large two people sitting standing on in the of with "
         "next to near street table grass water car bus train tree building sky white black "
         "green playing holding looking at front young old field road picture view").split()


@dataclass
class CorpusConfig:
    preset: str = "default"          # default | quick (seconds)
    entries: int = 1_000_000         # entries of the generated JSON
    workers: int = 2                 # DataLoader worker processes reading the entries
    batch: int = 1000                # entries per DataLoader batch
    storage: str = "packed"          # packed: the dataset's own storage; list: a list of dicts
    dir: str = "out/bench_data"      # where the JSON is written (reused if present)
    seed: int = 0                    # of the generated entries

    def __post_init__(self):
        if self.storage not in ("packed", "list"):
            raise ValueError(f"storage {self.storage!r} is not packed or list")


@dataclass
class LoadingConfig:
    preset: str = "default"          # default | quick (seconds)
    images: int = 64                 # JPEGs written (and read in turn)
    width: int = 640                 # of each JPEG written
    height: int = 480                # (see width)
    quality: int = 90                # JPEG quality (90: about 120 KB, a web photo's size)
    samples: int = 256               # samples timed per measurement
    workers: int = 2                 # DataLoader runs with 1..workers worker processes
    batch: int = 8                   # samples per DataLoader batch
    img_size: int = MODEL_PRESETS["albef"]["img_size"]  # the transform's output side (albef's)
    crop_scale: tuple[float, ...] = (0.2, 1.0)   # the albef preset's random-crop area
    randaug_n: int = 2               # the albef preset's RandAugment: operations per image
    randaug_m: int = 7               # and their strength
    dir: str = "out/bench_data/jpeg" # where the JPEGs are written (reused if present)
    threads: int = 1                 # torch threads per process (DataLoader workers use 1)


@dataclass
class ExistConfig:
    preset: str = "default"          # default | quick (seconds)
    files: int = 1_000_000           # empty image files created (and deleted at the end)
    per_folder: int = 1000           # files in each folder
    captions: int = 5                # JSON entries per image (COCO: 5 captions an image)
    threads: int = data.STAT_THREADS # threads of data.missing_images
    dir: str = "out/bench_data"      # the files go to a temporary folder here; the report too


PRESETS = {"default": {}, "quick": dict(entries=20_000, images=8, samples=48, files=20_000)}


# ---- memory -------------------------------------------------------------------------------
def memory_mb(pid="self") -> dict:
    """Resident memory of a process in MB (Linux /proc): rss, private (its own pages: those
    copied on write or allocated after the fork), and the peak RSS (VmHWM)."""
    kb = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                kb[parts[0].rstrip(":")] = int(parts[1])
    with open(f"/proc/{pid}/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return {"rss": kb["Rss"] / 1024, "private": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024,
            "peak_rss": peak / 1024}


# ---- corpus -------------------------------------------------------------------------------
def write_corpus(path: str, n: int, seed: int):
    """An ALBEF pre-training JSON of n entries with captions of 6 to 16 words."""
    rng = random.Random(seed)
    entries = [{"image": f"cc3m/{i // 10000:04d}/{i:08d}.jpg",
                "caption": " ".join(rng.choices(WORDS, k=rng.randint(6, 16)))} for i in range(n)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(entries, f)


class ReadEntries(Dataset):
    """Entry i as a training sample reads it (its record, one caption drawn), without the image."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        captions = self.items[i]["captions"]
        return len(captions[int(torch.randint(len(captions), ()))])


def report_memory(batch):
    """collate_fn run in the worker: the batch's size and the worker's memory now."""
    info = get_worker_info()
    return len(batch), (info.id if info else -1), memory_mb()


def run_corpus(cfg: CorpusConfig) -> dict:
    path = os.path.join(cfg.dir, f"albef_{cfg.entries}.json")
    if not os.path.exists(path):
        print(f"writing {path} ...")
        write_corpus(path, cfg.entries, cfg.seed)
    out = {"json": path, "json_mb": os.path.getsize(path) / 2**20, "entries": cfg.entries,
           "storage": cfg.storage, "main_before": memory_mb()}
    t0 = time.time()
    dataset = data.PretrainDataset(path, check_images=False)
    out["build_s"] = time.time() - t0
    out["main_built"] = memory_mb()
    items = list(dataset.items) if cfg.storage == "list" else dataset.items
    torch.manual_seed(cfg.seed)
    loader = DataLoader(ReadEntries(items), batch_size=cfg.batch, shuffle=True,
                        num_workers=cfg.workers, collate_fn=report_memory)
    t0, read, workers = time.time(), 0, {}
    for size, worker, mem in loader:
        read += size
        workers[worker] = mem
    out["epoch_s"], out["read"] = time.time() - t0, read
    out["main_after_epoch"] = memory_mb()
    out["workers"] = [workers[k] for k in sorted(workers)]
    return out


def format_corpus(r: dict, cfg: CorpusConfig) -> str:
    def mem(m):
        return (f"RSS {m['rss']:.0f} MB (private {m['private']:.0f} MB, "
                f"peak RSS {m['peak_rss']:.0f} MB)")
    lines = [f"corpus: {r['entries']:,} entries, {r['json']} ({r['json_mb']:.0f} MB), "
             f"storage {r['storage']}",
             f"  build PretrainDataset (check_images=False): {r['build_s']:.1f} s",
             f"  main process before: {mem(r['main_before'])}",
             f"  main process built:  {mem(r['main_built'])}",
             f"  one epoch of reading every entry: {r['epoch_s']:.1f} s ({r['read']:,} entries, "
             f"{len(r['workers'])} workers)",
             f"  main process after the epoch: {mem(r['main_after_epoch'])}"]
    lines += [f"  worker {k} at the end of the epoch: {mem(m)}" for k, m in enumerate(r["workers"])]
    return "\n".join(lines)


# ---- image loading --------------------------------------------------------------------------
def write_jpegs(cfg: LoadingConfig) -> list:
    """Web-photo-like JPEGs: a random colour field, bicubic-upsampled, with grain (640 x 480 at
    quality 90: about 120 KB, a web photo's size)."""
    os.makedirs(cfg.dir, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(cfg.images):
        name = f"photo_{cfg.width}x{cfg.height}_q{cfg.quality}_{i:04d}.jpg"
        if not os.path.exists(os.path.join(cfg.dir, name)):
            coarse = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
            smooth = np.asarray(coarse.resize((cfg.width, cfg.height),
                                              Image.Resampling.BICUBIC), np.float32)
            grain = rng.normal(0, 8, smooth.shape)
            pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(cfg.dir, name), quality=cfg.quality)
        names.append(name)
    return names


def images_per_s(dataset, samples: int, workers: int, batch: int) -> float:
    """Samples per second, in this process (workers = 0, no DataLoader) or through a DataLoader
    of `workers` processes, timed from its first batch on (the workers have started)."""
    if workers == 0:
        t0 = time.time()
        for i in range(samples):
            dataset[i % len(dataset)]
        return samples / (time.time() - t0)
    order = [i % len(dataset) for i in range(samples + batch)]
    batches = iter(DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch,
                              num_workers=workers, collate_fn=len))
    next(batches)
    t0 = time.time()
    got = sum(batches)
    return got / (time.time() - t0)


def run_loading(cfg: LoadingConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    names = write_jpegs(cfg)
    sizes = [os.path.getsize(os.path.join(cfg.dir, n)) for n in names]
    entries = [{"image": n, "caption": f"a photo of a street number {i}"}
               for i, n in enumerate(names)]
    transform = data.create_transform(cfg.img_size, True, tuple(cfg.crop_scale), cfg.randaug_n,
                                      cfg.randaug_m)
    dataset = data.PretrainDataset(entries, cfg.dir, transform)
    images_per_s(dataset, cfg.batch, 0, cfg.batch)                         # warm-up
    out = {"jpeg_kb": sum(sizes) / len(sizes) / 1024, "transform": repr(transform),
           "one_process": images_per_s(dataset, cfg.samples, 0, cfg.batch),
           "workers": {w: images_per_s(dataset, cfg.samples, w, cfg.batch)
                       for w in range(1, cfg.workers + 1)},
           "gpu_images_per_s": GPU_IMAGES_PER_S, "cpus": os.cpu_count(),
           "load": os.getloadavg()}
    return out


def format_loading(r: dict, cfg: LoadingConfig) -> str:
    per_worker = r["one_process"]
    gpu = GPU_IMAGES_PER_S["4.0M images"]
    lines = [f"loading: {cfg.images} JPEGs {cfg.width}x{cfg.height} quality {cfg.quality} "
             f"(mean {r['jpeg_kb']:.0f} KB), albef pre-training sample at {cfg.img_size} px, "
             f"crop scale {tuple(cfg.crop_scale)}, RandAugment {cfg.randaug_n}/{cfg.randaug_m}; "
             f"{r['cpus']} CPUs, load "
             f"{', '.join(f'{x:.1f}' for x in r['load'])}",
             f"  one process: {per_worker:.1f} images/s ({1000 / per_worker:.1f} ms an image)"]
    lines += [f"  DataLoader, {w} worker{'s' * (w > 1)}: {v:.1f} images/s ({v / w:.1f} per worker)"
              for w, v in r["workers"].items()]
    lines += [f"  one GPU in ELIP's ALBEF pre-training: {gpu:.1f} images/s (Table 1: 518 min an "
              f"epoch on 4 GPUs over 4.0M images; {GPU_IMAGES_PER_S['5.1M pairs']:.1f} over "
              f"5.1M pairs)",
              f"  workers per GPU to keep up: {gpu / per_worker:.1f} at this rate per worker"]
    return "\n".join(lines)


# ---- existence check ------------------------------------------------------------------------
def write_existing(root: str, cfg: ExistConfig) -> str:
    """cfg.files empty files under root, 100 folders of cfg.per_folder files in each top folder
    (root/000/00000/000000000.jpg, ...), and the JSON listing each one cfg.captions times in a
    row, as COCO's lists an image's captions; returns the JSON's path."""
    path = os.path.join(root, "corpus.json")
    with open(path, "w") as f:
        f.write("[")
        for i in range(cfg.files):
            folder = i // cfg.per_folder
            name = f"{folder // 100:03d}/{folder:05d}/{i:09d}.jpg"
            if i % cfg.per_folder == 0:
                os.makedirs(os.path.join(root, os.path.dirname(name)))
            os.close(os.open(os.path.join(root, name), os.O_CREAT | os.O_WRONLY, 0o644))
            f.write(",".join(json.dumps({"image": name, "caption": f"a photo, caption {c}"})
                             for c in range(cfg.captions)) + ("," if i < cfg.files - 1 else ""))
        f.write("]")
    return path


def serial_check(dataset: data.JSONDataset) -> int:
    """The check without deduplication or threads: one os.path.isfile for each image of every
    entry, one at a time; returns how many are missing."""
    missing = 0
    for i in range(len(dataset)):
        for path in dataset.items[i]["images"]:
            missing += not os.path.isfile(os.path.join(dataset.image_root, path))
    return missing


def timed(check, stats: int) -> dict:
    t0 = time.perf_counter()
    missing = check()
    s = time.perf_counter() - t0
    return {"s": s, "stats": stats, "stats_per_s": stats / s, "missing": missing}


def run_exist(cfg: ExistConfig) -> dict:
    os.makedirs(cfg.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="exist_", dir=cfg.dir)
    try:
        t0 = time.time()
        path = write_existing(root, cfg)
        out = {"files": cfg.files, "folders": -(-cfg.files // cfg.per_folder),
               "create_s": time.time() - t0, "threads": cfg.threads, "cpus": os.cpu_count()}
        t0 = time.time()
        dataset = data.PretrainDataset(path, root, check_images=False)
        out["entries"], out["build_s"] = len(dataset), time.time() - t0
        out["new"] = timed(lambda: dataset.missing_images(threads=cfg.threads)[0], cfg.files)
        out["serial"] = timed(lambda: serial_check(dataset), len(dataset))
        out["new_1_thread"] = timed(lambda: dataset.missing_images(threads=1)[0], cfg.files)
        t0 = time.perf_counter()       # what both checks pay before any stat: reading the entries
        read = sum(len(dataset.items[i]["images"]) for i in range(len(dataset)))
        out["read_entries"] = {"s": time.perf_counter() - t0, "paths": read}
        out["load"] = os.getloadavg()
    finally:
        t0 = time.time()
        shutil.rmtree(root)
    out["delete_s"] = time.time() - t0
    return out


def format_exist(r: dict, cfg: ExistConfig) -> str:
    def line(name, c):
        return (f"  {name}: {c['s']:.1f} s, {c['stats']:,} stats, {c['stats_per_s']:,.0f} "
                f"stats/s, {c['missing']} missing")
    return "\n".join([
        f"exist: {r['files']:,} empty files in {r['folders']:,} folders, {r['entries']:,} entries "
        f"({r['entries'] // r['files']} per file); created in {r['create_s']:.0f} s, dataset built "
        f"in {r['build_s']:.0f} s, deleted in {r['delete_s']:.0f} s; {r['cpus']} CPUs, load "
        f"{', '.join(f'{x:.1f}' for x in r['load'])}",
        line(f"data.missing_images, {r['threads']} threads (first)", r["new"]),
        line("serial check, one isfile per entry (second)", r["serial"]),
        line("data.missing_images, 1 thread (third)", r["new_1_thread"]),
        f"  reading the entries alone, no stat (fourth): {r['read_entries']['s']:.1f} s",
        f"  serial / missing_images: {r['serial']['s'] / r['new']['s']:.1f}x the time"])


RUNS = {"corpus": (CorpusConfig, run_corpus, format_corpus),
        "loading": (LoadingConfig, run_loading, format_loading),
        "exist": (ExistConfig, run_exist, format_exist)}
USAGE = """usage: python -m lab.bench_data {corpus,loading,exist} [--flag value ...]
  corpus   build the pre-training dataset from a generated 1M-entry ALBEF JSON: time, memory of
           the main process and of each DataLoader worker after an epoch of reading entries
  loading  images/s of the albef pre-training transform per worker, beside one GPU's rate
  exist    the existence check of 1M existing files listed by 5M entries: data.missing_images
           beside one isfile per entry
python -m lab.bench_data COMMAND --help lists the command's flags"""


def run_command(name, argv):
    """One subcommand: its flags, its run, the printed report and its JSON file."""
    config_cls, run, formatter = RUNS[name]
    keys = {f for f in config_cls.__dataclass_fields__}
    presets = {k: {f: v for f, v in p.items() if f in keys} for k, p in PRESETS.items()}
    cfg, _ = parse_config(config_cls(), argv, presets, doc=__doc__)
    report = run(cfg)
    print(formatter(report, cfg))
    path = os.path.join(cfg.dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")


def main(argv):
    run_subcommand({name: partial(run_command, name) for name in RUNS}, argv, USAGE)


if __name__ == "__main__":
    main(sys.argv[1:])
