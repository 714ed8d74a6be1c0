"""
The pre-training model: ALBEF (Li et al. 2021) or BLIP (Li et al. 2022) with ELIP's text-guided
vision-token pruning (arXiv 2309.16738) in the online ViT.

One forward pass, in the order ELIP needs:
  1. the unimodal text encoder runs first; its [CLS] is the text signal for pruning (Eq. 1)
  2. the online ViT runs with that [CLS] and prunes/merges tokens (pruning.py); no gradient
     flows back to the text through the pruning decision
  3. ITC against momentum features and queues, ITM with hard negatives, and MLM (ALBEF) or
     LM captioning (BLIP) on the pruned image tokens
The momentum (teacher) encoders always see all tokens, run only when a loss reads them, and are
updated, with the queues written, once per optimizer step (MomentumStep).
"""
import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pruning import PruneConfig
from text_encoder import BertConfig, TextEncoder, tie_to_encoder
from vit import VisionTransformer


@dataclass
class ModelConfig:
    # vision
    img_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_depth: int = 12
    vision_heads: int = 4
    drop_path: float = 0.0
    init_std: float = 0.02           # std of random initial weights, both encoders (timm, BERT);
                                     # see PRESETS["tiny"] for why it is larger there
    conv_stem: bool = False          # convolutions instead of one linear map per patch (vit.py)
    sincos_pos: float = 0.0          # > 0: position embeddings start as 2-D sine-cosine ones of
                                     # this amplitude (MAE's), still learnt; 0: random (timm)
    # text: ALBEF splits one BERT into text_layers text-only and fusion_layers cross-attention
    # layers; BLIP (fusion_layers = 0 here) gives every layer cross-attention, used or skipped
    vocab_size: int = 0              # these six are set from the tokenizer
    pad_id: int = 0
    cls_id: int = 2
    mask_id: int = 4
    enc_id: int = -1                 # [ENC] and [DEC] (BLIP), -1 when the vocabulary lacks them
    dec_id: int = -1
    text_width: int = 128            # must equal vision_width for ELIP's fused [CLS] (Eq. 1)
    text_layers: int = 2
    fusion_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 512
    text_dropout: float = 0.1        # BERT's; 0 in the tiny preset, where, trained from scratch,
                                     # the dropout noise in the text [CLS] drowns its signal
    max_len: int = 32
    token_types: bool = True         # BERT's token-type embeddings (ALBEF); BLIP's BERT has none
    blip_tokens: bool = False        # BLIP: the image-grounded encoder reads [ENC] and the decoder
                                     # [DEC] in place of [CLS]; the text encoder keeps [CLS]
    tie_decoder: bool = False        # BLIP: the decoder shares the text encoder's embeddings,
                                     # cross-attention and feed-forward (own self-attention, LM head)
    # objectives
    losses: tuple[str, ...] = ("itc", "itm", "mlm")    # ALBEF: itc, itm, mlm; BLIP: itc, itm, lm;
                                     # objects: the world's object labels (object_loss)
    object_classes: tuple[int, ...] = (2, 7, 6, 9)   # the labels' classes: world.OBJECT_CLASSES
    object_weight: float = 3.0       # of the objects loss
    embed_dim: int = 64              # joint ITC space
    queue_size: int = 1024
    momentum: float = 0.995
    temp: float = 0.07
    mlm_prob: float = 0.15
    distill: bool = True             # momentum distillation of ITC and MLM targets (ALBEF)
    itc_online_batch: bool = False   # ITC's in-batch candidates from the online encoders (CLIP),
                                     # not the momentum ones (ALBEF); see itc_loss
    itc_all_captions: bool = False   # ITC reads every caption of an image at once, all of them
                                     # its positives (itc_all_loss); online batch, no queue
    itm_hard_negatives: bool = True  # ITM negatives drawn by ITC similarity (ALBEF), or uniformly
    negative_all_rank: bool = False  # ITM negatives drawn from every DDP rank's batch (BLIP's
                                     # COCO retrieval fine-tuning), not the local batch only
    itm_weight_eps: float = 0.0      # added to every hard-negative weight (BLIP 1e-4, ALBEF 0)
    label_smoothing: float = 0.1     # LM loss (BLIP)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def __post_init__(self):
        if isinstance(self.prune, dict):
            self.prune = PruneConfig(**self.prune)
        self.losses, self.object_classes = tuple(self.losses), tuple(self.object_classes)
        self.prune.check(self.vision_depth)
        bad = set(self.losses) - {"itc", "itm", "mlm", "lm", "objects"}
        if bad or not self.losses:
            raise ValueError(f"losses {self.losses}: choose from itc, itm, mlm, lm, objects")
        if (self.blip_tokens or self.tie_decoder) and self.fusion_layers > 0:
            raise ValueError("blip_tokens and tie_decoder are BLIP's: they need fusion_layers 0 "
                             "(cross-attention in every layer of the text encoder)")
        if self.itc_all_captions and not (self.itc_online_batch and self.queue_size == 0
                                          and not self.distill):
            raise ValueError("itc_all_captions needs itc_online_batch, queue_size 0 and no "
                             "distill (ITC over the batch's online features only)")
        if self.text_width != self.vision_width and self.prune.method in ("elip", "elip_inline"):
            raise ValueError(f"text_width {self.text_width} differs from vision_width "
                             f"{self.vision_width}: ELIP fuses the two [CLS] tokens (Eq. 1)")


