"""
A Vision Transformer (Dosovitskiy et al.) written from scratch, with parameter names that follow
timm so DeiT/timm weights load strictly, and one hook for token reduction (pruning.py).

The ViT takes the text [CLS] as an optional second input: ELIP (arXiv 2309.16738) uses it to
decide which vision tokens to keep. Token reduction runs only in training mode (the paper prunes
in pre-training only) unless the PruneConfig asks for it in eval mode too.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import pruning


class Attention(nn.Module):

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        # ToMe's proportional attention: a token that stands for s patches counts s times
        bias = None if size is None else size.log()[:, None, None, :].to(x.dtype)  # (B, 1, 1, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)            # (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention of the [CLS] query over all N tokens (post-softmax, the weights
        the forward pass would use): (B, N). Only the [CLS] query is computed, so this costs the
        key projection plus one attention row instead of a whole layer."""
        B, N, D = x.shape
        H = self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:D], None if b is None else b[:D])           # (B, 1, D)
        k = F.linear(x, w[D:2 * D], None if b is None else b[D:2 * D])        # (B, N, D)
        q = q.view(B, 1, H, D // H).transpose(1, 2)                           # (B, H, 1, Dh)
        k = k.view(B, N, H, D // H).transpose(1, 2)                           # (B, H, N, Dh)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).softmax(dim=-1)  # (B, H, 1, N)
        return attn.mean(dim=1).squeeze(1)                                    # (B, N)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The attention keys (B, N, D), heads side by side (ToMe matches tokens on them)."""
        D = x.shape[-1]
        b = self.qkv.bias
        return F.linear(x, self.qkv.weight[D:2 * D], None if b is None else b[D:2 * D])


class Mlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch for whole samples with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1.0 - p)                  # (B, 1, 1)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """A pre-norm transformer layer."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), size), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.cls_attention(self.norm1(x))

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.keys(self.norm1(x))


class PatchEmbed(nn.Module):
    """Images (B, 3, H, W) -> patch tokens (B, M, D): one strided convolution, a linear map of
    each patch (ViT)."""

    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)                   # (B, M, D)


class VisionTransformer(nn.Module):

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 prune: pruning.PruneConfig | None = None, init_std: float = 0.02,
                 embed_layer: type = PatchEmbed):
        super().__init__()
        self.prune = prune if prune is not None else pruning.PruneConfig(method="none")
        self.prune.check(depth)
        self.embed_dim = embed_dim
        self.patch_embed = embed_layer(img_size, patch_size, embed_dim)   # timm's seam
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # deeper, more drop
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(_init_weights, std=init_std))

    def forward(self, images: torch.Tensor, text_cls: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(images, text_cls)[0]

    def forward_features(self, images: torch.Tensor, text_cls: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Returns (x, sources): x (B, L, D) after the final norm, [CLS] first; sources: for each
        layer before which the tokens changed, {layer: (B, N_i)}, the original patch index of each
        non-[CLS] token entering that layer, -1 for a token fused from several."""
        cfg = self.prune
        if not (self.training or cfg.in_eval):
            cfg = pruning.PruneConfig(method="none")
        if cfg.method in pruning.TEXT_GUIDED:
            if text_cls is None:
                raise ValueError(f"prune method {cfg.method!r} needs the text [CLS] (text_cls)")
            if text_cls.shape[-1] != self.embed_dim:
                raise ValueError(f"text width {text_cls.shape[-1]} differs from vision width "
                                 f"{self.embed_dim}: ELIP fuses the two [CLS] tokens (Eq. 1)")
        x = self.patch_embed(images)                                           # (B, M, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)   # (B, 1+M, D)
        x = x + self.pos_embed
        src = torch.arange(self.num_patches, device=x.device).expand(x.shape[0], -1)  # (B, M)
        sources, size, x_prev = {}, None, x
        for i, blk in enumerate(self.blocks):
            x, size, idx = pruning.reduce_tokens(cfg, self.blocks, i, x, x_prev, text_cls,
                                                 self.num_patches, size)
            if idx is not None:
                # follow each token back to its patch; fused tokens (-1) stay fused
                src = src.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, -1)
                sources[i] = src
            x_prev = x
            x = blk(x, size)
        return self.norm(x), sources


def _init_weights(m, std):
    """timm's: truncated N(0, std) matrices (std 0.02 in timm), zero biases, unit LayerNorm; the
    patch projection keeps PyTorch's default."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize (1, 1+M, D) position embeddings to (1, 1+num_patches, D): bicubic on the 2-D grid,
    [CLS] untouched (as ALBEF does when fine-tuning at a higher resolution)."""
    M, D = pos_embed.shape[1] - 1, pos_embed.shape[2]
    if M == num_patches:
        return pos_embed
    old, new = int(math.isqrt(M)), int(math.isqrt(num_patches))
    grid = pos_embed[:, 1:].reshape(1, old, old, D).permute(0, 3, 1, 2)        # (1, D, old, old)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pos_embed.dtype)  # (1, M', D)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def load_vit_weights(vit: VisionTransformer, checkpoint: str | dict) -> list[str]:
    """Load a DeiT/timm ViT checkpoint (a path, a state dict, or {"model": state dict}) strictly:
    every parameter of ours must be present with its shape, classification heads are dropped,
    position embeddings are interpolated to our resolution. Returns the unused keys."""
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = dict(checkpoint.get("model", checkpoint))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vit.num_patches)
    ours = vit.state_dict()
    missing = [k for k in ours if k not in state]
    if missing:
        raise ValueError(f"ViT checkpoint lacks {len(missing)} parameters: {missing[:8]}")
    for k, v in ours.items():
        if state[k].shape != v.shape:
            raise ValueError(f"ViT checkpoint {k} has shape {tuple(state[k].shape)}, "
                             f"ours {tuple(v.shape)}")
    vit.load_state_dict({k: state[k] for k in ours}, strict=True)
    return sorted(k for k in state if k not in ours)
