"""Retrieval under token pruning at inference (eval.sweep_retrieval, train_downstream --sweep):
the flag and its budgets, the text-guided re-ranking against the same scores computed pair by
pair, and a sweep from a pre-training checkpoint whose table has a row per budget."""
import json

import pytest
import torch

import eval as eval_module
import train_downstream
import train_pretrain
from eval import (evaluate_retrieval_guided, guided_itm_logits, reducing, sweep_budgets,
                  sweep_retrieval, sweep_table, token_layers_kept)
from metrics import recall_at_k
from model import ELIPModel, ModelConfig
from pruning import PruneConfig
from test_eval import ListDataset
from test_train_pretrain import SMALL, torchrun
from tokenizer import Tokenizer

TEXTS = ["a red cube", "a blue ball", "a green cube on the left", "two red balls",
         "a small blue cube", "a ball on the right", "a green ball", "three cubes"]


def test_sweep_flag_parses_and_is_described(capsys):
    with pytest.raises(SystemExit):
        train_downstream.main(["--help"])
    assert "--sweep (str, default '')" in capsys.readouterr().out
    budgets = sweep_budgets(" none; elip:0.9,0.65,0.4 ;evit:0.7,0.5,0.3;tome:4",
                            PruneConfig(method="none", lam=0.6))
    assert [(b.method, b.keep_ratios, b.tome_r, b.lam, b.in_eval) for b in budgets] == [
        ("none", (0.9, 0.65, 0.4), 11, 0.6, True), ("elip", (0.9, 0.65, 0.4), 11, 0.6, True),
        ("evit", (0.7, 0.5, 0.3), 11, 0.6, True), ("tome", (0.9, 0.65, 0.4), 4, 0.6, True)]
    for bad in ("elip:0.9", "tome", "tome:0.5", "none:0.5", "mine:0.5,0.4,0.3", "elip:0.4,0.6,0.9"):
        with pytest.raises(ValueError, match="sweep item"):
            sweep_budgets(bad, PruneConfig())
    with pytest.raises(SystemExit, match="--evaluate true"):       # a sweep evaluates only
        train_downstream.main(["--sweep", "none"])
    with pytest.raises(SystemExit, match="sweep item"):            # refused before any work
        train_downstream.main(["--sweep", "elip:0.5", "--evaluate", "true"])


def test_token_layers_kept():
    """none keeps every token-layer; ELIP's schedule on 12 layers of M = 16 patches keeps
    [17]*2 + [16]*2 + [12]*6 + [8]*2 (K = 14, 10, 6, with [CLS] and the merged token)."""
    assert token_layers_kept(PruneConfig(method="none"), 16, 12) == 1.0
    assert token_layers_kept(PruneConfig(), 16, 12) == pytest.approx(
        (2 * 17 + 2 * 16 + 6 * 12 + 2 * 8) / (12 * 17))


@pytest.fixture(scope="module")
def tiny():
    """A random ALBEF-style model of width 32 and its retrieval set: 4 images of 2 captions."""
    torch.manual_seed(0)
    tok = Tokenizer.build(TEXTS)
    mc = ModelConfig(img_size=32, vision_width=32, text_width=32, vision_heads=2, text_heads=2,
                     text_mlp=64, embed_dim=16, queue_size=0, vocab_size=tok.vocab_size,
                     pad_id=tok.pad_id, cls_id=tok.cls_id, mask_id=tok.mask_id,
                     prune=PruneConfig(method="none"), init_std=0.1)
    model = ELIPModel(mc).eval()
    images = torch.randn(4, 3, 32, 32)
    dataset = ListDataset([{"image": images[i], "index": i} for i in range(4)], text=TEXTS,
                          img2txt=[[0, 1], [2, 3], [4, 5], [6, 7]],
                          txt2img=[0, 0, 1, 1, 2, 2, 3, 3])
    return model, dataset, tok, images


