"""train_pretrain.py end to end on a very small model: resume, DDP, real-format data, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train_pretrain

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


def test_resume_refuses_a_flag_that_changes_the_run(tmp_path):
    out = str(tmp_path / "r")
    train_pretrain.main(SMALL + ["--out_dir", out, "--max_steps", "1"])
    with pytest.raises(SystemExit, match=r"--run.lr 1e-05 \(the checkpoint has 0.0005\)"):
        train_pretrain.main(["--out_dir", out, "--resume", "auto", "--lr", "1e-5"])
    with pytest.raises(SystemExit, match="--model.prune.lam"):
        train_pretrain.main(["--out_dir", out, "--resume", "auto", "--lam", "0.5"])
    # a flag that does not change the run is taken
    train_pretrain.main(["--out_dir", out, "--resume", "auto", "--max_steps", "2", "--threads", "1"])
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 2


def test_help_lists_every_flag_with_type_default_and_comment():
    proc = subprocess.run([sys.executable, "train_pretrain.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--model.prune.lam (float, default 0.8)" in proc.stdout
    assert "weight of the image [CLS] in Eq. 1's fusion" in proc.stdout
    assert "--train_files (str,..., default '')" in proc.stdout
    assert "--run.lr (float, default 0.0005)" in proc.stdout


@pytest.mark.parametrize("variant", ["default", "clutter"])
def test_zero_shot_reports_the_oracle_ceiling(tmp_path, capsys, variant):
    out = str(tmp_path / variant)
    train_pretrain.main(SMALL + ["--out_dir", out, "--max_steps", "1", "--world_test", "6",
                                 "--world_variant", variant])
    rec = json.load(open(os.path.join(out, "zero_shot.json")))
    oracle, chance = rec["oracle"], rec["chance"]
    assert rec["world_variant"] == variant
    assert chance["r_mean"] < oracle["r_mean"] <= 100.0
    assert rec["r_mean_of_oracle"] == pytest.approx(rec["zero_shot_retrieval"]["r_mean"]
                                                    / oracle["r_mean"])
    assert rec["itc_r_mean_of_oracle"] == pytest.approx(
        rec["zero_shot_retrieval"]["itc"]["r_mean"] / oracle["r_mean"])
    printed = capsys.readouterr()
    assert "of the oracle's" in printed.out + printed.err


def test_init_from_starts_a_new_run_from_a_checkpoint(tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train_pretrain.main(SMALL + ["--out_dir", first, "--max_steps", "2"])
    # a new run from its weights: with a learning rate of 0 the weights stay the checkpoint's
    train_pretrain.main(SMALL + ["--out_dir", second, "--max_steps", "1", "--init_from",
                                 os.path.join(first, "checkpoint.pt"), "--lr", "0",
                                 "--min_lr", "0", "--world_variant", "clutter"])
    a, b = final_model(first), final_model(second)
    # (the momentum copies move towards the online weights; the queues take the new features)
    online = [k for k in a if "_m." not in k and "queue" not in k]
    assert len(online) > 50 and all(torch.equal(a[k], b[k]) for k in online)
    saved = torch.load(os.path.join(second, "checkpoint.pt"), weights_only=True)
    assert saved["step"] == 1 and saved["config"]["init_from"].endswith("checkpoint.pt")
    with pytest.raises(SystemExit, match="another architecture"):
        train_pretrain.main(SMALL + ["--out_dir", str(tmp_path / "x"), "--max_steps", "1",
                                     "--init_from", os.path.join(first, "checkpoint.pt"),
                                     "--vision_width", "64", "--text_width", "64"])
