"""
What a pre-training checkpoint's encoders know of the embedded world's objects, for
`python -m lab.analysis kinds`: the words its MLM head fills in with the image (fill_in), whether
it tells a true caption from its minimal-pair twin (minimal_pairs), whether its text features
tell an attribute's values apart (text_contrast), and how well a linear probe
reads an attribute from an object's patch tokens (probe_objects), beside an untrained ViT and
the raw pixels. And the labels of `python -m lab.experiments pooled`, which asks what the tiny ViT
learns from scratch when told directly what a scene holds (scene_labels, balanced_accuracy).
"""
import torch
import torch.nn.functional as F

import data
import world
from model import build_vit
from pruning import PruneConfig

# the object caption with one word masked; the size goes first so that the article ("a", never
# "an" before small or large) does not give away a colour such as orange
FILL_IN = {"shape": ("a {size} {colour} [MASK]", world.SHAPES),
           "colour": ("a {size} [MASK] {shape}", tuple(world.COLOURS)),
           "size": ("a [MASK] {colour} {shape}", tuple(world.RADIUS))}


@torch.no_grad()
def fill_in(model, tok, w, split, scenes, device):
    """What the fused model knows of each object: for every object of the split's first scenes and
    each attribute of FILL_IN, its caption with that word masked, read with the scene's image by
    the MLM head (ALBEF's pre-training task); the pick is the candidate word (the world's shapes,
    colours or sizes) with the largest logit at the mask. Returns {attribute: [(truth, pick)]}."""
    transform = data.create_transform(model.cfg.img_size, train=False)
    out = {attribute: [] for attribute in FILL_IN}
    for i in range(scenes):
        objects = w.scene(split, i).objects
        image = transform(data.load_image(w.path(split, i)))[None].to(device)   # (1, 3, R, R)
        image_embeds = model.encode_image(image)                                 # (1, L, D)
        for attribute, (template, words) in FILL_IN.items():
            ids, mask = tok([template.format(size=o.size, colour=o.colour, shape=o.shape)
                             for o in objects], model.cfg.max_len)                # (O, T)
            ids, mask = ids.to(device), mask.to(device)
            embeds = image_embeds.expand(len(objects), -1, -1)                  # (O, L, D)
            atts = embeds.new_ones(embeds.shape[:2], dtype=torch.long)
            hidden = model.text_encoder(ids, mask, embeds, atts, mode="multimodal")
            at_mask = hidden[ids == tok.mask_id]                                # (O, Dt)
            candidates = torch.tensor([tok.token_to_id[x] for x in words], device=device)
            picks = model.text_encoder.lm_logits(at_mask)[:, candidates].argmax(1)   # (O,)
            out[attribute] += [(getattr(o, attribute), words[p])
                               for o, p in zip(objects, picks.tolist())]
    return out


@torch.no_grad()
def minimal_pairs(model, tok, w, split, scenes, device):
    """Whether the model tells a true caption from its minimal-pair twin on the same image, as
    SNLI-VE of the world asks (World.hypotheses: the same template with one attribute, the count
    or a relation made false): for the split's first scenes, the share of pairs where the true
    caption scores higher, by the ITC cosine and by ITM's match probability. Returns {"itc",
    "itm", "pairs"}."""
    transform = data.create_transform(model.cfg.img_size, train=False)
    images = torch.stack([transform(data.load_image(w.path(split, i))) for i in range(scenes)])
    hyps = [dict((label, text) for text, label in w.hypotheses(w.scene(split, i)))
            for i in range(scenes)]
    image_embeds = model.encode_image(images.to(device))                          # (S, L, D)
    image_feat = model.image_feat(image_embeds)                                   # (S, E)
    itc, itm = [], []
    for label in ("entailment", "contradiction"):
        ids, mask = tok([h[label] for h in hyps], model.cfg.max_len)               # (S, T)
        ids, mask = ids.to(device), mask.to(device)
        text_embeds = model.encode_text(ids, mask)                                # (S, T, D)
        itc.append((image_feat * model.text_feat(text_embeds)).sum(-1))           # (S,)
        itm.append(model.itm_logits(text_embeds, mask, image_embeds, ids).softmax(-1)[:, 1])
    return dict(itc=float((itc[0] > itc[1]).float().mean()),
                itm=float((itm[0] > itm[1]).float().mean()), pairs=scenes)


# where an attribute is lost: the text side, or the patch tokens
ATTRIBUTES = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "size": tuple(world.RADIUS)}


@torch.no_grad()
def text_contrast(model, tok, device):
    """Whether the text side tells an attribute's values apart: over the captions
    'a {size} {colour} {shape}' (every combination), the mean cosine between the ITC text
    features of two captions equal but for that attribute ({attribute: cosine}; 1 = the same)."""
    values = list(ATTRIBUTES.values())
    keys = torch.cartesian_prod(*[torch.arange(len(v)) for v in values])          # (K, 3)
    texts = [f"a {values[2][z]} {values[1][c]} {values[0][s]}" for s, c, z in keys.tolist()]
    ids, mask = tok(texts, model.cfg.max_len)
    feat = model.text_feat(model.encode_text(ids.to(device), mask.to(device))).cpu()   # (K, E)
    cos = feat @ feat.T                                                             # (K, K)
    out = {}
    for a, name in enumerate(ATTRIBUTES):
        rest = [b for b in range(len(values)) if b != a]
        pairs = (keys[:, None, rest] == keys[None, :, rest]).all(-1) \
            & (keys[:, None, a] != keys[None, :, a])                                # (K, K)
        out[name] = float(cos[pairs].mean())
    return out


