"""The data benchmarks (lab/bench_data.py) end to end on small sizes: every figure is reported, for
each worker; the flags and --help. No timing assertions."""
import json
import os
import subprocess
import sys

import pytest

import train_pretrain
from lab import bench_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_corpus_reports_build_and_memory_of_every_worker(tmp_path, capsys):
    bench_data.main(["corpus", "--entries", "3000", "--workers", "2", "--batch", "500",
                     "--check_images", "true", "--dir", str(tmp_path)])
    report = json.load(open(tmp_path / "corpus.json"))
    assert report["entries"] == report["read"] == 3000
    assert len(report["workers"]) == 2
    for m in [report["main_built"], *report["workers"]]:
        assert 0 < m["private"] <= m["rss"] <= m["peak_rss"]
    assert report["check_images"] == {"files": 3000, "missing": 3000,
                                      "s": report["check_images"]["s"]}
    entries = json.load(open(report["json"]))
    assert len(entries) == 3000 and set(entries[0]) == {"image", "caption"}
    out = capsys.readouterr().out
    assert "worker 1 at the end of the epoch: RSS" in out and "storage packed" in out


def test_loading_reports_images_per_s_beside_the_gpu(tmp_path, capsys):
    bench_data.main(["loading", "--images", "2", "--samples", "4", "--batch", "2",
                     "--workers", "1", "--dir", str(tmp_path)])
    report = json.load(open(tmp_path / "loading.json"))
    assert report["one_process"] > 0 and report["workers"]["1"] > 0
    assert "RandomResizedCrop(size=(256, 256), scale=(0.2, 1.0)" in report["transform"]
    assert 80 < report["jpeg_kb"] < 200                        # a web photo's file size
    assert report["gpu_images_per_s"]["4.0M images"] == pytest.approx(32.2, abs=0.05)
    assert "one GPU in ELIP's ALBEF pre-training: 32.2 images/s" in capsys.readouterr().out


def test_loading_follows_the_albef_preset():
    albef, cfg = train_pretrain.PRESETS["albef"], bench_data.LoadingConfig()
    assert (cfg.img_size, tuple(cfg.crop_scale), cfg.randaug_n, cfg.randaug_m) == (
        albef["img_size"], albef["crop_scale"], albef["randaug_n"], albef["randaug_m"])


def test_help_and_bad_flags():
    proc = subprocess.run([sys.executable, "-m", "lab.bench_data", "corpus", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--entries (int, default 1000000)" in proc.stdout
    with pytest.raises(SystemExit, match="storage 'dict' is not packed or list"):
        bench_data.main(["corpus", "--storage", "dict"])
    with pytest.raises(SystemExit, match="unknown command"):
        bench_data.main(["images"])
