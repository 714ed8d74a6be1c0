"""
The evaluation loops of ELIP: zero-shot and fine-tuned retrieval (the pre-training model or the
retrieval fine-tuned one), NLVR2 / SNLI-VE classification, VQA over an answer list (classified, or
ranked by the answer decoder), and captioning. Each runs the model in eval mode, where the ViT
sees all tokens unless its PruneConfig has in_eval, restores the model's mode, and returns the
metrics (metrics.py) as plain floats, with the predictions where there are any.

Under DDP (a process group is running) every rank must call the loop: each computes its share of
the work (a contiguous block of the images, texts, queries or samples), the shares are gathered,
and every rank returns the same results. A single process does all of it.

Batches are dicts of named fields (data.collate); the models read them by name
(model.logits(batch), model.answer_scores(batch)). Each loop reads its data with num_workers
DataLoader workers (the run's --num_workers), into pinned memory when the device is a GPU.
"""
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from data import to_device
from metrics import accuracy, caption_scores, recall_at_k, vqa_accuracy


# ---- sharing the work over DDP ranks ----------------------------------------------------
def rank_and_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int, device=None) -> torch.Tensor:
    """This rank's block of range(n), padded to ceil(n / world) indices by repeating the last one,
    so that every rank holds as many rows for all_gather (gather_rows drops the padding)."""
    rank, world = rank_and_world()
    per = -(-n // world)
    return torch.arange(rank * per, (rank + 1) * per, device=device).clamp(max=n - 1)   # (per,)


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's block x (per, ...), concatenated in rank order, padding dropped: (n, ...)."""
    rank, world = rank_and_world()
    if world == 1:
        return x[:n]
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)[:n]


def gather_list(items: list, n: int) -> list:
    """gather_rows for a list of Python objects (the captions)."""
    rank, world = rank_and_world()
    if world == 1:
        return items[:n]
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part][:n]


