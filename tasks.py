"""
The downstream tasks of train_downstream.py, piece by piece: each task's data (the ALBEF/BLIP JSON
files or the embedded world), its model on the pre-trained architecture, and its evaluation on a
test set beside a chance or majority baseline.

    train_set, test_sets, answers = build_sets(cfg, mc)
    train_collate, test_collate = task_collates(cfg, mc, tok, answers)
    model = build_model(cfg, mc, tok, answers, aids)
    scores, baseline, kind, predictions = evaluate_task(cfg, model, train_set, test_set, ...)
    file_name, text, id_name, missing = official_results(task, test_set, predictions)

Every test file is a test set of its own (`--test_file val.json,test.json`: metrics per file);
several training files are one training set (ALBEF's VQA trains on vqa_train + vqa_val + vg_qa).
VQA, captioning and NLVR2 predictions also come as the file their official evaluation reads
(official_results).
"""
import dataclasses
import json
import os
from collections import Counter
from functools import partial

import torch

import data
import eval as evaluation
import metrics
import released
import world
import world_aids
from config import apply_preset, config_from_dict
from heads import CaptionModel, NLVRModel, VEModel
from model import PRESETS, ModelConfig
from pruning import TEXT_GUIDED, PruneConfig
from tokenizer import BLIP_TOKENS, Tokenizer
from trainer import load_checkpoint
from vqa import VQADecoderModel, VQAModel

TASKS = ("retrieval", "vqa", "nlvr", "ve", "caption")


# ---- data --------------------------------------------------------------------------------
def vqa_collate(batch, tokenizer, max_len, answer_index):
    """The VQA classifier's training batch: {"image" (B, 3, H, W), "question_ids",
    "question_mask" (B, T) as data.collate makes them, "targets" (B, A): the soft score of each
    answer of the list}. An answer outside the list is dropped: the classifier cannot give it. A
    module-level function, so DataLoader workers can pickle it."""
    hits = [(i, answer_index[a], w) for i, sample in enumerate(batch)
            for a, w in zip(sample["answers"], sample["weights"]) if a in answer_index]
    targets = torch.zeros(len(batch), len(answer_index))
    if hits:
        rows, cols, scores = zip(*hits)
        targets[list(rows), list(cols)] = torch.tensor(scores)
    out = data.collate([{"image": s["image"], "question": s["question"]} for s in batch],
                       tokenizer, max_len)
    return {**out, "targets": targets}


def task_dataset(cfg, entries, root, transform, train, answers, max_words):
    """One dataset of the task; `answers` is VQA's answer list (None: every answer seen). A
    mirrored training image swaps left and right in its texts with --swap_left_right. A test
    set scores an unreadable image as a black one (data.for_evaluation)."""
    dataset = train_or_test_dataset(cfg, entries, root, transform, train, answers, max_words)
    dataset.swap_words = cfg.swap_left_right
    return dataset if train else data.for_evaluation(dataset)


def train_or_test_dataset(cfg, entries, root, transform, train, answers, max_words):
    task, kw = cfg.task, dict(max_words=max_words)
    blip = cfg.caption_style == "blip"
    if task in ("retrieval", "caption"):
        kw["clean"] = data.pre_caption_blip if blip else data.pre_caption
    if task == "retrieval":
        return (data.RetrievalTrainDataset(entries, root, transform, **kw) if train
                else data.RetrievalEvalDataset(entries, root, transform, **kw))
    if task == "vqa":
        # the classifier's targets are the VQA soft scores; the decoder weighs its answers as
        # ALBEF's dataset does
        weighting = "share" if cfg.vqa_head == "decoder" else "score"
        return data.VQADataset(entries, root, transform, train, answers, **kw,
                               weighting=weighting, vg_weight=cfg.vg_weight,
                               clean=data.pre_question_blip if blip else data.pre_question)
    if task == "nlvr":
        return data.NLVRDataset(entries, root, transform, **kw)
    if task == "ve":
        return data.VEDataset(entries, root, transform, train, **kw)
    return data.CaptionDataset(entries, root, transform, train, **kw)


