"""The ViT against timm's, and strict loading of DeiT/timm checkpoints."""
import math

import pytest
import torch

from vit import VisionTransformer, interpolate_pos_embed, load_vit_weights, sincos_pos_embed


def small(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)
    return VisionTransformer(**{**args, **kw})


def timm_vit(**kw):
    timm_vt = pytest.importorskip("timm.models.vision_transformer")
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)
    return timm_vt.VisionTransformer(**{**args, **kw}).eval()


def test_matches_timm():
    torch.manual_seed(0)
    ref = timm_vit()
    ours = small().eval()
    unused = load_vit_weights(ours, {"model": ref.state_dict()})       # DeiT layout
    assert unused == ["head.bias", "head.weight"]
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours(images), ref.forward_features(images), atol=1e-5)


def test_load_from_file_interpolates_pos_embed(tmp_path):
    torch.manual_seed(0)
    src = small(img_size=32)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    dst = small(img_size=48)
    assert load_vit_weights(dst, str(path)) == []
    assert dst.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    assert torch.equal(dst.blocks[2].mlp.fc2.weight, src.blocks[2].mlp.fc2.weight)


def test_pos_embed_interpolation_is_identity_at_same_size_and_smooth():
    pe = torch.randn(1, 17, 8)
    assert interpolate_pos_embed(pe, 16) is pe
    const = torch.ones(1, 17, 8)
    assert torch.allclose(interpolate_pos_embed(const, 64), torch.ones(1, 65, 8), atol=1e-5)


def test_strict_loading_errors():
    state = small().state_dict()
    bad = dict(state)
    bad["blocks.1.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"blocks.1.attn.qkv.weight has shape \(3, 3\)"):
        load_vit_weights(small(), bad)
    bad = dict(state)
    del bad["norm.weight"]
    with pytest.raises(ValueError, match="norm.weight"):
        load_vit_weights(small(), bad)


def test_sincos_pos_embed_by_hand():
    pe = sincos_pos_embed(3, 8)                                   # 9 patches, 2 frequencies
    assert pe.shape == (9, 8)
    for p in range(9):
        row, col = divmod(p, 3)                                   # row-major patches
        want = []
        for value in (col, row):
            angles = [value / 10000 ** (i / 2) for i in range(2)]
            want += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        assert torch.allclose(pe[p], torch.tensor(want), atol=1e-6), p
    vit = small(sincos_pos=0.3)
    assert torch.allclose(vit.pos_embed[0, 1:], 0.3 * sincos_pos_embed(4, 64))
    assert vit.pos_embed.requires_grad                            # a starting point, still learnt
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(3, 6)


def test_conv_stem_tokens_and_errors():
    torch.manual_seed(0)
    vit = small(conv_stem=True).eval()
    images = torch.randn(2, 3, 32, 32)
    assert vit(images).shape == (2, 17, 64)
    # three stride-2 convolutions for patch 8; a change in one corner patch moves the tokens
    # within the stem's receptive field (15 pixels) far more than the others, which GroupNorm's
    # statistics over the whole image move a little
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)
               for m in vit.patch_embed.modules()) == 3
    edited = images.clone()
    edited[:, :, :8, :8] += 1
    a, b = vit.patch_embed(images), vit.patch_embed(edited)           # (B, 16, D)
    change = (a - b).abs().amax(dim=(0, 2)).reshape(4, 4)            # (rows, cols) of patches
    far = torch.cat([change[2:].flatten(), change[:2, 2:].flatten()])
    assert change[:2, :2].min() > 3 * far.max()
    with pytest.raises(ValueError, match="power of 2"):
        small(patch_size=12, img_size=36, conv_stem=True)
