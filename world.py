"""The embedded world: a generated demo dataset, so that everything runs with no download.

World(seed) draws scenes of 2-4 flat-coloured objects (6 shapes x 7 colours x 2 sizes) on a 3x3
grid over a textured background (the "clutter" variant: 5-7 small ones on a 4x4 grid), made
on the fly from (seed, split, index): the same scene and the same pixels on every machine, and
a composition of objects belongs to one split only.
Captions describe a part of the scene (one object, or two and their relation, or a count), so
the text says which patches matter; every downstream task (retrieval, VQA, NLVR2, SNLI-VE,
captioning) and per-object pixel masks come from the same scenes.

world_entries gives a task's entries in the JSON layout of the real dataset, with images named
"world:<seed>/<split>/<index>"; render_path draws such an image, so the datasets read the world
exactly as they read COCO files:

    entries = world_entries("pretrain", "train", 1000)
    image = render_path(entries[0]["image"])          # PIL RGB, WORLD_RES x WORLD_RES
"""

import colorsys
import re
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

# -----------------------------------------------------------------------------
# What exists in the world and every sentence template it can say.
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
CAPTION_TEMPLATES = (*CAPTIONS["object"], *(v for k, v in CAPTIONS.items() if k != "object"))
QUESTIONS = {
    "colour": "what color is the {shape}?", "shape": "what shape is the {colour} object?",
    "count": "how many objects are there?", "exists": "is there a {colour} {shape}?",
    "where": "where is the {colour} {shape}?", "size": "what size is the {colour} {shape}?",
    "left": "is the {a} to the left of the {b}?", "above": "is the {a} above the {b}?",
}
QUESTIONS_PER_IMAGE = 4
CAPTIONS_PER_IMAGE = 5
# World variants: "default" above; "clutter" tests text-guided pruning: 5-7 small objects on a
# 4x4 grid (at 64 px, patch 8, each object within a 2x2 block of patches), and captions that
# name one object by colour, shape and place, or two and their relation (no counts, which name
# every object, and no sizes, all being small)
VARIANTS = {
    "default": dict(grid=3, count=(2, 4), sizes=("small", "large"), counts=True, objects=(0, 1, 2)),
    "clutter": dict(grid=4, count=(5, 7), sizes=("small",), counts=False, objects=(1,)),
}
MAX_OBJECTS = max(v["count"][1] for v in VARIANTS.values())
# the classes of the object labels (object_targets): size, colour, shape, cell of the 3x3 grid
OBJECT_CLASSES = (len(RADIUS), len(COLOURS), len(SHAPES), len(WHERE))


