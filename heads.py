"""
Downstream models on the pre-trained encoders: the fusion base of VQA (vqa.py), NLVR2 and SNLI-VE
with ALBEF's momentum distillation, captioning (retrieval fine-tunes ELIPModel itself), and the
strict loader of pre-trained weights.

Fine-tuning reuses the pre-trained encoders under the same parameter names, so the weights load
by name (load_pretrained). Retrieval is ELIPModel itself with losses ("itc", "itm") and `idx`
marking captions of the same image as positives. The other tasks read the fusion encoder's
[CLS] (VQA, NLVR2, SNLI-VE) or fine-tune the decoder (captioning). Token pruning follows
cfg.prune: train_downstream.py sets method "none" unless asked, as the paper fine-tunes on all
tokens. When the pruning is text-guided, every forward pass runs the text encoder first and
hands its [CLS] to the ViT, as ELIPModel.forward does.
"""
import copy
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ELIPModel, build_text, build_vit
from pruning import TEXT_GUIDED, PruneConfig


def mlp_head(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class FusionModel(nn.Module):
    """The online ViT and text/fusion encoder of ELIPModel, without projections, queues or MLM
    head; the base of the VQA, NLVR2 and SNLI-VE models. With distill, ALBEF's momentum
    distillation: a momentum (teacher) copy of the encoders and of the task's head, updated
    as theta_m <- m theta_m + (1 - m) theta once per optimizer step (momentum_update), whose
    softmax is a soft target beside the labels. The encoder copies carry the pre-training
    checkpoint's names (visual_encoder_m, text_encoder_m), so they load its momentum encoders
    as ALBEF's fine-tuning does; the head's copy starts equal to the fresh head."""
    NEW_PARAMS = ()     # name fragments of parameters that pre-training does not have (heads)
    momentum_names = ()  # the modules that have a momentum copy (name + "_m")

    def __init__(self, cfg, distill=False, momentum=0.995):
        super().__init__()
        self.cfg, self.distill, self.momentum = cfg, distill, momentum
        self.visual_encoder = build_vit(cfg, cfg.prune)
        self.text_encoder = build_text(cfg)

    # ELIPModel's methods for its encoders, shared as they are: they read only self.cfg and the
    # (momentum) ViT and text encoder
    encode_text = ELIPModel.encode_text
    encode_image = ELIPModel.encode_image
    fuse = ELIPModel.fuse

    def add_momentum(self, *heads):
        """Momentum copies of the encoders and of `heads` (module names), frozen. The ViT's copy
        never prunes, as the teacher of pre-training."""
        self.momentum_names = ("visual_encoder", "text_encoder", *heads)
        for name in self.momentum_names:
            online = getattr(self, name)
            copy_ = build_vit(self.cfg, PruneConfig(method="none")) if name == "visual_encoder" \
                else copy.deepcopy(online)
            copy_.load_state_dict(online.state_dict())
            copy_.requires_grad_(False)
            setattr(self, name + "_m", copy_)

    @torch.no_grad()
    def momentum_update(self):
        """theta_m <- m * theta_m + (1 - m) * theta, for every module with a momentum copy."""
        for name in self.momentum_names:
            for p, p_m in zip(getattr(self, name).parameters(),
                              getattr(self, name + "_m").parameters()):
                p_m.lerp_(p, 1.0 - self.momentum)

    def fused_states(self, images, input_ids, attention_mask, momentum=False):
        """The fusion encoder's output (B, T, D) for B (image, text) pairs; text first (ELIP)."""
        text_embeds = self.encode_text(input_ids, attention_mask, momentum)        # (B, T, D)
        image_embeds = self.encode_image(images, text_embeds[:, 0], momentum)      # (B, L', D)
        return self.fuse(text_embeds, attention_mask, image_embeds, input_ids, momentum)

    def fused_cls(self, images, input_ids, attention_mask, momentum=False):
        return self.fused_states(images, input_ids, attention_mask, momentum)[:, 0]  # (B, D)

    def classification_loss(self, name, logits, labels, alpha, teacher):
        """Cross-entropy; with distill, ALBEF's (1 - alpha) CE + alpha KD, KD the cross-entropy
        against the momentum model's softmax (model_ve.py:78-79, model_nlvr.py). teacher():
        the momentum model's logits, run only when distilling."""
        ce = F.cross_entropy(logits, labels)
        if not self.distill:
            return {name: ce, "loss": ce}
        with torch.no_grad():
            soft = teacher().softmax(dim=1)                                         # (B, C)
        kd = -(logits.log_softmax(dim=1) * soft).sum(dim=1).mean()
        return {name: ce, "kd": kd, "loss": (1 - alpha) * ce + alpha * kd}


class NLVRModel(FusionModel):
    """NLVR2: the sentence is fused with each image separately, and the two fusion [CLS] are
    concatenated and classified true/false. ALBEF instead adds fusion layers that attend to both
    images at once (and a text-assignment pre-training step); this keeps the pre-trained
    architecture unchanged."""
    NEW_PARAMS = ("cls_head.", "cls_head_m.")

    def __init__(self, cfg, distill=False, momentum=0.995):
        super().__init__(cfg, distill, momentum)
        self.cls_head = mlp_head(2 * cfg.text_width, cfg.text_width, 2)
        if distill:
            self.add_momentum("cls_head")

    def logits(self, image0, image1, input_ids, attention_mask, momentum=False):
        B = image0.shape[0]
        # one batched pass over both images: the text is encoded once and used twice
        text_embeds = self.encode_text(input_ids, attention_mask, momentum)
        text_embeds = text_embeds.repeat(2, 1, 1)                                  # (2B, T, D)
        ids, mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)             # (2B, T)
        image_embeds = self.encode_image(torch.cat([image0, image1]), text_embeds[:, 0], momentum)
        cls = self.fuse(text_embeds, mask, image_embeds, ids, momentum)[:, 0]      # (2B, D)
        head = self.cls_head_m if momentum else self.cls_head
        return head(torch.cat([cls[:B], cls[B:]], dim=1))                          # (B, 2)

    def forward(self, image0, image1, input_ids, attention_mask, labels, alpha=0.0):
        inputs = (image0, image1, input_ids, attention_mask)
        return self.classification_loss("nlvr", self.logits(*inputs), labels, alpha,
                                        lambda: self.logits(*inputs, momentum=True))


