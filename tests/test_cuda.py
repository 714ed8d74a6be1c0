"""On a GPU: the main job, a DDP run over 2 GPUs with NCCL, every downstream task and the
efficiency benchmark, each a few steps on a very small model (mixed precision as `--amp auto`
picks it); the presets' fp32 with TF32 (and without), fp16 with the gradient scaler through a
resume, DataLoader workers with pinned memory (training and evaluation), ITM negatives and ITC
queue entries from every rank over NCCL on 2 GPUs, and `bench.py --gpu_step albef` at a small
batch (the whole albef model at full size: about 5 GB). They skip without CUDA;
on a GPU machine: `python -m pytest -q -rs tests/test_cuda.py`."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import bench
import data
import eval as evaluation
import train_downstream
import train_pretrain
import trainer
from model import ELIPModel, ModelConfig
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


def step_records(out_dir):
    steps = [r for r in records(out_dir) if "step" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    return [r["step"] for r in steps]


@needs_cuda
@pytest.mark.parametrize("tf32", [True, False])
def test_fp32_steps_with_and_without_tf32(tmp_path, capsys, monkeypatch, tf32):
    """The albef preset trains in fp32 (--amp off); --tf32 sets the matmuls' and convolutions'
    TF32 as each step runs."""
    seen, add = [], trainer.Meter.add

    def spy(self, out, micro_batches):          # called after each micro-batch's backward
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return add(self, out, micro_batches)

    monkeypatch.setattr(trainer.Meter, "add", spy)
    out = str(tmp_path / "fp32")
    run_main(out, "albef", capsys, "--amp", "off", "--tf32", str(tf32).lower())
    assert seen == [(tf32, tf32)] * 3 and step_records(out) == [1, 2, 3]


@needs_cuda
def test_fp16_with_the_gradient_scaler_through_a_resume(tmp_path, capsys):
    out = str(tmp_path / "fp16")
    run_main(out, "albef", capsys, "--amp", "fp16")
    ckpt = os.path.join(out, "checkpoint.pt")
    scaler = torch.load(ckpt, weights_only=True, map_location="cpu")["scaler"]
    assert 0 < scaler["scale"] <= 2.0 ** 16            # GradScaler's start, halved on overflow
    run_main(out, "albef", capsys, "--amp", "fp16", "--resume", "auto", "--max_steps", "5")
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert step_records(out) == [1, 2, 3, 4, 5] and state["step"] == 5
    assert 0 < state["scaler"]["scale"] <= 2.0 ** 16


@needs_cuda
def test_loader_workers_with_pinned_memory(tmp_path, capsys, monkeypatch):
    """Training batches from 2 workers arrive pinned; the evaluation loader pins too."""
    pinned, to_device = [], data.to_device

    def spy(batch, device):
        pinned.append(batch["image"].is_pinned())
        return to_device(batch, device)

    monkeypatch.setattr(data, "to_device", spy)
    out = str(tmp_path / "workers")
    run_main(out, "albef", capsys, "--num_workers", "2")
    assert pinned == [True] * 3 and step_records(out) == [1, 2, 3]
    images = [{"image": torch.full((3, 8, 8), float(i))} for i in range(5)]
    loader = evaluation.shard_loader(images, 2, None, 2, torch.device("cuda"))
    batches = [batch for batch, _ in loader]
    assert loader.pin_memory and all(b["image"].is_pinned() for b in batches)
    assert torch.equal(torch.cat([b["image"] for b in batches])[:, 0, 0, 0], torch.arange(5.0))


def negatives_over_nccl(rank, store):
    """One of two NCCL ranks, each on its own GPU (torch.multiprocessing.spawn), as
    test_model checks them over gloo: the ITC queue gets both ranks' momentum features, and
    with negative_all_rank every ITM negative comes from the other rank when the similarities
    say so, its gradient reaching the rank that owns it."""
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.manual_seed(0)                    # the same model on both ranks, as DDP starts
    m = ELIPModel(ModelConfig(vocab_size=40, img_size=32, queue_size=20, text_dropout=0.0,
                              max_len=8, negative_all_rank=True)).to(device).train()
    B, D, other = 3, m.cfg.text_width, 1 - rank

    def batch(r):                           # rank r's own samples
        g = torch.Generator().manual_seed(100 + r)
        ids = torch.randint(5, 40, (B, 8), generator=g)
        ids[:, 0] = m.cfg.cls_id
        return data.to_device({"image": torch.randn(B, 3, 32, 32, generator=g), "text_ids": ids,
                               "text_mask": torch.ones_like(ids)}, device)

    with torch.no_grad():                   # every rank's momentum features before the step
        feats = [(m.image_feat(m.encode_image(b["image"], momentum=True), momentum=True),
                  m.text_feat(m.encode_text(b["text_ids"], b["text_mask"], momentum=True),
                              momentum=True)) for b in map(batch, range(2))]
    torch.manual_seed(rank)
    out = m(batch(rank))
    out["loss"].backward()                  # negatives' gradients all_reduced over NCCL
    assert torch.isfinite(out["loss"]) and all(
        torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.momentum_step([out.pop("queue")])
    assert int(m.queue_ptr) == 2 * B
    for queue, k in ((m.image_queue, 0), (m.text_queue, 1)):
        expect = torch.cat([f[k] for f in feats]).T                              # (E, 2B)
        assert (queue[:, :2 * B] - expect).abs().max() < 1e-3
    # ITM: each sample's image and text lie along the other rank's text and image
    e = torch.eye(16, device=device)
    image_feat, text_feat = e[[other] * B], e[[rank] * B]                        # (B, 16)
    image_embeds = torch.randn(B, 17, D, device=device, requires_grad=True)
    text_embeds = torch.randn(B, 8, D, device=device, requires_grad=True)
    ids = torch.randint(5, 40, (B, 8), device=device)
    everyone = [torch.empty(B, 16, device=device) for _ in range(2)]
    dist.all_gather(everyone, text_feat)
    sim_i2t = image_feat @ torch.cat(everyone).T / 0.001                         # (B, 2B)
    dist.all_gather(everyone, image_feat)
    sim_t2i = text_feat @ torch.cat(everyone).T / 0.001                          # (B, 2B)
    image_neg, text_neg, _, _, (neg_image, neg_text) = m.itm_negatives(
        image_embeds, text_embeds, ids, torch.ones_like(ids), sim_i2t, sim_t2i)
    assert all(r // B == other for r in neg_image.tolist() + neg_text.tolist())
    everything = [torch.empty(B, 17, D, device=device) for _ in range(2)]
    dist.all_gather(everything, image_embeds.detach())
    assert torch.equal(image_neg, everything[other][neg_image - other * B])
    (image_neg.sum() + text_neg.sum()).backward()
    drawn = [torch.empty(B, dtype=torch.long, device=device) for _ in range(2)]
    for embeds, neg in ((image_embeds, neg_image), (text_embeds, neg_text)):
        dist.all_gather(drawn, neg)
        times = torch.bincount(drawn[other] - rank * B, minlength=B).float()    # (B,)
        assert torch.equal(embeds.grad, times[:, None, None].expand_as(embeds))
    dist.destroy_process_group()


@needs_two_gpus
def test_negatives_from_every_rank_over_nccl(tmp_path):
    torch.multiprocessing.spawn(negatives_over_nccl, args=(str(tmp_path / "store"),), nprocs=2)


@needs_cuda
def test_gpu_step_of_the_albef_preset(tmp_path, capsys):
    """bench.py --gpu_step albef at full size, batch 4: both methods' memory peaks and ratios."""
    out = tmp_path / "step.json"
    bench.main(["--gpu_step", "albef", "--gpu_batch", "4", "--warmup", "1", "--reps", "2",
                "--out", str(out)])
    report = json.loads(out.read_text())
    figs, mc = report["gpu_step"], report["model_config"]
    assert report["machine"]["gpu"] and report["tf32"]
    assert (mc["img_size"], mc["vocab_size"], mc["queue_size"]) == (256, 30522, 65536)
    assert report["config"]["whole_batch"] == 4 and list(figs) == ["none", "elip"]
    assert all(f["peak_bytes"] > 0 and len(f["step_s_all"]) == 2 for f in figs.values())
    for key in ("step_s", "peak_bytes"):
        assert report["ratio"][key] == pytest.approx(figs["elip"][key] / figs["none"][key])
    assert "elip / none" in capsys.readouterr().out
