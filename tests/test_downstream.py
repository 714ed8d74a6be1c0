"""train_downstream.py on a very small model: every task fine-tunes two steps from JSON files and a
folder of images in the real formats and writes its metrics; pruning is off downstream unless
asked for; pre-trained weights load strictly; greedy and beam-search decoding agree with the
model's own scores."""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tasks
import train_downstream
import train_pretrain
import vit
from config import config_from_dict
from heads import CaptionModel, FusionModel, NLVRModel, VEModel, load_pretrained
from model import ELIPModel, ModelConfig
from pruning import PruneConfig, token_counts
from test_train_pretrain import ROOT, SMALL
from tokenizer import Tokenizer
from vqa import VQADecoderModel, VQAModel

TASKS = ("retrieval", "vqa", "nlvr", "ve", "caption")
COLOURS = [(220, 40, 40), (40, 200, 70), (40, 90, 235), (245, 215, 30), (170, 60, 230),
           (255, 140, 0)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A two-step ALBEF-style checkpoint (2 text + 2 fusion layers, ITC + ITM + MLM, ELIP)."""
    out = tmp_path_factory.mktemp("pretrain")
    train_pretrain.main(SMALL + ["--out_dir", str(out), "--max_steps", "2"])
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def pretrained_blip(tmp_path_factory):
    """A two-step BLIP-style checkpoint: cross-attention in every layer, a decoder (LM loss)."""
    out = tmp_path_factory.mktemp("pretrain_blip")
    train_pretrain.main(SMALL + ["--out_dir", str(out), "--max_steps", "2", "--text_layers", "3",
                                 "--fusion_layers", "0", "--losses", "itc,itm,lm"])
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def pretrained_blip_tied(tmp_path_factory):
    """A two-step checkpoint with BLIP's own model: [DEC] and [ENC] added to the vocabulary, the
    decoder tied to the text encoder, no token-type embeddings."""
    out = tmp_path_factory.mktemp("pretrain_blip_tied")
    train_pretrain.main(SMALL + ["--out_dir", str(out), "--max_steps", "2", "--text_layers", "3",
                                 "--fusion_layers", "0", "--losses", "itc,itm,lm",
                                 "--blip_tokens", "true", "--tie_decoder", "true",
                                 "--token_types", "false", "--itm_weight_eps", "1e-4"])
    return str(out / "checkpoint.pt")


def write_task(tmp_path, task):
    """Train and test JSON files in the task's ALBEF/BLIP format, PNG images in a folder, and
    the flags that point train_downstream at them."""
    root = tmp_path / "images"
    root.mkdir()
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (48, 40), (60, 60, 60))
        image.paste(colour, (4 + 6 * i, 8, 20 + 6 * i, 24))
        image.save(root / f"im{i}.png")
    names = ["red", "green", "blue", "yellow", "purple", "orange"]
    if task in ("retrieval", "caption"):
        train = [{"image": f"im{i}.png", "caption": cap, "image_id": f"img{i}"}
                 for i, n in enumerate(names) for cap in (f"a {n} square", f"a {n} square on the left")]
        test = [{"image": f"im{i}.png", "caption": [f"a {n} square", f"a small {n} square"]}
                for i, n in enumerate(names[:4])]
    elif task == "vqa":
        train = [{"question_id": i, "question": "What color is the square?",
                  "answer": [n] * 8 + ["red", "blue"], "image": f"im{i}.png"}
                 for i, n in enumerate(names)]
        test = [{"question_id": 100 + i, **{k: v for k, v in e.items() if k != "question_id"}}
                for i, e in enumerate(train[:4])]
    elif task == "nlvr":
        train = [{"images": [f"im{i}.png", f"im{(i + 1) % 6}.png"],
                  "sentence": f"the left image contains a {n} square", "label": i % 2 == 0}
                 for i, n in enumerate(names)] + \
                [{"images": ["im0.png", "im1.png"], "sentence": "both images contain a square",
                  "label": "True"}, {"images": ["im2.png", "im3.png"],
                                     "sentence": "neither image contains a square", "label": "False"}]
        test = train[:4]
    else:
        labels = ("entailment", "neutral", "contradiction")
        train = [{"image": f"im{i}.png", "sentence": f"a {n} square", "label": labels[i % 3]}
                 for i, n in enumerate(names)] * 2
        test = train[:4]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    flags = ["--train_file", str(tmp_path / "train.json"), "--test_file", str(tmp_path / "test.json"),
             "--image_root", str(root)]
    if task == "vqa":
        (tmp_path / "answers.json").write_text(json.dumps(names))
        flags += ["--answer_list", str(tmp_path / "answers.json")]
    return flags


def run_task(tmp_path, pretrained, task, *extra):
    out = tmp_path / "out"
    train_downstream.main(["--task", task, "--pretrained", pretrained, *write_task(tmp_path, task),
                           "--out_dir", str(out), "--batch_size", "4", "--max_steps", "2",
                           "--warmup_steps", "1", "--log_every", "1", "--eval_k", "3",
                           "--eval_batch_size", "3", "--beam", "2", "--max_length", "8",
                           *extra])
    return out


@pytest.fixture
def vit_lengths(monkeypatch):
    """(training mode, sequence length) of every ViT layer call, look-ahead passes included."""
    calls, forward = [], vit.Block.forward

    def recording(self, x, size=None):
        calls.append((self.training, x.shape[1]))
        return forward(self, x, size)

    monkeypatch.setattr(vit.Block, "forward", recording)
    return calls


@pytest.mark.parametrize("task", TASKS)
def test_task_fine_tunes_from_json_and_evaluates(tmp_path, pretrained, vit_lengths, task):
    out = run_task(tmp_path, pretrained, task)
    steps = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [r["step"] for r in steps if "step" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps if "step" in r)
    rec = json.loads((out / "metrics.json").read_text())
    test = rec["test"][str(tmp_path / "test.json")]
    m, base = test["metrics"], test["baseline"]
    if task == "retrieval":
        assert all(0 <= m[k] <= 100 for k in ("txt_r1", "img_r10", "r_mean"))
        assert m["txt_r10"] == m["img_r10"] == 100.0          # 4 test images: all in the top 10
        assert 0 <= m["itc"]["r_mean"] <= 100 and base["img_r1"] == 25.0
    elif task == "vqa":
        assert 0 <= m["vqa_score"] <= 1 and 0 <= base["vqa_score"] <= 1
        preds = json.loads((out / "predictions.json").read_text())[str(tmp_path / "test.json")]
        assert [p["question_id"] for p in preds] == [100, 101, 102, 103]
        assert all(p["answer"] in ("red", "green", "blue", "yellow", "purple", "orange") for p in preds)
    elif task in ("nlvr", "ve"):
        assert m["accuracy"] in (0, 0.25, 0.5, 0.75, 1.0) and 0 <= base["accuracy"] <= 1
        preds = json.loads((out / "predictions.json").read_text())[str(tmp_path / "test.json")]
        hits = [p["prediction"] == p["label"] for p in preds]
        assert len(preds) == 4 and sum(hits) / 4 == m["accuracy"]
    else:
        assert all(m[k] >= 0 for k in ("greedy_bleu4", "greedy_cider_d", "beam_bleu4", "beam_cider_d"))
        preds = json.loads((out / "predictions.json").read_text())[str(tmp_path / "test.json")]
        assert len(preds) == 4 and all(isinstance(p["beam"], str) for p in preds)
    assert rec["prune"]["method"] == "none" and test["test_samples"] == 4
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and saved["model_config"]["prune"]["method"] == "none"
    # pruning is off by default: every ViT layer saw all 16 patches + [CLS], in fine-tuning and
    # in evaluation
    assert {train for train, _ in vit_lengths} == {True, False}
    assert {n for _, n in vit_lengths} == {17}


@pytest.mark.parametrize("task", TASKS)
def test_prune_flag_prunes_in_fine_tuning_and_evaluation(tmp_path, pretrained, vit_lengths, task):
    out = run_task(tmp_path, pretrained, task, "--prune", "true")
    schedule = PruneConfig()        # the checkpoint's: ELIP's default schedule
    shortest = min(token_counts(16, 12, schedule))                 # 1 + int(16 * 0.4) + 1 = 8
    train = {n for t, n in vit_lengths if t}
    evaluation = {n for t, n in vit_lengths if not t}
    assert min(train) == shortest
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["prune"]["method"] == "elip"
    if task == "retrieval":
        # each test image is embedded once for every caption: no text to guide the pruning
        assert evaluation == {17} and rec["prune"]["in_eval"] is False
    else:
        assert min(evaluation) == shortest and rec["prune"]["in_eval"] is True


def model_config(path, task, prune=False):
    ckpt = torch.load(path, weights_only=True)
    cfg = train_downstream.DownstreamConfig(task=task, prune=prune)
    mc = config_from_dict(ModelConfig, ckpt["config"]["model"])
    return tasks.downstream_model_config(mc, cfg), ckpt


def test_strict_loading_reports_heads_and_dropped_keys(pretrained):
    mc, ckpt = model_config(pretrained, "vqa")
    state = ckpt["model"]
    model = VQAModel(mc, 7)
    rep = load_pretrained(model, state)
    ours = model.state_dict()
    assert sorted(rep["loaded"] + rep["initialised"]) == sorted(ours)
    assert rep["initialised"] == [k for k in ours if k.startswith("vqa_head.")]
    assert sorted(rep["unused"]) == sorted(k for k in state if k not in ours)
    dropped = {k.split(".")[0] for k in rep["unused"]}
    assert {"visual_encoder_m", "text_encoder_m", "image_queue", "itm_head", "vision_proj"} <= dropped
    assert "text_encoder.cls.predictions.bias" in rep["unused"]             # the MLM head
    for k in rep["loaded"]:
        assert torch.equal(ours[k], state[k]), k
    # retrieval keeps everything it needs, momentum encoders and queues included
    retrieval = ELIPModel(model_config(pretrained, "retrieval")[0])
    rep = load_pretrained(retrieval, state)
    assert rep["initialised"] == [] and "image_queue" in rep["loaded"]
    assert {k.split(".")[1] for k in rep["unused"]} == {"cls"}              # the MLM heads only
    # a missing weight that is not a head, or a wrong shape, is an error naming it
    with pytest.raises(ValueError, match="visual_encoder.pos_embed"):
        load_pretrained(VQAModel(mc, 7), {k: v for k, v in state.items() if k != "visual_encoder.pos_embed"})
    bad = {**state, "text_encoder.embeddings.word_embeddings.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="shape mismatch for text_encoder.embeddings.word_embeddings"):
        load_pretrained(VQAModel(mc, 7), bad)


def test_decoder_initialised_from_the_text_encoder(pretrained, pretrained_blip):
    mc, ckpt = model_config(pretrained, "caption")
    state, tok = ckpt["model"], Tokenizer(ckpt["vocab"])
    model = CaptionModel(mc, tok.encode("a picture of")[:-1], tok.sep_id)
    rep = load_pretrained(model, state)
    # 2 text + 2 fusion layers: the decoder's first two layers have cross-attention that the
    # encoder has not; that is all that stays random
    assert rep["initialised"] and all(k.startswith(("text_decoder.encoder.layer.0.crossattention",
                                                    "text_decoder.encoder.layer.1.crossattention"))
                                      for k in rep["initialised"])
    ours = model.state_dict()
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.3.crossattention.self.key.weight", "encoder.layer.1.output.dense.bias",
                 "cls.predictions.transform.dense.weight"):
        assert torch.equal(ours["text_decoder." + name], state["text_encoder." + name]), name
    # a BLIP checkpoint has its own decoder: everything loads from it
    mc, ckpt = model_config(pretrained_blip, "caption")
    blip = CaptionModel(mc, [tok.cls_id], tok.sep_id)
    rep = load_pretrained(blip, ckpt["model"])
    assert rep["initialised"] == [] and rep["loaded"] == list(blip.state_dict())
    assert torch.equal(blip.state_dict()["text_decoder.encoder.layer.0.crossattention.self.key.weight"],
                       ckpt["model"]["text_decoder.encoder.layer.0.crossattention.self.key.weight"])


@pytest.mark.parametrize("backbone, head", [("albef", "decoder"), ("blip", "decoder"),
                                           ("albef", "classifier")])
def test_both_vqa_heads_fine_tune_and_answer_from_the_list(tmp_path, pretrained, pretrained_blip,
                                                           backbone, head):
    ckpt = pretrained if backbone == "albef" else pretrained_blip
    out = run_task(tmp_path, ckpt, "vqa", "--vqa_head", head, "--vqa_k", "3")
    steps = [json.loads(l) for l in open(out / "log.jsonl") if "step" in json.loads(l)]
    assert [r["step"] for r in steps] == [1, 2]
    # ALBEF's decoder distils from its momentum model; BLIP's decoder and the classifier do not
    assert ("kd" in steps[0]) == (backbone == "albef" and head == "decoder")
    rec = json.loads((out / "metrics.json").read_text())
    test = rec["test"][str(tmp_path / "test.json")]
    assert 0 <= test["metrics"]["vqa_score"] <= 1
    fresh = rec["weights"]["initialised"]      # the decoder loads every weight; not so the head
    assert fresh == [] if head == "decoder" else fresh and all(k.startswith("vqa_head.")
                                                               for k in fresh)
    preds = json.loads((out / "predictions.json").read_text())[str(tmp_path / "test.json")]
    assert [p["question_id"] for p in preds] == [100, 101, 102, 103]
    assert all(p["answer"] in ("red", "green", "blue", "yellow", "purple", "orange") for p in preds)


def test_vqa_decoder_initialised_from_the_fusion_layers(pretrained, pretrained_blip):
    """ALBEF: decoder layer i is fusion layer i (encoder layer text_layers + i), with the
    encoder's embeddings and MLM head; the momentum decoder likewise from the momentum encoder;
    the encoder keeps every layer. BLIP: the pre-trained decoder, all of it."""
    mc, ckpt = model_config(pretrained, "vqa")
    state, tok = ckpt["model"], Tokenizer(ckpt["vocab"])
    model = VQADecoderModel(mc, *tok(["yes", "no"], 8), distill=True)
    rep = load_pretrained(model, state)
    assert rep["initialised"] == []
    ours, T = model.state_dict(), mc.text_layers
    assert len(model.text_decoder.encoder.layer) == mc.fusion_layers == 2
    for m in ("", "_m"):
        for i in range(mc.fusion_layers):
            for part in ("attention.self.query.weight", "crossattention.self.key.weight",
                         "output.dense.bias"):
                assert torch.equal(ours[f"text_decoder{m}.encoder.layer.{i}.{part}"],
                                   state[f"text_encoder{m}.encoder.layer.{T + i}.{part}"])
        for part in ("embeddings.word_embeddings.weight", "cls.predictions.transform.dense.weight"):
            assert torch.equal(ours[f"text_decoder{m}.{part}"], state[f"text_encoder{m}.{part}"])
    assert all(torch.equal(v, state[k]) for k, v in ours.items()
               if k.startswith(("text_encoder.", "visual_encoder.", "text_encoder_m.")))
    mc, ckpt = model_config(pretrained_blip, "vqa")
    blip = VQADecoderModel(mc, *tok(["yes", "no"], 8))
    rep = load_pretrained(blip, ckpt["model"])
    assert rep["initialised"] == [] and len(blip.text_decoder.encoder.layer) == 3
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in blip.state_dict().items())


@pytest.mark.parametrize("task", ["ve", "nlvr"])
def test_distillation_alpha_and_one_momentum_update_per_optimizer_step(tmp_path, pretrained,
                                                                       monkeypatch, task):
    """SNLI-VE distils with alpha 0.4 from the first step (ALBEF's warm_up False), NLVR2 ramps
    it up over the first epoch; the momentum model moves once per optimizer step, here of two
    micro-batches."""
    alphas, updates = [], []
    cls = VEModel if task == "ve" else NLVRModel
    forward, update = cls.forward, FusionModel.momentum_update

    def recording_forward(self, *args, alpha=0.0):
        alphas.append(alpha)
        return forward(self, *args, alpha=alpha)

    def counting_update(self):
        updates.append(1)
        update(self)

    monkeypatch.setattr(cls, "forward", recording_forward)
    monkeypatch.setattr(FusionModel, "momentum_update", counting_update)
    # steps of 2 x 2 samples: ve has 12 (three steps per epoch), nlvr 8 (two); distilled
    # explicitly (the world's NLVR2 preset is not)
    run_task(tmp_path, pretrained, task, "--batch_size", "2", "--grad_accum", "2",
             "--distill", "true")
    assert len(updates) == 2 and len(alphas) == 4
    expected = [0.4] * 4 if task == "ve" else [0.0, 0.0, 0.2, 0.2]
    assert alphas == pytest.approx(expected)
    (tmp_path / "plain").mkdir()
    run_task(tmp_path / "plain", pretrained, task, "--distill", "false")
    assert len(updates) == 2 and len(alphas) == 6


def test_blip_checkpoint_with_tied_decoder_and_its_tokens(pretrained_blip_tied):
    """Pre-training added [DEC] and [ENC] to the world's vocabulary and saved the tied decoder
    under its own names; captioning loads every weight and decodes from [DEC]; VQA's image-
    grounded encoder reads [ENC]."""
    ckpt = torch.load(pretrained_blip_tied, weights_only=True)
    tok, state = Tokenizer(ckpt["vocab"]), ckpt["model"]
    assert tok.vocab[-2:] == ["[DEC]", "[ENC]"]
    assert (ckpt["config"]["model"]["dec_id"], ckpt["config"]["model"]["enc_id"]) == \
        (tok.dec_id, tok.enc_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.2.intermediate.dense.weight",
                 "encoder.layer.0.crossattention.self.key.weight"):
        assert torch.equal(state["text_decoder." + name], state["text_encoder." + name]), name
    assert not torch.equal(state["text_decoder.encoder.layer.0.attention.self.query.weight"],
                           state["text_encoder.encoder.layer.0.attention.self.query.weight"])
    assert not any("token_type" in k for k in state)
    mc, _ = model_config(pretrained_blip_tied, "caption")
    model = CaptionModel(mc, tok.encode("a picture of")[:-1], tok.sep_id)
    rep = load_pretrained(model, state)
    assert rep["initialised"] == [] and rep["loaded"] == list(model.state_dict())
    first = []
    model.text_decoder.register_forward_pre_hook(lambda mod, args: first.append(args[0][:, 0]))
    model.eval().greedy(torch.randn(2, 3, 32, 32), max_length=model.prompt_ids.shape[1] + 2)
    assert first and all((f == tok.dec_id).all() for f in first)
    mc, _ = model_config(pretrained_blip_tied, "vqa")
    vqa = VQAModel(mc, 3)
    load_pretrained(vqa, state)
    first.clear()
    vqa.text_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: first.append((kwargs["mode"], args[0][:, 0])), with_kwargs=True)
    ids, mask = tok(["what colour is it"], max_len=12)
    question = {"image": torch.randn(1, 3, 32, 32), "question_ids": ids, "question_mask": mask}
    vqa.eval().answer_scores(question)
    assert [(mode, f.tolist()) for mode, f in first] == [("text", [tok.cls_id]),
                                                        ("multimodal", [tok.enc_id])]
    # the answer decoder: BLIP's pre-trained decoder, every weight, its answers start with [DEC]
    decoder = VQADecoderModel(mc, *tok(["yes", "no"], 8))
    assert load_pretrained(decoder, state)["initialised"] == []
    first.clear()
    decoder.text_decoder.register_forward_pre_hook(lambda mod, args: first.append(args[0][:, 0]))
    decoder.eval().answer_scores(question)
    assert len(first) == 2 and all((f == tok.dec_id).all() for f in first)


@pytest.fixture(scope="module")
def captioner(pretrained):
    """A captioning model in eval mode, and three images. Its weights are random, with large word
    embeddings so that the next-token distributions are peaked and depend on the prefix, as a
    trained model's do (two pre-training steps only teach it to stop at once)."""
    mc, ckpt = model_config(pretrained, "caption")
    mc = dataclasses.replace(mc, init_std=0.02)   # BERT's init, for which these margins were measured
    tok = Tokenizer(ckpt["vocab"])
    torch.manual_seed(1)   # a seed where some captions end before max_length and some do not
    model = CaptionModel(mc, tok.encode("a picture of")[:-1], tok.sep_id)
    with torch.no_grad():
        model.text_decoder.embeddings.word_embeddings.weight.normal_(0, 1)
    return model.eval(), torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


PROMPT = 4     # [CLS] a picture of: the tokens BLIP's generate starts from


def teacher_forced_score(model, images, tokens):
    """Summed log-probability of generated tokens (up to and including [SEP]) in one pass."""
    ids = torch.cat([model.prompt_ids.expand(len(tokens), -1), tokens], dim=1)
    with torch.no_grad():
        logp = model.token_log_probs(ids[:, :-1], model.encode_image(images))
    P = model.prompt_ids.shape[1]
    picked = logp[:, P - 1:].gather(2, tokens[..., None]).squeeze(-1)          # (B, n)
    ended = (tokens == model.sep_id).long().cumsum(1)
    live = (ended == 0) | ((ended == 1) & (tokens == model.sep_id))            # up to the first [SEP]
    return torch.where(live, picked, 0.0).sum(1)


def test_greedy_equals_beam_of_one(captioner):
    model, images = captioner
    assert model.prompt_ids.shape[1] == PROMPT
    g_tokens, g_score = model.greedy(images, PROMPT + 6)
    b_tokens, b_score = model.beam_search(images, 1, PROMPT + 6, length_penalty=1.0)
    assert torch.equal(g_tokens, b_tokens)
    assert torch.allclose(g_score, b_score, atol=1e-5)
    assert torch.allclose(teacher_forced_score(model, images, g_tokens), g_score, atol=1e-4)


@pytest.mark.parametrize("bias", [30.0, -30.0])
def test_captions_respect_the_length_limits(captioner, bias):
    """BLIP's limits count [CLS] and the prompt: max_length 20 leaves 16 new tokens, min_length 5
    forbids [SEP] as the first one. A decoder that always wants [SEP] still says one word; one
    that never does stops at 16."""
    model, images = captioner
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[model.sep_id] += bias
    for tokens, _ in (model.greedy(images, 20, 5), model.beam_search(images, 3, 20, 5)):
        words = (tokens != model.sep_id) & (tokens != model.cfg.pad_id)
        lengths = PROMPT + words.sum(1)
        assert ((5 <= lengths) & (lengths <= 20)).all()
        if bias > 0:
            assert (lengths == 5).all() and (tokens[:, 1] == model.sep_id).all()
        else:
            assert (lengths == 20).all() and not (tokens == model.sep_id).any()


def hf_decoder(model):
    """Hugging Face's BertLMHeadModel with the captioner's decoder weights, in float64."""
    transformers = pytest.importorskip("transformers")
    dec = model.text_decoder.cfg
    hf = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=dec.vocab_size, hidden_size=dec.hidden_size, num_hidden_layers=dec.num_layers,
        num_attention_heads=dec.num_heads, intermediate_size=dec.intermediate_size,
        max_position_embeddings=dec.max_position, is_decoder=True, add_cross_attention=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    state = {k if k.startswith("cls.") else "bert." + k: v
             for k, v in model.text_decoder.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("decoder" in k or "position_ids" in k for k in missing), missing
    return hf.double().eval()


@pytest.mark.parametrize("beam, min_length", [(3, 5), (4, 7)])
def test_beam_search_equals_hugging_face_generate(captioner, beam, min_length):
    """The same tokens and scores as transformers' generate (BLIP's captioning call: the prompt as
    input_ids, max_length and min_length counting it, [SEP] as eos) on the same decoder. Length
    penalty 0: transformers 4.15 (BLIP's) divides by the whole length, the installed version by
    the generated part; with 0 both rank by the summed score."""
    model, images = captioner
    model = copy.deepcopy(model).double()
    model.banned = []                       # transformers forbids nothing here
    torch.manual_seed(0)
    with torch.no_grad():   # captions that differ by image, some ending early, some at max_length
        for name, p in model.text_decoder.named_parameters():
            if "crossattention" in name and name.endswith("weight") and "LayerNorm" not in name:
                p.normal_(0, 0.5)
        model.text_decoder.cls.predictions.bias[model.sep_id] += 5.0
    hf = hf_decoder(model)
    tokens, score = model.beam_search(images.double(), beam, 12, min_length, length_penalty=0.0)
    embeds = model.encode_image(images.double())
    out = hf.generate(input_ids=model.prompt_ids.expand(len(images), -1),
                      encoder_hidden_states=embeds,
                      encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                      num_beams=beam, max_length=12, min_length=min_length, length_penalty=0.0,
                      do_sample=False, eos_token_id=model.sep_id, pad_token_id=model.cfg.pad_id,
                      use_cache=False, return_dict_in_generate=True, output_scores=True)
    theirs = out.sequences[:, PROMPT:]
    after_sep = (theirs == model.sep_id).long().cumsum(1) - (theirs == model.sep_id).long() > 0
    theirs = theirs.masked_fill(after_sep, model.cfg.pad_id)   # transformers pads with eos here
    ended = (tokens == model.sep_id).any(1)
    assert ended.any() and not ended.all() and len(set(map(tuple, tokens.tolist()))) == len(images)
    assert torch.equal(tokens, F.pad(theirs, (0, tokens.shape[1] - theirs.shape[1]),
                                     value=model.cfg.pad_id))
    assert torch.allclose(score.float(), out.sequences_scores, atol=1e-5)


def test_clear_errors(tmp_path, pretrained):
    with pytest.raises(SystemExit, match="--pretrained .*nowhere.pt does not exist"):
        train_downstream.main(["--pretrained", str(tmp_path / "nowhere.pt")])
    with pytest.raises(SystemExit, match="--task 'segmentation' is not one of"):
        train_downstream.main(["--task", "segmentation"])
    flags = write_task(tmp_path, "ve")
    entries = json.loads((tmp_path / "train.json").read_text()) + [{"image": "im0.png",
                                                                      "sentence": "a cat"}]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    with pytest.raises(SystemExit, match=r"train.json, entry 12: missing key 'label'"):
        train_downstream.main(["--task", "ve", "--pretrained", pretrained, *flags,
                               "--out_dir", str(tmp_path / "o")])


def test_resume_continues_fine_tuning_exactly(tmp_path, pretrained):
    flags = ["--task", "ve", "--pretrained", pretrained, *write_task(tmp_path, "ve"),
             "--batch_size", "4", "--warmup_steps", "1", "--eval_batch_size", "4"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_downstream.main(flags + ["--out_dir", a, "--max_steps", "3"])
    train_downstream.main(flags + ["--out_dir", b, "--max_steps", "2"])
    train_downstream.main(["--out_dir", b, "--resume", "auto", "--max_steps", "3"])
    sa, sb = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (a, b))
    assert sb["step"] == 3 and sb["weights"] == sa["weights"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    ma, mb = (json.load(open(os.path.join(d, "metrics.json")))["test"][str(tmp_path / "test.json")]
              for d in (a, b))
    assert ma["metrics"] == mb["metrics"] and ma["baseline"] == mb["baseline"]


def test_ddp_two_ranks_stay_identical(tmp_path, pretrained):
    """Retrieval fine-tuning under torchrun (gloo): both ranks end with the same parameters."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_downstream.py"), "--task",
           "retrieval", "--pretrained", pretrained, *write_task(tmp_path, "retrieval"),
           "--out_dir", str(out), "--batch_size", "3", "--max_steps", "2", "--warmup_steps", "1",
           "--log_every", "1", "--eval_k", "3", "--eval_batch_size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    sync = [r for r in recs if "ranks_in_sync" in r][-1]
    assert len(sync["rank_fingerprints"]) == 2 and sync["ranks_in_sync"]
    assert [r["step"] for r in recs if "step" in r] == [1, 2]
    test = json.load(open(out / "metrics.json"))["test"][str(tmp_path / "test.json")]
    assert "r_mean" in test["metrics"]


@pytest.fixture(scope="module")
def pretrained_64(tmp_path_factory):
    """A two-step checkpoint pre-trained at 64 px (8 x 8 patches of 8 px)."""
    out = tmp_path_factory.mktemp("pretrain_64")
    train_pretrain.main(SMALL + ["--out_dir", str(out), "--max_steps", "2", "--img_size", "64"])
    return str(out / "checkpoint.pt")


def by_hand(pos_embed, new):
    """ALBEF's interpolate_pos_embed written out: [CLS] kept, the grid resized bicubically."""
    D = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].reshape(8, 8, D).permute(2, 0, 1)[None]               # (1, D, 8, 8)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[0, :1], grid[0].permute(1, 2, 0).reshape(new * new, D)])[None]


def test_position_embeddings_interpolated_on_load(pretrained_64, tmp_path):
    """A 64 px checkpoint fine-tuned at 96 px: online and momentum ViT get the 12 x 12 grid,
    [CLS] keeps its embedding, and the ViT gives the output of one whose position embeddings were
    interpolated by hand."""
    ckpt = torch.load(pretrained_64, weights_only=True)
    cfg = train_downstream.DownstreamConfig(task="retrieval", img_size=96)
    mc = tasks.downstream_model_config(config_from_dict(ModelConfig, ckpt["config"]["model"]), cfg)
    model = ELIPModel(mc).eval()
    rep = load_pretrained(model, ckpt["model"])
    assert rep["interpolated"] == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    for name in rep["interpolated"]:
        ours, theirs = model.state_dict()[name], ckpt["model"][name]
        assert ours.shape == (1, 1 + 144, 32)
        assert torch.equal(ours[:, 0], theirs[:, 0])                               # [CLS]
        assert torch.allclose(ours, by_hand(theirs, 12), atol=1e-6)
    reference = vit.VisionTransformer(img_size=96, patch_size=8, embed_dim=32, depth=12,
                                      num_heads=2).eval()
    weights = {k.removeprefix("visual_encoder."): v for k, v in ckpt["model"].items()
               if k.startswith("visual_encoder.")}
    reference.load_state_dict({**weights, "pos_embed": by_hand(weights["pos_embed"], 12)})
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.visual_encoder(images), reference(images), atol=1e-5)
    # the same through the script, which reports it
    out = run_task(tmp_path, pretrained_64, "retrieval", "--img_size", "96")
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["img_size"] == 96 and rec["weights"]["interpolated"] == rep["interpolated"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["model_config"]["img_size"] == 96


@pytest.mark.parametrize("task", TASKS)
def test_evaluate_gives_the_metrics_of_the_fine_tuning_run(tmp_path, pretrained, task):
    """--evaluate true on the checkpoint a fine-tuning run wrote: the same metrics, on every
    test file given (each scored on its own), without training."""
    out = run_task(tmp_path, pretrained, task, "--test_file",
                   f"{tmp_path / 'test.json'},{tmp_path / 'train.json'}")
    trained = json.loads((out / "metrics.json").read_text())["test"]
    names = [str(tmp_path / "test.json"), str(tmp_path / "train.json")]
    assert list(trained) == names and trained[names[0]] != trained[names[1]]
    flags = ["--task", task, "--evaluate", "true", "--pretrained", str(out / "checkpoint.pt"),
             "--test_file", ",".join(names), "--image_root", str(tmp_path / "images"),
             "--out_dir", str(tmp_path / "eval"), "--eval_k", "3", "--eval_batch_size", "3",
             "--beam", "2", "--max_length", "8"]
    train_downstream.main(flags)
    rec = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rec["evaluate_only"] and rec["train_seconds"] == 0 and rec["weights"]["initialised"] == []
    for name in names:
        assert rec["test"][name]["metrics"] == trained[name]["metrics"]
        # no training file, no majority baseline; chance needs none
        assert rec["test"][name]["baseline"] == (trained[name]["baseline"] if task == "retrieval"
                                                 else {})
    assert not os.path.exists(tmp_path / "eval" / "checkpoint.pt")
    # a fine-tuned checkpoint is for --evaluate of its own task only
    with pytest.raises(SystemExit, match="fine-tuned"):
        train_downstream.main(flags[:2] + flags[4:])


def test_evaluate_builds_the_heads_the_checkpoint_holds(tmp_path, pretrained):
    """A VQA classifier fine-tuned without distillation, evaluated with the default flags (the
    answer decoder, distillation on): the checkpoint's heads are rebuilt, the metrics equal."""
    out = run_task(tmp_path, pretrained, "vqa", "--vqa_head", "classifier", "--distill", "false")
    test = str(tmp_path / "test.json")
    trained = json.loads((out / "metrics.json").read_text())["test"][test]["metrics"]
    train_downstream.main(["--task", "vqa", "--evaluate", "true", "--pretrained",
                           str(out / "checkpoint.pt"), "--test_file", test, "--image_root",
                           str(tmp_path / "images"), "--out_dir", str(tmp_path / "eval"),
                           "--eval_batch_size", "3"])
    rec = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rec["config"]["vqa_head"] == "classifier" and rec["test"][test]["metrics"] == trained


@pytest.mark.parametrize("task,workers", [("retrieval", 0), ("vqa", 0), ("nlvr", 0), ("vqa", 2)])
def test_an_unreadable_test_image_is_scored_black_and_named(tmp_path, pretrained, task, workers,
                                                             capsys):
    """Evaluation cannot skip a test sample: a corrupt image is read as a black one, named in
    the log and in metrics.json (also when DataLoader workers read it), and the run ends with its
    metrics."""
    flags = write_task(tmp_path, task)
    (tmp_path / "images" / "im1.png").write_bytes(b"not a png")
    test = flags[flags.index("--test_file") + 1]
    out = tmp_path / "eval"
    train_downstream.main(["--task", task, "--evaluate", "true", "--pretrained", pretrained,
                           *flags[flags.index("--test_file"):], "--out_dir", str(out),
                           "--eval_k", "3", "--eval_batch_size", "3", "--num_workers",
                           str(workers)])
    rec = json.loads((out / "metrics.json").read_text())["test"][test]
    uses = sum("im1.png" in json.dumps(e) for e in json.loads(open(test).read()))
    assert len(rec["unreadable_images"]) == uses > 0        # once per test entry that reads it
    assert all("im1.png" in m and "entry" in m for m in rec["unreadable_images"])
    printed = capsys.readouterr()
    assert "im1.png" in printed.err or workers      # a worker process's stderr is its own
    assert "read an image that could not be read" in printed.out and "im1.png" in printed.out
    assert rec["metrics"]


def test_from_scratch_is_the_default_pretraining_architecture_untrained(tmp_path):
    """--pretrained none: the model train_pretrain.py builds by default (the tiny preset, the
    world's vocabulary), fine-tuned the same way from random weights."""
    world_flags = ["--world_train", "4", "--world_test", "2", "--batch_size", "4",
                   "--max_steps", "1", "--warmup_steps", "1", "--eval_batch_size", "8"]
    pre = tmp_path / "pre"
    train_pretrain.main(["--out_dir", str(pre), "--world_train", "8", "--world_test", "0",
                         "--batch_size", "4", "--max_steps", "1"])
    states = {}
    for name, source in (("pretrained", str(pre / "checkpoint.pt")), ("scratch", "none")):
        out = tmp_path / name
        train_downstream.main(["--task", "vqa", "--pretrained", source, "--out_dir", str(out),
                               *world_flags])
        saved = torch.load(out / "checkpoint.pt", weights_only=True)
        rec = json.loads((out / "metrics.json").read_text())
        assert rec["pretrained"] == source
        assert 0 <= rec["test"]["world"]["metrics"]["vqa_score"] <= 1
        states[name] = (saved["model"], saved["model_config"], saved["vocab"], rec["weights"])
    (pre_state, pre_mc, pre_vocab, pre_w), (new_state, new_mc, new_vocab, new_w) = \
        states["pretrained"], states["scratch"]
    assert new_mc == pre_mc and new_vocab == pre_vocab
    assert {k: v.shape for k, v in new_state.items()} == {k: v.shape for k, v in pre_state.items()}
    # the answer decoder starts from the fusion layers: every weight loads from a checkpoint
    assert new_w["initialised"] == list(new_state) and pre_w["initialised"] == []
    # the same seed, yet different encoders: one started from the checkpoint
    key = "visual_encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(new_state[key], pre_state[key])


def test_from_scratch_like_a_checkpoint_takes_its_architecture_not_its_weights(tmp_path):
    """--pretrained none --scratch_like ck: the checkpoint's architecture (here the world's
    helpers: conv stem, sine-cosine position embeddings, ITC over all captions, which a
    fine-tuning with one caption per sample must switch off) and vocabulary, random weights."""
    pre = tmp_path / "pre"
    train_pretrain.main(["--out_dir", str(pre), "--world_train", "8", "--world_test", "0",
                         "--batch_size", "4", "--max_steps", "1", "--conv_stem", "true",
                         "--sincos_pos", "0.3", "--itc_all_captions", "true"])
    ck = str(pre / "checkpoint.pt")
    for task in ("retrieval", "vqa"):
        out = tmp_path / task
        train_downstream.main(["--task", task, "--pretrained", "none", "--scratch_like", ck,
                               "--out_dir", str(out), "--world_train", "4", "--world_test", "2",
                               "--batch_size", "4", "--max_steps", "1", "--warmup_steps", "1",
                               "--eval_batch_size", "8"])
        saved = torch.load(out / "checkpoint.pt", weights_only=True)
        assert saved["aids"]["conv_stem"] and saved["aids"]["sincos_pos"] == 0.3
    pre_state = torch.load(ck, weights_only=True)["model"]
    key = "visual_encoder.patch_embed.proj.0.weight"                # the stem's first convolution
    assert saved["model"][key].shape == pre_state[key].shape
    assert not torch.equal(saved["model"][key], pre_state[key])
    with pytest.raises(SystemExit, match="--scratch_like nowhere.pt does not exist"):
        train_downstream.main(["--task", "vqa", "--pretrained", "none", "--scratch_like",
                               "nowhere.pt", "--out_dir", str(tmp_path / "x")])


# ---- the official evaluations' files --------------------------------------------------------
OFFICIAL = {"vqa": "vqa_result_{}.json", "caption": "caption_result_{}.json",
            "nlvr": "nlvr_result_{}.csv"}


def official_rows(out, task, name):
    """The official file of a run, checked for its format: VQA and captioning a JSON list of
    {"question_id": int, "answer": str} / {"image_id": int, "caption": str}; NLVR2 lines
    "identifier,True|False" read as NLVR2's scorer reads them. Returns its rows as
    (id, answer) pairs."""
    text = (out / OFFICIAL[task].format(name)).read_text()
    if task == "nlvr":
        rows = [line.strip().split(",") for line in text.splitlines()]
        assert all(len(r) == 2 and r[1] in ("True", "False") for r in rows), text
        return [tuple(r) for r in rows]
    keys = ("question_id", "answer") if task == "vqa" else ("image_id", "caption")
    rows = json.loads(text)
    assert isinstance(rows, list) and all(set(r) == set(keys) for r in rows), rows
    assert all(type(r[keys[0]]) is int and isinstance(r[keys[1]], str) for r in rows), rows
    return [(r[keys[0]], r[keys[1]]) for r in rows]


@pytest.mark.parametrize("task", ["vqa", "caption", "nlvr"])
def test_official_result_files_from_json_with_ids(tmp_path, pretrained, task, capsys):
    """Each test file's predictions as the official evaluation reads them, under the entries'
    own ids: VQA's question_id; captioning's image_id, else the COCO file name's number (one
    caption per image); NLVR2's identifier. An entry without one gets its index, and the log
    says so."""
    flags = write_task(tmp_path, task)
    root, test = tmp_path / "images", tmp_path / "test.json"
    entries = json.loads(test.read_text())
    if task == "caption":
        (root / "COCO_val2014_000000391895.png").write_bytes((root / "im1.png").read_bytes())
        entries[1]["image"] = "COCO_val2014_000000391895.png"
        entries[0]["image_id"], entries[2]["image_id"] = 7, "42"
        entries.append({**entries[0], "caption": ["again image 7"]})
        expected = [7, 391895, 42, 3]     # the fourth entry has no id: its index
    elif task == "nlvr":
        for i, e in enumerate(entries[:3]):
            e["identifier"] = f"dev-{850 + i}-0-0"
        expected = ["dev-850-0-0", "dev-851-0-0", "dev-852-0-0", "3"]
    else:
        del entries[3]["question_id"]
        expected = [100, 101, 102, 3]
    test.write_text(json.dumps(entries))
    out = tmp_path / "out"
    train_downstream.main(["--task", task, "--pretrained", pretrained, *flags, "--out_dir",
                           str(out), "--batch_size", "4", "--max_steps", "1", "--warmup_steps",
                           "1", "--eval_batch_size", "3", "--beam", "2", "--max_length", "8"])
    rows = official_rows(out, task, "test")
    assert [r[0] for r in rows] == expected
    assert f"warning: 1 entries of {test} have no" in capsys.readouterr().out
    preds = json.loads((out / "predictions.json").read_text())[str(test)]
    if task == "vqa":
        assert [r[1] for r in rows] == [p["answer"] for p in preds]
    elif task == "caption":
        assert [r[1] for r in rows] == [p["beam"] for p in preds[:4]]
    else:
        assert [r[1] == "True" for r in rows] == [p["prediction"] == 1 for p in preds]
        accuracy = json.loads((out / "metrics.json").read_text())["test"][str(test)]["metrics"]
        labels = [e["label"] in (True, "True") for e in entries]
        assert sum((r[1] == "True") == y for r, y in zip(rows, labels)) / 4 == \
            accuracy["accuracy"]


@pytest.mark.parametrize("task", ["vqa", "caption", "nlvr"])
def test_official_result_files_on_the_world(tmp_path, pretrained, task, capsys):
    """The embedded world's test split ("world"): VQA keeps the world's question ids, captioning
    reads the image id from the image's name (world:<seed>/test/<index>), NLVR2 has no
    identifier: each entry's index, said in the log."""
    out = tmp_path / "out"
    train_downstream.main(["--task", task, "--pretrained", pretrained, "--evaluate", "true",
                           "--world_train", "4", "--world_test", "2", "--out_dir", str(out),
                           "--eval_batch_size", "4",
                           "--beam", "2", "--max_length", "8"])
    ids = [r[0] for r in official_rows(out, task, "world")]
    log = capsys.readouterr().out
    if task == "vqa":
        questions = tasks.world.world_entries("vqa", "test", 2)
        assert ids == [e["question_id"] for e in questions] and "no question_id" not in log
    elif task == "caption":
        assert ids == [0, 1] and "no image_id" not in log
    else:
        assert ids == ["0", "1", "2", "3"] and "have no identifier" in log


# ---- the real-data presets as the official fine-tuning ------------------------------------
def preset(task, name, *flags):
    cfg, _ = train_downstream.parse_config(train_downstream.DownstreamConfig(),
                                           ["--task", task, "--preset", name, *flags],
                                           train_downstream.TASK_PRESETS, key=("task", "preset"))
    return cfg


def test_real_data_presets_mirror_the_image_alone(tmp_path):
    """ALBEF and BLIP flip the image and leave its text alone; the world's presets swap left and
    right, as the world's texts name sides. The flag reaches every training dataset."""
    for task, name in train_downstream.TASK_PRESETS:
        assert preset(task, name).swap_left_right == (name == "world"), (task, name)
    Image.new("RGB", (8, 8)).save(tmp_path / "0.jpg")
    entries = [{"image": "0.jpg", "caption": "a cube on the left", "image_id": 0}]
    for name, swap in (("world", True), ("blip", False)):
        cfg = preset("caption", name)
        dataset = tasks.task_dataset(cfg, entries, str(tmp_path), None, True, None, 30)
        assert dataset.swap_words is swap and dataset.flip


def tiny_model_config(blip, **kw):
    return ModelConfig(img_size=16, patch_size=8, vision_width=32, vision_depth=2,
                       vision_heads=2, text_width=32, text_heads=2, text_mlp=64, embed_dim=16,
                       text_layers=3 if blip else 1, fusion_layers=0 if blip else 2,
                       queue_size=8, itm_weight_eps=1e-4 if blip else 0.0, vocab_size=20,
                       prune=PruneConfig(method="none"), **kw)


def test_blip_retrieval_weighs_itm_negatives_by_online_features():
    """BLIP's retrieval fine-tuning draws its ITM negatives by softmax(online image x online
    text / temp) of the batch without the 1e-4 (BLIP/models/blip_retrieval.py:174-184); ALBEF's,
    and every pre-training, by ITC's online x momentum similarities."""
    for blip in (True, False):
        cfg = train_downstream.DownstreamConfig(task="retrieval")
        mc = tasks.downstream_model_config(tiny_model_config(blip), cfg)
        assert mc.itm_online_candidates is blip and mc.itm_weight_eps == 0.0
        assert not tasks.downstream_model_config(
            tiny_model_config(blip), dataclasses.replace(cfg, task="vqa")).itm_online_candidates
    assert not train_pretrain.TrainConfig().model.itm_online_candidates   # pre-training
    torch.manual_seed(0)
    feats = {k: F.normalize(torch.randn(4, 16), dim=1) for k in
             ("image_feat", "text_feat", "image_feat_m", "text_feat_m")}
    for online in (True, False):
        model = ELIPModel(tiny_model_config(True, itm_online_candidates=online))
        i2t, t2i = model.itm_similarities(feats)
        image_c, text_c = ((feats["image_feat"], feats["text_feat"]) if online else
                           (feats["image_feat_m"], feats["text_feat_m"]))
        assert torch.allclose(i2t, feats["image_feat"] @ text_c.T / 0.07)
        assert torch.allclose(t2i, feats["text_feat"] @ image_c.T / 0.07)


def test_blip_caption_length_counts_the_prompt(tmp_path):
    """BLIP cuts prompt + caption at 40 tokens ([CLS] a picture of ... [SEP]), so a training
    caption keeps 35 of its tokens: the collated caption is 37 long, 40 once CaptionModel puts
    the 3 prompt tokens after its [CLS]."""
    Image.new("RGB", (8, 8)).save(tmp_path / "0.jpg")
    words = [f"w{i}," for i in range(50)]            # two tokens a word: BLIP keeps commas
    (tmp_path / "train.json").write_text(json.dumps(
        [{"image": "0.jpg", "caption": " ".join(words), "image_id": 0}]))
    (tmp_path / "test.json").write_text(json.dumps([{"image": "0.jpg", "caption": ["w1"]}]))
    cfg = preset("caption", "blip", "--train_file", str(tmp_path / "train.json"), "--test_file",
                 str(tmp_path / "test.json"), "--image_root", str(tmp_path))
    tok = Tokenizer.build([" ".join(words + ["a", "picture", "of"])])
    mc = dataclasses.replace(tiny_model_config(True), max_len=cfg.max_len,
                             vocab_size=tok.vocab_size)
    train_set, _, answers = tasks.build_sets(cfg, mc)
    collate, _ = tasks.task_collates(cfg, mc, tok, answers)
    ids = collate([train_set[0]])["text_ids"][0]
    assert cfg.max_len == 40 and len(ids) == 37 and ids[-1] == tok.sep_id
    assert ids[1:-1].tolist() == tok.encode(" ".join(words[:30]))[1:36]   # 30 words, 35 kept
    model = CaptionModel(mc, tok.encode(cfg.prompt)[:-1], tok.sep_id)
    seen = []
    model.text_decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    model({"image": torch.randn(1, 3, 16, 16), "text_ids": ids[None],
           "text_mask": torch.ones(1, 37, dtype=torch.long)})
    assert seen == [40]


# ---- model selection over the epochs (--select) ------------------------------------------
def run_world(out, pretrained, *extra, task="ve"):
    """A task on the embedded world, tiny: 4 training scenes (SNLI-VE: 12 hypotheses, 3 steps of
    4 an epoch; retrieval: 20 captions, 5 steps), 2 epochs; 3 scenes in the val split and 3 in
    the test split."""
    train_downstream.main(["--task", task, "--pretrained", pretrained, "--out_dir", str(out),
                           "--world_train", "4", "--world_val", "3", "--world_test", "3",
                           "--batch_size", "4", "--epochs", "2", "--warmup_steps", "1",
                           "--eval_batch_size", "9", "--eval_k", "3", *extra])


def scripted_validation(monkeypatch, accuracies: list):
    """evaluate_task with each validation's accuracy taken in turn from `accuracies` (the test
    sets are scored as they are), so that the test knows which epoch is the best."""
    real = train_downstream.evaluate_task

    def evaluate_task(cfg, model, train_set, test_set, *args, **kw):
        scores, *rest = real(cfg, model, train_set, test_set, *args, **kw)
        if "/val/" in json.dumps(test_set.items[0]):         # world:<seed>/val/<index>
            scores = {"accuracy": accuracies.pop(0)}
        return scores, *rest

    monkeypatch.setattr(train_downstream, "evaluate_task", evaluate_task)


def records(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


@pytest.mark.parametrize("accuracies, best", [([0.75, 0.25], 0), ([0.25, 0.75], 1)])
def test_select_best_tests_the_best_epochs_weights(tmp_path, pretrained, monkeypatch,
                                                   accuracies, best):
    scripted_validation(monkeypatch, list(accuracies))
    out = tmp_path / "best"
    run_world(out, pretrained, "--select", "best")
    val = [r for r in records(out) if "val" in r]
    assert [(r["epoch"], r["step"]) for r in val] == [(0, 3), (1, 6)]
    assert [r["selection_metric"] for r in val] == accuracies
    rec = json.loads((out / "metrics.json").read_text())
    chosen = max(range(len(val)), key=lambda e: val[e]["selection_metric"])
    assert rec["selection"]["best_epoch"] == chosen == best
    saved = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == best and saved["val"] == {"world_val": {"accuracy": max(accuracies)}}
    assert last["select"]["best_epoch"] == best
    same = all(torch.equal(saved["model"][k], last["model"][k]) for k in last["model"])
    assert same == (best == 1)                 # the last epoch's weights only when it is the best
    # the reported test is best.pt's: --evaluate true on it gives the same metrics
    train_downstream.main(["--task", "ve", "--evaluate", "true", "--pretrained",
                           str(out / "best.pt"), "--out_dir", str(tmp_path / "eval"),
                           "--world_train", "4", "--world_test", "3", "--eval_batch_size", "9"])
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test"]["world"]["metrics"] == rec["test"]["world"]["metrics"]


def test_select_last_and_test_every_epoch(tmp_path, pretrained):
    """last: no validation, no best.pt, the test after the last epoch; test_every_epoch: a test
    record after each epoch but the last (the final test scores it). Retrieval draws its ITM
    negatives from the random stream the evaluation's loader also draws from: the evaluation
    gives it back, so the training is the same."""
    run_world(tmp_path / "last", pretrained, task="retrieval")       # the world preset's last
    run_world(tmp_path / "every", pretrained, "--select", "test_every_epoch", task="retrieval")
    assert not any("val" in r or "test" in r for r in records(tmp_path / "last"))
    assert not (tmp_path / "last" / "best.pt").exists()
    assert not (tmp_path / "every" / "best.pt").exists()
    tests = [r for r in records(tmp_path / "every") if "test" in r]
    assert [(r["epoch"], r["step"]) for r in tests] == [(0, 5)]
    assert tests[0]["test"]["world"]["r_mean"] >= 0
    final = [r for r in records(tmp_path / "every") if r.get("test_file") == "world"]
    assert len(final) == 1
    rec = json.loads((tmp_path / "every" / "metrics.json").read_text())
    assert rec["selection"]["select"] == "test_every_epoch"
    assert [e["epoch"] for e in rec["selection"]["epochs"]] == [0]
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"]
            for d in ("last", "every"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = json.loads((tmp_path / "last" / "metrics.json").read_text())
    assert last["test"]["world"]["metrics"] == rec["test"]["world"]["metrics"]


def test_select_best_resumed_keeps_the_best_so_far(tmp_path, pretrained, monkeypatch):
    """Stopped one step into epoch 1 after epoch 0 validated best, then resumed: epoch 1 is
    worse, so best.pt stays epoch 0's (a run that forgot the best would take epoch 1), and the
    log holds each epoch's validation once."""
    scripted_validation(monkeypatch, [0.75, 0.25])
    out = tmp_path / "out"
    run_world(out, pretrained, "--select", "best", "--max_steps", "4")
    first = torch.load(out / "best.pt", weights_only=True)
    train_downstream.main(["--out_dir", str(out), "--resume", "auto", "--max_steps", "0"])
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["epoch"] == 0 and all(torch.equal(first["model"][k], saved["model"][k])
                                       for k in saved["model"])
    assert [r["epoch"] for r in records(out) if "val" in r] == [0, 1]
    rec = json.loads((out / "metrics.json").read_text())["selection"]
    assert rec["best_epoch"] == 0 and [e["selection_metric"] for e in rec["epochs"]] == [0.75, 0.25]


def test_select_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(SystemExit, match="vqa has no selection metric"):
        train_downstream.main(["--task", "vqa", "--select", "best"])
    with pytest.raises(SystemExit, match="val_file is read with select best only"):
        train_downstream.main(["--task", "ve", "--val_file", "v.json"])
    flags = write_task(tmp_path, "ve")
    with pytest.raises(SystemExit, match="select best needs validation data"):
        train_downstream.main(["--task", "ve", "--preset", "albef", *flags])


def test_select_best_on_a_val_file(tmp_path, pretrained):
    """--val_file in the official format, here the test file itself: the best epoch's validation
    accuracy is the reported test accuracy (the same evaluation of the same weights)."""
    test = str(tmp_path / "test.json")
    out = run_task(tmp_path, pretrained, "nlvr", "--select", "best", "--val_file", test,
                   "--max_steps", "0", "--epochs", "2")       # 8 samples: 2 steps an epoch
    val = [r for r in records(out) if "val" in r]
    assert [(r["epoch"], r["step"]) for r in val] == [(0, 2), (1, 4)]
    rec = json.loads((out / "metrics.json").read_text())
    best = val[rec["selection"]["best_epoch"]]["val"][test]
    assert rec["test"][test]["metrics"] == best
    assert torch.load(out / "best.pt", weights_only=True)["val"] == {test: best}