class VEModel(FusionModel):
    """SNLI-VE: fusion [CLS] -> MLP -> contradiction / neutral / entailment (as ALBEF)."""
    NEW_PARAMS = ("cls_head.", "cls_head_m.")

    def __init__(self, cfg, distill=False, momentum=0.995):
        super().__init__(cfg, distill, momentum)
        self.cls_head = mlp_head(cfg.text_width, cfg.text_width, 3)
        if distill:
            self.add_momentum("cls_head")

    def logits(self, images, input_ids, attention_mask, momentum=False):
        head = self.cls_head_m if momentum else self.cls_head
        return head(self.fused_cls(images, input_ids, attention_mask, momentum))   # (B, 3)

    def forward(self, images, input_ids, attention_mask, labels, alpha=0.0):
        inputs = (images, input_ids, attention_mask)
        return self.classification_loss("ve", self.logits(*inputs), labels, alpha,
                                        lambda: self.logits(*inputs, momentum=True))


class CaptionModel(nn.Module):
    """Captioning (BLIP): the ViT and the causal decoder, which reads the image through
    cross-attention. Every caption starts with [CLS] and the prompt ("a picture of "), whose
    positions carry no loss; generation continues the prompt, greedily or by beam search.

    With text-guided pruning the ViT needs a text [CLS], but no caption exists at test time: the
    guide is the unimodal text encoder's [CLS] of the prompt, in training and in generation alike.
    That encoder is then part of the model, frozen (pruning scores carry no gradient anyway)."""
    NEW_PARAMS = ("crossattention.", "text_decoder.cls.")   # an ALBEF checkpoint has neither

    def __init__(self, cfg, prompt_ids, sep_id):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg, cfg.prune)
        self.text_decoder = build_text(cfg, decoder=True)
        if cfg.prune.method in TEXT_GUIDED:
            self.text_encoder = build_text(cfg)
            self.text_encoder.requires_grad_(False)
        # [CLS] + prompt tokens, without [SEP]: the start of every caption (not a parameter)
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids)[None], persistent=False)
        self.sep_id = sep_id
        self.banned = [cfg.pad_id, cfg.cls_id, cfg.mask_id]     # never a word of a caption

    lm_loss = ELIPModel.lm_loss      # reads self.text_decoder and self.cfg only

    def encode_image(self, images):
        text_cls = None
        if hasattr(self, "text_encoder"):
            prompt = self.prompt_ids.expand(images.shape[0], -1)                  # (B, P)
            text_cls = self.text_encoder(prompt, None, mode="text")[:, 0]          # (B, D)
        return self.visual_encoder(images, text_cls)                              # (B, L', D)

    def forward(self, images, input_ids, attention_mask):
        """input_ids (B, T): [CLS] caption [SEP] [PAD]...; the prompt is inserted after [CLS]."""
        B, P = input_ids.shape[0], self.prompt_ids.shape[1] - 1
        ids = torch.cat([self.prompt_ids.expand(B, -1), input_ids[:, 1:]], dim=1)   # (B, P+T)
        mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)    # (B, P+T)
        lm = self.lm_loss(ids, mask, self.encode_image(images), prompt_len=P)
        return {"lm": lm, "loss": lm}

    def token_log_probs(self, ids, image_embeds):
        """(B, L) ids -> (B, L, V): log-probabilities of the next token after each position."""
        hidden = self.text_decoder(ids, None, image_embeds, None, mode="multimodal", causal=True)
        logits = self.text_decoder.lm_logits(hidden)
        logits[..., self.banned] = float("-inf")
        return logits.log_softmax(-1)

    @torch.no_grad()
    def greedy(self, images, max_new_tokens=20):
        """The most likely next token at every step. Returns (tokens (B, n) after the prompt,
        [PAD] after [SEP]; their summed log-probability (B,))."""
        image_embeds = self.encode_image(images)
        B = images.shape[0]
        ids = self.prompt_ids.expand(B, -1)
        score = image_embeds.new_zeros(B)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logp, token = self.token_log_probs(ids, image_embeds)[:, -1].max(dim=-1)   # (B,)
            score = score + logp.masked_fill(done, 0.0)
            token = token.masked_fill(done, self.cfg.pad_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done = done | (token == self.sep_id)
            if done.all():
                break
        return ids[:, self.prompt_ids.shape[1]:], score

    @torch.no_grad()
    def beam_search(self, images, beam=3, max_new_tokens=20, length_penalty=0.0):
        """Beam search over summed log-probabilities, all B x beam hypotheses in one batch; a
        finished hypothesis (it produced [SEP]) is extended by [PAD] at no cost. The best of the
        final beams is the one whose sum divided by its length ([CLS], prompt and tokens up to
        [SEP]) ** length_penalty is highest: 0 takes the likeliest, 1 is Hugging Face's default,
        which BLIP's beam search uses (a plain sum favours short, generic captions). Returns that
        hypothesis of each image as greedy() does, with its summed log-probability."""
        B, K = images.shape[0], beam
        image_embeds = self.encode_image(images).repeat_interleave(K, dim=0)    # (B*K, L', D)
        ids = self.prompt_ids.expand(B * K, -1)                                  # (B*K, P+1)
        V = self.cfg.vocab_size
        # all K beams start as the same prompt: only the first may expand at step one
        score = torch.full((B, K), float("-inf"), device=ids.device)
        score[:, 0] = 0.0
        done = torch.zeros(B * K, dtype=torch.bool, device=ids.device)
        finished = torch.full((V,), float("-inf"), device=ids.device)
        finished[self.cfg.pad_id] = 0.0
        for _ in range(max_new_tokens):
            logp = self.token_log_probs(ids, image_embeds)[:, -1]                   # (B*K, V)
            logp = torch.where(done[:, None], finished, logp)
            total = (score.view(B * K, 1) + logp).view(B, K * V)                    # (B, K*V)
            score, pick = total.topk(K, dim=1)                                      # (B, K)
            parent = (torch.arange(B, device=ids.device)[:, None] * K + pick // V).flatten()
            token = (pick % V).flatten()                                            # (B*K,)
            ids = torch.cat([ids[parent], token[:, None]], dim=1)
            done = done[parent] | (token == self.sep_id)
            if done.all():
                break
        length = (ids != self.cfg.pad_id).sum(dim=1).view(B, K)                    # (B, K)
        best = (score / length ** length_penalty).argmax(dim=1)                    # (B,)
        ids = ids.view(B, K, -1)[torch.arange(B, device=ids.device), best]          # (B, P+1+n)
        return ids[:, self.prompt_ids.shape[1]:], score.gather(1, best[:, None]).squeeze(1)


def load_pretrained(model, state):
    """Load a pre-training state dict into a downstream model, strictly, by name. Each parameter
    or buffer loads from the key of the same name. A decoder that pre-training did not have
    (ALBEF) loads from the text encoder's weights, its layer i from the encoder's layer
    i + model.decoder_from_layer (embeddings, self-attention, feed-forward, the MLM head as LM
    head, cross-attention where the encoder has it): 0 for captioning, the first fusion layer for
    ALBEF's VQA decoder. A momentum copy that the checkpoint lacks (a decoder's, a head's) loads
    as its online module does. A key found nowhere must be new by design (model.NEW_PARAMS, e.g.
    the heads); a shape mismatch is an error. Returns dict(loaded, initialised, unused) lists of
    keys: `unused` are the pre-training keys the task drops (queues, projections, ...)."""
    ours = model.state_dict()
    has_decoder = any(k.startswith("text_decoder.") for k in state)
    offset = getattr(model, "decoder_from_layer", 0)

    def source(key):
        if key in state:
            return key
        module, _, rest = key.partition(".")
        if module in ("text_decoder", "text_decoder_m") and not has_decoder:
            rest = re.sub(r"^encoder\.layer\.(\d+)\.",
                          lambda m: f"encoder.layer.{int(m[1]) + offset}.", rest)
            alt = module.replace("decoder", "encoder") + "." + rest
            return alt if alt in state else None
        return source(module[:-2] + "." + rest) if module.endswith("_m") else None

    sources = {k: source(k) for k in ours}
    initialised = [k for k, s in sources.items() if s is None]
    unexpected = [k for k in initialised if not any(p in k for p in getattr(model, "NEW_PARAMS", ()))]
    if unexpected:
        raise ValueError(f"the pre-training checkpoint lacks {len(unexpected)} weights of the "
                         f"{type(model).__name__}: {unexpected[:8]}")
    for k, s in sources.items():
        if s is not None and state[s].shape != ours[k].shape:
            raise ValueError(f"shape mismatch for {k} (checkpoint {s}): checkpoint "
                             f"{tuple(state[s].shape)} vs model {tuple(ours[k].shape)}")
    model.load_state_dict({k: state[s] for k, s in sources.items() if s is not None}, strict=False)
    used = set(sources.values())
    return dict(loaded=[k for k in ours if sources[k] is not None], initialised=initialised,
                unused=[k for k in state if k not in used])
