"""Tests of released.py. Each official layout is built, at tiny widths, from independent modules:
timm's VisionTransformer and Hugging Face's BERT layers, cross-attention where ALBEF (from its
fusion layer on) and BLIP (every layer) put it, the key names and extra entries (position-id
buffers, tied LM-head copies, queues) as the official model classes save them. The file is
converted and loaded into the project's model, and its forward passes (ITC features, ITM logits,
MLM and LM logits, VQA answer scores, SNLI-VE logits) equal the same forward written with those
modules, to 1e-5."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import released
from heads import CaptionModel, VEModel, load_pretrained
from model import ELIPModel, ModelConfig
from pruning import PruneConfig
from tokenizer import BLIP_TOKENS, SPECIALS, Tokenizer
from vit import interpolate_pos_embed
from vqa import VQADecoderModel

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("transformers.models.bert.modeling_bert")

# tiny: heads of width 16 (the released models' 64 would need wider layers)
HEAD, D, MLP, IMG, PATCH, DEPTH, E, Q = 16, 32, 64, 32, 8, 2, 16, 8
TEXT, FUSION = 2, 2             # ALBEF's text and fusion layers; BLIP's encoder has TEXT + FUSION
PAD, CLS, SEP, MASK = 0, 2, 3, 4
V = 40                          # vocabulary; BLIP's last two ids are [DEC] and [ENC], as BLIP's
DEC, ENC = V - 2, V - 1
TOL = 1e-5


def randomize(module, seed):
    """Every weight random (biases and LayerNorm too), so a weight loaded into the wrong place
    shows in the outputs; LayerNorm scales (the only 1-D weights) around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.copy_(scale + 0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def bert_config(cross):
    return transformers.BertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=TEXT + FUSION, num_attention_heads=D // HEAD,
        intermediate_size=MLP, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=cross, add_cross_attention=cross, attn_implementation="eager")


def additive(keep, dtype=torch.float32):
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


class RefBert(nn.Module):
    """Hugging Face's BertEmbeddings and BertLayers, cross-attention from layer first_cross on,
    reading tokens of width `context` (ALBEF's and BLIP's BERT take the image's width there).
    Without token types (BLIP's med.py has none) the type-0 row is zero and leaves the file."""

    def __init__(self, layers, first_cross, seed, token_types=True, context=D):
        super().__init__()
        plain, cross = bert_config(False), bert_config(True)
        self.embeddings = hf.BertEmbeddings(plain)
        self.layer = nn.ModuleList(hf.BertLayer(cross if i >= first_cross else plain, layer_idx=i)
                                   for i in range(layers))
        for layer in self.layer[first_cross:]:
            layer.crossattention.self.key = nn.Linear(context, D)
            layer.crossattention.self.value = nn.Linear(context, D)
        randomize(self, seed)
        self.token_types = token_types
        if not token_types:
            nn.init.zeros_(self.embeddings.token_type_embeddings.weight)

    def forward(self, ids=None, mask=None, context=None, context_mask=None, causal=False,
                hidden=None, start=0, end=None):
        """Layers start:end on the embedded ids (or on `hidden`); cross-attention to `context`
        where a layer has it and context is given; `mask` (B, L) and `context_mask` (B, S): 1 for
        a real token."""
        x = self.embeddings(input_ids=ids) if hidden is None else hidden
        keep = mask.bool()[:, None, None, :]
        if causal:
            keep = keep & torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        cmask = (None if context_mask is None
                 else additive(context_mask.bool()[:, None, None, :], x.dtype))
        for layer in self.layer[start:end]:
            x = layer(x, additive(keep, x.dtype), encoder_hidden_states=context,
                      encoder_attention_mask=cmask)
        return x

    def official(self, prefix):
        """The keys as xbert.py / med.py save them: embeddings with their position-id buffer,
        encoder.layer.*."""
        state = {f"{prefix}embeddings.{k}": v for k, v in self.embeddings.state_dict().items()
                 if self.token_types or "token_type" not in k}
        state[prefix + "embeddings.position_ids"] = torch.arange(512)[None]
        for i, layer in enumerate(self.layer):
            state |= prefixed(f"{prefix}encoder.layer.{i}.", layer)
        return state


