"""world_aids.py: the tiny preset's aids on the embedded world, apart from the paper's model.
WorldModel's objects loss and ITC over all captions against loops written out here; the
convolutional stem and the sine-cosine positions in both of its ViTs; build_model's seam;
WorldPretrainDataset's object targets (the image's crop and mirror) and all captions; and a batch
of that dataset, collated, through WorldModel."""
import math

import pytest
import torch
import torch.nn.functional as F

import data
import world
import world_aids
from data import PretrainDataset, create_transform, make_collate, pre_caption, swap_left_right
from model import ELIPModel, ModelConfig
from pruning import PruneConfig
from tokenizer import Tokenizer
from vit import PatchEmbed
from world import World, world_entries
from world_aids import (ConvStem, WorldAids, WorldModel, WorldPretrainDataset, aids_of,
                        build_model, sincos_pos_embed)

WORLD = World(0)
CLASSES = world.OBJECT_CLASSES          # size, colour, shape, cell: the object head's four parts


def tiny_world(aids, losses=("itc",), **kw):
    """WorldModel at toy size: 32 px images of 8 px patches (16 patches), width 128."""
    torch.manual_seed(0)
    cfg = ModelConfig(losses=losses, img_size=32, **{"vocab_size": 40, "queue_size": 20, **kw})
    return WorldModel(cfg, aids)


def ids_batch(g, B, T):
    ids = torch.randint(5, 40, (B, T), generator=g)
    ids[:, 0] = 2                                                    # [CLS]
    return ids


# -----------------------------------------------------------------------------
# the objects loss (the embedded world's object labels on each object's own tokens)

@pytest.mark.parametrize("method", ["none", "elip"])
def test_objects_loss_against_a_loop_over_objects(method):
    m = tiny_world(WorldAids(objects=True, object_weight=2.0), prune=PruneConfig(method=method))
    m.train()
    g = torch.Generator().manual_seed(2)
    images, ids = torch.randn(4, 3, 32, 32, generator=g), ids_batch(g, 4, 8)
    cover = torch.rand(4, 3, 16, generator=g) * (torch.rand(4, 3, 16, generator=g) < 0.4)
    cover[0, 1] = 0.02                                      # a third of a patch: skipped
    labels = torch.stack([torch.randint(c, (4, 3), generator=g) for c in CLASSES], dim=-1)
    labels[3, 2], cover[3, 2] = -1, 0                       # no third object in image 3
    b = {"image": images, "text_ids": ids, "text_mask": torch.ones_like(ids),
         "object_cover": cover, "object_labels": labels}
    torch.manual_seed(5)
    out = m(b)
    assert set(out) == {"itc", "objects", "loss", "queue"}
    torch.manual_seed(5)                                    # the same forward, read token by token
    x, sources = m.visual_encoder.forward_features(images, m.encode_text(ids, b["text_mask"])[:, 0])
    assert (method == "elip") == bool(sources)
    logits, targets = [], []
    for i in range(4):
        src = sources[max(sources)][i].tolist() if sources else list(range(16))
        assert method == "none" or -1 in src                # ELIP's merged token
        for k in range(3):
            w = [float(cover[i, k, s]) if s >= 0 else 0.0 for s in src]
            if sum(w) < 0.5 or labels[i, k, 0] < 0:
                continue
            region = sum(wt * x[i, 1 + t] for t, wt in enumerate(w)) / sum(w)
            logits.append(m.object_head(region))
            targets.append(labels[i, k])
    logits, targets = torch.stack(logits), torch.stack(targets)
    assert 4 <= len(targets) < 11
    want = sum(F.cross_entropy(z, targets[:, j])
               for j, z in enumerate(logits.split(list(CLASSES), dim=1)))
    assert torch.allclose(out["objects"], 2.0 * want, atol=1e-5)
    assert torch.allclose(out["loss"], out["itc"] + out["objects"])
    out["loss"].backward()
    assert m.object_head.weight.grad.abs().sum() > 0
    assert m.visual_encoder.blocks[11].mlp.fc2.weight.grad.abs().sum() > 0
    # a batch without the targets, or with a cover over another patch grid, is refused
    with pytest.raises(KeyError, match="object_cover"):
        m({k: v for k, v in b.items() if not k.startswith("object_")})
    with pytest.raises(ValueError, match="object cover over 64 patches, the ViT has 16"):
        m({**b, "object_cover": torch.zeros(4, 3, 64)})


