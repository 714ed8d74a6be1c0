"""train_pretrain.py end to end on a very small model: resume, DDP, real-format data, bad input."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
from PIL import Image

import train_pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a toy ALBEF: its three objectives with a queue (the tiny preset's aids for the world off;
# WORLD_MODEL below turns them back on)
SMALL = ["--img_size", "32", "--patch_size", "8", "--vision_width", "32", "--text_width", "32",
         "--vision_heads", "2", "--text_heads", "2", "--text_mlp", "64", "--embed_dim", "16",
         "--queue_size", "32", "--batch_size", "4", "--world_train", "24", "--world_test", "0",
         "--warmup_steps", "2", "--log_every", "1", "--losses", "itc,itm,mlm", "--objects",
         "false", "--itc_all_captions", "false", "--conv_stem", "false", "--sincos_pos", "0"]


def torchrun(script_and_args, timeout=300):
    """2 ranks of gloo under torchrun, one thread each; the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *script_and_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def launch_ranks(args, n=2, timeout=300):
    """n ranks of train_pretrain.py started as torchrun starts them (RANK, WORLD_SIZE, ...), but
    without its agent, which ends the other ranks as soon as one exits: each rank's (exit code,
    stderr), after it ended by itself (a hang fails at the timeout)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "train_pretrain.py", *args], cwd=ROOT,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            p.kill()


def final_model(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)["model"]


BLIP_MODEL = ["--text_layers", "3", "--fusion_layers", "0", "--losses", "itc,itm,lm",
              "--blip_tokens", "true", "--tie_decoder", "true", "--token_types", "false"]
# the tiny preset as `python train_pretrain.py` runs it: labels on each object's tokens, ITC over
# all captions (without queue), the conv stem and sine-cosine position embeddings
WORLD_MODEL = ["--objects", "true", "--itc_all_captions", "true", "--queue_size", "0",
               "--conv_stem", "true", "--sincos_pos", "0.3"]


@pytest.mark.parametrize("model", [[], BLIP_MODEL, WORLD_MODEL], ids=["albef", "blip_tied", "world"])
def test_resume_gives_the_same_parameters(tmp_path, model):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    three_per_epoch = SMALL + model + ["--world_train", "12"]             # 12 samples / batch 4
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
    train_pretrain.main(three_per_epoch + ["--out_dir", a, "--max_steps", "5",
                                           "--overwrite", "true"])              # a fresh rerun
    assert logged_steps(a) == list(range(1, 6))                               # starts a new log


def test_data_do_not_depend_on_workers_and_resume_exactly_with_them(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = SMALL + ["--world_train", "12"]                                 # 3 steps an epoch
    train_pretrain.main(flags + ["--out_dir", a, "--max_steps", "5", "--num_workers", "0"])
    train_pretrain.main(flags + ["--out_dir", b, "--max_steps", "2", "--num_workers", "2"])
    train_pretrain.main(["--out_dir", b, "--resume", "auto", "--max_steps", "5",
                         "--num_workers", "1"])
    sa, sb = final_model(a), final_model(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset, lrs", [("albef", [1e-5, 1e-5, 1e-5]),     # t = 0 for now
                                         ("blip", [1e-6 + i * 99e-6 / 100 for i in range(3)])])
def test_paper_presets_train_at_small_width(tmp_path, preset, lrs):
    """The albef and blip presets' whole pipeline (RandAugment, their schedules, weight decay
    groups, caption cleaning, padding) at a small width, 3 steps, warmup over 100 iterations."""
    out = str(tmp_path / preset)
    train_pretrain.main(["--preset", preset, *SMALL, "--warmup_steps", "100", "--text_mlp", "64",
                         "--num_workers", "0", "--out_dir", out, "--max_steps", "3",
                         "--world_train", "12"])
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"step"' in l]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert [r["lr"] for r in recs] == pytest.approx(lrs, rel=1e-12)


@pytest.mark.parametrize("model", [[], BLIP_MODEL, WORLD_MODEL], ids=["albef", "blip_tied", "world"])
def test_ddp_two_ranks_stay_identical(tmp_path, model):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_pretrain.py"), *SMALL, *model, "--out_dir", out,
           "--max_steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    sync = [r for r in recs if "ranks_in_sync" in r][-1]
    fps = sync["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1] and sync["ranks_in_sync"]
    # each rank drew its own half of the data: 3 steps of 2 x 4 samples
    assert [r["step"] for r in recs if "step" in r] == [1, 2, 3]
    # the per-rank streams and the data order would not continue on another number of ranks
    with pytest.raises(SystemExit, match="written by 2 processes and this run has 1"):
        train_pretrain.main(["--out_dir", out, "--resume", "auto", "--max_steps", "4"])


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


def test_skipping_unread_momentum_encoders_changes_no_online_weight(tmp_path, monkeypatch):
    """The tiny preset (no queue, no distillation, online ITC) reads nothing of the momentum
    encoders, so they are skipped. They draw no random numbers either (no dropout, no drop
    path), so running them anyway trains the online weights bit for bit the same."""
    flags = SMALL + ["--queue_size", "0", "--max_steps", "3"]
    train_pretrain.main(flags + ["--out_dir", str(tmp_path / "skip")])
    monkeypatch.setattr(train_pretrain.WorldModel, "reads_momentum", True)   # online ITC
    train_pretrain.main(flags + ["--out_dir", str(tmp_path / "run")])
    skip, run = final_model(str(tmp_path / "skip")), final_model(str(tmp_path / "run"))
    momentum = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
    online = [k for k in skip if not k.startswith(momentum)]
    assert len(online) > 100 and all(torch.equal(skip[k], run[k]) for k in online)
    # the forced run did update its teacher; the skipping one left it at its initial copy
    assert not torch.equal(skip["vision_proj_m.weight"], run["vision_proj_m.weight"])


# ---- images that cannot be read at run time ------------------------------------------------
def bad_image_bytes(kind):
    """The bytes of an image file that PIL cannot decode: random bytes, a PNG or a JPEG cut in
    the middle, or nothing."""
    if kind == "unreadable":
        return bytes(range(256)) * 4
    if kind == "empty":
        return b""
    buf = io.BytesIO()
    noise = torch.randint(0, 256, (30, 40, 3), generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.to(torch.uint8).numpy()).save(buf, "PNG" if kind == "truncated_png"
                                                         else "JPEG", quality=90)
    return buf.getvalue()[:len(buf.getvalue()) // 2]


BAD_KINDS = ("unreadable", "truncated_png", "truncated_jpeg", "empty")


def folder_with_bad_images(tmp_path, n, bad):
    """n entries over good JPEGs, entry i showing bad_{kind}.img for each (i, kind) in bad."""
    entries = [{"image": f"im{i % 6}.jpg", "caption": f"a picture number {i}"} for i in range(n)]
    for i, kind in bad:
        entries[i]["image"] = f"bad_{kind}.img"
    path, root = write_folder(tmp_path, entries)
    for _, kind in bad:
        (tmp_path / "images" / f"bad_{kind}.img").write_bytes(bad_image_bytes(kind))
    return ["--train_files", path, "--image_root", root]


@pytest.mark.parametrize("kind, workers", [("unreadable", 0), ("truncated_png", 0),
                                           ("truncated_jpeg", 2), ("empty", 0)])
def test_an_unreadable_image_is_skipped_and_named(tmp_path, capsys, kind, workers):
    out = str(tmp_path / "out")
    data_flags = folder_with_bad_images(tmp_path, 8, [(5, kind)])
    train_pretrain.main(SMALL + data_flags + ["--out_dir", out, "--max_steps", "2",
                                              "--num_workers", str(workers)])
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]           # the run finished
    skips = [r for r in recs if "skipped" in r]
    assert len(skips) == 1 and skips[0]["skipped_total"] == 1
    assert f"bad_{kind}.img" in skips[0]["skipped"][0] and "entry 5" in skips[0]["skipped"][0]
    assert f"bad_{kind}.img" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert [i for i, _ in ckpt["skipped_images"]] == [5]


def test_past_the_limit_the_run_stops_naming_the_files(tmp_path):
    out = str(tmp_path / "out")
    data_flags = folder_with_bad_images(tmp_path, 8, [(2, "empty"), (6, "truncated_jpeg")])
    flags = SMALL + data_flags + ["--out_dir", out, "--max_steps", "2", "--max_bad_images", "0"]
    with pytest.raises(SystemExit, match=r"2 of the 8 training entries .* limit of 1 .*"
                                         r"bad_.*\.img.*bad_.*\.img"):
        train_pretrain.main(flags + ["--bad_images_floor", "1"])
    # a limit of two lets it finish
    train_pretrain.main(flags + ["--bad_images_floor", "2"])


def test_missing_files_are_skipped_when_not_checked(tmp_path):
    out = str(tmp_path / "out")
    data_flags = folder_with_bad_images(tmp_path, 8, [])
    entries = json.load(open(data_flags[1]))
    entries[3]["image"] = "gone.jpg"
    json.dump(entries, open(data_flags[1], "w"))
    with pytest.raises(SystemExit, match=r"1 image files do not exist: .*entry 3.*gone.jpg"):
        train_pretrain.main(SMALL + data_flags + ["--out_dir", out])
    train_pretrain.main(SMALL + data_flags + ["--out_dir", out, "--max_steps", "2",
                                              "--check_images", "false"])
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert any("gone.jpg" in m for r in recs if "skipped" in r for m in r["skipped"])


def test_two_ranks_skip_unreadable_images_and_stop_together(tmp_path):
    bad = [(1, "unreadable"), (6, "truncated_png"), (10, "truncated_jpeg"), (13, "empty")]
    flags = SMALL + folder_with_bad_images(tmp_path, 16, bad) + ["--max_steps", "2"]
    out = str(tmp_path / "out")
    proc = torchrun(["train_pretrain.py", *flags, "--out_dir", out, "--num_workers", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr and "DeprecationWarning" not in proc.stderr
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]
    named = [m for r in recs if "skipped" in r for m in r["skipped"]]
    assert sorted(m.split("bad_")[1].split(".img")[0] for m in named) == sorted(k for _, k in bad)
    assert max(r["skipped_total"] for r in recs if "skipped" in r) == 4        # over both ranks
    assert recs[-1]["ranks_in_sync"]
    # past the limit, every rank stops with the error by itself
    ranks = launch_ranks([*flags, "--out_dir", str(tmp_path / "stop"), "--max_bad_images", "0",
                          "--bad_images_floor", "2"])
    for code, err in ranks:
        assert code == 1 and "training entries have an image that cannot be read, more than " \
            "the limit of 2" in err, err[-3000:]


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


# ---- runs that lose nothing ------------------------------------------------------------------
def wait_for_step(out_dir, step, proc, timeout=120):
    """Until out_dir/log.jsonl logs `step` (the run is inside its loop)."""
    path, t0 = os.path.join(out_dir, "log.jsonl"), time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(path) and any(json.loads(l).get("step", 0) >= step
                                        for l in open(path) if l.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {path}: {proc.poll()}")


def interrupted_then_resumed(tmp_path, launch, signum, flags):
    """A run of `flags` stopped by `signum` after its second step, then resumed to the end:
    (exit code, stderr of the stopped run, the step it stopped at, the resumed final model)."""
    out = str(tmp_path / "stopped")
    proc = subprocess.Popen(launch + [*flags, "--out_dir", out], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, proc)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    stopped = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"]
    resume = subprocess.run(launch + ["--out_dir", out, "--resume", "auto"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]
    return proc.returncode, err, stopped, final_model(out)


def test_ctrl_c_writes_the_checkpoint_and_a_resume_gives_the_same_model(tmp_path):
    flags = SMALL + ["--world_train", "40", "--max_steps", "30"]
    straight = str(tmp_path / "straight")
    train_pretrain.main(flags + ["--out_dir", straight])
    code, err, stopped, resumed = interrupted_then_resumed(
        tmp_path, [sys.executable, "train_pretrain.py"], signal.SIGINT, flags)
    assert code == 128 + signal.SIGINT and 2 <= stopped < 30, (code, err[-2000:])
    assert "stopped by SIGINT" in err and "--resume auto" in err and "Traceback" not in err
    want = final_model(straight)
    assert all(torch.equal(want[k], resumed[k]) for k in want)


def test_sigterm_stops_two_ranks_at_one_step_and_the_resume_is_exact(tmp_path):
    flags = SMALL + ["--world_train", "48", "--max_steps", "30"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
              "2", "train_pretrain.py"]
    straight = str(tmp_path / "straight")
    proc = torchrun(["train_pretrain.py", *flags, "--out_dir", straight])
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, err, stopped, resumed = interrupted_then_resumed(tmp_path, launch, signal.SIGTERM,
                                                           flags)
    assert code != 0 and 2 <= stopped < 30, (code, err[-3000:])
    assert err.count("Resume with:") == 1                  # rank 0 says it, once
    want = final_model(straight)
    assert all(torch.equal(want[k], resumed[k]) for k in want)


def test_an_out_dir_with_a_checkpoint_is_not_overwritten_by_accident(tmp_path, capsys):
    out = str(tmp_path / "o")
    train_pretrain.main(SMALL + ["--out_dir", out, "--max_steps", "1", "--resume", "auto"])
    assert "no checkpoint in" in capsys.readouterr().out            # a fresh start, said
    before = open(os.path.join(out, "log.jsonl")).read()
    with pytest.raises(SystemExit, match=r"exists: continue it with --resume auto, or start "
                                         r"afresh over it with --overwrite true"):
        train_pretrain.main(SMALL + ["--out_dir", out, "--max_steps", "1"])
    assert open(os.path.join(out, "log.jsonl")).read() == before      # nothing lost


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "batch_size 0 must be >= 1"),
    (["--epochs", "0"], "epochs 0 must be >= 1"),
    (["--max_bad_images", "2"], r"max_bad_images 2.0 must lie in \[0, 1\]"),
    (["--keep_ratios", "0.9,1.5,0.4"], "keep_ratios"),
    (["--train_files", "nowhere.json"], "--train_files nowhere.json does not exist"),
    (["--vocab", "no_vocab.txt"], "--vocab no_vocab.txt does not exist"),
    (["--batch_sise", "4"], "did you mean --batch_size"),
])
def test_bad_values_are_refused_before_anything_is_built(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_pretrain.main(SMALL + flags + ["--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_own_captions_build_their_vocabulary_and_are_scored_zero_shot(tmp_path, capsys):
    """Words the world never says ("dog", "bench") are tokens of their own, not [UNK]; the
    objects loss, which needs the world's images, switches off; the held-out file is scored."""
    words = ["dog", "bench", "man", "wooden", "sitting", "red", "kite", "beach"]
    entries = [{"image": f"im{i}.jpg", "caption": [f"a {words[i]} next to a {words[i + 1]}",
                                                   f"the {words[i + 2]} is {words[i % 3]}"]}
               for i in range(6)]
    path, root = write_folder(tmp_path, entries)
    held = tmp_path / "held.json"
    held.write_text(json.dumps([{"image": f"im{i}.jpg", "caption": [f"a {words[i]}"]}
                                for i in range(4)]))
    out = str(tmp_path / "out")
    flags = SMALL[:SMALL.index("--objects")] + SMALL[SMALL.index("--objects") + 2:]
    train_pretrain.main(flags + ["--train_files", path, "--image_root", root, "--out_dir", out,
                                 "--max_steps", "2", "--test_files", str(held)])
    printed = capsys.readouterr().out
    assert "the objects loss (the embedded world's object labels) is off" in printed
    assert "[UNK] is 0.0% of the training captions' tokens" in printed
    vocab = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["vocab"]
    assert {"dog", "bench", "kite"} <= set(vocab)
    rec = json.load(open(os.path.join(out, "zero_shot.json")))
    assert rec["chance"]["r_mean"] > 0 and rec["oracle"] is None
    assert "zero-shot retrieval" in printed and "chance" in printed


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Between log lines, the loop never waits for the device: no .item() on a tensor of the
    step (on a GPU, a host sync); the losses are read at log_every. Reads made while loading
    data (torchvision's crops, the DataLoader's seeds: on the CPU by design) do not count."""
    calls = []
    real_item = torch.Tensor.item

    def item(t):
        frames = traceback.extract_stack()
        in_loop = any(f.name == "train" and f.filename.endswith("train_pretrain.py")
                      for f in frames)
        loading = any("torchvision" in f.filename or "torch/utils/data" in f.filename
                      or f.name == "__getitem__" for f in frames)
        if in_loop and not loading:
            calls.append(frames[-2].name)
        return real_item(t)

    monkeypatch.setattr(torch.Tensor, "item", item)
    train_pretrain.main(SMALL + ["--out_dir", str(tmp_path / "o"), "--max_steps", "6",
                                 "--log_every", "3", "--ckpt_every", "0", "--queue_size", "8"])
    logged = [json.loads(l) for l in open(tmp_path / "o" / "log.jsonl") if '"loss"' in l]
    assert [r["step"] for r in logged] == [3, 6]
    # itc, itm, mlm and loss, read by the log line (Meter.step) of steps 3 and 6 alone
    assert calls == ["<dictcomp>"] * 8, calls
