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
updated, with the queues written, once per optimizer step (momentum_step).
"""
import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pruning import PruneConfig
from text_encoder import BertConfig, TextEncoder, tie_to_encoder
from vit import PatchEmbed, VisionTransformer


@dataclass
class ModelConfig:
    # vision: a ViT (timm's names), pruned by ELIP in the online copy (prune, below)
    img_size: int = 64               # the image side in pixels
    patch_size: int = 8              # the side of a patch: M = (img_size / patch_size)^2 tokens
    vision_width: int = 128          # the ViT's token width
    vision_depth: int = 12           # the ViT's layers (ELIP cuts 12 into blocks of 2, 2, 6, 2)
    vision_heads: int = 4            # attention heads of every ViT layer
    drop_path: float = 0.0           # stochastic depth, rising to this in the last block
    # text: ALBEF splits one BERT into text_layers text-only and fusion_layers cross-attention
    # layers; BLIP (fusion_layers = 0 here) gives every layer cross-attention, used or skipped
    vocab_size: int = 0              # set from the tokenizer, as the five ids below
    pad_id: int = 0                  # [PAD]
    cls_id: int = 2                  # [CLS]
    mask_id: int = 4                 # [MASK]
    enc_id: int = -1                 # [ENC] and [DEC] (BLIP), -1 when the vocabulary lacks them
    dec_id: int = -1                 # (see enc_id)
    text_width: int = 128            # must equal vision_width for ELIP's fused [CLS] (Eq. 1)
    text_layers: int = 2             # BERT layers that read the text alone
    fusion_layers: int = 2           # ALBEF's layers with cross-attention to the image after them
    text_heads: int = 4              # attention heads of every BERT layer
    text_mlp: int = 512              # the feed-forward width of every BERT layer
    text_dropout: float = 0.1        # BERT's; 0 in the tiny preset, where, trained from scratch,
                                     # the dropout noise in the text [CLS] drowns its signal
    max_len: int = 32                # text tokens; a longer text is cut
    token_types: bool = True         # BERT's token-type embeddings (ALBEF); BLIP's BERT has none
    blip_tokens: bool = False        # BLIP: the image-grounded encoder reads [ENC] and the decoder
                                     # [DEC] in place of [CLS]; the text encoder keeps [CLS]
    tie_decoder: bool = False        # BLIP: the decoder shares the text encoder's embeddings,
                                     # cross-attention and feed-forward (own self-attention, LM head)
    # objectives, in the paper's order: ITC, ITM, then MLM (ALBEF) or LM (BLIP)
    losses: tuple[str, ...] = ("itc", "itm", "mlm")    # ALBEF: itc, itm, mlm; BLIP: itc, itm, lm
    embed_dim: int = 64              # joint ITC space
    queue_size: int = 1024           # ITC's queue of momentum features (ALBEF 65,536)
    momentum: float = 0.995          # the momentum encoders' EMA rate, once per optimizer step
    temp: float = 0.07               # ITC's initial temperature (learnt, clamped to [0.001, 0.5])
    mlm_prob: float = 0.15           # the share of text tokens MLM masks
    distill: bool = True             # momentum distillation of ITC and MLM targets (ALBEF)
    itm_weight_eps: float = 0.0      # added to every hard-negative weight (BLIP 1e-4, ALBEF 0)
    negative_all_rank: bool = False  # ITM negatives drawn from every DDP rank's batch (BLIP's
                                     # COCO retrieval fine-tuning), not the local batch only
    itm_online_candidates: bool = False  # ITM negatives weighed by online image x online text
                                     # similarities (BLIP's retrieval fine-tuning), not ITC's
    label_smoothing: float = 0.1     # LM loss (BLIP)
    prune: PruneConfig = field(default_factory=PruneConfig)
    # this project's options for a model trained from random weights (the tiny preset); the
    # paper presets keep ALBEF's and BLIP's choices
    init_std: float = 0.02           # std of random initial weights, both encoders (timm, BERT);
                                     # see PRESETS["tiny"] for why it is larger there
    itm_hard_negatives: bool = True  # ITM negatives drawn by ITC similarity (ALBEF), or uniformly

    def __post_init__(self):
        if isinstance(self.prune, dict):
            self.prune = PruneConfig(**self.prune)
        self.losses = tuple(self.losses)
        self.prune.check(self.vision_depth)
        bad = set(self.losses) - {"itc", "itm", "mlm", "lm"}
        if bad or not self.losses:
            raise ValueError(f"losses {self.losses}: choose from itc, itm, mlm, lm")
        if (self.blip_tokens or self.tie_decoder) and self.fusion_layers > 0:
            raise ValueError("blip_tokens and tie_decoder are BLIP's: they need fusion_layers 0 "
                             "(cross-attention in every layer of the text encoder)")
        if self.text_width != self.vision_width and self.prune.method in ("elip", "elip_inline"):
            raise ValueError(f"text_width {self.text_width} differs from vision_width "
                             f"{self.vision_width}: ELIP fuses the two [CLS] tokens (Eq. 1)")


# Architecture presets; the training scripts add their own (batch, learning rate, steps).
PRESETS = {
    # tiny: trained from scratch in minutes, where ALBEF's teacher-based ITC collapses (its
    # in-batch candidates become the online features: world_aids.py): no queue (stale features
    # of an untrained teacher are negatives that all features escape together), no distillation
    # (an untrained teacher's soft targets are uniform and pull every feature together). And
    # init_std 0.1:
    # with BERT's 0.02, every caption's [CLS] starts as nearly the same vector (cosine 0.9998
    # between captions: the attention's small weights barely mix the words in), ITC's gradient
    # is as small as those differences, and MLM's far larger gradients on the shared text layers
    # set Adam's step size, so ITC sat at log(batch) for hundreds of steps. At 0.1 the captions
    # start apart (cosine about 0.88) and ITC learns from the first epoch. ITM's negatives are
    # drawn uniformly: once ITC works, its hardest negatives are captions nearly (or, for the
    # world's counts, exactly) true of the image, and ITM from scratch never left chance on them.
    # The training script adds the embedded world's aids to this preset (world_aids.py).
    "tiny": dict(tome_r=3, text_dropout=0.0, momentum=0.99, queue_size=0, distill=False,
                 init_std=0.1, itm_hard_negatives=False),
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


def build_vit(cfg, prune, embed_layer=PatchEmbed):
    """The ViT of cfg, reducing tokens by `prune`; embed_layer turns images into patch tokens
    (timm's name: ViT's linear one, or the embedded world's convolutional stem)."""
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size,
                             embed_dim=cfg.vision_width, depth=cfg.vision_depth,
                             num_heads=cfg.vision_heads, drop_path_rate=cfg.drop_path, prune=prune,
                             init_std=cfg.init_std, embed_layer=embed_layer)


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
        grad = grad.contiguous().clone()    # all_reduce works in place: autograd owns `grad`
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def all_gather_with_grad(x):
    """Concatenate x from every DDP rank along dim 0, gradient flowing back to each rank's x."""
    return GatherWithGrad.apply(x) if distributed() else x


