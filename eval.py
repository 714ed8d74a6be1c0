"""
The evaluation loops of ELIP: zero-shot and fine-tuned retrieval (the pre-training model or the
retrieval fine-tuned one), NLVR2 / SNLI-VE classification, VQA over an answer list (classified, or
ranked by the answer decoder), and captioning. Each runs the model in eval mode, where the ViT
sees all tokens unless its PruneConfig has in_eval, restores the model's mode, and returns the
metrics (metrics.py) as plain floats, with the predictions where there are any.
"""
import torch

from metrics import accuracy, bleu4, cider_d, recall_at_k, vqa_accuracy


@torch.no_grad()
def embed_retrieval_set(model, dataset, tokenizer, device, max_len, batch_size=64):
    """Unimodal embeddings of every image and caption of a RetrievalEvalDataset, as ALBEF's
    evaluation: the ViT sees all tokens (eval mode), the text encoder runs text-only."""
    ids, mask = tokenizer(dataset.text, max_len)
    ids, mask = ids.to(device), mask.to(device)
    text_embeds = torch.cat([model.encode_text(ids[s:s + batch_size], mask[s:s + batch_size])
                             for s in range(0, len(ids), batch_size)])          # (T, L, D)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    image_embeds = torch.cat([model.encode_image(images.to(device)) for images, _ in loader])
    return image_embeds, text_embeds, ids, mask


@torch.no_grad()
def evaluate_retrieval(model, dataset, tokenizer, device, k=16, max_len=32, batch_size=64):
    """Image-text retrieval as ALBEF evaluates it: rank all pairs by ITC similarity, re-score the
    top k candidates of each query with the ITM head, report recall@1/5/10. Also returns the
    ITC-only figures under the key "itc"."""
    was_training = model.training
    model.eval()
    image_embeds, text_embeds, ids, mask = embed_retrieval_set(model, dataset, tokenizer, device,
                                                               max_len, batch_size)
    sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).T      # (N, T)
    k_i2t, k_t2i = min(k, sim.shape[1]), min(k, sim.shape[0])

    def rerank(sim, k, query_is_image):
        """Scores (Q, C): the ITM match logit for each query's top-k candidates, -100 elsewhere.
        All (query, candidate) pairs go through the fusion encoder in batches."""
        top = sim.topk(k, dim=1).indices                                           # (Q, k)
        q = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k)     # (Q*k,)
        c = top.flatten()                                                          # (Q*k,)
        img, txt = (q, c) if query_is_image else (c, q)
        logits = torch.cat([model.itm_logits(text_embeds[t], mask[t], image_embeds[i], ids[t])[:, 1]
                            for i, t in zip(img.split(batch_size), txt.split(batch_size))])
        return torch.full_like(sim, -100.0).scatter(1, top, logits.view(-1, k).to(sim.dtype))

    i2t, t2i = rerank(sim, k_i2t, True), rerank(sim.T, k_t2i, False)
    out = recall_at_k(i2t, t2i, dataset.img2txt, dataset.txt2img)
    out["itc"] = recall_at_k(sim, sim.T, dataset.img2txt, dataset.txt2img)
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_classifier(model, dataset, collate, device, batch_size=64):
    """NLVR2 and SNLI-VE: the argmax of model.logits against the labels that end each batch.
    Returns ({"accuracy"}, predictions (N,) long)."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for *inputs, label in torch.utils.data.DataLoader(dataset, batch_size, collate_fn=collate):
        preds.append(model.logits(*(t.to(device) for t in inputs)).argmax(1).cpu())
        labels.append(label)
    model.train(was_training)
    preds = torch.cat(preds)
    return {"accuracy": accuracy(preds, torch.cat(labels))}, preds


@torch.no_grad()
def evaluate_vqa(model, dataset, collate, device, batch_size=64):
    """VQA over an answer list: for each question the answer of dataset.answer_list with the
    highest model.answer_scores (a classifier's logit, or the answer decoder's ranking score).
    Returns ({"vqa_score"}, or {} for a split without answers such as VQA test-dev; the
    results in ALBEF's format, [{"question_id", "answer"}])."""
    was_training = model.training
    model.eval()
    preds, loader = [], torch.utils.data.DataLoader(dataset, batch_size, collate_fn=collate)
    for images, ids, mask, _ in loader:
        preds.append(model.answer_scores(images.to(device), ids.to(device),
                                         mask.to(device)).argmax(1))
    model.train(was_training)
    answers = [dataset.answer_list[i] for i in torch.cat(preds).tolist()]
    results = [{"question_id": q, "answer": a} for q, a in zip(dataset.question_ids, answers)]
    truth = [item["answers"] for item in dataset.items]
    return ({"vqa_score": vqa_accuracy(answers, truth)} if all(truth) else {}), results


@torch.no_grad()
def evaluate_caption(model, dataset, tokenizer, device, beam=3, max_new_tokens=20, batch_size=64,
                     length_penalty=1.0):
    """Captioning: greedy and beam-search captions of every image, each scored with BLEU-4 and
    CIDEr-D against all of the image's references (dataset.references).
    Returns ({"greedy_bleu4", "greedy_cider_d", "beam_bleu4", "beam_cider_d"},
    {"greedy": [caption, ...], "beam": [caption, ...]})."""
    was_training = model.training
    model.eval()
    captions = {"greedy": [], "beam": []}
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size):
        images = images.to(device)
        for name, (tokens, _) in (("greedy", model.greedy(images, max_new_tokens)),
                                  ("beam", model.beam_search(images, beam, max_new_tokens,
                                                             length_penalty))):
            captions[name] += [tokenizer.decode(t) for t in tokens.cpu()]
    model.train(was_training)
    metrics = {f"{name}_{metric}": score(caps, dataset.references)
               for name, caps in captions.items()
               for metric, score in (("bleu4", bleu4), ("cider_d", cider_d))}
    return metrics, captions
