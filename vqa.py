"""
VQA on the pre-trained encoders, two ways.

VQAModel classifies the fusion [CLS] over the answer list (BUTD-style), with binary
cross-entropy on the VQA soft scores: small, and quick to train on a CPU.

VQADecoderModel is ALBEF's and BLIP's answer decoder. The question is encoded with the image (the
fusion states, (B, T, D)); a causal BERT decoder reads them through cross-attention in every layer
and learns to generate each distinct answer, [bos] answer [SEP], the [SEP] ending it; the loss is
sum_i w_i * seq_loss_i / B over the batch's answers, w_i the answer's weight (ALBEF: the share of
the annotators who gave it; official ELIP-ALBEF code, ALBEF/models/model_vqa.py:116-117). The
flavour follows the pre-trained backbone:
- ALBEF (the text encoder has fusion layers): as many decoder layers as fusion layers (6),
  initialised from them (encoder layers 6-11 -> decoder layers 0-5), with the encoder's
  embeddings and its MLM head as LM head (ALBEF/VQA.py:160-182); bos [CLS]; momentum
  distillation, per answer token (1 - alpha) CE + alpha CE against the momentum decoder's softmax
  (ALBEF/models/xbert.py:1298-1302).
- BLIP (cross-attention in every layer, fusion_layers 0): the pre-trained text decoder, all its
  layers; with cfg.blip_tokens, bos [DEC] and the question read by the multimodal encoder with
  [ENC] in place of [CLS] (else [CLS] both); the LM loss with label smoothing 0.1
  (BLIP/models/med.py:914). BLIP fine-tunes without distillation.
answer_scores ranks the answer list as the official code does: the k_test answers whose first
token is likeliest after bos, then each by its whole sequence, ALBEF's score log p(first) -
seq_loss (the first token counted twice, as ALBEF/models/model_vqa.py:149-206 has it), BLIP's
-seq_loss with its label smoothing (BLIP/models/blip_vqa.py:120-167); the argmax is the answer.
ALBEF appends its eos, the text "[SEP]", to every answer before the tokenizer adds its own, so
its answers end in two [SEP] tokens (ALBEF/dataset/vqa_dataset.py:68, ALBEF/VQA.py:82), learnt
and scored: answer_seps=2; BLIP's end in one.
"""
import torch
import torch.nn.functional as F

from heads import FusionModel, mlp_head
from model import with_first_token
from text_encoder import BertConfig, TextEncoder
from vit import PatchEmbed


class VQAModel(FusionModel):
    """VQA as classification over the answer list (BUTD-style), trained with binary cross-entropy
    on the VQA soft scores; it never answers outside the list, nor learns from answers outside
    it."""
    NEW_PARAMS = ("vqa_head.",)

    def __init__(self, cfg, num_answers, embed_layer=PatchEmbed):
        super().__init__(cfg, embed_layer=embed_layer)
        self.vqa_head = mlp_head(cfg.text_width, 2 * cfg.text_width, num_answers)

    def answer_scores(self, batch):
        """batch: "image" (B, 3, H, W), "question_ids", "question_mask" (B, T) -> (B, A): the
        logit of each answer of the list."""
        return self.vqa_head(self.fused_cls(batch["image"], batch["question_ids"],
                                            batch["question_mask"]))

    def forward(self, batch, alpha=0.0):
        """answer_scores' batch and "targets" (B, A): the soft score of each answer in the list
        (tasks.vqa_collate). alpha: no teacher here (see CaptionModel.forward)."""
        logits, targets = self.answer_scores(batch), batch["targets"]
        # summed over answers (mean over the batch), as BUTD: a mean over A answers would shrink
        # the gradient of the few answers that matter by the size of the list
        vqa = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(targets)
        return {"vqa": vqa, "loss": vqa}


def answer_decoder(cfg, num_layers):
    """A causal BERT with an LM head whose every layer cross-attends to the question's fusion
    states (width text_width)."""
    return TextEncoder(BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_layers=num_layers,
        num_heads=cfg.text_heads, intermediate_size=cfg.text_mlp,
        max_position=max(512, cfg.max_len), type_vocab_size=2 if cfg.token_types else 0,
        dropout=cfg.text_dropout, fusion_layer=0, encoder_width=cfg.text_width, lm_head=True,
        initializer_range=cfg.init_std))


def with_seps(ids, mask, extra: int, pad_id: int):
    """(N, L) token ids and mask of texts ending in [SEP] -> (N, L + extra): each text's last
    token, its [SEP], repeated `extra` times more (ALBEF's answers end in two)."""
    if extra == 0:
        return ids, mask
    ends = mask.sum(1, keepdim=True) + torch.arange(extra, device=ids.device)   # (N, extra)
    sep = ids.gather(1, ends[:, :1] - 1).expand(-1, extra)                       # (N, extra)
    ids = F.pad(ids, (0, extra), value=pad_id).scatter(1, ends, sep)             # (N, L+extra)
    return ids, F.pad(mask, (0, extra)).scatter(1, ends, 1)


