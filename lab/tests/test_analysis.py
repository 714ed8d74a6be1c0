"""What the pruning keeps (lab/analysis.py): the kept-patch masks against pruning.token_counts, the
object-patch rule on hand-made masks, loading a checkpoint, and the `keep`, `picture` and
`kinds` commands end to end on a tiny random checkpoint, and the probes of lab/probes.py."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import metrics
import world
from lab import analysis, probes
from model import ELIPModel, ModelConfig
from pruning import PruneConfig, token_counts
from tokenizer import Tokenizer
from trainer import save_checkpoint
from vit import PatchEmbed, VisionTransformer


def tiny_vit(prune):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=4,
                             prune=prune).eval()


def vit_inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 48, generator=g)


@pytest.mark.parametrize("method", ["elip", "elip_inline", "evit", "random"])
def test_kept_patches_match_token_counts(method):
    images, text_cls = vit_inputs()
    # prune only: every token entering a later layer but [CLS] is a patch, so the kept patches
    # are exactly what token_counts predicts
    prune = PruneConfig(method=method, merge=False, in_eval=True)
    kept = analysis.kept_patches(tiny_vit(prune), images, text_cls)                 # (B, S, M)
    counts = token_counts(64, 12, prune)
    assert kept.shape == (3, 3, 64)
    for s, layer in enumerate(prune.prune_layers):
        assert (kept[:, s].sum(1) == counts[layer] - 1).all()
    # with merging, the fused token is no patch; from the second cut on, the fused token of the
    # cut before is a candidate like any other, and when kept it takes a patch's place
    prune = PruneConfig(method=method, in_eval=True)
    vit = tiny_vit(prune)
    torch.manual_seed(0)                                  # the same draws for random, twice
    kept = analysis.kept_patches(vit, images, text_cls)
    torch.manual_seed(0)
    _, sources = vit.forward_features(images, text_cls)
    counts = token_counts(64, 12, prune)
    assert list(sources) == list(prune.prune_layers)
    for s, (layer, src) in enumerate(sources.items()):
        fused = (src == -1).sum(1)                                             # (B,)
        assert (kept[:, s].sum(1) == counts[layer] - 1 - fused).all()
        assert (fused >= 1).all() and (fused <= s + 1).all()
    assert (kept[:, 0].sum(1) == counts[2] - 2).all()                          # int(64 * 0.9)
    # a patch that is gone never comes back
    assert not (kept[:, 1:] & ~kept[:, :-1]).any()


def test_kept_patches_are_the_sources():
    images, text_cls = vit_inputs()
    vit = tiny_vit(PruneConfig(in_eval=True))
    kept = analysis.kept_patches(vit, images, text_cls)
    _, sources = vit.forward_features(images, text_cls)
    for s, src in enumerate(sources.values()):
        for b in range(3):
            assert set(torch.nonzero(kept[b, s]).flatten().tolist()) == \
                set(src[b][src[b] >= 0].tolist())


def test_method_none_keeps_everything():
    images, text_cls = vit_inputs()
    vit = tiny_vit(PruneConfig(method="none", in_eval=True))
    kept = analysis.kept_patches(vit, images, text_cls, layers=(2, 4, 10))
    assert kept.shape == (3, 3, 64) and kept.all()
    assert analysis.kept_patches(vit, images, text_cls).shape == (3, 0, 64)   # no cuts of its own
    named = torch.zeros(3, 64, dtype=torch.bool)
    named[:, 5:9] = True
    objects = named.clone()
    objects[:, 20:30] = True
    pairs = dict(images=images, scene=torch.arange(3), named=named, objects=objects)
    fractions = analysis.keep_fractions(vit, pairs, text_cls, [2, 4, 10], batch=2)
    assert fractions == [[1.0, 1.0, 1.0]] * 3


def test_keep_fractions_count_by_hand():
    images, text_cls = vit_inputs(2)
    vit = tiny_vit(PruneConfig(merge=False, in_eval=True))
    named = torch.zeros(2, 64, dtype=torch.bool)
    named[0, :10], named[1, 30:40] = True, True
    objects = named.clone()
    objects[:, 50:] = True
    pairs = dict(images=images, scene=torch.tensor([0, 1]), named=named, objects=objects)
    fractions = analysis.keep_fractions(vit, pairs, text_cls, [2, 4, 10], batch=1)
    kept = analysis.kept_patches(vit, images, text_cls, [2, 4, 10])
    for s in range(3):
        assert fractions[s][0] == pytest.approx((kept[:, s] & named).sum().item() / 20)
        assert fractions[s][1] == pytest.approx(kept[:, s, 50:].sum().item() / 28)
        assert fractions[s][2] == pytest.approx(int(64 * (0.9, 0.65, 0.4)[s]) / 64)


def test_a_cut_that_keeps_everything_leaves_the_mask_alone():
    images, text_cls = vit_inputs()
    prune = PruneConfig(prune_layers=(2, 4), keep_ratios=(1.0, 0.5), in_eval=True)
    _, sources = tiny_vit(prune).forward_features(images, text_cls)
    assert list(sources) == [4]                            # the first cut keeps every token
    kept = analysis.kept_patches(tiny_vit(prune), images, text_cls)
    assert kept[:, 0].all() and (kept[:, 1].sum(1) == 32).all()


def test_eval_mode_without_in_eval_is_refused():
    images, text_cls = vit_inputs()
    with pytest.raises(ValueError, match="in_eval"):
        analysis.kept_patches(tiny_vit(PruneConfig()), images, text_cls)


def test_object_patch_rule_on_a_hand_made_mask():
    mask = torch.zeros(16, 16, dtype=torch.bool)                 # 2 x 2 patches of 8 x 8
    mask[0:4, 0:8] = True                                        # top left: 32 of 64, half
    mask[0:3, 8:16] = True                                       # top right: 24 + 7 = 31
    mask[3, 8:15] = True
    mask[8:16, 8:16] = True                                      # bottom right: all
    mask[8, 0] = True                                            # bottom left: one pixel
    assert analysis.object_patches(mask, 8).tolist() == [True, False, False, True]
    assert analysis.object_patches(mask, 8, cover=0.25).tolist() == [True, True, False, True]
    both = torch.stack([mask, ~mask])                            # (O, H, W) -> (O, M)
    assert analysis.object_patches(both, 8).tolist() == [[True, False, False, True],
                                                   [True, True, True, False]]
    # the same patch order as the ViT's patch embedding (row-major)
    embed = PatchEmbed(16, 8, 1)
    torch.nn.init.ones_(embed.proj.weight)
    torch.nn.init.zeros_(embed.proj.bias)
    touched = embed(mask.float().expand(1, 3, 16, 16))[0, :, 0] > 0         # (M,)
    assert touched.tolist() == analysis.object_patches(mask, 8, cover=1 / 64).tolist()


def test_grey_out_darkens_the_dropped_patches_only():
    pixels = np.random.default_rng(0).integers(60, 255, (16, 16, 3), dtype=np.uint8)
    keep = np.array([True, False, True, True])
    out = analysis.grey_out(pixels, keep, 8)
    assert (out[:8, :8] == pixels[:8, :8]).all() and (out[8:] == pixels[8:]).all()
    dropped = out[:8, 8:].astype(int)
    assert (dropped[..., 0] == dropped[..., 1]).all() and (dropped < pixels[:8, 8:]).all()


# ---- the commands, on a tiny random checkpoint ----------------------------------------------
TINY = dict(img_size=32, patch_size=8, vision_width=32, text_width=32, vision_heads=2,
            text_heads=2, text_mlp=64, embed_dim=16, queue_size=0)


WORLD_SEED = 3


def tiny_model_config():
    tok = Tokenizer.build([" ".join(world.World.vocabulary())])
    return ModelConfig(**TINY, prune=PruneConfig(keep_ratios=(0.9, 0.6, 0.4)),
                       vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id,
                       mask_id=tok.mask_id), tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint laid out as pre-training writes it: model, config (the TrainConfig as a dict,
    the ModelConfig under "model", the world's seed at the top level) and vocab."""
    mc, tok = tiny_model_config()
    torch.manual_seed(0)
    model = ELIPModel(mc)
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")
    save_checkpoint(path, model=model.state_dict(), vocab=tok.vocab,
                    config=dict(model=dataclasses.asdict(mc), world_seed=WORLD_SEED, lr=1e-4))
    return path