def build_sets(cfg, mc, answers=None):
    """(train set or None, {name: test set}, VQA's answer list or None): the JSON files, or the
    world's splits (named "world"). Without --train_file an evaluation-only run has no training
    set (and so no majority baseline). `answers`: VQA's answer list when the model fixes it (a
    fine-tuned checkpoint); else --answer_list, the world's, or every answer of the training files."""
    if cfg.train_file and not cfg.test_file or cfg.test_file and not (cfg.train_file or cfg.evaluate):
        raise SystemExit("error: give both --train_file and --test_file (--test_file alone with "
                         "--evaluate true), or neither (the embedded world)")
    task, root = cfg.task, cfg.image_root or None
    train_tf = data.create_transform(mc.img_size, True, cfg.crop_scale, cfg.randaug_n,
                                     cfg.randaug_m)
    test_tf = data.create_transform(mc.img_size, False)
    if answers is None and task == "vqa":
        answers = cfg.answer_list or (None if cfg.train_file else world.world_answer_list())
    train_set = None
    if cfg.train_file or not cfg.test_file:
        entries = list(cfg.train_file) or world.world_entries(task, "train", cfg.world_train,
                                                              cfg.world_seed)
        train_set = task_dataset(cfg, entries, root, train_tf, True, answers, cfg.max_words)
        answers = train_set.answer_list if task == "vqa" else answers
    if task == "vqa" and not answers:
        raise SystemExit("error: VQA without training files needs --answer_list")
    tests = {f: [f] for f in cfg.test_file} or {
        "world": world.world_entries(task, "test", cfg.world_test, cfg.world_seed)}
    test_sets = {name: task_dataset(cfg, entries, root, test_tf, False, answers,
                                    cfg.eval_max_words) for name, entries in tests.items()}
    if task == "vqa":   # the list itself, where --answer_list named a file
        answers = next(iter(test_sets.values())).answer_list
    return train_set, test_sets, answers


def task_collates(cfg, mc, tok, answers):
    """(train collate, test collate): named batches of tokenised text; the VQA classifier trains
    on soft scores over the answer list (vqa_collate)."""
    collate = data.make_collate(tok, mc.max_len)
    if cfg.task == "caption":   # BLIP cuts prompt + caption at max_len tokens (BLIP/models/blip.py:110)
        return data.make_collate(tok, mc.max_len - len(tok.encode(cfg.prompt)) + 2), collate
    if cfg.task != "vqa" or cfg.vqa_head == "decoder":
        return collate, collate
    return partial(vqa_collate, tokenizer=tok, max_len=mc.max_len,
                   answer_index={a: i for i, a in enumerate(answers)}), collate


def grow_vocabulary(cfg, tok, train_set, answers):
    """The tokenizer plus every word of the training texts (captions, questions, sentences,
    VQA's answers, the caption prompt) that it can only read as [UNK], as new whole-word tokens,
    most frequent first: fine-tuning then learns an embedding for each, as BLIP adds [DEC] and
    [ENC] to BERT's vocabulary, instead of one [UNK] for all (answers that all read [UNK]
    cannot be told apart). Returns (tokenizer, the words added)."""
    texts = [cfg.prompt] if cfg.task == "caption" else []
    texts += list(answers or [])
    for item in train_set.items:
        for key in ("captions", "question", "answers", "sentence"):
            value = item.get(key, [])
            texts += [value] if isinstance(value, str) else list(value)
    words = tok.unknown_words(texts)
    return tok.add_tokens(words), words


# ---- model -------------------------------------------------------------------------------
def downstream_model_config(mc, cfg):
    """The pre-trained architecture for fine-tuning: the resolution and text length asked for
    (--img_size, --max_len; 0 keeps the pre-training's), the ViT's drop path (--drop_path), ITM
    negatives from every rank if asked, and the downstream pruning: none, as the paper fine-tunes
    and evaluates on all tokens, unless --prune true, which keeps the pre-training schedule in
    fine-tuning and evaluation. Retrieval evaluation embeds each image once for all captions, so
    no text can guide it there: a text-guided method then prunes in fine-tuning only."""
    if not cfg.prune:
        prune = PruneConfig(method="none")
    else:
        text_free_eval = cfg.task == "retrieval" and mc.prune.method in TEXT_GUIDED
        prune = dataclasses.replace(mc.prune, in_eval=not text_free_eval)
    # BLIP's retrieval fine-tuning (a BLIP backbone: cross-attention in every layer) weighs its
    # ITM negatives by the online image x online text similarities of the batch (every rank's
    # with negative_all_rank), without pre-training's 1e-4 (BLIP/models/blip_retrieval.py:136-184)
    blip_retrieval = cfg.task == "retrieval" and mc.fusion_layers == 0
    # ("itc", "itm"): the retrieval objectives (one caption per sample); for every task, a text
    # encoder without MLM head
    return dataclasses.replace(mc, prune=prune, losses=("itc", "itm"),
                               img_size=cfg.img_size or mc.img_size,
                               max_len=cfg.max_len or mc.max_len, drop_path=cfg.drop_path,
                               negative_all_rank=cfg.negative_all_rank,
                               itm_online_candidates=blip_retrieval,
                               itm_weight_eps=0.0 if blip_retrieval else mc.itm_weight_eps)


