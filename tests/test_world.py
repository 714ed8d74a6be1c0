"""world.py: determinism, split separation, truth of every caption, question, statement and
hypothesis (checked by a parser of our own against the scene objects, not by the generator's
code), masks against pixels, the vocabulary, and that world.py imports nothing of the project."""
import ast
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import world
from data import pre_caption, swap_left_right
from tokenizer import Tokenizer
from world import World, parse_world_path, render_path, world_answer_list, world_entries

# -----------------------------------------------------------------------------
# An independent reader of the world's language. Positions come from the object centres
# (thirds of the image), relations from centre differences, counts from the object list.

SHAPES = "circle|square|triangle|cross|ring|star"
COLOURS = "red|green|blue|yellow|purple|orange|white"
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross",
          "rings": "ring", "stars": "star"}
NUM = {w: i for i, w in enumerate("zero one two three four five six seven eight".split())}
OBJ = rf"(?:(small|large) )?(?:({COLOURS}) )?({SHAPES})"
REGION = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0),
          "center": (1, 1), "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1),
          "bottom right": (2, 2)}


def third(v):
    return 0 if v < 1 / 3 else 1 if v < 2 / 3 else 2


def region_of(o):
    return (third(o.cy), third(o.cx))


def in_region(o, name, strict):
    """strict: the exact cell; lenient: only what the words say ('top': any top-row cell)."""
    if strict:
        return region_of(o) == REGION[name]
    row = {"top": 0, "bottom": 2}.get(name.split()[0])
    col = {"left": 0, "right": 2}.get(name.split()[-1])
    return (row is None or third(o.cy) == row) and (col is None or third(o.cx) == col) and \
        (name != "center" or region_of(o) == (1, 1))


def fits(o, size, colour, shape):
    return (size in (None, o.size)) and (colour in (None, o.colour)) and o.shape == shape


def caption_truth(text, objs, margin=0.15, strict=True):
    """Truth of a caption (a sentence of the world's caption grammar) about a list of objects.
    Relations need the centres `margin` apart; returns None for a sentence outside the grammar."""
    m = re.fullmatch(rf"an? {OBJ}(?: (?:at|on|in) the ({'|'.join(REGION)}))?", text)
    if m:
        size, colour, shape, where = m.groups()
        return any(fits(o, size, colour, shape) and (where is None or in_region(o, where, strict))
                   for o in objs)
    m = re.fullmatch(rf"an? {OBJ} (to the left of|to the right of|above|below) an? {OBJ}", text)
    if m:
        s1, c1, h1, rel, s2, c2, h2 = m.groups()
        test = {"to the left of": lambda a, b: b.cx - a.cx > margin,
                "to the right of": lambda a, b: a.cx - b.cx > margin,
                "above": lambda a, b: b.cy - a.cy > margin,
                "below": lambda a, b: a.cy - b.cy > margin}[rel]
        return any(fits(a, s1, c1, h1) and fits(b, s2, c2, h2) and a is not b and test(a, b)
                   for a in objs for b in objs)
    m = re.fullmatch(rf"there are (\w+) (?:({COLOURS}) )?(objects|{'|'.join(PLURAL)})", text)
    if m:
        n, colour, noun = m.groups()
        return NUM[n] == sum((colour is None or o.colour == colour) and
                             (noun == "objects" or o.shape == PLURAL[noun]) for o in objs)
    return None


def mirrored(objs):
    return [world.Obj(o.shape, o.colour, o.size, 1 - o.cx, o.cy) for o in objs]


WORLD = World(0)
SCENES = [WORLD.scene(split, i) for split in world.SPLITS for i in range(70)]    # ~200 scenes


# -----------------------------------------------------------------------------
# the world

