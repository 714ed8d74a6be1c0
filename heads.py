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

Every model takes the batch as data.collate makes it, a dict of named fields, and returns its
losses with "loss"; the training loop calls model.momentum_step(queued) after each optimizer
step, as it does for ELIPModel.
"""
import copy
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ELIPModel, build_text, build_vit
from pruning import TEXT_GUIDED, PruneConfig
from text_encoder import VOCAB_KEYS, grow_rows
from vit import PatchEmbed, interpolate_pos_embed


def mlp_head(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class FusionModel(nn.Module):
    """The online ViT and text/fusion encoder of ELIPModel, without projections, queues or MLM
    head; the base of the VQA, NLVR2 and SNLI-VE models. With distill, ALBEF's momentum
    distillation: a momentum (teacher) copy of the encoders and of the task's head, updated
    as theta_m <- m theta_m + (1 - m) theta once per optimizer step (momentum_update), whose
    softmax is a soft target beside the labels. The encoder copies carry the pre-training
    checkpoint's names (visual_encoder_m, text_encoder_m), so they load its momentum encoders
    as ALBEF's fine-tuning does; the head's copy starts equal to the fresh head. embed_layer:
    the ViTs' patch embedding, the pre-trained model's (world_aids.embed_layer), so that its
    weights load."""
    NEW_PARAMS = ()     # name fragments of parameters that pre-training does not have (heads)
    momentum_names = ()  # the modules that have a momentum copy (name + "_m")

    def __init__(self, cfg, distill=False, momentum=0.995, embed_layer=PatchEmbed):
        super().__init__()
        self.cfg, self.distill, self.momentum = cfg, distill, momentum
        self.embed_layer = embed_layer
        self.visual_encoder = build_vit(cfg, cfg.prune, embed_layer)
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
            copy_ = (build_vit(self.cfg, PruneConfig(method="none"), self.embed_layer)
                     if name == "visual_encoder" else copy.deepcopy(online))
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

    def momentum_step(self, queued: list):
        """Once per optimizer step, after it: with distill, the teacher moves towards the online
        weights just stepped (once per step, whatever the gradient accumulation, so the EMA
        keeps its rate). These models keep no queue, so `queued` is always empty."""
        if self.distill:
            self.momentum_update()

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

    def __init__(self, cfg, distill=False, momentum=0.995, embed_layer=PatchEmbed):
        super().__init__(cfg, distill, momentum, embed_layer)
        self.cls_head = mlp_head(2 * cfg.text_width, cfg.text_width, 2)
        if distill:
            self.add_momentum("cls_head")

    def logits(self, batch, momentum=False):
        """batch: "image0", "image1" (B, 3, H, W), "text_ids", "text_mask" (B, T) -> (B, 2)."""
        image0, image1 = batch["image0"], batch["image1"]
        input_ids, attention_mask = batch["text_ids"], batch["text_mask"]
        B = image0.shape[0]
        # one batched pass over both images: the text is encoded once and used twice
        text_embeds = self.encode_text(input_ids, attention_mask, momentum)
        text_embeds = text_embeds.repeat(2, 1, 1)                                  # (2B, T, D)
        ids, mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)             # (2B, T)
        image_embeds = self.encode_image(torch.cat([image0, image1]), text_embeds[:, 0], momentum)
        cls = self.fuse(text_embeds, mask, image_embeds, ids, momentum)[:, 0]      # (2B, D)
        head = self.cls_head_m if momentum else self.cls_head
        return head(torch.cat([cls[:B], cls[B:]], dim=1))                          # (B, 2)

    def forward(self, batch, alpha=0.0):
        """logits' batch and "label" (B,) -> {"nlvr", "kd" with distill, "loss"}."""
        return self.classification_loss("nlvr", self.logits(batch), batch["label"], alpha,
                                        lambda: self.logits(batch, momentum=True))


