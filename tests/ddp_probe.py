"""Run by the tests under torchrun (or as a single process):

    python ddp_probe.py fit OUT_DIR         train_pretrain.train on a toy problem whose batches show what
                                            each rank drew; once straight to 6 steps, once to 3
                                            steps and then resumed to 6 (the generators moved on
                                            in between): OUT_DIR/{straight,resumed}/, in each
                                            draws_<rank>.json; then a run whose loader fails on
                                            rank 1: OUT_DIR/failing/stopped_<rank>.txt
    python ddp_probe.py eval CKPT OUT       eval.evaluate_retrieval of a train_pretrain.py
                                            checkpoint on the world's test split, and the other
                                            loops on stand-in models; OUT_<rank>.json
"""
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

import data
import eval as evaluation
import world
import world_aids
from config import config_from_dict
from eval import evaluate_caption, evaluate_classifier, evaluate_vqa
from model import ModelConfig
from tokenizer import Tokenizer
import train_pretrain
from trainer import RunConfig, distributed, load_checkpoint, seed_everything

SAMPLES = 32


class Draws(torch.utils.data.Dataset):
    """Sample i: its index and a draw of torch's generator, like a flip or a crop. With `fail`,
    the ninth sample read raises an error that is not an unreadable image."""

    def __init__(self, fail=False):
        self.fail, self.reads = fail, 0

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        self.reads += 1
        if self.fail and self.reads == 9:
            raise ValueError(f"broken sample {i}")
        return {"index": torch.tensor(float(i)), "augment": torch.rand(())}


@dataclass
class ProbeConfig:
    run: RunConfig = field(default_factory=RunConfig)


class Toy(nn.Module):
    """A stand-in for ELIPModel in train_pretrain.train: each forward records what it drew (the
    batch's indices and augmentations, and a draw in the step, like MLM masks and ITM
    negatives) under its step number."""

    def __init__(self, first_step=0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.5), nn.Linear(16, 1))
        self.steps, self.draws = first_step, {}

    def forward(self, batch, alpha=0.0):
        index, augment = batch["index"], batch["augment"]
        in_step = torch.rand(len(index), device=index.device)
        self.steps += 1
        self.draws[self.steps] = {"index": index.tolist(), "augment": augment.tolist(),
                                  "in_step": in_step.tolist()}
        x = torch.stack([augment, in_step], 1)                                     # (B, 2)
        return {"loss": (self.net(x).squeeze(1) - index / SAMPLES).pow(2).mean()}

    def momentum_step(self, queued):
        """No teacher."""


def fit_run(out_dir, max_steps, rank, world_size, device, ckpt=None, fail=False):
    """train_pretrain.train for max_steps; returns {step: {"index", "augment", "in_step"}} of
    this rank."""
    cfg = ProbeConfig(RunConfig(batch_size=4, epochs=2, max_steps=max_steps, lr=1e-2,
                                warmup_steps=1, log_every=1, out_dir=out_dir))
    model = Toy(ckpt["step"] if ckpt else 0).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    train_pretrain.train(cfg, model, Draws(fail), torch.utils.data.default_collate, device, rank,
                         world_size, lambda msg: None, ckpt)
    return model.draws


def fit_main(out):
    with distributed(1) as (rank, world_size, device):
        seed_everything(0, rank)
        straight = fit_run(os.path.join(out, "straight"), 6, rank, world_size, device)
        seed_everything(0, rank)
        resumed = os.path.join(out, "resumed")
        draws = fit_run(resumed, 3, rank, world_size, device)
        torch.manual_seed(1234 + rank)            # a restarted process starts from other states
        ckpt = load_checkpoint(os.path.join(resumed, "checkpoint.pt"))
        draws.update(fit_run(resumed, 6, rank, world_size, device, ckpt))
        for name, d in (("straight", straight), ("resumed", draws)):
            with open(os.path.join(out, name, f"draws_{rank}.json"), "w") as f:
                json.dump(d, f)
        # rank 1's loader fails in step 3: every rank stops there with the message, none waits
        try:
            fit_run(os.path.join(out, "failing"), 6, rank, world_size, device, fail=rank == 1)
        except SystemExit as e:
            with open(os.path.join(out, "failing", f"stopped_{rank}.txt"), "w") as f:
                f.write(str(e))


