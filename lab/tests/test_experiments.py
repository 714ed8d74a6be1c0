"""lab/experiments.py: the runs each command makes, the summaries (mean ± sd over seeds) from
result files, and one small guidance experiment end to end."""
import json
import os
import subprocess
import sys

import pytest

import world
from lab import experiments

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_transfer_runs_pair_each_seed_with_and_without_pre_training():
    cfg = experiments.TransferConfig(pretrained="ck.pt", tasks=("vqa", "ve"), seeds=(0, 3),
                                     epochs=1, max_steps=5, out_dir="o")
    runs = experiments.transfer_runs(cfg)
    assert [(t, row, s) for t, row, s, _, _ in runs] == [
        (t, row, s) for t in ("vqa", "ve") for row in ("pre-trained", "from scratch") for s in (0, 3)]
    assert len({out for *_, out, _ in runs}) == 8
    for task, row, seed, out, cmd in runs:
        flags = dict(zip(cmd[1::2], cmd[2::2]))
        assert cmd[0] == "train_downstream.py" and flags["--task"] == task
        assert flags["--pretrained"] == ("ck.pt" if row == "pre-trained" else "none")
        # from scratch: the checkpoint's architecture and vocabulary, untrained
        assert flags.get("--scratch_like") == (None if row == "pre-trained" else "ck.pt")
        assert flags["--seed"] == str(seed) and flags["--out_dir"] == out
        assert flags["--max_steps"] == "5" and flags["--epochs"] == "1"
        assert "--world_train" not in flags                                  # 0: the preset's


def test_question_kinds_cover_every_question_template():
    slots = dict(shape="star", colour="orange", a="red circle", b="blue square")
    for kind, template in world.QUESTIONS.items():
        assert experiments.question_kind(template.format(**slots)) == kind


def test_statement_kinds_name_the_template_of_every_statement():
    """Each statement maps to the template it was said from, a slot matching only its own words
    ("both images contain an orange object" is not "a {colour} {shape}")."""
    slots = dict(colour="orange", shape="star", side="right", n="six", k="three", m="zero")
    for template, _ in world.STATEMENTS:
        assert experiments.statement_kind(world._say(template, **slots)) == template
    assert (experiments.statement_kind("both images contain an orange object")
            == "both images contain a {colour} object")
    entries = world.world_entries("nlvr", "test", 150)
    said = {experiments.statement_kind(e["sentence"]) for e in entries}
    assert said == {template for template, _ in world.STATEMENTS}      # the world says them all
    with pytest.raises(ValueError, match="not a statement"):
        experiments.statement_kind("both images contain an orange object twice")


def test_transfer_summary_mean_and_sample_sd(tmp_path):
    cfg = experiments.TransferConfig(pretrained="ck.pt", tasks=("vqa", "nlvr"), seeds=(0, 1),
                                     out_dir=str(tmp_path))
    runs = experiments.transfer_runs(cfg)
    entries = world.world_entries("vqa", "test", 3)
    statements = world.world_entries("nlvr", "test", 3)
    scores = {"pre-trained": (0.8, 0.6), "from scratch": (0.5, 0.5)}
    for task, row, seed, out, _ in runs:
        os.makedirs(out)
        value = scores[row][seed]
        metrics = {"vqa_score": value} if task == "vqa" else {"accuracy": value}
        rec = {"test": {"world": {"metrics": metrics}}, "config": {"world_test": 3, "world_seed": 0}}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(rec, f)
        if task == "vqa":     # the pre-trained model answers every question right, else "yes"
            preds = [{"question_id": e["question_id"],
                      "answer": e["answer"][0] if row == "pre-trained" else "yes"} for e in entries]
            with open(os.path.join(out, "predictions.json"), "w") as f:
                json.dump({"world": preds}, f)
        if task == "nlvr":    # pre-trained right on every statement, from scratch always "true"
            preds = [{"sentence": e["sentence"], "label": int(e["label"]),
                      "prediction": int(e["label"]) if row == "pre-trained" else 1}
                     for e in statements]
            with open(os.path.join(out, "predictions.json"), "w") as f:
                json.dump({"world": preds}, f)
    summary, table = experiments.summarise_transfer(cfg, runs)
    vqa = summary["tasks"]["vqa"]["VQA score"]
    assert vqa["pre-trained"]["mean"] == pytest.approx(0.7)
    assert vqa["pre-trained"]["sd"] == pytest.approx(0.1414, abs=1e-4)       # sample sd of .8, .6
    assert vqa["from scratch"] == {"mean": 0.5, "sd": 0.0, "values": [0.5, 0.5]}
    kinds = {k for k in summary["tasks"]["vqa"] if k.endswith("questions, accuracy")}
    assert kinds and all(summary["tasks"]["vqa"][k]["pre-trained"]["mean"] == 1.0 for k in kinds)
    assert summary["tasks"]["nlvr"]["accuracy"]["pre-trained"]["values"] == [0.8, 0.6]
    nlvr = {k: v for k, v in summary["tasks"]["nlvr"].items() if k.startswith("NLVR2 '")}
    said = {f"NLVR2 '{experiments.statement_kind(e['sentence'])}'" for e in statements}
    assert set(nlvr) == said
    for name, rows in nlvr.items():
        truths = [e["label"] for e in statements
                  if name == f"NLVR2 '{experiments.statement_kind(e['sentence'])}'"]
        assert rows["pre-trained"]["mean"] == 1.0
        assert rows["from scratch"]["mean"] == pytest.approx(sum(truths) / len(truths))
    assert "0.700 ± 0.141" in table and "+0.200" in table