class VEModel(FusionModel):
    """SNLI-VE: fusion [CLS] -> MLP -> contradiction / neutral / entailment (as ALBEF)."""
    NEW_PARAMS = ("cls_head.", "cls_head_m.")

    def __init__(self, cfg, distill=False, momentum=0.995, embed_layer=PatchEmbed):
        super().__init__(cfg, distill, momentum, embed_layer)
        self.cls_head = mlp_head(cfg.text_width, cfg.text_width, 3)
        if distill:
            self.add_momentum("cls_head")

    def logits(self, batch, momentum=False):
        """batch: "image" (B, 3, H, W), "text_ids", "text_mask" (B, T) -> (B, 3)."""
        head = self.cls_head_m if momentum else self.cls_head
        return head(self.fused_cls(batch["image"], batch["text_ids"], batch["text_mask"],
                                   momentum))                                    # (B, 3)

    def forward(self, batch, alpha=0.0):
        """logits' batch and "label" (B,) -> {"ve", "kd" with distill, "loss"}."""
        return self.classification_loss("ve", self.logits(batch), batch["label"], alpha,
                                        lambda: self.logits(batch, momentum=True))


class CaptionModel(nn.Module):
    """Captioning (BLIP): the ViT and the causal decoder, which reads the image through
    cross-attention. Every caption starts with [CLS] ([DEC] in the decoder when cfg.blip_tokens)
    and the prompt ("a picture of "), whose positions carry no loss; generation continues the
    prompt, greedily or by beam search.

    With text-guided pruning the ViT needs a text [CLS], but no caption exists at test time: the
    guide is the unimodal text encoder's [CLS] of the prompt, in training and in generation alike.
    That encoder is then part of the model, frozen (pruning scores carry no gradient anyway)."""
    NEW_PARAMS = ("crossattention.", "text_decoder.cls.")   # an ALBEF checkpoint has neither

    def __init__(self, cfg, prompt_ids, sep_id, embed_layer=PatchEmbed):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg, cfg.prune, embed_layer)
        self.text_decoder = build_text(cfg, decoder=True)
        if cfg.prune.method in TEXT_GUIDED:
            self.text_encoder = build_text(cfg)
            self.text_encoder.requires_grad_(False)
        # [CLS] + prompt tokens, without [SEP]: the start of every caption (not a parameter)
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids)[None], persistent=False)
        self.sep_id = sep_id
        # never a word of a caption
        self.banned = [cfg.pad_id, cfg.cls_id, cfg.mask_id] + [i for i in (cfg.enc_id, cfg.dec_id)
                                                               if i >= 0]

    # ELIPModel's decoder methods: they read self.text_decoder and self.cfg only
    decode = ELIPModel.decode
    lm_loss = ELIPModel.lm_loss

    def encode_image(self, images):
        text_cls = None
        if hasattr(self, "text_encoder"):
            prompt = self.prompt_ids.expand(images.shape[0], -1)                  # (B, P)
            text_cls = self.text_encoder(prompt, None, mode="text")[:, 0]          # (B, D)
        return self.visual_encoder(images, text_cls)                              # (B, L', D)

    def momentum_step(self, queued: list):
        """Nothing to do: captioning fine-tunes without a teacher or a queue."""

    def forward(self, batch, alpha=0.0):
        """batch: "image" (B, 3, H, W), "text_ids" (B, T): [CLS] caption [SEP] [PAD]..., and
        "text_mask"; the prompt is inserted after [CLS]. Returns {"lm", "loss"}. alpha, the
        distillation weight every model's forward takes, has nothing to weigh here."""
        images, input_ids, attention_mask = batch["image"], batch["text_ids"], batch["text_mask"]
        B, P = input_ids.shape[0], self.prompt_ids.shape[1] - 1
        ids = torch.cat([self.prompt_ids.expand(B, -1), input_ids[:, 1:]], dim=1)   # (B, P+T)
        mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)    # (B, P+T)
        lm = self.lm_loss(ids, mask, self.encode_image(images), prompt_len=P)
        return {"lm": lm, "loss": lm}

    def token_log_probs(self, ids, image_embeds):
        """(B, L) ids -> (B, L, V): log-probabilities of the next token after each position."""
        logits = self.text_decoder.lm_logits(self.decode(ids, None, image_embeds))
        logits[..., self.banned] = float("-inf")
        return logits.log_softmax(-1)

    def next_log_probs(self, ids, image_embeds, min_length=0, repetition_penalty=1.0):
        """(N, L) ids -> (N, V) scores of the next token as BLIP's generate computes them (Hugging
        Face transformers 4.15 beam search): the log-softmax, then the logits processors on it,
        unnormalised: the repetition penalty on every token already in ids (a negative score
        multiplied by it, a positive one divided), and [SEP] forbidden while the sequence, prompt
        included, is shorter than min_length."""
        logp = self.token_log_probs(ids, image_embeds)[:, -1]                     # (N, V)
        if repetition_penalty != 1.0:
            seen = logp.gather(1, ids)                                             # (N, L)
            seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
            logp = logp.scatter(1, ids, seen)
        if ids.shape[1] < min_length:
            logp[:, self.sep_id] = float("-inf")
        return logp

    @torch.no_grad()
    def greedy(self, images, max_length=20, min_length=0, repetition_penalty=1.0):
        """The best next token at every step, until [SEP] or max_length tokens in all ([CLS] and
        the prompt count, as in BLIP). Returns (tokens (B, n) after the prompt, [PAD] after
        [SEP]; their summed score (B,))."""
        image_embeds = self.encode_image(images)
        B = images.shape[0]
        ids = self.prompt_ids.expand(B, -1)
        score = image_embeds.new_zeros(B)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        while ids.shape[1] < max_length and not done.all():
            logp, token = self.next_log_probs(ids, image_embeds, min_length,
                                              repetition_penalty).max(dim=-1)     # (B,)
            score = score + logp.masked_fill(done, 0.0)
            token = token.masked_fill(done, self.cfg.pad_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done = done | (token == self.sep_id)
        return ids[:, self.prompt_ids.shape[1]:], score

    @torch.no_grad()
    def beam_search(self, images, beam=3, max_length=20, min_length=0, length_penalty=1.0,
                    repetition_penalty=1.0):
        """Beam search as Hugging Face's (transformers 4.15), which BLIP's captioning calls with
        the prompt as input: `beam` running hypotheses per image chosen among the 2 x beam best
        extensions; an extension by [SEP] ranked within the first `beam` is set aside as finished
        (up to `beam` kept, by summed score / length ** length_penalty, the length counting
        [CLS] and the prompt but not [SEP]); an image is done when its worst finished hypothesis
        beats what its best extension could still reach at the current length, or at max_length
        tokens, when its running hypotheses join the finished ones. Returns the best finished
        hypothesis of each image as greedy() does (with its [SEP]), and its summed score."""
        B, K, P = images.shape[0], beam, self.prompt_ids.shape[1]
        image_embeds = self.encode_image(images).repeat_interleave(K, dim=0)    # (B*K, L', D)
        ids = self.prompt_ids.expand(B * K, -1)                                  # (B*K, P)
        # all K beams start as the same prompt: only the first may expand at step one
        score = torch.zeros(B, K, dtype=image_embeds.dtype, device=ids.device)
        score[:, 1:] = -1e9
        finished = [[] for _ in range(B)]      # per image: (normalised score, sum, tokens)
        done = [False] * B

        def add(b, tokens, total, length):
            finished[b].append((total / length ** length_penalty, total, tokens))
            finished[b].sort(key=lambda h: -h[0])
            del finished[b][K:]

        while ids.shape[1] < max_length and not all(done):
            L = ids.shape[1]
            logp = self.next_log_probs(ids, image_embeds, min_length, repetition_penalty)
            V = logp.shape[1]
            top, pick = (score.view(B * K, 1) + logp).view(B, K * V).topk(2 * K, dim=1)  # (B, 2K)
            top, parent, token = top.tolist(), (pick // V).tolist(), (pick % V).tolist()
            rows = [[0.0, b * K, self.cfg.pad_id] for b in range(B) for _ in range(K)]
            for b in range(B):
                if done[b]:
                    continue
                n = 0
                for rank in range(2 * K):
                    row = b * K + parent[b][rank]
                    if token[b][rank] == self.sep_id:
                        if rank < K:
                            add(b, ids[row].tolist() + [self.sep_id], top[b][rank], L)
                    else:
                        rows[b * K + n] = [top[b][rank], row, token[b][rank]]
                        n += 1
                    if n == K:
                        break
                worst = finished[b][-1][0] if len(finished[b]) == K else float("-inf")
                done[b] = worst >= max(top[b]) / L ** length_penalty
            new_score, rows_from, new_token = zip(*rows)
            score = torch.tensor(new_score, dtype=score.dtype, device=ids.device).view(B, K)
            ids = torch.cat([ids[list(rows_from)], torch.tensor(new_token, device=ids.device)[:, None]],
                            dim=1)                                                # (B*K, L+1)
        for b in range(B):
            if not done[b]:
                for k in range(K):
                    add(b, ids[b * K + k].tolist(), score[b, k].item(), ids.shape[1])
        best = [finished[b][0] for b in range(B)]
        n = max(len(h[2]) for h in best)
        tokens = torch.tensor([h[2] + [self.cfg.pad_id] * (n - len(h[2])) for h in best],
                              device=ids.device)                                  # (B, n)
        return tokens[:, P:], torch.tensor([h[1] for h in best], dtype=score.dtype, device=ids.device)


def load_pretrained(model, state):
    """Load a pre-training state dict into a downstream model, strictly, by name. Each parameter
    or buffer loads from the key of the same name. A decoder that pre-training did not have
    (ALBEF) loads from the text encoder's weights, its layer i from the encoder's layer
    i + model.decoder_from_layer (embeddings, self-attention, feed-forward, the MLM head as LM
    head, cross-attention where the encoder has it): 0 for captioning, the first fusion layer for
    ALBEF's VQA decoder. A momentum copy that the checkpoint lacks (a decoder's, a head's) loads
    as its online module does. A key found nowhere must be new by design (model.NEW_PARAMS, e.g.
    the heads). Position embeddings of a ViT (online and momentum) trained at another resolution
    are resized to ours (vit.interpolate_pos_embed: bicubic on the grid, [CLS] kept, as ALBEF and
    BLIP load their checkpoints for fine-tuning at 384 px); the tensors indexed by token id gain
    the rows of words added for fine-tuning (tasks.grow_vocabulary); any other shape mismatch is
    an error. Returns dict(loaded, initialised, unused, interpolated, grown) lists of keys:
    `unused` are the pre-training keys the task drops (queues, projections, ...),
    `interpolated` the resized position embeddings, `grown` the tensors with added rows."""
    ours = model.state_dict()
    has_decoder = any(k.startswith("text_decoder.") for k in state)
    offset = getattr(model, "decoder_from_layer", 0)

    def source(key):
        if key in state:
            return key
        module, _, rest = key.partition(".")
        online = source(module[:-2] + "." + rest) if module.endswith("_m") else None
        if module in ("text_decoder", "text_decoder_m") and not has_decoder:
            alt = module.replace("decoder", "encoder") + "." + re.sub(
                r"^encoder\.layer\.(\d+)\.", lambda m: f"encoder.layer.{int(m[1]) + offset}.", rest)
            return alt if alt in state else online
        return online

    sources = {k: source(k) for k in ours}
    initialised = [k for k, s in sources.items() if s is None]
    unexpected = [k for k in initialised if not any(p in k for p in getattr(model, "NEW_PARAMS", ()))]
    if unexpected:
        raise ValueError(f"the pre-training checkpoint lacks {len(unexpected)} weights of the "
                         f"{type(model).__name__}: {unexpected[:8]}")
    weights, interpolated, grown = {}, [], []
    for k, s in sources.items():
        if s is None:
            continue
        weights[k] = state[s]
        theirs, shape = state[s].shape, ours[k].shape
        if k.endswith("pos_embed") and theirs != shape and theirs[::2] == shape[::2]:
            weights[k] = interpolate_pos_embed(state[s], shape[1] - 1)   # (1, 1+M, D) -> (1, 1+M', D)
            interpolated.append(k)
        if k.endswith(VOCAB_KEYS) and theirs[1:] == shape[1:] and theirs[0] < shape[0]:
            weights[k] = grow_rows(state[s], ours[k])    # words added for fine-tuning
            grown.append(k)
        if weights[k].shape != ours[k].shape:
            raise ValueError(f"shape mismatch for {k} (checkpoint {s}): checkpoint "
                             f"{tuple(theirs)} vs model {tuple(shape)}")
    model.load_state_dict(weights, strict=False)
    used = set(sources.values())
    return dict(loaded=[k for k in ours if sources[k] is not None], initialised=initialised,
                unused=[k for k in state if k not in used], interpolated=interpolated,
                grown=grown)
