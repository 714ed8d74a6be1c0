"""
Evaluation for ELIP: the metrics, the evaluation loops, the efficiency report and the analysis of
what the pruning keeps.

The metrics come first. They take scores, labels or caption strings (lists, numpy arrays or torch
tensors) and return plain Python floats. They follow the reference code that papers report with:
- retrieval recall@k as ALBEF's `itm_eval` (percentages),
- the VQA score min(1, matches / 3) against the 10 human answers,
- BLEU-1..4 and CIDEr-D as the COCO caption evaluation (pycocoevalcap's Bleu and Cider scorers,
  whose Cider is CIDEr-D), run on captions that are already cleaned (data.pre_caption) instead of
  going through its Java PTB tokenizer.
"""
import math
from collections import Counter

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Metrics


def _ranks(scores, gt):
    """0-based rank of the best ground-truth candidate of each query.
    scores (Q, C); gt (Q, C) bool with at least one True per row. Returns (Q,) long.

    The rank is the number of candidates sorted before it, counted with comparisons instead of
    ALBEF's argsort per query (O(Q*C) work, no (Q, C) int64 index tensor). Ties are broken by candidate index, as a stable
    descending sort would; ALBEF's np.argsort leaves them to the sort algorithm. Without ties
    this is exactly ALBEF's rank."""
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
    gt_t2i[torch.arange(num_texts), txt2img] = True

    result = {}
    for name, ranks in (("txt", _ranks(scores_i2t, gt_i2t)), ("img", _ranks(scores_t2i, gt_t2i))):
        for k in (1, 5, 10):
            result[f"{name}_r{k}"] = 100.0 * (ranks < k).sum().item() / len(ranks)
        result[f"{name}_r_mean"] = sum(result[f"{name}_r{k}"] for k in (1, 5, 10)) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


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


def format_recall(metrics, chance=None, title="retrieval"):
    """A small text table: TR/IR R@1/5/10 and their mean, with chance beside when given."""
    keys = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
    head = f"{'':>12}" + "".join(f"{k:>9}" for k in keys)
    rows = [(name, m) for name, m in [("model", metrics), ("chance", chance)] if m is not None]
    lines = [title, head] + [f"{name:>12}" + "".join(f"{m[k]:9.2f}" for k in keys)
                             for name, m in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Evaluation loops


@torch.no_grad()
def embed_retrieval_set(model, dataset, tokenizer, device, max_len, batch_size=64):
    """Unimodal embeddings of every image and caption of a RetrievalEvalDataset, as ALBEF's
    evaluation: the ViT sees all tokens (eval mode), the text encoder runs text-only."""
    ids, mask = tokenizer(dataset.text, max_len)
    ids, mask = ids.to(device), mask.to(device)
    text_embeds = torch.cat([model.encode_text(ids[s:s + batch_size], mask[s:s + batch_size])
                             for s in range(0, len(ids), batch_size)])          # (T, L, D)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    image_embeds = torch.cat([model.encode_image(images.to(device)) for images, _ in loader])
    return image_embeds, text_embeds, ids, mask


@torch.no_grad()
def evaluate_retrieval(model, dataset, tokenizer, device, k=16, max_len=32, batch_size=64):
    """Image-text retrieval as ALBEF evaluates it: rank all pairs by ITC similarity, re-score the
    top k candidates of each query with the ITM head, report recall@1/5/10. Also returns the
    ITC-only figures under the key "itc"."""
    was_training = model.training
    model.eval()
    image_embeds, text_embeds, ids, mask = embed_retrieval_set(model, dataset, tokenizer, device,
                                                               max_len, batch_size)
    sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).T      # (N, T)
    k_i2t, k_t2i = min(k, sim.shape[1]), min(k, sim.shape[0])

    def rerank(sim, k, query_is_image):
        """Scores (Q, C): the ITM match logit for each query's top-k candidates, -100 elsewhere.
        All (query, candidate) pairs go through the fusion encoder in batches."""
        top = sim.topk(k, dim=1).indices                                           # (Q, k)
        q = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k)     # (Q*k,)
        c = top.flatten()                                                          # (Q*k,)
        img, txt = (q, c) if query_is_image else (c, q)
        logits = torch.cat([model.itm_logits(text_embeds[t], mask[t], image_embeds[i], ids[t])[:, 1]
                            for i, t in zip(img.split(batch_size), txt.split(batch_size))])
        return torch.full_like(sim, -100.0).scatter(1, top, logits.view(-1, k).to(sim.dtype))

    i2t, t2i = rerank(sim, k_i2t, True), rerank(sim.T, k_t2i, False)
    out = recall_at_k(i2t, t2i, dataset.img2txt, dataset.txt2img)
    out["itc"] = recall_at_k(sim, sim.T, dataset.img2txt, dataset.txt2img)
    model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# Downstream evaluation
#
# The fine-tuned models of model.py on their test splits (retrieval is evaluate_retrieval above).
# Each loop runs in eval mode, where the ViT sees all tokens unless its PruneConfig has in_eval,
# and returns the metrics as plain floats together with the predictions.


@torch.no_grad()
def evaluate_classifier(model, dataset, collate, device, batch_size=64):
    """NLVR2 and SNLI-VE: the argmax of model.logits against the labels that end each batch.
    Returns ({"accuracy"}, predictions (N,) long)."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for *inputs, label in torch.utils.data.DataLoader(dataset, batch_size, collate_fn=collate):
        preds.append(model.logits(*(t.to(device) for t in inputs)).argmax(1).cpu())
        labels.append(label)
    model.train(was_training)
    preds = torch.cat(preds)
    return {"accuracy": accuracy(preds, torch.cat(labels))}, preds


@torch.no_grad()
def evaluate_vqa(model, dataset, collate, device, batch_size=64):
    """VQA by classification: the top-scoring answer of dataset.answer_list for each question.
    Returns ({"vqa_score"}, or {} for a split without answers such as VQA test-dev; the
    results in ALBEF's format, [{"question_id", "answer"}])."""
    was_training = model.training
    model.eval()
    preds = []
    for images, ids, mask, _ in torch.utils.data.DataLoader(dataset, batch_size, collate_fn=collate):
        preds.append(model.logits(images.to(device), ids.to(device), mask.to(device)).argmax(1))
    model.train(was_training)
    answers = [dataset.answer_list[i] for i in torch.cat(preds).tolist()]
    results = [{"question_id": q, "answer": a} for q, a in zip(dataset.question_ids, answers)]
    truth = [item["answers"] for item in dataset.items]
    return ({"vqa_score": vqa_accuracy(answers, truth)} if all(truth) else {}), results


@torch.no_grad()
def evaluate_caption(model, dataset, tokenizer, device, beam=3, max_new_tokens=20, batch_size=64,
                     length_penalty=1.0):
    """Captioning: greedy and beam-search captions of every image, each scored with BLEU-4 and
    CIDEr-D against all of the image's references (dataset.references).
    Returns ({"greedy_bleu4", "greedy_cider_d", "beam_bleu4", "beam_cider_d"},
    {"greedy": [caption, ...], "beam": [caption, ...]})."""
    was_training = model.training
    model.eval()
    captions = {"greedy": [], "beam": []}
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size):
        images = images.to(device)
        for name, (tokens, _) in (("greedy", model.greedy(images, max_new_tokens)),
                                  ("beam", model.beam_search(images, beam, max_new_tokens,
                                                             length_penalty))):
            captions[name] += [tokenizer.decode(t) for t in tokens.cpu()]
    model.train(was_training)
    metrics = {f"{name}_{metric}": score(caps, dataset.references)
               for name, caps in captions.items()
               for metric, score in (("bleu4", bleu4), ("cider_d", cider_d))}
    return metrics, captions


