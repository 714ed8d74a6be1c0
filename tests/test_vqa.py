"""The VQA answer decoder on a tiny random model: its ranking of the answer list equals a
brute-force likelihood of every answer, computed one unpadded answer and one unpadded question at
a time (ALBEF: log p(first) + log p(answer); BLIP: minus the label-smoothed loss), with and
without the first-token cut to k answers; its training loss is sum_i w_i seq_loss_i / B, with
ALBEF's per-token distillation against the momentum decoder, which momentum_step moves. The
classifier's collate gives it named fields and the soft-score targets."""
import pytest
import torch

import tasks
from config import parse_config
from model import ModelConfig
from pruning import PruneConfig
from tokenizer import SPECIALS, Tokenizer
from train_downstream import TASK_PRESETS, DownstreamConfig
from vqa import VQADecoderModel, VQAModel
from world_aids import WorldAids

WORDS = ["what", "colour", "is", "it", "how", "many", "yes", "no", "red", "cube", "big", "two",
         "left"]
ANSWERS = ["yes", "no", "red", "red cube", "two", "big red cube", "left"]
QUESTIONS = ["what colour is it", "how many", "is it a big red cube"]


def tiny(blip, distill=False, seps=1):
    """A tiny decoder model in eval mode: ALBEF (1 text + 2 fusion layers, bos [CLS]) or BLIP (3
    layers with cross-attention, bos [DEC], [ENC] for the multimodal question), its answers
    ending in `seps` [SEP] tokens. Its decoder's word embeddings are large so that the
    next-token distributions are peaked and differ."""
    tok = Tokenizer(list(SPECIALS) + ["[DEC]", "[ENC]"] + WORDS)
    cfg = ModelConfig(img_size=16, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
                      vocab_size=tok.vocab_size, text_width=32, text_layers=3 if blip else 1,
                      fusion_layers=0 if blip else 2, text_heads=2, text_mlp=64, text_dropout=0.0,
                      losses=("itc", "itm"), prune=PruneConfig(method="none"), blip_tokens=blip,
                      enc_id=tok.token_to_id["[ENC]"], dec_id=tok.token_to_id["[DEC]"],
                      token_types=not blip)
    torch.manual_seed(0)
    model = VQADecoderModel(cfg, *tok(ANSWERS, 8), len(ANSWERS), distill=distill, answer_seps=seps)
    with torch.no_grad():
        model.text_decoder.embeddings.word_embeddings.weight.normal_(0, 1)
        if distill:   # a teacher that differs from the student
            for p in model.text_decoder_m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    images = torch.randn(len(QUESTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model.eval(), tok, images


def question_states(model, tok, image, question, momentum=False):
    """(1, T, D) for one unpadded question: the fusion layers on the text layers (ALBEF), or all
    layers on [ENC] question (BLIP)."""
    enc = model.text_encoder_m if momentum else model.text_encoder
    vit = model.visual_encoder_m if momentum else model.visual_encoder
    ids = torch.tensor([tok.encode(question)])
    image_embeds = vit(image[None], None)
    if model.albef:
        text = enc(ids, None, mode="text")
        return enc(None, None, image_embeds, None, mode="fusion", hidden=text)
    ids[0, 0] = model.cfg.enc_id
    return enc(ids, None, image_embeds, None, mode="multimodal")


def answer_log_probs(model, tok, states, answer, momentum=False):
    """(ids (L,), log-probabilities (L-1, V) of each next token) of one unpadded answer,
    [bos] answer [SEP] (and the model's extra [SEP] tokens)."""
    ids = torch.tensor([model.bos_id] + tok.encode(answer)[1:] + [tok.sep_id] * model.extra_seps)
    decoder = model.text_decoder_m if momentum else model.text_decoder
    hidden = decoder(ids[None], None, states, None, mode="multimodal", causal=True)
    return ids, decoder.lm_logits(hidden)[0, :-1].log_softmax(-1)


def brute_force_scores(model, tok, images, smoothing):
    """(B, A) the official score of every answer, and (B, A) its first token's probability."""
    scores, first = torch.zeros(len(QUESTIONS), len(ANSWERS)), torch.zeros(len(QUESTIONS), len(ANSWERS))
    for b, question in enumerate(QUESTIONS):
        states = question_states(model, tok, images[b], question)
        for a, answer in enumerate(ANSWERS):
            ids, logp = answer_log_probs(model, tok, states, answer)
            picked = logp.gather(1, ids[1:, None]).squeeze(1)                        # (L-1,)
            loss = -((1 - smoothing) * picked + smoothing * logp.mean(1)).sum()
            first[b, a] = picked[0].exp()
            scores[b, a] = -loss + (picked[0] if model.albef else 0.0)
    return scores, first


@pytest.mark.parametrize("blip, seps", [(False, 1), (True, 1), (False, 2)])
@torch.no_grad()
def test_ranking_equals_brute_force_likelihood_over_the_answer_list(blip, seps):
    model, tok, images = tiny(blip, seps=seps)
    ids, mask = tok(QUESTIONS, 16)
    batch = {"image": images, "question_ids": ids, "question_mask": mask}
    expected, first = brute_force_scores(model, tok, images, 0.1 if blip else 0.0)
    scores = model.answer_scores(batch)
    assert torch.allclose(scores, expected, atol=1e-4)
    assert torch.equal(scores.argmax(1), expected.argmax(1))
    # the answers really differ, and the ranking is not the first token's alone: "red" and
    # "red cube" share it
    assert (expected.std(1) > 0.5).all()
    # k = 3: the three answers of highest first-token probability keep their score, others -inf
    model.k_test = 3
    cut = model.answer_scores(batch)
    top = first.topk(3, dim=1).indices
    kept = torch.zeros_like(cut, dtype=torch.bool).scatter(1, top, True)
    assert torch.allclose(cut[kept], expected[kept], atol=1e-4)
    assert (cut[~kept] == float("-inf")).all()


@pytest.mark.parametrize("blip, distill, seps", [(False, True, 1), (True, False, 1),
                                                 (False, True, 2)])
@torch.no_grad()
def test_training_loss_is_weighted_sum_of_answer_losses_with_distillation(blip, distill, seps):
    """Question 0 has answers "red" (weight 0.7) and "red cube" (0.3), question 1 "no" (1.0),
    question 2 "big red cube" (0.5): loss = sum_i w_i ((1 - alpha) CE_i + alpha KD_i) / B, CE_i
    the answer's summed token cross-entropy, KD_i the cross-entropy of each token's prediction
    against the momentum decoder's softmax, summed over the answer's tokens."""
    model, tok, images = tiny(blip, distill, seps)
    answers, counts = ["red", "red cube", "no", "big red cube"], torch.tensor([2, 1, 1])
    weights, alpha, smoothing = torch.tensor([0.7, 0.3, 1.0, 0.5]), 0.3, 0.1 if blip else 0.0
    ids, mask = tok(QUESTIONS, 16)
    answer_ids, answer_mask = tok(answers, 8)
    out = model({"image": images, "question_ids": ids, "question_mask": mask,
                 "answers_ids": answer_ids, "answers_mask": answer_mask, "answers_count": counts,
                 "weights": weights}, alpha=alpha)
    ce, kd = torch.zeros(4), torch.zeros(4)
    for i, (answer, b) in enumerate(zip(answers, [0, 0, 1, 2])):
        a_ids, logp = answer_log_probs(model, tok, question_states(model, tok, images[b],
                                                                   QUESTIONS[b]), answer)
        picked = logp.gather(1, a_ids[1:, None]).squeeze(1)
        ce[i] = -((1 - smoothing) * picked + smoothing * logp.mean(1)).sum()
        if distill:
            states_m = question_states(model, tok, images[b], QUESTIONS[b], momentum=True)
            _, logp_m = answer_log_probs(model, tok, states_m, answer, momentum=True)
            kd[i] = -(logp_m.exp() * logp).sum()
    B = len(QUESTIONS)
    assert out["vqa"] == pytest.approx(float((weights * ce).sum() / B), rel=1e-5)
    if distill:
        assert out["kd"] == pytest.approx(float((weights * kd).sum() / B), rel=1e-5)
        # the teacher disagrees with the labels
        assert min(out["kd"], out["vqa"]) > 0 and abs(out["kd"] - out["vqa"]) > 0.5
        expected = (weights * ((1 - alpha) * ce + alpha * kd)).sum() / B
    else:
        assert "kd" not in out and not hasattr(model, "text_decoder_m")
        expected = (weights * ce).sum() / B
    assert out["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_momentum_decoder_follows_the_online_one():
    model, _, _ = tiny(False, distill=True)
    assert {"visual_encoder", "text_encoder", "text_decoder"} == set(model.momentum_names)
    assert not any(p.requires_grad for p in model.text_decoder_m.parameters())
    before = [p.clone() for p in model.text_decoder_m.parameters()]
    model.momentum_step([])
    for p, p_m, old in zip(model.text_decoder.parameters(), model.text_decoder_m.parameters(),
                           before):
        assert torch.allclose(p_m, 0.995 * old + 0.005 * p, atol=1e-6)


def test_classifier_collate_gives_named_fields_and_soft_score_targets():
    """tasks.vqa_collate: the question as data.collate tokenizes it, and each sample's answers
    in the list at their weights (an answer outside the list dropped), feeding VQAModel."""
    tok = Tokenizer(list(SPECIALS) + WORDS)
    answer_index = {a: i for i, a in enumerate(ANSWERS)}
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    samples = [{"image": images[0], "question": "how many", "answers": ["two", "three"],
                "weights": [1.0, 0.3]},
               {"image": images[1], "question": "what colour is it", "answers": ["red", "yes"],
                "weights": [0.6, 0.3]}]
    batch = tasks.vqa_collate(samples, tok, 16, answer_index)
    assert set(batch) == {"image", "question_ids", "question_mask", "targets"}
    assert torch.equal(batch["image"], images)
    ids, mask = tok(["how many", "what colour is it"], 16)
    assert torch.equal(batch["question_ids"], ids) and torch.equal(batch["question_mask"], mask)
    expected = torch.zeros(2, len(ANSWERS))
    expected[0, ANSWERS.index("two")] = 1.0
    expected[1, ANSWERS.index("red")], expected[1, ANSWERS.index("yes")] = 0.6, 0.3
    assert torch.allclose(batch["targets"], expected)
    model, _, _ = tiny(False)
    classifier = VQAModel(model.cfg, len(ANSWERS))
    out = classifier(batch)
    assert out["loss"] == out["vqa"] and classifier.answer_scores(batch).shape == (2, len(ANSWERS))


def test_albef_answers_end_in_two_sep():
    """ALBEF appends the text "[SEP]" to every answer and its tokenizer adds another
    (ALBEF/VQA.py:82): the albef preset's answer list ends each answer so, padding after it;
    the default (and BLIP) in one."""
    _, tok, _ = tiny(False)
    cfg = ModelConfig(img_size=16, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
                      vocab_size=tok.vocab_size, text_width=32, text_layers=1, fusion_layers=2,
                      text_heads=2, text_mlp=64, losses=("itc", "itm"),
                      prune=PruneConfig(method="none"))
    sep, pad, cls = tok.sep_id, tok.pad_id, tok.cls_id
    yes, red, cube = (tok.token_to_id[w] for w in ("yes", "red", "cube"))
    for preset, rows in (("albef", [[cls, yes, sep, sep, pad], [cls, red, cube, sep, sep]]),
                         ("world", [[cls, yes, sep, pad], [cls, red, cube, sep]])):
        dcfg, _ = parse_config(DownstreamConfig(), ["--task", "vqa", "--preset", preset],
                               TASK_PRESETS, key=("task", "preset"))
        model = tasks.build_model(dcfg, cfg, tok, ["yes", "red cube"], WorldAids())
        assert model.answer_ids.tolist() == rows
        assert model.answer_mask.tolist() == [[int(t != pad) for t in r] for r in rows]