def test_guidance_runs_every_method_at_one_budget():
    cfg = experiments.GuidanceConfig()
    runs = experiments.guidance_runs(cfg)
    labels = [label for label, *_ in runs]
    assert sorted(set(labels)) == ["elip lam 0.6", "elip lam 0.8", "elip lam 1.0", "evit", "none",
                                   "random"]
    assert len(runs) == 6 * 3
    for label, method, lam, seed, out, train, keep in runs:
        flags = dict(zip(train[1::2], train[2::2]))
        assert flags["--world_variant"] == "clutter" and flags["--keep_ratios"] == "0.5,0.3,0.15"
        assert flags["--prune.method"] == method and flags["--seed"] == str(seed)
        assert flags["--init_from"] == "out/pretrain/checkpoint.pt"       # the same start
        assert (keep is None) == (method == "none")
        if method == "elip":
            assert flags["--lam"] == str(lam)
            assert dict(zip(keep[3::2], keep[4::2]))["--lams"].split(",")[0] == str(lam)


def test_guidance_end_to_end_and_rerun_skips_what_is_done(tmp_path):
    out = str(tmp_path / "g")
    cmd = [sys.executable, "-m", "lab.experiments", "guidance", "--methods", "random", "--lams",
           "0.8", "--seeds", "3", "--world_train", "8", "--batch_size", "4", "--epochs", "1",
           "--world_test", "4", "--keep_scenes", "2", "--init_from", "", "--out_dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    r = summary["retrieval"]["random"]["R mean"]
    assert len(r["values"]) == 1 and 0 <= r["mean"] <= 100 and r["sd"] == 0.0
    assert 0 < summary["oracle_r_mean"] <= 100
    keep = summary["keep"]["random"]
    assert keep["all 10"]["mean"] == pytest.approx(int(64 * 0.15) / 64, abs=1 / 64)
    assert "random" in proc.stdout and "± " in proc.stdout
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 2


def test_speed_alternates_the_order_and_reports_the_ratio(tmp_path, monkeypatch):
    """The side-by-side harness: a revision's files come out of git as they were committed; the
    runs alternate base / this; the summary holds the medians and their ratio."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    tree = experiments.revision_tree("HEAD", str(tmp_path))
    committed = subprocess.run(["git", "-C", ROOT, "show", "HEAD:pruning.py"],
                               capture_output=True, text=True).stdout
    assert open(os.path.join(tree, "pruning.py")).read() == committed
    order = []

    def fake_run(tree_dir, out, cfg):
        order.append("this" if tree_dir == experiments.ROOT else "base")
        wall = 60.0 if order[-1] == "this" else 100.0
        return wall, 2 * wall, {"zero_shot_retrieval": {"r_mean": 20.0}, "chance": {"r_mean": 2.0}}

    monkeypatch.setattr(experiments, "timed_run", fake_run)
    experiments.main(["speed", "--base", "HEAD", "--reps", "3", "--out_dir", str(tmp_path)])
    assert order == ["base", "this", "this", "base", "base", "this"]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["wall_ratio"] == pytest.approx(0.6)
    assert summary["median"]["base"]["cpu"] == 200.0


def test_pooled_check_learns_the_colours_a_scene_holds(tmp_path):
    """lab.experiments pooled: a 2-layer ViT told which colours a scene holds learns them within 80
    steps (colour is in every pixel); the table reports each group at each evaluation."""
    experiments.main(["pooled", "--preset", "quick", "--steps", "80", "--eval_every", "40",
                      "--lr", "2e-3", "--out_dir", str(tmp_path)])
    history = json.load(open(tmp_path / "summary.json"))["history"]
    assert [h["step"] for h in history] == [40, 80]
    assert history[-1]["colour"] > 0.75 and history[-1]["loss"] < history[0]["loss"]
    assert 0.3 < history[-1]["colour@cell"] < 0.7          # binding: not within 80 steps
