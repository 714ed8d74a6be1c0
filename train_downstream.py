"""
Fine-tune a pre-trained ELIP model on a downstream task, then evaluate it on the test split.

    python train_downstream.py --task retrieval          # the embedded world's version, CPU, minutes
    python train_downstream.py --task vqa --prune true   # keep the token pruning downstream (a study)
    torchrun --nproc_per_node 4 train_downstream.py --task retrieval \\
        --pretrained out/pretrain/checkpoint.pt --train_file coco_train.json \\
        --test_file coco_test.json --image_root /data/coco --crop_scale 0.5,1.0 --eval_k 256

Tasks, each on ELIP's pre-trained encoders (heads.py, vqa.py):
  retrieval  ITC + ITM with every caption of an image a positive; ITC ranks all pairs and ITM
             re-scores the top eval_k (ALBEF); TR/IR R@1/5/10, and the ITC-only figures
  vqa        ALBEF's / BLIP's answer decoder (vqa.py), the answer list ranked by its likelihood
             (top vqa_k by the first token, then the whole answer); or --vqa_head classifier:
             the answer list classified on the fusion [CLS], BCE on VQA soft scores
  nlvr       the sentence fused with each image, the two [CLS] concatenated: true / false
  ve         SNLI-VE: fusion [CLS] -> contradiction / neutral / entailment
  caption    the decoder with the prompt "a picture of "; greedy and beam search, BLEU-4, CIDEr-D
nlvr, ve and vqa (ALBEF's decoder) distil from a momentum model as ALBEF (--distill; --run.alpha).
With no --train_file/--test_file the data is the embedded world's version of the task; with them,
the ALBEF/BLIP JSON files (and --answer_list for VQA). Every field of DownstreamConfig (and of
the nested RunConfig) is a flag, as in train_pretrain.py; --task also sets that task's defaults
(TASK_PRESETS). The training loop, DDP, AMP and checkpoints are trainer.py's.

Writes to out_dir (out/<task>): checkpoint.pt (the fine-tuned model; --resume auto continues it),
log.jsonl, metrics.json (the test metrics beside a chance or majority baseline, the timings and
the weight-loading report) and, for VQA and captioning, predictions.json.
"""
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm import tqdm

import data
import eval as evaluation
import metrics
import world
from config import config_from_dict, parse_config
from heads import CaptionModel, NLVRModel, VEModel, load_pretrained
from model import ELIPModel, ModelConfig
from pruning import TEXT_GUIDED, PruneConfig
from tokenizer import Tokenizer
from trainer import (RunConfig, cleanup_distributed, fit, load_checkpoint, log_json,
                     resume_config, seed_everything, setup_distributed)
from vqa import VQADecoderModel, VQAModel


@dataclass
class DownstreamConfig:
    task: str = "retrieval"          # retrieval | vqa | nlvr | ve | caption; selects TASK_PRESETS
    pretrained: str = "out/pretrain/checkpoint.pt"   # a checkpoint of train_pretrain.py
    # data: ALBEF/BLIP JSON files (several: comma-separated); none given = the embedded world
    train_file: tuple[str, ...] = ()
    test_file: tuple[str, ...] = ()
    image_root: str = ""             # image paths in the JSON files are relative to this
    answer_list: str = ""            # VQA: a JSON list of answers; empty = the world's answers,
                                     # or every answer of the training files
    world_seed: int = 0
    world_train: int = 1000          # scenes (image pairs for nlvr) in the world's train split
    world_test: int = 200            # and in its test split
    crop_scale: tuple[float, ...] = (0.8, 1.0)   # random-crop area (ALBEF: 0.5,1.0)
    prune: bool = False              # keep the pre-training pruning schedule, in evaluation too
    vqa_head: str = "decoder"        # VQA: decoder (ALBEF/BLIP's answer decoder) | classifier
    vg_weight: float = 0.5           # VQA: the weight of a Visual Genome answer (BLIP: 0.2)
    distill: bool = True             # ALBEF's momentum distillation in nlvr, ve and vqa with an
                                     # ALBEF checkpoint's decoder (BLIP's VQA has none)
    momentum: float = 0.995          # the momentum model's EMA rate, once per optimizer step
    # evaluation
    eval_k: int = 16                 # retrieval: ITC candidates re-scored by ITM
    vqa_k: int = 128                 # VQA decoder: answers re-scored by their whole sequence
    eval_batch_size: int = 64
    beam: int = 3                    # captioning: beam size
    length_penalty: float = 1.0      # captioning: the best beam by log-probability / length ** this
    max_new_tokens: int = 20         # captioning: tokens generated after the prompt
    prompt: str = "a picture of "    # captioning (BLIP)
    run: RunConfig = field(default_factory=lambda: RunConfig(
        epochs=2, lr=1e-4, min_lr=1e-6, warmup_steps=20, out_dir="out/retrieval"))