def lm_head(bert, seed):
    """BERT's cls.predictions, its output matrix and bias tied as in xbert.py and med.py."""
    head = randomize(hf.BertOnlyMLMHead(bert_config(False)), seed)
    head.predictions.decoder.weight = bert.embeddings.word_embeddings.weight
    head.predictions.decoder.bias = head.predictions.bias
    return head


def ref_vit(seed, width=D):
    return randomize(timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=width, depth=DEPTH, num_heads=width // HEAD,
        mlp_ratio=4, qkv_bias=True, num_classes=0), seed)


def linear(d_in, d_out, seed):
    return randomize(nn.Linear(d_in, d_out), seed)


def prefixed(prefix, module):
    return {prefix + k: v for k, v in module.state_dict().items()}


def queues(seed, ids=False):
    g = torch.Generator().manual_seed(seed)
    state = {"image_queue": F.normalize(torch.randn(E, Q, generator=g), dim=0),
             "text_queue": F.normalize(torch.randn(E, Q, generator=g), dim=0)}
    if ids:          # image ids of fine-tuning, the slots never written still -100
        state["idx_queue"] = torch.tensor([[5, 6, 7, 8, 9, -100, -100, -100]])
    return state


def contrastive(ref, vision_width):
    """The ViT, projections and ITM head of a pre-training or retrieval model and the momentum
    copies, set on ref; returns their keys and the temperature's."""
    mods = dict(visual_encoder=ref_vit(1, vision_width), vision_proj=linear(vision_width, E, 2),
                text_proj=linear(D, E, 3), itm_head=linear(D, 2, 4),
                visual_encoder_m=ref_vit(11, vision_width),
                vision_proj_m=linear(vision_width, E, 12), text_proj_m=linear(D, E, 13))
    for name, module in mods.items():
        setattr(ref, name, module)
    state = {k: v for name, module in mods.items() for k, v in prefixed(name + ".", module).items()}
    return {**state, "temp": torch.tensor(0.05)}


def albef_file(task):
    """An ALBEF-layout file of `task` (pretrain, retrieval, vqa, ve) and its reference modules."""
    ref = SimpleNamespace(family="albef")
    ref.text, ref.text_m = RefBert(TEXT + FUSION, TEXT, 21), RefBert(TEXT + FUSION, TEXT, 22)
    bert = "text_encoder.bert." if task == "pretrain" else "text_encoder."
    state = {**ref.text.official(bert), **ref.text_m.official(bert.replace("encoder", "encoder_m"))}
    if task in ("pretrain", "retrieval"):
        state |= contrastive(ref, D) | queues(5, ids=task == "retrieval")
        state["queue_ptr"] = torch.tensor([4])
    else:
        ref.visual_encoder, ref.visual_encoder_m = ref_vit(1), ref_vit(11)
        state |= prefixed("visual_encoder.", ref.visual_encoder)
        state |= prefixed("visual_encoder_m.", ref.visual_encoder_m)
    if task == "pretrain":
        ref.mlm, ref.mlm_m = lm_head(ref.text, 31), lm_head(ref.text_m, 32)
        state |= prefixed("text_encoder.cls.", ref.mlm) | prefixed("text_encoder_m.cls.", ref.mlm_m)
    if task == "vqa":       # the answer decoder: as many layers as the fusion layers
        for suffix, seed in (("", 41), ("_m", 42)):
            dec = RefBert(FUSION, 0, seed)
            setattr(ref, "decoder" + suffix, dec)
            setattr(ref, "lm" + suffix, lm_head(dec, seed + 10))
            state |= dec.official(f"text_decoder{suffix}.bert.")
            state |= prefixed(f"text_decoder{suffix}.cls.", getattr(ref, "lm" + suffix))
    if task == "ve":
        ref.cls_head = randomize(nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 3)), 51)
        ref.cls_head_m = randomize(nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 3)), 52)
        state |= prefixed("cls_head.", ref.cls_head) | prefixed("cls_head_m.", ref.cls_head_m)
    return state, ref