def _say(template, **slots):
    """Fill a template and fix the article: 'a orange star' -> 'an orange star'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(**slots))


def _words(text):
    """The words of a text as the datasets clean a caption (lower case, ,.'!?"()*#:;~ dropped,
    '-' and '/' split words), template slots such as {colour} left out."""
    text = re.sub(r"[,.'!?\"()*#:;~]", "", re.sub(r"\{\w+\}", " ", text).lower())
    return text.replace("-", " ").replace("/", " ").split()


def _has(objects, colour=None, shape=None):
    return any(colour in (None, o.colour) and shape in (None, o.shape) for o in objects)


# NLVR2-style statements about a pair of object lists: x is the image the statement names (the
# {side} slot, else the left one), y the other; n is the total count, k the count of objects and
# m of {colour} objects in one image. Each has slots, so one template can be said true and false
# of the same pair (World.statements)
STATEMENTS = (
    ("there is a {colour} {shape} in exactly one image",
     lambda x, y, c, s, n, k, m: _has(x, c, s) != _has(y, c, s)),
    ("both images contain a {colour} {shape}",
     lambda x, y, c, s, n, k, m: _has(x, c, s) and _has(y, c, s)),
    ("both images contain a {shape}",
     lambda x, y, c, s, n, k, m: _has(x, None, s) and _has(y, None, s)),
    ("both images contain a {colour} object",
     lambda x, y, c, s, n, k, m: _has(x, c, None) and _has(y, c, None)),
    ("neither image contains a {colour} {shape}",
     lambda x, y, c, s, n, k, m: not _has(x, c, s) and not _has(y, c, s)),
    ("at least one image contains a {colour} {shape}",
     lambda x, y, c, s, n, k, m: _has(x, c, s) or _has(y, c, s)),
    ("the {side} image contains a {colour} {shape}", lambda x, y, c, s, n, k, m: _has(x, c, s)),
    ("there are {n} objects in total", lambda x, y, c, s, n, k, m: len(x) + len(y) == n),
    ("the {side} image contains {k} objects", lambda x, y, c, s, n, k, m: len(x) == k),
    ("the {side} image contains {m} {colour} objects",
     lambda x, y, c, s, n, k, m: sum(o.colour == c for o in x) == m),
)
# SNLI-VE neutral hypotheses: properties no picture of the world can show or deny
NEUTRAL = ("the {a} is made of {material}", "the {a} is {quality}")
MATERIALS = ("wood", "metal", "glass", "paper", "plastic", "stone")
QUALITIES = ("heavy", "warm", "cold", "wet", "old", "fragile")


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

    def __init__(self, seed=0, variant="default"):
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"world seed must be a non-negative int, got {seed!r}")
        if variant not in VARIANTS:
            raise ValueError(f"world variant must be one of {list(VARIANTS)}, got {variant!r}")
        self.seed, self.variant, self.spec = seed, variant, VARIANTS[variant]

    def path(self, split, index):
        prefix = "" if self.variant == "default" else self.variant + ":"
        return f"world:{prefix}{self.seed}/{split}/{index}"

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

    def _objects(self, rng):
        """2-4 objects (the variant's count) in distinct cells of a 3x3 grid (the variant's), no
        two with the same (shape, colour)."""
        (low, high), g, sizes = self.spec["count"], self.spec["grid"], self.spec["sizes"]
        k = int(rng.integers(low, high + 1))
        cells = rng.choice(g * g, k, replace=False)
        kinds = rng.choice(len(SHAPES) * len(COLOURS), k, replace=False)
        objects = []
        for cell, kind in zip(cells, kinds):
            size = sizes[rng.integers(len(sizes))]
            jitter = 1 / (2 * g) - RADIUS[size] - 0.008      # keeps the object inside its cell
            cx, cy = (np.array([cell % g, cell // g]) + 0.5) / g + rng.uniform(-jitter, jitter, 2)
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

    def object_targets(self, scene, box, size, patch, mirrored=False):
        """For the pre-training objects loss: (MAX_OBJECTS, (size/patch)^2) float, the share of
        each patch that each object covers once the WORLD_RES image is mirrored (if mirrored),
        then cut to box (left, top, right, bottom) and resized to size x size, as the image;
        (MAX_OBJECTS, 4) int64, each object's size, colour, shape and cell (row * 3 + column of
        the caption grid, mirrored with the image), -1 past the last object."""
        g = size // patch
        cover = np.zeros((MAX_OBJECTS, g * g), np.float32)
        labels = np.full((MAX_OBJECTS, 4), -1, np.int64)
        for k, (o, m) in enumerate(zip(scene.objects, self.masks(scene, WORLD_RES))):
            mask = Image.fromarray(m.astype(np.float32))                    # mode "F"
            if mirrored:
                mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = np.asarray(mask.resize((size, size), Image.Resampling.BILINEAR, box=box))
            cover[k] = patch_share(mask, patch)                                    # (g*g,)
            row, col = o.cell
            labels[k] = (list(RADIUS).index(o.size), list(COLOURS).index(o.colour),
                         SHAPES.index(o.shape), 3 * row + (2 - col if mirrored else col))
        return cover, labels

    # --- text

    def captions(self, scene, n=CAPTIONS_PER_IMAGE):
        """n distinct true captions (all of them if n is None) as (text, indices of the objects it
        names): one object, a relation of two, or a count. Object, relation and count captions
        take turns, so a scene's captions describe different parts of it."""
        objs, spec = scene.objects, self.spec
        single, relation, count = [], [], []
        for i, o in enumerate(objs):
            for template in (CAPTIONS["object"][t] for t in spec["objects"]):
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
        if spec["counts"]:
            count.append((_say(CAPTIONS["count"], n=NUMBERS[len(objs)]), tuple(range(len(objs)))))
        for key, attr, fill in (("count_shape", "shape", lambda v: {"shapes": PLURALS[v]}),
                                ("count_colour", "colour", lambda v: {"colour": v})):
            for value, k in Counter(getattr(o, attr) for o in objs).items():
                if k > 1 and spec["counts"]:
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
        """[(true statement, True), (false statement, False)] about the pair (left, right), both
        said from one template: the template alone then tells nothing of the label, so the task
        cannot be solved from the text (with templates drawn apart, it could: 64% of the labels
        followed from the template, which is what the models had learnt)."""
        a, b = scene_a.objects, scene_b.objects
        rng = _rng(scene_a.seed, scene_a.split, scene_a.index, scene_b.index, "nlvr")
        low, high = self.spec["count"]                   # how many objects a scene draws
        while True:    # rejection: a template both true and false of the pair within 30 draws
            template, truth = _pick(rng, STATEMENTS)
            found = {}
            for _ in range(30):
                o = _pick(rng, a + b)                   # mostly talk about what is there
                c = o.colour if rng.random() < 0.7 else _pick(rng, list(COLOURS))
                s = o.shape if rng.random() < 0.7 else _pick(rng, SHAPES)
                # numbers that never give the label away: k and m count an image drawn at
                # random, said of it (true) or of the other image (false) as often; n, the total,
                # is that image's count plus a count drawn as a scene draws its own, so every
                # total is true a third of the time (of the draws), whatever the number
                z = _pick(rng, (a, b))
                k, m = len(z), sum(p.colour == c for p in z)
                n = len(z) + int(rng.integers(low, high + 1))
                side = _pick(rng, ("left", "right"))
                x, y = (a, b) if side == "left" else (b, a)
                if "{m}" in template and sum(p.colour == c for p in a + b) == 2 * m:
                    continue    # as many of colour c in both images: true of either side
                found.setdefault(truth(x, y, c, s, n, k, m),
                                 _say(template, colour=c, shape=s, side=side, n=NUMBERS[n],
                                      k=NUMBERS[k], m=NUMBERS[m]))
                if len(found) == 2:
                    return [(found[True], True), (found[False], False)]

    def hypotheses(self, scene):
        """One (hypothesis, label) per SNLI-VE label. Entailment and contradiction are a minimal
        pair of one template: a true caption of an object, a pair or the count, and the same
        caption made false (wrong colour, shape, size or place of that object, the relation
        reversed, a wrong count); neutral is a property the pictures never show. (Entailments
        drawn from every template let the template give away 86% of the labels.)"""
        objs, rng = scene.objects, _rng(scene.seed, scene.split, scene.index, "ve")
        o = _pick(rng, objs)
        other_size = "large" if o.size == "small" else "small"
        colours = [c for c in COLOURS if not _has(objs, c, o.shape)]
        shapes = [s for s in SHAPES if not _has(objs, o.colour, s)]
        cells = [cell for cell in WHERE if cell[0] != o.cell[0] and cell[1] != o.cell[1]]
        counts = [k for k in range(2, 6) if k != len(objs)]
        pairs = [(p, q) for p in objs for q in objs if q.cx - p.cx > MARGIN]
        a_size, a_colour_shape, _ = CAPTIONS["object"]
        o_size = _say(a_size, size=o.size, colour=o.colour, shape=o.shape)
        o_place = _say(a_colour_shape, colour=o.colour, shape=o.shape, where=WHERE[o.cell])
        minimal = [   # (true, false)
            (o_size, _say(a_size, size=o.size, colour=_pick(rng, colours), shape=o.shape)),
            (o_place, _say(a_colour_shape, colour=o.colour, shape=_pick(rng, shapes),
                           where=WHERE[o.cell])),
            (o_size, _say(a_size, size=other_size, colour=o.colour, shape=o.shape)),
            (o_place, _say(a_colour_shape, colour=o.colour, shape=o.shape,
                           where=WHERE[_pick(rng, cells)])),
            (_say(CAPTIONS["count"], n=NUMBERS[len(objs)]),
             _say(CAPTIONS["count"], n=NUMBERS[_pick(rng, counts)])),
        ]
        if pairs:   # p is left of q: "q to the right of p", and reversed
            p, q = _pick(rng, pairs)
            minimal.append((_say(CAPTIONS["right"], a=q.name, b=p.name),
                           _say(CAPTIONS["right"], a=p.name, b=q.name)))
        neutral = _say(_pick(rng, NEUTRAL), a=o.name, material=_pick(rng, MATERIALS),
                       quality=_pick(rng, QUALITIES))
        true, false = _pick(rng, minimal)
        return [(true, "entailment"), (neutral, "neutral"), (false, "contradiction")]

    def true_captions(self, scene):
        """Every caption of this world (variant) that is true of the scene: captions(scene, None)
        says every true sentence of the templates the variant uses, so a caption said of any of
        its scenes is true of this one exactly when it is in this set."""
        return {text for text, _ in self.captions(scene, n=None)}

    @staticmethod
    def vocabulary():
        """Every word any generator can emit (captions, questions, answers, statements,
        hypotheses), sorted: a tokenizer built from it never meets an unknown world word."""
        texts = [*CAPTION_TEMPLATES,
                 *QUESTIONS.values(), *(t for t, _ in STATEMENTS), *NEUTRAL, *SHAPES,
                 *PLURALS.values(), *COLOURS, *RADIUS, *NUMBERS, *WHERE.values(), *MATERIALS,
                 *QUALITIES, "yes no an"]
        return sorted({w for t in texts for w in _words(t)})