def similarity(a: torch.Tensor, b: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """a (B, E), b (E, N) -> a @ b / temp (B, N) in fp32, also under autocast: at 1 / temp of
    14 and more, bf16's spacing would coarsen the softmax over tens of thousands of candidates."""
    if not torch.amp.is_autocast_available(a.device.type):      # meta: no autocast to leave
        return a.float() @ b.float() / temp.float()
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float() / temp.float()


class ELIPModel(nn.Module):

    def __init__(self, cfg: ModelConfig, embed_layer=PatchEmbed):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set from the tokenizer")
        if cfg.blip_tokens and not (0 <= cfg.enc_id < cfg.vocab_size and
                                    0 <= cfg.dec_id < cfg.vocab_size):
            raise ValueError(f"blip_tokens needs [ENC] and [DEC] in the vocabulary (enc_id "
                             f"{cfg.enc_id}, dec_id {cfg.dec_id}, vocab_size {cfg.vocab_size})")
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg, cfg.prune, embed_layer)
        self.text_encoder = build_text(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.build_extra_heads(cfg)
        self.text_decoder = build_text(cfg, decoder=True) if "lm" in cfg.losses else None
        if self.text_decoder is not None and cfg.tie_decoder:
            tie_to_encoder(self.text_decoder, self.text_encoder)
        # momentum (teacher) copies: updated by EMA, never by gradient, and never pruned
        self.visual_encoder_m = build_vit(cfg, PruneConfig(method="none"), embed_layer)
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

    def build_extra_heads(self, cfg: ModelConfig):
        """Heads a subclass adds beside ITM's (the world's object head, world_aids.py), built at
        this point so that every random initial weight comes in one fixed order. ELIP has none."""

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
        candidates = "itc" in c.losses or "itm" in c.losses
        return itc or candidates or ("mlm" in c.losses and c.distill)

    @torch.no_grad()
    def momentum_update(self):
        """theta_m <- m * theta_m + (1 - m) * theta, as ALBEF's _momentum_update computes it, in
        two foreach kernels over all tensors instead of two small kernels per tensor."""
        m, pairs = self.cfg.momentum, self.online_momentum_pairs()
        online = [p for o, _ in pairs for p in o.parameters()]
        teacher = [p for _, t in pairs for p in t.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, online, alpha=1 - m)

    @torch.no_grad()
    def momentum_step(self, queued: list):
        """Once per optimizer step, after it, however many micro-batches (gradient accumulation)
        the step had: the teacher moves towards the online weights just stepped, and every
        micro-batch's momentum features (`queued`, the "queue" entries of their forwards) go to
        the queues at once. ALBEF updates the teacher at the start of each forward and enqueues
        at its end, one batch per step: the same sequence. So all micro-batches of a step see
        the same teacher and queue, and the EMA keeps its momentum m (once per micro-batch it
        would be m ** grad_accum)."""
        if self.reads_momentum:
            self.momentum_update()
        if queued:
            self.enqueue(*(torch.cat(t) for t in zip(*queued)))                  # (n*B, .)

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
        self.image_queue[:, slots] = image_feat.T.to(self.image_queue.dtype)   # bf16 under amp
        self.text_queue[:, slots] = text_feat.T.to(self.text_queue.dtype)
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

    # ---- the pre-training step: ITC, ITM, then MLM (ALBEF) or LM (BLIP) ---------------------
    def forward(self, batch: dict, alpha: float = 0.4) -> dict:
        """batch: "image" (B, 3, H, W), "text_ids" and "text_mask" (B, T), and "image_id" (B,)
        where several captions share an image (retrieval fine-tuning). Returns a dict of the
        active losses (scalars) and "loss", their sum; with a queue, also "queue": this batch's
        momentum features and ids, which momentum_step writes to the queues once per optimizer
        step (the forward changes no state of the model)."""
        enc = self.encode(batch)
        out = self.losses(batch, enc, alpha)
        out["loss"] = sum(out.values())
        if "itc" in self.cfg.losses and self.cfg.queue_size > 0:
            ids = batch.get("image_id", torch.full_like(batch["text_ids"][:, 0], -1))  # (B,)
            out["queue"] = (enc["image_feat_m"], enc["text_feat_m"], ids)
        return out

    def encode(self, batch: dict) -> dict:
        """The unimodal encoders, text first: {"text_embeds" (B, T, Dt), "image_embeds" (B, L, Dv)
        of the pruned ViT, "sources" (vit.forward_features), the normalised ITC features
        "image_feat", "text_feat" (B, E), and the teacher's "image_embeds_m", "image_feat_m",
        "text_feat_m" (all tokens; None when no loss reads them)}."""
        ids, mask = batch["text_ids"], batch["text_mask"]
        text_embeds = self.encode_text(ids, mask)                                 # (B, T, Dt)
        # ELIP: the text [CLS], unprojected, guides the ViT's pruning (Eq. 1); the ViT scores
        # tokens without gradient, so nothing flows back to the text through this path
        image_embeds, sources = self.visual_encoder.forward_features(batch["image"],
                                                                     text_embeds[:, 0])
        enc = dict(text_embeds=text_embeds, image_embeds=image_embeds, sources=sources,
                   image_feat=self.image_feat(image_embeds), text_feat=self.text_feat(text_embeds),
                   image_embeds_m=None, image_feat_m=None, text_feat_m=None)
        if self.reads_momentum:
            with torch.no_grad():
                image_embeds_m = self.encode_image(batch["image"], momentum=True)   # all tokens
                text_embeds_m = self.encode_text(ids, mask, momentum=True)
                enc.update(image_embeds_m=image_embeds_m,
                           image_feat_m=self.image_feat(image_embeds_m, momentum=True),
                           text_feat_m=self.text_feat(text_embeds_m, momentum=True))
        return enc

    def losses(self, batch: dict, enc: dict, alpha: float) -> dict:
        """{name: loss} of the active objectives, in the paper's order."""
        cfg, ids, mask, out = self.cfg, batch["text_ids"], batch["text_mask"], {}
        if "itc" in cfg.losses:
            out["itc"] = self.itc(batch, enc, alpha)
        if "itm" in cfg.losses:
            sim_i2t, sim_t2i = self.itm_similarities(enc)
            out["itm"] = self.itm_loss(enc["image_embeds"], enc["text_embeds"], ids, mask,
                                       sim_i2t, sim_t2i, batch.get("image_id"))
        if "mlm" in cfg.losses:
            out["mlm"] = self.mlm_loss(ids, mask, enc["image_embeds"], enc["image_embeds_m"], alpha)
        if "lm" in cfg.losses:
            out["lm"] = self.lm_loss(ids, mask, enc["image_embeds"])
        return out

    def itc(self, batch: dict, enc: dict, alpha: float) -> torch.Tensor:
        return self.itc_loss(enc["image_feat"], enc["text_feat"], enc["image_feat_m"],
                             enc["text_feat_m"], alpha, batch.get("image_id"))

    @torch.no_grad()
    def itm_similarities(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's similarities as ITC computes them (ALBEF, BLIP), (sim_i2t, sim_t2i): online
        image against ITC's candidate texts, the momentum ones, online text against the candidate
        images; they weigh ITM's hard negatives. BLIP's retrieval fine-tuning compares online
        with online features instead (cfg.itm_online_candidates, negative_all_rank)."""
        image_feat, text_feat = enc["image_feat"], enc["text_feat"]
        image_c, text_c = enc["image_feat_m"], enc["text_feat_m"]
        if self.cfg.negative_all_rank and distributed():
            # BLIP's COCO retrieval: every rank's online features are candidates
            image_c, text_c = all_gather(image_feat), all_gather(text_feat)          # (N, E)
        elif self.cfg.itm_online_candidates:     # BLIP's retrieval on one rank's batch
            image_c, text_c = image_feat, text_feat                                  # (B, E)
        temp = self.temp.clamp(0.001, 0.5)
        return similarity(image_feat, text_c.T, temp), similarity(text_feat, image_c.T, temp)

    def itc_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx=None):
        """Image-text contrastive loss over the batch and the queues, with soft targets
        alpha * softmax(momentum similarity) + (1 - alpha) * ground truth (ALBEF Eq. 2-3)."""
        temp = self.temp.clamp(0.001, 0.5)
        B = image_feat.shape[0]
        # ALBEF compares the online features with momentum ones only, so each side learns from
        # the other's slow teacher (the candidates: the batch's momentum features, then the queue)
        image_all = torch.cat([image_feat_m.T, self.image_queue], dim=1)          # (E, B+Q)
        text_all = torch.cat([text_feat_m.T, self.text_queue], dim=1)             # (E, B+Q)
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
                sim_m = similarity(image_feat_m, text_all_m, temp).masked_fill(empty, float("-inf"))
                t_i2t = alpha * sim_m.softmax(1) + (1 - alpha) * pos
                sim_m = similarity(text_feat_m, image_all_m, temp).masked_fill(empty, float("-inf"))
                t_t2i = alpha * sim_m.softmax(1) + (1 - alpha) * pos
            else:
                t_i2t = t_t2i = pos
        sim_i2t = similarity(image_feat, text_all, temp).masked_fill(empty, float("-inf"))
        sim_t2i = similarity(text_feat, image_all, temp).masked_fill(empty, float("-inf"))
        # empty slots have -inf logits and zero targets: leave them out of the sum (0 * -inf = nan)
        loss_i2t = -(sim_i2t.log_softmax(1) * t_i2t).masked_fill(empty, 0).sum(1).mean()
        loss_t2i = -(sim_t2i.log_softmax(1) * t_t2i).masked_fill(empty, 0).sum(1).mean()
        return (loss_i2t + loss_t2i) / 2

    def itm_weights(self, sim_i2t, sim_t2i, same):
        """Weights of drawing each candidate as ITM negative, (w_i2t, w_t2i), (B, N) each: row i
        holds image i's texts / text i's images. Hard negatives (ALBEF 3.2): the softmax over the
        candidates of the ITC similarities sim_i2t, sim_t2i (B, N), plus cfg.itm_weight_eps
        (BLIP adds 1e-4), zero where `same` (B, N) marks a positive (every caption of the same
        image). Without cfg.itm_hard_negatives: every other candidate alike."""
        uniform = (~same).float()
        # a batch of one image's captions alone has no negative: any candidate is drawn (a
        # positive then scored as a negative), not a crash; only tiny batches meet this
        uniform = torch.where(uniform.sum(1, keepdim=True) > 0, uniform, torch.ones_like(uniform))
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
