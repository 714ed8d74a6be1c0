"""Data: caption cleaning, the embedded demo world, the JSON datasets, transforms and collate.

Every dataset reads the JSON layouts of ALBEF/BLIP (DESIGN.md section 4): a list of entries such
as {"image": path, "caption": str or [str, ...]}, from one or several files, or from an
in-memory list. The embedded world plugs into the same classes: its entries name images by
"world:<seed>/<split>/<index>", which load_image renders on the fly, so

    entries = world_entries("pretrain", "train", 1000)       # no download, same on every machine
    dataset = PretrainDataset(entries, None, create_transform(64, train=True))
    loader = DataLoader(dataset, batch_size=32, collate_fn=make_collate(tokenizer, 30))

gives the same batches as real COCO files would, only smaller. Nothing is skipped silently: a
malformed entry, an empty caption or a missing image is an error that names the JSON file and
the index of the entry.

The world (class World) draws scenes of 2-4 flat-coloured objects (6 shapes x 7 colours x 2
sizes) on a 3x3 grid over a textured background. Captions describe a part of the scene (one
object, or two and their relation, or a count), so the text says which patches matter; every
downstream task (retrieval, VQA, NLVR2, SNLI-VE, captioning) and per-object pixel masks come
from the same scenes.
"""

import colorsys
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

# -----------------------------------------------------------------------------
# Text cleaning, exactly as ALBEF (so that numbers on real data are comparable)


def pre_caption(caption, max_words=30):
    """ALBEF's caption cleaning: lower case, drop ,.'!?"()*#:;~, '-' and '/' to spaces,
    '<person>' (SBU/CC placeholders) to 'person', collapse runs of spaces, strip, keep the first
    max_words words."""
    caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question, max_words=30):
    """ALBEF's question cleaning: like pre_caption, but it only strips trailing spaces and does
    not collapse inner runs of spaces (kept as ALBEF has it)."""
    question = re.sub(r"([,.'!?\"()*#:;~])", "", question.lower())
    question = question.replace("-", " ").replace("/", " ").rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def swap_left_right(text):
    """Exchange the words 'left' and 'right'. A horizontally flipped image makes 'a cat to the
    left of a dog' false; swapping the words makes it true again (real data says left/right too)."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", text)


# -----------------------------------------------------------------------------
# The embedded world: what exists in it and every sentence template it can say.
# All text comes from the templates and word lists below, which is how World.vocabulary()
# knows every word the generators can emit.

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "cross": "crosses", "ring": "rings", "star": "stars"}
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (40, 90, 235),
           "yellow": (245, 215, 30), "purple": (170, 60, 230), "orange": (255, 140, 0),
           "white": (245, 245, 245)}
RADIUS = {"small": 0.1, "large": 0.15}   # fraction of the image side: ~13 and ~19 px wide at 64 px
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
WHERE = {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
         (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
         (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}
MARGIN = 0.15   # a relation is stated only when the object centres differ by more than this


def _answer(cell):
    return WHERE[cell].split(" ", 2)[2]      # "at the top left" -> "top left", a VQA answer


CAPTIONS = {
    "object": ("a {size} {colour} {shape}", "a {colour} {shape} {where}",
               "a {size} {shape} {where}"),
    "left": "a {a} to the left of a {b}", "right": "a {a} to the right of a {b}",
    "above": "a {a} above a {b}", "below": "a {a} below a {b}",
    "count": "there are {n} objects", "count_shape": "there are {n} {shapes}",
    "count_colour": "there are {n} {colour} objects",
}
QUESTIONS = {
    "colour": "what color is the {shape}?", "shape": "what shape is the {colour} object?",
    "count": "how many objects are there?", "exists": "is there a {colour} {shape}?",
    "where": "where is the {colour} {shape}?", "size": "what size is the {colour} {shape}?",
    "left": "is the {a} to the left of the {b}?", "above": "is the {a} above the {b}?",
}
QUESTIONS_PER_IMAGE = 4
CAPTIONS_PER_IMAGE = 5


def _say(template, **slots):
    """Fill a template and fix the article: 'a orange star' -> 'an orange star'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(**slots))


def _has(objects, colour=None, shape=None):
    return any(colour in (None, o.colour) and shape in (None, o.shape) for o in objects)