def test_load_for_analysis(checkpoint, tmp_path):
    model, tok, w = analysis.load_for_analysis(checkpoint)
    mc, ref_tok = tiny_model_config()
    assert (w.seed, w.variant) == (WORLD_SEED, "default") and model.cfg == mc and not model.training
    assert tok.vocab == ref_tok.vocab
    torch.manual_seed(0)
    ref = ELIPModel(mc).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, model={}, config=dict(lr=1e-4))
    with pytest.raises(SystemExit, match="not a checkpoint"):
        analysis.load_for_analysis(other)


def test_keep_command_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "keep.json"
    analysis.keep_main(["--checkpoint", checkpoint, "--scenes", "3", "--captions", "2",
                  "--methods", "none,elip,random", "--lams", "0.8,1.0", "--threads", "1",
                  "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["rows"]] == ["elip lam 0.8", "elip lam 1.0", "none",
                                                    "random"]
    assert report["pairs"] == 6 and report["num_patches"] == 16
    assert report["world_seed"] == WORLD_SEED
    none = report["rows"][2]
    assert all(s[k] == 1.0 for s in none["stages"] for k in ("named", "other", "all"))
    for row in report["rows"]:
        assert [s["layer"] for s in row["stages"]] == [2, 4, 10]
        if row["method"] != "none":
            assert row["stages"][0]["all"] == int(16 * 0.9) / 16
            # the checkpoint's schedule: 9 of 16 kept, one of them maybe the merged token
            assert 8 / 16 <= row["stages"][1]["all"] <= 9 / 16
            assert all(0.0 <= s["named"] <= 1.0 for s in row["stages"])
    assert "elip lam 0.8" in capsys.readouterr().out


def test_world_pairs_name_some_of_the_objects():
    mc = ModelConfig(**TINY)
    pairs = analysis.world_pairs(world.World(0), "test", 4, 5, mc, 0.5)
    assert pairs["images"].shape == (4, 3, 32, 32) and len(pairs["texts"]) == 20
    assert pairs["scene"].tolist() == [i for i in range(4) for _ in range(5)]
    assert not (pairs["named"] & ~pairs["objects"]).any()      # named objects are objects
    assert (pairs["named"] != pairs["objects"]).any()           # and not always all of them


def test_picture_writes_a_png_of_the_expected_size(checkpoint, tmp_path):
    out = tmp_path / "pruning.png"
    analysis.picture_main(["--checkpoint", checkpoint, "--images", "2", "--scale", "3",
                     "--threads", "1", "--out", str(out)])
    with Image.open(out) as image:
        assert image.format == "PNG"
        cell = 32 * 3                                            # 3 stages + the input
        pad, head, line = analysis.PAD, analysis.HEAD, analysis.LINE
        assert image.size == (pad + 4 * (cell + pad), head + 2 * (cell + line) + pad)


def test_kinds_command_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "kinds.json"
    analysis.kinds_main(["--checkpoint", checkpoint, "--scenes", "12", "--threads", "1",
                         "--out", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["images"] == 12 and report["captions"] == 12 * world.CAPTIONS_PER_IMAGE
    assert sum(r["captions"] for r in rows) == report["captions"]
    assert {r["template"] for r in rows} <= set(world.CAPTION_TEMPLATES)
    # pooled over the templates, R@1 is the evaluation's ITC image R@1, and the oracle's R@1
    # is metrics.oracle_recall's
    model, tok, w = analysis.load_for_analysis(checkpoint)
    dataset = data.RetrievalEvalDataset(world.world_entries("retrieval", "test", 12, WORLD_SEED),
                                        None, data.create_transform(32, train=False))
    scores = evaluation.evaluate_retrieval(model, dataset, tok, torch.device("cpu"), k=2,
                                           max_len=model.cfg.max_len)
    truth = world.caption_truth([it["images"][0] for it in dataset.items], dataset.text)
    oracle = metrics.oracle_recall(truth, dataset.img2txt)
    pooled = {k: sum(r[k] * r["captions"] for r in rows) / report["captions"]
              for k in ("r1", "r1_oracle", "images_true")}
    assert 100 * pooled["r1"] == pytest.approx(scores["itc"]["img_r1"])
    assert 100 * pooled["r1_oracle"] == pytest.approx(oracle["img_r1"])
    assert pooled["images_true"] == pytest.approx(truth.sum(0).mean())
    assert all(r["r1"] <= r["first_true"] <= 1.0 for r in rows)   # its own image is true of it
    objects = [o for i in range(12) for o in w.scene("test", i).objects]
    fill = report["fill_in"]
    assert list(fill) == ["shape", "colour", "size"]
    for attribute, v in fill.items():
        values = [getattr(o, attribute) for o in objects]
        assert v["objects"] == len(objects) and 0.0 <= v["right"] <= 1.0
        assert v["most_frequent"] == max(values.count(x) for x in values) / len(objects)
    assert "there are {n} objects" in capsys.readouterr().out
    # where an attribute is lost: cosines of distinct captions, probe accuracies, object counts
    assert set(report["text_cosine"]) == set(probes.ATTRIBUTES)
    assert all(-1.0 <= c < 1.0 - 1e-6 for c in report["text_cosine"].values())
    probe = report["probe"]
    assert set(probe) == set(probes.ATTRIBUTES)
    probe_scenes = analysis.KindsConfig.probe_scenes
    n_train = sum(len(w.scene("train", i).objects) for i in range(probe_scenes))
    for attribute, v in probe.items():
        assert v["objects"] == [n_train, len(objects)]
        assert all(0.0 <= v[k] <= 1.0 for k in ("trained", "untrained", "pixels", "most_frequent"))


def test_text_contrast_averages_the_pairs_that_differ_in_one_word(checkpoint):
    model, tok, _ = analysis.load_for_analysis(checkpoint)
    got = probes.text_contrast(model, tok, torch.device("cpu"))
    shapes, colours, sizes = probes.ATTRIBUTES.values()

    def feat(shape, colour, size):
        ids, mask = tok([f"a {size} {colour} {shape}"], model.cfg.max_len)
        with torch.no_grad():
            return model.text_feat(model.encode_text(ids, mask))[0]

    feats = {(s, c, z): feat(s, c, z) for s in shapes for c in colours for z in sizes}
    for a, name in enumerate(probes.ATTRIBUTES):
        cos = [float(feats[k] @ feats[j]) for k in feats for j in feats
               if k[a] != j[a] and all(k[b] == j[b] for b in range(3) if b != a)]
        assert got[name] == pytest.approx(sum(cos) / len(cos), abs=1e-5)


def test_minimal_pairs_compare_each_true_caption_with_its_twin(checkpoint):
    """Against one (image, caption) at a time: the true hypothesis of each scene against the
    false one, by the ITC cosine and by ITM's match probability."""
    model, tok, w = analysis.load_for_analysis(checkpoint)
    got = probes.minimal_pairs(model, tok, w, "test", 6, torch.device("cpu"))
    image_of = data.create_transform(model.cfg.img_size, train=False)

    def scores(i, text):
        image = image_of(data.load_image(w.path("test", i)))[None]
        ids, mask = tok([text], model.cfg.max_len)
        with torch.no_grad():
            image_embeds, text_embeds = model.encode_image(image), model.encode_text(ids, mask)
            itc = float(model.image_feat(image_embeds)[0] @ model.text_feat(text_embeds)[0])
            itm = float(model.itm_logits(text_embeds, mask, image_embeds, ids).softmax(-1)[0, 1])
        return itc, itm

    wins = []
    for i in range(6):
        hyp = {label: text for text, label in w.hypotheses(w.scene("test", i))}
        true, false = scores(i, hyp["entailment"]), scores(i, hyp["contradiction"])
        wins.append((true[0] > false[0], true[1] > false[1]))
    assert got["pairs"] == 6
    assert got["itc"] == pytest.approx(sum(a for a, _ in wins) / 6)
    assert got["itm"] == pytest.approx(sum(b for _, b in wins) / 6)
    assert 0 < got["itc"] < 1 or 0 < got["itm"] < 1        # the pairs are not all alike


def test_object_tokens_weigh_each_patch_by_the_object_share(checkpoint):
    model, _, w = analysis.load_for_analysis(checkpoint)
    p, res = model.cfg.patch_size, model.cfg.img_size
    feats, objects = probes.object_tokens(None, w, "test", 2, res, p, torch.device("cpu"))
    assert len(objects) == len(feats) == sum(len(w.scene("test", i).objects) for i in range(2))
    # by hand for the first scene: loop over the patches in the ViT's row-major order
    image = data.create_transform(res, train=False)(data.load_image(w.path("test", 0)))
    masks = w.masks(w.scene("test", 0), res)
    for k, mask in enumerate(masks):
        total, weight = torch.zeros(3 * p * p), 0.0
        for r in range(res // p):
            for c in range(res // p):
                share = float(mask[r * p:(r + 1) * p, c * p:(c + 1) * p].mean())
                total += share * image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
                weight += share
        assert torch.allclose(feats[k], total / weight, atol=1e-5)
    # a ViT's tokens take the same weights: one that returns its input's patches after a [CLS]
    def patches_vit(x):
        patches = torch.nn.functional.unfold(x, p, stride=p).transpose(1, 2)     # (1, M, 3p^2)
        return torch.cat([torch.full_like(patches[:, :1], 1e3), patches], 1)     # (1, 1+M, 3p^2)

    via_vit, _ = probes.object_tokens(patches_vit, w, "test", 2, res, p, torch.device("cpu"))
    assert torch.allclose(via_vit, feats, atol=1e-5)


def test_linear_probe_reads_an_object_colour_from_its_pixels():
    # flat colours: linear in the pixels, so a probe that reads the right patches names them
    w = world.World(WORLD_SEED)
    args = (32, 4, torch.device("cpu"))
    x_train, o_train = probes.object_tokens(None, w, "train", 150, *args)
    x_test, o_test = probes.object_tokens(None, w, "test", 20, *args)
    colours = probes.ATTRIBUTES["colour"]
    y_train = torch.tensor([colours.index(o.colour) for o in o_train])
    y_test = torch.tensor([colours.index(o.colour) for o in o_test])
    assert probes.linear_probe(x_train, y_train, x_test, y_test, len(colours)) >= 0.9
    # and no better than chance when the labels are shuffled
    y_shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))]
    assert probes.linear_probe(x_train, y_shuffled, x_test, y_test, len(colours)) < 0.5


def test_fill_in_reads_the_masked_word_with_the_image(checkpoint):
    model, tok, w = analysis.load_for_analysis(checkpoint)
    picks = probes.fill_in(model, tok, w, "test", 2, torch.device("cpu"))
    objects = [o for i in range(2) for o in w.scene("test", i).objects]
    assert [t for t, _ in picks["shape"]] == [o.shape for o in objects]
    # by hand, another way through ALBEF's encoder: the text layers, then the fusion layers
    image = data.create_transform(32, train=False)(data.load_image(w.path("test", 0)))[None]
    o = objects[0]
    with torch.no_grad():
        image_embeds = model.encode_image(image)
        for attribute, (template, words) in probes.FILL_IN.items():
            ids, mask = tok([template.format(size=o.size, colour=o.colour, shape=o.shape)], 32)
            hidden = model.fuse(model.encode_text(ids, mask), mask, image_embeds, ids)
            logits = model.text_encoder.lm_logits(hidden)[0, (ids[0] == tok.mask_id).nonzero()[0, 0]]
            pick = words[int(logits[[tok.token_to_id[x] for x in words]].argmax())]
            assert picks[attribute][0] == (getattr(o, attribute), pick)


@pytest.mark.parametrize("main", [analysis.keep_main, analysis.picture_main,
                                  analysis.kinds_main])
def test_missing_checkpoint_names_the_path(main, tmp_path):
    missing = str(tmp_path / "nowhere" / "checkpoint.pt")
    with pytest.raises(SystemExit, match="nowhere/checkpoint.pt"):
        main(["--checkpoint", missing])


def test_usage_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        analysis.main([])
    assert e.value.code == 2
    assert "usage: python -m lab.analysis {keep,picture,kinds}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'draw'"):
        analysis.main(["draw"])
    for command, flag in [("keep", "--lams (float,..., default '0.8,0.6,1.0')"),
                          ("picture", "--scale (int, default 4)")]:
        with pytest.raises(SystemExit) as e:
            analysis.main([command, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and flag in out
        assert "--analysis.checkpoint (str, default 'out/pretrain/checkpoint.pt')" in out
        assert "a checkpoint of train_pretrain.py" in out                 # the field's comment
    with pytest.raises(SystemExit, match="split"):
        analysis.main(["keep", "--split", "dev"])


def test_scene_labels_name_each_objects_shape_colour_cell_and_colour_at_cell():
    w = world.World(0)
    colours = list(world.COLOURS)
    for i in range(20):
        scene = w.scene("test", i)
        groups = dict(zip(probes.LABELS, probes.scene_labels(scene).split(
            list(probes.LABELS.values()))))
        cells = {3 * o.cell[0] + o.cell[1] for o in scene.objects}
        assert set(groups["shape"].nonzero().flatten().tolist()) == {
            world.SHAPES.index(o.shape) for o in scene.objects}
        assert set(groups["colour"].nonzero().flatten().tolist()) == {
            colours.index(o.colour) for o in scene.objects}
        assert set(groups["cell"].nonzero().flatten().tolist()) == cells
        at = groups["colour@cell"].reshape(len(colours), 9)                    # (colour, cell)
        assert {(c, k) for c, k in at.nonzero().tolist()} == {
            (colours.index(o.colour), 3 * o.cell[0] + o.cell[1]) for o in scene.objects}


def test_balanced_accuracy_is_half_for_constant_answers_and_per_group():
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(50, sum(probes.LABELS.values()), generator=gen) < 0.2).float()
    for constant in (-1.0, 1.0):
        acc = probes.balanced_accuracy(torch.full_like(labels, constant), labels)
        assert all(v == pytest.approx(0.5) for v in acc.values())
    assert all(v == 1.0 for v in probes.balanced_accuracy(labels - 0.5, labels).values())
    assert all(v == 0.0 for v in probes.balanced_accuracy(0.5 - labels, labels).values())
    # one group right, the rest wrong: only that group scores 1
    logits = 0.5 - labels
    logits[:, :len(world.SHAPES)] *= -1
    acc = probes.balanced_accuracy(logits, labels)
    assert acc["shape"] == 1.0 and acc["colour"] == acc["cell"] == acc["colour@cell"] == 0.0
