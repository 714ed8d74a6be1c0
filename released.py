"""
The released checkpoints of ALBEF (salesforce/ALBEF), BLIP (salesforce/BLIP) and ELIP
(guoyang9/ELIP), in their own layouts, recognised by their keys and converted to this project's
names on load. ELIP's pruning adds no parameter and its ALBEF and BLIP copies keep those
repositories' model classes, so its files are in the ALBEF and BLIP layouts below and load as
they do (nothing in the keys tells an ELIP file from an ALBEF or BLIP one).

    state = unwrap(torch.load(path, map_location="cpu", weights_only=True))
    conv = to_ours(state, img_size=384)        # the layout from layout_of(state)
    cfg = model_config(conv, base, tokenizer)  # base: the preset and flags; tokenizer: BERT's
    report = heads.load_pretrained(model, conv.state)   # or model.load_state_dict(conv.state)
    conv.dropped, conv.derived, conv.interpolated       # the rest of the report

Layouts (LAYOUTS: name -> (family, task)), each a state dict of the official model class:
  albef_pretrain   models/model_pretrain.py: the ViT (timm's names), the BERT of xbert.py under
                   text_encoder.bert.* (cross-attention from the fusion layer on), its MLM head
                   text_encoder.cls.*, projections, ITM head, temperature, momentum copies, queues
  albef_retrieval  models/model_retrieval.py (COCO, Flickr30k, and the RefCOCO+ grounding file,
                   which uses the same class): the text encoder without the bert. level, no MLM
                   head, an id queue
  albef_vqa        models/model_vqa.py: the text encoder and a 6-layer answer decoder
                   text_decoder.bert.* with its LM head; momentum copies when trained with distill
  albef_ve         models/model_ve.py: the text encoder and cls_head (3 classes), momentum copies
  blip_pretrain    models/blip_pretrain.py: text_encoder.* (no token-type embeddings, cross-
                   attention in every layer), the decoder text_decoder.bert.* tied to it and its LM
                   head, projections, ITM head, temperature, momentum copies, queues
  blip_retrieval   models/blip_retrieval.py: as pre-training without the decoder, an id queue
  blip_caption     models/blip.py BLIP_Decoder: the ViT and the decoder only
  blip_vqa         models/blip_vqa.py: the text encoder and an untied decoder (the answer decoder)
Recognised and refused (NLVR_DIFFERS says why): ALBEF's NLVR2 model and its text-assignment
pre-training (an 18-layer fusion encoder attending to both images), BLIP's NLVR2 model (two
cross-attentions per layer).
"""
import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from vit import interpolate_pos_embed

LAYOUTS = {
    "albef_pretrain": ("albef", "pretrain"), "albef_retrieval": ("albef", "retrieval"),
    "albef_vqa": ("albef", "vqa"), "albef_ve": ("albef", "ve"), "albef_nlvr": ("albef", "nlvr"),
    "blip_pretrain": ("blip", "pretrain"), "blip_retrieval": ("blip", "retrieval"),
    "blip_caption": ("blip", "caption"), "blip_vqa": ("blip", "vqa"), "blip_nlvr": ("blip", "nlvr"),
}

NLVR_DIFFERS = {
    "albef": "ALBEF's NLVR2 model (models/model_nlvr.py, and its text-assignment pre-training, "
             "models/model_pretrain_nlvr.py) has an 18-layer text encoder: 6 text layers, then "
             "each of the 6 fusion layers twice, layer 6+2i cross-attending to the first image "
             "and 7+2i to the second (the pair sharing the cross-attention's key and value), so "
             "one [CLS] has read both images. The project's NLVRModel runs the 6 pre-trained "
             "fusion layers once per image and classifies the two [CLS] side by side: no renaming "
             "of weights turns one computation into the other. Fine-tune from ALBEF's pre-trained "
             "checkpoint instead.",
    "blip": "BLIP's NLVR2 model (models/blip_nlvr.py, models/nlvr_encoder.py) gives every text "
            "layer two cross-attentions, one per image (crossattention.self0/self1, "
            "output.dense0/dense1), merged by output.merge_layer from layer 6 on. The project's "
            "NLVRModel fuses each image with BLIP's single cross-attention and classifies the two "
            "[CLS] side by side: no renaming of weights turns one computation into the other. "
            "Fine-tune from BLIP's pre-trained checkpoint instead.",
}

# The key grammar of the official files: what may follow each module's name. A key outside it
# is one this module cannot place, whatever the layout.
_W = r"(weight|bias)"
_VIT = (rf"(cls_token|pos_embed|patch_embed\.proj\.{_W}|norm\.{_W}"
        rf"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.{_W})")
