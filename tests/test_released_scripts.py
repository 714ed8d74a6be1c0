"""The released ALBEF, BLIP and ELIP files through the scripts: train_downstream.py --pretrained
(fine-tuning and --evaluate) and train_pretrain.py --init_from take a file in its official layout
(built by test_released from timm's and Hugging Face's modules), with --vocab."""
import json

import pytest
import torch

import released
import tasks
import train_downstream
import train_pretrain
from tasks import build_model
from test_released import HEAD, albef_file, blip_file, tokenizer

pytest.importorskip("timm")
pytest.importorskip("transformers")

WORLD = ["--world_train", "8", "--world_test", "4", "--batch_size", "4", "--eval_batch_size",
         "4", "--eval_k", "2", "--max_steps", "1", "--warmup_steps", "1", "--head_dim", str(HEAD)]
# the tiny ALBEF-layout file's architecture, as train_pretrain.py flags
ALBEF_FLAGS = ["--preset", "albef", "--img_size", "32", "--patch_size", "8", "--vision_width", "32", "--vision_depth",
               "2", "--vision_heads", "2", "--text_width", "32", "--text_heads", "2", "--text_mlp",
               "64", "--text_layers", "2", "--fusion_layers", "2", "--embed_dim", "16",
               "--queue_size", "8", "--batch_size", "4", "--world_train", "8", "--world_test", "0",
               "--warmup_steps", "100", "--max_steps", "1", "--prune.method", "none",
               "--num_workers", "0"]


def save(tmp_path, family, task):
    """The official-layout file as the official scripts save it ({"model": state}) and the
    vocab.txt it was trained with."""
    state, _ = (albef_file if family == "albef" else blip_file)(task)
    torch.save({"model": state, "epoch": 4}, tmp_path / f"{family}_{task}.pth")
    vocab = tmp_path / "vocab.txt"
    # BLIP's [DEC] and [ENC] are added by the loader, as BLIP's init_tokenizer does
    tokenizer(family).save(vocab) if family == "albef" else vocab.write_text(
        "".join(t + "\n" for t in tokenizer(family).vocab[:-2]))
    return str(tmp_path / f"{family}_{task}.pth"), str(vocab), state


@pytest.mark.parametrize("family", ["albef", "blip"])
def test_a_released_retrieval_model_is_loaded_whole_and_evaluated(tmp_path, family):
    path, vocab, state = save(tmp_path, family, "retrieval")
    cfg = train_downstream.DownstreamConfig(task="retrieval", pretrained=path, vocab=vocab,
                                            head_dim=HEAD)
    mc, aids, tok, converted, _, tuned = tasks.load_source(cfg, log=lambda m: None)
    assert tuned["task"] == "retrieval" and tok.vocab_size == mc.vocab_size == 40
    model = build_model(cfg, mc, tok, [], aids)
    report = train_downstream.load_weights(cfg, model, None, converted, True, lambda m: None)
    assert report["initialised"] == [] and report["unused"] == []
    ours = model.state_dict()
    expected = released.to_ours(dict(state), head_dim=HEAD).state
    assert all(torch.equal(ours[k], v) for k, v in expected.items())
    out = tmp_path / "eval"
    train_downstream.main(["--task", "retrieval", "--evaluate", "true", "--pretrained", path,
                           "--vocab", vocab, "--out_dir", str(out), *WORLD])
    assert json.loads((out / "metrics.json").read_text())["test"]["world"]["metrics"]["r_mean"] >= 0


def test_fine_tuning_starts_from_a_released_pretraining_file(tmp_path, capsys):
    path, vocab, _ = save(tmp_path, "albef", "pretrain")
    out = tmp_path / "vqa"
    train_downstream.main(["--task", "vqa", "--pretrained", path, "--vocab", vocab,
                           "--out_dir", str(out), *WORLD])
    printed = capsys.readouterr().out
    assert "a released albef_pretrain checkpoint, converted" in printed
    # the world's words are not in the file's vocabulary: they are added
    tuned = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(tuned["vocab"]) > 40 and "square" in tuned["vocab"]
    assert json.loads((out / "metrics.json").read_text())["test"]["world"]["metrics"]


def test_released_files_get_clear_errors(tmp_path):
    path, vocab, _ = save(tmp_path, "albef", "ve")
    with pytest.raises(SystemExit, match="holds no vocabulary: give --vocab"):
        train_downstream.main(["--task", "ve", "--pretrained", path, "--out_dir",
                               str(tmp_path / "a"), *WORLD])
    with pytest.raises(SystemExit, match="a released fine-tuned ve model .*use it with --task ve"):
        train_downstream.main(["--task", "vqa", "--pretrained", path, "--vocab", vocab,
                               "--out_dir", str(tmp_path / "b"), *WORLD])
    torch.save({"model": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "clip.pt")
    with pytest.raises(SystemExit, match=r"cannot place 1 of its 1 keys, first \['visual\.conv1"):
        train_downstream.main(["--task", "ve", "--pretrained", str(tmp_path / "clip.pt"),
                               "--vocab", vocab, "--out_dir", str(tmp_path / "c"), *WORLD])


def test_pretraining_continues_from_a_released_file(tmp_path, capsys):
    path, vocab, state = save(tmp_path, "albef", "pretrain")
    out = tmp_path / "pre"
    train_pretrain.main(ALBEF_FLAGS + ["--init_from", path, "--vocab", vocab, "--out_dir",
                                       str(out), "--max_steps", "1", "--lr", "0", "--warmup_lr", "0"])
    assert "a released albef_pretrain checkpoint, converted" in capsys.readouterr().out
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    # at lr 0 the step changes no weight: the start was the file's
    key = "text_encoder.encoder.layer.3.crossattention.self.key.weight"
    assert torch.equal(after[key], state["text_encoder.bert." + key[len("text_encoder."):]])
    with pytest.raises(SystemExit, match=r"implies --text_layers 2 \(the flags: 3\)"):
        train_pretrain.main(ALBEF_FLAGS + ["--text_layers", "3", "--init_from", path, "--vocab",
                                           vocab, "--out_dir", str(tmp_path / "bad")])
