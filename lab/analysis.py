"""
What the pruning keeps: the fractions of the named objects' patches each method keeps, and the
picture of the kept patches (the paper's Fig. 4), on a pre-training checkpoint; and what the
model reads from a caption: its retrieval per kind of caption, beside chance and the oracle, the
shapes, colours and sizes its MLM head fills in, and whether its text features and patch tokens
hold them.

    python -m lab.analysis keep --checkpoint out/pretrain/checkpoint.pt     # out/analysis/keep.json
    python -m lab.analysis picture --checkpoint out/pretrain/checkpoint.pt  # out/analysis/pruning.png
    python -m lab.analysis kinds --checkpoint out/pretrain/checkpoint.pt    # out/analysis/kinds.json
    python -m lab.analysis keep --preset quick                              # a first look, seconds
    python -m lab.analysis keep --help                                      # every flag

The embedded world knows what each caption talks about: its scenes come with per-object pixel
masks, and each caption names some of the objects (world.World.captions). So we can look at the
patches each method keeps and count how many of them belong to the objects the caption names.

The trained online ViT runs in eval mode with its reduction forced on (PruneConfig in_eval),
each method on the checkpoint's schedule; the text-guided ones read the [CLS] of the trained
text encoder (Eq. 1). VisionTransformer.forward_features says, for every token after each
reduction, which original patch it is (`sources`); a patch fused into the merged token is no
longer a patch of its own and counts as dropped.

The rule: a patch belongs to an object when the object covers at least half of its pixels
(--cover), a pixel being covered when its centre is inside the object (World.masks at the
model's resolution). A small object (about 13 px across at 64 px, patch 8) can own no patch
under this rule; it then counts for nothing, and the report says how many did.
"""
import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import eval as evaluation
import world
import world_aids
from config import config_from_dict, parse_config, run_subcommand
from lab import probes
from model import ModelConfig, build_vit
from pruning import METHODS, TEXT_GUIDED, cut_layers
from tokenizer import Tokenizer
from trainer import load_checkpoint


@dataclass
class AnalysisConfig:
    checkpoint: str = "out/pretrain/checkpoint.pt"   # a checkpoint of train_pretrain.py
    split: str = "test"              # of the embedded world, with the checkpoint's world_seed
    cover: float = 0.5               # a patch belongs to an object covering this much of it
    batch: int = 50                  # (caption, image) pairs per forward
    seed: int = 0                    # the random method's draws
    threads: int = 0                 # torch.set_num_threads (0: torch's default)
    device: str = "auto"             # auto: cuda when available, else cpu

    def __post_init__(self):
        if self.split not in world.SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {world.SPLITS}")
        if not 0.0 < self.cover <= 1.0:
            raise ValueError(f"cover {self.cover} must lie in (0, 1]")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")


@dataclass
class KeepConfig:
    preset: str = "full"             # full | quick (seconds)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    scenes: int = 200                # the split's first scenes ...
    captions: int = world.CAPTIONS_PER_IMAGE         # ... each with this many of its captions
    methods: tuple[str, ...] = ("elip", "evit", "random")   # rows; a text-guided one once per lam
    lams: tuple[float, ...] = (0.8, 0.6, 1.0)        # Eq. 1: 1.0 is the image [CLS] alone
    out: str = "out/analysis/keep.json"              # the report, as JSON

    def __post_init__(self):
        self.methods, self.lams = tuple(self.methods), tuple(float(x) for x in self.lams)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods {self.methods}: choose from {METHODS}")
        if not self.lams or any(not 0.0 <= x <= 1.0 for x in self.lams):
            raise ValueError(f"lams {self.lams} must be given and lie in [0, 1]")
        if min(self.scenes, self.captions) < 1:
            raise ValueError("scenes and captions must be >= 1")


@dataclass
class PictureConfig:
    preset: str = "full"             # full | quick (seconds)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    images: int = 6                  # rows: the split's first scenes, one caption each
    method: str = "elip"             # one of METHODS
    lam: float = 0.8                 # Eq. 1, for a text-guided method
    scale: int = 4                   # the img_size images are shown this many times larger
    out: str = "out/analysis/pruning.png"            # the picture, as PNG

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if self.images < 1 or self.scale < 1:
            raise ValueError("images and scale must be >= 1")