_BERT = (rf"(embeddings\.((word|position|token_type)_embeddings\.weight|LayerNorm\.{_W}"
         rf"|position_ids)|encoder\.layer\.\d+\.((cross)?attention\.(self\.(query|key|value)"
         rf"|output\.(dense|LayerNorm))|intermediate\.dense|output\.(dense|LayerNorm))\.{_W})")
_LM_HEAD = rf"cls\.predictions\.(transform\.(dense|LayerNorm)\.{_W}|bias|decoder\.{_W})"
GRAMMAR = {
    "visual_encoder": _VIT,
    # ALBEF's pre-training keeps BertForMaskedLM's bert. level, its fine-tuned models do not
    "text_encoder": rf"(bert\.)?{_BERT}|{_LM_HEAD}",
    "text_decoder": rf"bert\.{_BERT}|{_LM_HEAD}",
    "vision_proj": _W, "text_proj": _W, "itm_head": _W, "cls_head": rf"[02]\.{_W}",
    "ta_head": _W,                                      # ALBEF's NLVR2 text-assignment pre-training
}
MOMENTUM = ("visual_encoder", "text_encoder", "text_decoder", "vision_proj", "text_proj",
            "cls_head")   # the modules the official models keep a momentum copy (name + "_m") of
SINGLE = ("temp", "image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue")


@dataclass
class Converted:
    """A released checkpoint in this project's names. state: the tensors, ready for
    heads.load_pretrained or a strict load_state_dict; config: the ModelConfig fields the weights
    determine; momentum: whether it holds momentum copies (the official model was trained with
    distillation); dropped: {checkpoint key: why it is not in state}; derived: keys of state that
    the checkpoint lacks, made for our model (queue bookkeeping); interpolated: position
    embeddings resized to img_size."""
    layout: str
    family: str
    task: str
    state: dict
    config: dict
    momentum: bool
    dropped: dict = field(default_factory=dict)
    derived: list = field(default_factory=list)
    interpolated: list = field(default_factory=list)


def unwrap(checkpoint: dict) -> dict:
    """The state dict of a checkpoint file: the official scripts save {"model": state dict,
    "optimizer": ..., ...}; DDP-wrapped saves prefix "module."."""
    state = checkpoint.get("model", checkpoint)
    return {k.removeprefix("module."): v for k, v in state.items()}


def placeable(key: str) -> bool:
    module, _, rest = key.partition(".")
    if not rest:
        return key in SINGLE
    base = module.removesuffix("_m")
    if module != base and base not in MOMENTUM:
        return False
    return base in GRAMMAR and re.fullmatch(GRAMMAR[base], rest) is not None


def cross_layers(state: dict, prefix: str) -> tuple[int, list[int]]:
    """(number of layers, the layers with cross-attention) of the BERT under prefix."""
    layer = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.(crossattention\.)?")
    found = [m for k in state if (m := layer.match(k))]
    return len({m[1] for m in found}), sorted({int(m[1]) for m in found if m[2]})


def layout_of(state: dict) -> str:
    """Which official layout `state` (a state dict, unwrapped) is, by its keys. A key outside
    every layout's names, or a combination no layout has, is an error naming the keys."""
    twin = [k for k in state if ".crossattention.self0." in k or ".crossattention.self1." in k]
    if twin and any(k.startswith("visual_encoder.") for k in state):
        return "blip_nlvr"     # its twin cross-attentions are outside the grammar below
    unplaced = [k for k in state if not placeable(k)]
    if unplaced:
        raise ValueError(f"not a checkpoint of ALBEF, BLIP or ELIP in a known layout: cannot "
                         f"place {len(unplaced)} of its {len(state)} keys, first "
                         f"{unplaced[:8]}")
    has = {k.split(".")[0] for k in state}
    if "visual_encoder" not in has or not has & {"text_encoder", "text_decoder"}:
        raise ValueError(f"every layout has visual_encoder.* and a text encoder or decoder; this "
                         f"checkpoint has only {sorted(has)}")
    family = "albef" if "text_encoder" in has and text_family(state) == "albef" else "blip"
    if has & {"cls_head", "ta_head"}:
        classes = state["cls_head.2.weight"].shape[0] if "cls_head" in has else 2
        name = f"{family}_{'ve' if classes == 3 else 'nlvr'}"
    elif "text_decoder" in has:
        name = ("blip_caption" if "text_encoder" not in has else
                f"{family}_pretrain" if "vision_proj" in has else f"{family}_vqa")
    elif any(k.startswith("text_encoder.cls.") for k in state):
        name = f"{family}_pretrain"
    elif {"vision_proj", "text_proj", "itm_head"} <= has:
        name = f"{family}_retrieval"
    else:
        raise ValueError(f"no released layout has exactly these modules: {sorted(has)}")
    if name not in LAYOUTS:
        raise ValueError(f"the keys look like {family}'s {name.split('_')[1]} model, which "
                         f"{family} has not released: modules {sorted(has)}")
    # only ALBEF's pre-training model wraps its text encoder in BertForMaskedLM
    bert_level = any(k.startswith(("text_encoder.bert.", "text_encoder_m.bert.")) for k in state)
    if bert_level != (name == "albef_pretrain"):
        raise ValueError(f"the keys look like {name}, whose text encoder has "
                         f"{'no ' if bert_level else ''}bert. level, but this one has "
                         f"{'' if bert_level else 'none'}{'text_encoder.bert.*' * bert_level}")
    return name