# NLVR2-style statements about a pair (a, b) of object lists; "n" is a total count
STATEMENTS = (
    ("there is a {colour} {shape} in exactly one image",
     lambda a, b, c, s, n: _has(a, c, s) != _has(b, c, s)),
    ("both images contain a {colour} {shape}",
     lambda a, b, c, s, n: _has(a, c, s) and _has(b, c, s)),
    ("both images contain a {shape}", lambda a, b, c, s, n: _has(a, None, s) and _has(b, None, s)),
    ("both images contain a {colour} object",
     lambda a, b, c, s, n: _has(a, c, None) and _has(b, c, None)),
    ("neither image contains a {colour} {shape}",
     lambda a, b, c, s, n: not _has(a, c, s) and not _has(b, c, s)),
    ("at least one image contains a {colour} {shape}",
     lambda a, b, c, s, n: _has(a, c, s) or _has(b, c, s)),
    ("the left image contains a {colour} {shape}", lambda a, b, c, s, n: _has(a, c, s)),
    ("the right image contains a {colour} {shape}", lambda a, b, c, s, n: _has(b, c, s)),
    ("the left image has more objects than the right image", lambda a, b, c, s, n: len(a) > len(b)),
    ("both images have the same number of objects", lambda a, b, c, s, n: len(a) == len(b)),
    ("there are {n} objects in total", lambda a, b, c, s, n: len(a) + len(b) == n),
)
# SNLI-VE neutral hypotheses: properties no picture of the world can show or deny
NEUTRAL = ("the {a} is made of {material}", "the {a} is {quality}")
MATERIALS = ("wood", "metal", "glass", "paper", "plastic", "stone")
QUALITIES = ("heavy", "warm", "cold", "wet", "old", "fragile")
VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}     # ALBEF's label ids


def _rng(*parts):
    """A generator seeded by a stable hash of the parts (ints, or strings via crc32), the same on
    every machine and Python version (unlike hash())."""
    return np.random.default_rng([zlib.crc32(p.encode()) if isinstance(p, str) else int(p)
                                  for p in parts])


def _pick(rng, seq):
    return seq[rng.integers(len(seq))]


def _canonical(objects):
    return tuple(sorted((o.shape, o.colour, o.size, o.cell) for o in objects))


def _split_of(canonical):
    """The split a scene composition belongs to: 80/10/10 by a stable hash. A composition (the
    objects' shapes, colours, sizes and cells) lives in one split only, whatever the seed."""
    bucket = zlib.crc32(repr(canonical).encode()) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def _upsample(grid, res):
    """Bilinear interpolation of a (C, g, g) grid at the centres of res x res pixels, so the
    background is the same picture at every resolution. Plain numpy indexing: BLAS (einsum,
    matmul) would start threads that fight the DataLoader workers for the cores."""
    g = grid.shape[-1]
    p = (np.arange(res) + 0.5) / res * (g - 1)            # pixel centres in grid units
    i = np.minimum(p.astype(int), g - 2)
    w = (p - i).astype(np.float32)
    cols = grid[:, :, i] * (1 - w) + grid[:, :, i + 1] * w           # (C, g, res)
    w = w[:, None]
    return cols[:, i] * (1 - w) + cols[:, i + 1] * w                 # (C, res, res)


# Shapes as inside-tests on coordinates (u right, v down) in units of the object's radius;
# every shape fits in the unit disc, so objects in different cells never overlap.
_STAR_INNER = 0.45 * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])


def _star(u, v):
    a = np.arctan2(u, -v)                                          # angle from straight up
    a = np.abs((a + np.pi / 5) % (2 * np.pi / 5) - np.pi / 5)      # fold onto one spike's half
    rho = np.hypot(u, v)
    px, py = rho * np.cos(a), rho * np.sin(a)
    ex, ey = _STAR_INNER[0] - 1, _STAR_INNER[1]              # edge: tip (1, 0) to inner corner
    return ex * py - ey * (px - 1) >= 0                            # on the centre's side of it


INSIDE = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85),
    "triangle": lambda u, v: (v <= 0.75) & (np.abs(u) <= (v + 1) * 0.95 / 1.75),
    "cross": lambda u, v: (((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95))
                           | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))),
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.3),
    "star": _star,
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str       # "small" | "large"
    cx: float       # centre, fraction of the image side from the left
    cy: float       # centre, fraction of the image side from the top

    @property
    def cell(self):
        return int(self.cy * 3), int(self.cx * 3)      # (row, col); jitter never leaves the cell

    @property
    def name(self):
        return f"{self.colour} {self.shape}"          # unique in a scene


@dataclass(eq=False)
class Scene:
    seed: int
    split: str
    index: int
    objects: tuple           # of Obj
    field: np.ndarray        # (3, 4, 4) background RGB at grid nodes: a gradient plus blotches
    grain: np.ndarray        # (1, 16, 16) finer brightness noise, so that no patch is blank

    def canonical(self):
        """The composition: what the captions can talk about (background excluded)."""
        return _canonical(self.objects)