class VQADecoderModel(FusionModel):
    """The answer decoder over the fusion states (see the module's docstring). answer_ids,
    answer_mask (A, L): the tokenized answer list ([CLS] answer [SEP] [PAD]...), ranked by
    answer_scores, whose [CLS] becomes the bos; k_test answers are re-scored by their whole
    sequence. answer_seps: the [SEP] tokens that end an answer in training and ranking (ALBEF:
    2, BLIP: 1)."""
    NEW_PARAMS = ()     # everything loads from pre-training

    def __init__(self, cfg, answer_ids, answer_mask, k_test=128, distill=False, momentum=0.995,
                 embed_layer=PatchEmbed, answer_seps=1):
        super().__init__(cfg, distill, momentum, embed_layer)
        self.albef = cfg.fusion_layers > 0
        layers = cfg.fusion_layers if self.albef else cfg.text_layers
        self.text_decoder = answer_decoder(cfg, layers)
        # ALBEF: decoder layer i loads from encoder layer text_layers + i (load_pretrained)
        self.decoder_from_layer = cfg.text_layers if self.albef else 0
        self.label_smoothing = 0.0 if self.albef else cfg.label_smoothing
        self.bos_id = cfg.dec_id if cfg.blip_tokens else cfg.cls_id
        self.k_test, self.extra_seps = k_test, answer_seps - 1
        # the answer list, [bos] answer [SEP] [PAD]... (A, L): part of the model, not a parameter
        answer_ids, answer_mask = self.answer_tokens(answer_ids, answer_mask)
        self.register_buffer("answer_ids", answer_ids, persistent=False)
        self.register_buffer("answer_mask", answer_mask, persistent=False)
        if distill:
            self.add_momentum("text_decoder")

    def answer_tokens(self, ids, mask):
        """Tokenized answers, [CLS] answer [SEP] [PAD]... (N, L) -> [bos] answer [SEP]... as the
        decoder learns and ranks them (answer_seps [SEP] tokens), and their mask."""
        ids, mask = with_seps(ids, mask, self.extra_seps, self.cfg.pad_id)
        return with_first_token(ids, self.bos_id), mask

    def decode(self, ids, mask, states, states_mask, momentum=False):
        """(N, L) answer prefixes reading their question's states (N, T, D) -> (N, L, V): the
        logits of the token after each position."""
        decoder = self.text_decoder_m if momentum else self.text_decoder
        hidden = decoder(ids, mask, states, states_mask, mode="multimodal", causal=True)
        return decoder.lm_logits(hidden)

    def answer_nll(self, logits, ids, mask):
        """(N,): each answer's summed cross-entropy over its tokens after bos, [SEP] included,
        [PAD] not; logits (N, L-1, V) predict ids[:, 1:]."""
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                   # (N, L-1)
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                               reduction="none", label_smoothing=self.label_smoothing).sum(1)

    def forward(self, batch, alpha=0.0):
        """batch: B questions ("image" (B, 3, H, W), "question_ids", "question_mask" (B, T)),
        question b with "answers_count"[b] distinct answers: "answers_ids", "answers_mask"
        (N, L), "weights" (N,), N = answers_count.sum(). Returns "vqa" (the weighted answer
        cross-entropy), "kd" (with distill, its distillation term) and
        "loss" = sum_i w_i ((1 - alpha) CE_i + alpha KD_i) / B."""
        images, input_ids, attention_mask = (batch["image"], batch["question_ids"],
                                             batch["question_mask"])
        ids, answer_mask = self.answer_tokens(batch["answers_ids"], batch["answers_mask"])
        counts, weights = batch["answers_count"], batch["weights"]
        B, N = images.shape[0], ids.shape[0]
        # each question's states once per answer; N given, so no device-to-host sync for it
        states = self.fused_states(images, input_ids, attention_mask)
        states = states.repeat_interleave(counts, dim=0, output_size=N)             # (N, T, D)
        states_mask = attention_mask.repeat_interleave(counts, dim=0, output_size=N)  # (N, T)
        logits = self.decode(ids, answer_mask, states, states_mask)[:, :-1]         # (N, L-1, V)
        nll = self.answer_nll(logits, ids, answer_mask)                             # (N,)
        out = {"vqa": (weights * nll).sum() / B}
        if not self.distill:
            out["loss"] = out["vqa"]
            return out
        with torch.no_grad():
            states_m = self.fused_states(images, input_ids, attention_mask, momentum=True)
            states_m = states_m.repeat_interleave(counts, dim=0, output_size=N)     # (N, T, D)
            soft = self.decode(ids, answer_mask, states_m, states_mask,
                               momentum=True)[:, :-1].softmax(-1)                  # (N, L-1, V)
        kd = -(logits.log_softmax(-1) * soft).sum(-1)                               # (N, L-1)
        kd = (kd * answer_mask[:, 1:]).sum(1)                                       # (N,)
        out["kd"] = (weights * kd).sum() / B
        out["loss"] = (weights * ((1 - alpha) * nll + alpha * kd)).sum() / B
        return out

    @torch.no_grad()
    def answer_scores(self, batch):
        """batch: "image" (B, 3, H, W), "question_ids", "question_mask" (B, T) -> (B, A): the
        official ranking's score of every answer of the list for B questions; answers outside
        the top k_test by first-token probability score -inf."""
        attention_mask = batch["question_mask"]
        states = self.fused_states(batch["image"], batch["question_ids"],
                                   attention_mask)                                 # (B, T, D)
        B, A = states.shape[0], self.answer_ids.shape[0]
        k = min(self.k_test, A)
        bos = self.answer_ids[:1, :1].expand(B, 1)                                  # (B, 1)
        first = self.decode(bos, None, states, attention_mask)[:, 0].softmax(-1)    # (B, V)
        top_p, top = first[:, self.answer_ids[:, 1]].topk(k, dim=1)                 # (B, k)
        ids, mask = self.answer_ids[top.flatten()], self.answer_mask[top.flatten()]  # (B*k, L)
        logits = self.decode(ids, mask, states.repeat_interleave(k, dim=0),
                             attention_mask.repeat_interleave(k, dim=0))[:, :-1]
        score = -self.answer_nll(logits, ids, mask).view(B, k)                      # (B, k)
        if self.albef:
            score = score + top_p.log()
        return score.new_full((B, A), float("-inf")).scatter(1, top, score)