def text_family(state: dict) -> str:
    """ALBEF's text encoder has text-only layers before its first cross-attention; BLIP's has
    cross-attention in every layer."""
    bert = "text_encoder.bert.embeddings.word_embeddings.weight" in state
    prefix = "text_encoder.bert." if bert else "text_encoder."
    _, cross = cross_layers(state, prefix)
    if not cross:
        raise ValueError(f"{prefix}encoder.layer.* has no cross-attention: a plain BERT, not the "
                         f"text encoder of ALBEF or BLIP")
    return "albef" if cross[0] > 0 else "blip"


def our_name(key: str) -> str:
    """The project's name of an official key (that it keeps): the BertForMaskedLM /
    BertLMHeadModel level bert. goes (our TextEncoder is the BERT and its head in one module),
    and BLIP's retrieval pointer is our queue_ptr."""
    module, _, rest = key.partition(".")
    if module.removesuffix("_m") in ("text_encoder", "text_decoder"):
        rest = rest.removeprefix("bert.")
    return "queue_ptr" if key == "ptr_queue" else f"{module}.{rest}" if rest else module


def tied_source(key: str, state: dict) -> str | None:
    """The key whose copy `key` is, for the official files' tied duplicates (the LM head's output
    matrix is the word embeddings, its decoder.bias is its bias), else None."""
    module, _, rest = key.partition(".")
    if rest == "cls.predictions.decoder.weight":
        words = f"{module}.bert.embeddings.word_embeddings.weight"
        return words if words in state else words.replace(".bert.", ".")
    if rest == "cls.predictions.decoder.bias":
        return f"{module}.cls.predictions.bias"
    return None


def drop_reason(key: str, value: torch.Tensor, state: dict) -> str | None:
    """Why a checkpoint key has no place in our state (a tied copy, a position-id buffer), after
    checking that leaving it out loses nothing; None for a key we keep."""
    source = tied_source(key, state)
    if source is not None:
        if source not in state or not torch.equal(value, state[source]):
            raise ValueError(f"{key} is not a copy of {source}: our LM head reads the word "
                             f"embeddings and its own bias (tied, as BERT's), so an untied one "
                             f"cannot load")
        return f"tied to {source}"
    if key.endswith("embeddings.position_ids"):
        if not torch.equal(value.flatten(), torch.arange(value.numel(), dtype=value.dtype)):
            raise ValueError(f"{key} is not 0, 1, 2, ...: our embeddings count positions from 0")
        return "position ids 0, 1, ... (our embeddings count them)"
    return None


def queue_state(state: dict) -> tuple[dict, list]:
    """Our queue bookkeeping from the official queues: the pointer as a scalar; ids (1, Q) as (Q,)
    with ALBEF's and BLIP's -100 (no id) as our -1, or all -1 where the model kept none
    (pre-training); every slot filled, as the official models start their queues with random
    unit vectors and count every slot as a negative. Returns (new tensors, derived keys)."""
    if "image_queue" not in state:
        return {}, []
    Q = state["image_queue"].shape[1]
    out, derived = {"queue_filled": torch.ones(Q, dtype=torch.bool)}, ["queue_filled"]
    if "queue_ptr" in state:
        out["queue_ptr"] = state["queue_ptr"].reshape(()).long()
    if "idx_queue" in state:
        idx = state["idx_queue"].reshape(Q).long()
        out["idx_queue"] = idx.masked_fill(idx == -100, -1)
    else:
        out["idx_queue"] = torch.full((Q,), -1, dtype=torch.long)
        derived.append("idx_queue")
    return out, derived


