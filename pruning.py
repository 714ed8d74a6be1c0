"""
Token reduction inside the ViT: ELIP's text-guided prune-and-merge and the baselines.

Every method works through one interface. Before ViT layer `i`, `reduce_tokens` may shrink the
sequence x (B, 1+N, D), [CLS] first. Each method only decides the scores; the shared
`prune_and_merge` keeps the top-scoring tokens and fuses the rest (ToMe, which merges pairs,
is the one exception and has its own few lines at the end).

ELIP (Guo et al., arXiv 2309.16738, Algorithm 1), as the official code does it:
  1. fuse the image and text [CLS]:  x_cls = lam * v_cls + (1 - lam) * t_cls            (Eq. 1)
  2. look ahead without gradient: run the coming block on a copy whose [CLS] is the fused one,
     and score each token by the head-averaged attention of the [CLS] query in the block's last
     layer                                                                                (Eq. 2)
  3. keep the K = int(M * keep_ratio) best tokens (M = patches of the image) in their order
  4. merge the rest into one token, weighted by their renormalised scores                 (Eq. 4)
The real forward keeps the image [CLS]; the look-ahead only decides which tokens survive.

To try your own idea, add a method name to METHODS and a branch to `token_scores`.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("none", "elip", "elip_inline", "evit", "tome", "random")
TEXT_GUIDED = ("elip", "elip_inline")


@dataclass
class PruneConfig:
    method: str = "elip"            # one of METHODS
    prune_layers: tuple = (2, 4, 10)        # layers before which tokens are pruned (0-based)
    keep_ratios: tuple = (0.9, 0.65, 0.4)   # fraction of the M input patches kept at each cut
    lam: float = 0.8                # weight of the image [CLS] in the fused [CLS] (Eq. 1)
    merge: bool = True              # False: prune only (the paper's ablation, Fig. 3 left)
    tome_r: int = 11                # ToMe only: tokens merged before every layer after the first
    in_eval: bool = False           # also reduce in eval mode (the paper prunes in pre-training only)

    def __post_init__(self):
        self.prune_layers = tuple(int(i) for i in self.prune_layers)
        self.keep_ratios = tuple(float(r) for r in self.keep_ratios)
        if self.method not in METHODS:
            raise ValueError(f"prune method {self.method!r} is not one of {METHODS}")
        if len(self.prune_layers) != len(self.keep_ratios):
            raise ValueError(f"prune_layers {self.prune_layers} and keep_ratios {self.keep_ratios} "
                             "must have the same length")
        if any(b <= a for a, b in zip(self.prune_layers, self.prune_layers[1:])):
            raise ValueError(f"prune_layers {self.prune_layers} must be strictly increasing")
        if any(not 0.0 < r <= 1.0 for r in self.keep_ratios):
            raise ValueError(f"keep_ratios {self.keep_ratios} must lie in (0, 1]")
        if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise ValueError(f"keep_ratios {self.keep_ratios} must not increase: "
                             "a later cut cannot bring back pruned tokens")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam {self.lam} must lie in [0, 1] (1 = image [CLS] only, Eq. 1)")
        if self.tome_r < 0:
            raise ValueError(f"tome_r {self.tome_r} must be >= 0")

    def check(self, depth):
        """Refuse a schedule that does not fit a ViT of `depth` layers (called at model build)."""
        if self.method in ("none", "tome"):
            return
        if self.prune_layers and not (1 <= self.prune_layers[0] and self.prune_layers[-1] < depth):
            raise ValueError(f"prune_layers {self.prune_layers} must lie in [1, {depth - 1}] "
                             f"for a ViT of depth {depth}")


def cut_layers(cfg, depth):
    """{layer: keep_ratio} for the layers before which `cfg` reduces tokens."""
    if cfg.method == "none":
        return {}
    if cfg.method == "tome":
        return {i: None for i in range(1, depth)}
    return dict(zip(cfg.prune_layers, cfg.keep_ratios))


def token_counts(num_patches, depth, cfg):
    """Sequence length entering each of the `depth` layers, [CLS] and merged token included."""
    cuts, n, counts = cut_layers(cfg, depth), num_patches, []
    for i in range(depth):
        if i in cuts and cfg.method == "tome":
            n -= min(cfg.tome_r, n // 2)
        elif i in cuts:
            k = int(num_patches * cuts[i])
            n = n if k >= n else k + int(cfg.merge)
        counts.append(1 + n)
    return counts


def take(t, idx):
    """Rows of t (B, N, C) at idx (B, K): (B, K, C). One index_select over the batch flattened
    into rows: its backward adds whole rows of C (index_add); a gather's would go element by
    element, and cost twice the time on a CPU."""
    B, N, C = t.shape
    rows = idx + N * torch.arange(B, device=idx.device)[:, None]             # (B, K) into B*N
    return t.reshape(B * N, C).index_select(0, rows.flatten()).view(B, -1, C)


class KeepAndMerge(torch.autograd.Function):
    """Eq. 4 as one autograd op. x (B, 1+N, D); rows (B, 1+K+1) indices into 1+N: [CLS], the
    kept tokens (all distinct), then [CLS] again as a placeholder for the merged token; w (B, 1+N)
    the merge weights, zero at [CLS] and at the kept tokens. Returns (B, 1+K+1, D): x's rows at
    `rows`, the last one replaced by the merged token w @ x.
    Why not plain autograd: its backward of index_select + matmul + cat makes four passes over a
    (B, 1+N, D) gradient (zeros, index_add, the matmul's outer product, their sum). Every token
    goes to exactly one output row (w is zero where `rows` points), so two do: the merged token's
    gradient spread by w, then the kept rows' gradients written over it. On a CPU, where the op
    is memory-bound, that halves its time."""

    @staticmethod
    def forward(ctx, x, rows, w):
        out = take(x, rows)                                                  # (B, 1+K+1, D)
        out[:, -1:] = w.unsqueeze(1) @ x                                     # (B, 1, D) merged
        ctx.save_for_backward(rows, w)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, w = ctx.saved_tensors
        grad_x = w.unsqueeze(2) * grad[:, -1:]                               # (B, 1+N, D)
        batch = torch.arange(rows.shape[0], device=rows.device)[:, None]    # (B, 1)
        grad_x[batch, rows[:, :-1]] = grad[:, :-1]                           # [CLS] and kept rows
        return grad_x, None, None


def prune_and_merge(x, scores, num_keep, merge=True):
    """x (B, 1+N, D) with [CLS] first; scores (B, N), no grad.
    Returns (x_out, keep_idx): x_out (B, 1+num_keep+merge, D) = [CLS], kept tokens in original
    order, merged token; keep_idx (B, num_keep) ascending indices into the N non-[CLS] tokens.
    num_keep >= N returns x unchanged."""
    B, N1, D = x.shape
    N = N1 - 1
    if num_keep >= N:
        return x, torch.arange(N, device=x.device).expand(B, N)
    scores = scores.detach()
    keep_idx = scores.topk(num_keep, dim=1).indices.sort(dim=1).values   # (B, K) original order
    if not merge:
        return take(x, F.pad(keep_idx + 1, (1, 0))), keep_idx           # [CLS] first
    # Eq. 4: the dropped tokens become one, weighted by their scores renormalised to sum to one
    # (+1e-6 as the official code); zero at the kept positions, and at [CLS] by the padding.
    w = scores.scatter(1, keep_idx, 0.0)                                 # (B, N)
    w = w / (w.sum(dim=1, keepdim=True) + 1e-6)
    rows = F.pad(keep_idx + 1, (1, 1))                                   # (B, 1+K+1)
    return KeepAndMerge.apply(x, rows, F.pad(w, (1, 0)).to(x.dtype)), keep_idx


def fuse_cls(x, text_cls, lam):
    """Eq. 1: a copy of x whose [CLS] is lam * image [CLS] + (1 - lam) * text [CLS]."""
    fused = lam * x[:, :1] + (1.0 - lam) * text_cls.unsqueeze(1).to(x.dtype)   # (B, 1, D)
    return torch.cat([fused, x[:, 1:]], dim=1)


@torch.no_grad()
def token_scores(cfg, blocks, layer, x, x_prev, text_cls):
    """Scores (B, N) of the N non-[CLS] tokens of x (B, 1+N, D) for the cut before `layer`.
    `blocks` are the ViT's layers; x_prev is the input of layer - 1 (what x was computed from)."""
    if cfg.method == "elip":
        # Eq. 2: look ahead through the coming block (up to the next cut) on a detached copy with
        # the fused [CLS]; only the [CLS] row of the last layer's attention is needed.
        cuts = list(cfg.prune_layers) + [len(blocks)]
        end = cuts[cuts.index(layer) + 1]
        y = fuse_cls(x.detach(), text_cls, cfg.lam)
        for blk in blocks[layer:end - 1]:
            y = blk(y)
        return blocks[end - 1].cls_attention(y)[:, 1:]
    if cfg.method in ("elip_inline", "evit"):
        # One pass, no look-ahead: the [CLS] attention of the layer before the cut, over that
        # layer's input. EViT queries with the image [CLS]; elip_inline (our research variant, not
        # the paper's) with the fused [CLS] of Eq. 1.
        lam = cfg.lam if cfg.method == "elip_inline" else 1.0
        y = fuse_cls(x_prev, text_cls, lam) if lam < 1.0 else x_prev
        return blocks[layer - 1].cls_attention(y)[:, 1:]
    if cfg.method == "random":
        return torch.rand(x.shape[0], x.shape[1] - 1, device=x.device)
    raise ValueError(f"method {cfg.method!r} has no scores")


def reduce_tokens(cfg, blocks, layer, x, x_prev, text_cls, num_patches, size):
    """Apply `cfg` before ViT layer `layer`.
    x (B, 1+N, D); size (B, 1+N) or None: how many patches each token stands for (ToMe only).
    Returns (x, size, src): src (B, N') indices into the N input tokens of each output non-[CLS]
    token, -1 for a token fused from several; src is None when nothing changed."""
    cuts = cut_layers(cfg, len(blocks))
    if layer not in cuts:
        return x, size, None
    if cfg.method == "tome":
        return tome_merge(blocks[layer], x, size, cfg.tome_r)
    num_keep = int(num_patches * cuts[layer])
    if num_keep >= x.shape[1] - 1:
        return x, size, None
    scores = token_scores(cfg, blocks, layer, x, x_prev, text_cls)
    x, keep_idx = prune_and_merge(x, scores, num_keep, cfg.merge)
    if cfg.merge:
        keep_idx = torch.cat([keep_idx, keep_idx.new_full((x.shape[0], 1), -1)], dim=1)
    return x, size, keep_idx


@torch.no_grad()
def _tome_match(metric, r):
    """Bipartite soft matching (Bolya et al., ToMe): split tokens alternately into sets A and B,
    link every A token to its most similar B token, and merge the r most similar links.
    metric (B, N, C). Returns (unm_idx (B, Na-r), src_idx (B, r), dst_idx (B, r)) into A / B."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]                     # (B, Na, C), (B, Nb, C)
    sim = a @ b.transpose(1, 2)                                # (B, Na, Nb) cosine similarity
    best, best_dst = sim.max(dim=-1)                           # (B, Na)
    order = best.argsort(dim=-1, descending=True)              # (B, Na)
    unm_idx, src_idx = order[:, r:], order[:, :r]
    return unm_idx, src_idx, best_dst.gather(1, src_idx)


def tome_merge(block, x, size, r):
    """ToMe before `block`: merge r token pairs, matched on the keys the block's attention would
    compute, as size-weighted averages; [CLS] never merges. The block then uses proportional
    attention (log size added to the attention logits)."""
    B, N1, D = x.shape
    N = N1 - 1
    r = min(r, N // 2)
    if size is None:
        size = x.new_ones(B, N1)
    if r == 0:
        return x, size, None
    H = block.attn.num_heads
    keys = block.keys(x)[:, 1:].view(B, N, H, D // H).mean(2)  # (B, N, Dh), averaged over heads
    unm, src, dst = _tome_match(keys, r)
    tokens, sz = x[:, 1:] * size[:, 1:, None], size[:, 1:]    # size-weighted sums (B, N, D)
    a, b, sa, sb = tokens[:, ::2], tokens[:, 1::2], sz[:, ::2], sz[:, 1::2]
    b = b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, D), take(a, src))       # (B, Nb, D)
    sb = sb.scatter_add(1, dst, sa.gather(1, src))                                 # (B, Nb)
    new_size = torch.cat([size[:, :1], sa.gather(1, unm), sb], dim=1)              # (B, 1+N-r)
    merged = torch.cat([take(a, unm), b], dim=1) / new_size[:, 1:, None]           # (B, N-r, D)
    # where each output token came from, in input order (A at even, B at odd positions);
    # B tokens that absorbed others are fused tokens: -1
    src_b = (1 + 2 * torch.arange(b.shape[1], device=x.device)).expand(B, -1)
    src_idx = torch.cat([2 * unm, src_b.scatter(1, dst, -1)], dim=1)               # (B, N-r)
    return torch.cat([x[:, :1], merged], dim=1), new_size, src_idx