# lam 0: the text [CLS] alone chooses the tokens, so that a text's guidance surely shows
GUIDED = PruneConfig(method="elip", keep_ratios=(0.6, 0.4, 0.2), lam=0.0, in_eval=True)


def pair_logit(model, image, text_embeds, mask, ids, cfg):
    """One pair's ITM match logit, its image pruned under the text's [CLS] by cfg."""
    with reducing(model.visual_encoder, cfg), torch.no_grad():
        image_embeds = model.encode_image(image[None], text_embeds[None, 0])
        return model.itm_logits(text_embeds[None], mask[None], image_embeds, ids[None])[0, 1]


def test_guided_re_ranking_encodes_each_image_under_each_text(tiny, monkeypatch):
    """The batched pairs equal the pairs one at a time; the guidance changes the scores (the
    image pruned under another caption scores otherwise); with k covering every pair the
    guided evaluation's recalls are those of the full matrix of such scores, and its ITC ones
    those of the unpruned model. Shared over 2 ranks, each pair is scored once."""
    model, dataset, tok, images = tiny
    ids, mask = tok(TEXTS, 32)
    with torch.no_grad():
        text_embeds = model.encode_text(ids, mask)                               # (T, L, D)
    full = torch.stack([torch.stack([pair_logit(model, images[i], text_embeds[t], mask[t], ids[t],
                                                GUIDED) for t in range(8)]) for i in range(4)])
    # each image pruned under another caption's [CLS], then matched with this one
    swapped = torch.stack([torch.stack([pair_logit(model, images[i], text_embeds[7 - t], mask[t],
                                                   ids[t], GUIDED) for t in range(8)])
                           for i in range(4)])
    assert not torch.allclose(full, swapped, atol=1e-4)                       # guidance shows
    top_i2t, top_t2i = torch.tensor([[3, 0, 5]] * 4), torch.tensor([[2, 1]] * 8)
    with reducing(model.visual_encoder, GUIDED):
        i2t, t2i = guided_itm_logits(model, dataset, top_i2t, top_t2i, text_embeds, ids, mask,
                                     "cpu", batch_size=3)
    assert torch.allclose(i2t, full.gather(1, top_i2t), atol=1e-5)
    assert torch.allclose(t2i, full.T.gather(1, top_t2i), atol=1e-5)
    # as 2 ranks: each scores the pairs of its block of the images (2 each), -inf elsewhere;
    # the all-reduce's max of the two is the one process's result
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(eval_module, "rank_and_world", lambda: (rank, 2))
        monkeypatch.setattr(eval_module.dist, "all_reduce", lambda x, op: None)
        with reducing(model.visual_encoder, GUIDED):
            parts.append(guided_itm_logits(model, dataset, top_i2t, top_t2i, text_embeds, ids,
                                           mask, "cpu", batch_size=1))
    monkeypatch.undo()
    for one, a, b in zip((i2t, t2i), *parts):
        assert torch.allclose(torch.maximum(a, b), one, atol=1e-5)
        assert (a.isinf() ^ b.isinf()).all()                # each pair scored on one rank
    out = evaluate_retrieval_guided(model, dataset, tok, "cpu", GUIDED, k=8, batch_size=3)
    assert {k: v for k, v in out.items() if k != "itc"} == pytest.approx(
        recall_at_k(full, full.T, dataset.img2txt, dataset.txt2img))
    with torch.no_grad():
        sim = model.image_feat(model.encode_image(images)) @ model.text_feat(text_embeds).T
    assert out["itc"] == pytest.approx(recall_at_k(sim, sim.T, dataset.img2txt, dataset.txt2img))
    assert model.visual_encoder.prune.method == "none" and not model.training   # restored