def check_blip_ties(state: dict):
    """BLIP's pre-training ties its decoder to the text encoder except self-attention and the LM
    head (tie_encoder_decoder_weights, skip "/attention"); ours shares those modules, so their two
    copies in the file must be equal or one would be lost."""
    for key in state:
        rest = key.removeprefix("text_decoder.")
        shared = rest != key and (rest.startswith("embeddings.") or re.match(
            r"encoder\.layer\.\d+\.(crossattention|intermediate|output)\.", rest))
        twin = state.get("text_encoder." + rest)
        if shared and (twin is None or not torch.equal(state[key], twin)):
            raise ValueError(f"text_decoder.bert.{rest} differs from text_encoder.{rest}: BLIP "
                             f"ties them, and our decoder shares the encoder's module")


def vit_config(state: dict, head_dim: int) -> dict:
    """The ModelConfig fields of the ViT: width, depth, patch and image size by shapes; the heads,
    which no shape shows, from head_dim (64 in every released ViT: B/16 12 heads, L/16 16)."""
    width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    patches = state["visual_encoder.pos_embed"].shape[1] - 1
    grid = math.isqrt(patches)
    depth = len({k.split(".")[2] for k in state if k.startswith("visual_encoder.blocks.")})
    if grid * grid != patches:
        raise ValueError(f"visual_encoder.pos_embed has {patches} patch positions, not a "
                         f"square grid")
    if state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] != 4 * width:
        raise ValueError("visual_encoder.blocks.0.mlp.fc1.weight: our ViT's MLP is 4 x its width, "
                         f"this one {state['visual_encoder.blocks.0.mlp.fc1.weight'].shape[0]}")
    if width % head_dim:
        raise ValueError(f"vision width {width} is not a multiple of head_dim {head_dim}")
    return dict(vision_width=width, vision_depth=depth, vision_heads=width // head_dim,
                patch_size=patch, img_size=grid * patch)


def bert_shape(state: dict, prefix: str) -> dict:
    """Width, vocabulary, layers, cross-attention layers and its key width of the BERT under
    prefix (our names: no bert. level)."""
    words = state[prefix + "embeddings.word_embeddings.weight"]
    n, cross = cross_layers(state, prefix)
    if cross and cross != list(range(cross[0], n)):
        raise ValueError(f"{prefix}encoder.layer.*: cross-attention in layers {cross}; ours has it "
                         f"in every layer from the first that has it")
    positions = state[prefix + "embeddings.position_embeddings.weight"].shape[0]
    if positions != 512:
        raise ValueError(f"{prefix}embeddings.position_embeddings.weight has {positions} rows; "
                         f"our text encoders have BERT's 512")
    key = f"{prefix}encoder.layer.{cross[0]}.crossattention.self.key.weight" if cross else None
    return dict(vocab=words.shape[0], width=words.shape[1], layers=n,
                first_cross=cross[0] if cross else n,
                mlp=state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                context=state[key].shape[1] if key else None,
                token_types=prefix + "embeddings.token_type_embeddings.weight" in state)


def implied_config(state: dict, family: str, task: str, head_dim: int = 64) -> dict:
    """The ModelConfig fields that the weights (in our names) determine for the layout's family
    and task; everything else (vocabulary ids, text length, pruning, objectives' settings) is the
    caller's."""
    cfg = vit_config(state, head_dim)
    text = bert_shape(state, "text_encoder." if task != "caption" else "text_decoder.")
    if text["width"] % head_dim:
        raise ValueError(f"text width {text['width']} is not a multiple of head_dim {head_dim}")
    if text["context"] != cfg["vision_width"]:
        raise ValueError(f"the text encoder's cross-attention reads width {text['context']}, the "
                         f"ViT's tokens have {cfg['vision_width']}")
    albef = family == "albef"
    cfg.update(vocab_size=text["vocab"], text_width=text["width"],
               text_heads=text["width"] // head_dim, text_mlp=text["mlp"],
               token_types=text["token_types"],
               text_layers=text["first_cross"] if albef else text["layers"],
               fusion_layers=text["layers"] - text["first_cross"] if albef else 0,
               blip_tokens=not albef, tie_decoder=not albef,
               # pre-training's objectives; every downstream model is built on ("itc", "itm")
               losses=(("itc", "itm", "mlm" if albef else "lm") if task == "pretrain"
                       else ("itc", "itm")))
    if "vision_proj.weight" in state:
        cfg["embed_dim"] = state["vision_proj.weight"].shape[0]
    if "image_queue" in state:
        cfg["queue_size"] = state["image_queue"].shape[1]
    if task in ("vqa", "pretrain") and "text_decoder.embeddings.word_embeddings.weight" in state:
        check_decoder(state, cfg, task)
    return cfg