def scratch_model_config():
    """(model config, tokenizer, world aids) of what train_pretrain.py builds by default, the
    tiny preset with the world's vocabulary and aids (world_aids.TINY), for the same fine-tuning
    from random weights (--pretrained none): what pre-training adds is the difference."""
    tok = Tokenizer.build([" ".join(world.World.vocabulary())])
    mc = apply_preset(ModelConfig(), PRESETS["tiny"])
    mc = dataclasses.replace(mc, vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id,
                             mask_id=tok.mask_id, enc_id=tok.enc_id, dec_id=tok.dec_id)
    return mc, tok, world_aids.TINY


def build_model(cfg, mc, tok, answers, aids):
    """The task's model on mc, its ViTs built as the pre-trained model's (`aids`, the
    checkpoint's world_aids.aids_of, so a tiny-preset checkpoint's ConvStem loads). Retrieval
    fine-tunes the pre-training model itself with the aids' architecture but one caption per
    sample and no object labels (the downstream data has neither)."""
    task, distill = cfg.task, dict(distill=cfg.distill, momentum=cfg.momentum)
    if task == "retrieval":
        return world_aids.build_model(mc, dataclasses.replace(aids, objects=False,
                                                              itc_all_captions=False))
    embed = dict(embed_layer=world_aids.embed_layer(aids))
    if task == "vqa" and cfg.vqa_head == "classifier":
        model = VQAModel(mc, len(answers), **embed)
    elif task == "vqa":   # BLIP's VQA fine-tunes without distillation
        model = VQADecoderModel(mc, *tok(answers, mc.max_len), cfg.vqa_k,
                                distill=cfg.distill and mc.fusion_layers > 0,
                                momentum=cfg.momentum, answer_seps=cfg.vqa_answer_seps, **embed)
    elif task == "nlvr":
        model = NLVRModel(mc, **distill, **embed)
    elif task == "ve":
        model = VEModel(mc, **distill, **embed)
    else:   # [CLS] prompt, no [SEP]
        model = CaptionModel(mc, tok.encode(cfg.prompt)[:-1], tok.sep_id, **embed)
    # the start a model from random weights gets in pre-training; pre-trained weights loaded
    # afterwards replace it
    world_aids.init_positions(model, aids)
    return model


# ---- the source checkpoint ---------------------------------------------------------------
def load_source(cfg, log=print):
    """The checkpoint given as --pretrained: (model config, the world's aids it was trained with,
    tokenizer, state dict, VQA answer list or None, the config of the run that wrote it if it is
    a fine-tuned checkpoint, else None); for --pretrained none, the default pre-training's
    architecture and vocabulary and no state dict. A file of the authors' releases (no
    vocabulary inside) goes through released_source."""
    if cfg.pretrained == "none" and not cfg.evaluate:
        mc, tok, aids = scratch_model_config()
        if cfg.scratch_like:      # main checked that it exists
            like = load_checkpoint(cfg.scratch_like)
            mc = config_from_dict(ModelConfig, like["config"]["model"])
            tok, aids = Tokenizer(like["vocab"]), world_aids.aids_of(like["config"])
        return downstream_model_config(mc, cfg), aids, tok, None, None, None
    if not os.path.isfile(cfg.pretrained):
        raise SystemExit(f"error: --pretrained {cfg.pretrained} does not exist (make one with "
                         f"python train_pretrain.py)")
    source = load_checkpoint(cfg.pretrained)
    if "model_config" in source:          # fine-tuned here: its own architecture and heads
        if not cfg.evaluate or source["config"]["task"] != cfg.task:
            raise SystemExit(f"error: {cfg.pretrained} is a fine-tuned {source['config']['task']} "
                             f"checkpoint: evaluate it with --task {source['config']['task']} "
                             f"--evaluate true, or continue it with --resume")
        mc = config_from_dict(ModelConfig, source["model_config"])
        mc = dataclasses.replace(mc, img_size=cfg.img_size or mc.img_size)
        return (mc, world_aids.aids_of(source), Tokenizer(source["vocab"]), source["model"],
                source["answer_list"] or None, source["config"])
    if "vocab" not in source:
        return released_source(cfg, source, log)
    if not {"model", "config"} <= source.keys():
        raise SystemExit(f"error: {cfg.pretrained} is not a checkpoint of train_pretrain.py")
    mc = downstream_model_config(config_from_dict(ModelConfig, source["config"]["model"]), cfg)
    return (mc, world_aids.aids_of(source["config"]), Tokenizer(source["vocab"]), source["model"],
            None, None)