def patch_share(masks, patch_size):
    """Pixel masks (..., H, W), bool or float tensors -> (..., M) float: world.patch_share."""
    return world.patch_share(masks.float(), patch_size)


@torch.no_grad()
def object_tokens(vit, w, split, scenes, img_size, patch_size, device):
    """For every object of the split's first scenes: the mean of the ViT's final patch tokens
    (vit None: of the raw pixels of each patch), each patch weighted by the share of its pixels
    the object covers. Returns ((O, D) features, the O world.Obj)."""
    transform = data.create_transform(img_size, train=False)
    g, p = img_size // patch_size, patch_size
    feats, objects = [], []
    for i in range(scenes):
        scene = w.scene(split, i)
        image = transform(data.load_image(w.path(split, i)))[None].to(device)     # (1, 3, R, R)
        if vit is None:
            tokens = image[0].reshape(3, g, p, g, p).permute(1, 3, 0, 2, 4)        # (g, g, 3, p, p)
            tokens = tokens.reshape(g * g, 3 * p * p)                              # (M, 3p^2)
        else:
            tokens = vit(image)[0, 1:]                                             # (M, D)
        share = patch_share(torch.from_numpy(w.masks(scene, img_size)), p)         # (O, M)
        feats.append((share / share.sum(1, keepdim=True)) @ tokens.cpu())          # (O, D)
        objects += scene.objects
    return torch.cat(feats), objects


def linear_probe(x_train, y_train, x_test, y_test, classes, steps=500):
    """Test accuracy of a multinomial logistic regression naming y from x: standardised
    features, zero start, full-batch Adam (so the same numbers every run)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(x_train @ weight + bias, y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((x_test @ weight + bias).argmax(1) == y_test).float().mean())


def probe_objects(model, w, split, scenes, probe_scenes, seed, device):
    """How well each attribute of an object can be read linearly from its patch tokens
    (object_tokens) of the trained ViT, of an untrained one of the same architecture (drawn with
    `seed`) and from the raw pixels: probes trained on the objects of the train split's first
    probe_scenes scenes, tested on those of `split`'s first `scenes`."""
    cfg = model.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = build_vit(cfg, PruneConfig(method="none"),
                              type(model.visual_encoder.patch_embed)).to(device).eval()
    encoders = {"trained": model.visual_encoder, "untrained": untrained, "pixels": None}
    out = {name: {} for name in ATTRIBUTES}
    for which, vit in encoders.items():
        x_train, o_train = object_tokens(vit, w, "train", probe_scenes, cfg.img_size,
                                         cfg.patch_size, device)
        x_test, o_test = object_tokens(vit, w, split, scenes, cfg.img_size, cfg.patch_size,
                                       device)
        for name, values in ATTRIBUTES.items():
            y_train = torch.tensor([values.index(getattr(o, name)) for o in o_train])
            y_test = torch.tensor([values.index(getattr(o, name)) for o in o_test])
            out[name][which] = linear_probe(x_train, y_train, x_test, y_test, len(values))
            out[name]["most_frequent"] = float(y_test.bincount().max() / len(y_test))
            out[name]["objects"] = [len(o_train), len(o_test)]
    return out


# what a scene of the default world holds, as labels read from one pooled vector (the way ITC
# reads an image): which shapes, colours, cells of the 3x3 grid, and which colour at which cell
LABELS = {"shape": len(world.SHAPES), "colour": len(world.COLOURS), "cell": 9,
          "colour@cell": 9 * len(world.COLOURS)}


def scene_labels(scene):
    """(sum of LABELS' sizes,) float, 1 where the scene holds that shape, colour, occupied cell
    or colour at a cell (groups in LABELS' order)."""
    offsets = torch.tensor([0, *LABELS.values()]).cumsum(0)[:-1]                # (4,)
    y = torch.zeros(sum(LABELS.values()))
    for o in scene.objects:
        shape, colour = world.SHAPES.index(o.shape), list(world.COLOURS).index(o.colour)
        cell = o.cell[0] * 3 + o.cell[1]
        y[offsets + torch.tensor([shape, colour, cell, colour * 9 + cell])] = 1
    return y


def balanced_accuracy(logits, labels):
    """{group of LABELS: the mean over its labels of (true-positive rate + true-negative rate) / 2}
    for the predictions logits > 0; logits, labels (N, sum of LABELS' sizes). Any constant answer
    scores 0.5, so the groups' figures compare although their labels are rare to different
    degrees (a colour at a cell: 3 scenes in 63)."""
    pred, pos = logits > 0, labels > 0
    tpr = (pred & pos).sum(0) / pos.sum(0).clamp(min=1)                         # (K,)
    tnr = (~pred & ~pos).sum(0) / (~pos).sum(0).clamp(min=1)                    # (K,)
    per_label = ((tpr + tnr) / 2).split(list(LABELS.values()))
    return {group: float(part.mean()) for group, part in zip(LABELS, per_label)}