def tie_like_blip(decoder, encoder):
    """BLIP's tie_encoder_decoder_weights: every module of the decoder but self-attention is the
    encoder's."""
    decoder.embeddings = encoder.embeddings
    for dec, enc in zip(decoder.layer, encoder.layer):
        dec.crossattention, dec.intermediate = enc.crossattention, enc.intermediate
        dec.output = enc.output


def blip_file(task, vision_width=D):
    """A BLIP-layout file of `task` (pretrain, retrieval, caption, vqa) and its reference
    modules."""
    ref, state = SimpleNamespace(family="blip"), {}
    n = TEXT + FUSION
    if task != "caption":
        ref.text = RefBert(n, 0, 21, token_types=False, context=vision_width)
        state |= ref.text.official("text_encoder.")
    if task in ("pretrain", "retrieval"):
        ref.text_m = RefBert(n, 0, 22, token_types=False, context=vision_width)
        state |= ref.text_m.official("text_encoder_m.") | contrastive(ref, vision_width)
        state |= queues(5, ids=task == "retrieval")
        state["queue_ptr" if task == "pretrain" else "ptr_queue"] = torch.tensor([4])
    else:
        ref.visual_encoder = ref_vit(1, vision_width)
        state |= prefixed("visual_encoder.", ref.visual_encoder)
    if task != "retrieval":
        # the decoder reads the image, or in VQA the question's states (width D)
        ref.decoder = RefBert(n, 0, 41, token_types=False,
                              context=D if task == "vqa" else vision_width)
        if task == "pretrain":
            tie_like_blip(ref.decoder, ref.text)
        ref.lm = lm_head(ref.decoder, 51)
        state |= ref.decoder.official("text_decoder.bert.") | prefixed("text_decoder.cls.", ref.lm)
    return state, ref


def tokenizer(family):
    words = [f"w{i}" for i in range(len(SPECIALS), V - 2)]
    return Tokenizer(list(SPECIALS) + words + (list(BLIP_TOKENS) if family == "blip" else ["x", "y"]))


def model_config(conv):
    """The project's config for the file: a tiny base, the checkpoint's architecture and the
    vocabulary's ids (released.model_config)."""
    base = ModelConfig(text_dropout=0.0, max_len=16, prune=PruneConfig(method="none"))
    return released.model_config(conv, base, tokenizer(conv.family))