def retrieval_scores(ckpt_path, device, images=7, k=4, batch_size=3):
    ckpt = load_checkpoint(ckpt_path)
    mc = config_from_dict(ModelConfig, ckpt["config"]["model"])
    model = world_aids.build_model(mc, world_aids.aids_of(ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    test_set = data.RetrievalEvalDataset(world.world_entries("retrieval", "test", images), None,
                                         data.create_transform(mc.img_size, train=False),
                                         max_words=mc.max_len)
    return evaluation.evaluate_retrieval(model, test_set, Tokenizer(ckpt["vocab"]), device, k=k,
                                         max_len=mc.max_len, batch_size=batch_size)


class Samples(torch.utils.data.Dataset):
    def __init__(self, samples, **attrs):
        self.samples = samples
        self.__dict__.update(attrs)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class Classifier(nn.Module):
    def logits(self, batch):
        return torch.nn.functional.one_hot((batch["x"] + batch["y"]) % 3, 3).float()  # (B, 3)


class Answerer(nn.Module):
    def answer_scores(self, batch):
        return torch.nn.functional.one_hot(batch["question_ids"][:, 0], 4).float()  # (B, 4)


def vqa_collate(batch):
    """{"image", "question": the answer's index} samples -> a batch as data.collate's."""
    ids = torch.tensor([s["question"] for s in batch])[:, None]                   # (B, 1)
    return {"image": torch.stack([s["image"] for s in batch]), "question_ids": ids,
            "question_mask": torch.ones_like(ids)}


class Captioner(nn.Module):
    """Image i (a vector of i's) is captioned "a <word i>" greedily, "<word i> a" by beam search."""

    def greedy(self, images, **limits):
        return torch.stack([torch.zeros_like(images[:, 0]), images[:, 0] + 2], 1).long(), None

    def beam_search(self, images, beam, **limits):
        return self.greedy(images)[0].flip(1), None


def loop_results():
    """The classifier, VQA and captioning loops on stand-in models (as test_eval's), 11 samples
    in batches of 4 (uneven shares), as plain JSON values."""
    x, y = torch.arange(11), torch.tensor([5, 1, 7, 2, 2, 9, 0, 4, 3, 8, 6])
    labels = torch.arange(11) % 3
    classifier = Samples([{"x": x[i], "y": y[i], "label": labels[i]} for i in range(11)])
    scores, preds = evaluate_classifier(Classifier(), classifier, None, "cpu", batch_size=4)
    picks = [0, 2, 3, 1, 2, 1, 0, 3, 3, 2, 1]
    vqa = Samples([{"image": torch.zeros(3), "question": p} for p in picks],
                  answer_list=["yes", "no", "2", "red"], question_ids=list(range(11)),
                  items=[{"answers": ["no"]}] * 11)
    vqa_scores, answers = evaluate_vqa(Answerer(), vqa, vqa_collate, "cpu", batch_size=4)
    caption = Samples([{"image": torch.full((3,), float(i)), "index": i} for i in range(11)],
                      raw_references=[["a cube"]] * 11)
    tokenizer = type("Words", (), {"decode": lambda self, ids: " ".join(
        ("a", "?", *map(str, range(11)))[i] for i in ids.tolist())})()
    caption_scores, captions = evaluate_caption(Captioner(), caption, tokenizer, "cpu",
                                                batch_size=4)
    return {"classifier": [scores, preds.tolist()], "vqa": [vqa_scores, answers],
            "caption": [caption_scores, captions]}


def eval_main(ckpt_path, out):
    with distributed(1) as (rank, world_size, device):
        results = {"retrieval": retrieval_scores(ckpt_path, device), "loops": loop_results()}
        with open(f"{out}_{rank}.json", "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"fit": fit_main, "eval": eval_main}[sys.argv[1]](*sys.argv[2:])
