"""BERT's WordPiece tokenizer, in plain Python: the "basic" tokenisation (clean, split CJK
characters, lower-case and strip accents, split on whitespace and punctuation), then greedy
longest-match-first word pieces over a vocabulary. It reads a BERT vocab.txt and gives the same ids
as Hugging Face's BertTokenizer; Tokenizer.build makes a whole-word vocabulary from captions (the
embedded world's few words) when there is no BERT to load.

    tok = Tokenizer.from_file("vocab.txt")
    input_ids, attention_mask = tok(["a dog on the beach", "two cats"], max_len=30)   # (B, L)
"""

import re
import unicodedata
from collections import Counter

import torch

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BLIP's additions to BERT's vocabulary (BLIP's models/blip.py init_tokenizer): [DEC], the
# decoder's first token (its bos_token), then [ENC], the image-grounded encoder's; appended after
# bert-base-uncased's 30522 tokens they are ids 30522 and 30523. Never looked for in text.
BLIP_TOKENS = ("[DEC]", "[ENC]")
SPECIALS_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")
MAX_WORD_CHARS = 100  # longer words become [UNK], as in BERT

# CJK Unified Ideographs blocks: BERT puts spaces around each such character, so every
# character is a word (Chinese has no spaces between words). Hiragana, Katakana, Hangul are not here.
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    # tab, newline and carriage return count as whitespace, not as control characters
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    # BERT treats every non-alphanumeric printable ASCII character as punctuation ("$", "^", "`"
    # are not unicode P*), plus every unicode P* character
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch):
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def basic_tokenize(text, do_lower_case=True):
    """BERT's basic tokenisation: clean, split CJK characters, (lower-case, strip accents),
    split on whitespace and punctuation. Special tokens ([MASK], ...) come out whole."""
    words = []
    for chunk in SPECIALS_RE.split(text):  # the capture group keeps the special tokens as chunks
        if chunk in SPECIALS:
            words.append(chunk)
            continue
        chunk = "".join(" " if _is_whitespace(c) else c for c in chunk
                        if c not in "\0\ufffd" and not _is_control(c))
        chunk = "".join(f" {c} " if _is_cjk(c) else c for c in chunk)
        # the same character written with different code points must give the same token
        chunk = unicodedata.normalize("NFC", chunk)
        for word in chunk.split():
            if do_lower_case:
                word = word.lower()
                # accents are removed by decomposing and dropping the combining marks: café -> cafe
                word = "".join(c for c in unicodedata.normalize("NFD", word)
                               if unicodedata.category(c) != "Mn")
            # every punctuation character is a word of its own: "dog's" -> dog ' s
            words += "".join(f" {c} " if _is_punctuation(c) else c for c in word).split()
    return words


class Tokenizer:
    """BERT WordPiece tokenizer over a vocabulary list (index = token id)."""

    def __init__(self, vocab, do_lower_case=True):
        self.vocab = list(vocab)
        self.do_lower_case = do_lower_case
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        absent = [t for t in SPECIALS if t not in self.token_to_id]
        if absent:
            raise ValueError(f"vocabulary lacks the special tokens {absent}")
        self.vocab_size = len(self.vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.token_to_id[t] for t in SPECIALS)
        self.dec_id, self.enc_id = (self.token_to_id.get(t, -1) for t in BLIP_TOKENS)  # -1: none

    @classmethod
    def from_file(cls, path, do_lower_case=True):
        """Read a BERT vocab.txt: one token per line, the line number is the id."""
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f], do_lower_case)

    @classmethod
    def build(cls, captions, min_freq=1, do_lower_case=True):
        """Vocabulary of whole words from captions: the specials, then the words seen at least
        min_freq times, most frequent first, ties alphabetical. Every such word is one token."""
        counts = Counter(w for c in captions for w in basic_tokenize(c, do_lower_case)
                         if w not in SPECIALS)
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words, do_lower_case)

    def add_tokens(self, tokens):
        """A tokenizer whose vocabulary is this one's plus `tokens` (those it lacks), appended in
        order, as Hugging Face's add_special_tokens does (BLIP adds BLIP_TOKENS to BERT's)."""
        return Tokenizer(self.vocab + [t for t in dict.fromkeys(tokens) if t not in self.token_to_id],
                         self.do_lower_case)

    def unknown_words(self, texts):
        """The words of `texts` (as basic_tokenize splits them) that this vocabulary can only
        read as [UNK], most frequent first, ties alphabetical."""
        counts = Counter(w for t in texts for w in basic_tokenize(t, self.do_lower_case))
        unknown = [w for w in counts
                   if w not in self.token_to_id and self._word_pieces(w) == ["[UNK]"]]
        return sorted(unknown, key=lambda w: (-counts[w], w))

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in self.vocab))

    def _word_pieces(self, word):
        """Greedy longest-match-first split of one word; a word with an unmatchable part is [UNK]."""
        if word in SPECIALS:
            return [word]
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.token_to_id:
                    break
            else:  # not even a single character matched
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        return [p for w in basic_tokenize(text, self.do_lower_case) for p in self._word_pieces(w)]

    def encode(self, text):
        ids = [self.token_to_id[p] for p in self.tokenize(text)]
        return [self.cls_id] + ids + [self.sep_id]

    def __call__(self, texts, max_len):
        """Batch of texts -> (input_ids, attention_mask), LongTensors (B, L) padded to the longest
        sequence (L <= max_len); a longer sequence is cut so that it still ends with [SEP]."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer expects a list of texts, got a single str")
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        seqs = [self.encode(t) for t in texts]
        seqs = [s if len(s) <= max_len else s[:max_len - 1] + [self.sep_id] for s in seqs]
        L = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [self.pad_id] * (L - len(s)) for s in seqs])  # (B, L)
        lengths = torch.tensor([len(s) for s in seqs])
        attention_mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
        return input_ids, attention_mask

    def decode(self, ids):
        """Ids -> text: stops at [SEP], skips special tokens, glues "##" pieces to their word."""
        words = []
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            token = self.vocab[i]
            if token == "[SEP]":
                break
            if token in SPECIALS or token in BLIP_TOKENS:
                continue
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        return " ".join(words)