def test_scenes_and_pixels_are_deterministic():
    for split, i in [("train", 0), ("val", 5), ("test", 123)]:
        a, b, c = WORLD.scene(split, i), WORLD.scene(split, i), World(0).scene(split, i)
        assert a.canonical() == b.canonical() == c.canonical()
        assert a.objects == c.objects
        pix = np.asarray(WORLD.render(a, 64))
        assert np.array_equal(pix, np.asarray(World(0).render(c, 64)))
        assert np.array_equal(np.asarray(render_path(WORLD.path(split, i))),
                              np.asarray(World(0).render(c, world.WORLD_RES)))
        assert WORLD.captions(a) == World(0).captions(c)
        assert WORLD.questions(a) == World(0).questions(c)
    # different index or seed: a different picture
    images = {np.asarray(WORLD.render(WORLD.scene("train", i), 32)).tobytes() for i in range(20)}
    assert len(images) == 20
    assert not np.array_equal(np.asarray(WORLD.render(WORLD.scene("train", 0), 32)),
                              np.asarray(World(1).render(World(1).scene("train", 0), 32)))


def test_no_scene_in_two_splits():
    for seed in (0, 1):
        w = World(seed)
        seen = {s: {w.scene(s, i).canonical() for i in range(300)} for s in world.SPLITS}
        assert not seen["train"] & seen["val"]
        assert not seen["train"] & seen["test"]
        assert not seen["val"] & seen["test"]
    # nor across seeds: the split of a composition does not depend on the seed
    test1 = {World(1).scene("test", i).canonical() for i in range(300)}
    assert not test1 & {World(0).scene("train", i).canonical() for i in range(300)}


def test_scene_layout():
    for s in SCENES:
        assert 2 <= len(s.objects) <= 4
        assert len({(o.shape, o.colour) for o in s.objects}) == len(s.objects)
        assert len({region_of(o) for o in s.objects}) == len(s.objects)    # one object per cell


def test_captions_are_true_and_name_their_objects():
    kinds = {"object": 0, "relation": 0, "count": 0}
    for s in SCENES:
        caps = WORLD.captions(s)
        assert len(caps) == world.CAPTIONS_PER_IMAGE == len({c for c, _ in caps})
        assert any(len(idx) < len(s.objects) for _, idx in caps)     # only part of the scene
        for text, idx in WORLD.captions(s, n=None):
            assert caption_truth(text, s.objects) is True, (text, s.objects)
            assert caption_truth(text, [s.objects[i] for i in idx]) is True, (text, idx)
            if text.startswith("there are"):
                kinds["count"] += 1
                rest = [o for i, o in enumerate(s.objects) if i not in idx]
                assert caption_truth(text.replace(text.split()[2], "zero"), rest), (text, idx)
            elif len(idx) == 2:
                kinds["relation"] += 1
            else:
                kinds["object"] += 1
        # a mirrored picture with left/right swapped in the text: still true
        for text, _ in caps:
            assert caption_truth(swap_left_right(text), mirrored(s.objects)) is True
    assert min(kinds.values()) > 50


def test_articles():
    texts = [c for s in SCENES[:60] for c, _ in WORLD.captions(s, n=None)]
    texts += [e["sentence"] for task in ("nlvr", "ve") for e in world_entries(task, "train", 30)]
    for t in texts:
        assert not re.search(r"\ba [aeiou]", t) and not re.search(r"\ban [^aeiou]", t), t


def test_masks_match_pixels_and_sizes():
    far = []
    for s in SCENES[:80]:
        for res in (64, 224):
            pix = np.asarray(WORLD.render(s, res)).astype(int)
            masks = WORLD.masks(s, res)
            assert masks.shape == (len(s.objects), res, res)
            assert masks.sum(0).max() == 1                     # disjoint
            for o, m in zip(s.objects, masks):
                assert (pix[m] == world.COLOURS[o.colour]).all()
                rows, cols = np.nonzero(m)
                extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
                if res == 64:
                    assert (10 if o.size == "small" else 16) <= extent <= 20, (o, extent)
                    assert m.sum() >= 25
            back = pix[~masks.any(0)]
            # the background stands apart from every object colour and is not blank
            far.append(min(np.abs(back - c).sum(1).min() for c in world.COLOURS.values()))
            assert back.std(0).mean() > 3
    assert min(far) > 60