# Architecture presets; the training scripts add their own (batch, learning rate, steps).
PRESETS = {
    # tiny: trained from scratch in minutes, where ALBEF's teacher-based ITC collapses (see
    # itc_loss): online in-batch ITC candidates, no queue (stale features of an untrained
    # teacher are negatives that all features escape together), no distillation (an untrained
    # teacher's soft targets are uniform and pull every feature together). And init_std 0.1:
    # with BERT's 0.02, every caption's [CLS] starts as nearly the same vector (cosine 0.9998
    # between captions: the attention's small weights barely mix the words in), ITC's gradient
    # is as small as those differences, and MLM's far larger gradients on the shared text layers
    # set Adam's step size, so ITC sat at log(batch) for hundreds of steps. At 0.1 the captions
    # start apart (cosine about 0.88) and ITC learns from the first epoch. ITM's negatives are
    # drawn uniformly: once ITC works, its hardest negatives are captions nearly (or, for the
    # world's counts, exactly) true of the image, and ITM from scratch never left chance on them.
    # Not ELIP's, for a ViT that starts knowing nothing (the paper's starts from DeiT weights):
    # the world's object labels as a fourth loss (object_loss), ITC over all five captions of
    # an image, a convolutional stem and sine-cosine position embeddings. Without them the ViT
    # never learnt shapes or places within the run (a probe of its tokens named shapes no better
    # than an untrained one's) and zero-shot retrieval stopped at 46% of its ceiling.
    "tiny": dict(tome_r=3, text_dropout=0.0, momentum=0.99, queue_size=0, distill=False,
                 itc_online_batch=True, init_std=0.1, itm_hard_negatives=False,
                 losses=("itc", "itm", "mlm", "objects"), itc_all_captions=True, conv_stem=True,
                 sincos_pos=0.3),
    # ELIP's pre-training of ALBEF and BLIP: no drop path, ALBEF's 25 text tokens (truncated),
    # BLIP's 30, ELIP's pruning schedule
    "albef": dict(img_size=256, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                  drop_path=0.0, text_width=768, text_layers=6, fusion_layers=6, text_heads=12,
                  text_mlp=3072, max_len=25, losses=("itc", "itm", "mlm"), embed_dim=256,
                  queue_size=65536, tome_r=11, **{"prune.preset": "elip"}),
    "blip": dict(img_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                 drop_path=0.0, text_width=768, text_layers=12, fusion_layers=0, text_heads=12,
                 text_mlp=3072, max_len=30, losses=("itc", "itm", "lm"), embed_dim=256,
                 queue_size=57600, tome_r=11, **{"prune.preset": "elip"},
                 token_types=False, blip_tokens=True, tie_decoder=True, itm_weight_eps=1e-4),
}