def test_sweep_rows_on_the_tiny_model(tiny):
    """none comes first; a text-free method prunes every image pass, ELIP only the re-ranking's
    passes, one per pair, which its ViT work counts: the image rows entering the last ViT layer
    and their lengths show it."""
    model, dataset, tok, _ = tiny
    entering = []
    hook = model.visual_encoder.blocks[-1].register_forward_pre_hook(
        lambda m, args: entering.extend([args[0].shape[1]] * args[0].shape[0]))
    budgets = sweep_budgets("evit:0.7,0.5,0.3;elip:0.6,0.4,0.2", GUIDED)
    rows = sweep_retrieval(model, dataset, tok, "cpu", budgets, k=3, batch_size=4,
                           log=lambda msg: None)
    hook.remove()
    assert [r["budget"] for r in rows] == ["none", "evit:0.7,0.5,0.3", "elip:0.6,0.4,0.2"]
    none, evit, elip = rows
    assert none["kept"] == none["vit_work"] == 1.0 and 0 < elip["kept"] < evit["kept"] < 1
    assert evit["vit_work"] == evit["kept"] and evit["image_passes"] == 4
    assert elip["image_passes"] == 4 + 4 * 3 + 8 * 3
    assert elip["vit_work"] == pytest.approx(1 + 36 * elip["kept"] / 4)
    # K = int(16 * r) at the last cut, plus [CLS] and the merged token
    assert entering == [17] * 4 + [1 + 4 + 1] * 4 + [17] * 4 + [1 + 3 + 1] * 36
    assert elip["itc"] == none["itc"]                          # ITC on all tokens
    assert none["seconds_vs_none"] == 1.0 and all(r["vit_seconds"] > 0 for r in rows)


def test_sweep_from_a_pre_training_checkpoint(tmp_path, capsys):
    """train_downstream --evaluate true --sweep on a two-step checkpoint, zero-shot on the
    world's retrieval test set: sweep.json and the logged table have a row per budget; 2 gloo
    ranks (5 images: uneven shares, batches of 2) give the recalls of one process."""
    train_pretrain.main(SMALL + ["--out_dir", str(tmp_path / "pre"), "--max_steps", "2"])
    spec = "none;elip:0.9,0.65,0.4;elip:0.5,0.3,0.2;evit:0.7,0.5,0.3;tome:2"
    flags = ["--task", "retrieval", "--evaluate", "true", "--pretrained",
             str(tmp_path / "pre" / "checkpoint.pt"), "--world_test", "5", "--eval_k", "3",
             "--eval_batch_size", "2", "--sweep", spec]
    train_downstream.main(flags + ["--out_dir", str(tmp_path / "one")])
    rows = json.loads((tmp_path / "one" / "sweep.json").read_text())["test"]["world"]
    assert [r["budget"] for r in rows] == spec.split(";")
    assert rows[0]["kept"] == 1.0 and all(r["kept"] < 1.0 for r in rows[1:])
    assert rows[1]["kept"] > rows[2]["kept"]
    assert "pruning at inference, world:\n" + sweep_table(rows) in capsys.readouterr().out
    proc = torchrun(["train_downstream.py", *flags, "--out_dir", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())["test"]["world"]
    for a, b in zip(rows, two, strict=True):
        assert (a["itm"], a["itc"]) == (pytest.approx(b["itm"]), pytest.approx(b["itc"]))


def test_sweep_of_a_released_retrieval_file(tmp_path):
    """A file in ALBEF's released retrieval layout (2 ViT layers), with --vocab: swept; a
    schedule that does not fit its ViT is refused before any evaluation."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from test_released_scripts import WORLD, save
    path, vocab, _ = save(tmp_path, "albef", "retrieval")
    flags = ["--task", "retrieval", "--evaluate", "true", "--pretrained", path, "--vocab", vocab,
             "--out_dir", str(tmp_path / "out"), *WORLD]
    train_downstream.main(flags + ["--sweep", "none;tome:3"])
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())["test"]["world"]
    assert [r["budget"] for r in rows] == ["none", "tome:3"] and rows[1]["kept"] < 1.0
    with pytest.raises(ValueError, match="depth 2"):
        train_downstream.main(flags + ["--sweep", "elip:0.9,0.65,0.4"])
