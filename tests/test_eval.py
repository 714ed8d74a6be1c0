"""The evaluation loops (eval.py) on stand-in models whose scores are known: the ITM re-ranking
of retrieval against recall_at_k on the same scores, the classifier, VQA and captioning loops
against their metrics, and the model's mode restored after each; 2 DDP ranks against one."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddp_probe
import train_pretrain
from eval import (evaluate_caption, evaluate_classifier, evaluate_retrieval, evaluate_vqa,
                  shard_loader)
from metrics import accuracy, bleu4, cider_d, recall_at_k, vqa_accuracy
from test_train_pretrain import SMALL, torchrun


class ListDataset(torch.utils.data.Dataset):
    """The given samples, and the attributes the loop reads (text, img2txt, answer_list, ...)."""

    def __init__(self, samples, **attrs):
        self.samples = samples
        self.__dict__.update(attrs)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class Retriever(nn.Module):
    """Images and texts are vectors; ITC scores their cosine, ITM minus their dot product, so that
    re-ranking changes the order."""

    def __init__(self, text_vecs):
        super().__init__()
        self.text_vecs = text_vecs                                            # (T, D)

    def encode_text(self, ids, mask):
        return self.text_vecs[ids[:, 0]][:, None]                             # (B, 1, D)

    def encode_image(self, images):
        return images[:, None]                                                # (B, 1, D)

    def image_feat(self, embeds):
        return F.normalize(embeds[:, 0], dim=-1)

    def text_feat(self, embeds):
        return F.normalize(embeds[:, 0], dim=-1)

    def itm_logits(self, text_embeds, mask, image_embeds, ids):
        s = -(text_embeds[:, 0] * image_embeds[:, 0]).sum(-1)                 # (B,)
        return torch.stack([-s, s], dim=1)                                    # (B, 2)


def index_tokenizer(texts, max_len):
    """Each text is its own index: ids (B, 1)."""
    ids = torch.tensor([[int(t)] for t in texts])
    return ids, torch.ones_like(ids)


def retrieval_case(num_images=6, per_image=2, dim=5):
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(num_images, dim, generator=g), torch.randn(
        num_images * per_image, dim, generator=g)
    img2txt = [list(range(i * per_image, (i + 1) * per_image)) for i in range(num_images)]
    txt2img = [i for i in range(num_images) for _ in range(per_image)]
    dataset = ListDataset([{"image": images[i], "index": i} for i in range(num_images)],
                          text=[str(t) for t in range(len(texts))], img2txt=img2txt,
                          txt2img=txt2img)
    return Retriever(texts), dataset, images, texts


def test_retrieval_reranks_every_pair_when_k_covers_all():
    model, dataset, images, texts = retrieval_case()
    model.train()
    out = evaluate_retrieval(model, dataset, index_tokenizer, "cpu", k=100, batch_size=4)
    assert model.training                                                     # mode restored
    itm = -(images @ texts.T)                                                 # (N, T)
    itc = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    expected = recall_at_k(itm, itm.T, dataset.img2txt, dataset.txt2img)
    assert out["itc"] == pytest.approx(recall_at_k(itc, itc.T, dataset.img2txt, dataset.txt2img))
    assert {k: v for k, v in out.items() if k != "itc"} == pytest.approx(expected)
    assert out["r_mean"] != pytest.approx(out["itc"]["r_mean"])              # re-ranking mattered


def test_retrieval_with_k_1_keeps_the_itc_top_1():
    model, dataset, _, _ = retrieval_case()
    out = evaluate_retrieval(model, dataset, index_tokenizer, "cpu", k=1, batch_size=3)
    for key in ("txt_r1", "img_r1"):                 # only the ITC top 1 gets a real ITM score
        assert out[key] == pytest.approx(out["itc"][key])


def test_retrieval_blip_score_adds_the_itc_cosine():
    """BLIP: the top k by ITC, each scored ITM logit + ITC cosine; the rest -100."""
    model, dataset, images, texts = retrieval_case()
    out = evaluate_retrieval(model, dataset, index_tokenizer, "cpu", k=100, add_itc=True)
    itc = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T            # (N, T)
    blip = -(images @ texts.T) + itc
    assert {k: v for k, v in out.items() if k != "itc"} == pytest.approx(
        recall_at_k(blip, blip.T, dataset.img2txt, dataset.txt2img))
    alone = evaluate_retrieval(model, dataset, index_tokenizer, "cpu", k=100)
    assert out["r_mean"] != pytest.approx(alone["r_mean"])                   # the sum mattered


class Classifier(nn.Module):
    def logits(self, batch):
        return F.one_hot((batch["x"] + batch["y"]) % 3, 3).float()           # (B, 3)


def test_classifier_accuracy_and_predictions():
    x, y = torch.arange(10), torch.arange(10) * 2
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    dataset = ListDataset([{"x": x[i], "y": y[i], "label": labels[i]} for i in range(10)])
    model = Classifier().eval()
    metrics, preds = evaluate_classifier(model, dataset, None, "cpu", batch_size=4)
    assert preds.tolist() == ((x + y) % 3).tolist() and not model.training
    assert metrics == {"accuracy": accuracy(preds, labels)}


class Answerer(nn.Module):
    def answer_scores(self, batch):
        return F.one_hot(batch["question_ids"][:, 0], 4).float()             # (B, 4)


def vqa_collate(batch):
    """{"image", "question": the answer's index} samples -> a batch as data.collate's."""
    ids = torch.tensor([s["question"] for s in batch])[:, None]               # (B, 1)
    return {"image": torch.stack([s["image"] for s in batch]), "question_ids": ids,
            "question_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("with_answers", [True, False])
def test_vqa_score_and_results(with_answers):
    answer_list = ["yes", "no", "two", "red"]
    picks = [0, 2, 3, 1, 2]
    truth = [["yes"] * 10, ["two"] * 2 + ["three"] * 8, ["blue"] * 10, ["no"] * 3, ["two"]] \
        if with_answers else [[]] * 5
    dataset = ListDataset([{"image": torch.zeros(3), "question": p} for p in picks],
                          answer_list=answer_list,
                          question_ids=[10, 11, 12, 13, 14],
                          items=[{"answers": t} for t in truth])
    metrics, results = evaluate_vqa(Answerer(), dataset, vqa_collate, "cpu", batch_size=2)
    answers = [answer_list[p] for p in picks]
    assert results == [{"question_id": q, "answer": a} for q, a in zip(range(10, 15), answers)]
    assert metrics == ({"vqa_score": vqa_accuracy(answers, truth)} if with_answers else {})


class Captioner(nn.Module):
    """Greedy says token ids [1, 2]; beam search [1, 3] for every image. Both record the limits
    they are given."""

    def __init__(self):
        super().__init__()
        self.limits = []

    def greedy(self, images, max_length, min_length, repetition_penalty):
        self.limits.append((max_length, min_length, repetition_penalty))
        return torch.tensor([[1, 2]]).expand(len(images), 2), None

    def beam_search(self, images, beam, max_length, min_length, length_penalty, repetition_penalty):
        self.limits.append((beam, max_length, min_length, length_penalty, repetition_penalty))
        return torch.tensor([[1, 3]]).expand(len(images), 2), None


class WordTokenizer:
    words = ["", "a", "red", "cube"]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids.tolist())


def test_caption_scores_greedy_and_beam_against_the_raw_references():
    """The references as the file has them, cleaned as the COCO evaluation does ("A red ball."
    scores as "a red ball"); BLIP's limits reach the decoding."""
    raw = [["A red ball.", "A red cube!"], ["A cube", "One cube."], ["A (red) thing", "Red"]]
    clean = [["a red ball", "a red cube"], ["a cube", "one cube"], ["a -lrb- red -rrb- thing", "red"]]
    dataset = ListDataset([{"image": torch.zeros(3), "index": i} for i in range(3)],
                          raw_references=raw)
    model = Captioner()
    metrics, captions = evaluate_caption(model, dataset, WordTokenizer(), "cpu", batch_size=2)
    assert captions == {"greedy": ["a red"] * 3, "beam": ["a cube"] * 3}
    assert metrics == pytest.approx({
        "greedy_bleu4": bleu4(["a red"] * 3, clean), "greedy_cider_d": cider_d(["a red"] * 3, clean),
        "beam_bleu4": bleu4(["a cube"] * 3, clean), "beam_cider_d": cider_d(["a cube"] * 3, clean)})
    assert model.limits == [(20, 5, 1.0), (3, 20, 5, 1.0, 1.0)] * 2          # two batches


def test_shard_loader_takes_workers_and_pins_for_a_gpu():
    dataset = ListDataset(list(range(10)))
    loader = shard_loader(dataset, 4, None, 2, "cpu")
    assert loader.num_workers == 2 and not loader.pin_memory
    assert shard_loader(dataset, 4, None, 0, torch.device("cuda", 0)).pin_memory
    assert [(b.tolist(), met) for b, met in loader] == [([0, 1, 2, 3], []), ([4, 5, 6, 7], []),
                                                        ([8, 9], [])]


def test_workers_give_the_results_of_none():
    """Retrieval (its image loader) and the classifier (its collate) with 2 DataLoader workers
    return exactly what they return reading in the main process."""
    model, dataset, _, _ = retrieval_case()
    runs = [evaluate_retrieval(model, dataset, index_tokenizer, "cpu", k=3, batch_size=4,
                               num_workers=w) for w in (0, 2)]
    assert runs[0] == runs[1]
    x, y = torch.arange(10), torch.arange(10) * 2
    samples = ListDataset([{"x": x[i], "y": y[i], "label": i % 3} for i in range(10)])
    (m0, p0), (m2, p2) = (evaluate_classifier(Classifier(), samples, None, "cpu", batch_size=3,
                                              num_workers=w) for w in (0, 2))
    assert m0 == m2 and torch.equal(p0, p2) and len(p0) == 10


def test_two_ranks_give_the_results_of_one(tmp_path):
    """2 gloo ranks, each embedding and re-ranking its share (7 images and 35 captions: uneven
    shares, batches of 3), against one process, on the same checkpoint and data; the other
    loops on stand-ins, 11 samples in batches of 4."""
    train_pretrain.main(SMALL + ["--out_dir", str(tmp_path), "--max_steps", "1"])
    ckpt = str(tmp_path / "checkpoint.pt")
    single = ddp_probe.retrieval_scores(ckpt, torch.device("cpu"))
    proc = torchrun([os.path.join("tests", "ddp_probe.py"), "eval", ckpt, str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    loops = json.loads(json.dumps(ddp_probe.loop_results()))           # as the ranks wrote it
    for rank in (0, 1):
        got = json.load(open(tmp_path / f"out_{rank}.json"))
        scores = got["retrieval"]
        assert scores.keys() == single.keys()
        assert scores["itc"] == pytest.approx(single["itc"])
        assert {k: v for k, v in scores.items() if k != "itc"} == pytest.approx(
            {k: v for k, v in single.items() if k != "itc"})
        assert got["loops"] == loops
    assert single["r_mean"] != single["itc"]["r_mean"]                    # ITM re-ranked
    assert len(set(loops["classifier"][1])) == 3 and len(set(loops["caption"][1]["beam"])) == 11
