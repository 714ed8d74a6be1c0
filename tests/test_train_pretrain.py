"""train_pretrain.py end to end on a very small model: resume, DDP, real-format data, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train_pretrain
from train_pretrain import TrainConfig, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--img_size", "32", "--patch_size", "8", "--vision_width", "32", "--text_width", "32",
         "--vision_heads", "2", "--text_heads", "2", "--text_mlp", "64", "--embed_dim", "16",
         "--queue_size", "32", "--batch_size", "4", "--world_train", "24", "--world_test", "0",
         "--warmup_steps", "2", "--log_every", "1"]


def final_model(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)["model"]


def test_resume_gives_the_same_parameters(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    three_per_epoch = SMALL + ["--world_train", "12"]                     # 12 samples / batch 4
    train_pretrain.main(three_per_epoch + ["--out_dir", a, "--max_steps", "5"])
    train_pretrain.main(three_per_epoch + ["--out_dir", b, "--max_steps", "2"])   # stops mid-epoch
    train_pretrain.main(["--out_dir", b, "--resume", "auto", "--max_steps", "5"])
    sa, sb = final_model(a), final_model(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    def logged_steps(out_dir):
        return [json.loads(l)["step"] for l in open(os.path.join(out_dir, "log.jsonl"))
                if '"step"' in l]
    assert logged_steps(b) == list(range(1, 6))
    train_pretrain.main(three_per_epoch + ["--out_dir", a, "--max_steps", "5"])    # a fresh rerun
    assert logged_steps(a) == list(range(1, 6))                               # starts a new log


def test_ddp_two_ranks_stay_identical(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", os.path.join(ROOT, "train_pretrain.py"),
           *SMALL, "--out_dir", out, "--max_steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    sync = [r for r in recs if "ranks_in_sync" in r][-1]
    fps = sync["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1] and sync["ranks_in_sync"]
    # each rank drew its own half of the data: 3 steps of 2 x 4 samples
    assert [r["step"] for r in recs if "step" in r] == [1, 2, 3]


def write_folder(tmp_path, entries, n_images=6):
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for i in range(n_images):
        Image.new("RGB", (40, 30), (40 * i, 255 - 40 * i, 90)).save(root / f"im{i}.jpg")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    return str(path), str(root)


def test_pretrain_from_albef_json_folder(tmp_path):
    entries = [{"image": f"im{i}.jpg", "caption": [f"a picture number {i}", "a coloured square"]}
               for i in range(6)] + [{"image": "im0.jpg", "caption": "a single caption!"}] * 2
    path, root = write_folder(tmp_path, entries)
    out = str(tmp_path / "out")
    train_pretrain.main(SMALL + ["--train_files", path, "--image_root", root, "--out_dir", out,
                                 "--max_steps", "2"])
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


@pytest.mark.parametrize("entry, culprit", [
    ({"image": "nowhere.jpg", "caption": "a cat"}, "nowhere.jpg"),
    ({"image": "im0.jpg"}, "caption"),
    ({"image": "im0.jpg", "caption": "?!..."}, "empty"),
])
def test_bad_entries_are_named_before_training(tmp_path, entry, culprit):
    entries = [{"image": "im1.jpg", "caption": "fine"}] * 3 + [entry]
    path, root = write_folder(tmp_path, entries)
    with pytest.raises(SystemExit) as e:
        train_pretrain.main(SMALL + ["--train_files", path, "--image_root", root,
                                     "--out_dir", str(tmp_path / "o")])
    msg = str(e.value)
    assert "train.json" in msg and "3" in msg and culprit in msg
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.parametrize("argv, msg", [
    (["--no_such_flag", "1"], "--no_such_flag is unknown"),
    (["--batch_size", "many"], "--batch_size"),
    (["--merge", "yes"], "true or false"),
    (["--keep_ratios", "0.9,0.95,0.4"], "must not increase"),
    (["--prune_layers", "2,4,12"], "depth 12"),
    (["--lam", "2"], "lam"),
    (["--method", "magic"], "not one of"),
    (["--preset", "huge"], "preset"),
])
def test_bad_flags_are_refused(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        parse_config(TrainConfig(), argv, {"tiny": {}})


def test_flags_presets_and_suffixes():
    presets = {"tiny": {}, "big": {"vision_width": 256, "text_width": 256, "lr": 1e-4}}
    cfg = parse_config(TrainConfig(), ["--preset", "big", "--lr=2e-4", "--prune.lam", "0.6",
                                       "--keep_ratios", "0.8,0.5,0.3", "--distill", "false"],
                       presets)
    assert cfg.model.vision_width == 256 and cfg.lr == 2e-4 and cfg.model.prune.lam == 0.6
    assert cfg.model.prune.keep_ratios == (0.8, 0.5, 0.3) and cfg.model.distill is False
