"""
Metrics of ELIP's evaluation. They take scores, labels or caption strings (lists, numpy arrays or
torch tensors) and return plain Python floats, and follow the reference code that papers report
with:
- retrieval recall@k as ALBEF's `itm_eval` (percentages), and the recall of a random ranking,
- the VQA score min(1, matches / 3) against the 10 human answers,
- accuracy for NLVR2 and SNLI-VE,
- BLEU-1..4 and CIDEr-D as the COCO caption evaluation (pycocoevalcap's Bleu and Cider scorers,
  whose Cider is CIDEr-D), on whitespace tokens; caption_scores first cleans candidates and
  references as that evaluation does (ptb_tokenize: its Stanford PTB tokenizer, written in
  Python, and its list of punctuation tokens to drop).
"""
import math
import re
from collections import Counter

import numpy as np
import torch


def _ranks(scores, gt):
    """0-based rank of the best ground-truth candidate of each query.
    scores (Q, C); gt (Q, C) bool with at least one True per row. Returns (Q,) long.

    The rank is the number of candidates sorted before it, counted with comparisons instead of
    ALBEF's argsort per query (O(Q*C) work, no (Q, C) int64 index tensor). Ties are broken by
    candidate index, as a stable descending sort would; ALBEF's np.argsort leaves them to the
    sort algorithm. Without ties this is exactly ALBEF's rank."""
    best = scores.masked_fill(~gt, float("-inf")).amax(1, keepdim=True)   # (Q, 1)
    first = (gt & (scores == best)).int().argmax(1, keepdim=True)           # (Q, 1) first best gt
    idx = torch.arange(scores.shape[1], device=scores.device)              # (C,)
    ahead = (scores > best) | ((scores == best) & (idx < first))            # (Q, C)
    return ahead.sum(1)


def recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img):
    """Retrieval recall@1/5/10 in percent, as ALBEF's itm_eval.

    scores_i2t (num_images, num_texts) and scores_t2i (num_texts, num_images): numpy or torch.
    img2txt: for each image the indices of its captions (list of lists, or a dict as in ALBEF).
    txt2img: for each caption the index of its image.
    Text retrieval (txt_*) ranks captions for each image and counts the best-ranked of the image's
    ground-truth captions; image retrieval (img_*) ranks images for each caption."""
    scores_i2t, scores_t2i = torch.as_tensor(scores_i2t), torch.as_tensor(scores_t2i)
    num_images, num_texts = scores_i2t.shape
    if scores_t2i.shape != (num_texts, num_images):
        raise ValueError(f"scores_t2i has shape {tuple(scores_t2i.shape)}, "
                         f"expected ({num_texts}, {num_images})")
    txt2img = torch.as_tensor(txt2img, dtype=torch.long, device=scores_t2i.device)
    if txt2img.shape != (num_texts,):
        raise ValueError(f"txt2img has {txt2img.numel()} entries for {num_texts} texts")

    pairs = img2txt.items() if isinstance(img2txt, dict) else enumerate(img2txt)
    rows, cols = zip(*[(i, t) for i, caps in pairs for t in caps])
    gt_i2t = torch.zeros(num_images, num_texts, dtype=torch.bool, device=scores_i2t.device)
    gt_i2t[list(rows), list(cols)] = True
    if not gt_i2t.any(1).all():
        raise ValueError("every image needs at least one caption in img2txt")
    gt_t2i = torch.zeros(num_texts, num_images, dtype=torch.bool, device=scores_t2i.device)
    gt_t2i[torch.arange(num_texts, device=txt2img.device), txt2img] = True

    result = {}
    for name, ranks in (("txt", _ranks(scores_i2t, gt_i2t)), ("img", _ranks(scores_t2i, gt_t2i))):
        for k in (1, 5, 10):
            result[f"{name}_r{k}"] = 100.0 * (ranks < k).sum().item() / len(ranks)
        result[f"{name}_r_mean"] = sum(result[f"{name}_r{k}"] for k in (1, 5, 10)) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def chance_recall(img2txt, ks=(1, 5, 10)):
    """The expected recall (percent) of a random ranking, in recall_at_k's keys: text retrieval
    hits when any of an image's g captions is among the top k of T texts,
    1 - C(T-g, k) / C(T, k); image retrieval when the one image is among the top k of N."""
    img2txt = list(img2txt.values()) if isinstance(img2txt, dict) else img2txt
    T, N = sum(len(t) for t in img2txt), len(img2txt)
    out = {}
    for k in ks:
        top = min(k, T)           # a top k longer than the T texts holds them all
        out[f"txt_r{k}"] = 100 * float(np.mean([1 - math.comb(T - len(g), top) / math.comb(T, top)
                                                for g in img2txt]))
        out[f"img_r{k}"] = 100 * min(1.0, k / N)
    for side in ("txt", "img"):
        out[f"{side}_r_mean"] = float(np.mean([out[f"{side}_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def oracle_recall(truth, img2txt, ks=(1, 5, 10)):
    """The expected recall (percent, recall_at_k's keys) of an oracle that knows which captions
    are true of which images but nothing more: for each query it ranks first, in random order,
    every candidate the caption is true of (a caption such as "there are two objects" is true
    of many images), then the rest. The ceiling of a model that reads only what a caption says.
    truth (num_images, num_texts) bool, True at least where img2txt pairs an image with its
    own captions. Text retrieval: with s captions true of the image, g of them its own, one of
    those is among the first k with probability 1 - C(s-g, k') / C(s, k'), k' = min(k, s); image
    retrieval: a caption true of m images ranks its own among the first k with probability
    min(1, k / m). (A model can beat it only through how the captions were sampled, e.g. a
    caption true of many images is more often written for those with fewer true captions.)"""
    truth = np.asarray(truth, dtype=bool)
    img2txt = list(img2txt.values()) if isinstance(img2txt, dict) else img2txt
    own = np.zeros_like(truth)
    for i, caps in enumerate(img2txt):
        own[i, caps] = True
    if own.shape != truth.shape or (own & ~truth).any() or (own.sum(0) != 1).any():
        raise ValueError("truth must be (images, texts), True wherever img2txt pairs an image "
                         "with its captions, each caption belonging to one image")
    true_of_image, true_of_text = truth.sum(1), truth.sum(0)       # (N,) s, (T,) m
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100 * float(np.mean([
            1 - math.comb(s - len(g), min(k, s)) / math.comb(s, min(k, s))
            for s, g in zip(true_of_image.tolist(), img2txt)]))
        out[f"img_r{k}"] = 100 * float(np.minimum(1.0, k / true_of_text).mean())
    for side in ("txt", "img"):
        out[f"{side}_r_mean"] = float(np.mean([out[f"{side}_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def format_recall(metrics, chance=None, title="retrieval", oracle=None):
    """A small text table: TR/IR R@1/5/10 and their mean, with chance and the oracle's
    (oracle_recall) beside when given, and the model's R mean as a fraction of the oracle's."""
    keys = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
    head = f"{'':>12}" + "".join(f"{k:>9}" for k in keys)
    rows = [(name, m) for name, m in [("model", metrics), ("chance", chance), ("oracle", oracle)]
            if m is not None]
    lines = [title, head] + [f"{name:>12}" + "".join(f"{m[k]:9.2f}" for k in keys)
                             for name, m in rows]
    if oracle is not None:
        lines.append(f"R mean {metrics['r_mean']:.2f} is {metrics['r_mean'] / oracle['r_mean']:.1%} "
                     f"of the oracle's {oracle['r_mean']:.2f}")
    return "\n".join(lines)


def vqa_score(pred, answers):
    """VQA score of one predicted answer against the human answers (10 in VQA v2):
    min(1, matches / 3), i.e. an answer given by 3 or more annotators is fully right.
    Strings are compared as given; the data pipeline normalises both sides the same way."""
    return min(1.0, sum(a == pred for a in answers) / 3)


def vqa_accuracy(preds, answers):
    """Mean VQA score over questions, in [0, 1]. answers: one list of human answers per question."""
    if len(preds) != len(answers) or not preds:
        raise ValueError(f"{len(preds)} predictions for {len(answers)} questions")
    return sum(vqa_score(p, a) for p, a in zip(preds, answers)) / len(preds)


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(preds, labels):
    """Fraction of predictions equal to their label, in [0, 1] (NLVR2, SNLI-VE, as ALBEF)."""
    preds, labels = _numpy(preds), _numpy(labels)
    if preds.shape != labels.shape or preds.size == 0:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} do not match")
    return float((preds == labels).mean())


def _caption_pairs(candidates, references):
    """Lower-case whitespace tokens of each (candidate, references) pair.
    candidates: {key: str} with references {key: [str, ...]}, or a list of str aligned with a list
    of lists of str. The COCO evaluation lower-cases in its PTB tokenizer; punctuation is
    expected to be gone already (data.pre_caption)."""
    if isinstance(candidates, dict):
        if not isinstance(references, dict) or candidates.keys() != references.keys():
            raise ValueError("candidates and references must be dicts with the same keys")
        references = [references[k] for k in candidates]
        candidates = list(candidates.values())
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    pairs = []
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"candidate {i}: references must be a non-empty list of strings")
        pairs.append((cand.lower().split(), [r.lower().split() for r in refs]))
    return pairs


def _ngrams(words, n):
    """Counts of all 1..n-grams of a token list, keyed by tuple."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def bleu(candidates, references, n=4):
    """Corpus-level BLEU-1..n as the COCO caption evaluation (pycocoevalcap Bleu, Papineni et al.).
    Returns a list of n floats in [0, 1]; bleu4 is the headline number.

    Clipped n-gram matches and n-gram counts are summed over the corpus before dividing (not a
    mean of sentence scores). The reference length of a candidate is its 'closest' reference
    (the shorter on a tie), and the brevity penalty is applied to the corpus totals."""
    correct, guess = np.zeros(n), np.zeros(n)
    cand_len = ref_len = 0
    for cand, refs in _caption_pairs(candidates, references):
        max_ref = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)          # | keeps the largest count of each n-gram
        for gram, count in _ngrams(cand, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        guess += np.maximum(0, len(cand) - np.arange(n))
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    # pycocoevalcap's constants: tiny keeps a zero precision at 0 without a log, small avoids 0/0
    tiny, small = 1e-15, 1e-9
    precision = (correct + tiny) / (guess + small)
    scores = np.cumprod(precision) ** (1.0 / np.arange(1, n + 1))  # geometric mean of p_1..p_k
    ratio = (cand_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = scores * math.exp(1 - 1 / ratio)                   # brevity penalty
    return scores.tolist()


def bleu4(candidates, references):
    """Corpus BLEU-4, the captioning headline number next to CIDEr-D."""
    return bleu(candidates, references, n=4)[3]


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it (pycocoevalcap's
    Cider scorer, which is vrama91's CiderD with document frequencies from the evaluated corpus).

    For each n = 1..4, candidate and references are tf-idf vectors over n-grams, with
    idf = log(num_images) - log(max(1, df)) and df the number of images whose references contain
    the n-gram. The "D" parts: the candidate weight is clipped by the reference weight in the dot
    product (no reward for repeating an n-gram), and each candidate-reference pair is damped by a
    Gaussian of their length difference (sigma = 6). Cosines are averaged over n and references,
    scaled by 10, and averaged over images. With a single image every idf is 0 and so is the score.
    """
    pairs = _caption_pairs(candidates, references)
    cand_counts = [_ngrams(cand, n) for cand, _ in pairs]
    ref_counts = [[_ngrams(ref, n) for ref in refs] for _, refs in pairs]
    df = Counter(gram for counts in ref_counts for gram in set().union(*counts))
    log_num_images = math.log(len(pairs))

    def tfidf(counts):
        """-> one {n-gram: weight} dict per n, and the L2 norm of each."""
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_num_images - math.log(max(1.0, df[gram])))
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

    scores = []
    for (cand, refs), counts, refs_counts in zip(pairs, cand_counts, ref_counts):
        vec, norm = tfidf(counts)
        total = 0.0
        for ref, ref_c in zip(refs, refs_counts):
            ref_vec, ref_norm = tfidf(ref_c)
            # the reference code measures lengths in bigrams; the difference is the same in words
            # whenever both captions are non-empty, and otherwise every cosine is 0 anyway
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma ** 2))
            for v, r, nv, nr in zip(vec, ref_vec, norm, ref_norm):
                if nv > 0 and nr > 0:  # a zero vector has cosine 0 (all its weights are 0)
                    dot = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in v.items())
                    total += penalty * dot / (nv * nr)
        scores.append(10.0 * total / (n * len(refs)))
    return float(np.mean(scores))


# ---- the COCO caption evaluation's text cleaning ------------------------------------------
# pycocoevalcap runs Stanford's PTBTokenizer (CoreNLP 3.4.1, -preserveLines -lowerCase) on every
# caption, then drops these tokens. Brackets come out as -lrb- etc. in lower case, which the list
# (upper case) does not match: they stay, as in the official scores.
PTB_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
               "-", "--", "...", ";"}
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# split wherever they stand; a comma or colon not inside a number (1,000 10:30)
PTB_SEPARATORS = re.compile(r"(--|[;()\[\]{}&]|(?<!\d)[,:]|[,:](?!\d))")
PTB_SPLIT = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
             "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
PTB_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "vs", "etc", "inc",
                     "co", "corp", "ltd", "no", "ave", "jan", "feb", "aug", "sept", "oct", "nov",
                     "dec"}
