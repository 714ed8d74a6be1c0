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

The file ends with retrieval under token pruning at inference: sweep_retrieval evaluates it with
each method and keep budget of a list, beside the token-layers kept and the time it takes.
"""
import contextlib
import dataclasses
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from data import to_device
from metrics import accuracy, caption_scores, recall_at_k, vqa_accuracy
from pruning import MERGERS, SCORERS, TEXT_GUIDED, PruneConfig, token_counts


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


class Reporting(Dataset):
    """dataset[i] and the unreadable images that reading it met (data.for_evaluation's list,
    emptied where the sample was read): a DataLoader worker's copy of that list never reaches
    the main process, so the messages travel with the batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        unreadable = getattr(self.dataset, "unreadable", [])
        seen = len(unreadable)
        sample = self.dataset[i]
        met = unreadable[seen:]
        del unreadable[seen:]
        return sample, met


def collate_reporting(batch, collate=None):
    """(the samples collated, the unreadable images they met); module-level, so DataLoader
    workers can pickle it."""
    samples, met = zip(*batch)
    return (collate or default_collate)(list(samples)), [m for ms in met for m in ms]


def shard_loader(dataset, batch_size: int, collate=None, num_workers: int = 0,
                 device="cpu") -> DataLoader:
    """The DataLoader over this rank's block of the dataset (share), read by num_workers worker
    processes (the images are decoded while the GPU works), into pinned memory when the device
    is a GPU (faster copies to it). It gives (batch, the unreadable images met)."""
    return DataLoader(Subset(Reporting(dataset), share(len(dataset)).tolist()), batch_size,
                      collate_fn=partial(collate_reporting, collate=collate),
                      num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")


def shard_batches(dataset, batch_size: int, collate=None, num_workers: int = 0, device="cpu"):
    """The batches of shard_loader; the unreadable images they met join dataset.unreadable
    here, in the main process."""
    for batch, met in shard_loader(dataset, batch_size, collate, num_workers, device):
        if met:
            dataset.unreadable += met
        yield batch


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
                              for batch in shard_batches(dataset, batch_size, None, num_workers,
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
    for batch in shard_batches(dataset, batch_size, collate, num_workers, device):
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
    for batch in shard_batches(dataset, batch_size, collate, num_workers, device):
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
    for batch in shard_batches(dataset, batch_size, None, num_workers, device):
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


# ---- token pruning at inference: retrieval under each method and budget --------------------
# A text-free method (EViT, ToMe, random) prunes each image once, and both stages, ITC's ranking
# and ITM's re-ranking, read the pruned image. A text-guided one (ELIP) cannot prune the ITC
# stage, which embeds each image once for all captions: there the ViT sees all tokens, and the
# ITM re-ranking encodes the image again for every (image, candidate text) pair, pruned under
# that text's [CLS] as in pre-training (Eq. 1). That re-encoding is what text guidance costs at
# inference.
def sweep_budgets(spec: str, base: PruneConfig) -> list[PruneConfig]:
    """"none;elip:0.9,0.65,0.4;evit:0.7,0.5,0.3;tome:4" -> one PruneConfig per item, reducing in
    eval mode, on base's other fields (prune_layers, lam, merge): a scoring method's keep ratios
    at base.prune_layers, or a merge-style method's tokens merged before each layer (tome_r)."""
    budgets = []
    for item in (s.strip() for s in spec.split(";")):
        method, _, value = (s.strip() for s in item.partition(":"))
        try:
            if method in MERGERS:
                fields = dict(tome_r=int(value))
            elif method in SCORERS:
                fields = dict(keep_ratios=tuple(float(r) for r in value.split(",")))
            elif method == "none" and not value:
                fields = {}
            else:
                raise ValueError(f"expected none, a scoring method:keep ratios "
                                 f"({', '.join(SCORERS)}), or a merging method:r "
                                 f"({', '.join(MERGERS)})")
            budgets.append(dataclasses.replace(base, preset="", method=method, in_eval=True,
                                               **fields))
        except ValueError as e:
            raise ValueError(f"sweep item {item!r}: {e}") from None
    return budgets


def budget_name(cfg: PruneConfig) -> str:
    """The budget as the sweep spec writes it: "elip:0.9,0.65,0.4", "tome:4", "none"."""
    if cfg.method in MERGERS:
        return f"{cfg.method}:{cfg.tome_r}"
    if cfg.method in SCORERS:
        return f"{cfg.method}:{','.join(f'{r:g}' for r in cfg.keep_ratios)}"
    return cfg.method


def token_layers_kept(cfg: PruneConfig, num_patches: int, depth: int) -> float:
    """The share of the unpruned ViT's token-layers (depth x (1 + M)) that one image's pass under
    cfg keeps: the sequence lengths entering its layers, summed. Every image keeps as many."""
    return sum(token_counts(num_patches, depth, cfg)) / (depth * (1 + num_patches))


@contextlib.contextmanager
def reducing(vit, cfg: PruneConfig):
    """Inside the block the ViT reduces tokens by cfg (in eval mode too if cfg.in_eval); its own
    PruneConfig comes back after."""
    cfg.check(len(vit.blocks))
    own, vit.prune = vit.prune, cfg
    try:
        yield
    finally:
        vit.prune = own


def sync(device):
    """Wait for the GPU's queued work, so that a clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def forward_seconds(module, device):
    """Yields a list whose one entry sums the wall time of module's forward calls in the block."""
    total, starts = [0.0], []

    def start(m, args):
        sync(device)
        starts.append(time.perf_counter())

    def stop(m, args, out):
        sync(device)
        total[0] += time.perf_counter() - starts.pop()

    hooks = [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        yield total
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def guided_itm_logits(model, dataset, top_i2t, top_t2i, text_embeds, ids, mask, device,
                      batch_size=64, num_workers=0):
    """top_i2t (N, ki) candidate texts of each image, top_t2i (T, kt) candidate images of each
    text -> ITM match logits (N, ki), (T, kt), the image re-encoded for every pair with the
    pair's text [CLS] guiding the ViT (which must reduce tokens in eval mode). Each rank encodes
    the pairs of its block of the images, a batch of images at a time, pairs in batches."""
    (N, ki), (T, kt) = top_i2t.shape, top_t2i.shape
    # every (image, text) pair to score, P = N*ki + T*kt: first each image's candidate texts,
    # then each text's candidate images
    pair_img = torch.cat([torch.arange(N, device=device).repeat_interleave(ki),
                          top_t2i.flatten()])                                   # (P,)
    pair_txt = torch.cat([top_i2t.flatten(),
                          torch.arange(T, device=device).repeat_interleave(kt)])  # (P,)
    logits = torch.full(pair_img.shape, float("-inf"), device=device)          # (P,)
    for batch in shard_batches(dataset, batch_size, None, num_workers, device):
        index, images = batch["index"].to(device), batch["image"].to(device)   # (B,), (B, 3, H, W)
        slot = torch.full((N,), -1, device=device).scatter_(
            0, index, torch.arange(len(index), device=device))                  # (N,) row in images
        for p in (slot[pair_img] >= 0).nonzero().flatten().split(batch_size):  # this batch's pairs
            t = pair_txt[p]
            image_embeds = model.encode_image(images[slot[pair_img[p]]], text_embeds[t, 0])
            logits[p] = model.itm_logits(text_embeds[t], mask[t], image_embeds,
                                         ids[t])[:, 1].float()                  # (b,)
    if rank_and_world()[1] > 1:     # each pair was scored by the rank holding its image
        dist.all_reduce(logits, op=dist.ReduceOp.MAX)
    return logits[:N * ki].view(N, ki), logits[N * ki:].view(T, kt)


@torch.no_grad()
def evaluate_retrieval_guided(model, dataset, tokenizer, device, prune: PruneConfig, k=16,
                              max_len=32, batch_size=64, add_itc=False, num_workers=0):
    """evaluate_retrieval for a text-guided method: ITC ranks all pairs on images embedded with
    all tokens; the top k candidates of each query are re-scored by the ITM match logit (plus the
    ITC cosine with add_itc), each image re-encoded under its pair's text (`prune`). Returns the
    recalls, with the ITC-only ones under "itc", as evaluate_retrieval."""
    was_training = model.training
    model.eval()
    vit = model.visual_encoder
    with reducing(vit, PruneConfig(method="none")):
        image_embeds, text_embeds, ids, mask = embed_retrieval_set(
            model, dataset, tokenizer, device, max_len, batch_size, num_workers)
    sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).T      # (N, T)
    top_i2t = sim.topk(min(k, sim.shape[1]), dim=1).indices                    # (N, ki)
    top_t2i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices                  # (T, kt)
    with reducing(vit, prune):
        logits = guided_itm_logits(model, dataset, top_i2t, top_t2i, text_embeds, ids, mask,
                                   device, batch_size, num_workers)
    i2t, t2i = [torch.full_like(s, -100.0).scatter(
        1, top, itm.to(s.dtype) + (s.gather(1, top) if add_itc else 0.0))       # (Q, C)
        for s, top, itm in ((sim, top_i2t, logits[0]), (sim.T, top_t2i, logits[1]))]
    out = recall_at_k(i2t, t2i, dataset.img2txt, dataset.txt2img)
    out["itc"] = recall_at_k(sim, sim.T, dataset.img2txt, dataset.txt2img)
    model.train(was_training)
    return out


def sweep_retrieval(model, dataset, tokenizer, device, budgets: list, k=16, max_len=32,
                    batch_size=64, add_itc=False, num_workers=0, log=print) -> list[dict]:
    """Retrieval under each PruneConfig of `budgets`, none first (added if missing): one row per
    budget with its recalls ("itm": re-ranked, "itc": ITC only), the token-layers one image pass
    keeps ("kept", of the unpruned ViT's), the ViT's token-layers over the whole evaluation
    against none's ("vit_work": the text-guided re-encoding counted), the image passes, and the
    wall time of the evaluation and of its ViT calls, also as multiples of none's."""
    vit = model.visual_encoder
    depth, M, N, T = len(vit.blocks), vit.num_patches, len(dataset), len(dataset.text)
    if budgets[0].method != "none":
        budgets = [dataclasses.replace(budgets[0], method="none")] + list(budgets)
    for cfg in budgets:         # a schedule that does not fit the ViT fails before any work
        cfg.check(depth)
    rows = []
    for cfg in budgets:
        guided = cfg.method in TEXT_GUIDED
        with forward_seconds(vit, device) as vit_seconds:
            sync(device)
            start = time.perf_counter()
            if guided:
                out = evaluate_retrieval_guided(model, dataset, tokenizer, device, cfg, k, max_len,
                                                batch_size, add_itc, num_workers)
            else:
                with reducing(vit, cfg):
                    out = evaluate_retrieval(model, dataset, tokenizer, device, k, max_len,
                                             batch_size, add_itc, num_workers)
            sync(device)
            seconds = time.perf_counter() - start
        pairs = N * min(k, T) + T * min(k, N) if guided else 0
        kept = token_layers_kept(cfg, M, depth)
        itc = out.pop("itc")
        rows.append(dict(budget=budget_name(cfg), prune=dataclasses.asdict(cfg), kept=kept,
                         vit_work=(N + pairs * kept) / N if guided else kept,
                         image_passes=N + pairs, itm=out, itc=itc, seconds=seconds,
                         vit_seconds=vit_seconds[0]))
        log(f"sweep {rows[-1]['budget']}: kept {kept:.3f}, R mean {out['r_mean']:.2f} (ITC "
            f"{itc['r_mean']:.2f}), {seconds:.1f} s")
    for row in rows:
        row["seconds_vs_none"] = row["seconds"] / rows[0]["seconds"]
        row["vit_seconds_vs_none"] = row["vit_seconds"] / rows[0]["vit_seconds"]
    return rows


def sweep_table(rows: list[dict]) -> str:
    """sweep_retrieval's rows as a markdown table."""
    lines = ["| budget | token-layers kept | ViT work | ITC TR@1 / IR@1 | ITC R mean | "
             "ITM R mean | eval time | ViT time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['kept']:.3f} | {r['vit_work']:.2f} | "
            f"{r['itc']['txt_r1']:.1f} / {r['itc']['img_r1']:.1f} | {r['itc']['r_mean']:.2f} | "
            f"{r['itm']['r_mean']:.2f} | {r['seconds']:.1f} s ({r['seconds_vs_none']:.2f}x) | "
            f"{r['vit_seconds']:.1f} s ({r['vit_seconds_vs_none']:.2f}x) |")
    return "\n".join(lines)