def test_itc_over_all_captions_against_a_loop():
    kw = dict(queue_size=0, distill=False, text_dropout=0.0, prune=PruneConfig(method="none"))
    m = tiny_world(WorldAids(itc_online_batch=True, itc_all_captions=True), **kw).train()
    g = torch.Generator().manual_seed(3)
    images, ids = torch.randn(3, 3, 32, 32, generator=g), ids_batch(g, 3, 6)
    counts = torch.tensor([2, 3, 1])                        # every caption of each image
    all_ids = ids_batch(g, 6, 7)
    all_mask = torch.ones_like(all_ids)
    all_mask[4, 5:] = 0
    all_ids[all_mask == 0] = 0
    b = {"image": images, "text_ids": ids, "text_mask": torch.ones_like(ids),
         "captions_ids": all_ids, "captions_mask": all_mask, "captions_count": counts}
    out = m(b)
    image_feat = m.image_feat(m.encode_image(images))
    text_feat = m.text_feat(m.encode_text(all_ids, all_mask))
    temp, owner = m.temp.clamp(0.001, 0.5), [0, 0, 1, 1, 1, 2]
    i2t = [-torch.stack([(image_feat[i] @ text_feat.T / temp).log_softmax(0)[j]
                         for j in range(6) if owner[j] == i]).mean() for i in range(3)]
    t2i = [-(text_feat[j] @ image_feat.T / temp).log_softmax(0)[owner[j]] for j in range(6)]
    want = (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2
    assert torch.allclose(out["itc"], want, atol=1e-5)
    # ITC of the one drawn caption (ELIPModel's) is another number: the aid is what ran
    assert abs(ELIPModel.itc(m, b, m.candidates(m.encode(b)), 0.4) - out["itc"]) > 1e-3
    with pytest.raises(KeyError, match="captions_ids"):
        m({k: v for k, v in b.items() if not k.startswith("captions_")})
    with pytest.raises(ValueError, match="itc_all_captions needs"):
        WorldModel(ModelConfig(vocab_size=40), WorldAids(itc_all_captions=True))   # ALBEF's queue
    with pytest.raises(ValueError, match="itc_online_batch takes no distillation"):
        WorldModel(ModelConfig(vocab_size=40), WorldAids(itc_online_batch=True))   # distill on


# -----------------------------------------------------------------------------
# the ViT's aids: convolutional stem, sine-cosine positions

def test_conv_stem_in_both_vits_tokens_and_errors():
    m = tiny_world(WorldAids(conv_stem=True), prune=PruneConfig(method="none")).eval()
    for vit in (m.visual_encoder, m.visual_encoder_m):
        assert isinstance(vit.patch_embed, ConvStem)
    assert torch.equal(m.visual_encoder.patch_embed.proj[0].weight,
                       m.visual_encoder_m.patch_embed.proj[0].weight)        # the teacher's copy
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert m.visual_encoder(images).shape == (2, 17, 128)
    stem = m.visual_encoder.patch_embed
    # three stride-2 convolutions for patch 8; a change in one corner patch moves the tokens
    # within the stem's receptive field (15 pixels) far more than the others, which GroupNorm's
    # statistics over the whole image move a little
    assert sum(isinstance(x, torch.nn.Conv2d) and x.stride == (2, 2) for x in stem.modules()) == 3
    edited = images.clone()
    edited[:, :, :8, :8] += 1
    with torch.no_grad():
        a, b = stem(images), stem(edited)                                  # (B, 16, D)
    change = (a - b).abs().amax(dim=(0, 2)).reshape(4, 4)                  # (rows, cols) of patches
    far = torch.cat([change[2:].flatten(), change[:2, 2:].flatten()])
    assert change[:2, :2].min() > 3 * far.max()
    with pytest.raises(ValueError, match="power of 2"):
        ConvStem(36, 12, 64)
    with pytest.raises(ValueError, match="not a multiple"):
        ConvStem(30, 8, 64)


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
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(3, 6)


def test_sincos_positions_start_both_vits_and_stay_learnt():
    m = tiny_world(WorldAids(sincos_pos=0.3))
    want = 0.3 * sincos_pos_embed(4, 128)                         # 16 patches, width 128
    for vit in (m.visual_encoder, m.visual_encoder_m):
        assert torch.allclose(vit.pos_embed[0, 1:], want)
    assert m.visual_encoder.pos_embed.requires_grad              # a starting point, still learnt
    # the [CLS] position keeps its random start; without the aid every position is random
    assert m.visual_encoder.pos_embed[0, 0].abs().sum() > 0
    plain = tiny_world(WorldAids(conv_stem=True))
    assert (plain.visual_encoder.pos_embed[0, 1:] - want).abs().max() > 0.1


# -----------------------------------------------------------------------------
# the seam

def test_build_model_gives_world_model_only_with_an_aid():
    cfg = ModelConfig(vocab_size=40, img_size=32, queue_size=0)
    assert not WorldAids().on
    torch.manual_seed(0)
    plain = build_model(cfg, WorldAids())
    assert type(plain) is ELIPModel and isinstance(plain.visual_encoder.patch_embed, PatchEmbed)
    for aids in (WorldAids(objects=True), WorldAids(conv_stem=True), WorldAids(sincos_pos=0.1)):
        m = build_model(cfg, aids)
        assert isinstance(m, WorldModel) and m.aids is aids
        assert (m.object_head is not None) == aids.objects
        assert m.object_head is None or m.object_head.out_features == sum(CLASSES)
    # a checkpoint's config names its aids; one without ("aids" absent) had none
    assert aids_of({}) == WorldAids()
    assert aids_of({"aids": {"objects": True, "sincos_pos": 0.3}}) == \
        WorldAids(objects=True, sincos_pos=0.3)


# -----------------------------------------------------------------------------
# WorldPretrainDataset: the objects loss's targets under the image's crop and mirror, all captions

def test_object_targets_follow_the_crop_and_the_mirror():
    entries = world_entries("pretrain", "train", 40)
    tf = create_transform(64, train=True, crop_scale=(0.4, 1.0))
    plain = PretrainDataset(entries, transform=tf, check_images=False)
    with_objects = WorldPretrainDataset(entries, WorldAids(objects=True), 8, transform=tf,
                                        check_images=False)
    mean, std = torch.tensor(data.CLIP_MEAN)[:, None], torch.tensor(data.CLIP_STD)[:, None]
    mirrored_seen, checked = set(), 0
    for i in range(40):
        torch.manual_seed(i)
        first = plain[i]
        torch.manual_seed(i)
        sample = with_objects[i]
        assert set(sample) == {"image", "text", "object_cover", "object_labels"}
        image2, cover, labels = sample["image"], sample["object_cover"], sample["object_labels"]
        # the same random draws as the plain dataset: the box of the masks is the image's
        assert torch.equal(first["image"], image2) and first["text"] == sample["text"]
        assert cover.shape == (world.MAX_OBJECTS, 64) and labels.shape == (world.MAX_OBJECTS, 4)
        scene = WORLD.scene("train", i)
        n = len(scene.objects)
        assert (labels[n:] == -1).all() and cover[n:].sum() == 0
        # patches (8x8 pixels, row-major) an object covers wholly have the object's colour
        pixels = 255 * (image2.reshape(3, 8, 8, 8, 8).permute(1, 3, 0, 2, 4).reshape(64, 3, 64)
                        * std + mean).mean(-1)                                        # (64, 3)
        for k, o in enumerate(scene.objects):
            assert labels[k, :3].tolist() == [list(world.RADIUS).index(o.size),
                                              list(world.COLOURS).index(o.colour),
                                              world.SHAPES.index(o.shape)]
            for p in torch.nonzero(cover[k] > 0.97).flatten():
                assert (pixels[p] - torch.tensor(world.COLOURS[o.colour])).abs().max() < 30
                checked += 1
        # the cell label is mirrored exactly when the pixels are: the objects' order from left
        # to right in the cover follows their centres, reversed in a mirrored image
        row_col = [divmod(int(c), 3) for c in labels[:n, 3]]
        mirrored = any(col != o.cell[1] for (_, col), o in zip(row_col, scene.objects))
        assert all(row == o.cell[0] for (row, _), o in zip(row_col, scene.objects))
        xs = (cover[:n].reshape(n, 8, 8).sum(1) * torch.arange(8)).sum(1) / \
            cover[:n].reshape(n, 8, 8).sum((1, 2)).clamp(min=1e-6)                  # (n,)
        for a in range(n):
            for b in range(n):
                if scene.objects[b].cx - scene.objects[a].cx > 0.3 and cover[a].sum() > 0.5 \
                        and cover[b].sum() > 0.5:
                    assert (xs[b] > xs[a]) != mirrored, (i, a, b)
        mirrored_seen.add(mirrored)
    assert mirrored_seen == {True, False} and checked > 20


def test_object_targets_need_world_images_and_a_random_crop():
    with pytest.raises(ValueError, match="entry 0: the objects loss needs world images"):
        WorldPretrainDataset([{"image": "a.jpg", "caption": "a dog"}], WorldAids(objects=True), 8,
                             transform=None, check_images=False)
    with pytest.raises(ValueError, match="RandomResizedCrop"):
        WorldPretrainDataset(world_entries("pretrain", "train", 2), WorldAids(objects=True), 8,
                             check_images=False, transform=create_transform(64, train=False))
    # without the objects aid, any image and transform will do (as PretrainDataset)
    WorldPretrainDataset([{"image": "a.jpg", "caption": "a dog"}], WorldAids(conv_stem=True), 8,
                         transform=create_transform(64, train=False), check_images=False)


@pytest.mark.parametrize("objects", [False, True])
def test_all_captions_come_with_the_image_and_its_mirror(objects):
    entries = world_entries("pretrain", "train", 30)
    tf = create_transform(64, train=True, crop_scale=(0.8, 1.0))
    plain = WorldPretrainDataset(entries, WorldAids(objects=objects), 8, transform=tf,
                                 check_images=False)
    every = WorldPretrainDataset(entries, WorldAids(objects=objects, itc_all_captions=True), 8,
                                 transform=tf, check_images=False)
    swapped = 0
    for i in range(30):
        torch.manual_seed(i)
        first = plain[i]
        torch.manual_seed(i)
        sample = every[i]
        assert set(sample) == set(first) | {"captions"}
        assert len(first) == (4 if objects else 2)
        assert torch.equal(sample["image"], first["image"]) and sample["text"] == first["text"]
        assert all(torch.equal(sample[k], first[k]) for k in first if k.startswith("object_"))
        own = [pre_caption(c) for c in entries[i]["caption"]]
        mirrored = [swap_left_right(c) for c in own]
        assert sample["captions"] in (own, mirrored) and sample["text"] in sample["captions"]
        swapped += sample["captions"] != own
    assert swapped > 0
    vocab = [" ".join(World.vocabulary())]
    batch = make_collate(Tokenizer.build(vocab), 30)([every[0], every[1]])
    keys = {"image", "text_ids", "text_mask", "captions_ids", "captions_mask", "captions_count"}
    assert set(batch) == keys | ({"object_cover", "object_labels"} if objects else set())
    n = world.CAPTIONS_PER_IMAGE
    assert batch["captions_count"].tolist() == [n, n] and batch["captions_ids"].shape[0] == 2 * n


def test_a_collated_world_batch_runs_through_world_model():
    """The dataset's keys are the model's: WorldPretrainDataset with every aid, collated, feeds
    WorldModel's forward with every aid (the tiny preset's losses), each loss finite, and the
    objects loss reaches the head."""
    aids = world_aids.TINY
    tok = Tokenizer.build([" ".join(World.vocabulary())])
    ds = WorldPretrainDataset(world_entries("pretrain", "train", 4), aids, 8, check_images=False,
                              transform=create_transform(32, train=True, crop_scale=(0.8, 1.0)))
    torch.manual_seed(0)
    b = make_collate(tok, 30)([ds[i] for i in range(4)])
    assert b["object_cover"].shape == (4, world.MAX_OBJECTS, 16)
    m = tiny_world(aids, losses=("itc", "itm", "mlm"), vocab_size=tok.vocab_size,
                   pad_id=tok.pad_id, cls_id=tok.cls_id, mask_id=tok.mask_id, queue_size=0,
                   distill=False).train()
    out = m(b)
    assert set(out) == {"itc", "itm", "mlm", "objects", "loss"}          # no queue: none to write
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert m.object_head.weight.grad.abs().sum() > 0
    assert m.visual_encoder.patch_embed.proj[0].weight.grad.abs().sum() > 0
