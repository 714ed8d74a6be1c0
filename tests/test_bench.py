"""The efficiency benchmark (bench.py): exact FLOP and saved-byte counts on cases worked out by
hand, measured sequence lengths against pruning.token_counts for every method of
pruning.METHODS, the model configuration taken from the arch preset, the flags, and a small
end-to-end run of `python bench.py`. No timing assertions."""
import gc
import json
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench
from model import PRESETS as MODEL_PRESETS
from pruning import METHODS, PruneConfig, token_counts
from vit import VisionTransformer


def tiny_vit(prune):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=4,
                             prune=prune)


def vit_loss(vit):
    def loss(batch):
        g = torch.Generator().manual_seed(batch)
        return vit(torch.randn(batch, 3, 32, 32, generator=g),
                   torch.randn(batch, 48, generator=g)).mean()
    return loss


def test_flops_of_a_linear_layer():
    B, I, O = 3, 5, 7
    lin = nn.Linear(I, O)
    fwd = 2 * B * I * O             # a multiply-add per (row, in, out) = 2 FLOPs; the bias is free
    x = torch.randn(B, I)
    with torch.no_grad(), bench.flop_counter_mode() as f:
        lin(x)
    assert f.get_total_flops() == fwd
    # backward: the weight gradient x^T @ grad costs as much as the forward; an input that needs
    # no gradient skips grad @ W, so a training step is 2x the forward, not 3x
    with bench.flop_counter_mode() as f:
        lin(x).sum().backward()
    assert f.get_total_flops() == 2 * fwd
    with bench.flop_counter_mode() as f:
        lin(x.requires_grad_()).sum().backward()
    assert f.get_total_flops() == 3 * fwd


def test_flops_of_fused_attention_on_cpu():
    B, H, N, Dh = 2, 3, 10, 8
    q, k, v = (torch.randn(B, H, N, Dh, requires_grad=True) for _ in range(3))
    unit = B * H * N * N * Dh
    with torch.no_grad(), bench.flop_counter_mode() as f:
        F.scaled_dot_product_attention(q, k, v)
    assert f.get_total_flops() == 4 * unit                  # Q K^T and A V
    with bench.flop_counter_mode() as f:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert f.get_total_flops() == (4 + 10) * unit           # backward: recompute + 4 products


def test_flops_of_a_vit_training_step_exactly():
    """The counted FLOPs of the unpruned tiny ViT equal the hand count: per layer 12 D^2 weights
    (qkv 3, proj 1, MLP 8) and the two attention products; the patch embedding's input (the
    images) needs no gradient, so its backward is the weight gradient only."""
    vit = tiny_vit(PruneConfig(method="none"))
    B, L, D, M, P = 2, 65, 48, 64, 4
    fig = bench.train_step_figures(vit_loss(vit), vit, vit.blocks, B)
    embed = 2 * B * M * D * (3 * P * P)
    layer_fwd = 2 * B * L * 12 * D * D + 4 * B * L * L * D
    layer_bwd = 2 * (2 * B * L * 12 * D * D) + 10 * B * L * L * D
    assert fig["train_flops"] == 2 * embed + 12 * (layer_fwd + layer_bwd)


def test_saved_bytes_known_cases():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(3, 4, requires_grad=True)
    n = 3 * 4 * 4                                           # bytes of one float32 (3, 4)

    def saved(fn, exclude=()):
        with bench.saved_tensor_bytes(exclude) as s:
            out = fn()                  # counted at the end of the block: keep the graph alive
        del out
        return sum(s.values())

    assert saved(lambda: x * y) == 2 * n                    # each factor, for the other's grad
    assert saved(lambda: x * x) == n                        # saved twice, counted once
    assert saved(lambda: x * y, exclude=[x]) == n
    assert saved(lambda: x[:1] * y[:1]) == 2 * n            # a saved view holds all its storage
    assert saved(lambda: x.detach() * y) == n               # only what y's gradient needs
    with torch.no_grad():
        assert saved(lambda: x * y) == 0
    lin = nn.Linear(4, 5)                                   # weight excluded: the input only
    assert saved(lambda: lin(torch.randn(3, 4)), exclude=list(lin.parameters())) == n


def test_saved_bytes_keep_gradients_and_free_the_graph():
    x = torch.randn(3, 4, requires_grad=True)
    with bench.saved_tensor_bytes() as s:
        y = torch.sigmoid(x)                                # saves its own output
    assert sum(s.values()) == 3 * 4 * 4
    g, = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.sigmoid(x) * (1 - torch.sigmoid(x)))
    with bench.saved_tensor_bytes():
        y = torch.sigmoid(x)
    ref = weakref.ref(y)
    del y
    gc.collect()
    assert ref() is None            # never backpropagated, yet freed: no cycle through grad_fn


def test_saved_bytes_leave_out_a_discarded_branch():
    x = torch.randn(3, 4, requires_grad=True)
    with bench.saved_tensor_bytes() as s:
        torch.sigmoid(2 * x)        # its saved output is freed with the unused result
        y = torch.sigmoid(x)
    assert sum(s.values()) == 3 * 4 * 4
    del y