# Each task's defaults, sized so that it fine-tunes and evaluates on the embedded world in a few
# minutes on a 2-core CPU from the tiny pre-training checkpoint. Explicit flags override them.
TASK_PRESETS = {
    "retrieval": dict(out_dir="out/retrieval", world_train=1000, epochs=1, lr=3e-4),
    "vqa": dict(out_dir="out/vqa", world_train=1200, epochs=4, lr=5e-4),
    "nlvr": dict(out_dir="out/nlvr", world_train=1200, epochs=2, lr=3e-4),
    "ve": dict(out_dir="out/ve", world_train=1600, epochs=2, lr=3e-4),
    "caption": dict(out_dir="out/caption", world_train=900, epochs=2, lr=3e-4),
}
# evaluation settings may change when a fine-tuning run resumes
SAFE_ON_RESUME = ("eval_k", "eval_batch_size", "beam", "length_penalty", "max_new_tokens",
                  "vqa_k")
VQA_HEADS = ("classifier", "decoder")

# ---- data --------------------------------------------------------------------------------
def vqa_collate(batch, tokenizer, max_len, answer_index):
    """VQA training batch -> images (B, 3, H, W), question ids and mask (B, T), targets (B, A):
    the soft score of each answer of the list. An answer outside the list is dropped: the
    classifier cannot give it. A module-level function, so DataLoader workers can pickle it."""
    images, questions, answers, weights = zip(*batch)
    ids, mask = tokenizer(list(questions), max_len)
    hits = [(i, answer_index[a], w) for i, (ans, ws) in enumerate(zip(answers, weights))
            for a, w in zip(ans, ws) if a in answer_index]
    targets = torch.zeros(len(batch), len(answer_index))
    if hits:
        rows, cols, scores = zip(*hits)
        targets[list(rows), list(cols)] = torch.tensor(scores)
    return torch.stack(images), ids, mask, targets


def build_data(cfg, mc, tok):
    """(train set, test set, train collate, test collate): the JSON files, or the world."""
    if bool(cfg.train_file) != bool(cfg.test_file):
        raise SystemExit("error: give both --train_file and --test_file, or neither "
                         "(the embedded world)")
    task, root = cfg.task, cfg.image_root or None
    train_entries = list(cfg.train_file) or world.world_entries(task, "train", cfg.world_train,
                                                               cfg.world_seed)
    test_entries = list(cfg.test_file) or world.world_entries(task, "test", cfg.world_test,
                                                             cfg.world_seed)
    train_tf = data.create_transform(mc.img_size, True, cfg.crop_scale)
    test_tf = data.create_transform(mc.img_size, False)
    collate = data.make_collate(tok, mc.max_len)
    words = dict(max_words=mc.max_len)
    if task == "retrieval":
        return (data.RetrievalTrainDataset(train_entries, root, train_tf, **words),
                data.RetrievalEvalDataset(test_entries, root, test_tf, **words), collate, collate)
    if task == "vqa":
        answers = cfg.answer_list or (None if cfg.train_file else world.world_answer_list())
        # the classifier's targets are the VQA soft scores; the decoder weighs its answers as
        # ALBEF's dataset does
        decoder = cfg.vqa_head == "decoder"
        train = data.VQADataset(train_entries, root, train_tf, True, answers, **words,
                                weighting="share" if decoder else "score", vg_weight=cfg.vg_weight)
        test = data.VQADataset(test_entries, root, test_tf, False, train.answer_list, **words)
        if decoder:
            return train, test, collate, collate
        index = {a: i for i, a in enumerate(train.answer_list)}
        return train, test, partial(vqa_collate, tokenizer=tok, max_len=mc.max_len,
                                    answer_index=index), collate
    if task == "nlvr":
        return (data.NLVRDataset(train_entries, root, train_tf, **words),
                data.NLVRDataset(test_entries, root, test_tf, **words), collate, collate)
    if task == "ve":
        return (data.VEDataset(train_entries, root, train_tf, True, **words),
                data.VEDataset(test_entries, root, test_tf, False, **words), collate, collate)
    return (data.CaptionDataset(train_entries, root, train_tf, True, **words),
            data.CaptionDataset(test_entries, root, test_tf, False, **words), collate, collate)


# ---- model -------------------------------------------------------------------------------
def downstream_model_config(mc, cfg):
    """The pre-trained architecture with the downstream pruning: none, as the paper fine-tunes
    and evaluates on all tokens, unless --prune true, which keeps the pre-training schedule in
    fine-tuning and evaluation. Retrieval evaluation embeds each image once for all captions, so
    no text can guide it there: a text-guided method then prunes in fine-tuning only."""
    if not cfg.prune:
        prune = PruneConfig(method="none")
    else:
        text_free_eval = cfg.task == "retrieval" and mc.prune.method in TEXT_GUIDED
        prune = dataclasses.replace(mc.prune, in_eval=not text_free_eval)
    # ("itc", "itm"): the retrieval objectives; for every task, a text encoder without MLM head
    return dataclasses.replace(mc, prune=prune, losses=("itc", "itm"))


