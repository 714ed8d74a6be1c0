"""The ViT against timm's, and strict loading of DeiT/timm checkpoints."""

import pytest
import torch

from vit import VisionTransformer, interpolate_pos_embed, load_vit_weights


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