def test_render_any_resolution():
    s = WORLD.scene("val", 3)
    for res in (64, 224, 256):
        image = WORLD.render(s, res)
        assert image.mode == "RGB" and image.size == (res, res)
    # the same picture: the 256 px render shrunk is close to the 64 px render
    small = np.asarray(WORLD.render(s, 256).resize((64, 64), Image.BOX)).astype(float)
    assert np.abs(small - np.asarray(WORLD.render(s, 64))).mean() < 8


def test_vocabulary_covers_everything_said():
    vocab = set(World.vocabulary())
    words = set()
    for task in ("pretrain", "retrieval", "vqa", "nlvr", "ve"):
        for e in world_entries(task, "val", 40):
            for key in ("caption", "question", "sentence", "answer"):
                texts = e.get(key, [])
                for t in [texts] if isinstance(texts, str) else texts:
                    words.update(pre_caption(t).split())
    assert words <= vocab, words - vocab
    assert set(w for a in world_answer_list() for w in a.split()) <= vocab
    assert len(vocab) < 100


def test_vocabulary_cleaned_as_the_datasets_clean(monkeypatch):
    # world.py splits words on its own; the datasets' cleaner must find the same words
    for text in ["A man's DOG-house/yard (big)!", "is the {a} above the {b}?", "  x;y~z  "]:
        assert world._words(text) == pre_caption(re.sub(r"\{\w+\}", " ", text)).split()
    ours = World.vocabulary()
    monkeypatch.setattr(world, "_words",
                        lambda t: pre_caption(re.sub(r"\{\w+\}", " ", t)).split())
    assert World.vocabulary() == ours