def build_model(cfg, mc, tok, answers):
    task, distill = cfg.task, dict(distill=cfg.distill, momentum=cfg.momentum)
    if task == "retrieval":
        return ELIPModel(mc)
    if task == "vqa" and cfg.vqa_head == "classifier":
        return VQAModel(mc, len(answers))
    if task == "vqa":
        # BLIP's special tokens where the vocabulary has them, else [CLS] as ALBEF
        blip = mc.fusion_layers == 0
        bos = tok.token_to_id.get("[DEC]", tok.cls_id) if blip else tok.cls_id
        enc = tok.token_to_id.get("[ENC]") if blip else None
        return VQADecoderModel(mc, *tok(answers, mc.max_len), bos, enc, cfg.vqa_k,
                               distill=cfg.distill and not blip, momentum=cfg.momentum)
    if task == "nlvr":
        return NLVRModel(mc, **distill)
    if task == "ve":
        return VEModel(mc, **distill)
    return CaptionModel(mc, tok.encode(cfg.prompt)[:-1], tok.sep_id)   # [CLS] prompt, no [SEP]


# ---- evaluation --------------------------------------------------------------------------
def evaluate(cfg, model, train_set, test_set, collate, tok, device, log):
    """(scores, baseline, what the baseline is, predictions or None) on the test split."""
    bs, task = cfg.eval_batch_size, cfg.task
    if task == "retrieval":
        scores = evaluation.evaluate_retrieval(model, test_set, tok, device, k=cfg.eval_k,
                                                max_len=model.cfg.max_len, batch_size=bs)
        chance = metrics.chance_recall(test_set.img2txt)
        log(metrics.format_recall(scores, chance, f"retrieval, {len(test_set)} test images, "
                                     f"ITM re-ranking of the top {cfg.eval_k}"))
        log(metrics.format_recall(scores["itc"], None, "ITC only"))
        return scores, chance, "chance (random ranking)", None
    if task == "vqa":
        scores, results = evaluation.evaluate_vqa(model, test_set, collate, device, bs)
        top = Counter(Counter(it["answers"]).most_common(1)[0][0] for it in train_set.items)
        majority = top.most_common(1)[0][0]
        truth = [it["answers"] for it in test_set.items]
        baseline = {"vqa_score": metrics.vqa_accuracy([majority] * len(truth), truth)} \
            if all(truth) else {}
        return scores, baseline, f"majority answer of the training set ({majority!r})", results
    if task in ("nlvr", "ve"):
        scores, _ = evaluation.evaluate_classifier(model, test_set, collate, device, bs)
        majority = Counter(it["label"] for it in train_set.items).most_common(1)[0][0]
        labels = [it["label"] for it in test_set.items]
        baseline = {"accuracy": metrics.accuracy([majority] * len(labels), labels)}
        return scores, baseline, f"majority label of the training set ({majority})", None
    scores, captions = evaluation.evaluate_caption(model, test_set, tok, device, cfg.beam,
                                                    cfg.max_new_tokens, bs, cfg.length_penalty)
    # majority: the most frequent training caption for every image; chance: a true caption of
    # another image (the next one's first reference)
    common = Counter(c for it in train_set.items for c in it["captions"]).most_common(1)[0][0]
    refs = test_set.references
    guesses = {"": [common] * len(refs), "chance_": [r[0] for r in refs[1:] + refs[:1]]}
    baseline = {f"{name}{metric}": score(caps, refs) for name, caps in guesses.items()
                for metric, score in (("bleu4", metrics.bleu4), ("cider_d", metrics.cider_d))}
    predictions = [{"image": it["images"][0], "greedy": g, "beam": b}
                   for it, g, b in zip(test_set.items, captions["greedy"], captions["beam"])]
    return scores, baseline, f"bleu4, cider_d: the most frequent training caption ({common!r}) " \
        "for every image; chance_*: a true caption of another image", predictions


