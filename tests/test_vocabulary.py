"""Fine-tuning on text the checkpoint's vocabulary cannot read: the words it reads as [UNK] are
added as new tokens, their embedding rows grown, the checkpoint's rows kept."""
import json

import pytest
import torch
from PIL import Image

import tasks
import train_downstream
import train_pretrain
from heads import load_pretrained
from tokenizer import Tokenizer
from test_train_pretrain import SMALL

# an animal VQA set: none of these answers, and few of the question words, are the world's
ANIMALS = ["dog", "cat", "zebra", "giraffe", "horse", "sheep"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A two-step checkpoint with the embedded world's 81-word vocabulary."""
    out = tmp_path_factory.mktemp("pretrain_vocab")
    train_pretrain.main(SMALL + ["--out_dir", str(out), "--max_steps", "2"])
    return str(out / "checkpoint.pt")


def write_animals(tmp_path):
    """Train and test VQA files about animals, an image each, and the flags that name them."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(len(ANIMALS)):
        Image.new("RGB", (40, 40), (30 * i, 200 - 30 * i, 90)).save(root / f"a{i}.png")
    train = [{"question_id": i, "question": "Which animal sleeps on the sofa?",
              "answer": [name] * 10, "image": f"a{i}.png"} for i, name in enumerate(ANIMALS)]
    test = [{**e, "question_id": 100 + e["question_id"]} for e in train[:3]]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    return ["--train_file", str(tmp_path / "train.json"), "--test_file",
            str(tmp_path / "test.json"), "--image_root", str(root)]


def test_unknown_words_are_the_ones_read_as_unk():
    tok = Tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "##s"])
    assert tok.unknown_words(["a dog", "dogs", "a cat", "two cats, a cat"]) == ["cat", ",", "cats", "two"]
    grown = tok.add_tokens(tok.unknown_words(["a cat"]))
    assert grown.tokenize("a cat") == ["a", "cat"] and grown.vocab[:8] == tok.vocab


def test_fine_tuning_adds_the_words_its_vocabulary_lacks(tmp_path, pretrained, capsys):
    source = torch.load(pretrained, weights_only=True)
    old = Tokenizer(source["vocab"])
    assert all(old.tokenize(a) == ["[UNK]"] for a in ANIMALS)    # as the world reads them
    out = tmp_path / "out"
    train_downstream.main(["--task", "vqa", "--pretrained", pretrained, *write_animals(tmp_path),
                           "--out_dir", str(out), "--batch_size", "3", "--max_steps", "1",
                           "--warmup_steps", "1", "--eval_batch_size", "3"])
    printed = capsys.readouterr().out
    tuned = torch.load(out / "checkpoint.pt", weights_only=True)
    tok = Tokenizer(tuned["vocab"])
    added = tok.vocab[len(old.vocab):]
    assert tok.vocab[:len(old.vocab)] == old.vocab
    assert set(ANIMALS) | {"which", "animal", "sleeps", "sofa"} == set(added)
    assert f"vocabulary: {len(added)} words of the training set" in printed
    # each answer is now a token of its own, so the answer decoder can tell them apart
    ids = [tok.encode(a)[1:-1] for a in ANIMALS]
    assert all(len(i) == 1 and i[0] != tok.unk_id for i in ids) and len({i[0] for i in ids}) == 6
    rows = tuned["model"]["text_encoder.embeddings.word_embeddings.weight"]
    assert rows.shape[0] == tok.vocab_size and tuned["model_config"]["vocab_size"] == tok.vocab_size
    assert json.loads((out / "metrics.json").read_text())["test"]


def test_grown_rows_keep_the_checkpoints_and_start_the_new_ones_fresh(pretrained):
    """load_pretrained copies the checkpoint's rows of every tensor indexed by token id and keeps
    the model's own initialisation for the added ones; any other shape mismatch stays an error."""
    source = torch.load(pretrained, weights_only=True)
    cfg = train_downstream.DownstreamConfig(task="caption", pretrained=pretrained)
    mc, aids, tok, state, _, _ = tasks.load_source(cfg)
    grown = tok.add_tokens(["zebra", "giraffe"])
    mc = tasks.dataclasses.replace(mc, vocab_size=grown.vocab_size)
    model = tasks.build_model(cfg, mc, grown, [], aids)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, state)
    key = "text_decoder.embeddings.word_embeddings.weight"   # from the encoder's (ALBEF-style)
    assert {key, "text_decoder.cls.predictions.bias"} <= set(report["grown"])
    n = len(tok.vocab)
    ours = model.state_dict()
    assert torch.equal(ours[key][:n], source["model"][key.replace("decoder", "encoder")])
    assert torch.equal(ours[key][n:], fresh[key][n:])
    positions = "text_encoder.embeddings.position_embeddings.weight"   # not indexed by token id
    state = {**state, positions: state[positions][:-1]}
    with pytest.raises(ValueError, match="shape mismatch for text_decoder.embeddings.position"):
        load_pretrained(model, state)