@pytest.mark.parametrize("method", METHODS)
def test_measured_lengths_equal_token_counts(method):
    prune = PruneConfig(method=method, tome_r=6)
    vit = tiny_vit(prune)
    fig = bench.train_step_figures(vit_loss(vit), vit, vit.blocks, 2)
    counts = token_counts(vit.num_patches, 12, prune)
    assert fig["lengths"] == counts
    assert bench.removed_ratio(fig["lengths"], 64) == pytest.approx(1 - sum(counts) / (12 * 65))
    if method != "none":
        none = tiny_vit(PruneConfig(method="none"))
        assert fig["act_bytes"] < bench.train_step_figures(vit_loss(none), none, none.blocks,
                                                         2)["act_bytes"]


def test_removed_ratio_and_tome_r_at_224():
    elip = token_counts(196, 12, PruneConfig())
    assert bench.removed_ratio(elip, 196) == pytest.approx(1 - 1684 / 2364)   # ~28.8%, paper ~30%
    # ToMe removes r, 2r, ..., 11r tokens in layers 1..11: 66 r token-layers; r = 10 is closest
    assert bench.matching_tome_r(196, 12, bench.removed_ratio(elip, 196)) == 10


def test_model_config_comes_from_the_arch_preset():
    prune = PruneConfig(keep_ratios=(0.8, 0.6, 0.3))
    mc = bench.bench_model_config(bench.BenchConfig(), prune)             # albef at 224 px
    albef = MODEL_PRESETS["albef"]
    assert (mc.img_size, mc.patch_size, mc.vision_width, mc.vision_depth, mc.vision_heads) == \
        (224, albef["patch_size"], albef["vision_width"], albef["vision_depth"],
         albef["vision_heads"])
    assert (mc.text_layers, mc.fusion_layers, mc.losses) == \
        (albef["text_layers"], albef["fusion_layers"], albef["losses"])
    assert mc.prune == prune and mc.queue_size == 1024 and (mc.vocab_size, mc.max_len) == (1000, 30)
    assert bench.bench_model_config(bench.BenchConfig(img_size=0), prune).img_size == 256
    tiny = bench.bench_model_config(bench.BenchConfig(arch="tiny", img_size=0), prune)
    assert (tiny.img_size, tiny.patch_size, tiny.queue_size) == (64, 8, 0)   # the arch's queue


def test_method_prune_configs_share_the_schedule():
    cfg = bench.BenchConfig(prune=PruneConfig(prune_layers=(3, 6), keep_ratios=(0.7, 0.5),
                                              lam=0.6, tome_r=5))
    prunes = bench.method_prune_configs(cfg, 196, 12)
    assert cfg.methods == METHODS                                     # every method by default
    assert list(prunes) == list(cfg.methods)                          # none first
    elip = token_counts(196, 12, prunes["elip"])
    assert prunes["tome"].tome_r == bench.matching_tome_r(196, 12, bench.removed_ratio(elip, 196))
    for method, p in prunes.items():
        assert p.method == method and p.in_eval
        assert (p.prune_layers, p.keep_ratios, p.lam) == ((3, 6), (0.7, 0.5), 0.6)
    cfg = bench.BenchConfig(methods=("tome", "none"), match_tome_r=False,
                            prune=PruneConfig(tome_r=5))
    prunes = bench.method_prune_configs(cfg, 196, 12)
    assert list(prunes) == ["none", "tome"] and prunes["tome"].tome_r == 5


def test_flags_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "tiny", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--arch (str, default 'tiny')" in out and "--img_size (int, default 0)" in out
    assert "--prune.keep_ratios (float,..., default '0.9,0.65,0.4')" in out
    assert f"--methods (str,..., default '{','.join(METHODS)}')" in out
    assert "timed training steps per method, after the warm-up" in out      # the field's comment
    for argv, what in [(["--arch", "vit_huge"], "arch"), (["--methods", "elip,tome"], "none"),
                       (["--whole_batch", "1"], "whole_batch"), (["--width", "64"], "unknown")]:
        with pytest.raises(SystemExit, match=what):
            bench.main(argv)