def world_answer_list():
    """Every answer the world's VQA questions can have (the answer list of VQA fine-tuning)."""
    return ["yes", "no", *NUMBERS[2:5], *COLOURS, *SHAPES, *RADIUS, *map(_answer, WHERE)]


def world_entries(task, split, n, seed=0, variant="default"):
    """Entries of the world in the JSON layout of the real dataset of `task` (ALBEF/BLIP's).
    n is the number of scenes (images), or of image pairs for "nlvr". Per scene: "pretrain" one
    entry with CAPTIONS_PER_IMAGE captions; "retrieval"/"caption" one entry per caption with
    "image_id" for train, one entry with a caption list for val/test; "vqa" QUESTIONS_PER_IMAGE
    questions with 10 (identical) answers; "ve" one hypothesis per label; "nlvr" one true and
    one false statement about the scenes (2k, 2k+1)."""
    if task not in ("pretrain", "retrieval", "caption", "vqa", "ve", "nlvr"):
        raise ValueError(f"unknown task {task!r}: pretrain, retrieval, caption, vqa, ve or nlvr")
    world = World(seed, variant)
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


def patch_share(masks, patch_size):
    """Float pixel masks (..., H, W), numpy or torch -> (..., M): the share of each patch's
    pixels the mask covers, patches in the ViT's row-major order."""
    *lead, H, W = masks.shape
    p = patch_size
    return masks.reshape(*lead, H // p, p, W // p, p).mean((-3, -1)).reshape(*lead, -1)


# -----------------------------------------------------------------------------
# Image paths: how the datasets name a world image

# world images are drawn at this size and the transforms resize them like photos: twice the tiny
# preset's 64 px, so the random crop resamples a finer picture; 256 px cost three times as much
# per image (a fifth of the default run's step, in the main process)
WORLD_RES = 128
_WORLD_PATH = re.compile(rf"world:(?:({'|'.join(VARIANTS)}):)?(?:(\d+)/)?(train|val|test)/(\d+)")


def world_of_path(path):
    """"world:[<variant>:]<seed>/<split>/<index>" (variant "default" and seed 0 may be left
    out) -> (World, split, index)."""
    m = _WORLD_PATH.fullmatch(path)
    if m is None:
        raise ValueError(f"bad world image path {path!r}: expected "
                         f"world:[<variant>:]<seed>/<split>/<index>")
    return World(int(m.group(2) or 0), m.group(1) or "default"), m.group(3), int(m.group(4))


def parse_world_path(path):
    """A "world:" path -> (seed, split, index); world_of_path also gives the variant."""
    world, split, index = world_of_path(path)
    return world.seed, split, index


def render_path(path):
    """The PIL RGB image of a "world:" path, drawn at WORLD_RES."""
    world, split, index = world_of_path(path)
    return world.render(world.scene(split, index), WORLD_RES)


def _template_pattern(template):
    """A regular expression that matches exactly the sentences _say makes from the template:
    each slot one of its words, "a" also "an"."""
    words = {"size": list(RADIUS), "colour": list(COLOURS), "shape": list(SHAPES),
             "where": list(WHERE.values()), "n": list(NUMBERS), "shapes": list(PLURALS.values())}
    words["a"] = words["b"] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    parts = []
    for token in template.split(" "):
        slot = re.fullmatch(r"\{(\w+)\}", token)
        parts.append("(?:" + "|".join(words[slot.group(1)]) + ")" if slot else
                     "an?" if token == "a" else re.escape(token))
    return re.compile(" ".join(parts))


_TEMPLATE_PATTERNS = {template: _template_pattern(template) for template in CAPTION_TEMPLATES}


def caption_template(text):
    """The template (one of CAPTION_TEMPLATES, e.g. "a {size} {colour} {shape}") a caption of the
    world was said from, or None for a sentence no template makes."""
    return next((t for t, pattern in _TEMPLATE_PATTERNS.items() if pattern.fullmatch(text)), None)


def caption_truth(images, texts):
    """(len(images), len(texts)) bool numpy: whether each text, a caption of the images' world
    (as said or cleaned by data.pre_caption, which leaves them as they are), is true of each
    "world:" image. The ground truth of retrieval's oracle (metrics.oracle_recall)."""
    truth = np.zeros((len(images), len(texts)), bool)
    for i, path in enumerate(images):
        world, split, index = world_of_path(path)
        true = world.true_captions(world.scene(split, index))
        truth[i] = [t in true for t in texts]
    return truth
