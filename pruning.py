"""
Token reduction inside the ViT: ELIP's text-guided prune-and-merge, then the baselines.

ELIP (Guo et al., arXiv 2309.16738, Algorithm 1), as its official code does it. The ViT's layers
are cut into blocks (before layers 2, 4 and 10 of 12); before each block, on x (B, 1+N, D) with
[CLS] first:
  1. fuse the image and text [CLS]:  x_cls = lam * v_cls + (1 - lam) * t_cls            (Eq. 1)
  2. look ahead without gradient: run the coming block on a copy of x whose [CLS] is the fused
     one; the head-averaged attention of the [CLS] query in its last layer scores each token
                                                                                          (Eq. 2)
  3. keep the K = int(M * keep_ratio) best tokens (M = patches of the image) in their order
  4. merge the rest into one token, weighted by their renormalised scores                 (Eq. 4)
The real forward keeps the image [CLS]; the look-ahead only decides which tokens survive.

The file reads in that order: the config, the method (steps 1 to 4), the one interface the ViT
calls (`reduce_tokens`) with the sequence lengths it produces (`token_counts`), the baselines,
which only decide the scores (EViT, random) or merge pairs instead (ToMe), and last the registry:
a scorer scores the tokens at each cut of the schedule and leaves steps 3 and 4 to
`prune_and_merge`; a merger changes the tokens itself, before every layer after the first.
To try your own idea, write one function with the scorers' signature,
`score_mine(cfg, blocks, layer, x, x_prev, text_cls) -> scores (B, N)`, and add one entry,
`"mine": score_mine`, to SCORERS (and the name to TEXT_GUIDED if it reads text_cls):
`--prune.method mine` runs it, and the tests and bench.py, which iterate over METHODS, cover it.
A merge-style method is one Merger entry in MERGERS.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn


@dataclass
class PruneConfig:
    preset: str = ""                                   # elip | evit_paper | tome_paper: sets
                                                       # the fields below (PRUNE_PRESETS)
    method: str = "elip"                               # one of METHODS
    prune_layers: tuple[int, ...] = (2, 4, 10)         # pruned before these layers (0-based)
    keep_ratios: tuple[float, ...] = (0.9, 0.65, 0.4)  # fraction of the M patches kept at each cut
    lam: float = 0.8                                   # weight of the image [CLS] in Eq. 1's fusion
    merge: bool = True                                 # False: prune only (paper's Fig. 3)
    tome_r: int = 11                                   # ToMe: tokens merged before layers 1, 2, ...
    in_eval: bool = False                              # reduce in eval mode too (paper: no)

    def __post_init__(self) -> None:
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
        if self.preset and self.preset not in PRUNE_PRESETS:
            raise ValueError(f"prune preset {self.preset!r} is not one of "
                             f"{', '.join(PRUNE_PRESETS)}")

    @staticmethod
    def presets() -> dict:
        """The named settings the `preset` field selects (the flag parser applies them)."""
        return PRUNE_PRESETS

    def check(self, depth: int) -> None:
        """Refuse a schedule that does not fit a ViT of `depth` layers (called at model build).
        Only the scoring methods cut at prune_layers."""
        if self.method not in SCORERS:
            return
        if self.prune_layers and not (1 <= self.prune_layers[0] and self.prune_layers[-1] < depth):
            raise ValueError(f"prune_layers {self.prune_layers} must lie in [1, {depth - 1}] "
                             f"for a ViT of depth {depth}")


# The paper's comparison rows (ELIP paper, section 4), as PruneConfig fields: PruneConfig(**preset),
# or `--prune.preset name` on the command line.
PRUNE_PRESETS = {
    # ELIP as its official code runs it (section 4): blocks of 2, 2, 6, 2 layers
    "elip": dict(method="elip", prune_layers=(2, 4, 10), keep_ratios=(0.9, 0.65, 0.4), lam=0.8,
                 merge=True),
    # EViT as the paper ran it: keep rate 0.7 in EViT's default configuration (section 4), whose
    # default locations are layers 3, 6, 9; EViT fuses the inattentive tokens into one (merge).
    # EViT keeps 0.7 of the tokens present at each location; our ratios count the M input
    # patches, so they are the cumulative 0.7, 0.7^2, 0.7^3. (EViT also rounds up, counts its
    # fused token as a candidate, so keeps one or two tokens more per cut, and weights the fused
    # token by the raw attention where ours renormalises, Eq. 4; and it cuts inside layers 3, 6,
    # 9, after their attention, where ours cuts before them, scored by the layer before.)
    "evit_paper": dict(method="evit", prune_layers=(3, 6, 9), keep_ratios=(0.7, 0.49, 0.343),
                       merge=True),
    # ToMe as the paper ran it (section 4): r = 13 per layer with proportional attention (ToMe's
    # default, and always on in ours). ToMe merges inside each of the 12 layers; ours before each
    # layer after the first, 11 times.
    "tome_paper": dict(method="tome", tome_r=13),
}


# ---- ELIP (Algorithm 1) ---------------------------------------------------------------------
def fuse_cls(x: torch.Tensor, text_cls: torch.Tensor, lam: float) -> torch.Tensor:
    """x (B, 1+N, D), text_cls (B, D) -> (B, 1+N, D): a copy of x with the fused [CLS] (Eq. 1).
    lam = 1 is the image [CLS] alone, lam = 0 the text [CLS] alone."""
    fused = lam * x[:, :1] + (1.0 - lam) * text_cls.unsqueeze(1).to(x.dtype)   # (B, 1, D) Eq. 1
    return torch.cat([fused, x[:, 1:]], dim=1)                                  # (B, 1+N, D)


@torch.no_grad()
def lookahead_scores(layers: nn.ModuleList, x: torch.Tensor, text_cls: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """layers of the coming block, x (B, 1+N, D), text_cls (B, D) -> scores (B, N), no grad.
    Eq. 2: run the block on a copy of x carrying the fused [CLS]; score each token by the
    attention the [CLS] query pays it in the block's last layer (post-softmax, head-averaged).
    That last layer computes only the [CLS] row of attention, not the whole layer."""
    y = fuse_cls(x, text_cls, lam)                                   # (B, 1+N, D) Eq. 1
    for blk in layers[:-1]:
        y = blk(y)                                                   # (B, 1+N, D)
    return layers[-1].cls_attention(y)[:, 1:]                        # (B, N) Eq. 2, no [CLS] column


def top_k_in_order(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """scores (B, N) -> keep_idx (B, K): the K = num_keep best tokens, in their original order."""
    return scores.topk(num_keep, dim=1).indices.sort(dim=1).values   # (B, K)


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, N, C), idx (B, K) -> (B, K, C): the rows of each sample at its indices.
    One index_select over the batch flattened into rows: its backward adds whole rows of C
    (index_add), where a gather's would go element by element."""
    B, N, C = t.shape
    rows = idx + N * torch.arange(B, device=idx.device)[:, None]             # (B, K) into B*N
    return t.reshape(B * N, C).index_select(0, rows.flatten()).view(B, -1, C)   # (B, K, C)


