"""
Downstream models on the pre-trained encoders: VQA, NLVR2, SNLI-VE and captioning (retrieval
fine-tunes ELIPModel itself), and the strict loader of pre-trained weights.

Fine-tuning reuses the pre-trained encoders under the same parameter names, so the weights load
by name (load_pretrained). Retrieval is ELIPModel itself with losses ("itc", "itm") and `idx`
marking captions of the same image as positives. The other tasks read the fusion encoder's
[CLS] (VQA, NLVR2, SNLI-VE) or fine-tune the decoder (captioning). Token pruning follows
cfg.prune: train_downstream.py sets method "none" unless asked, as the paper fine-tunes on all
tokens. When the pruning is text-guided, every forward pass runs the text encoder first and
hands its [CLS] to the ViT, as ELIPModel.forward does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ELIPModel, build_text, build_vit
from pruning import TEXT_GUIDED


def mlp_head(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class FusionModel(nn.Module):
    """The online ViT and text/fusion encoder of ELIPModel, without projections, momentum copies,
    queues or MLM head; the base of the VQA, NLVR2 and SNLI-VE models."""
    NEW_PARAMS = ()     # name fragments of parameters that pre-training does not have (heads)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg, cfg.prune)
        self.text_encoder = build_text(cfg)

    # ELIPModel's methods for its online encoders, shared as they are: they read only self.cfg,
    # self.visual_encoder and self.text_encoder
    encode_text = ELIPModel.encode_text
    encode_image = ELIPModel.encode_image
    fuse = ELIPModel.fuse

    def fused_cls(self, images, input_ids, attention_mask):
        """The fusion encoder's [CLS] (B, D) for B (image, text) pairs; text first (ELIP)."""
        text_embeds = self.encode_text(input_ids, attention_mask)                # (B, T, D)
        image_embeds = self.encode_image(images, text_embeds[:, 0])              # (B, L', D)
        return self.fuse(text_embeds, attention_mask, image_embeds, input_ids)[:, 0]


class VQAModel(FusionModel):
    """VQA as classification over the answer list (BUTD-style), trained with binary cross-entropy
    on the VQA soft scores. ALBEF and BLIP instead rank the answer list with an answer decoder;
    the classifier is smaller and trains in minutes on a CPU, at the cost of never answering
    outside the list."""
    NEW_PARAMS = ("vqa_head.",)

    def __init__(self, cfg, num_answers):
        super().__init__(cfg)
        self.vqa_head = mlp_head(cfg.text_width, 2 * cfg.text_width, num_answers)

    def logits(self, images, input_ids, attention_mask):
        return self.vqa_head(self.fused_cls(images, input_ids, attention_mask))  # (B, A)

    def forward(self, images, input_ids, attention_mask, targets):
        """targets (B, A): the soft score of each answer in the list."""
        logits = self.logits(images, input_ids, attention_mask)
        # summed over answers (mean over the batch), as BUTD: a mean over A answers would shrink
        # the gradient of the few answers that matter by the size of the list
        vqa = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(targets)
        return {"vqa": vqa, "loss": vqa}


class NLVRModel(FusionModel):
    """NLVR2: the sentence is fused with each image separately, and the two fusion [CLS] are
    concatenated and classified true/false. ALBEF instead adds fusion layers that attend to both
    images at once (and a text-assignment pre-training step); this keeps the pre-trained
    architecture unchanged."""
    NEW_PARAMS = ("cls_head.",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cls_head = mlp_head(2 * cfg.text_width, cfg.text_width, 2)

    def logits(self, image0, image1, input_ids, attention_mask):
        B = image0.shape[0]
        # one batched pass over both images: the text is encoded once and used twice
        text_embeds = self.encode_text(input_ids, attention_mask).repeat(2, 1, 1)   # (2B, T, D)
        ids, mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)             # (2B, T)
        image_embeds = self.encode_image(torch.cat([image0, image1]), text_embeds[:, 0])
        cls = self.fuse(text_embeds, mask, image_embeds, ids)[:, 0]                # (2B, D)
        return self.cls_head(torch.cat([cls[:B], cls[B:]], dim=1))                 # (B, 2)

    def forward(self, image0, image1, input_ids, attention_mask, labels):
        nlvr = F.cross_entropy(self.logits(image0, image1, input_ids, attention_mask), labels)
        return {"nlvr": nlvr, "loss": nlvr}


class VEModel(FusionModel):
    """SNLI-VE: fusion [CLS] -> MLP -> contradiction / neutral / entailment (as ALBEF)."""
    NEW_PARAMS = ("cls_head.",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cls_head = mlp_head(cfg.text_width, cfg.text_width, 3)

    def logits(self, images, input_ids, attention_mask):
        return self.cls_head(self.fused_cls(images, input_ids, attention_mask))   # (B, 3)

    def forward(self, images, input_ids, attention_mask, labels):
        ve = F.cross_entropy(self.logits(images, input_ids, attention_mask), labels)
        return {"ve": ve, "loss": ve}


class CaptionModel(nn.Module):
    """Captioning (BLIP): the ViT and the causal decoder, which reads the image through
    cross-attention. Every caption starts with [CLS] ([DEC] in the decoder when cfg.blip_tokens)
    and the prompt ("a picture of "), whose positions carry no loss; generation continues the
    prompt, greedily or by beam search.

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

    def forward(self, images, input_ids, attention_mask):
        """input_ids (B, T): [CLS] caption [SEP] [PAD]...; the prompt is inserted after [CLS]."""
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
    or buffer loads from the key of the same name; a captioning decoder that pre-training did not
    have (ALBEF) loads from the text encoder's weights of the same layer (embeddings,
    self-attention, feed-forward, the MLM head as LM head, cross-attention where the encoder has
    it). A key found nowhere must be new by design (model.NEW_PARAMS, e.g. the heads); a shape
    mismatch is an error. Returns dict(loaded, initialised, unused) lists of keys: `unused` are
    the pre-training keys the task drops (momentum encoders, queues, projections, ...)."""
    ours = model.state_dict()
    has_decoder = any(k.startswith("text_decoder.") for k in state)

    def source(key):
        if key in state:
            return key
        alt = "text_encoder." + key.removeprefix("text_decoder.")
        return alt if key.startswith("text_decoder.") and not has_decoder and alt in state else None

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