# -----------------------------------------------------------------------------
# Efficiency
#
# DESIGN.md section 5: measure, do not estimate, and compare the methods side by side in one run
# on one machine. For each token-reduction method, on the ViT alone and (--whole_model true) on
# the whole pre-training model:
#   FLOPs   FlopCounterMode around a training step (forward + backward), and around an inference
#           forward (eval mode, PruneConfig(in_eval=True) so the reduction still applies, no_grad)
#   memory  the bytes autograd saves for backward in the training step, each storage once,
#           parameters left out (they are resident whatever the method); on a GPU also the peak of
#           torch.cuda.max_memory_allocated over the step
#   time    the median of repeated training steps after warm-up, torch.set_num_threads fixed,
#           the methods taking turns round by round; "paired" is the median over rounds of the
#           ratio to `none` within the round
#   tokens  the sequence length entering each layer in the grad-enabled pass (the ELIP look-ahead
#           runs under no_grad and is not counted there) against pruning.token_counts, and the
#           ratio of removed token-layers
# each with its ratio to `none`. Then ELIP+ (paper section 4.5): the largest batch whose
# activations fit in what `none` uses; the cost of prune_and_merge against a per-sample loop; and
# our ViT against timm's.
#
#     python eval.py efficiency                                # ViT-B/16 at 224 px, batch 8
#     python eval.py efficiency --whole_model true --whole_batch 4
#     python eval.py efficiency --preset tiny                  # a quick look, seconds

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass

from torch.utils import flop_counter

from model import PRESETS as MODEL_PRESETS
from model import ELIPModel, ModelConfig
from pruning import METHODS, PruneConfig, prune_and_merge, token_counts
from vit import VisionTransformer


@dataclass
class EfficiencyConfig:
    preset: str = "base"
    # the ViT, and the vision side of the whole model: ViT-B/16 at 224 px
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    batch: int = 8
    methods: tuple = ("none", "elip", "elip_inline", "evit", "tome", "random")
    # one schedule for every method that cuts at fixed layers (elip, elip_inline, evit, random),
    # so they differ only in how they score tokens; ELIP's official default
    prune_layers: tuple = (2, 4, 10)
    keep_ratios: tuple = (0.9, 0.65, 0.4)
    lam: float = 0.8
    tome_r: int = 0                  # 0: the r whose removed token-layers come closest to elip's
    # time
    reps: int = 5                    # timed training steps per method, after warmup
    warmup: int = 1
    threads: int = 0                 # torch.set_num_threads for the run (0: torch's default)
    op_reps: int = 30                # prune_and_merge against the per-sample loop, interleaved
    op_batches: tuple = (40,)        # batches timed for it besides --batch (ELIP's 40 per GPU)
    timm_reps: int = 10              # our ViT against timm's, interleaved (0: skip)
    elip_plus: bool = True           # the ELIP+ batch search
    # the whole pre-training model: the albef preset's architecture with the widths above, a
    # small queue and vocabulary (they only add a batch-independent cost)
    whole_model: bool = False
    whole_batch: int = 4
    whole_vocab: int = 1000
    whole_queue: int = 1024
    text_len: int = 30
    device: str = "auto"             # auto: cuda when available, else cpu
    seed: int = 0
    out: str = "out/efficiency.json"

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or "none" not in self.methods:
            raise ValueError(f"methods {self.methods}: choose from {METHODS}, `none` included "
                             "(every figure is also given as a ratio to it)")
        if min(self.batch, self.whole_batch, self.reps, self.op_reps) < 1 or self.warmup < 0:
            raise ValueError("batch, whole_batch, reps and op_reps must be >= 1, warmup >= 0")
        if self.whole_batch < 2:
            raise ValueError("whole_batch must be >= 2: ITM draws each hard negative from the "
                             "other samples of the batch")
        if self.whole_vocab <= 5 or self.text_len < 2:
            raise ValueError("whole_vocab must exceed the 5 special tokens; text_len must be >= 2")


EFFICIENCY_PRESETS = {
    "base": dict(),
    "tiny": dict(img_size=64, patch_size=8, width=128, depth=12, heads=4, batch=4, reps=2,
                 op_reps=5, op_batches=(), timm_reps=2, whole_batch=2, whole_vocab=200,
                 whole_queue=64, text_len=12),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- the measuring instruments ---------------------------------------------------------
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter_mode():
    """FlopCounterMode that also counts fused attention on CPU. torch's registry has formulas for
    the CUDA attention kernels only, so on CPU F.scaled_dot_product_attention would count 0; the
    CPU kernel gets the same formulas (forward: Q K^T and A V; backward: the scores recomputed,
    then four products, as flash attention does). Matrix products count 2 FLOPs per
    multiply-add; element-wise work (softmax, norms, GELU) is not counted, as in torch's counter."""
    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops})


@contextlib.contextmanager
def saved_tensor_bytes(exclude=()):
    """The activation memory of a forward: yields a dict {storage address: bytes} that is filled
    when the block ends, with the storages autograd still holds for backward at that moment
    (keep the output alive until then). A storage counts once however many tensors or views of
    it are saved, and whole (a saved view keeps all of its storage alive). What a discarded
    branch of the graph saved is gone by then and not counted (ToMe computes its matching keys
    with grad enabled, then drops them), so freed addresses cannot be confused with live ones.
    Storages of the tensors in `exclude` (the parameters) are left out."""
    held, saved = [], {}

    def pack(t):
        # the same storage, without t's grad_fn: returning t itself would make a saved output
        # hold its own graph node, a cycle that outlives a forward that is never backpropagated
        t = t.detach()
        held.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    for t in (ref() for ref in held):
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()


@contextlib.contextmanager
def layer_lengths(blocks):
    """Yields a list that collects the sequence length entering each of `blocks` in grad-enabled
    calls; the ELIP look-ahead runs the same blocks under no_grad and is left out."""
    lengths = []
    hooks = [b.register_forward_pre_hook(
        lambda m, args: lengths.append(args[0].shape[1]) if torch.is_grad_enabled() else None)
        for b in blocks]
    try:
        yield lengths
    finally:
        for h in hooks:
            h.remove()


def removed_ratio(lengths, num_patches):
    """The fraction of token-layers removed: 1 - sum(lengths) / (depth * (1 + M))."""
    return 1.0 - sum(lengths) / (len(lengths) * (1 + num_patches))


def matching_tome_r(num_patches, depth, target):
    """The ToMe r whose removed token-layer ratio comes closest to `target`."""
    return min(range(num_patches // 2 + 1), key=lambda r: abs(target - removed_ratio(
        token_counts(num_patches, depth, PruneConfig(method="tome", tome_r=r)), num_patches)))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident(module):
    return [*module.parameters(), *module.buffers()]


