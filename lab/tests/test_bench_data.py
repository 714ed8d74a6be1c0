"""The data benchmarks (lab/bench_data.py) end to end on small sizes: every figure is reported, for
each worker; the flags and --help. No timing assertions."""
import json
import os
import subprocess
import sys

import pytest

import train_pretrain
from data import PretrainDataset
from lab import bench_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_corpus_reports_build_and_memory_of_every_worker(tmp_path, capsys):
    bench_data.main(["corpus", "--entries", "3000", "--workers", "2", "--batch", "500",
                     "--dir", str(tmp_path)])
    report = json.load(open(tmp_path / "corpus.json"))
    assert report["entries"] == report["read"] == 3000
    assert len(report["workers"]) == 2
    for m in [report["main_built"], *report["workers"]]:
        assert 0 < m["private"] <= m["rss"] <= m["peak_rss"]
    entries = json.load(open(report["json"]))
    assert len(entries) == 3000 and set(entries[0]) == {"image", "caption"}
    out = capsys.readouterr().out
    assert "worker 1 at the end of the epoch: RSS" in out and "storage packed" in out


def test_exist_times_both_checks_on_existing_files_and_deletes_them(tmp_path, capsys):
    bench_data.main(["exist", "--files", "200", "--per_folder", "30", "--captions", "5",
                     "--threads", "4", "--dir", str(tmp_path)])
    report = json.load(open(tmp_path / "exist.json"))
    assert (report["files"], report["folders"], report["entries"]) == (200, 7, 1000)
    for name, stats in [("new", 200), ("serial", 1000), ("new_1_thread", 200)]:
        c = report[name]
        assert c["missing"] == 0 and c["stats"] == stats
        assert c["stats_per_s"] == pytest.approx(stats / c["s"])
    assert report["read_entries"]["paths"] == 1000
    assert os.listdir(tmp_path) == ["exist.json"]                   # the files are gone
    out = capsys.readouterr().out
    assert "200 empty files in 7 folders, 1,000 entries (5 per file)" in out
    assert "serial / missing_images: " in out


def test_exist_corpus_lists_each_file_once_per_caption(tmp_path):
    cfg = bench_data.ExistConfig(files=25, per_folder=10, captions=3)
    entries = json.load(open(bench_data.write_existing(str(tmp_path), cfg)))
    assert len(entries) == 75
    assert entries[0]["image"] == entries[2]["image"] == "000/00000/000000000.jpg"
    assert entries[-1]["image"] == "000/00002/000000024.jpg"
    assert all((tmp_path / e["image"]).is_file() for e in entries)
    (tmp_path / entries[40]["image"]).unlink()
    assert bench_data.serial_check(PretrainDataset(entries, str(tmp_path), check_images=False)) == 3


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


def test_help_and_bad_flags(capsys):
    proc = subprocess.run([sys.executable, "-m", "lab.bench_data", "corpus", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--entries (int, default 1000000)" in proc.stdout
    with pytest.raises(SystemExit) as e:
        bench_data.main(["exist", "--help"])
    assert e.value.code == 0 and "--files (int, default 1000000)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="storage 'dict' is not packed or list"):
        bench_data.main(["corpus", "--storage", "dict"])
    with pytest.raises(SystemExit, match="unknown command"):
        bench_data.main(["images"])