def build_vit(cfg, prune):
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size,
                             embed_dim=cfg.vision_width, depth=cfg.vision_depth,
                             num_heads=cfg.vision_heads, drop_path_rate=cfg.drop_path, prune=prune,
                             init_std=cfg.init_std, conv_stem=cfg.conv_stem,
                             sincos_pos=cfg.sincos_pos)


def build_text(cfg, decoder=False):
    """ALBEF: text layers then fusion layers. BLIP (fusion_layers == 0) and the decoder: every
    layer has cross-attention, which the text-only mode skips."""
    n = cfg.text_layers + cfg.fusion_layers
    return TextEncoder(BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_layers=n,
        num_heads=cfg.text_heads, intermediate_size=cfg.text_mlp, max_position=max(512, cfg.max_len),
        type_vocab_size=2 if cfg.token_types else 0, dropout=cfg.text_dropout,
        fusion_layer=0 if decoder or cfg.fusion_layers == 0 else cfg.text_layers,
        encoder_width=cfg.vision_width, lm_head=decoder or "mlm" in cfg.losses,
        initializer_range=cfg.init_std))


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def with_first_token(ids, token):
    """(B, T) ids with position 0 (the [CLS]) replaced by `token`, as BLIP writes [ENC] and [DEC]."""
    return torch.cat([ids.new_full((ids.shape[0], 1), token), ids[:, 1:]], dim=1)