def train_step_figures(loss_fn, module, blocks, batch):
    """One instrumented training step (forward + backward) at `batch`: its FLOPs, the bytes saved
    for backward, and the sequence length entering each of `blocks`."""
    module.train()
    with flop_counter_mode() as flops:
        with layer_lengths(blocks) as lengths, saved_tensor_bytes(_resident(module)) as saved:
            loss = loss_fn(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return dict(train_flops=flops.get_total_flops(), act_bytes=sum(saved.values()),
                lengths=lengths)


def activation_bytes(loss_fn, module, batch):
    """Bytes saved for backward by a training forward at `batch` (the backward is not needed)."""
    module.train()
    with saved_tensor_bytes(_resident(module)) as saved:
        loss = loss_fn(batch)
    del loss                         # counted while its graph was alive; now let it go
    return sum(saved.values())


def cuda_step_peak(loss_fn, module, batch, device):
    """Peak CUDA memory of a training step above what was allocated before it: activations,
    gradients and kernel workspace."""
    module.train()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss_fn(batch).backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    module.zero_grad(set_to_none=True)
    return peak


def step_seconds(loss_fn, module, batch, device):
    """Wall time of one training step (forward + backward; the optimizer update, the same for
    every method, is left out)."""
    module.train()
    _sync(device)
    start = time.perf_counter()
    loss_fn(batch).backward()
    _sync(device)
    seconds = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return seconds


def elip_plus_batch(measure, budget, b1, b2, measured=None, min_batch=1):
    """ELIP+ (paper section 4.5): the largest batch whose training-step activation memory fits in
    `budget` bytes. measure(batch) -> bytes; measured: {batch: bytes} already known.
    Fits memory = fixed + per_sample * batch on b1 and b2, solves it for the budget, then checks
    by measuring: steps down while the batch does not fit, up while the next one still does.
    Batches below min_batch are never measured; min_batch - 1 is returned if none fits."""
    measured = dict(measured or {})

    def at(b):
        if b not in measured:
            measured[b] = measure(b)
        return measured[b]

    per_sample = (at(b2) - at(b1)) / (b2 - b1)
    if per_sample <= 0:
        raise ValueError(f"memory does not grow with the batch: {measured}")
    fixed = at(b1) - per_sample * b1
    b = max(min_batch, int((budget - fixed) // per_sample))
    while b >= min_batch and at(b) > budget:
        b -= 1
    while at(b + 1) <= budget:
        b += 1
    return dict(batch=b, bytes=measured.get(b), budget=budget, per_sample_bytes=per_sample,
                fixed_bytes=fixed, measured=dict(sorted(measured.items())))


# ---- what is measured: the ViT alone, the whole model ----------------------------------
def method_prune_configs(cfg, num_patches):
    """{method: PruneConfig} with the shared schedule, ToMe's r matched to elip's removed
    token-layers unless given, and in_eval so the inference forward reduces tokens too."""
    sched = dict(prune_layers=cfg.prune_layers, keep_ratios=cfg.keep_ratios, lam=cfg.lam,
                 in_eval=True)
    elip = removed_ratio(token_counts(num_patches, cfg.depth, PruneConfig(method="elip", **sched)),
                         num_patches)
    r = cfg.tome_r or matching_tome_r(num_patches, cfg.depth, elip)
    order = ["none"] + [m for m in cfg.methods if m != "none"]     # `none` first: the reference
    return {m: PruneConfig(method=m, tome_r=r, **sched) for m in order}


def vit_inputs(cfg, batch, device):
    """Random images and a random text [CLS] (read by the text-guided methods only), the same for
    every method."""
    g = torch.Generator().manual_seed(cfg.seed + batch)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    return images.to(device), torch.randn(batch, cfg.width, generator=g).to(device)


def build_vit_bench(cfg, prune, device):
    """(module, blocks, loss_fn, inference_flops) for the ViT alone. The loss is the mean of the
    output tokens, so every token that reaches the end gets a gradient."""
    torch.manual_seed(cfg.seed)
    vit = VisionTransformer(cfg.img_size, cfg.patch_size, cfg.width, cfg.depth, cfg.heads,
                            prune=prune).to(device)
    inputs = {}

    def loss_fn(batch):
        if batch not in inputs:
            inputs[batch] = vit_inputs(cfg, batch, device)
        return vit(*inputs[batch]).mean()

    def inference_flops(batch):
        vit.eval()
        with torch.no_grad(), flop_counter_mode() as flops:
            vit(*vit_inputs(cfg, batch, device))
        vit.train()
        return flops.get_total_flops()

    return vit, vit.blocks, loss_fn, inference_flops


def whole_model_config(cfg, prune):
    """The albef preset's architecture with the ViT's size and widths, a small queue and
    vocabulary, a text of cfg.text_len tokens."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    arch = {k: v for k, v in MODEL_PRESETS["albef"].items() if k in fields}
    arch.update(img_size=cfg.img_size, patch_size=cfg.patch_size, vision_width=cfg.width,
                vision_depth=cfg.depth, vision_heads=cfg.heads, text_width=cfg.width,
                text_heads=cfg.heads, text_mlp=4 * cfg.width, max_len=cfg.text_len,
                vocab_size=cfg.whole_vocab, queue_size=cfg.whole_queue)
    return ModelConfig(**arch, prune=prune)


def build_model_bench(cfg, prune, device):
    """(module, blocks, loss_fn, None) for the whole pre-training model: random images and texts
    without padding, loss = the sum of its losses; blocks are the online ViT's."""
    torch.manual_seed(cfg.seed)
    model = ELIPModel(whole_model_config(cfg, prune)).to(device)
    inputs = {}

    def loss_fn(batch):
        if batch not in inputs:
            images, _ = vit_inputs(cfg, batch, device)
            g = torch.Generator().manual_seed(cfg.seed + batch)
            ids = torch.randint(5, cfg.whole_vocab, (batch, cfg.text_len), generator=g)
            ids[:, 0] = model.cfg.cls_id
            inputs[batch] = images, ids.to(device), torch.ones_like(ids).to(device)
        return model(*inputs[batch], alpha=0.4)["loss"]

    return model, model.visual_encoder.blocks, loss_fn, None


RATIO_KEYS = ("train_flops", "infer_flops", "act_bytes", "cuda_peak_bytes", "step_s")


def measure_methods(cfg, build, batch, device, num_patches, prunes, scope, min_batch=1):
    """Every figure of every method in `prunes`, measured with build(cfg, prune, device), and
    each figure's ratio to `none`. min_batch: the smallest batch the model can train on.
    The timed steps go round-robin over the methods (the order rotated every round), so a load
    that drifts during the run weighs on every method alike; all the models stay built for it."""
    results, steps = {}, {}
    for method, prune in prunes.items():
        log(f"[{scope}] {method}: building; FLOPs, saved bytes, lengths")
        module, blocks, loss_fn, inference_flops = build(cfg, prune, device)
        torch.manual_seed(cfg.seed)
        fig = train_step_figures(loss_fn, module, blocks, batch)
        fig["token_counts"] = token_counts(num_patches, cfg.depth, prune)
        fig["lengths_match_token_counts"] = fig["lengths"] == fig["token_counts"]
        fig["removed_ratio"] = removed_ratio(fig["lengths"], num_patches)
        if inference_flops is not None:
            fig["infer_flops"] = inference_flops(batch)
        if device.type == "cuda":
            fig["cuda_peak_bytes"] = cuda_step_peak(loss_fn, module, batch, device)
        if cfg.elip_plus:
            log(f"[{scope}] {method}: ELIP+ batch search")
            budget = results["none"]["act_bytes"] if method != "none" else fig["act_bytes"]
            fig["elip_plus"] = elip_plus_batch(
                lambda b: activation_bytes(loss_fn, module, b), budget,
                b1=batch // 2 if batch // 2 >= min_batch else batch + 1, b2=batch,
                measured={batch: fig["act_bytes"]}, min_batch=min_batch)
        fig["prune"] = dataclasses.asdict(prune)
        results[method], steps[method] = fig, (loss_fn, module)
    log(f"[{scope}] timing {cfg.warmup} + {cfg.reps} rounds of one step per method")
    names = list(steps)
    for rnd in range(cfg.warmup + cfg.reps):
        for method in names[rnd % len(names):] + names[:rnd % len(names)]:
            seconds = step_seconds(*steps[method], batch, device)
            if rnd >= cfg.warmup:
                results[method].setdefault("step_s_all", []).append(seconds)
    for fig in results.values():
        fig["step_s"] = statistics.median(fig["step_s_all"])
    for fig in results.values():
        fig["ratio"] = {k: fig[k] / results["none"][k] for k in RATIO_KEYS if k in fig}
        # the median of the ratios within a round, steadier than the ratio of the medians when
        # the load of the machine drifts
        fig["ratio"]["step_s_paired"] = statistics.median(
            a / b for a, b in zip(fig["step_s_all"], results["none"]["step_s_all"]))
    return results


# ---- the cost of prune-and-merge, and our ViT against timm's --------------------------
def loop_prune_and_merge(x, scores, num_keep):
    """REFERENCE ONLY, the benchmark's baseline (never used by the model): ELIP's prune-and-merge
    written the way the official code does it, choosing the tokens for the whole batch at once
    but then indexing each sample's kept and dropped tokens one by one in a Python loop.
    Same result as pruning.prune_and_merge(x, scores, num_keep)[0]
    (tests/test_efficiency.py::test_loop_reference_equals_prune_and_merge)."""
    order = scores.detach().sort(dim=1, descending=True).indices       # (B, N)
    keep = order[:, :num_keep].sort(dim=1).values + 1                  # (B, K) indices into x
    keep = torch.cat([keep.new_zeros(keep.shape[0], 1), keep], dim=1)  # (B, 1+K) [CLS] first
    drop = order[:, num_keep:]                                         # (B, N-K)
    w = scores.detach().gather(1, drop)
    w = w / (w.sum(dim=1, keepdim=True) + 1e-6)                        # Eq. 4 weights (B, N-K)
    kept = torch.stack([xb[kb] for xb, kb in zip(x, keep)])            # (B, 1+K, D)
    merged = torch.stack([(xb[db + 1] * wb[:, None]).sum(0, keepdim=True)
                          for xb, db, wb in zip(x, drop, w)])          # (B, 1, D)
    return torch.cat([kept, merged], dim=1)


def bench_prune_and_merge(cfg, device, num_patches, vit_results):
    """Forward + backward time of pruning.prune_and_merge and of the per-sample loop, alternated
    (the order swapped every round), on the input of each cut of the elip schedule, at --batch
    and at each of --op_batches; at --batch, the first cut's time (and the sum over the cuts) as
    a fraction of the measured ViT training step."""
    elip = PruneConfig(prune_layers=cfg.prune_layers, keep_ratios=cfg.keep_ratios)
    counts = token_counts(num_patches, cfg.depth, elip)
    impls = {"vectorised": lambda x, s, k: prune_and_merge(x, s, k)[0],
             "loop": loop_prune_and_merge}
    g = torch.Generator().manual_seed(cfg.seed)
    cuts = []
    for batch in [cfg.batch] + [b for b in cfg.op_batches if b != cfg.batch]:
        for layer, ratio in zip(cfg.prune_layers, cfg.keep_ratios):
            length, k = counts[layer - 1], int(num_patches * ratio)
            if k >= length - 1:
                continue
            x = torch.randn(batch, length, cfg.width, generator=g).to(device).requires_grad_()
            scores = torch.rand(batch, length - 1, generator=g).to(device)
            grad = torch.randn(batch, k + 2, cfg.width, generator=g).to(device)
            times = {name: [] for name in impls}
            for rnd in range(3 + cfg.op_reps):                        # 3 warm-up rounds
                for name in (list(impls) if rnd % 2 == 0 else list(impls)[::-1]):
                    _sync(device)
                    start = time.perf_counter()
                    impls[name](x, scores, k).backward(grad)
                    _sync(device)
                    if rnd >= 3:
                        times[name].append(time.perf_counter() - start)
                    x.grad = None
            med = {name: statistics.median(t) for name, t in times.items()}
            cuts.append(dict(layer=layer, input_shape=[batch, length, cfg.width], num_keep=k,
                             vectorised_s=med["vectorised"], loop_s=med["loop"],
                             speedup=med["loop"] / med["vectorised"]))
    out = dict(cuts=cuts, reps=cfg.op_reps)
    at_batch = [c for c in cuts if c["input_shape"][0] == cfg.batch]
    if at_batch:
        first, total = at_batch[0]["vectorised_s"], sum(c["vectorised_s"] for c in at_batch)
        for m in ("elip", "none"):
            if m in vit_results:
                out[f"first_cut_fraction_of_{m}_step"] = first / vit_results[m]["step_s"]
                out[f"all_cuts_fraction_of_{m}_step"] = total / vit_results[m]["step_s"]
    return out


def compare_with_timm(cfg, device):
    """Training steps of our ViT and timm's VisionTransformer of the same size (no pruning),
    alternated (the order swapped every round) after the warm-up rounds: medians and ratio."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:
        return dict(skipped="timm is not installed")
    torch.manual_seed(cfg.seed)
    ours = VisionTransformer(cfg.img_size, cfg.patch_size, cfg.width, cfg.depth, cfg.heads,
                             prune=PruneConfig(method="none")).to(device)
    timm_vit = TimmViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                       depth=cfg.depth, num_heads=cfg.heads, num_classes=0).to(device)
    images, _ = vit_inputs(cfg, cfg.batch, device)
    runs = {"ours": (ours, lambda b: ours(images).mean()),
            "timm": (timm_vit, lambda b: timm_vit.forward_features(images).mean())}
    out = {}
    for name, (module, loss_fn) in runs.items():
        with flop_counter_mode() as flops:
            loss_fn(cfg.batch).backward()
        module.zero_grad(set_to_none=True)
        out[f"{name}_train_flops"] = flops.get_total_flops()
        out[f"{name}_params"] = sum(p.numel() for p in module.parameters())
    times = {name: [] for name in runs}
    for rnd in range(cfg.warmup + cfg.timm_reps):
        for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            module, loss_fn = runs[name]
            seconds = step_seconds(loss_fn, module, cfg.batch, device)
            if rnd >= cfg.warmup:
                times[name].append(seconds)
    out.update(ours_s=statistics.median(times["ours"]), timm_s=statistics.median(times["timm"]),
               ours_s_all=times["ours"], timm_s_all=times["timm"], reps=cfg.timm_reps)
    out["ratio"] = out["ours_s"] / out["timm_s"]
    out["ratio_paired"] = statistics.median(a / b for a, b in zip(times["ours"], times["timm"]))
    return out


# ---- the report ------------------------------------------------------------------------
def check_targets(report):
    """The issue's targets against the measured figures; meaningful for ViT-B/16 at 224 px with
    ELIP's default schedule (`applies` says whether this run is that setting)."""
    cfg, vit = report["config"], report["vit"]
    applies = (cfg["img_size"], cfg["patch_size"], cfg["width"], cfg["depth"], cfg["heads"]) == \
        (224, 16, 768, 12, 12) and tuple(cfg["prune_layers"]) == (2, 4, 10) and \
        tuple(cfg["keep_ratios"]) == (0.9, 0.65, 0.4)
    pm, timm = report["prune_and_merge"], report["timm"]
    first = pm["cuts"][0] if pm["cuts"] else {}
    rows = [
        ("elip ViT training activation memory <= 0.73 x none",
         vit.get("elip", {}).get("ratio", {}).get("act_bytes"), "<=", 0.73),
        ("elip ViT training FLOPs <= 0.90 x none",
         vit.get("elip", {}).get("ratio", {}).get("train_flops"), "<=", 0.90),
        ("elip_inline ViT training FLOPs <= 0.73 x none",
         vit.get("elip_inline", {}).get("ratio", {}).get("train_flops"), "<=", 0.73),
        ("prune_and_merge (first cut) <= 1% of the elip ViT training step",
         pm.get("first_cut_fraction_of_elip_step"), "<=", 0.01),
        ("prune_and_merge >= 5x faster than the per-sample loop", first.get("speedup"), ">=", 5.0),
        ("our ViT training step at most 5% slower than timm's", timm.get("ratio"), "<=", 1.05),
    ]
    return [dict(target=name, value=value, limit=limit, applies=applies,
                 met=None if value is None else value <= limit if op == "<=" else value >= limit)
            for name, value, op, limit in rows]


def format_methods(results, batch):
    """A table of one scope's figures, each with its ratio to `none`, then the lengths."""
    cols = [("train GFLOP", "train_flops", 1e-9), ("infer GFLOP", "infer_flops", 1e-9),
            ("act MiB", "act_bytes", 2 ** -20), ("cuda MiB", "cuda_peak_bytes", 2 ** -20),
            ("step s", "step_s", 1.0)]
    cols = [c for c in cols if c[1] in results["none"]]
    head = f"{'method':<12}" + "".join(f"{name:>13}{'x none':>8}" for name, _, _ in cols) + \
        f"{'paired':>8}{'removed':>9}{'ELIP+ batch':>13}"
    lines = [head]
    for method, fig in results.items():
        row = f"{method:<12}" + "".join(f"{fig[k] * scale:13.2f}{fig['ratio'][k]:8.3f}"
                                        for _, k, scale in cols)
        row += f"{fig['ratio']['step_s_paired']:8.3f}"
        plus = fig.get("elip_plus", {}).get("batch")
        row += f"{fig['removed_ratio']:9.3f}" + ("" if plus is None else f"{plus:>7} vs {batch}")
        lines.append(row)
    lines.append("sequence length entering each layer (grad-enabled pass), and whether it equals "
                 "pruning.token_counts:")
    for method, fig in results.items():
        same = fig["lengths_match_token_counts"]
        lines.append(f"  {method:<12}{' '.join(map(str, fig['lengths']))}  "
                     + ("= token_counts" if same else f"!= token_counts {fig['token_counts']}"))
    return lines


def format_efficiency(report):
    cfg, machine = report["config"], report["machine"]
    lines = [f"efficiency on {machine['device']} ({machine['processor']}), {machine['threads']} "
             f"threads, torch {machine['torch']}; medians of {cfg['reps']} steps after "
             f"{cfg['warmup']} warm-up; memory = bytes saved for backward (parameters excluded)",
             f"load average (1, 5, 15 min) at start {machine['load_start']}, at end "
             f"{machine['load_end']} (this run accounts for about {machine['threads']})",
             f"schedule {tuple(cfg['prune_layers'])} keep {tuple(cfg['keep_ratios'])} lam "
             f"{cfg['lam']} for elip, elip_inline (ours, not the paper's), evit, random; "
             f"tome r = {report['tome_r']}",
             "",
             f"ViT alone: {cfg['img_size']} px, patch {cfg['patch_size']}, width {cfg['width']}, "
             f"depth {cfg['depth']}, heads {cfg['heads']}, batch {cfg['batch']}"]
    lines += format_methods(report["vit"], cfg["batch"])
    if "whole_model" in report:
        w = report["whole_model"]
        lines += ["", f"whole model (ELIPModel, {w['description']}), batch {cfg['whole_batch']}"]
        lines += format_methods(w["methods"], cfg["whole_batch"])
    pm = report["prune_and_merge"]
    lines += ["", f"prune_and_merge, forward + backward, median of {pm['reps']} (interleaved):"]
    for c in pm["cuts"]:
        lines.append(f"  before layer {c['layer']}: {tuple(c['input_shape'])} keep {c['num_keep']}"
                     f": vectorised {c['vectorised_s'] * 1e3:.3f} ms, per-sample loop "
                     f"{c['loop_s'] * 1e3:.3f} ms, speed-up {c['speedup']:.1f}x")
    for key in ("first_cut_fraction_of_elip_step", "all_cuts_fraction_of_elip_step",
                "first_cut_fraction_of_none_step"):
        if key in pm:
            lines.append(f"  {key.replace('_', ' ')}: {100 * pm[key]:.3f}%")
    t = report["timm"]
    lines.append("")
    if "skipped" in t:
        lines.append(f"timm comparison skipped: {t['skipped']}")
    else:
        lines.append(f"ViT training step, method none, ours vs timm (interleaved, median of "
                     f"{t['reps']}): {t['ours_s']:.3f} s vs {t['timm_s']:.3f} s, ratio "
                     f"{t['ratio']:.3f} (paired by round {t['ratio_paired']:.3f}); GFLOP {t['ours_train_flops'] / 1e9:.1f} vs "
                     f"{t['timm_train_flops'] / 1e9:.1f}; params {t['ours_params']:,} vs "
                     f"{t['timm_params']:,}")
    lines += ["", "targets" + ("" if report["targets"][0]["applies"] else
                               " (NOT the issue's setting: ViT-B/16, 224 px, default schedule)")]
    for row in report["targets"]:
        value = "not measured" if row["value"] is None else f"{row['value']:.4g}"
        verdict = "-" if row["met"] is None else "met" if row["met"] else "MISSED"
        lines.append(f"  {verdict:<7}{row['target']}: {value}")
    return "\n".join(lines)


def run_efficiency(cfg):
    """Every measurement of the report, as a JSON-ready dict."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    prunes = method_prune_configs(cfg, num_patches)
    report = dict(config=dataclasses.asdict(cfg), tome_r=prunes["none"].tome_r, machine=dict(
        device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
        processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        load_start=[round(x, 2) for x in os.getloadavg()]))
    report["vit"] = measure_methods(cfg, build_vit_bench, cfg.batch, device, num_patches,
                                    prunes, "vit")
    log("prune_and_merge against the per-sample loop")
    report["prune_and_merge"] = bench_prune_and_merge(cfg, device, num_patches, report["vit"])
    log("our ViT against timm's")
    report["timm"] = compare_with_timm(cfg, device) if cfg.timm_reps else dict(
        skipped="--timm_reps 0")
    if cfg.whole_model:
        mc = whole_model_config(cfg, prunes["none"])
        report["whole_model"] = dict(
            description=f"albef preset architecture at {mc.img_size} px: text {mc.text_layers} + "
                        f"fusion {mc.fusion_layers} layers, width {mc.text_width}, drop_path "
                        f"{mc.drop_path}, losses {'+'.join(mc.losses)}; queue {mc.queue_size} and "
                        f"vocabulary {mc.vocab_size} (small, to keep it fast), text length "
                        f"{cfg.text_len}",
            model_config=dataclasses.asdict(mc),
            methods=measure_methods(cfg, build_model_bench, cfg.whole_batch, device, num_patches,
                                    prunes, "whole model", min_batch=2))
    report["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = check_targets(report)
    return report


def report_command(config_cls, presets, run, fmt):
    """A subcommand `python eval.py NAME [--flag value ...]`: the flags fill config_cls (as
    train_pretrain's do), run(cfg) makes the report, fmt(report) is printed and the report is
    written as JSON to cfg.out."""
    def main(argv):
        from train_pretrain import parse_config   # here: train_pretrain imports this module
        cfg = parse_config(config_cls(), argv, presets)
        report = run(cfg)
        print(fmt(report))
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        with open(cfg.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {cfg.out}")
    return main


efficiency_main = report_command(EfficiencyConfig, EFFICIENCY_PRESETS, run_efficiency,
                                 format_efficiency)


# -----------------------------------------------------------------------------
# Analysis: what the pruning keeps
#
# The embedded world knows what each caption talks about: its scenes come with per-object pixel
# masks, and each caption names some of the objects (data.World.captions). So we can look at the
# patches each method keeps (the paper's Fig. 4) and count how many of them belong to the
# objects the caption names:
#
#     python eval.py keep --checkpoint out/pretrain/checkpoint.pt      # out/analysis/keep.json
#     python eval.py picture --checkpoint out/pretrain/checkpoint.pt   # out/analysis/pruning.png
#     python eval.py keep --preset quick                               # a first look, seconds
#
# The trained online ViT runs in eval mode with its reduction forced on (PruneConfig in_eval),
# each method on the checkpoint's schedule; the text-guided ones read the [CLS] of the trained
# text encoder (Eq. 1). VisionTransformer.forward_features says, for every token after each
# reduction, which original patch it is (`sources`); a patch fused into the merged token is no
# longer a patch of its own and counts as dropped.
#
# The rule: a patch belongs to an object when the object covers at least half of its pixels
# (--cover), a pixel being covered when its centre is inside the object (World.masks at the
# model's resolution). A small object (about 13 px across at 64 px, patch 8) can own no patch
# under this rule; it then counts for nothing, and the report says how many did.

from PIL import Image, ImageDraw, ImageFont

import data
from model import build_vit
from pruning import TEXT_GUIDED, cut_layers
from text_encoder import Tokenizer


@dataclass
class AnalysisConfig:
    preset: str = "full"
    checkpoint: str = "out/pretrain/checkpoint.pt"   # a checkpoint of train_pretrain.py
    split: str = "test"              # of the embedded world, with the checkpoint's world_seed
    cover: float = 0.5               # a patch belongs to an object covering this much of it
    batch: int = 50
    seed: int = 0                    # the random method's draws
    threads: int = 0                 # torch.set_num_threads (0: torch's default)
    device: str = "auto"             # auto: cuda when available, else cpu

    def __post_init__(self):
        if self.split not in data.SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {data.SPLITS}")
        if not 0.0 < self.cover <= 1.0:
            raise ValueError(f"cover {self.cover} must lie in (0, 1]")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")


@dataclass
class KeepConfig(AnalysisConfig):
    scenes: int = 200                # the split's first scenes ...
    captions: int = data.CAPTIONS_PER_IMAGE          # ... each with this many of its captions
    methods: tuple = ("elip", "evit", "random")      # rows; a text-guided method once per lam
    lams: tuple = (0.8, 0.6, 1.0)    # Eq. 1: 1.0 is the image [CLS] alone (vision only)
    out: str = "out/analysis/keep.json"

    def __post_init__(self):
        super().__post_init__()
        self.methods, self.lams = tuple(self.methods), tuple(float(x) for x in self.lams)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods {self.methods}: choose from {METHODS}")
        if not self.lams or any(not 0.0 <= x <= 1.0 for x in self.lams):
            raise ValueError(f"lams {self.lams} must be given and lie in [0, 1]")
        if min(self.scenes, self.captions) < 1:
            raise ValueError("scenes and captions must be >= 1")


@dataclass
class PictureConfig(AnalysisConfig):
    images: int = 6                  # rows: the split's first scenes, one caption each
    method: str = "elip"
    lam: float = 0.8
    scale: int = 4                   # the img_size images are shown this many times larger
    out: str = "out/analysis/pruning.png"

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if self.images < 1 or self.scale < 1:
            raise ValueError("images and scale must be >= 1")


KEEP_PRESETS = {"full": dict(), "quick": dict(scenes=20, captions=2)}      # quick: seconds
PICTURE_PRESETS = {"full": dict(), "quick": dict(images=2, scale=2)}


# ---- which patches survive ---------------------------------------------------------------
def patch_mask(src, num_patches):
    """Sources (B, N) -> (B, M) bool: the patches that are a token of their own. A fused token
    (-1) is no patch: it is scattered into a spare column M, cut off afterwards."""
    idx = src.masked_fill(src < 0, num_patches)                                 # (B, N)
    out = torch.zeros(src.shape[0], num_patches + 1, dtype=torch.bool, device=src.device)
    return out.scatter_(1, idx, True)[:, :num_patches]                          # (B, M)


@torch.no_grad()
def kept_patches(vit, images, text_cls=None, layers=None):
    """Which of the M patches are still tokens of their own entering each of the cut `layers`
    (default: the schedule's, pruning.cut_layers): (B, S, M) bool. The ViT must reduce in the
    mode it is in (train mode, or eval with PruneConfig(in_eval=True)); a method that never
    reduces (none) keeps every patch."""
    cfg, M, depth, B = vit.prune, vit.num_patches, len(vit.blocks), images.shape[0]
    if not (vit.training or cfg.in_eval):
        raise ValueError("the ViT is in eval mode and its PruneConfig has in_eval False, so it "
                         "keeps every token: build it with PruneConfig(in_eval=True)")
    layers = list(cut_layers(cfg, depth)) if layers is None else list(layers)
    _, sources = vit.forward_features(images, text_cls)                        # {layer: (B, N)}
    start = torch.arange(M, device=images.device).expand(B, M)                 # (B, M) all
    masks = []
    for layer in layers:
        # the last reduction at or before this layer decides what enters it
        src = next((s for i, s in reversed(sources.items()) if i <= layer), start)
        masks.append(patch_mask(src, M))
    if not masks:
        return torch.zeros(B, 0, M, dtype=torch.bool, device=images.device)
    return torch.stack(masks, dim=1)                                            # (B, S, M)


def object_patches(masks, patch_size, cover=0.5):
    """Pixel masks (..., H, W) bool -> (..., M) bool, patches in the ViT's row-major order: the
    patches whose pixels the mask covers for at least `cover` of them."""
    *lead, H, W = masks.shape
    p = patch_size
    frac = masks.reshape(*lead, H // p, p, W // p, p).float().mean((-3, -1))   # (..., H/p, W/p)
    return (frac >= cover).flatten(-2)                                          # (..., M)


# ---- the model, the world ----------------------------------------------------------------
def load_for_analysis(path):
    """(ELIPModel in eval mode, tokenizer, world seed) from a checkpoint of train_pretrain.py."""
    from train_pretrain import TrainConfig, config_from_dict, load_checkpoint   # imports eval.py
    ckpt = load_checkpoint(path)
    if not {"model", "config", "vocab"} <= ckpt.keys():
        raise SystemExit(f"error: {path} is not a checkpoint of train_pretrain.py")
    cfg = config_from_dict(TrainConfig, ckpt["config"])
    model = ELIPModel(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), Tokenizer(ckpt["vocab"]), cfg.world_seed


def analysis_vit(model, method, lam):
    """A copy of the model's online ViT that reduces tokens with `method` (and `lam`) on the
    model's schedule, in eval mode too."""
    prune = dataclasses.replace(model.cfg.prune, method=method, lam=lam, in_eval=True)
    vit = build_vit(model.cfg, prune).to(next(model.parameters()).device)
    vit.load_state_dict(model.visual_encoder.state_dict())
    return vit.eval()


def world_pairs(seed, split, scenes, captions, mc, cover):
    """(caption, image) pairs of the split's first `scenes` scenes, up to `captions` captions
    each, as a dict: images (S, 3, R, R) as the evaluation transform makes them; texts cleaned
    as the datasets clean them; scene (C,) the scene of each caption; named and objects (C, M)
    bool, the patches of the objects the caption names and of all of the scene's objects;
    unowned, the named objects that own no patch under the rule."""
    world, transform = data.World(seed), data.create_transform(mc.img_size, train=False)
    images, texts, scene_of, named, objects, unowned = [], [], [], [], [], 0
    for i in range(scenes):
        scene = world.scene(split, i)
        images.append(transform(data.load_image(world.path(split, i))))
        masks = torch.from_numpy(world.masks(scene, mc.img_size))               # (O, R, R)
        owned = object_patches(masks, mc.patch_size, cover)                     # (O, M)
        for text, idx in world.captions(scene, captions):
            texts.append(data.pre_caption(text, mc.max_len))
            scene_of.append(i)
            named.append(owned[list(idx)].any(0))
            objects.append(owned.any(0))
            unowned += int((~owned[list(idx)].any(1)).sum())
    return dict(images=torch.stack(images), texts=texts, scene=torch.tensor(scene_of),
                named=torch.stack(named), objects=torch.stack(objects), unowned=unowned)


@torch.no_grad()
def text_cls_of(model, tok, texts, batch, device):
    """The unprojected [CLS] (C, D) of the trained text encoder: what guides ELIP (Eq. 1)."""
    out = []
    for s in range(0, len(texts), batch):
        ids, mask = tok(texts[s:s + batch], model.cfg.max_len)
        out.append(model.encode_text(ids.to(device), mask.to(device))[:, 0])
    return torch.cat(out)


def analysis_device(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                        if cfg.device == "auto" else cfg.device)


# ---- keep: the fractions -----------------------------------------------------------------
def keep_fractions(vit, pairs, text_cls, layers, batch):
    """(S, 3): per cut, the fraction of the named objects' patches, of the other objects'
    patches and of all patches that enter the layer as tokens of their own, pooled over all
    (caption, image) pairs."""
    named = pairs["named"]
    # (C, 3, M): named, the other objects', every patch
    groups = torch.stack([named, pairs["objects"] & ~named, torch.ones_like(named)], 1)
    kept_sum = torch.zeros(len(layers), 3, dtype=torch.long, device=named.device)
    for s in range(0, len(named), batch):
        images = pairs["images"][pairs["scene"][s:s + batch]]                  # (b, 3, R, R)
        kept = kept_patches(vit, images, text_cls[s:s + batch], layers)        # (b, S, M)
        kept_sum += (kept[:, :, None] & groups[s:s + batch, None]).sum((0, 3))  # (S, 3)
    return (kept_sum / groups.sum((0, 2))).tolist()


def keep_rows(methods, lams):
    """[(label, method, lam)]: each text-guided method once per lam, the others once."""
    return [(f"{m} lam {lam}", m, lam) for m in methods if m in TEXT_GUIDED for lam in lams] + \
        [(m, m, lams[0]) for m in methods if m not in TEXT_GUIDED]


def run_keep(cfg):
    device = analysis_device(cfg)
    model, tok, world_seed = load_for_analysis(cfg.checkpoint)
    model.to(device)
    mc = model.cfg
    log(f"world {world_seed} {cfg.split}: {cfg.scenes} scenes x {cfg.captions} captions")
    pairs = world_pairs(world_seed, cfg.split, cfg.scenes, cfg.captions, mc, cfg.cover)
    pairs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pairs.items()}
    text_cls = text_cls_of(model, tok, pairs["texts"], cfg.batch, device)      # (C, D)
    layers = list(mc.prune.prune_layers)
    M = model.visual_encoder.num_patches
    rows = []
    for label, method, lam in keep_rows(cfg.methods, cfg.lams):
        log(f"keep: {label}")
        vit = analysis_vit(model, method, lam)
        torch.manual_seed(cfg.seed)                   # the same draws for random, every run
        fractions = keep_fractions(vit, pairs, text_cls, layers, cfg.batch)
        rows.append(dict(label=label, method=method, lam=lam, stages=[
            dict(layer=layer, named=f[0], other=f[1], all=f[2])
            for layer, f in zip(layers, fractions)]))
    return dict(
        config=dataclasses.asdict(cfg), world_seed=world_seed, num_patches=M,
        schedule=dict(prune_layers=layers, keep_ratios=list(mc.prune.keep_ratios),
                      merge=mc.prune.merge, tome_r=mc.prune.tome_r),
        rule=f"a patch belongs to an object when the object covers at least {cfg.cover:g} of its "
             f"{mc.patch_size}x{mc.patch_size} pixels (pixel centres, at {mc.img_size} px); "
             "fractions are of the patches entering the layer as tokens of their own (the "
             "merged token is not a patch, and when a later cut keeps it, it takes the place "
             "of a patch), pooled over all (caption, image) pairs",
        pairs=len(pairs["texts"]), named_patches=int(pairs["named"].sum()),
        other_object_patches=int((pairs["objects"] & ~pairs["named"]).sum()),
        named_objects_without_patch=pairs["unowned"],
        pairs_without_named_patch=int((~pairs["named"].any(1)).sum()), rows=rows)


def format_keep(report):
    cfg, layers = report["config"], report["schedule"]["prune_layers"]
    lines = [f"what the pruning keeps: world {report['world_seed']} {cfg['split']} split, "
             f"{cfg['scenes']} scenes x up to {cfg['captions']} captions = {report['pairs']} "
             f"(caption, image) pairs; {cfg['checkpoint']}",
             f"rule: {report['rule']}",
             f"named: patches of the objects the caption names ({report['named_patches']}); "
             f"other: of the scene's other objects ({report['other_object_patches']}); all: "
             f"every patch. {report['named_objects_without_patch']} named objects own no patch "
             f"under the rule; {report['pairs_without_named_patch']} pairs have no named patch",
             "",
             f"{'':<16}" + "".join(f"{'entering layer ' + str(i):^24}" for i in layers),
             f"{'method':<16}" + "".join(f"{'named':>8}{'other':>8}{'all':>8}" for _ in layers)]
    for row in report["rows"]:
        lines.append(f"{row['label']:<16}" + "".join(
            f"{s['named']:8.3f}{s['other']:8.3f}{s['all']:8.3f}" for s in row["stages"]))
    return "\n".join(lines)


keep_main = report_command(KeepConfig, KEEP_PRESETS, run_keep, format_keep)


# ---- picture: the kept patches, drawn ------------------------------------------------------
PAD, HEAD, LINE = 8, 24, 22     # pixels: between panels, the title row, the caption under a row


def to_uint8(image):
    """A normalised (3, R, R) tensor back to the (R, R, 3) uint8 picture the model saw."""
    mean, std = (torch.tensor(v)[:, None, None] for v in (data.CLIP_MEAN, data.CLIP_STD))
    pixels = (image.cpu() * std + mean).clamp(0, 1) * 255                      # (3, R, R)
    return pixels.round().byte().permute(1, 2, 0).numpy()                      # (R, R, 3)


def grey_out(pixels, keep, patch_size):
    """(R, R, 3) uint8 with the dropped patches (keep (M,) bool False) turned dark grey."""
    g = pixels.shape[0] // patch_size
    drop = ~np.repeat(np.repeat(keep.reshape(g, g), patch_size, 0), patch_size, 1)  # (R, R)
    out = pixels.copy()
    out[drop] = (pixels[drop].mean(-1, keepdims=True) * 0.35).astype(np.uint8)
    return out


def picture_size(rows, stages, img_size, scale):
    """(width, height) of the picture: an input column and one per stage, a caption per row."""
    cell = img_size * scale
    return PAD + (1 + stages) * (cell + PAD), HEAD + rows * (cell + LINE) + PAD


def draw_picture(pixels, kept, named, texts, titles, patch_size, scale):
    """pixels (B, R, R, 3) uint8; kept (B, S, M) and named (B, M) bool. Each row: the input,
    then per stage the kept patches in colour and the dropped ones grey, the patches of the
    named objects framed in yellow; the caption underneath."""
    B, S, M = kept.shape
    R, cell, g = pixels.shape[1], pixels.shape[1] * scale, int(M ** 0.5)
    canvas = Image.new("RGB", picture_size(B, S, R, scale), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((PAD + c * (cell + PAD), 6), title, fill=(0, 0, 0), font=font)
    step = patch_size * scale
    for b in range(B):
        y = HEAD + b * (cell + LINE)
        panels = [pixels[b]] + [grey_out(pixels[b], kept[b, s], patch_size) for s in range(S)]
        for c, panel in enumerate(panels):
            x = PAD + c * (cell + PAD)
            canvas.paste(Image.fromarray(panel).resize((cell, cell), Image.NEAREST), (x, y))
            for m in (np.flatnonzero(named[b]) if c else []):
                r, q = divmod(int(m), g)
                draw.rectangle([x + q * step, y + r * step, x + (q + 1) * step - 1,
                                y + (r + 1) * step - 1], outline=(255, 230, 0))
        draw.text((PAD, y + cell + 4), texts[b], fill=(0, 0, 0), font=font)
    return canvas


def run_picture(cfg):
    """The picture (a PIL image) and what it shows: for the split's first cfg.images scenes, the
    scene i's caption i mod (its number of captions), so that the rows go through the kinds of
    caption (one object, a relation, a count)."""
    device = analysis_device(cfg)
    model, tok, world_seed = load_for_analysis(cfg.checkpoint)
    model.to(device)
    mc = model.cfg
    pairs = world_pairs(world_seed, cfg.split, cfg.images, data.CAPTIONS_PER_IMAGE, mc, cfg.cover)
    counts = torch.bincount(pairs["scene"], minlength=cfg.images)               # captions per scene
    starts = counts.cumsum(0) - counts
    first = [int(starts[i] + i % counts[i]) for i in range(cfg.images)]
    texts = [pairs["texts"][k] for k in first]
    named = pairs["named"][first]                                               # (B, M)
    text_cls = text_cls_of(model, tok, texts, cfg.batch, device)
    vit = analysis_vit(model, cfg.method, cfg.lam)
    torch.manual_seed(cfg.seed)
    layers = list(mc.prune.prune_layers)
    kept = kept_patches(vit, pairs["images"].to(device), text_cls, layers).cpu()  # (B, S, M)
    M = kept.shape[-1]
    label = f"{cfg.method} lam {cfg.lam}" if cfg.method in TEXT_GUIDED else cfg.method
    titles = [f"input; {label}"] + [f"entering layer {i}: {int(kept[0, s].sum())} of {M} patches"
                                    for s, i in enumerate(layers)]
    lines = []
    for b, text in enumerate(texts):
        n = int(named[b].sum())
        got = ", ".join(f"{int((kept[b, s] & named[b]).sum())}/{n}" for s in range(len(layers)))
        lines.append(f'"{text}"   named-object patches kept: {got}' if n else
                     f'"{text}"   (the named objects own no patch under the rule)')
    pixels = np.stack([to_uint8(im) for im in pairs["images"]])
    canvas = draw_picture(pixels, kept.numpy(), named.numpy(), lines, titles, mc.patch_size,
                          cfg.scale)
    return canvas, dict(world_seed=world_seed, texts=texts, lines=lines, titles=titles)


def picture_main(argv):
    """python eval.py picture [--flag value ...]: write the PNG."""
    from train_pretrain import parse_config   # here: train_pretrain imports this module
    cfg = parse_config(PictureConfig(), argv, PICTURE_PRESETS)
    canvas, shown = run_picture(cfg)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    canvas.save(cfg.out)
    print("\n".join(shown["lines"]))
    print(f"wrote {cfg.out} ({canvas.width} x {canvas.height})")


COMMANDS = {"efficiency": efficiency_main, "keep": keep_main, "picture": picture_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python eval.py {{{','.join(COMMANDS)}}} [--flag value ...]")
    COMMANDS[sys.argv[1]](sys.argv[2:])