@dataclass
class KindsConfig:
    preset: str = "full"             # full | quick (seconds)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    scenes: int = 200                # the split's first scenes, each with its captions (the
                                     # default run's zero-shot test)
    probe_scenes: int = 400          # train-split scenes whose objects train the linear probes
    out: str = "out/analysis/kinds.json"             # the report, as JSON

    def __post_init__(self):
        if self.scenes < 2 or self.probe_scenes < 2:
            raise ValueError("scenes and probe_scenes must be >= 2")


KEEP_PRESETS = {"full": dict(), "quick": dict(scenes=20, captions=2)}      # quick: seconds
PICTURE_PRESETS = {"full": dict(), "quick": dict(images=2, scale=2)}
KINDS_PRESETS = {"full": dict(), "quick": dict(scenes=20, probe_scenes=40)}
KEEP_DOC = """python -m lab.analysis keep [--flag value ...]

For each method (a text-guided one once per lam) and each cut of the checkpoint's schedule: the
fraction of the patches of the objects a caption names, of the scene's other objects' and of all
patches that enter the cut layer as tokens of their own, pooled over the (caption, image) pairs
of the split's first scenes. Prints the table and writes the report as JSON to --out."""
KINDS_DOC = """python -m lab.analysis kinds [--flag value ...]

Image retrieval by ITC similarity (the first stage of the zero-shot evaluation, before ITM
re-ranking) over the split's first scenes, per caption template ("a {size} {colour} {shape}",
"a {a} above a {b}", ...): how many images each caption is true of, how often the model's first
image is one of them (against a random image), and R@1 of the caption's own image against the
oracle's. Then, for a model with ALBEF's MLM head, how often it fills in the masked shape, colour
or size of each object of those scenes. Last, where an attribute is lost: whether the text
side tells its values apart (the cosine between the ITC features of two captions that differ in
it), and how well a linear probe names it from an object's patch tokens, for the checkpoint's
ViT, an untrained one and the raw pixels (probes trained on the objects of the train split's
first --probe_scenes scenes). Prints the tables and writes the report as JSON to --out."""
PICTURE_DOC = """python -m lab.analysis picture [--flag value ...]

For the split's first scenes, one caption each: the input, then per cut the patches the method
keeps in colour and the dropped ones grey, the patches of the objects the caption names framed
in yellow. Writes the PNG to --out."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- which patches survive ---------------------------------------------------------------
def patch_mask(src, num_patches):
    """Sources (B, N) -> (B, M) bool: the patches that are a token of their own. A fused token
    (-1) is no patch: it is scattered into a spare column M, cut off afterwards."""
    idx = src.masked_fill(src < 0, num_patches)                                 # (B, N)
    out = torch.zeros(src.shape[0], num_patches + 1, dtype=torch.bool, device=src.device)
    return out.scatter_(1, idx, True)[:, :num_patches]                          # (B, M)


@torch.no_grad()
def kept_patches(vit, images, text_cls=None, layers=None):
    """Which of the M patches are still tokens of their own entering each of the cut `layers`
    (default: the schedule's, pruning.cut_layers): (B, S, M) bool. The ViT must reduce in the
    mode it is in (train mode, or eval with PruneConfig(in_eval=True)); a method that never
    reduces (none) keeps every patch."""
    cfg, M, depth, B = vit.prune, vit.num_patches, len(vit.blocks), images.shape[0]
    if not (vit.training or cfg.in_eval):
        raise ValueError("the ViT is in eval mode and its PruneConfig has in_eval False, so it "
                         "keeps every token: build it with PruneConfig(in_eval=True)")
    layers = list(cut_layers(cfg, depth)) if layers is None else list(layers)
    _, sources = vit.forward_features(images, text_cls)                        # {layer: (B, N)}
    start = torch.arange(M, device=images.device).expand(B, M)                 # (B, M) all
    masks = []
    for layer in layers:
        # the last reduction at or before this layer decides what enters it
        src = next((s for i, s in reversed(sources.items()) if i <= layer), start)
        masks.append(patch_mask(src, M))
    if not masks:
        return torch.zeros(B, 0, M, dtype=torch.bool, device=images.device)
    return torch.stack(masks, dim=1)                                            # (B, S, M)


def object_patches(masks, patch_size, cover=0.5):
    """Pixel masks (..., H, W) bool -> (..., M) bool, patches in the ViT's row-major order: the
    patches whose pixels the mask covers for at least `cover` of them."""
    return probes.patch_share(masks, patch_size) >= cover                       # (..., M)


# ---- the model, the world ----------------------------------------------------------------
def load_for_analysis(path):
    """(ELIPModel in eval mode, tokenizer, world.World) from a checkpoint of train_pretrain.py:
    its keys model, config (the TrainConfig as a dict: the ModelConfig under "model", the
    world's seed under "world_seed", its variant under "world_variant") and vocab."""
    ckpt = load_checkpoint(path)
    if not ({"model", "config", "vocab"} <= ckpt.keys()
            and {"model", "world_seed"} <= ckpt["config"].keys()):
        raise SystemExit(f"error: {path} is not a checkpoint of train_pretrain.py")
    model = world_aids.build_model(config_from_dict(ModelConfig, ckpt["config"]["model"]),
                                   world_aids.aids_of(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    config = ckpt["config"]
    return model.eval(), Tokenizer(ckpt["vocab"]), world.World(
        config["world_seed"], config.get("world_variant", "default"))


def analysis_vit(model, method, lam):
    """A copy of the model's online ViT that reduces tokens with `method` (and `lam`) on the
    model's schedule, in eval mode too."""
    prune = dataclasses.replace(model.cfg.prune, method=method, lam=lam, in_eval=True)
    vit = build_vit(model.cfg, prune, type(model.visual_encoder.patch_embed))
    vit = vit.to(next(model.parameters()).device)
    vit.load_state_dict(model.visual_encoder.state_dict())
    return vit.eval()


def world_pairs(w, split, scenes, captions, mc, cover):
    """(caption, image) pairs of world w's split's first `scenes` scenes, up to `captions` captions
    each, as a dict: images (S, 3, R, R) as the evaluation transform makes them; texts cleaned
    as the datasets clean them; scene (C,) the scene of each caption; named and objects (C, M)
    bool, the patches of the objects the caption names and of all of the scene's objects;
    unowned, the named objects that own no patch under the rule."""
    transform = data.create_transform(mc.img_size, train=False)
    images, texts, scene_of, named, objects, unowned = [], [], [], [], [], 0
    for i in range(scenes):
        scene = w.scene(split, i)
        images.append(transform(data.load_image(w.path(split, i))))
        masks = torch.from_numpy(w.masks(scene, mc.img_size))                   # (O, R, R)
        owned = object_patches(masks, mc.patch_size, cover)                     # (O, M)
        for text, idx in w.captions(scene, captions):
            texts.append(data.pre_caption(text))
            scene_of.append(i)
            named.append(owned[list(idx)].any(0))
            objects.append(owned.any(0))
            unowned += int((~owned[list(idx)].any(1)).sum())
    return dict(images=torch.stack(images), texts=texts, scene=torch.tensor(scene_of),
                named=torch.stack(named), objects=torch.stack(objects), unowned=unowned)


@torch.no_grad()
def text_cls_of(model, tok, texts, batch, device):
    """The unprojected [CLS] (C, D) of the trained text encoder: what guides ELIP (Eq. 1)."""
    out = []
    for s in range(0, len(texts), batch):
        ids, mask = tok(texts[s:s + batch], model.cfg.max_len)
        out.append(model.encode_text(ids.to(device), mask.to(device))[:, 0])
    return torch.cat(out)


def analysis_device(cfg):
    """The device of an AnalysisConfig, with its thread count set."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                        if cfg.device == "auto" else cfg.device)


# ---- keep: the fractions -----------------------------------------------------------------
def keep_fractions(vit, pairs, text_cls, layers, batch):
    """(S, 3): per cut, the fraction of the named objects' patches, of the other objects'
    patches and of all patches that enter the layer as tokens of their own, pooled over all
    (caption, image) pairs."""
    named = pairs["named"]
    # (C, 3, M): named, the other objects', every patch
    groups = torch.stack([named, pairs["objects"] & ~named, torch.ones_like(named)], 1)
    kept_sum = torch.zeros(len(layers), 3, dtype=torch.long, device=named.device)
    for s in range(0, len(named), batch):
        images = pairs["images"][pairs["scene"][s:s + batch]]                  # (b, 3, R, R)
        kept = kept_patches(vit, images, text_cls[s:s + batch], layers)        # (b, S, M)
        kept_sum += (kept[:, :, None] & groups[s:s + batch, None]).sum((0, 3))  # (S, 3)
    return (kept_sum / groups.sum((0, 2))).tolist()


def keep_rows(methods, lams):
    """[(label, method, lam)]: each text-guided method once per lam, the others once."""
    return [(f"{m} lam {lam}", m, lam) for m in methods if m in TEXT_GUIDED for lam in lams] + \
        [(m, m, lams[0]) for m in methods if m not in TEXT_GUIDED]


def run_keep(cfg):
    """The keep report, a JSON-ready dict: per method (and lam) and per cut, the fractions of
    keep_fractions."""
    a = cfg.analysis
    device = analysis_device(a)
    model, tok, w = load_for_analysis(a.checkpoint)
    model.to(device)
    mc = model.cfg
    log(f"world {w.variant} {w.seed} {a.split}: {cfg.scenes} scenes x {cfg.captions} captions")
    pairs = world_pairs(w, a.split, cfg.scenes, cfg.captions, mc, a.cover)
    pairs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pairs.items()}
    text_cls = text_cls_of(model, tok, pairs["texts"], a.batch, device)        # (C, D)
    layers = list(mc.prune.prune_layers)
    M = model.visual_encoder.num_patches
    rows = []
    for label, method, lam in keep_rows(cfg.methods, cfg.lams):
        log(f"keep: {label}")
        vit = analysis_vit(model, method, lam)
        torch.manual_seed(a.seed)                     # the same draws for random, every run
        fractions = keep_fractions(vit, pairs, text_cls, layers, a.batch)
        rows.append(dict(label=label, method=method, lam=lam, stages=[
            dict(layer=layer, named=f[0], other=f[1], all=f[2])
            for layer, f in zip(layers, fractions)]))
    return dict(
        config=dataclasses.asdict(cfg), world_seed=w.seed, world_variant=w.variant,
        num_patches=M,
        schedule=dict(prune_layers=layers, keep_ratios=list(mc.prune.keep_ratios),
                      merge=mc.prune.merge, tome_r=mc.prune.tome_r),
        rule=f"a patch belongs to an object when the object covers at least {a.cover:g} of its "
             f"{mc.patch_size}x{mc.patch_size} pixels (pixel centres, at {mc.img_size} px); "
             "fractions are of the patches entering the layer as tokens of their own (the "
             "merged token is not a patch, and when a later cut keeps it, it takes the place "
             "of a patch), pooled over all (caption, image) pairs",
        pairs=len(pairs["texts"]), named_patches=int(pairs["named"].sum()),
        other_object_patches=int((pairs["objects"] & ~pairs["named"]).sum()),
        named_objects_without_patch=pairs["unowned"],
        pairs_without_named_patch=int((~pairs["named"].any(1)).sum()), rows=rows)


def format_keep(report):
    cfg, layers = report["config"], report["schedule"]["prune_layers"]
    a = cfg["analysis"]
    lines = [f"what the pruning keeps: world {report['world_variant']} {report['world_seed']} "
             f"{a['split']} split, "
             f"{cfg['scenes']} scenes x up to {cfg['captions']} captions = {report['pairs']} "
             f"(caption, image) pairs; {a['checkpoint']}",
             f"rule: {report['rule']}",
             f"named: patches of the objects the caption names ({report['named_patches']}); "
             f"other: of the scene's other objects ({report['other_object_patches']}); all: "
             f"every patch. {report['named_objects_without_patch']} named objects own no patch "
             f"under the rule; {report['pairs_without_named_patch']} pairs have no named patch",
             "",
             f"{'':<16}" + "".join(f"{'entering layer ' + str(i):^24}" for i in layers),
             f"{'method':<16}" + "".join(f"{'named':>8}{'other':>8}{'all':>8}" for _ in layers)]
    for row in report["rows"]:
        lines.append(f"{row['label']:<16}" + "".join(
            f"{s['named']:8.3f}{s['other']:8.3f}{s['all']:8.3f}" for s in row["stages"]))
    return "\n".join(lines)


def print_and_write(table, report, out):
    """Print a command's table and write its report as JSON to `out`."""
    print(table)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")


def keep_main(argv):
    """python -m lab.analysis keep [--flag value ...]: print the table, write the JSON report."""
    cfg, _ = parse_config(KeepConfig(), argv, KEEP_PRESETS, doc=KEEP_DOC)
    report = run_keep(cfg)
    print_and_write(format_keep(report), report, cfg.out)


# ---- picture: the kept patches, drawn ------------------------------------------------------
PAD, HEAD, LINE = 8, 24, 22     # pixels: between panels, the title row, the caption under a row


def to_uint8(image):
    """A normalised (3, R, R) tensor back to the (R, R, 3) uint8 picture the model saw."""
    mean, std = (torch.tensor(v)[:, None, None] for v in (data.CLIP_MEAN, data.CLIP_STD))
    pixels = (image.cpu() * std + mean).clamp(0, 1) * 255                      # (3, R, R)
    return pixels.round().byte().permute(1, 2, 0).numpy()                      # (R, R, 3)


def grey_out(pixels, keep, patch_size):
    """(R, R, 3) uint8 with the dropped patches (keep (M,) bool False) turned dark grey."""
    g = pixels.shape[0] // patch_size
    drop = ~np.repeat(np.repeat(keep.reshape(g, g), patch_size, 0), patch_size, 1)  # (R, R)
    out = pixels.copy()
    out[drop] = (pixels[drop].mean(-1, keepdims=True) * 0.35).astype(np.uint8)
    return out


def picture_size(rows, stages, img_size, scale):
    """(width, height) of the picture: an input column and one per stage, a caption per row."""
    cell = img_size * scale
    return PAD + (1 + stages) * (cell + PAD), HEAD + rows * (cell + LINE) + PAD


def draw_picture(pixels, kept, named, texts, titles, patch_size, scale):
    """pixels (B, R, R, 3) uint8; kept (B, S, M) and named (B, M) bool. Each row: the input,
    then per stage the kept patches in colour and the dropped ones grey, the patches of the
    named objects framed in yellow; the caption underneath."""
    B, S, M = kept.shape
    R, cell, g = pixels.shape[1], pixels.shape[1] * scale, int(M ** 0.5)
    canvas = Image.new("RGB", picture_size(B, S, R, scale), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((PAD + c * (cell + PAD), 6), title, fill=(0, 0, 0), font=font)
    step = patch_size * scale
    for b in range(B):
        y = HEAD + b * (cell + LINE)
        panels = [pixels[b]] + [grey_out(pixels[b], kept[b, s], patch_size) for s in range(S)]
        for c, panel in enumerate(panels):
            x = PAD + c * (cell + PAD)
            canvas.paste(Image.fromarray(panel).resize((cell, cell), Image.NEAREST), (x, y))
            for m in (np.flatnonzero(named[b]) if c else []):
                r, q = divmod(int(m), g)
                draw.rectangle([x + q * step, y + r * step, x + (q + 1) * step - 1,
                                y + (r + 1) * step - 1], outline=(255, 230, 0))
        draw.text((PAD, y + cell + 4), texts[b], fill=(0, 0, 0), font=font)
    return canvas


def run_picture(cfg):
    """The picture (a PIL image) and what it shows: for the split's first cfg.images scenes, the
    scene i's caption i mod (its number of captions), so that the rows go through the kinds of
    caption (one object, a relation, a count)."""
    a = cfg.analysis
    device = analysis_device(a)
    model, tok, w = load_for_analysis(a.checkpoint)
    model.to(device)
    mc = model.cfg
    pairs = world_pairs(w, a.split, cfg.images, world.CAPTIONS_PER_IMAGE, mc, a.cover)
    counts = torch.bincount(pairs["scene"], minlength=cfg.images)               # captions per scene
    starts = counts.cumsum(0) - counts
    first = [int(starts[i] + i % counts[i]) for i in range(cfg.images)]
    texts = [pairs["texts"][k] for k in first]
    named = pairs["named"][first]                                               # (B, M)
    text_cls = text_cls_of(model, tok, texts, a.batch, device)
    vit = analysis_vit(model, cfg.method, cfg.lam)
    torch.manual_seed(a.seed)
    layers = list(mc.prune.prune_layers)
    kept = kept_patches(vit, pairs["images"].to(device), text_cls, layers).cpu()  # (B, S, M)
    M = kept.shape[-1]
    label = f"{cfg.method} lam {cfg.lam}" if cfg.method in TEXT_GUIDED else cfg.method
    titles = [f"input; {label}"] + [f"entering layer {i}: {int(kept[0, s].sum())} of {M} patches"
                                    for s, i in enumerate(layers)]
    lines = []
    for b, text in enumerate(texts):
        n = int(named[b].sum())
        got = ", ".join(f"{int((kept[b, s] & named[b]).sum())}/{n}" for s in range(len(layers)))
        lines.append(f'"{text}"   named-object patches kept: {got}' if n else
                     f'"{text}"   (the named objects own no patch under the rule)')
    pixels = np.stack([to_uint8(im) for im in pairs["images"]])
    canvas = draw_picture(pixels, kept.numpy(), named.numpy(), lines, titles, mc.patch_size,
                          cfg.scale)
    return canvas, dict(world_seed=w.seed, world_variant=w.variant, texts=texts, lines=lines,
                        titles=titles)


def picture_main(argv):
    """python -m lab.analysis picture [--flag value ...]: write the PNG."""
    cfg, _ = parse_config(PictureConfig(), argv, PICTURE_PRESETS, doc=PICTURE_DOC)
    canvas, shown = run_picture(cfg)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    canvas.save(cfg.out)
    print("\n".join(shown["lines"]))
    print(f"wrote {cfg.out} ({canvas.width} x {canvas.height})")


# ---- kinds: what the model reads from a caption ------------------------------------------
@torch.no_grad()
def run_kinds(cfg):
    """The kinds report, a JSON-ready dict: per caption template, over the split's captions said
    from it, the mean number of images each is true of, the share whose most similar image (ITC)
    is one the caption is true of, its chance (a random image), and image retrieval R@1 (the
    caption's own image first) beside the oracle's (metrics.oracle_recall: 1 / images true)."""
    a = cfg.analysis
    device = analysis_device(a)
    model, tok, w = load_for_analysis(a.checkpoint)
    model.to(device)
    entries = world.world_entries("retrieval", a.split, cfg.scenes, w.seed, w.variant)
    dataset = data.RetrievalEvalDataset(entries, None,
                                        data.create_transform(model.cfg.img_size, train=False))
    image_embeds, text_embeds, _, _ = evaluation.embed_retrieval_set(
        model, dataset, tok, device, model.cfg.max_len, a.batch)
    sim = (model.image_feat(image_embeds) @ model.text_feat(text_embeds).T).cpu()  # (N, T)
    truth = torch.from_numpy(world.caption_truth([it["images"][0] for it in dataset.items],
                                                 dataset.text))                     # (N, T)
    own = torch.tensor(dataset.txt2img)                                             # (T,)
    true_of = truth.sum(0).float()                                                  # (T,)
    first_true = truth.gather(0, sim.argmax(0, keepdim=True))[0].float()            # (T,)
    above_own = (sim > sim.gather(0, own[None])).sum(0)                             # (T,)
    templates = [world.caption_template(t) for t in dataset.text]
    rows = []
    for template in sorted(set(templates), key=lambda t: (t is None, str(t))):
        sel = torch.tensor([t == template for t in templates])                      # (T,)
        rows.append(dict(template=template or "(no template)", captions=int(sel.sum()),
                         images_true=float(true_of[sel].mean()),
                         first_true=float(first_true[sel].mean()),
                         first_true_chance=float((true_of[sel] / len(dataset)).mean()),
                         r1=float((above_own[sel] == 0).float().mean()),
                         r1_oracle=float((1 / true_of[sel]).mean())))
    fill = probes.fill_in(model, tok, w, a.split, cfg.scenes, device) if "mlm" in model.cfg.losses \
        else {}
    words = {attribute: dict(objects=len(pairs),
                             right=sum(t == p for t, p in pairs) / len(pairs),
                             most_frequent=max(Counter(t for t, _ in pairs).values()) / len(pairs))
             for attribute, pairs in fill.items()}
    return dict(config=dataclasses.asdict(cfg), world_seed=w.seed, world_variant=w.variant,
                images=len(dataset), captions=len(dataset.text), rows=rows, fill_in=words,
                minimal_pairs=probes.minimal_pairs(model, tok, w, a.split, cfg.scenes, device),
                text_cosine=probes.text_contrast(model, tok, device),
                probe=probes.probe_objects(model, w, a.split, cfg.scenes, cfg.probe_scenes,
                                           a.seed, device))


def format_kinds(report):
    a = report["config"]["analysis"]
    lines = [f"image retrieval by ITC per caption template: world {report['world_variant']} "
             f"{report['world_seed']} {a['split']} split, {report['images']} images, "
             f"{report['captions']} captions; {a['checkpoint']}",
             "first true: the most similar image is one the caption is true of (chance: a random "
             "image); R@1: the caption's own image first (oracle: 1 / images true)", "",
             f"{'template':<34}{'captions':>9}{'true of':>9}{'first true':>12}{'chance':>8}"
             f"{'R@1':>7}{'oracle':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['template']:<34}{r['captions']:>9}{r['images_true']:>9.1f}"
                     f"{r['first_true']:>12.3f}{r['first_true_chance']:>8.3f}{r['r1']:>7.3f}"
                     f"{r['r1_oracle']:>8.3f}")
    if report["fill_in"]:
        lines += ["", "the MLM head fills in a masked word of 'a {size} {colour} {shape}' with the "
                  "image (right: its pick among the world's words is the object's; most frequent: "
                  "always answering the most frequent value)",
                  f"{'word':<10}{'objects':>9}{'right':>8}{'most frequent':>15}"]
        lines += [f"{k:<10}{v['objects']:>9}{v['right']:>8.3f}{v['most_frequent']:>15.3f}"
                  for k, v in report["fill_in"].items()]
    pairs = report["minimal_pairs"]
    lines += ["", f"a true caption against its minimal-pair twin (SNLI-VE's entailment and "
              f"contradiction) on the same image, {pairs['pairs']} scenes: the true one scores "
              f"higher {pairs['itc']:.3f} of the time by ITC, {pairs['itm']:.3f} by ITM"]
    cos, probe = report["text_cosine"], report["probe"]
    objects = probe["shape"]["objects"]
    lines += ["", "where an attribute is lost: the cosine between the ITC text features of two "
              "captions 'a {size} {colour} {shape}' that differ in it (1: the text side cannot "
              "tell them apart), and the test accuracy of a linear probe naming it from the "
              f"object's patch tokens ({objects[0]} train-split objects, {objects[1]} test), "
              "of this ViT, an untrained one and the raw pixels",
              f"{'word':<10}{'text cosine':>12}{'trained':>9}{'untrained':>11}{'pixels':>8}"
              f"{'most frequent':>15}"]
    lines += [f"{k:<10}{cos[k]:>12.3f}{v['trained']:>9.3f}{v['untrained']:>11.3f}"
              f"{v['pixels']:>8.3f}{v['most_frequent']:>15.3f}" for k, v in probe.items()]
    return "\n".join(lines)


def kinds_main(argv):
    """python -m lab.analysis kinds [--flag value ...]: print the table, write the JSON report."""
    cfg, _ = parse_config(KindsConfig(), argv, KINDS_PRESETS, doc=KINDS_DOC)
    report = run_kinds(cfg)
    print_and_write(format_kinds(report), report, cfg.out)


COMMANDS = {"keep": keep_main, "picture": picture_main, "kinds": kinds_main}
USAGE = f"""usage: python -m lab.analysis {{{','.join(COMMANDS)}}} [--flag value ...]
  keep     the fractions of the named objects' patches, the other objects' and all patches
           that each method keeps at each cut (table and JSON)
  picture  the kept patches of a few scenes, drawn (PNG)
  kinds    image retrieval per caption template, beside chance and the oracle, the words
           the MLM head fills in, and where an attribute is lost (tables and JSON)
python -m lab.analysis COMMAND --help lists the command's flags"""


def main(argv):
    run_subcommand(COMMANDS, argv, USAGE)


if __name__ == "__main__":
    main(sys.argv[1:])
