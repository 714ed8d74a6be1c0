"""The text side of ALBEF/BLIP: a BERT encoder whose upper layers cross-attend to image tokens,
its masked/causal language-model head, and a strict loader for Hugging Face BERT weights.

ELIP (arXiv 2309.16738) runs the unimodal text encoder before the ViT and uses its [CLS] output to
decide which vision tokens to keep; everything here is plain ALBEF/BLIP text machinery.

ALBEF layout: one BERT, layers[:fusion_layer] read text only, layers[fusion_layer:] add
cross-attention to the image (the fusion encoder). BLIP layout: fusion_layer == 0, every layer has
cross-attention, and the unimodal text encoder is the same stack with cross-attention skipped.
"""

import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# BERT with optional cross-attention (Hugging Face parameter names)

@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2     # token-type (segment) embeddings; 0: none (BLIP's BERT has none)
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1         # hidden and attention-probability dropout, as in BERT
    fusion_layer: int = 6        # layers >= fusion_layer have cross-attention to the image
    encoder_width: int = 768     # width of the image tokens the cross-attention reads
    lm_head: bool = True         # the cls.predictions head (MLM, captioning); BLIP's encoder has none
    initializer_range: float = 0.02  # std of the random initial weights (BERT's name and value)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.fusion_layer <= self.num_layers:
            raise ValueError(f"fusion_layer must be in [0, {self.num_layers}], got {self.fusion_layer}")


def bert_config_from_json(path, **overrides):
    """BertConfig from a Hugging Face BERT config.json. A plain BERT has no image side, so unless
    the file (ALBEF's config_bert.json does) or an override says otherwise, fusion_layer =
    num_layers (text only) and encoder_width = hidden_size."""
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only hidden_act 'gelu' with absolute position embeddings is supported")
    names = dict(vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
                 num_heads="num_attention_heads", intermediate_size="intermediate_size",
                 max_position="max_position_embeddings", type_vocab_size="type_vocab_size",
                 layer_norm_eps="layer_norm_eps", dropout="hidden_dropout_prob",
                 fusion_layer="fusion_layer", encoder_width="encoder_width",
                 initializer_range="initializer_range")
    kwargs = {ours: hf[theirs] for ours, theirs in names.items() if theirs in hf}
    kwargs.setdefault("fusion_layer", kwargs.get("num_layers", 12))
    kwargs.setdefault("encoder_width", kwargs.get("hidden_size", 768))
    unknown = set(overrides) - {f.name for f in fields(BertConfig)}
    if unknown:
        raise ValueError(f"unknown BertConfig fields {sorted(unknown)}")
    return BertConfig(**{**kwargs, **overrides})


class Attention(nn.Module):
    """BERT attention block: self.{query,key,value}, then output.{dense,LayerNorm} around the
    residual (post-LN). Keys and values come from `context`: the text itself for self-attention,
    the image tokens (width encoder_width) for cross-attention."""

    def __init__(self, cfg, context_width):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attn_dropout = cfg.dropout
        self.self = nn.ModuleDict(dict(query=nn.Linear(D, D), key=nn.Linear(context_width, D),
                                       value=nn.Linear(context_width, D)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(D, D),
                                         LayerNorm=nn.LayerNorm(D, eps=cfg.layer_norm_eps)))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, context, mask):
        """x (B, L, D), context (B, S, Dc), mask bool broadcastable to (B, H, L, S), True = attend."""
        B, L, D = x.shape
        S, H = context.shape[1], self.num_heads
        q = self.self.query(x).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        k = self.self.key(context).view(B, S, H, D // H).transpose(1, 2)  # (B, H, S, Dh)
        v = self.self.value(context).view(B, S, H, D // H).transpose(1, 2)  # (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D): heads side by side again
        return self.output.LayerNorm(x + self.dropout(self.output.dense(y)))


class Layer(nn.Module):
    """Self-attention, cross-attention to the image (fusion layers only), feed-forward."""

    def __init__(self, cfg, has_cross):
        super().__init__()
        D = cfg.hidden_size
        self.attention = Attention(cfg, D)
        self.crossattention = Attention(cfg, cfg.encoder_width) if has_cross else None
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(D, cfg.intermediate_size)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(cfg.intermediate_size, D),
                                         LayerNorm=nn.LayerNorm(D, eps=cfg.layer_norm_eps)))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, image_embeds=None, image_mask=None):
        x = self.attention(x, x, mask)
        if image_embeds is not None:
            x = self.crossattention(x, image_embeds, image_mask)
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT
        return self.output.LayerNorm(x + self.dropout(self.output.dense(h)))