def released_source(cfg, checkpoint, log):
    """load_source for a released ALBEF, BLIP or ELIP checkpoint (released.py): its weights in
    this project's names, the architecture they imply on the preset of its family (albef or
    blip), and --vocab (BERT's, plus BLIP's [DEC] and [ENC] for BLIP). A fine-tuned file
    (retrieval, VQA, SNLI-VE, captioning) also brings its task's heads, loaded strictly."""
    try:
        conv = released.to_ours(released.unwrap(checkpoint), head_dim=cfg.head_dim)
    except ValueError as e:
        raise SystemExit(f"error: --pretrained {cfg.pretrained}: {e}") from None
    if not cfg.vocab:
        raise SystemExit(f"error: --pretrained {cfg.pretrained} is a released {conv.layout} "
                         f"checkpoint, which holds no vocabulary: give --vocab the BERT vocab.txt "
                         f"it was trained with (bert-base-uncased)")
    if cfg.prune:
        raise SystemExit(f"error: --prune true keeps the pruning schedule a checkpoint of "
                         f"train_pretrain.py records; the released {conv.layout} file records none")
    tok = Tokenizer.from_file(cfg.vocab)
    tok = tok.add_tokens(BLIP_TOKENS) if conv.family == "blip" else tok
    base = dataclasses.replace(apply_preset(ModelConfig(), PRESETS[conv.family]),
                               prune=PruneConfig(method="none"))
    try:
        mc = released.model_config(conv, base, tok)
    except ValueError as e:
        raise SystemExit(f"error: --pretrained {cfg.pretrained} with --vocab {cfg.vocab}: {e}") \
            from None
    tuned = None
    if conv.task != "pretrain":
        if conv.task != cfg.task:
            raise SystemExit(f"error: {cfg.pretrained} is a released fine-tuned {conv.task} model "
                             f"({conv.layout}): use it with --task {conv.task}")
        tuned = {"task": conv.task, "vqa_head": "decoder", "distill": conv.momentum,
                 "vqa_answer_seps": 2 if conv.family == "albef" else 1}
    log(f"{cfg.pretrained}: a released {conv.layout} checkpoint, converted to this project's "
        f"names ({len(conv.state)} tensors; {len(conv.dropped)} tied copies and position-id "
        f"buffers left out)")
    return downstream_model_config(mc, cfg), world_aids.WorldAids(), tok, conv.state, None, tuned