def shard_loader(dataset, batch_size: int, collate=None, num_workers: int = 0,
                 device="cpu") -> DataLoader:
    """The DataLoader over this rank's block of the dataset (share), read by num_workers worker
    processes (the images are decoded while the GPU works), into pinned memory when the device
    is a GPU (faster copies to it)."""
    return DataLoader(Subset(dataset, share(len(dataset)).tolist()), batch_size,
                      collate_fn=collate, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda")


# ---- retrieval ----------------------------------------------------------------------------
@torch.no_grad()
def embed_retrieval_set(model, dataset, tokenizer, device, max_len, batch_size=64, num_workers=0):
    """Unimodal embeddings of every image and caption of a RetrievalEvalDataset, as ALBEF's
    evaluation: the ViT sees all tokens (eval mode), the text encoder runs text-only. Each rank
    embeds its block of the images and of the captions; every rank gets all of them."""
    ids, mask = tokenizer(dataset.text, max_len)        # every caption on every rank: cheap
    ids, mask = ids.to(device), mask.to(device)
    mine = share(len(ids), ids.device)
    text_embeds = torch.cat([model.encode_text(ids[s], mask[s])
                             for s in mine.split(batch_size)])                  # (T / world, L, D)
    image_embeds = torch.cat([model.encode_image(batch["image"].to(device))
                              for batch in shard_loader(dataset, batch_size, None, num_workers,
                                                        device)])
    return (gather_rows(image_embeds, len(dataset)), gather_rows(text_embeds, len(ids)),
            ids, mask)


@torch.no_grad()
def evaluate_retrieval(model, dataset, tokenizer, device, k=16, max_len=32, batch_size=64,
                       add_itc=False, num_workers=0):
    """Image-text retrieval as ALBEF and BLIP evaluate it: rank all pairs by ITC similarity,
    re-score the top k candidates of each query with the ITM head's match logit (ALBEF), plus
    their ITC cosine similarity with add_itc (BLIP, train_retrieval.py), report recall@1/5/10.
    Also returns the ITC-only figures under the key "itc". Under DDP each rank re-scores the
    queries of its block of rows, as ALBEF's evaluation splits the similarity matrix's rows
    over the ranks."""
    was_training = model.training
    model.eval()
    image_embeds, text_embeds, ids, mask = embed_retrieval_set(model, dataset, tokenizer, device,
                                                               max_len, batch_size, num_workers)
    sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).T      # (N, T)
    k_i2t, k_t2i = min(k, sim.shape[1]), min(k, sim.shape[0])

    def rerank(sim, k, query_is_image):
        """Scores (Q, C): the ITM match logit for each query's top-k candidates, -100 elsewhere.
        This rank's (query, candidate) pairs go through the fusion encoder in batches."""
        rows = share(sim.shape[0], sim.device)                                     # (Qr,)
        top = sim[rows].topk(k, dim=1).indices                                     # (Qr, k)
        q = rows.repeat_interleave(k)                                              # (Qr*k,)
        c = top.flatten()                                                          # (Qr*k,)
        img, txt = (q, c) if query_is_image else (c, q)
        logits = torch.cat([model.itm_logits(text_embeds[t], mask[t], image_embeds[i], ids[t])[:, 1]
                            for i, t in zip(img.split(batch_size), txt.split(batch_size))])
        scores = logits.view(-1, k).to(sim.dtype)                                  # (Qr, k)
        if add_itc:
            scores = scores + sim[rows].gather(1, top)
        mine = torch.full_like(sim[rows], -100.0).scatter(1, top, scores)          # (Qr, C)
        return gather_rows(mine, sim.shape[0])

    i2t, t2i = rerank(sim, k_i2t, True), rerank(sim.T, k_t2i, False)
    out = recall_at_k(i2t, t2i, dataset.img2txt, dataset.txt2img)
    out["itc"] = recall_at_k(sim, sim.T, dataset.img2txt, dataset.txt2img)
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_classifier(model, dataset, collate, device, batch_size=64, num_workers=0):
    """NLVR2 and SNLI-VE: the argmax of model.logits(batch) against batch["label"].
    Returns ({"accuracy"}, predictions (N,) long)."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for batch in shard_loader(dataset, batch_size, collate, num_workers, device):
        batch = to_device(batch, device)
        preds.append(model.logits(batch).argmax(1))
        labels.append(batch["label"])
    model.train(was_training)
    preds = gather_rows(torch.cat(preds), len(dataset)).cpu()
    labels = gather_rows(torch.cat(labels), len(dataset)).cpu()
    return {"accuracy": accuracy(preds, labels)}, preds


@torch.no_grad()
def evaluate_vqa(model, dataset, collate, device, batch_size=64, num_workers=0):
    """VQA over an answer list: for each question the answer of dataset.answer_list with the
    highest model.answer_scores (a classifier's logit, or the answer decoder's ranking score).
    Returns ({"vqa_score"}, or {} for a split without answers such as VQA test-dev; the
    results in ALBEF's format, [{"question_id", "answer"}])."""
    was_training = model.training
    model.eval()
    preds = []
    for batch in shard_loader(dataset, batch_size, collate, num_workers, device):
        preds.append(model.answer_scores(to_device(batch, device)).argmax(1))
    model.train(was_training)
    answers = [dataset.answer_list[i]
               for i in gather_rows(torch.cat(preds), len(dataset)).tolist()]
    results = [{"question_id": q, "answer": a} for q, a in zip(dataset.question_ids, answers)]
    truth = [item["answers"] for item in dataset.items]
    return ({"vqa_score": vqa_accuracy(answers, truth)} if all(truth) else {}), results


@torch.no_grad()
def evaluate_caption(model, dataset, tokenizer, device, beam=3, max_length=20, min_length=5,
                     batch_size=64, length_penalty=1.0, repetition_penalty=1.0, num_workers=0):
    """Captioning: greedy and beam-search captions of every image (lengths counting [CLS] and
    the prompt, as BLIP's), each scored with BLEU-4 and CIDEr-D against all of the image's
    references as the file has them, both sides cleaned as the COCO caption evaluation cleans
    them (metrics.caption_scores). Returns ({"greedy_bleu4", "greedy_cider_d", "beam_bleu4",
    "beam_cider_d"}, {"greedy": [caption, ...], "beam": [caption, ...]})."""
    was_training = model.training
    model.eval()
    captions = {"greedy": [], "beam": []}
    limits = dict(max_length=max_length, min_length=min_length,
                  repetition_penalty=repetition_penalty)
    for batch in shard_loader(dataset, batch_size, None, num_workers, device):
        images = batch["image"].to(device)
        for name, (tokens, _) in (("greedy", model.greedy(images, **limits)),
                                  ("beam", model.beam_search(images, beam, length_penalty=length_penalty,
                                                             **limits))):
            captions[name] += [tokenizer.decode(t) for t in tokens.cpu()]
    model.train(was_training)
    captions = {name: gather_list(caps, len(dataset)) for name, caps in captions.items()}
    metrics = {f"{name}_{metric}": value for name, caps in captions.items()
               for metric, value in caption_scores(caps, dataset.raw_references).items()}
    return metrics, captions