class LMHead(nn.Module):
    """cls.predictions: dense + GELU + LayerNorm, then the word embeddings (tied) plus a bias."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(D, D),
                                            LayerNorm=nn.LayerNorm(D, eps=cfg.layer_norm_eps)))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden, word_embeddings):
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(hidden)))
        return F.linear(h, word_embeddings, self.bias)  # (B, L, V)


MODES = ("text", "fusion", "multimodal")


class TextEncoder(nn.Module):
    """BERT text encoder / fusion encoder / decoder: one stack, three modes (see forward)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        embeddings = dict(word_embeddings=nn.Embedding(cfg.vocab_size, D),
                          position_embeddings=nn.Embedding(cfg.max_position, D))
        if cfg.type_vocab_size > 0:
            embeddings["token_type_embeddings"] = nn.Embedding(cfg.type_vocab_size, D)
        embeddings["LayerNorm"] = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.embeddings = nn.ModuleDict(embeddings)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(
            Layer(cfg, has_cross=i >= cfg.fusion_layer) for i in range(cfg.num_layers))))
        if cfg.lm_head:
            self.cls = nn.ModuleDict(dict(predictions=LMHead(cfg)))
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # BERT's initialisation: N(0, initializer_range) matrices and embeddings, zero biases,
        # unit LayerNorm
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.initializer_range)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, input_ids):
        """(B, L) ids -> (B, L, D): word + position (+ token type 0: one segment), LayerNorm."""
        L = input_ids.shape[1]
        if L > self.cfg.max_position:
            raise ValueError(f"sequence length {L} exceeds max_position {self.cfg.max_position}")
        e = self.embeddings
        pos = torch.arange(L, device=input_ids.device)
        x = e.word_embeddings(input_ids) + e.position_embeddings(pos)
        if "token_type_embeddings" in e:
            x = x + e.token_type_embeddings.weight[0]
        return self.embed_dropout(e.LayerNorm(x))

    def forward(self, input_ids=None, attention_mask=None, image_embeds=None, image_atts=None,
                mode="text", causal=False, hidden=None):
        """Last hidden state (B, L, D).
        mode "text": text-only layers, layers[:fusion_layer] (ALBEF) or, when fusion_layer == 0,
            all layers with cross-attention skipped (BLIP's unimodal text encoder);
        mode "fusion": from `hidden` (the output of mode "text"), layers[fusion_layer:] with
            cross-attention to image_embeds (ALBEF's fusion encoder);
        mode "multimodal": from input_ids, all layers, cross-attention in layers >= fusion_layer.
        causal=True masks later positions (the decoder). attention_mask (B, L) and image_atts
        (B, S) are 1 for real tokens, 0 for padding; None means all real."""
        cfg = self.cfg
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "fusion":
            if hidden is None:
                raise ValueError("mode 'fusion' starts from `hidden`, the output of mode 'text'")
            if not 0 < cfg.fusion_layer < cfg.num_layers:
                raise ValueError(f"mode 'fusion' needs both text and fusion layers, but fusion_layer="
                                 f"{cfg.fusion_layer} with num_layers={cfg.num_layers}; use 'multimodal'")
            x, start, end = hidden, cfg.fusion_layer, cfg.num_layers
        else:
            if input_ids is None:
                raise ValueError(f"mode {mode!r} needs input_ids")
            x, start = self.embed(input_ids), 0
            end = cfg.fusion_layer if mode == "text" and cfg.fusion_layer > 0 else cfg.num_layers
        B, L, _ = x.shape

        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=x.device)
        # every query may look at the real (non-padded) keys; causal also hides the later ones.
        # Row 0 ([CLS]) is always a real key, so no query row is ever fully masked.
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        if causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # (B, 1, L, L)

        image_mask = None
        if mode != "text":
            if image_embeds is None:
                raise ValueError(f"mode {mode!r} cross-attends to the image: pass image_embeds")
            if image_embeds.shape[-1] != cfg.encoder_width:
                raise ValueError(f"image_embeds width {image_embeds.shape[-1]} != "
                                 f"encoder_width {cfg.encoder_width}")
            if image_atts is None:
                image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=x.device)
            image_mask = image_atts.bool()[:, None, None, :]  # (B, 1, 1, S)

        for i, layer in enumerate(self.encoder.layer[start:end], start):
            cross = mode != "text" and i >= cfg.fusion_layer
            x = layer(x, mask, image_embeds if cross else None, image_mask)
        return x

    def lm_logits(self, hidden):
        """(B, L, D) -> (B, L, vocab): the MLM / captioning head."""
        return self.cls.predictions(hidden, self.embeddings.word_embeddings.weight)


