"""On a GPU: the main job, a DDP run over 2 GPUs with NCCL, every downstream task and the
efficiency benchmark, each a few steps on a very small model (mixed precision as `--amp auto`
picks it). They skip without CUDA;
on a GPU machine: `python -m pytest -q tests/test_cuda.py`."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import bench
import train_downstream
import train_pretrain
from test_train_pretrain import ROOT, SMALL

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
TASKS = ("retrieval", "vqa", "nlvr", "ve", "caption")
# the zero-shot evaluation at the end runs too (8 test scenes)
GPU_SMALL = SMALL + ["--world_test", "8", "--eval_k", "4"]
# the official presets' text layouts at toy depth; their schedules warm up in stairs of 100
SHAPES = {"tiny": [],
          "albef": ["--text_layers", "2", "--fusion_layers", "2", "--warmup_steps", "100"],
          "blip": ["--text_layers", "3", "--fusion_layers", "0", "--warmup_steps", "100"]}


def records(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def run_main(out_dir, preset, capsys, *extra):
    """A shrunk preset (its losses, queue, distillation and pruning kept) for 3 steps."""
    train_pretrain.main(["--preset", preset, *GPU_SMALL, *SHAPES[preset], "--num_workers", "0",
                         "--out_dir", out_dir, "--max_steps", "3", *extra])
    assert "on 1 x cuda" in capsys.readouterr().out


@needs_cuda
@pytest.mark.parametrize("preset", list(SHAPES))
def test_main_job_on_one_gpu(tmp_path, capsys, preset):
    out = str(tmp_path / preset)
    run_main(out, preset, capsys, "--grad_accum", "2")
    recs = records(out)
    steps = [r for r in recs if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    zero_shot = [r for r in recs if "zero_shot_retrieval" in r][-1]
    assert 0 <= zero_shot["zero_shot_retrieval"]["r_mean"] <= 100
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    if preset != "tiny":         # a queue: 3 steps x 2 micro-batches x 4 samples written
        assert int(state["model"]["queue_ptr"]) == 24 % 32


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_two_gpus
def test_ddp_with_nccl_on_two_gpus(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), os.path.join(ROOT, "train_pretrain.py"),
           "--preset", "albef", *SMALL, *SHAPES["albef"], "--num_workers", "0",
           "--out_dir", out, "--max_steps", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 x cuda" in proc.stdout + proc.stderr
    sync = [r for r in records(out) if "ranks_in_sync" in r][-1]
    assert sync["ranks_in_sync"] and len(sync["rank_fingerprints"]) == 2
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True, map_location="cpu")
    assert int(state["model"]["queue_ptr"]) == (3 * 2 * 4) % 32     # both ranks' features


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path_factory.mktemp("pretrain_gpu")
    train_pretrain.main(SMALL + ["--out_dir", str(out), "--max_steps", "2"])
    return str(out / "checkpoint.pt")


@needs_cuda
@pytest.mark.parametrize("task", TASKS)
def test_downstream_task_on_gpu(tmp_path, capsys, pretrained, task):
    out = tmp_path / task
    train_downstream.main(["--task", task, "--pretrained", pretrained, "--out_dir", str(out),
                           "--world_train", "16", "--world_test", "6", "--batch_size", "4",
                           "--max_steps", "2", "--warmup_steps", "1", "--log_every", "1",
                           "--eval_k", "3", "--beam", "2", "--max_length", "8"])
    assert "on 1 x cuda" in capsys.readouterr().out
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["task"] == task and rec["test"]
    assert all(test["metrics"] for test in rec["test"].values())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(str(out)) if "step" in r)


@needs_cuda
def test_bench_on_gpu(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--arch", "albef", "--img_size", "64", "--batch", "2",
                "--reps", "1", "--warmup", "1",
                "--whole_model", "true", "--whole_batch", "2", "--whole_vocab", "50",
                "--text_len", "6", "--methods", "none,elip,tome", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["machine"]["device"].startswith("cuda") and report["machine"]["gpu"]
    for scope in (report["vit"], report["whole_model"]):
        assert all(fig["cuda_peak_bytes"] > 0 for fig in scope.values())