def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, IMG, IMG, generator=g)
    ids = torch.randint(5, V - 2, (3, 7), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return images, ids, mask


def close(ours, theirs, mask=None):
    """Equal to TOL, at the real (unpadded) text positions when mask is given."""
    if mask is not None:
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < TOL


def with_first(ids, token):
    out = ids.clone()
    out[:, 0] = token
    return out


def reference_features(ref, images, ids, mask, momentum=False):
    """The official ITC forward: ViT tokens, text states (ALBEF: the text layers; BLIP: every
    layer, cross-attention skipped), normalised projections of both [CLS]."""
    s = "_m" if momentum else ""
    img = getattr(ref, "visual_encoder" + s).forward_features(images)
    txt = getattr(ref, "text" + s)(ids, mask, end=TEXT if ref.family == "albef" else None)
    return (img, txt, F.normalize(getattr(ref, "vision_proj" + s)(img[:, 0]), dim=-1),
            F.normalize(getattr(ref, "text_proj" + s)(txt[:, 0]), dim=-1))


def reference_fused(ref, img, txt, ids, mask):
    """ALBEF: the fusion layers on the text states; BLIP: every layer on [ENC] + the text."""
    if ref.family == "albef":
        return ref.text(hidden=txt, mask=mask, context=img, start=TEXT)
    return ref.text(with_first(ids, ENC), mask, context=img)


def check_contrastive(model, ref):
    """ITC features (online and momentum) and ITM logits of the loaded model equal the reference's.
    Returns the batch and the model's image tokens."""
    images, ids, mask = batch()
    with torch.no_grad():
        img, txt, image_feat, text_feat = reference_features(ref, images, ids, mask)
        image_embeds, text_embeds = model.encode_image(images), model.encode_text(ids, mask)
        close(image_embeds, img)
        close(text_embeds, txt, mask)
        close(model.image_feat(image_embeds), image_feat)
        close(model.text_feat(text_embeds), text_feat)
        _, _, image_feat_m, text_feat_m = reference_features(ref, images, ids, mask, momentum=True)
        image_m = model.encode_image(images, momentum=True)
        close(model.image_feat(image_m, momentum=True), image_feat_m)
        text_m = model.encode_text(ids, mask, momentum=True)
        close(model.text_feat(text_m, momentum=True), text_feat_m)
        itm = ref.itm_head(reference_fused(ref, img, txt, ids, mask)[:, 0])
        close(model.itm_logits(text_embeds, mask, image_embeds, ids), itm)
    return images, ids, mask, image_embeds, img


def check_queues(model, state):
    assert torch.equal(model.image_queue, state["image_queue"])
    assert torch.equal(model.text_queue, state["text_queue"])
    assert model.queue_ptr.shape == () and model.queue_ptr.item() == 4
    assert model.queue_filled.all()


def test_albef_pretrain_loads_strictly_and_matches_the_official_forward():
    """ALBEF's pre-training file: every key placed or dropped for a stated reason, the project's
    ELIPModel loads it strictly (train_pretrain --init_from), and ITC, ITM and MLM agree."""
    state, ref = albef_file("pretrain")
    assert released.layout_of(state) == "albef_pretrain"
    conv = released.to_ours(state, head_dim=HEAD)
    assert (conv.family, conv.task, conv.momentum) == ("albef", "pretrain", True)
    assert conv.config["text_layers"] == TEXT and conv.config["fusion_layers"] == FUSION
    assert conv.config["losses"] == ("itc", "itm", "mlm") and conv.config["vocab_size"] == V
    assert set(conv.dropped) == {f"text_encoder{m}.{k}" for m in ("", "_m") for k in (
        "bert.embeddings.position_ids", "cls.predictions.decoder.weight",
        "cls.predictions.decoder.bias")}
    assert conv.derived == ["queue_filled", "idx_queue"]
    model = ELIPModel(model_config(conv)).eval()
    model.load_state_dict(conv.state)                       # strict: every key of ours, no other
    check_queues(model, state)
    assert (model.idx_queue == -1).all()
    images, ids, mask, image_embeds, img = check_contrastive(model, ref)
    with torch.no_grad():
        hidden = model.text_encoder(ids, mask, image_embeds, mode="multimodal")
        ours = model.text_encoder.lm_logits(hidden)
        close(ours, ref.mlm(ref.text(ids, mask, context=img)), mask)


def test_blip_pretrain_loads_strictly_and_matches_the_official_forward():
    """BLIP's pre-training file: the decoder's tied copies checked and shared, [ENC] for ITM,
    [DEC] and a causal mask for the LM, no token types."""
    state, ref = blip_file("pretrain")
    assert released.layout_of(state) == "blip_pretrain"
    conv = released.to_ours(state, head_dim=HEAD)
    assert conv.config["fusion_layers"] == 0 and conv.config["text_layers"] == TEXT + FUSION
    assert not conv.config["token_types"] and conv.config["losses"] == ("itc", "itm", "lm")
    assert set(conv.dropped) == {"text_encoder.embeddings.position_ids",
                                 "text_encoder_m.embeddings.position_ids",
                                 "text_decoder.bert.embeddings.position_ids",
                                 "text_decoder.cls.predictions.decoder.weight",
                                 "text_decoder.cls.predictions.decoder.bias"}
    model = ELIPModel(model_config(conv)).eval()
    model.load_state_dict(conv.state)
    check_queues(model, state)
    images, ids, mask, image_embeds, img = check_contrastive(model, ref)
    with torch.no_grad():
        ours = model.text_decoder.lm_logits(model.decode(ids, mask, image_embeds))
        theirs = ref.lm(ref.decoder(with_first(ids, DEC), mask, context=img, causal=True))
        close(ours, theirs, mask)


def test_blip_pretrain_with_untied_decoder_is_refused():
    state, _ = blip_file("pretrain")
    key = "text_decoder.bert.encoder.layer.1.intermediate.dense.weight"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match=r"text_decoder\.bert\.encoder\.layer\.1\.intermediate"
                                         r"\.dense\.weight differs from text_encoder"):
        released.to_ours(state, head_dim=HEAD)