# ---- evaluation --------------------------------------------------------------------------
def evaluate_task(cfg, model, train_set, test_set, collate, tok, device, log):
    """(scores, baseline, what the baseline is, predictions or None) on one test set; the
    baseline needs the training set ({} without one)."""
    bs, task, workers = cfg.eval_batch_size, cfg.task, cfg.run.num_workers
    if task == "retrieval":
        scores = evaluation.evaluate_retrieval(model, test_set, tok, device, k=cfg.eval_k,
                                                max_len=model.cfg.max_len, batch_size=bs,
                                                add_itc=cfg.retrieval_score == "itm_itc",
                                                num_workers=workers)
        chance = metrics.chance_recall(test_set.img2txt)
        log(metrics.format_recall(scores, chance, f"retrieval, {len(test_set)} test images, "
                                     f"{cfg.retrieval_score} re-ranking of the top {cfg.eval_k}"))
        log(metrics.format_recall(scores["itc"], None, "ITC only"))
        return scores, chance, "chance (random ranking)", None
    if task == "vqa":
        scores, results = evaluation.evaluate_vqa(model, test_set, collate, device, bs, workers)
        truth = [it["answers"] for it in test_set.items]
        if train_set is None or not all(truth):
            return scores, {}, "none", results
        top = Counter(Counter(it["answers"]).most_common(1)[0][0] for it in train_set.items)
        majority = top.most_common(1)[0][0]
        baseline = {"vqa_score": metrics.vqa_accuracy([majority] * len(truth), truth)}
        return scores, baseline, f"majority answer of the training set ({majority!r})", results
    if task in ("nlvr", "ve"):
        scores, preds = evaluation.evaluate_classifier(model, test_set, collate, device, bs, workers)
        predictions = [{"sentence": it["sentence"], "label": it["label"], "prediction": p}
                       for it, p in zip(test_set.items, preds.tolist())]
        if train_set is None:
            return scores, {}, "none", predictions
        majority = Counter(it["label"] for it in train_set.items).most_common(1)[0][0]
        labels = [it["label"] for it in test_set.items]
        baseline = {"accuracy": metrics.accuracy([majority] * len(labels), labels)}
        return scores, baseline, f"majority label of the training set ({majority})", predictions
    scores, captions = evaluation.evaluate_caption(
        model, test_set, tok, device, cfg.beam, cfg.max_length, cfg.min_length, bs,
        cfg.length_penalty, cfg.repetition_penalty, workers)
    predictions = [{"image": it["images"][0], "greedy": g, "beam": b}
                   for it, g, b in zip(test_set.items, captions["greedy"], captions["beam"])]
    if train_set is None:
        return scores, {}, "none", predictions
    # majority: the most frequent training caption for every image; chance: a true caption of
    # another image (the next one's first reference)
    common = Counter(c for it in train_set.items for c in it["captions"]).most_common(1)[0][0]
    refs = test_set.raw_references
    guesses = {"": [common] * len(refs), "chance_": [r[0] for r in refs[1:] + refs[:1]]}
    baseline = {f"{name}{metric}": value for name, caps in guesses.items()
                for metric, value in metrics.caption_scores(caps, refs).items()}
    return scores, baseline, f"bleu4, cider_d: the most frequent training caption ({common!r}) " \
        "for every image; chance_*: a true caption of another image", predictions


# ---- the official evaluations' files -----------------------------------------------------
def official_id(value):
    """An id as the official evaluations read it, an int (from an int or a string of digits);
    None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else None


def image_number(path):
    """COCO's image id, the file name's trailing number, as BLIP reads it for the COCO caption
    evaluation (COCO_val2014_000000391895.jpg -> 391895; BLIP/data/coco_karpathy_dataset.py:80);
    None if the name does not end in one."""
    return official_id(os.path.splitext(os.path.basename(path))[0].split("_")[-1])


def official_results(task, test_set, predictions):
    """(file name with {} for the test set's name, its text, the id it needs, how many entries
    lacked one) of what the official evaluation of `task` reads, or None (retrieval, SNLI-VE).
    VQA: the VQA server's [{"question_id": int, "answer": str}] (as ALBEF's and BLIP's result
    files); captioning: the COCO caption evaluation's [{"image_id": int, "caption": str}], the
    beam-search caption, one per image id (BLIP's save_result drops repeats); NLVR2: the lines
    "identifier,True|False" that nlvr2/eval/metrics.py of the NLVR2 repository reads. An entry
    without the id gets its index in the test file instead: the caller says so."""
    items = list(test_set.items)
    if task == "vqa":
        ids = [official_id(q) for q in test_set.question_ids]
        rows = [{"question_id": i if q is None else q, "answer": p["answer"]}
                for i, (q, p) in enumerate(zip(ids, predictions))]
        return "vqa_result_{}.json", json.dumps(rows), "question_id", ids.count(None)
    if task == "caption":
        ids = [official_id(it["image_id"]) for it in items]
        ids = [image_number(it["images"][0]) if n is None else n for n, it in zip(ids, items)]
        rows, seen = [], set()
        for i, (image_id, p) in enumerate(zip(ids, predictions)):
            image_id = i if image_id is None else image_id
            if image_id not in seen:
                seen.add(image_id)
                rows.append({"image_id": image_id, "caption": p["beam"]})
        return ("caption_result_{}.json", json.dumps(rows), "image_id (or a file name ending in "
                "a number)", ids.count(None))
    if task == "nlvr":
        ids = [it["identifier"] for it in items]
        lines = [f"{i if n is None else n},{bool(p['prediction'])}"
                 for i, (n, p) in enumerate(zip(ids, predictions))]
        text = "".join(line + "\n" for line in lines)
        return "nlvr_result_{}.csv", text, "identifier", ids.count(None)
    return None