def all_gather(x):
    """Concatenate x from every DDP rank (no gradient): feeds the queues with every rank's batch."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class GatherWithGrad(torch.autograd.Function):
    """all_gather that keeps the graph (BLIP's GatherLayer): each rank's slice of the gathered
    tensor gets the gradient that every rank's loss sends it, summed over ranks."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def all_gather_with_grad(x):
    """Concatenate x from every DDP rank along dim 0, gradient flowing back to each rank's x."""
    return GatherWithGrad.apply(x) if distributed() else x


class ELIPModel(nn.Module):

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set from the tokenizer")
        if cfg.blip_tokens and not (0 <= cfg.enc_id < cfg.vocab_size and
                                    0 <= cfg.dec_id < cfg.vocab_size):
            raise ValueError(f"blip_tokens needs [ENC] and [DEC] in the vocabulary (enc_id "
                             f"{cfg.enc_id}, dec_id {cfg.dec_id}, vocab_size {cfg.vocab_size})")
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg, cfg.prune)
        self.text_encoder = build_text(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.object_head = (nn.Linear(cfg.vision_width, sum(cfg.object_classes))
                            if "objects" in cfg.losses else None)
        self.text_decoder = build_text(cfg, decoder=True) if "lm" in cfg.losses else None
        if self.text_decoder is not None and cfg.tie_decoder:
            tie_to_encoder(self.text_decoder, self.text_encoder)
        # momentum (teacher) copies: updated by EMA, never by gradient, and never pruned
        self.visual_encoder_m = build_vit(cfg, PruneConfig(method="none"))
        self.visual_encoder_m.load_state_dict(self.visual_encoder.state_dict())
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for p in self.momentum_params():
            p.requires_grad_(False)
        # queues of momentum features, extra ITC negatives (ALBEF); idx_queue holds image ids for
        # fine-tuning with several captions per image (-1: no id, matches nothing). ALBEF fills
        # the queues with random vectors; we mask slots not yet written instead: random negatives
        # reward a model that maps every input to one point (it beats them all by 1 / temp), which
        # a model trained from scratch, unlike ALBEF's pretrained encoders, readily falls into.
        q = cfg.queue_size
        self.register_buffer("image_queue", torch.zeros(cfg.embed_dim, q))
        self.register_buffer("text_queue", torch.zeros(cfg.embed_dim, q))
        self.register_buffer("idx_queue", torch.full((q,), -1, dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros(q, dtype=torch.bool))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # ---- momentum encoders and queues ----------------------------------------------------
    def online_momentum_pairs(self):
        return [(self.visual_encoder, self.visual_encoder_m), (self.text_encoder, self.text_encoder_m),
                (self.vision_proj, self.vision_proj_m), (self.text_proj, self.text_proj_m)]

    def momentum_params(self):
        return [p for _, m in self.online_momentum_pairs() for p in m.parameters()]

    @property
    def reads_momentum(self) -> bool:
        """Whether a loss reads the momentum encoders: ITC's in-batch candidates (ALBEF), which
        also weigh ITM's negatives, its queues or its distillation targets, or MLM's
        distillation. When none does (the tiny preset) they neither run nor update: ALBEF's
        teacher costs a forward pass of both encoders per step."""
        c = self.cfg
        itc = "itc" in c.losses and (c.queue_size > 0 or c.distill)
        candidates = ("itc" in c.losses or "itm" in c.losses) and not c.itc_online_batch
        return itc or candidates or ("mlm" in c.losses and c.distill)

    @torch.no_grad()
    def momentum_update(self):
        """theta_m <- m * theta_m + (1 - m) * theta, as ALBEF's _momentum_update computes it."""
        m = self.cfg.momentum
        for online, mom in self.online_momentum_pairs():
            for p, p_m in zip(online.parameters(), mom.parameters()):
                p_m.mul_(m).add_((1 - m) * p)

    @torch.no_grad()
    def enqueue(self, image_feat, text_feat, idx=None):
        """Write the features of every rank's batch at the queue pointer, wrapping around."""
        q = self.image_queue.shape[1]
        if q == 0:          # no queue: in-batch negatives only
            return
        image_feat, text_feat = all_gather(image_feat), all_gather(text_feat)
        n = image_feat.shape[0]
        idx = torch.full((n,), -1, device=image_feat.device) if idx is None else all_gather(idx)
        slots = (self.queue_ptr + torch.arange(n, device=image_feat.device)) % q   # (n,)
        self.image_queue[:, slots] = image_feat.T
        self.text_queue[:, slots] = text_feat.T
        self.idx_queue[slots] = idx
        self.queue_filled[slots] = True
        self.queue_ptr.copy_((self.queue_ptr + n) % q)      # on the device: no host round trip

    # ---- encoders ------------------------------------------------------------------------
    def encode_text(self, input_ids, attention_mask, momentum=False):
        enc = self.text_encoder_m if momentum else self.text_encoder
        return enc(input_ids, attention_mask, mode="text")                  # (B, T, Dt)

    def encode_image(self, images, text_cls=None, momentum=False):
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        return vit(images, text_cls)                                        # (B, L, Dv)

    def image_feat(self, image_embeds, momentum=False):
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(image_embeds[:, 0]), dim=-1)                # (B, E)

    def text_feat(self, text_embeds, momentum=False):
        proj = self.text_proj_m if momentum else self.text_proj
        return F.normalize(proj(text_embeds[:, 0]), dim=-1)                 # (B, E)

    def fuse(self, text_embeds, attention_mask, image_embeds, input_ids=None, momentum=False):
        """The image-grounded text encoder: ALBEF's fusion layers on the text states, or BLIP's
        multimodal encoder on the ids, which starts with [ENC] when cfg.blip_tokens.
        Returns (B, T, Dt)."""
        enc = self.text_encoder_m if momentum else self.text_encoder
        atts = image_embeds.new_ones(image_embeds.shape[:2], dtype=torch.long)
        if self.cfg.fusion_layers > 0:
            return enc(None, attention_mask, image_embeds, atts, mode="fusion", hidden=text_embeds)
        if self.cfg.blip_tokens:
            input_ids = with_first_token(input_ids, self.cfg.enc_id)
        return enc(input_ids, attention_mask, image_embeds, atts, mode="multimodal")

    def decode(self, input_ids, attention_mask, image_embeds):
        """The causal decoder reading the image through cross-attention: (B, T, Dt). Its input
        starts with [DEC] when cfg.blip_tokens, else with the caption's [CLS]."""
        if self.cfg.blip_tokens:
            input_ids = with_first_token(input_ids, self.cfg.dec_id)
        atts = image_embeds.new_ones(image_embeds.shape[:2], dtype=torch.long)
        return self.text_decoder(input_ids, attention_mask, image_embeds, atts, mode="multimodal",
                                 causal=True)

    def itm_logits(self, text_embeds, attention_mask, image_embeds, input_ids=None):
        return self.itm_head(self.fuse(text_embeds, attention_mask, image_embeds, input_ids)[:, 0])

    # ---- the pre-training step -------------------------------------------------------------
    def forward(self, images, input_ids, attention_mask, alpha=0.4, idx=None, captions=None,
                objects=None):
        """Returns a dict of the active losses (scalars) and `loss`, their sum; with a queue,
        also "queue": this batch's momentum features and ids, which MomentumStep writes to the
        queues once per optimizer step (the forward changes no state of the model).
        captions: (ids, mask, counts) of every caption of each image, for itc_all_captions;
        objects: (cover, labels) of World.object_targets, batched, for the objects loss."""
        cfg = self.cfg
        text_embeds = self.encode_text(input_ids, attention_mask)               # (B, T, Dt)
        # ELIP: the text [CLS], unprojected, guides the ViT's pruning (Eq. 1); the ViT scores
        # tokens without gradient, so nothing flows back to the text through this path
        image_embeds, sources = self.visual_encoder.forward_features(images, text_embeds[:, 0])
        image_feat, text_feat = self.image_feat(image_embeds), self.text_feat(text_embeds)
        out, image_embeds_m, image_feat_m, text_feat_m = {}, None, None, None
        if self.reads_momentum:
            with torch.no_grad():
                image_embeds_m = self.encode_image(images, momentum=True)       # all tokens
                text_embeds_m = self.encode_text(input_ids, attention_mask, momentum=True)
                image_feat_m = self.image_feat(image_embeds_m, momentum=True)
                text_feat_m = self.text_feat(text_embeds_m, momentum=True)
        if "itc" in cfg.losses and cfg.itc_all_captions:
            if captions is None:
                raise ValueError("itc_all_captions needs every caption of each image (captions)")
            out["itc"] = self.itc_all_loss(image_feat, *captions)
        elif "itc" in cfg.losses:
            out["itc"] = self.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx)
        if "itm" in cfg.losses:
            with torch.no_grad():
                # the batch's similarities as ITC computes them (ALBEF, BLIP): online image
                # against ITC's candidate texts (momentum ones, or online with itc_online_batch),
                # online text against the candidate images; they weigh ITM's hard negatives
                image_c, text_c = ((image_feat, text_feat) if cfg.itc_online_batch
                                   else (image_feat_m, text_feat_m))
                if cfg.negative_all_rank and distributed():
                    # BLIP's COCO retrieval: every rank's online features are candidates
                    image_c, text_c = all_gather(image_feat), all_gather(text_feat)   # (N, E)
                temp = self.temp.clamp(0.001, 0.5)
                sim_i2t, sim_t2i = image_feat @ text_c.T / temp, text_feat @ image_c.T / temp
            out["itm"] = self.itm_loss(image_embeds, text_embeds, input_ids, attention_mask,
                                       sim_i2t, sim_t2i, idx)
        if "mlm" in cfg.losses:
            out["mlm"] = self.mlm_loss(input_ids, attention_mask, image_embeds, image_embeds_m, alpha)
        if "lm" in cfg.losses:
            out["lm"] = self.lm_loss(input_ids, attention_mask, image_embeds)
        if "objects" in cfg.losses:
            if objects is None:
                raise ValueError("the objects loss needs each image's World.object_targets")
            out["objects"] = cfg.object_weight * self.object_loss(image_embeds, sources, *objects)
        out["loss"] = sum(out.values())
        if "itc" in cfg.losses and cfg.queue_size > 0:
            ids = torch.full_like(input_ids[:, 0], -1) if idx is None else idx      # (B,)
            out["queue"] = (image_feat_m, text_feat_m, ids)
        return out

    def object_loss(self, image_embeds, sources, cover, labels):
        """Not ELIP's: for a tiny model trained from random weights on the world, the labels an
        ImageNet-like pre-training would give each object, in place of the paper's pretrained
        DeiT. An object's region feature is the mean of the final tokens the pruning kept, each
        weighted by the share of its patch that the object covers (merged tokens left out); a
        linear head names the object's size, colour, shape and cell from it: the sum of the four
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
                 enumerate(logits.split(list(self.cfg.object_classes), dim=1)))  # (B*K,)
        # the mean over the objects kept, by weights rather than indexing (no wait for the GPU);
        # none kept: a zero that still reaches the head, as DDP expects
        return (ce * keep).sum() / keep.sum().clamp(min=1)

    def itc_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx=None):
        """Image-text contrastive loss over the batch and the queues, with soft targets
        alpha * softmax(momentum similarity) + (1 - alpha) * ground truth (ALBEF Eq. 2-3)."""
        temp = self.temp.clamp(0.001, 0.5)
        B = image_feat.shape[0]
        # ALBEF compares the online features with momentum ones only, so each side learns from
        # the other's slow teacher. From scratch that stalls: both teachers start with one
        # feature for every input and the features collapse onto it (the tiny preset stayed at
        # chance). With itc_online_batch the batch's own online features are the candidates, as
        # in CLIP, and gradient reaches both encoders; the queue still holds momentum features.
        online = self.cfg.itc_online_batch
        image_all = torch.cat([(image_feat if online else image_feat_m).T, self.image_queue],
                              dim=1)                                               # (E, B+Q)
        text_all = torch.cat([(text_feat if online else text_feat_m).T, self.text_queue],
                             dim=1)                                                # (E, B+Q)
        if idx is None:   # each image its own positive
            pos = F.pad(torch.eye(B, device=image_feat.device), (0, image_all.shape[1] - B))
        else:             # every caption of the same image is a positive (retrieval fine-tuning)
            pos = (idx[:, None] == torch.cat([idx, self.idx_queue])[None]).float()
        pos = pos / pos.sum(dim=1, keepdim=True)                                   # (B, B+Q)
        empty = F.pad(~self.queue_filled, (B, 0))                                  # (B+Q,)
        with torch.no_grad():
            if self.cfg.distill:
                image_all_m = torch.cat([image_feat_m.T, self.image_queue], dim=1)  # (E, B+Q)
                text_all_m = torch.cat([text_feat_m.T, self.text_queue], dim=1)     # (E, B+Q)
                sim_m = (image_feat_m @ text_all_m / temp).masked_fill(empty, float("-inf"))
                t_i2t = alpha * sim_m.softmax(1) + (1 - alpha) * pos
                sim_m = (text_feat_m @ image_all_m / temp).masked_fill(empty, float("-inf"))
                t_t2i = alpha * sim_m.softmax(1) + (1 - alpha) * pos
            else:
                t_i2t = t_t2i = pos
        sim_i2t = (image_feat @ text_all / temp).masked_fill(empty, float("-inf"))  # (B, B+Q)
        sim_t2i = (text_feat @ image_all / temp).masked_fill(empty, float("-inf"))  # (B, B+Q)
        # empty slots have -inf logits and zero targets: leave them out of the sum (0 * -inf = nan)
        loss_i2t = -(sim_i2t.log_softmax(1) * t_i2t).masked_fill(empty, 0).sum(1).mean()
        loss_t2i = -(sim_t2i.log_softmax(1) * t_t2i).masked_fill(empty, 0).sum(1).mean()
        return (loss_i2t + loss_t2i) / 2

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
        loss_i2t = -((image_feat @ text_feat.T / temp).log_softmax(1) * own).sum(1) / counts
        loss_t2i = F.cross_entropy(text_feat @ image_feat.T / temp, owner)
        return (loss_i2t.mean() + loss_t2i) / 2

    def itm_weights(self, sim_i2t, sim_t2i, same):
        """Weights of drawing each candidate as ITM negative, (w_i2t, w_t2i), (B, N) each: row i
        holds image i's texts / text i's images. Hard negatives (ALBEF 3.2): the softmax over the
        candidates of the ITC similarities sim_i2t, sim_t2i (B, N), plus cfg.itm_weight_eps
        (BLIP adds 1e-4), zero where `same` (B, N) marks a positive (every caption of the same
        image). Without cfg.itm_hard_negatives: every other candidate alike."""
        uniform = (~same).float()
        if not self.cfg.itm_hard_negatives:
            return uniform, uniform
        eps = self.cfg.itm_weight_eps
        w_i2t = (sim_i2t.softmax(1) + eps).masked_fill(same, 0)
        w_t2i = (sim_t2i.softmax(1) + eps).masked_fill(same, 0)
        # a row whose negatives all underflowed to 0 (a tiny temperature) draws uniformly
        return (torch.where(w_i2t.sum(1, keepdim=True) > 0, w_i2t, uniform),
                torch.where(w_t2i.sum(1, keepdim=True) > 0, w_t2i, uniform))

    def itm_loss(self, image_embeds, text_embeds, input_ids, attention_mask, sim_i2t, sim_t2i,
                 idx=None):
        """Image-text matching: each pair, plus for each text a negative image and for each image
        a negative text (itm_negatives, drawn by the ITC similarities sim_i2t, sim_t2i (B, N))."""
        B = image_embeds.shape[0]
        image_neg, text_neg, ids_neg, mask_neg, _ = self.itm_negatives(
            image_embeds, text_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, idx)
        T = text_neg.shape[1]           # negatives from other ranks come padded to max_len
        text_embeds = F.pad(text_embeds, (0, 0, 0, T - text_embeds.shape[1]))          # (B, T, D)
        input_ids = F.pad(input_ids, (0, T - input_ids.shape[1]), value=self.cfg.pad_id)
        attention_mask = F.pad(attention_mask, (0, T - attention_mask.shape[1]))      # (B, T)
        image_all = torch.cat([image_embeds, image_neg, image_embeds])                # (3B, L, D)
        text_all = torch.cat([text_embeds, text_embeds, text_neg])                    # (3B, T, D)
        ids_all = torch.cat([input_ids, input_ids, ids_neg])
        mask_all = torch.cat([attention_mask, attention_mask, mask_neg])
        logits = self.itm_logits(text_all, mask_all, image_all, ids_all)              # (3B, 2)
        labels = torch.zeros(3 * B, dtype=torch.long, device=logits.device)           # (3B,)
        labels[:B] = 1
        return F.cross_entropy(logits, labels)

    def itm_negatives(self, image_embeds, text_embeds, input_ids, attention_mask, sim_i2t,
                      sim_t2i, idx=None):
        """For each text a negative image, for each image a negative text, drawn by itm_weights;
        never one of the same image (idx). The candidates are the local batch, or with
        cfg.negative_all_rank every rank's batch, as BLIP's COCO fine-tuning (sim_* then span
        every rank's features): image and text embeddings gathered with their gradient (BLIP
        gathers only the images so; its text states are recomputed from the ids).
        Returns (image_neg (B, L, D), text_neg (B, T, D), ids_neg, mask_neg (B, T), and the
        drawn (neg_image, neg_text) rows of the candidates)."""
        B, everywhere = image_embeds.shape[0], self.cfg.negative_all_rank and distributed()
        gather = all_gather if everywhere else (lambda x: x)
        with torch.no_grad():
            if idx is None:     # each sample its own image, numbered apart on every rank
                idx = torch.arange(B, device=sim_i2t.device) + (dist.get_rank() * B if everywhere else 0)
            same = idx[:, None] == gather(idx)[None]                                  # (B, N)
            w_i2t, w_t2i = self.itm_weights(sim_i2t, sim_t2i, same)
            neg_image = torch.multinomial(w_t2i, 1).squeeze(1)                         # (B,)
            neg_text = torch.multinomial(w_i2t, 1).squeeze(1)                          # (B,)
        if everywhere:          # one text length on every rank
            T = self.cfg.max_len
            text_embeds = F.pad(text_embeds, (0, 0, 0, T - text_embeds.shape[1]))     # (B, T, D)
            input_ids = F.pad(input_ids, (0, T - input_ids.shape[1]), value=self.cfg.pad_id)
            attention_mask = F.pad(attention_mask, (0, T - attention_mask.shape[1]))
            image_embeds = all_gather_with_grad(image_embeds)                           # (N, L, D)
            text_embeds = all_gather_with_grad(text_embeds)                             # (N, T, D)
            input_ids, attention_mask = all_gather(input_ids), all_gather(attention_mask)
        return (image_embeds[neg_image], text_embeds[neg_text], input_ids[neg_text],
                attention_mask[neg_text], (neg_image, neg_text))

    def mask_tokens(self, input_ids):
        """BERT masking: 15% of tokens (never [PAD] or [CLS]); of those 80% [MASK], 10% a random
        token, 10% unchanged. Returns (masked ids, labels with -100 where not masked)."""
        cfg = self.cfg
        chosen = torch.bernoulli(torch.full(input_ids.shape, cfg.mlm_prob,
                                            device=input_ids.device)).bool()
        chosen &= (input_ids != cfg.pad_id) & (input_ids != cfg.cls_id)
        labels = input_ids.masked_fill(~chosen, -100)
        r = torch.rand(input_ids.shape, device=input_ids.device)
        ids = input_ids.masked_fill(chosen & (r < 0.8), cfg.mask_id)
        random_ids = torch.randint_like(input_ids, cfg.vocab_size)
        ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)
        return ids, labels

    def mlm_loss(self, input_ids, attention_mask, image_embeds, image_embeds_m, alpha):
        """Masked language modelling conditioned on the image (ALBEF), distilled from the
        momentum model's predictions when cfg.distill."""
        ids, labels = self.mask_tokens(input_ids)
        atts = image_embeds.new_ones(image_embeds.shape[:2], dtype=torch.long)
        hidden = self.text_encoder(ids, attention_mask, image_embeds, atts, mode="multimodal")
        logits = self.text_encoder.lm_logits(hidden)                            # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if not self.cfg.distill:
            return loss
        with torch.no_grad():
            atts_m = image_embeds_m.new_ones(image_embeds_m.shape[:2], dtype=torch.long)
            hidden_m = self.text_encoder_m(ids, attention_mask, image_embeds_m, atts_m,
                                           mode="multimodal")
            soft = self.text_encoder_m.lm_logits(hidden_m).softmax(-1)          # (B, T, V)
        # the mean over masked tokens, by weights rather than boolean indexing, whose unknown
        # output size would make the GPU wait for the host
        masked = (labels != -100).float()                                       # (B, T)
        distill = -((logits.log_softmax(-1) * soft).sum(-1) * masked).sum() / masked.sum()
        return (1 - alpha) * loss + alpha * distill

    def lm_loss(self, input_ids, attention_mask, image_embeds, prompt_len=0):
        """Captioning (BLIP): the causal decoder reads the image through cross-attention and
        predicts each next token; [PAD] and the first prompt_len tokens after the first carry no
        loss; label smoothing 0.1."""
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :1 + prompt_len] = -100
        hidden = self.decode(input_ids, attention_mask, image_embeds)
        logits = self.text_decoder.lm_logits(hidden)[:, :-1]                    # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                               label_smoothing=self.cfg.label_smoothing)


class MomentumStep:
    """The momentum encoders' bookkeeping, once per optimizer step however many micro-batches
    (gradient accumulation) the step has. take(out) keeps the momentum features of one
    micro-batch's forward (out["queue"]) and returns its losses; after_step(), trainer.fit's
    hook, moves the teacher towards the online weights just stepped and writes every
    micro-batch's features to the queues at once. ALBEF updates the teacher at the start of
    each forward and enqueues at its end, one batch per step: the same sequence. So all
    micro-batches of a step see the same teacher and queue, and the EMA keeps its momentum m
    (once per micro-batch it would be m ** grad_accum)."""

    def __init__(self, model: ELIPModel):
        self.model, self.pending = model, []

    def take(self, out: dict) -> dict:
        if "queue" in out:
            self.pending.append(out.pop("queue"))
        return out

    def after_step(self):
        if self.model.reads_momentum:
            self.model.momentum_update()
        if self.pending:
            image_feat, text_feat, idx = (torch.cat(t) for t in zip(*self.pending))  # (n*B, .)
            self.model.enqueue(image_feat, text_feat, idx)
            self.pending.clear()