@pytest.mark.parametrize("family, vision_width", [("albef", D), ("blip", D), ("blip", 48)])
def test_retrieval_files_load_whole_and_match(family, vision_width):
    """The fine-tuned retrieval files (ALBEF: COCO, Flickr30k, RefCOCO+; BLIP: COCO, Flickr30k,
    base and large, whose ViT-L is wider than the text: 48 here) load through
    heads.load_pretrained into retrieval's ELIPModel with every key used."""
    state, ref = (albef_file("retrieval") if family == "albef"
                  else blip_file("retrieval", vision_width))
    assert released.layout_of(state) == f"{family}_retrieval"
    conv = released.to_ours(state, head_dim=HEAD)
    assert conv.config["vision_width"] == vision_width and conv.config["losses"] == ("itc", "itm")
    model = ELIPModel(model_config(conv)).eval()
    report = load_pretrained(model, conv.state)
    assert report["initialised"] == [] and report["unused"] == [] and report["interpolated"] == []
    check_queues(model, state)
    assert model.idx_queue.tolist() == [5, 6, 7, 8, 9, -1, -1, -1]
    check_contrastive(model, ref)


def reference_vqa(ref, images, ids, mask, answer_ids, answer_mask):
    """The official ranking's score of every answer for every question: the decoder reads the
    question's multimodal states (BLIP: [ENC] first); ALBEF's log p(first answer token) - the
    answer's summed cross-entropy (models/model_vqa.py rank_answer), BLIP's minus the summed
    cross-entropy with label smoothing 0.1 (models/blip_vqa.py, med.py)."""
    albef = ref.family == "albef"
    img = ref.visual_encoder.forward_features(images)
    states = ref.text(ids if albef else with_first(ids, ENC), mask, context=img)
    answers = with_first(answer_ids, CLS if albef else DEC)
    labels = answers[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)
    A, rows = answers.shape[0], []
    for b in range(ids.shape[0]):
        logits = ref.lm(ref.decoder(answers, answer_mask, context=states[b:b + 1].expand(A, -1, -1),
                                    context_mask=mask[b:b + 1].expand(A, -1), causal=True))
        score = -F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                                 label_smoothing=0.0 if albef else 0.1).sum(1)
        if albef:
            score = score + logits[:, 0].softmax(-1).gather(1, answers[:, 1:2]).squeeze(1).log()
        rows.append(score)
    return torch.stack(rows)


ANSWERS = torch.tensor([[CLS, 10, SEP, PAD], [CLS, 11, 12, SEP], [CLS, 13, SEP, PAD],
                        [CLS, 10, 14, SEP]])
ANSWER_MASK = (ANSWERS != PAD).long()


@pytest.mark.parametrize("family", ["albef", "blip"])
def test_vqa_files_load_whole_and_rank_answers_as_the_official_model(family):
    """ALBEF's VQA file (answer decoder of the fusion layers' depth, momentum copies: trained with
    distill) and BLIP's (a decoder as deep as the encoder, no momentum) load into
    VQADecoderModel with every key used; the answer scores agree."""
    state, ref = albef_file("vqa") if family == "albef" else blip_file("vqa")
    assert released.layout_of(state) == f"{family}_vqa"
    conv = released.to_ours(state, head_dim=HEAD)
    assert conv.momentum == (family == "albef")
    model = VQADecoderModel(model_config(conv), ANSWERS, ANSWER_MASK, k_test=len(ANSWERS),
                            distill=conv.momentum).eval()
    report = load_pretrained(model, conv.state)
    assert report["initialised"] == [] and report["unused"] == []
    # in float64: the scores are sums of log-probabilities (about 15), whose float32 rounding
    # alone comes near 1e-5
    for module in [model, *vars(ref).values()]:
        if isinstance(module, nn.Module):
            module.double()
    images, ids, mask = batch()
    with torch.no_grad():
        close(model.answer_scores({"image": images.double(), "question_ids": ids, "question_mask": mask}),
              reference_vqa(ref, images.double(), ids, mask, ANSWERS, ANSWER_MASK))