def check_decoder(state: dict, cfg: dict, task: str):
    """The decoder must be the one our model builds: as many layers as the fusion layers (ALBEF's
    answer decoder) or the text layers (BLIP), cross-attention in each, reading the question's
    states (VQA) or the image (pre-training), the text encoder's vocabulary."""
    dec = bert_shape(state, "text_decoder.")
    layers = cfg["fusion_layers"] or cfg["text_layers"]
    context = cfg["text_width"] if task == "vqa" else cfg["vision_width"]
    problems = [f"{what} {got}, ours {want}" for what, got, want in (
        ("layers", dec["layers"], layers), ("first cross-attention layer", dec["first_cross"], 0),
        ("cross-attention width", dec["context"], context),
        ("vocabulary", dec["vocab"], cfg["vocab_size"]), ("width", dec["width"], cfg["text_width"]))
        if got != want]
    if problems:
        raise ValueError(f"text_decoder.bert.* is not the decoder our {task} model builds: "
                         f"{'; '.join(problems)}")


def interpolate(state: dict, img_size: int) -> list[str]:
    """Resize the position embeddings of the ViT and its momentum copy to img_size (bicubic on
    the grid, [CLS] kept: vit.interpolate_pos_embed, as the official fine-tuning scripts do).
    Returns the keys resized."""
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    if img_size % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
    done = []
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state and state[key].shape[1] - 1 != (img_size // patch) ** 2:
            state[key] = interpolate_pos_embed(state[key], (img_size // patch) ** 2)
            done.append(key)
    return done


def to_ours(state: dict, layout: str | None = None, img_size: int | None = None,
            head_dim: int = 64) -> Converted:
    """A released checkpoint's state dict (unwrapped) in this project's names, with the
    ModelConfig fields it implies. layout: the one of LAYOUTS the caller expects (default:
    whichever layout_of finds; another is an error); img_size: resize the position embeddings
    to it (default: keep the checkpoint's); head_dim: the width of an attention head, which no
    weight shows. Every key of the checkpoint ends in .state or in .dropped, with the reason;
    an NLVR2 layout is refused (NLVR_DIFFERS)."""
    found = layout_of(state)      # also when a layout is named: its keys are checked only there
    if layout is not None and layout != found:
        raise ValueError(f"the checkpoint's keys are those of {found}, not {layout}")
    family, task = LAYOUTS[found]
    if task == "nlvr":
        raise ValueError(f"{found}: {NLVR_DIFFERS[family]}")
    ours, dropped, source = {}, {}, {}
    for key, value in state.items():
        reason = drop_reason(key, value, state)
        if reason is not None:
            dropped[key] = reason
            continue
        name = our_name(key)
        if name in source:
            raise ValueError(f"checkpoint keys {source[name]!r} and {key!r} both map to {name!r}")
        source[name], ours[name] = key, value
    queues, derived = queue_state(ours)
    ours.update(queues)
    if found == "blip_pretrain":
        check_blip_ties(ours)
    config = implied_config(ours, family, task, head_dim)
    interpolated = []
    if img_size is not None:
        interpolated, config["img_size"] = interpolate(ours, img_size), img_size
    return Converted(found, family, task, ours, config, "visual_encoder_m.cls_token" in ours,
                     dropped, derived, interpolated)


def model_config(conv: Converted, base, tokenizer):
    """`base` (a ModelConfig: preset and flags) with the architecture the checkpoint implies and
    the tokenizer's special ids. The released files carry no vocabulary: the tokenizer must be
    the one they were trained with, BERT's vocab.txt (bert-base-uncased), with BLIP's [DEC] and
    [ENC] appended for BLIP (train_pretrain.make_tokenizer), as their rows show."""
    rows = conv.config["vocab_size"]
    if tokenizer.vocab_size != rows:
        raise ValueError(f"the checkpoint's word embeddings have {rows} rows, the vocabulary "
                         f"{tokenizer.vocab_size} tokens: not the vocabulary it was trained with")
    if conv.family == "blip" and (tokenizer.dec_id, tokenizer.enc_id) != (rows - 2, rows - 1):
        raise ValueError(f"BLIP's [DEC] and [ENC] are its last two rows ({rows - 2}, {rows - 1}: "
                         f"added to BERT's vocabulary in that order); this vocabulary has them at "
                         f"{tokenizer.dec_id}, {tokenizer.enc_id}")
    return dataclasses.replace(base, **conv.config, pad_id=tokenizer.pad_id,
                               cls_id=tokenizer.cls_id, mask_id=tokenizer.mask_id,
                               enc_id=tokenizer.enc_id, dec_id=tokenizer.dec_id)