def main(argv=None):
    cfg, given = parse_config(DownstreamConfig(), sys.argv[1:] if argv is None else argv,
                              TASK_PRESETS, key="task", doc=__doc__)
    cfg, ckpt = resume_config(cfg, given, safe=SAFE_ON_RESUME)
    if cfg.vqa_head not in VQA_HEADS:
        raise SystemExit(f"error: --vqa_head {cfg.vqa_head!r} is not one of {', '.join(VQA_HEADS)}")
    rank, world_size, device = setup_distributed(cfg.run.dist_timeout)
    master = rank == 0
    log = tqdm.write if master else (lambda msg: None)
    if cfg.run.threads and device.type == "cpu":
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed, rank)

    # the pre-trained architecture and vocabulary; a resumed run has its own in its checkpoint
    if ckpt is not None:
        mc, tok = config_from_dict(ModelConfig, ckpt["model_config"]), Tokenizer(ckpt["vocab"])
    else:
        if not os.path.isfile(cfg.pretrained):
            raise SystemExit(f"error: --pretrained {cfg.pretrained} does not exist (make one with "
                             f"python train_pretrain.py)")
        source = load_checkpoint(cfg.pretrained)
        if not {"model", "config", "vocab"} <= source.keys():
            raise SystemExit(f"error: {cfg.pretrained} is not a checkpoint of train_pretrain.py")
        mc = downstream_model_config(config_from_dict(ModelConfig, source["config"]["model"]), cfg)
        tok = Tokenizer(source["vocab"])

    # data: every entry is checked when the dataset is built, before any training step
    try:
        train_set, test_set, train_collate, test_collate = build_data(cfg, mc, tok)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")

    # model: pre-trained weights loaded strictly, by name; the task's heads start fresh
    answers = train_set.answer_list if cfg.task == "vqa" else []
    model = build_model(cfg, mc, tok, answers).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        weights = ckpt["weights"]
    else:
        try:
            weights = load_pretrained(model, source["model"])
        except ValueError as e:
            raise SystemExit(f"error: {cfg.pretrained}: {e}")
        del source
        log(f"loaded {len(weights['loaded'])} tensors from {cfg.pretrained}; newly initialised: "
            f"{weights['initialised']}; unused pre-training tensors: {len(weights['unused'])} "
            f"({', '.join(sorted({k.split('.')[0] for k in weights['unused']}))})")
    log(f"task {cfg.task}: {len(train_set)} training samples, {len(test_set)} test samples; "
        f"prune: {mc.prune}")
    if cfg.task == "vqa":
        missed = sum(not set(it["answers"]) & set(answers) for it in train_set.items)
        log(f"answer list: {len(answers)} answers; {missed} training questions have no answer in "
            f"it (neither head can give them; the classifier's targets are all zero)")
    if cfg.task == "caption":
        log(f"prompt tokens: {' '.join(tok.vocab[i] for i in model.prompt_ids[0].tolist())}")

    distilled = cfg.task in ("nlvr", "ve") or (cfg.task == "vqa" and cfg.vqa_head == "decoder")

    def loss_fn(m, batch, step, steps_per_epoch):
        # ALBEF ramps alpha up over the first epoch, but for SNLI-VE (warm_up False)
        ramp = 1.0 if cfg.task == "ve" else min(1.0, step / steps_per_epoch)
        if cfg.task == "retrieval":
            images, ids, mask, idx = batch
            return m(images, ids, mask, alpha=cfg.run.alpha * ramp, idx=idx)
        return m(*batch, alpha=cfg.run.alpha * ramp) if distilled else m(*batch)

    extra = {"vocab": tok.vocab, "model_config": dataclasses.asdict(mc), "weights": weights,
             "answer_list": answers}
    train_time = fit(cfg, model, train_set, train_collate, loss_fn, device, rank, world_size, log,
                     ckpt, extra_state=extra, desc=cfg.task,
                     after_step=model.momentum_update if distilled and model.distill else None)

    if master:
        t0 = time.time()
        scores, baseline, baseline_kind, predictions = evaluate(
            cfg, model, train_set, test_set, test_collate, tok, device, log)
        rec = {"task": cfg.task, "metrics": scores, "baseline": baseline,
               "baseline_kind": baseline_kind, "train_seconds": train_time,
               "eval_seconds": time.time() - t0, "train_samples": len(train_set),
               "test_samples": len(test_set), "prune": dataclasses.asdict(mc.prune),
               "pretrained": cfg.pretrained, "config": dataclasses.asdict(cfg),
               "weights": {"initialised": weights["initialised"], "unused": weights["unused"]}}
        log_json(cfg.run.out_dir, {k: rec[k] for k in ("task", "metrics", "baseline")})
        with open(os.path.join(cfg.run.out_dir, "metrics.json"), "w") as f:
            json.dump(rec, f, indent=1)
        if predictions is not None:
            with open(os.path.join(cfg.run.out_dir, "predictions.json"), "w") as f:
                json.dump(predictions, f, indent=1)
        log(f"{cfg.task} test: {json.dumps({k: v for k, v in scores.items() if k != 'itc'})}; "
            f"baseline ({baseline_kind}): {json.dumps(baseline)}")
    cleanup_distributed(world_size)


if __name__ == "__main__":
    main()
