"""
The embedded world's aids: what the tiny preset adds to ELIP's pre-training so that a small model
trained from random weights on the world learns within minutes. None of this is the paper's,
whose ViT starts from DeiT weights and whose BERT from BERT's; the albef and blip presets never
build anything from this file. The one seam: the training script builds `WorldModel(mc, aids)`
in place of `ELIPModel(mc)`, and `WorldPretrainDataset` in place of `PretrainDataset`, when any
aid is on.

Without them the tiny ViT never learnt shapes or places within the run (a probe of its tokens
named shapes no better than an untrained one's) and zero-shot retrieval stopped at 46% of its
ceiling. The aids (docs/tiny-preset.md has what each bought):
  objects           the world's object labels as a fourth loss: each object's region, pooled
                    from the tokens the pruning kept, names its size, colour, shape and place,
                    as an ImageNet-like pre-training would have taught the ViT
  itc_online_batch  ITC's in-batch candidates from the online encoders, as CLIP: ALBEF's come
                    from the momentum teacher, and from scratch both teachers start with one
                    feature for every input, onto which the features collapse
  itc_all_captions  ITC over all five captions of an image at once, each a different fact
  conv_stem         a convolutional stem in place of the ViT's linear patch map (Xiao et al.
                    2021, "Early convolutions help transformers see better")
  sincos_pos        position embeddings that start as 2-D sine-cosine ones (MAE's), still learnt
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import ImageOps
from torch import nn
from torchvision import transforms

import world
from config import config_from_dict
from data import PretrainDataset, swap_left_right
from model import ELIPModel, ModelConfig, similarity
from vit import PatchEmbed, VisionTransformer


@dataclass
class WorldAids:
    objects: bool = False            # the world's object labels as a fourth loss (object_loss)
    object_weight: float = 3.0       # the weight of that loss in the sum
    itc_online_batch: bool = False   # ITC's in-batch candidates from the online encoders (CLIP),
                                     # not the momentum ones (ALBEF); no distillation then
    itc_all_captions: bool = False   # ITC reads every caption of an image at once, all of them
                                     # its positives (itc_all_loss); online batch, no queue
    conv_stem: bool = False          # a convolutional stem in place of the linear patch map
    sincos_pos: float = 0.0          # > 0: position embeddings start as 2-D sine-cosine ones of
                                     # this amplitude (MAE's), still learnt; 0: random (timm)

    @property
    def on(self) -> bool:
        return (self.objects or self.itc_online_batch or self.itc_all_captions or self.conv_stem
                or self.sincos_pos > 0)

    def check(self, mc: ModelConfig):
        """Refuse a model config the aids cannot serve (called before anything is built)."""
        if self.itc_online_batch and mc.distill:
            raise ValueError("itc_online_batch takes no distillation: the soft targets are the "
                             "teacher's, the candidates the online features (distill false)")
        if self.itc_all_captions and not (self.itc_online_batch and mc.queue_size == 0):
            raise ValueError("itc_all_captions needs itc_online_batch and queue_size 0 (ITC "
                             "over the batch's online features only)")


# the tiny preset's aids (train_pretrain.py), and the architecture a fine-tuning from random
# weights builds to compare with it (tasks.scratch_model_config)
TINY = WorldAids(objects=True, itc_online_batch=True, itc_all_captions=True, conv_stem=True,
                 sincos_pos=0.3)


class ConvStem(nn.Module):
    """Images (B, 3, H, W) -> patch tokens (B, M, D), as PatchEmbed, through a stack of 3x3
    stride-2 convolutions, each with GroupNorm and GELU, then a 1x1 one: a small ViT trained
    from random weights learns where things are far sooner with it."""

    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.num_patches = (img_size // patch_size) ** 2
        n = patch_size.bit_length() - 1
        if patch_size != 2 ** n or n < 1 or dim % 2 ** (n - 1):
            raise ValueError(f"conv_stem needs a patch size that is a power of 2 and a width it "
                             f"halves into, got patch {patch_size}, width {dim}")
        widths = [3] + [dim // 2 ** (n - 1 - k) for k in range(n)]   # patch 8: 3, D/4, D/2, D
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(1, b), nn.GELU()]
        self.proj = nn.Sequential(*layers, nn.Conv2d(dim, dim, 1))

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)                   # (B, M, D)


def embed_layer(aids: WorldAids) -> type:
    """The ViT's patch embedding the aids ask for (vit.VisionTransformer's embed_layer)."""
    return ConvStem if aids.conv_stem else PatchEmbed


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine position embeddings, row-major patches (MAE's): a
    quarter of the channels each for sin and cos of the column, then of the row, at frequencies
    1 / 10000^(i / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))   # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    x, y = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega              # (M, D/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)               # (M, D)


@torch.no_grad()
def init_positions(model: nn.Module, aids: WorldAids):
    """With aids.sincos_pos, every ViT of `model` (online and momentum copies alike) starts
    from sine-cosine position embeddings: a place is then readable from the first step, where
    random embeddings take most of a short run to order."""
    if not aids.sincos_pos:
        return
    for vit in (m for m in model.modules() if isinstance(m, VisionTransformer)):
        grid = int(vit.num_patches ** 0.5)
        vit.pos_embed[0, 1:] = aids.sincos_pos * sincos_pos_embed(grid, vit.embed_dim).to(
            vit.pos_embed.device)


class WorldModel(ELIPModel):
    """ELIPModel with the aids: its ViTs built with the aids' patch embedding and positions; ITC
    over every caption (itc_all_captions) in place of ALBEF's; the objects loss after the
    paper's losses. Batches carry, besides ELIPModel's fields, "captions_ids", "captions_mask",
    "captions_count" (every caption of each image) and "object_cover", "object_labels"
    (World.object_targets) when those aids are on."""

    def __init__(self, cfg: ModelConfig, aids: WorldAids):
        aids.check(cfg)
        self.aids = aids            # a plain value: set before nn.Module's set-up, read below
        super().__init__(cfg, embed_layer=embed_layer(aids))
        init_positions(self, aids)

    def build_extra_heads(self, cfg: ModelConfig):
        self.object_head = (nn.Linear(cfg.vision_width, sum(world.OBJECT_CLASSES))
                            if self.aids.objects else None)

    @property
    def reads_momentum(self) -> bool:
        """With online candidates (and no distillation, WorldAids.check) only a queue, which
        holds momentum features, reads the teacher."""
        if not self.aids.itc_online_batch:
            return super().reads_momentum
        return "itc" in self.cfg.losses and self.cfg.queue_size > 0

    def candidates(self, enc: dict) -> dict:
        """enc with the online features standing where ITC and ITM read their in-batch
        candidates (the teacher's in ELIPModel); gradient then reaches both encoders."""
        if not self.aids.itc_online_batch:
            return enc
        return {**enc, "image_feat_m": enc["image_feat"], "text_feat_m": enc["text_feat"]}

    def itc(self, batch: dict, enc: dict, alpha: float) -> torch.Tensor:
        if not self.aids.itc_all_captions:
            return super().itc(batch, self.candidates(enc), alpha)
        return self.itc_all_loss(enc["image_feat"], batch["captions_ids"],
                                 batch["captions_mask"], batch["captions_count"])

    def itm_similarities(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return super().itm_similarities(self.candidates(enc))

    def losses(self, batch: dict, enc: dict, alpha: float) -> dict:
        out = super().losses(batch, enc, alpha)
        if self.aids.objects:
            out["objects"] = self.aids.object_weight * self.object_loss(
                enc["image_embeds"], enc["sources"], batch["object_cover"], batch["object_labels"])
        return out

    def itc_all_loss(self, image_feat, ids, mask, counts):
        """ITC over every caption of each image (the world gives five, each a different fact):
        each image against all N captions of the batch, its own ones the positives (the mean of
        their log-probabilities), and each caption against the B images, as CLIP's loss."""
        text_feat = self.text_feat(self.encode_text(ids, mask))                   # (N, E)
        B = image_feat.shape[0]
        owner = torch.repeat_interleave(torch.arange(B, device=ids.device), counts,
                                        output_size=ids.shape[0])                   # (N,)
        own = (owner[None, :] == torch.arange(B, device=ids.device)[:, None]).float()  # (B, N)
        temp = self.temp.clamp(0.001, 0.5)
        loss_i2t = -(similarity(image_feat, text_feat.T, temp).log_softmax(1) * own).sum(1) / counts
        loss_t2i = F.cross_entropy(similarity(text_feat, image_feat.T, temp), owner)
        return (loss_i2t.mean() + loss_t2i) / 2

    def object_loss(self, image_embeds, sources, cover, labels):
        """For a tiny model trained from random weights on the world, the labels an ImageNet-like
        pre-training would give each object, in place of the paper's pretrained DeiT. An
        object's region feature is the mean of the final tokens the pruning kept, each weighted
        by the share of its patch that the object covers (merged tokens left out); a linear head
        names the object's size, colour, shape and cell from it: the sum of the four
        cross-entropies over the objects with at least half a patch left."""
        B, K, M = cover.shape                                        # (B, K, M), labels (B, K, 4)
        if M != self.visual_encoder.num_patches:
            raise ValueError(f"object cover over {M} patches, the ViT has "
                             f"{self.visual_encoder.num_patches}")
        # the patch each final token came from (sources' last entry), -1 for a merged token
        src = (sources[max(sources)] if sources else
               torch.arange(M, device=cover.device).expand(B, -1))                # (B, L'-1)
        w = cover.gather(2, src.clamp(min=0)[:, None, :].expand(-1, K, -1))       # (B, K, L'-1)
        w = w * (src >= 0)[:, None, :]
        share = w.sum(-1)                                                        # (B, K)
        region = (w @ image_embeds[:, 1:]) / share.clamp(min=1e-6)[..., None]     # (B, K, Dv)
        keep = ((share >= 0.5) & (labels[..., 0] >= 0)).flatten().float()        # (B*K,)
        logits = self.object_head(region).flatten(0, 1)                          # (B*K, sum C)
        targets = labels.clamp(min=0).flatten(0, 1)                              # (B*K, 4)
        ce = sum(F.cross_entropy(z, targets[:, j], reduction="none") for j, z in
                 enumerate(logits.split(list(world.OBJECT_CLASSES), dim=1)))     # (B*K,)
        # the mean over the objects kept, by weights rather than indexing (no wait for the GPU);
        # none kept: a zero that still reaches the head, as DDP expects
        return (ce * keep).sum() / keep.sum().clamp(min=1)


class WorldPretrainDataset(PretrainDataset):
    """PretrainDataset with what the aids read: "captions", every caption of the image (for
    itc_all_captions), and, for the objects loss (world images only), "object_cover" and
    "object_labels" (World.object_targets) under the same crop and mirror as the image."""

    def __init__(self, source, aids: WorldAids, patch_size: int, **kw):
        self.aids, self.patch_size = aids, patch_size
        super().__init__(source, **kw)
        if aids.objects and not isinstance(getattr(self.transform, "transforms", [None])[0],
                                           transforms.RandomResizedCrop):
            raise ValueError("objects needs a transform that starts with a RandomResizedCrop")

    def parse(self, entry):
        if self.aids.objects and not str(entry.get("image")).startswith("world:"):
            raise ValueError(f"the objects loss needs world images, got {entry.get('image')!r}")
        return super().parse(entry)

    def __getitem__(self, i):
        captions = self.items[i]["captions"]
        all_captions = captions if self.aids.itc_all_captions else []
        texts = [self.random_choice(captions), *all_captions]
        sample = {}
        if self.aids.objects:
            image, texts, (cover, labels) = self.with_objects(i, texts)
            sample = {"object_cover": cover, "object_labels": labels}
        else:
            (image,), texts = self.load(i, *texts)
        return {"image": image, "text": texts[0],
                **({"captions": texts[1:]} if self.aids.itc_all_captions else {}), **sample}

    def with_objects(self, i, texts):
        w, split, index = world.world_of_path(self.items[i]["images"][0])
        scene, flip = w.scene(split, index), self.flip and bool(torch.rand(()) < 0.5)
        image = w.render(scene, world.WORLD_RES)
        image = ImageOps.mirror(image) if flip else image
        texts = [swap_left_right(t) for t in texts] if flip and self.swap_words else texts
        # the transform's crop, drawn here so that the object masks get the same box
        crop, rest = self.transform.transforms[0], transforms.Compose(self.transform.transforms[1:])
        top, left, h, w_ = crop.get_params(image, crop.scale, crop.ratio)
        image = rest(TF.resized_crop(image, top, left, h, w_, crop.size, crop.interpolation))
        cover, labels = w.object_targets(scene, (left, top, left + w_, top + h), crop.size[0],
                                         self.patch_size, mirrored=flip)
        return image, texts, (torch.from_numpy(cover), torch.from_numpy(labels))


def build_model(mc: ModelConfig, aids: WorldAids) -> ELIPModel:
    """The seam: ELIP's model, or with any aid on, the world's."""
    return WorldModel(mc, aids) if aids.on else ELIPModel(mc)


def aids_of(config: dict) -> WorldAids:
    """The aids a checkpoint's config (its "aids" entry) was trained with; none if it has none."""
    return config_from_dict(WorldAids, config.get("aids", {}))