def test_world_imports_nothing_of_the_project():
    root = Path(world.__file__).parent
    project = {p.stem for p in root.glob("*.py")}
    tree = ast.parse((root / "world.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert {"numpy", "PIL"} <= imported and not imported & project, imported & project


def test_vocabulary_with_the_real_tokenizer():
    tok = Tokenizer.build([" ".join(World.vocabulary())])
    sentences = [e["sentence"] for e in world_entries("ve", "test", 20)]
    ids, mask = tok(sentences, 30)
    assert not (ids == tok.unk_id).any()


# -----------------------------------------------------------------------------
# downstream labels, re-derived from the scene

def vqa_answer(question, objs):
    q = question.rstrip("?")
    find = lambda c, s: [o for o in objs if o.colour == c and o.shape == s]
    if m := re.fullmatch(f"what color is the ({SHAPES})", q):
        (o,) = [o for o in objs if o.shape == m[1]]
        return o.colour
    if m := re.fullmatch(f"what shape is the ({COLOURS}) object", q):
        (o,) = [o for o in objs if o.colour == m[1]]
        return o.shape
    if q == "how many objects are there":
        return list(NUM)[len(objs)]
    if m := re.fullmatch(f"is there an? ({COLOURS}) ({SHAPES})", q):
        return "yes" if find(m[1], m[2]) else "no"
    if m := re.fullmatch(f"(where|what size) is the ({COLOURS}) ({SHAPES})", q):
        (o,) = find(m[2], m[3])
        return o.size if m[1] == "what size" else {v: k for k, v in REGION.items()}[region_of(o)]
    if m := re.fullmatch(f"is the ({COLOURS}) ({SHAPES}) (to the left of|above) "
                         f"the ({COLOURS}) ({SHAPES})", q):
        (a,), (b,) = find(m[1], m[2]), find(m[4], m[5])
        d = b.cx - a.cx if m[3] == "to the left of" else b.cy - a.cy
        assert abs(d) > 0.15
        return "yes" if d > 0 else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_answers_correct():
    entries = world_entries("vqa", "train", 100)
    assert len(entries) == 100 * world.QUESTIONS_PER_IMAGE
    assert len({e["question_id"] for e in entries}) == len(entries)
    answers = set(world_answer_list())
    kinds = set()
    for e in entries:
        _, split, index = parse_world_path(e["image"])
        objs = WORLD.scene(split, index).objects
        assert e["answer"] == [vqa_answer(e["question"], objs)] * 10, e
        assert e["answer"][0] in answers
        kinds.add(" ".join(e["question"].split()[:2]))
    yes_no = [e["answer"][0] for e in entries if e["answer"][0] in ("yes", "no")]
    assert 0.35 < yes_no.count("yes") / len(yes_no) < 0.65
    assert len(kinds) >= 6


def nlvr_truth(sentence, a, b):
    has = lambda objs, c, s: any(c in (None, o.colour) and s in (None, o.shape) for o in objs)
    if m := re.fullmatch(f"there is an? ({COLOURS}) ({SHAPES}) in exactly one image", sentence):
        return has(a, m[1], m[2]) != has(b, m[1], m[2])
    if m := re.fullmatch(f"both images contain an? (?:({COLOURS}) )?({SHAPES}|object)", sentence):
        shape = None if m[2] == "object" else m[2]
        return has(a, m[1], shape) and has(b, m[1], shape)
    if m := re.fullmatch(f"neither image contains an? ({COLOURS}) ({SHAPES})", sentence):
        return not has(a, m[1], m[2]) and not has(b, m[1], m[2])
    if m := re.fullmatch(f"at least one image contains an? ({COLOURS}) ({SHAPES})", sentence):
        return has(a, m[1], m[2]) or has(b, m[1], m[2])
    if m := re.fullmatch(f"the (left|right) image contains an? ({COLOURS}) ({SHAPES})", sentence):
        return has(a if m[1] == "left" else b, m[2], m[3])
    if m := re.fullmatch(r"there are (\w+) objects in total", sentence):
        return len(a) + len(b) == NUM[m[1]]
    if m := re.fullmatch(f"the (left|right) image contains (\\w+) (?:({COLOURS}) )?objects",
                         sentence):
        objs = a if m[1] == "left" else b
        return sum(m[3] in (None, o.colour) for o in objs) == NUM[m[2]]
    raise AssertionError(f"unknown statement {sentence!r}")


def test_nlvr_labels_correct_and_balanced():
    entries = world_entries("nlvr", "val", 100)
    assert len(entries) == 200 and sum(e["label"] for e in entries) == 100
    for e in entries:
        scenes = [WORLD.scene(*parse_world_path(p)[1:]) for p in e["images"]]
        assert nlvr_truth(e["sentence"], scenes[0].objects, scenes[1].objects) == e["label"], e
    assert len({e["sentence"].split()[1] for e in entries}) >= 5     # varied statements
    # counts said of the left or the right image, of all objects or of one colour
    counts = [e["sentence"] for e in entries if re.search(r"image contains \w+ (\w+ )?objects",
                                                          e["sentence"])]
    assert {s.split()[1] for s in counts} == {"left", "right"} and len(counts) >= 10
    assert any(s.split()[5] in COLOURS.split("|") for s in counts)


def test_nlvr_numbers_give_no_label_away():
    """Each statement with its colour, shape and side words blanked but its number kept is true as
    often as false: a reader of the text alone learns nothing from the numbers (false totals drawn
    uniformly from 4-8 made "there are six objects in total" true 67% of the time)."""
    scenes = [WORLD.scene("train", i) for i in range(10000)]
    said = {}
    for a, b in zip(scenes[::2], scenes[1::2]):
        for sentence, label in WORLD.statements(a, b):
            if re.fullmatch(r"the \w+ image contains \w+ (\w+ )?objects", sentence):
                # a count is true of exactly one image: said of the other, it flips
                other = re.sub("left|right", lambda s: {"left": "right", "right": "left"}[s[0]],
                               sentence, count=1)
                assert nlvr_truth(other, a.objects, b.objects) != label, sentence
            for words, blank in ((COLOURS, "C"), (SHAPES, "S"), ("left|right", "L")):
                sentence = re.sub(rf"\b({words})\b", blank, sentence)
            said.setdefault(sentence, []).append(label)
    rates = {k: np.mean(v) for k, v in said.items() if len(v) >= 150}
    assert sum(any(w in k.split() for w in NUM) for k in rates) >= 8     # numbers, often said
    assert all(abs(r - 0.5) < 0.07 for r in rates.values()), rates


def test_ve_labels_correct_and_balanced():
    entries = world_entries("ve", "test", 100)
    labels = [e["label"] for e in entries]
    assert [labels.count(k) for k in ("entailment", "neutral", "contradiction")] == [100] * 3
    for e in entries:
        objs = WORLD.scene(*parse_world_path(e["image"])[1:]).objects
        s = e["sentence"]
        if e["label"] == "entailment":
            assert caption_truth(s, objs) is True, e
        elif e["label"] == "contradiction":   # false even with no margin and lenient places
            assert caption_truth(s, objs, margin=0.0, strict=False) is False, e
        else:
            m = re.fullmatch(f"the ({COLOURS}) ({SHAPES}) is (?:made of )?\\w+", s)
            assert m and any(o.colour == m[1] and o.shape == m[2] for o in objs), e
            assert caption_truth(s, objs) is None


# -----------------------------------------------------------------------------
# the truth of any caption about any scene (retrieval's oracle), and the clutter variant

CLUTTER = World(0, "clutter")


def blind_accuracy(task, n_train, n_test):
    """Test accuracy of a reader that never looks at the images: the majority label, on the
    training split, of each sentence with its colour, shape, number, size and place words blanked
    (its template)."""
    blanks = [(COLOURS, "C"), (SHAPES, "S"), ("|".join(NUM), "N"), ("small|large", "Z"),
              ("|".join(sorted(world.WHERE.values(), key=len, reverse=True)), "W")]
    def template(sentence):
        for words, blank in blanks:
            sentence = re.sub(rf"\b({words})\b", blank, sentence)
        return sentence
    votes = {}
    for e in world_entries(task, "train", n_train):
        votes.setdefault(template(e["sentence"]), []).append(str(e["label"]))
    majority = {t: max(set(v), key=v.count) for t, v in votes.items()}
    test = world_entries(task, "test", n_test)
    return np.mean([majority.get(template(e["sentence"])) == str(e["label"]) for e in test])


def test_ve_and_nlvr_need_the_images():
    """The template of a hypothesis or statement must not give its label away: SNLI-VE's neutral
    hypotheses are told by their words (a third of the labels), the rest is a coin toss without
    the image; NLVR2's true and false statements share their template. (Entailments and
    statements drawn from every template let this reader score 0.86 and 0.64.)"""
    assert blind_accuracy("ve", 800, 200) < 0.72
    assert blind_accuracy("nlvr", 1200, 300) < 0.58


def test_caption_truth_agrees_with_an_independent_reader():
    for w in (WORLD, CLUTTER):
        entries = world_entries("retrieval", "test", 25, variant=w.variant)
        images = [e["image"] for e in entries]
        texts = [c for e in entries for c in e["caption"]]
        truth = world.caption_truth(images, texts)
        assert truth.shape == (25, 125)
        for i, path in enumerate(images):
            scene = w.scene("test", int(path.rsplit("/", 1)[1]))
            assert truth[i, 5 * i:5 * i + 5].all()                          # its own captions
            for t, text in enumerate(texts):
                assert truth[i, t] == caption_truth(text, scene.objects), (text, scene.objects)
        # many captions are true of other images too, none of all
        assert 125 < truth.sum() < 25 * 125 / 2


def test_caption_truth_by_hand():
    big_red_circle = world.Obj("circle", "red", "large", 0.2, 0.5)      # left
    small_blue_star = world.Obj("star", "blue", "small", 0.8, 0.2)      # top right
    scene = world.Scene(0, "test", 0, (big_red_circle, small_blue_star), None, None)
    true = WORLD.true_captions(scene)
    for text in ("a large red circle", "a red circle on the left", "a small star at the top right",
                 "a red circle to the left of a blue star", "a blue star above a red circle",
                 "there are two objects"):
        assert text in true, text
    for text in ("a small red circle", "a red circle at the top left", "there are three objects",
                 "a blue star to the left of a red circle", "a red circle above a blue star",
                 "there are two circles"):
        assert text not in true, text


def test_clutter_variant():
    scenes = [CLUTTER.scene(split, i) for split in world.SPLITS for i in range(15)]
    for s in scenes:
        assert 5 <= len(s.objects) <= 7 and {o.size for o in s.objects} == {"small"}
        cells = {(int(o.cy * 4), int(o.cx * 4)) for o in s.objects}
        assert len(cells) == len(s.objects)                              # one per cell of 4x4
        assert len({(o.shape, o.colour) for o in s.objects}) == len(s.objects)
        for text, idx in CLUTTER.captions(s, n=None):
            assert len(idx) in (1, 2) and not text.startswith("there are")
            assert caption_truth(text, s.objects) is True, text
            if len(idx) == 1:                       # names its object by colour and shape
                o = s.objects[idx[0]]
                assert f"{o.colour} {o.shape}" in text
        masks = CLUTTER.masks(s, 64)
        assert masks.sum(0).max() == 1
        for o, m in zip(s.objects, masks):         # inside its 16 px cell: a 2x2 block of patches
            rows, cols = np.nonzero(m)
            r, c = int(o.cy * 4), int(o.cx * 4)
            assert 16 * r <= rows.min() and rows.max() < 16 * r + 16
            assert 16 * c <= cols.min() and cols.max() < 16 * c + 16
    # paths name the variant; the default world's paths are unchanged
    path = CLUTTER.path("val", 7)
    assert path == "world:clutter:0/val/7" and WORLD.path("val", 7) == "world:0/val/7"
    w, split, index = world.world_of_path(path)
    assert (w.variant, w.seed, split, index) == ("clutter", 0, "val", 7)
    assert parse_world_path(path) == (0, "val", 7)
    assert np.array_equal(np.asarray(render_path(path)),
                          np.asarray(CLUTTER.render(CLUTTER.scene("val", 7), world.WORLD_RES)))
    assert CLUTTER.scene("val", 7).canonical() != WORLD.scene("val", 7).canonical()
    for bad in ("world:cluttered:0/val/7", "world:clutter/val/7"):
        with pytest.raises(ValueError):
            world.world_of_path(bad)


def test_caption_template_names_the_template_of_every_caption():
    templates = world.CAPTION_TEMPLATES
    for variant in world.VARIANTS:
        w = world.World(0, variant)
        seen = {world.caption_template(text) for i in range(40)
                for text, _ in w.captions(w.scene("train", i), None)}
        assert None not in seen and seen <= set(templates)
        if variant == "default":
            assert seen == set(templates)
    for text, template in [("an orange star above a red ring", "a {a} above a {b}"),
                           ("a white cross to the right of an orange ring",
                            "a {a} to the right of a {b}"),
                           ("a large red ring", "a {size} {colour} {shape}"),
                           ("a red ring at the top left", "a {colour} {shape} {where}"),
                           ("a small star in the center", "a {size} {shape} {where}"),
                           ("there are two crosses", "there are {n} {shapes}"),
                           ("there are two red objects", "there are {n} {colour} objects"),
                           ("there are four objects", "there are {n} objects"),
                           ("a red dog", None), ("a large red ring on the top", None),
                           ("there are two cross", None)]:
        assert world.caption_template(text) == template, text