class World:
    """The embedded demo world: scenes made on the fly from (seed, split, index)."""

    def __init__(self, seed=0):
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"world seed must be a non-negative int, got {seed!r}")
        self.seed = seed

    def path(self, split, index):
        return f"world:{self.seed}/{split}/{index}"

    def scene(self, split, index):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = _rng(self.seed, split, index)
        while True:   # redraw until the composition is this split's (1.25 tries for train, 10 else)
            objects = self._objects(rng)
            if _split_of(_canonical(objects)) == split:
                break
        # a muted background (dark, low saturation) that every object colour stands out from
        hue, sat, val = rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.15, 0.42)
        hue2 = (hue + rng.uniform(-0.08, 0.08)) % 1
        val2 = np.clip(val + rng.uniform(-0.15, 0.15), 0.1, 0.45)
        ends = 255 * np.array([colorsys.hsv_to_rgb(hue, sat, val),
                               colorsys.hsv_to_rgb(hue2, sat, val2)])                 # (2, 3)
        angle, node = rng.uniform(0, 2 * np.pi), np.linspace(-0.5, 0.5, 4)
        # a linear gradient sampled at the grid nodes; bilinear interpolation reproduces it exactly
        g = (np.cos(angle) * node[None, :] + np.sin(angle) * node[:, None]) / np.sqrt(2) + 0.5
        field = ends[0][:, None, None] * (1 - g) + ends[1][:, None, None] * g       # (3, 4, 4)
        field = field + rng.normal(0, 14, (3, 4, 4))
        grain = rng.normal(0, 8, (1, 16, 16))
        # float32: a 256 px image then renders in about a millisecond
        return Scene(self.seed, split, index, objects, field.astype(np.float32),
                     grain.astype(np.float32))

    @staticmethod
    def _objects(rng):
        """2-4 objects in distinct cells of a 3x3 grid, no two with the same (shape, colour)."""
        k = int(rng.integers(2, 5))
        cells = rng.choice(9, k, replace=False)
        kinds = rng.choice(len(SHAPES) * len(COLOURS), k, replace=False)
        objects = []
        for cell, kind in zip(cells, kinds):
            size = ("small", "large")[rng.integers(2)]
            jitter = 1 / 6 - RADIUS[size] - 0.008      # keeps the object inside its cell
            cx, cy = (np.array([cell % 3, cell // 3]) + 0.5) / 3 + rng.uniform(-jitter, jitter, 2)
            objects.append(Obj(SHAPES[kind % len(SHAPES)], list(COLOURS)[kind // len(SHAPES)],
                               size, float(cx), float(cy)))
        return tuple(objects)

    # --- pixels

    def masks(self, scene, res=64):
        """(num_objects, res, res) bool: the pixels (by their centres) each object covers."""
        t = (np.arange(res) + 0.5) / res
        out = np.zeros((len(scene.objects), res, res), bool)
        for k, o in enumerate(scene.objects):
            r = RADIUS[o.size]
            # test only the bounding box (it lies inside the object's cell, so inside the image)
            ys = slice(int((o.cy - r) * res), int((o.cy + r) * res) + 1)
            xs = slice(int((o.cx - r) * res), int((o.cx + r) * res) + 1)
            out[k, ys, xs] = INSIDE[o.shape]((t[None, xs] - o.cx) / r, (t[ys, None] - o.cy) / r)
        return out

    def render(self, scene, res=64):
        """PIL RGB image: the smooth background with its grain, then the flat objects."""
        image = _upsample(scene.field, res) + _upsample(scene.grain, res)      # (3, res, res)
        image = np.clip(image + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)   # rounded, HWC
        image = np.ascontiguousarray(image)
        for o, m in zip(scene.objects, self.masks(scene, res)):
            image[m] = COLOURS[o.colour]
        return Image.fromarray(image)

    # --- text

    def captions(self, scene, n=CAPTIONS_PER_IMAGE):
        """n distinct true captions (all of them if n is None) as (text, indices of the objects it
        names): one object, a relation of two, or a count. Object, relation and count captions
        take turns, so a scene's captions describe different parts of it."""
        objs = scene.objects
        single, relation, count = [], [], []
        for i, o in enumerate(objs):
            for template in CAPTIONS["object"]:
                single.append((_say(template, size=o.size, colour=o.colour, shape=o.shape,
                                     where=WHERE[o.cell]), (i,)))
        for i, a in enumerate(objs):
            for j, b in enumerate(objs):
                if b.cx - a.cx > MARGIN:
                    relation += [(_say(CAPTIONS["left"], a=a.name, b=b.name), (i, j)),
                                 (_say(CAPTIONS["right"], a=b.name, b=a.name), (j, i))]
                if b.cy - a.cy > MARGIN:
                    relation += [(_say(CAPTIONS["above"], a=a.name, b=b.name), (i, j)),
                                 (_say(CAPTIONS["below"], a=b.name, b=a.name), (j, i))]
        count.append((_say(CAPTIONS["count"], n=NUMBERS[len(objs)]), tuple(range(len(objs)))))
        for key, attr, fill in (("count_shape", "shape", lambda v: {"shapes": PLURALS[v]}),
                                ("count_colour", "colour", lambda v: {"colour": v})):
            for value, k in Counter(getattr(o, attr) for o in objs).items():
                if k > 1:
                    named = tuple(i for i, o in enumerate(objs) if getattr(o, attr) == value)
                    count.append((_say(CAPTIONS[key], n=NUMBERS[k], **fill(value)), named))
        rng = _rng(scene.seed, scene.split, scene.index, "captions")
        pools = [[p[i] for i in rng.permutation(len(p))] for p in (single, relation, count)]
        out = []
        while any(pools) and (n is None or len(out) < n):
            for pool in pools:
                if pool and (n is None or len(out) < n):
                    out.append(pool.pop())
        return out

    def questions(self, scene):
        """QUESTIONS_PER_IMAGE (question, short answer) pairs of different kinds; yes/no answers
        are balanced."""
        objs, rng = scene.objects, _rng(scene.seed, scene.split, scene.index, "vqa")
        shapes, colours = Counter(o.shape for o in objs), Counter(o.colour for o in objs)
        absent = [(c, s) for c in COLOURS for s in SHAPES if not _has(objs, c, s)]
        pick = objs[rng.integers(len(objs))]
        c, s = (pick.colour, pick.shape) if rng.random() < 0.5 else _pick(rng, absent)
        cands = {
            "colour": [(_say(QUESTIONS["colour"], shape=o.shape), o.colour)
                       for o in objs if shapes[o.shape] == 1],
            "shape": [(_say(QUESTIONS["shape"], colour=o.colour), o.shape)
                      for o in objs if colours[o.colour] == 1],
            "count": [(QUESTIONS["count"], NUMBERS[len(objs)])],
            "exists": [(_say(QUESTIONS["exists"], colour=c, shape=s),
                        "yes" if _has(objs, c, s) else "no")],
            "where": [(_say(QUESTIONS["where"], colour=o.colour, shape=o.shape), _answer(o.cell))
                      for o in objs],
            "size": [(_say(QUESTIONS["size"], colour=o.colour, shape=o.shape), o.size)
                     for o in objs],
            # both orders of a pair, so a random pick is yes or no with equal chance
            "left": [(_say(QUESTIONS["left"], a=a.name, b=b.name), "yes" if b.cx > a.cx else "no")
                     for a in objs for b in objs if abs(b.cx - a.cx) > MARGIN],
            "above": [(_say(QUESTIONS["above"], a=a.name, b=b.name), "yes" if b.cy > a.cy else "no")
                      for a in objs for b in objs if abs(b.cy - a.cy) > MARGIN],
        }
        kinds = [k for k, v in cands.items() if v]
        return [_pick(rng, cands[k])
                for k in rng.choice(kinds, min(QUESTIONS_PER_IMAGE, len(kinds)), replace=False)]

    def statements(self, scene_a, scene_b):
        """[(true statement, True), (false statement, False)] about the pair (left, right)."""
        a, b = scene_a.objects, scene_b.objects
        rng = _rng(scene_a.seed, scene_a.split, scene_a.index, scene_b.index, "nlvr")
        out = []
        for label in (True, False):
            while True:   # rejection: a statement of this truth value turns up within a few draws
                template, truth = _pick(rng, STATEMENTS)
                o = _pick(rng, a + b)                   # mostly talk about what is there
                c = o.colour if rng.random() < 0.7 else _pick(rng, list(COLOURS))
                s = o.shape if rng.random() < 0.7 else _pick(rng, SHAPES)
                n = len(a) + len(b) if rng.random() < 0.5 else int(rng.integers(4, 9))
                if truth(a, b, c, s, n) == label:
                    out.append((_say(template, colour=c, shape=s, n=NUMBERS[n]), label))
                    break
        return out

    def hypotheses(self, scene):
        """One (hypothesis, label) per SNLI-VE label: entailment is a true caption; contradiction
        a caption made false (wrong colour, shape, size or place of a present object, a reversed
        relation, a wrong count); neutral a property the pictures never show."""
        objs, rng = scene.objects, _rng(scene.seed, scene.split, scene.index, "ve")
        true = self.captions(scene, n=None)
        o = _pick(rng, objs)
        other_size = "large" if o.size == "small" else "small"
        colours = [c for c in COLOURS if not _has(objs, c, o.shape)]
        shapes = [s for s in SHAPES if not _has(objs, o.colour, s)]
        cells = [cell for cell in WHERE if cell[0] != o.cell[0] and cell[1] != o.cell[1]]
        counts = [k for k in range(2, 6) if k != len(objs)]
        pairs = [(p, q) for p in objs for q in objs if q.cx - p.cx > MARGIN]
        a_size, a_colour_shape, _ = CAPTIONS["object"]
        false = [
            _say(a_size, size=o.size, colour=_pick(rng, colours), shape=o.shape),
            _say(a_colour_shape, colour=o.colour, shape=_pick(rng, shapes), where=WHERE[o.cell]),
            _say(a_size, size=other_size, colour=o.colour, shape=o.shape),
            _say(a_colour_shape, colour=o.colour, shape=o.shape, where=WHERE[_pick(rng, cells)]),
            _say(CAPTIONS["count"], n=NUMBERS[_pick(rng, counts)]),
        ]
        if pairs:
            p, q = _pick(rng, pairs)
            false.append(_say(CAPTIONS["right"], a=p.name, b=q.name))
        neutral = _say(_pick(rng, NEUTRAL), a=o.name, material=_pick(rng, MATERIALS),
                       quality=_pick(rng, QUALITIES))
        return [(_pick(rng, true)[0], "entailment"), (neutral, "neutral"),
                (_pick(rng, false), "contradiction")]

    @staticmethod
    def vocabulary():
        """Every word any generator can emit (captions, questions, answers, statements,
        hypotheses), sorted: a tokenizer built from it never meets an unknown world word."""
        texts = [*CAPTIONS["object"], *(v for k, v in CAPTIONS.items() if k != "object"),
                 *QUESTIONS.values(), *(t for t, _ in STATEMENTS), *NEUTRAL, *SHAPES,
                 *PLURALS.values(), *COLOURS, *RADIUS, *NUMBERS, *WHERE.values(), *MATERIALS,
                 *QUALITIES, "yes no an"]
        return sorted({w for t in texts for w in pre_caption(re.sub(r"\{\w+\}", " ", t)).split()})


def world_answer_list():
    """Every answer the world's VQA questions can have (the answer list of VQA fine-tuning)."""
    return ["yes", "no", *NUMBERS[2:5], *COLOURS, *SHAPES, *RADIUS, *map(_answer, WHERE)]


def world_entries(task, split, n, seed=0):
    """Entries of the world in the JSON layout of a real dataset (DESIGN.md section 4).
    n is the number of scenes (images), or of image pairs for "nlvr". Per scene: "pretrain" one
    entry with CAPTIONS_PER_IMAGE captions; "retrieval"/"caption" one entry per caption with
    "image_id" for train, one entry with a caption list for val/test; "vqa" QUESTIONS_PER_IMAGE
    questions with 10 (identical) answers; "ve" one hypothesis per label; "nlvr" one true and
    one false statement about the scenes (2k, 2k+1)."""
    if task not in ("pretrain", "retrieval", "caption", "vqa", "ve", "nlvr"):
        raise ValueError(f"unknown task {task!r}: pretrain, retrieval, caption, vqa, ve or nlvr")
    world = World(seed)
    entries = []
    for i in range(n):
        if task == "nlvr":
            pair = [world.path(split, 2 * i), world.path(split, 2 * i + 1)]
            statements = world.statements(world.scene(split, 2 * i), world.scene(split, 2 * i + 1))
            entries += [{"images": pair, "sentence": s, "label": label} for s, label in statements]
            continue
        scene, path = world.scene(split, i), world.path(split, i)
        if task == "pretrain" or (task in ("retrieval", "caption") and split != "train"):
            entries.append({"image": path, "caption": [c for c, _ in world.captions(scene)]})
        elif task in ("retrieval", "caption"):
            entries += [{"image": path, "caption": c, "image_id": i}
                        for c, _ in world.captions(scene)]
        elif task == "vqa":
            entries += [{"question_id": i * QUESTIONS_PER_IMAGE + k, "question": q,
                         "answer": [a] * 10, "image": path}
                        for k, (q, a) in enumerate(world.questions(scene))]
        else:
            entries += [{"image": path, "sentence": s, "label": label}
                        for s, label in world.hypotheses(scene)]
    return entries


# -----------------------------------------------------------------------------
# Images

WORLD_RES = 256     # world images are drawn at this size; the transforms resize them like photos
_WORLD_PATH = re.compile(r"world:(?:(\d+)/)?(train|val|test)/(\d+)")


def parse_world_path(path):
    """"world:<seed>/<split>/<index>", or "world:<split>/<index>" for seed 0 ->
    (seed, split, index)."""
    m = _WORLD_PATH.fullmatch(path)
    if m is None:
        raise ValueError(f"bad world image path {path!r}: expected world:<seed>/<split>/<index>")
    return int(m.group(1) or 0), m.group(2), int(m.group(3))


def load_image(path, image_root=None):
    """PIL RGB image. A "world:" path renders that scene of the embedded world at WORLD_RES; any
    other path is read from disk, joined to image_root when one is given."""
    if path.startswith("world:"):
        seed, split, index = parse_world_path(path)
        world = World(seed)
        return world.render(world.scene(split, index), WORLD_RES)
    full = os.path.join(image_root, path) if image_root else path
    if not os.path.isfile(full):
        raise FileNotFoundError(f"image not found: {full}")
    try:
        with Image.open(full) as image:
            return image.convert("RGB")
    except OSError as e:   # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise OSError(f"cannot read image {full}: {e}") from e


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def create_transform(res, train, crop_scale=(0.2, 1.0)):
    """ALBEF/BLIP transforms without the flip, which the datasets do together with the text.
    crop_scale: the area range of the random crop; ALBEF's (0.2, 1.0) can cut out the object a
    caption names, harmless on web captions but a lie in the embedded world, which uses a milder one."""
    bicubic = InterpolationMode.BICUBIC
    resize = (transforms.RandomResizedCrop(res, scale=crop_scale, interpolation=bicubic) if train
              else transforms.Resize((res, res), interpolation=bicubic))
    return transforms.Compose([resize, transforms.ToTensor(),
                               transforms.Normalize(CLIP_MEAN, CLIP_STD)])


# -----------------------------------------------------------------------------
# Datasets


def _field(entry, key, types, what):
    if key not in entry:
        raise ValueError(f"missing key {key!r}")
    if not isinstance(entry[key], types):
        raise ValueError(f"{key!r} must be {what}, got {type(entry[key]).__name__}")
    return entry[key]


def _texts(entry, key, clean, max_words):
    """A str or a non-empty list of str, cleaned; a text that cleans to nothing is an error."""
    value = _field(entry, key, (str, list), "a string or a list of strings")
    texts = [value] if isinstance(value, str) else value
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{key!r} must be a string or a non-empty list of strings")
    cleaned = [clean(t, max_words) for t in texts]
    if not all(cleaned):
        raise ValueError(f"{key!r} is empty after cleaning: {value!r}")
    return cleaned


def _read(source):
    """Yield (entry, "<file>, entry <index>") from a JSON path, a list of them, or a list of
    entries (then named "<entries>")."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if not all(isinstance(s, (str, os.PathLike)) for s in source):
        yield from ((e, f"<entries>, entry {i}") for i, e in enumerate(source))
        return
    for file in source:
        with open(file, encoding="utf-8") as f:
            try:
                entries = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON: {e}") from None
        if not isinstance(entries, list):
            raise ValueError(f"{file}: expected a JSON list of entries, "
                             f"got {type(entries).__name__}")
        yield from ((e, f"{file}, entry {i}") for i, e in enumerate(entries))


class JSONDataset(Dataset):
    """The shared base: reads and validates every entry at construction (self.parse, per
    dataset), checks that image files exist, loads and transforms images, and mirrors an image
    together with its text when `flip` (p=0.5). Errors name the JSON file and the entry index.
    source: a JSON path, a list of paths (concatenated), or a list of entries ("<entries>")."""

    def __init__(self, source, image_root, transform, flip, check_images):
        self.image_root, self.transform, self.flip = image_root, transform, flip
        self.items, self.origins = [], []
        for entry, where in _read(source):
            try:
                if not isinstance(entry, dict):
                    raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
                item = self.parse(entry)
                for path in item["images"]:
                    if path.startswith("world:"):
                        parse_world_path(path)     # rendered on load: only the name can be wrong
                    elif check_images:
                        full = os.path.join(image_root, path) if image_root else path
                        if not os.path.isfile(full):
                            raise FileNotFoundError(f"image not found: {full}")
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"{where}: {e}") from None
            self.items.append(item)
            self.origins.append(where)
        if not self.items:
            raise ValueError("the dataset has no entries")

    def __len__(self):
        return len(self.items)

    def load(self, i, *texts):
        """The transformed image(s) of entry i and `texts`; on a coin flip (if self.flip) the
        images are mirrored and left/right swapped in every text, so the text stays true."""
        flip = self.flip and bool(torch.rand(()) < 0.5)
        images = []
        for path in self.items[i]["images"]:
            try:
                image = load_image(path, self.image_root)
            except (OSError, ValueError) as e:
                raise type(e)(f"{self.origins[i]}: {e}") from e
            image = ImageOps.mirror(image) if flip else image
            images.append(self.transform(image) if self.transform else image)
        return images, [swap_left_right(t) if flip else t for t in texts]

    def random_choice(self, texts):
        # torch's generator, which DataLoader seeds in every worker, so runs are reproducible
        return texts[int(torch.randint(len(texts), ()))]


class PretrainDataset(JSONDataset):
    """{"image", "caption": str or [str]} -> (image, caption), one caption drawn at random."""

    def __init__(self, source, image_root=None, transform=None, max_words=30, flip=True,
                 check_images=True):
        self.max_words = max_words
        super().__init__(source, image_root, transform, flip, check_images)

    def parse(self, entry):
        return {"images": [_field(entry, "image", str, "a string")],
                "captions": _texts(entry, "caption", pre_caption, self.max_words)}

    def __getitem__(self, i):
        (image,), (caption,) = self.load(i, self.random_choice(self.items[i]["captions"]))
        return image, caption


class RetrievalTrainDataset(PretrainDataset):
    """{"image", "caption", "image_id"} -> (image, caption, index of image_id), as ALBEF."""

    def __init__(self, source, image_root=None, transform=None, max_words=30, flip=True,
                 check_images=True):
        super().__init__(source, image_root, transform, max_words, flip, check_images)
        ids = {}
        for item in self.items:
            ids.setdefault(item["image_id"], len(ids))
        self.img_ids = ids

    def parse(self, entry):
        return {**super().parse(entry),
                "image_id": _field(entry, "image_id", (str, int), "a string or an int")}

    def __getitem__(self, i):
        image, caption = super().__getitem__(i)
        return image, caption, self.img_ids[self.items[i]["image_id"]]


class RetrievalEvalDataset(PretrainDataset):
    """{"image", "caption": [str, ...]} one entry per image -> (image, index). All captions are
    in .text; .img2txt[i] lists the captions of image i, .txt2img[t] the image of caption t."""

    def __init__(self, source, image_root=None, transform=None, max_words=30, check_images=True):
        super().__init__(source, image_root, transform, max_words, False, check_images)
        self.text, self.img2txt, self.txt2img = [], [], []
        for i, item in enumerate(self.items):
            self.img2txt.append(list(range(len(self.text), len(self.text) + len(item["captions"]))))
            self.text += item["captions"]
            self.txt2img += [i] * len(item["captions"])

    def __getitem__(self, i):
        (image,), _ = self.load(i)
        return image, i


class CaptionDataset(PretrainDataset):
    """Captioning on the retrieval files. train: (image, caption) like PretrainDataset; eval:
    (image, index), the cleaned reference captions of image i in .references[i]."""

    def __init__(self, source, image_root=None, transform=None, train=True, max_words=30,
                 check_images=True):
        super().__init__(source, image_root, transform, max_words, train, check_images)
        self.train = train
        self.references = [item["captions"] for item in self.items]

    def __getitem__(self, i):
        if self.train:
            return super().__getitem__(i)
        (image,), _ = self.load(i)
        return image, i


class VQADataset(JSONDataset):
    """{"question_id", "question", "answer": [str, ...], "image"}.
    train -> (image, question, answers, weights): each distinct answer once, with its VQA soft
    score min(1, count / 3) as weight. eval -> (image, question, index); answers optional.
    .answer_list: the candidate answers (a list, a JSON file of one, or all answers seen)."""

    def __init__(self, source, image_root=None, transform=None, train=True, answer_list=None,
                 max_words=30, check_images=True):
        self.train, self.max_words = train, max_words
        super().__init__(source, image_root, transform, train, check_images)
        if isinstance(answer_list, (str, os.PathLike)):
            with open(answer_list, encoding="utf-8") as f:
                answer_list = json.load(f)
        self.answer_list = answer_list or sorted({a for it in self.items for a in it["answers"]})
        self.question_ids = [item["question_id"] for item in self.items]

    def parse(self, entry):
        answers = (_field(entry, "answer", list, "a list of strings")
                   if self.train or "answer" in entry else [])
        if (self.train and not answers) or not all(isinstance(a, str) for a in answers):
            raise ValueError("'answer' must be a non-empty list of strings")
        return {"images": [_field(entry, "image", str, "a string")],
                "question_id": _field(entry, "question_id", (str, int), "a string or an int"),
                "question": _texts(entry, "question", pre_question, self.max_words)[0],
                "answers": answers}

    def __getitem__(self, i):
        item = self.items[i]
        (image,), (question, *answers) = self.load(i, item["question"], *item["answers"])
        if not self.train:
            return image, question, i
        counts = Counter(answers)
        return image, question, list(counts), [min(1.0, k / 3) for k in counts.values()]


class NLVRDataset(JSONDataset):
    """{"images": [left, right], "sentence", "label": bool or "True"/"False"} ->
    (image0, image1, sentence, label 0/1). Never flipped: in NLVR2 'left' may name an image or a
    direction, and mirroring one image without the other keeps neither reading true."""

    def __init__(self, source, image_root=None, transform=None, max_words=30, check_images=True):
        self.max_words = max_words
        super().__init__(source, image_root, transform, False, check_images)

    def parse(self, entry):
        images = _field(entry, "images", list, "a list of two paths")
        if len(images) != 2 or not all(isinstance(p, str) for p in images):
            raise ValueError(f"'images' must be a list of two paths, got {images!r}")
        label = _field(entry, "label", (bool, str), "a bool or 'True'/'False'")
        if isinstance(label, str) and label not in ("True", "False"):
            raise ValueError(f"'label' must be a bool or 'True'/'False', got {label!r}")
        return {"images": images,
                "sentence": _texts(entry, "sentence", pre_caption, self.max_words)[0],
                "label": int(label in (True, "True"))}

    def __getitem__(self, i):
        (image0, image1), (sentence,) = self.load(i, self.items[i]["sentence"])
        return image0, image1, sentence, self.items[i]["label"]


class VEDataset(JSONDataset):
    """{"image", "sentence", "label": "entailment"|"neutral"|"contradiction"} ->
    (image, sentence, label) with ALBEF's ids: contradiction 0, neutral 1, entailment 2."""

    def __init__(self, source, image_root=None, transform=None, train=True, max_words=30,
                 check_images=True):
        self.max_words = max_words
        super().__init__(source, image_root, transform, train, check_images)

    def parse(self, entry):
        label = _field(entry, "label", str, "a string")
        if label not in VE_LABELS:
            raise ValueError(f"'label' must be one of {list(VE_LABELS)}, got {label!r}")
        return {"images": [_field(entry, "image", str, "a string")],
                "sentence": _texts(entry, "sentence", pre_caption, self.max_words)[0],
                "label": VE_LABELS[label]}

    def __getitem__(self, i):
        (image,), (sentence,) = self.load(i, self.items[i]["sentence"])
        return image, sentence, self.items[i]["label"]


# -----------------------------------------------------------------------------
# Collate


def collate(batch, tokenizer, max_len):
    """Batch of sample tuples -> flat tuple, field by field: images stacked (B, 3, H, W); a text
    becomes input_ids, attention_mask (B, L); ints become a LongTensor (B,); a list of texts per
    sample (VQA answers) becomes ids, mask over all of them (sum n, L) and the counts n (B,); a
    list of floats per sample (VQA weights) becomes one FloatTensor (sum n,)."""
    out = []
    for column in zip(*batch):
        first = column[0]
        if torch.is_tensor(first):
            out.append(torch.stack(column))
        elif isinstance(first, str):
            out += tokenizer(list(column), max_len)
        elif isinstance(first, int):
            out.append(torch.tensor(column, dtype=torch.long))
        elif first and isinstance(first[0], str):
            out += tokenizer([t for texts in column for t in texts], max_len)
            out.append(torch.tensor([len(texts) for texts in column]))
        else:
            out.append(torch.tensor([x for xs in column for x in xs], dtype=torch.float))
    return tuple(out)


def make_collate(tokenizer, max_len):
    """collate_fn for any dataset here; tokenizer(texts, max_len) -> (ids, mask). A partial of a
    module function, so DataLoader workers can pickle it."""
    return partial(collate, tokenizer=tokenizer, max_len=max_len)