def prune_and_merge(x: torch.Tensor, scores: torch.Tensor, num_keep: int,
                    merge: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, 1+N, D), scores (B, N) -> x_out (B, 1+num_keep+merge, D), keep_idx (B, num_keep).
    x_out is [CLS], the kept tokens in their original order, then the merged token (Eq. 4);
    keep_idx holds ascending indices into the N non-[CLS] tokens. No gradient reaches the scores.
    num_keep >= N returns x unchanged (and all N indices)."""
    B, N = x.shape[0], x.shape[1] - 1
    if num_keep >= N:
        return x, torch.arange(N, device=x.device).expand(B, N)
    scores = scores.detach()
    keep_idx = top_k_in_order(scores, num_keep)                              # (B, K)
    rows = torch.cat([keep_idx.new_zeros(B, 1), keep_idx + 1], dim=1)        # (B, 1+K) [CLS] first
    kept = take(x, rows)                                                     # (B, 1+K, D)
    if not merge:
        return kept, keep_idx
    # Eq. 4: the dropped tokens become one, weighted by their scores renormalised to sum to one
    # (+1e-6 as the official code); the weights are zero at the kept tokens and carry no gradient.
    w = scores.scatter(1, keep_idx, 0.0)                                     # (B, N)
    w = w / (w.sum(dim=1, keepdim=True) + 1e-6)                              # (B, N)
    merged = w.unsqueeze(1).to(x.dtype) @ x[:, 1:]                           # (B, 1, D)
    return torch.cat([kept, merged], dim=1), keep_idx                        # (B, 1+K+1, D)


# ---- the interface the ViT calls --------------------------------------------------------------
@torch.no_grad()
def token_scores(cfg: PruneConfig, blocks: nn.ModuleList, layer: int, x: torch.Tensor,
                 x_prev: torch.Tensor, text_cls: torch.Tensor | None) -> torch.Tensor:
    """x (B, 1+N, D), x_prev (B, 1+N', D) -> scores (B, N) of x's non-[CLS] tokens, no grad.
    For the cut before `layer`, by the scorer SCORERS[cfg.method]; `blocks` are the ViT's layers,
    x_prev the input of layer - 1 (what x was computed from). No gradient: the scores only
    choose tokens (a look-ahead that ran the blocks with it would also store their activations)."""
    if cfg.method not in SCORERS:
        raise ValueError(f"method {cfg.method!r} has no scores")
    return SCORERS[cfg.method](cfg, blocks, layer, x, x_prev, text_cls)


def reduce_tokens(cfg: PruneConfig, blocks: nn.ModuleList, layer: int, x: torch.Tensor,
                  x_prev: torch.Tensor, text_cls: torch.Tensor | None, num_patches: int,
                  size: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """x (B, 1+N, D), size (B, 1+N) or None -> x (B, 1+N', D), size, src (B, N') or None.
    Applies `cfg` before ViT layer `layer`. size: how many patches each token stands for (set by
    merge-style methods only). src: for each output non-[CLS] token its index among the N input
    tokens, -1 for a token fused from several; None when nothing changed."""
    cuts = cut_layers(cfg, len(blocks))
    if layer not in cuts:
        return x, size, None
    if cfg.method in MERGERS:
        return MERGERS[cfg.method].merge(cfg, blocks, layer, x, size)
    num_keep = int(num_patches * cuts[layer])                # K counts the M input patches
    if num_keep >= x.shape[1] - 1:
        return x, size, None
    scores = token_scores(cfg, blocks, layer, x, x_prev, text_cls)          # (B, N)
    x, keep_idx = prune_and_merge(x, scores, num_keep, cfg.merge)           # (B, 1+K+merge, D)
    if cfg.merge:
        keep_idx = torch.cat([keep_idx, keep_idx.new_full((x.shape[0], 1), -1)], dim=1)  # (B, K+1)
    return x, size, keep_idx


def cut_layers(cfg: PruneConfig, depth: int) -> dict[int, float | None]:
    """{layer: keep_ratio} for the layers before which `cfg` reduces tokens: the schedule's for a
    scoring method, every layer after the first (ratio None) for a merge-style one."""
    if cfg.method in MERGERS:
        return {i: None for i in range(1, depth)}
    if cfg.method in SCORERS:
        return dict(zip(cfg.prune_layers, cfg.keep_ratios))
    return {}


def token_counts(num_patches: int, depth: int, cfg: PruneConfig) -> list[int]:
    """M = num_patches, depth -> [L_0, ..., L_{depth-1}]: the sequence length entering each layer,
    [CLS] and merged token included (what `reduce_tokens` produces in a training forward)."""
    cuts, n, counts = cut_layers(cfg, depth), num_patches, []
    for i in range(depth):
        if i in cuts and cfg.method in MERGERS:
            n = MERGERS[cfg.method].tokens_left(cfg, i, n)
        elif i in cuts:
            k = int(num_patches * cuts[i])
            n = n if k >= n else k + int(cfg.merge)
        counts.append(1 + n)
    return counts


# ---- baselines: EViT (and our one-pass elip_inline), random, ToMe ---------------------------
@torch.no_grad()
def evit_scores(block: nn.Module, x: torch.Tensor, text_cls: torch.Tensor | None = None,
                lam: float = 1.0) -> torch.Tensor:
    """block, its input x (B, 1+N, D) -> scores (B, N), no grad: the head-averaged attention of
    the [CLS] query in `block`, one pass, no look-ahead. EViT queries with the image [CLS]
    (lam = 1); elip_inline, our research variant and not the paper's, with the fused [CLS] of
    Eq. 1."""
    y = x if lam == 1.0 else fuse_cls(x, text_cls, lam)             # (B, 1+N, D)
    return block.cls_attention(y)[:, 1:]                            # (B, N)


def random_scores(x: torch.Tensor) -> torch.Tensor:
    """x (B, 1+N, D) -> scores (B, N), uniform: the control."""
    return torch.rand(x.shape[0], x.shape[1] - 1, device=x.device)


@torch.no_grad()
def _tome_match(metric: torch.Tensor, r: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """metric (B, N, C) -> unm_idx (B, Na-r), src_idx (B, r), dst_idx (B, r), into A / B.
    Bipartite soft matching (Bolya et al., ToMe): split tokens alternately into sets A and B,
    link every A token to its most similar B token, and merge the r most similar links."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]                     # (B, Na, C), (B, Nb, C)
    sim = a @ b.transpose(1, 2)                                # (B, Na, Nb) cosine similarity
    best, best_dst = sim.max(dim=-1)                           # (B, Na)
    order = best.argsort(dim=-1, descending=True)              # (B, Na)
    unm_idx, src_idx = order[:, r:], order[:, :r]
    return unm_idx, src_idx, best_dst.gather(1, src_idx)


def tome_merge(block: nn.Module, x: torch.Tensor, size: torch.Tensor | None, r: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (B, 1+N, D), size (B, 1+N) or None -> x (B, 1+N-r, D), size (B, 1+N-r), src (B, N-r).
    ToMe before `block`: merge r token pairs, matched on the keys the block's attention would
    compute, as size-weighted averages; [CLS] never merges. The block then uses proportional
    attention (log size added to the attention logits). src as in `reduce_tokens`."""
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
    src_b = (1 + 2 * torch.arange(b.shape[1], device=x.device)).expand(B, -1)     # (B, Nb)
    src_idx = torch.cat([2 * unm, src_b.scatter(1, dst, -1)], dim=1)               # (B, N-r)
    return torch.cat([x[:, :1], merged], dim=1), new_size, src_idx


# ---- the registry: one entry per method -----------------------------------------------------
# A scorer: (cfg, blocks, layer, x (B, 1+N, D), x_prev (B, 1+N', D), text_cls (B, D) or None)
# -> scores (B, N) of x's non-[CLS] tokens for the cut before `layer` (see `token_scores`).
Scorer = Callable[[PruneConfig, nn.ModuleList, int, torch.Tensor, torch.Tensor,
                   torch.Tensor | None], torch.Tensor]


def score_elip(cfg: PruneConfig, blocks: nn.ModuleList, layer: int, x: torch.Tensor,
               x_prev: torch.Tensor, text_cls: torch.Tensor | None) -> torch.Tensor:
    """x (B, 1+N, D) -> scores (B, N): Eq. 2 by the look-ahead through the coming block."""
    cuts = list(cfg.prune_layers) + [len(blocks)]
    end = cuts[cuts.index(layer) + 1]                       # the coming block: layers [layer, end)
    return lookahead_scores(blocks[layer:end], x, text_cls, cfg.lam)


def score_elip_inline(cfg: PruneConfig, blocks: nn.ModuleList, layer: int, x: torch.Tensor,
                      x_prev: torch.Tensor, text_cls: torch.Tensor | None) -> torch.Tensor:
    """x_prev (B, 1+N, D) -> scores (B, N): the fused [CLS] (Eq. 1) queried in the layer before."""
    return evit_scores(blocks[layer - 1], x_prev, text_cls, cfg.lam)


def score_evit(cfg: PruneConfig, blocks: nn.ModuleList, layer: int, x: torch.Tensor,
               x_prev: torch.Tensor, text_cls: torch.Tensor | None) -> torch.Tensor:
    """x_prev (B, 1+N, D) -> scores (B, N): the image [CLS] queried in the layer before."""
    return evit_scores(blocks[layer - 1], x_prev)


def score_random(cfg: PruneConfig, blocks: nn.ModuleList, layer: int, x: torch.Tensor,
                 x_prev: torch.Tensor, text_cls: torch.Tensor | None) -> torch.Tensor:
    """x (B, 1+N, D) -> scores (B, N), uniform."""
    return random_scores(x)


class Merger(NamedTuple):
    """A merge-style method, applied before every layer after the first (cut_layers):
    merge(cfg, blocks, layer, x (B, 1+N, D), size (B, 1+N) or None)
        -> x (B, 1+N', D), size (B, 1+N'), src (B, N') or None, as `reduce_tokens` returns them;
    tokens_left(cfg, layer, N) -> N', which `token_counts` computes without running merge."""
    merge: Callable[[PruneConfig, nn.ModuleList, int, torch.Tensor, torch.Tensor | None],
                    tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    tokens_left: Callable[[PruneConfig, int, int], int]


def merge_tome(cfg: PruneConfig, blocks: nn.ModuleList, layer: int, x: torch.Tensor,
               size: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (B, 1+N, D), size -> x (B, 1+N-r, D), size (B, 1+N-r), src (B, N-r) or None:
    tome_merge of r = cfg.tome_r token pairs before `layer`."""
    return tome_merge(blocks[layer], x, size, cfg.tome_r)


def tome_tokens_left(cfg: PruneConfig, layer: int, n: int) -> int:
    """N -> N - r: tome_merge merges at most half the tokens."""
    return n - min(cfg.tome_r, n // 2)


SCORERS: dict[str, Scorer] = {
    "elip": score_elip,
    "elip_inline": score_elip_inline,          # ours, not the paper's: one pass, no look-ahead
    "evit": score_evit,
    "random": score_random,                    # the control
}
MERGERS: dict[str, Merger] = {
    "tome": Merger(merge_tome, tome_tokens_left),
}
METHODS = ("none", *SCORERS, *MERGERS)         # PruneConfig.method; none: the plain ViT
TEXT_GUIDED = ("elip", "elip_inline")          # the methods that need the text [CLS]