def test_bench_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--img_size", "32", "--batch", "2", "--reps", "1",
                "--warmup", "0", "--whole_model", "true", "--whole_batch", "2",
                "--whole_vocab", "50", "--text_len", "6", "--methods", "none,elip,tome",
                "--out", str(out)])
    report = json.loads(out.read_text())
    M = (32 // 8) ** 2                                  # the tiny arch: patch 8
    assert report["model_config"]["img_size"] == 32 and report["model_config"]["queue_size"] == 0
    assert report["tome_r"] == bench.matching_tome_r(M, 12, bench.removed_ratio(
        token_counts(M, 12, PruneConfig()), M))
    for scope in (report["vit"], report["whole_model"]):
        assert list(scope) == ["none", "elip", "tome"]
        for fig in scope.values():
            assert fig["lengths_match_token_counts"]
        assert scope["elip"]["ratio"]["act_bytes"] < 1
        assert scope["elip"]["ratio"]["train_flops"] < 1
    text = capsys.readouterr().out
    assert "tome r = " in text and "= token_counts" in text


# ---- --gpu_step: Table 1's comparison --------------------------------------------------------
# the albef preset at toy width, its losses, queue, distillation and ELIP schedule kept
SHRUNK_ALBEF = dict(img_size=32, patch_size=8, vision_width=32, vision_heads=2, text_width=32,
                    text_layers=1, fusion_layers=1, text_heads=2, text_mlp=64, embed_dim=16,
                    queue_size=64)


def test_gpu_step_config_is_the_preset_at_full_size():
    for arch, size, tokens, vocab, queue, batch in [("albef", 256, 25, 30522, 65536, 40),
                                                    ("blip", 224, 30, 30524, 57600, 42)]:
        step = bench.gpu_step_config(bench.BenchConfig(gpu_step=arch))
        mc = bench.bench_model_config(step, PruneConfig())
        assert (mc.img_size, mc.max_len, mc.vocab_size, mc.queue_size, step.whole_batch) == \
            (size, tokens, vocab, queue, batch)
        assert (mc.vision_width, mc.text_layers + mc.fusion_layers) == (768, 12)
    assert bench.gpu_step_config(bench.BenchConfig(gpu_step="blip", gpu_batch=4)).whole_batch == 4


def test_gpu_step_flags_and_no_cuda(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--gpu_step (str, default '')" in out and "--gpu_batch (int, default 0)" in out
    for argv in (["--gpu_step", "vit"], ["--gpu_step", "albef", "--gpu_batch", "1"]):
        with pytest.raises(SystemExit, match="gpu_step"):
            bench.main(argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--gpu_step needs a CUDA GPU"):
        bench.main(["--gpu_step", "albef"])


def test_step_seconds_with_an_optimizer_updates_the_weights():
    lin = nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    bench.step_seconds(lambda b: lin(torch.ones(b, 3)).sum(), lin, 2, torch.device("cpu"), opt)
    assert not torch.equal(lin.weight, before) and lin.weight.grad is None


def test_gpu_step_on_cpu_at_toy_width(tmp_path, monkeypatch, capsys):
    """The --gpu_step path end to end on the CPU (--device cpu) with the albef preset shrunk:
    the model of the preset, the two methods, the ratios from the measured medians."""
    monkeypatch.setitem(MODEL_PRESETS, "albef", {**MODEL_PRESETS["albef"], **SHRUNK_ALBEF})
    out = tmp_path / "step.json"
    bench.main(["--gpu_step", "albef", "--device", "cpu", "--gpu_batch", "2", "--reps", "2",
                "--warmup", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    mc, figs = report["model_config"], report["gpu_step"]
    assert (mc["img_size"], mc["vocab_size"], mc["queue_size"], mc["max_len"]) == (32, 30522, 64, 25)
    assert mc["losses"] == ["itc", "itm", "mlm"] and report["config"]["whole_batch"] == 2
    assert list(figs) == ["none", "elip"] and not report["tf32"]
    for fig in figs.values():
        assert len(fig["step_s_all"]) == 2 and fig["peak_bytes"] is None
        assert fig["step_s"] == pytest.approx(sum(fig["step_s_all"]) / 2)     # median of 2
    assert report["ratio"] == {"step_s": pytest.approx(figs["elip"]["step_s"] /
                                                       figs["none"]["step_s"]),
                               "peak_bytes": None}
    assert report["paper"]["step_s"] == pytest.approx(518 / 594)
    assert report["paper"]["peak_bytes"] == pytest.approx(69.6 / 88.1)
    rows = {line[:12].strip(): line[12:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows["elip / none"] == [f"{report['ratio']['step_s']:.3f}", "-"]
    assert rows["paper"][:2] == ["0.87", "0.79"]


def test_gpu_step_ratios_come_from_the_measurements(tmp_path, monkeypatch, capsys):
    """With a memory figure (a GPU's), both ratios are elip's measurement over none's."""
    measured = {"none": (2.0, 10 * 2 ** 30), "elip": (1.5, 7 * 2 ** 30)}

    def fake(cfg, prune, device):
        step, peak = measured[prune.method]
        return dict(step_s=step, step_s_all=[step], peak_bytes=peak)

    monkeypatch.setattr(bench, "measure_gpu_step", fake)
    report = bench.run_gpu_step(bench.BenchConfig(gpu_step="blip", device="cpu"))
    assert report["ratio"] == {"step_s": 0.75, "peak_bytes": 0.7}
    assert report["paper"]["step_s"] == pytest.approx(960 / 1102)
    text = bench.format_gpu_step(report)
    rows = {line[:12].strip(): line[12:].split() for line in text.splitlines()}
    assert rows["none"] == ["2.000", "10.000"] and rows["elip"] == ["1.500", "7.000"]
    assert rows["elip / none"] == ["0.750", "0.700"] and rows["paper"][:2] == ["0.87", "0.82"]