CLITIC = re.compile(r"(.+?)(n't|'s|'ll|'re|'ve|'d|'m)$")


def _ptb_word(word):
    """One whitespace-free piece of lower-case text -> PTB tokens (punctuation included)."""
    if re.fullmatch(r"'(s|ll|re|ve|d|m)", word):
        return [word]
    front, back = [], []
    while word:                                        # opening quotes, currency
        if word[0] == '"' or word.startswith("``"):
            front.append("``")
            word = word[2:] if word.startswith("``") else word[1:]
        elif word[0] == "`" or (word[0] == "'" and not word[1:2].isdigit()):    # '90s stays
            front.append("`")
            word = word[1:]
        elif word[0] == "$" and len(word) > 1:
            front.append("$")
            word = word[1:]
        else:
            break
    while word:                                        # closing punctuation, clitics
        m = re.search(r"(\.{2,3}|[!?]+|''|[\"'%])$", word)
        clitic = CLITIC.match(word)
        if m and len(word) > len(m.group()):
            tail = m.group()
            back[:0] = ["''"] if tail == '"' else [".", "."] if tail == ".." else [tail]
            word = word[:-len(tail)]
        elif word.endswith(".") and len(word) > 1:
            stem = word[:-1]
            if len(stem) == 1 or "." in stem or stem in PTB_ABBREVIATIONS:
                break                                  # an abbreviation keeps its period
            back.insert(0, ".")
            word = stem
        elif clitic and not word.startswith("o'"):
            back.insert(0, clitic.group(2))
            word = clitic.group(1)
        else:
            break
    word = PTB_SPLIT.get(word, PTB_BRACKETS.get(word, word))
    return front + (list(word) if isinstance(word, tuple) else [word] if word else []) + back


def ptb_tokenize(text: str) -> list[str]:
    """The COCO caption evaluation's cleaning of one caption: Stanford's PTB tokenisation in lower
    case (clitics split off: "isn't" -> is n't, "man's" -> man 's; "cannot" -> can not;
    punctuation apart, except inside numbers, abbreviations and hyphenated words; brackets as
    -lrb- ...), then pycocoevalcap's punctuation tokens dropped."""
    tokens = []
    for chunk in text.lower().split():
        for piece in PTB_SEPARATORS.split(chunk):
            tokens += _ptb_word(piece) if piece else []
    return [t for t in tokens if t not in PTB_DROPPED]


def caption_scores(candidates, references) -> dict:
    """BLEU-4 and CIDEr-D as BLIP reports them (pycocoevalcap's COCOEvalCap): candidates and
    references cleaned by ptb_tokenize first. candidates: [str]; references: [[str, ...]]."""
    cands = [" ".join(ptb_tokenize(c)) for c in candidates]
    refs = [[" ".join(ptb_tokenize(r)) for r in rs] for rs in references]
    return {"bleu4": bleu4(cands, refs), "cider_d": cider_d(cands, refs)}