def tie_to_encoder(decoder, encoder):
    """BLIP's decoder shares every weight of the text encoder except self-attention (and the LM
    head, which only the decoder has): embeddings, cross-attention and feed-forward are the
    encoder's modules themselves, so the same nn.Parameter objects, updated once by the optimizer
    (BLIP's models/blip_pretrain.py: tie_encoder_decoder_weights(text_encoder, text_decoder.bert,
    '', '/attention') ties every module whose path lacks '/attention'). The decoder's LM head
    reads the shared word embeddings."""
    if len(decoder.encoder.layer) != len(encoder.encoder.layer):
        raise ValueError(f"the decoder has {len(decoder.encoder.layer)} layers, the encoder "
                         f"{len(encoder.encoder.layer)}: BLIP ties them layer by layer")
    if any(layer.crossattention is None for layer in encoder.encoder.layer):
        raise ValueError("BLIP's tied decoder needs cross-attention in every encoder layer "
                         "(fusion_layer 0)")
    decoder.embeddings = encoder.embeddings
    for dec, enc in zip(decoder.encoder.layer, encoder.encoder.layer):
        dec.crossattention, dec.intermediate, dec.output = (enc.crossattention, enc.intermediate,
                                                            enc.output)


# -----------------------------------------------------------------------------
# Loading Hugging Face BERT weights

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The safetensors format: 8-byte little-endian header size, a JSON header mapping each name
    to dtype, shape and [start, end) byte offsets into the data that follows."""
    buf = bytearray(os.path.getsize(path))
    with open(path, "rb") as f:
        f.readinto(buf)
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    header.pop("__metadata__", None)
    state = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        # frombuffer views the buffer without copying; the tensors keep it alive
        if count:
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start)
        else:  # frombuffer refuses zero elements
            t = torch.empty(0, dtype=dtype)
        state[name] = t.reshape(info["shape"])
    return state


def hf_to_ours(name):
    """The one mapping from a Hugging Face BERT checkpoint name to our parameter name: drop the
    "bert." prefix of BertFor* checkpoints ("cls.*" heads have none) and rename the old
    TensorFlow-style LayerNorm gamma/beta."""
    name = name.removeprefix("bert.")
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


# indexed by token id: a vocabulary with added tokens (BLIP's [DEC] and [ENC]) has more rows
VOCAB_KEYS = ("embeddings.word_embeddings.weight", "cls.predictions.bias")


def grow_rows(rows: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """A tensor indexed by token id for a vocabulary with tokens added: the checkpoint's rows
    (N, ...), then our initialisation of the added ones: (N', ...), as Hugging Face's
    resize_token_embeddings."""
    return torch.cat([rows.to(ours.dtype), ours[len(rows):]])


def load_bert_weights(encoder, path):
    """Load a Hugging Face BERT checkpoint (.safetensors, .bin, or a state dict) into `encoder`.
    Strict: every shape must match, and only crossattention.* and cls.* may be absent (they keep
    their initialisation, e.g. plain BERT has no cross-attention). One exception: the tensors
    indexed by token id (VOCAB_KEYS) may have fewer rows than ours, as when BLIP adds two tokens
    to BERT's vocabulary; their rows are copied and the added rows keep their initialisation (as
    Hugging Face's resize_token_embeddings). Returns dict(missing=[our keys left at init],
    unused=[checkpoint keys not loaded], grown=[our keys with rows added])."""
    if isinstance(path, dict):
        state = path
    elif str(path).endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    ours = encoder.state_dict()
    source, unused, grown = {}, [], []  # our name -> checkpoint name
    for key, value in state.items():
        name = hf_to_ours(key)
        if name not in ours:
            unused.append(key)
            continue
        if name in source:
            raise ValueError(f"checkpoint keys {source[name]!r} and {key!r} both map to {name!r}")
        shape, our_shape = tuple(value.shape), tuple(ours[name].shape)
        if name in VOCAB_KEYS and shape[1:] == our_shape[1:] and shape[0] < our_shape[0]:
            grown.append(name)
        elif shape != our_shape:
            raise ValueError(f"shape mismatch for {key!r} (ours {name!r}): checkpoint "
                             f"{shape} vs model {our_shape}")
        source[name] = key
    missing = [name for name in ours if name not in source]
    required = [name for name in missing
                if ".crossattention." not in name and not name.startswith("cls.")]
    if required:
        raise ValueError(f"checkpoint lacks required weights: {required}")
    weights = {name: state[key] for name, key in source.items()}
    for name in grown:
        weights[name] = grow_rows(weights[name], ours[name])
    encoder.load_state_dict(weights, strict=False)
    return dict(missing=missing, unused=unused, grown=grown)