def test_albef_ve_file_loads_whole_and_matches():
    state, ref = albef_file("ve")
    assert released.layout_of(state) == "albef_ve"
    conv = released.to_ours(state, head_dim=HEAD)
    model = VEModel(model_config(conv), distill=conv.momentum).eval()
    report = load_pretrained(model, conv.state)
    assert report["initialised"] == [] and report["unused"] == []
    images, ids, mask = batch()
    with torch.no_grad():
        for s in ("", "_m"):
            img = getattr(ref, "visual_encoder" + s).forward_features(images)
            cls = getattr(ref, "text" + s)(ids, mask, context=img)[:, 0]
            close(model.logits({"image": images, "text_ids": ids, "text_mask": mask}, momentum=bool(s)),
                  getattr(ref, "cls_head" + s)(cls))


def test_blip_caption_file_loads_whole_and_matches():
    state, ref = blip_file("caption")
    assert released.layout_of(state) == "blip_caption"
    conv = released.to_ours(state, head_dim=HEAD)
    model = CaptionModel(model_config(conv), [CLS, 10, 11], SEP).eval()
    report = load_pretrained(model, conv.state)
    assert report["initialised"] == [] and report["unused"] == []
    images, ids, mask = batch()
    with torch.no_grad():
        img = ref.visual_encoder.forward_features(images)
        ours = model.text_decoder.lm_logits(model.decode(ids, mask, model.encode_image(images)))
        close(ours, ref.lm(ref.decoder(with_first(ids, DEC), mask, context=img, causal=True)), mask)


def test_position_embeddings_are_interpolated_to_the_resolution_asked():
    """ALBEF pre-trains at 256 px and fine-tunes at 384: img_size resizes both ViTs' position
    embeddings as vit.interpolate_pos_embed does, and the config follows."""
    state, _ = albef_file("pretrain")
    conv = released.to_ours(released.unwrap({"model": state}), img_size=48, head_dim=HEAD)
    assert conv.interpolated == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    assert conv.config["img_size"] == 48
    assert conv.state["visual_encoder.pos_embed"].shape == (1, 37, D)
    assert torch.equal(conv.state["visual_encoder_m.pos_embed"],
                       interpolate_pos_embed(state["visual_encoder_m.pos_embed"], 36))
    ELIPModel(model_config(conv)).load_state_dict(conv.state)
    assert released.to_ours(state, img_size=IMG, head_dim=HEAD).interpolated == []


