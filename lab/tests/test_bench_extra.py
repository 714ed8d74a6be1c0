"""The benchmark's research extras (lab/bench_extra.py): the ELIP+ batch search on memory curves
worked out by hand and on a real ViT, the flags (bench.py's nested under --bench), and a small
end-to-end run of `python -m lab.bench_extra`. No timing assertions."""
import json

import pytest

from lab import analysis, bench_data, bench_extra, experiments
from pruning import PruneConfig, token_counts
from tests.test_bench import tiny_vit, vit_loss
from tests.test_config import undescribed_flags


def test_elip_plus_search_on_known_memory_curves():
    assert bench_extra.elip_plus_batch(lambda b: 100 + 30 * b, 400, 2, 4)["batch"] == 10
    curved = bench_extra.elip_plus_batch(lambda b: 100 + 30 * b + b * b, 400, 2, 4)  # fit hopeful
    assert curved["batch"] == 7 and curved["bytes"] == 359
    assert bench_extra.elip_plus_batch(lambda b: 100 + 30 * b, 120, 2, 4, min_batch=2)["batch"] == 1


def test_elip_plus_batch_fits():
    none, elip = tiny_vit(PruneConfig(method="none")), tiny_vit(PruneConfig())
    budget = bench_extra.activation_bytes(vit_loss(none), none, 4)

    def measure(b):
        return bench_extra.activation_bytes(vit_loss(elip), elip, b)

    found = bench_extra.elip_plus_batch(measure, budget, 2, 4)
    assert found["batch"] > 4                   # elip stores ~73% of the activations here
    assert measure(found["batch"]) == found["bytes"] <= budget < measure(found["batch"] + 1)


def test_flags_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench_extra.main(["--preset", "tiny", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--bench.arch (str, default 'tiny')" in out and "--op_reps (int, default 5)" in out
    assert "timed runs of prune_and_merge at each cut" in out              # the field's comment
    assert "timed training steps per method, after the warm-up" in out     # bench.py's, nested
    for argv, what in [(["--arch", "vit_huge"], "arch"), (["--op_reps", "-1"], "op_reps"),
                       (["--width", "64"], "unknown"),
                       (["--gpu_step", "albef"], "bench.py's own measurement")]:
        with pytest.raises(SystemExit, match=what):
            bench_extra.main(argv)


def test_bench_extra_end_to_end(tmp_path, capsys):
    out = tmp_path / "extra.json"
    bench_extra.main(["--preset", "tiny", "--img_size", "32", "--batch", "2", "--reps", "1",
                      "--warmup", "0", "--op_reps", "1", "--timm_reps", "1",
                      "--whole_model", "true", "--whole_batch", "2", "--whole_vocab", "50",
                      "--text_len", "6", "--methods", "none,elip,tome", "--out", str(out)])
    report = json.loads(out.read_text())
    M = (32 // 8) ** 2                                  # the tiny arch: patch 8
    for scope in ("vit", "whole_model"):
        plus = report["elip_plus"][scope]
        assert list(plus) == ["none", "elip", "tome"]
        assert all(found["bytes"] <= plus["none"]["budget"] for found in plus.values())
        assert plus["none"]["batch"] == 2 <= plus["elip"]["batch"]
    pm = report["prune_and_merge"]
    assert [c["layer"] for c in pm["cuts"]] == [2, 4, 10]
    assert [c["num_keep"] for c in pm["cuts"]] == [int(M * r) for r in (0.9, 0.65, 0.4)]
    assert [c["input_shape"][1] for c in pm["cuts"]] == \
        [token_counts(M, 12, PruneConfig())[i - 1] for i in (2, 4, 10)]
    assert pm["share"] == pytest.approx(sum(c["seconds"] for c in pm["cuts"]) / pm["step_s"])
    t = report["timm"]
    assert "skipped" in t or min(t["ours_train_flops"], t["timm_train_flops"], t["ours_s"]) > 0
    text = capsys.readouterr().out
    assert "ELIP+ (vit)" in text and "all cuts: " in text


def test_every_flag_of_every_lab_command_says_what_it_does():
    configs = [bench_extra.ExtraConfig(), analysis.KeepConfig(), analysis.PictureConfig(),
               analysis.KindsConfig(), bench_data.CorpusConfig(), bench_data.LoadingConfig(),
               bench_data.ExistConfig(),
               experiments.TransferConfig(), experiments.GuidanceConfig(),
               experiments.SpeedConfig(), experiments.PooledConfig()]
    for cfg in configs:
        assert undescribed_flags(cfg) == [], type(cfg).__name__