def test_ddp_prefix_and_checkpoint_dict_are_unwrapped():
    state, _ = blip_file("caption")
    wrapped = {"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    assert released.layout_of(released.unwrap(wrapped)) == "blip_caption"


def test_pretrained_files_feed_the_downstream_loader():
    """--pretrained with a released pre-training file: heads.load_pretrained builds ALBEF's VQA
    decoder from the fusion layers and the MLM head (ALBEF's VQA.py), and BLIP's captioner takes
    the pre-trained decoder; what the task drops is listed."""
    state, _ = albef_file("pretrain")
    conv = released.to_ours(state, head_dim=HEAD)
    vqa = VQADecoderModel(model_config(conv), ANSWERS, ANSWER_MASK, distill=True)
    report = load_pretrained(vqa, conv.state)
    assert report["initialised"] == []
    assert {k.split(".")[0] for k in report["unused"]} == {
        "vision_proj", "text_proj", "itm_head", "temp", "vision_proj_m", "text_proj_m",
        "image_queue", "text_queue", "idx_queue", "queue_filled", "queue_ptr"}
    key = "crossattention.self.key.weight"     # decoder layer 0 is the first fusion layer
    assert torch.equal(vqa.text_decoder.state_dict()[f"encoder.layer.0.{key}"],
                       state[f"text_encoder.bert.encoder.layer.{TEXT}.{key}"])
    state, _ = blip_file("pretrain")
    conv = released.to_ours(state, head_dim=HEAD)
    report = load_pretrained(CaptionModel(model_config(conv), [CLS, 10], SEP), conv.state)
    assert report["initialised"] == [] and "text_decoder.cls.predictions.bias" in report["loaded"]


@pytest.mark.parametrize("family", ["albef", "blip"])
def test_nlvr_files_are_recognised_and_refused_with_the_reason(family):
    """NLVR2's official models attend to both images inside the text encoder, the project's
    NLVRModel fuses each image alone: recognised, and refused with the difference named."""
    if family == "albef":      # models/model_nlvr.py: each fusion layer twice, a 2-way cls_head
        ref = RefBert(TEXT + 2 * FUSION, TEXT, 21)
        head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 2))
        state = (prefixed("visual_encoder.", ref_vit(1)) | ref.official("text_encoder.")
                 | prefixed("cls_head.", head))
        reason = "18-layer text encoder"
    else:                      # models/nlvr_encoder.py: two cross-attentions per layer
        state, _ = blip_file("retrieval")
        state["text_encoder.encoder.layer.0.crossattention.self0.query.weight"] = torch.zeros(D, D)
        reason = "two cross-attentions"
    assert released.layout_of(state) == f"{family}_nlvr"
    with pytest.raises(ValueError, match=reason):
        released.to_ours(state)


def test_unknown_layouts_name_the_keys_they_could_not_place():
    clip = {"visual.conv1.weight": torch.zeros(1), "visual.class_embedding": torch.zeros(1),
            "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"cannot place 3 of its 3 keys, first \['visual\.conv1"
                                         r"\.weight', 'visual\.class_embedding', 'transformer"):
        released.layout_of(clip)
    state, _ = albef_file("retrieval")
    state["text_encoder.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"cannot place 1 .*attention\.self\.rotary\.weight"):
        released.to_ours(state)
    del state["text_encoder.encoder.layer.0.attention.self.rotary.weight"]
    with pytest.raises(ValueError, match="are those of albef_retrieval, not blip_retrieval"):
        released.to_ours(state, "blip_retrieval")
    vit_only = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    with pytest.raises(ValueError, match=r"only \['visual_encoder'\]"):
        released.layout_of(vit_only)


def test_an_untied_lm_head_is_refused_by_name():
    state, _ = albef_file("pretrain")
    state["text_encoder_m.cls.predictions.decoder.weight"] = torch.zeros(V, D)
    with pytest.raises(ValueError, match=r"text_encoder_m\.cls\.predictions\.decoder\.weight is "
                                         r"not a copy of text_encoder_m\.bert\.embeddings"):
        released.to_ours(state, head_dim=HEAD)


def test_the_vocabulary_must_be_the_checkpoints():
    """The files carry no vocabulary: the one given must have their rows, BLIP's [DEC] and [ENC]
    last."""
    state, _ = blip_file("caption")
    conv = released.to_ours(state, head_dim=HEAD)
    base = ModelConfig(prune=PruneConfig(method="none"))
    albef_words = tokenizer("albef")
    with pytest.raises(ValueError, match=r"\[DEC\] and \[ENC\] are its last two rows \(38, 39"):
        released.model_config(conv, base, albef_words)
    with pytest.raises(ValueError, match="word embeddings have 40 rows, the vocabulary 41"):
        released.model_config(conv, base, albef_words.add_tokens(["[DEC]"]))
    cfg = released.model_config(conv, base, tokenizer("blip"))
    assert (cfg.dec_id, cfg.enc_id, cfg.vocab_size, cfg.blip_tokens) == (DEC, ENC, V, True)
