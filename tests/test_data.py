"""data.py: caption cleaning, the embedded world (determinism, split separation, truth of every
caption, question, statement and hypothesis, checked by a parser of our own against the scene
objects, not by the generator's code), masks against pixels, the JSON datasets with their
errors, the flip, transforms and collate."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (CaptionDataset, NLVRDataset, PretrainDataset, RetrievalEvalDataset,
                  RetrievalTrainDataset, VEDataset, VQADataset, World, create_transform,
                  load_image, make_collate, pre_caption, pre_question, swap_left_right,
                  world_answer_list, world_entries)

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
    return [data.Obj(o.shape, o.colour, o.size, 1 - o.cx, o.cy) for o in objs]


WORLD = World(0)
SCENES = [WORLD.scene(split, i) for split in data.SPLITS for i in range(70)]    # ~200 scenes


# -----------------------------------------------------------------------------
# text cleaning

def test_pre_caption_as_albef():
    assert pre_caption("A man's  DOG (running)-on the beach!! #fun") == \
        "a mans dog running on the beach fun"
    assert pre_caption("  a/b   c;d~ \n") == "a b cd"
    assert pre_caption("<person> rides a bike") == "person rides a bike"
    long = " ".join(str(i) for i in range(50))
    assert pre_caption(long, max_words=30).split() == [str(i) for i in range(30)]
    assert pre_caption("?!.,") == ""
    # ALBEF's pre_question keeps inner runs of spaces and strips only on the right
    assert pre_question("What  COLOR is the cat's tail?") == "what  color is the cats tail"
    assert pre_question("is it red-ish? ") == "is it red ish"


def test_swap_left_right_whole_words_only():
    assert swap_left_right("a cat to the left of a dog, right?") == \
        "a cat to the right of a dog, left?"
    assert swap_left_right("leftover rights bright") == "leftover rights bright"
    assert swap_left_right(swap_left_right("top left and right")) == "top left and right"


# -----------------------------------------------------------------------------
# the world

def test_scenes_and_pixels_are_deterministic():
    for split, i in [("train", 0), ("val", 5), ("test", 123)]:
        a, b, c = WORLD.scene(split, i), WORLD.scene(split, i), World(0).scene(split, i)
        assert a.canonical() == b.canonical() == c.canonical()
        assert a.objects == c.objects
        pix = np.asarray(WORLD.render(a, 64))
        assert np.array_equal(pix, np.asarray(World(0).render(c, 64)))
        assert np.array_equal(np.asarray(load_image(WORLD.path(split, i))),
                              np.asarray(World(0).render(c, data.WORLD_RES)))
        assert WORLD.captions(a) == World(0).captions(c)
        assert WORLD.questions(a) == World(0).questions(c)
    # different index or seed: a different picture
    images = {np.asarray(WORLD.render(WORLD.scene("train", i), 32)).tobytes() for i in range(20)}
    assert len(images) == 20
    assert not np.array_equal(np.asarray(WORLD.render(WORLD.scene("train", 0), 32)),
                              np.asarray(World(1).render(World(1).scene("train", 0), 32)))


def test_no_scene_in_two_splits():
    for seed in (0, 1):
        world = World(seed)
        seen = {s: {world.scene(s, i).canonical() for i in range(300)} for s in data.SPLITS}
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
        assert len(caps) == data.CAPTIONS_PER_IMAGE == len({c for c, _ in caps})
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
                assert (pix[m] == data.COLOURS[o.colour]).all()
                rows, cols = np.nonzero(m)
                extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
                if res == 64:
                    assert (10 if o.size == "small" else 16) <= extent <= 20, (o, extent)
                    assert m.sum() >= 25
            back = pix[~masks.any(0)]
            # the background stands apart from every object colour and is not blank
            far.append(min(np.abs(back - c).sum(1).min() for c in data.COLOURS.values()))
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


def test_vocabulary_with_the_real_tokenizer():
    text_encoder = pytest.importorskip("text_encoder")
    tok = text_encoder.Tokenizer.build([" ".join(World.vocabulary())])
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
    assert len(entries) == 100 * data.QUESTIONS_PER_IMAGE
    assert len({e["question_id"] for e in entries}) == len(entries)
    answers = set(world_answer_list())
    kinds = set()
    for e in entries:
        _, split, index = data.parse_world_path(e["image"])
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
    if sentence == "the left image has more objects than the right image":
        return len(a) > len(b)
    if sentence == "both images have the same number of objects":
        return len(a) == len(b)
    if m := re.fullmatch(r"there are (\w+) objects in total", sentence):
        return len(a) + len(b) == NUM[m[1]]
    raise AssertionError(f"unknown statement {sentence!r}")


def test_nlvr_labels_correct_and_balanced():
    entries = world_entries("nlvr", "val", 100)
    assert len(entries) == 200 and sum(e["label"] for e in entries) == 100
    for e in entries:
        scenes = [WORLD.scene(*data.parse_world_path(p)[1:]) for p in e["images"]]
        assert nlvr_truth(e["sentence"], scenes[0].objects, scenes[1].objects) == e["label"], e
    assert len({e["sentence"].split()[1] for e in entries}) >= 5     # varied statements


def test_ve_labels_correct_and_balanced():
    entries = world_entries("ve", "test", 100)
    labels = [e["label"] for e in entries]
    assert [labels.count(k) for k in ("entailment", "neutral", "contradiction")] == [100] * 3
    for e in entries:
        objs = WORLD.scene(*data.parse_world_path(e["image"])[1:]).objects
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
# datasets over files

def write_pngs(folder, names, size=(40, 30)):
    for k, name in enumerate(names):
        Image.new("RGB", size, (10 * k, 100, 200)).save(folder / name)


def write_json(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


def test_albef_json_folder_loads(tmp_path):
    write_pngs(tmp_path, ["a.png", "b.png", "c.png"])
    tf = create_transform(32, train=False)
    pre = write_json(tmp_path / "pre1.json", [{"image": "a.png", "caption": "A Dog!"},
                                              {"image": "b.png", "caption": ["x y", "Left-z"]}])
    pre2 = write_json(tmp_path / "pre2.json", [{"image": "c.png", "caption": "third"}])
    ds = PretrainDataset([pre, pre2], str(tmp_path), tf, flip=False)
    assert len(ds) == 3
    image, caption = ds[0]
    assert image.shape == (3, 32, 32) and caption == "a dog"
    assert {ds[1][1] for _ in range(30)} == {"x y", "left z"}

    rt = RetrievalTrainDataset(write_json(tmp_path / "rt.json", [
        {"image": "a.png", "caption": "one", "image_id": "img_a"},
        {"image": "a.png", "caption": "two", "image_id": "img_a"},
        {"image": "b.png", "caption": "three", "image_id": 7}]), str(tmp_path), tf, flip=False)
    assert [rt[i][2] for i in range(3)] == [0, 0, 1] and rt[2][1] == "three"

    re_eval = RetrievalEvalDataset(write_json(tmp_path / "re.json", [
        {"image": "a.png", "caption": ["one", "two"]}, {"image": "b.png", "caption": ["three"]}]),
        str(tmp_path), tf)
    assert re_eval.text == ["one", "two", "three"]
    assert re_eval.img2txt == [[0, 1], [2]] and re_eval.txt2img == [0, 0, 1]
    assert re_eval[1][1] == 1

    vqa_file = write_json(tmp_path / "vqa.json", [
        {"question_id": 1, "question": "What is it?", "image": "a.png",
         "answer": ["dog"] * 5 + ["cat"] * 2 + ["left"] * 3},
        {"question_id": 2, "question": "Color?", "image": "b.png", "answer": ["red"]}])
    vqa = VQADataset(vqa_file, str(tmp_path), tf, train=False)
    assert vqa.answer_list == ["cat", "dog", "left", "red"] and vqa.question_ids == [1, 2]
    assert vqa[0][1:] == ("what is it", 0)
    vqa = VQADataset(vqa_file, str(tmp_path), tf, answer_list=["dog", "cat"])
    torch.manual_seed(0)
    for _ in range(10):
        _, question, answers, weights = vqa[0]
        flipped = "right" in answers
        side = "right" if flipped else "left"
        assert dict(zip(answers, weights)) == {"dog": 1.0, "cat": 2 / 3, side: 1.0}
    assert vqa.answer_list == ["dog", "cat"]

    nlvr = NLVRDataset(write_json(tmp_path / "nlvr.json", [
        {"images": ["a.png", "b.png"], "sentence": "The left image has a dog.", "label": "True"},
        {"images": ["b.png", "c.png"], "sentence": "no", "label": False}]), str(tmp_path), tf)
    image0, image1, sentence, label = nlvr[0]
    assert image0.shape == image1.shape == (3, 32, 32)
    assert (sentence, label, nlvr[1][3]) == ("the left image has a dog", 1, 0)
    assert not torch.equal(image0, image1)

    ve = VEDataset(write_json(tmp_path / "ve.json", [
        {"image": "a.png", "sentence": "A dog.", "label": "entailment"},
        {"image": "b.png", "sentence": "A cat.", "label": "contradiction"}]),
        str(tmp_path), tf, train=False)
    assert ve[0][1:] == ("a dog", 2) and ve[1][2] == 0

    cap_file = write_json(tmp_path / "cap.json", [{"image": "a.png", "caption": ["One.", "Two"]}])
    cap = CaptionDataset(cap_file, str(tmp_path), tf, train=False)
    assert cap.references == [["one", "two"]] and cap[0][1] == 0


def test_world_entries_through_the_datasets():
    tf = create_transform(64, train=True)
    ds = PretrainDataset(world_entries("pretrain", "train", 8), None, tf)
    image, caption = ds[3]
    assert image.shape == (3, 64, 64) and isinstance(caption, str)
    train = world_entries("retrieval", "train", 4)
    assert len(train) == 4 * data.CAPTIONS_PER_IMAGE
    assert all(isinstance(e["caption"], str) for e in train)
    assert RetrievalTrainDataset(train, None, tf)[7][2] == 1
    test = RetrievalEvalDataset(world_entries("retrieval", "test", 4), None,
                                create_transform(64, False))
    assert len(test) == 4 and len(test.text) == 4 * data.CAPTIONS_PER_IMAGE
    vqa = VQADataset(world_entries("vqa", "val", 3), None, tf, answer_list=world_answer_list())
    _, _, answers, weights = vqa[0]
    assert len(answers) == 1 and weights == [1.0]
    assert len(NLVRDataset(world_entries("nlvr", "val", 3), None, tf)) == 6
    assert VEDataset(world_entries("ve", "val", 3), None, tf)[2][2] == 0     # contradiction
    with pytest.raises(ValueError, match="unknown task"):
        world_entries("detection", "train", 1)
    with pytest.raises(ValueError, match="bad world image path"):
        PretrainDataset([{"image": "world:0/training/3", "caption": "a"}])


def message(excinfo):
    return str(excinfo.value)


def test_errors_name_file_and_entry(tmp_path):
    write_pngs(tmp_path, ["a.png"])
    root = str(tmp_path)
    ok = {"image": "a.png", "caption": "fine"}

    path = write_json(tmp_path / "missing.json", [ok, {"image": "nope.png", "caption": "x"}])
    with pytest.raises(FileNotFoundError) as e:
        PretrainDataset(path, root)
    assert "missing.json" in message(e) and "entry 1" in message(e)
    assert str(tmp_path / "nope.png") in message(e)

    # found when loading if not checked at construction
    ds = PretrainDataset(path, root, check_images=False)
    with pytest.raises(FileNotFoundError) as e:
        ds[1]
    assert "missing.json" in message(e) and "entry 1" in message(e)

    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = write_json(tmp_path / "broken.json", [ok, ok, {"image": "broken.png", "caption": "x"}])
    ds = PretrainDataset(path, root)
    with pytest.raises(OSError) as e:
        ds[2]
    assert "broken.json" in message(e) and "entry 2" in message(e)

    for name, bad, cls in [("nokey.json", {"image": "a.png"}, PretrainDataset),
                           ("type.json", {"image": 3, "caption": "x"}, PretrainDataset),
                           ("list.json", {"image": "a.png", "caption": ["x", 4]}, PretrainDataset),
                           ("empty.json", {"image": "a.png", "caption": " ?!. "}, PretrainDataset),
                           ("emptylist.json", {"image": "a.png", "caption": []}, PretrainDataset),
                           ("id.json", {"image": "a.png", "caption": "x"}, RetrievalTrainDataset),
                           ("nlvr.json", {"images": ["a.png"], "sentence": "x", "label": True},
                            NLVRDataset),
                           ("label.json", {"images": ["a.png"] * 2, "sentence": "x",
                                           "label": "yes"},
                            NLVRDataset),
                           ("ve.json", {"image": "a.png", "sentence": "x", "label": "maybe"},
                            VEDataset),
                           ("vqa.json", {"image": "a.png", "question": "x", "question_id": 1,
                                         "answer": []}, VQADataset),
                           ("notdict.json", "a.png", PretrainDataset)]:
        path = write_json(tmp_path / name, [ok, ok, ok, bad] if cls is PretrainDataset else [bad])
        with pytest.raises(ValueError) as e:
            cls(path, root)
        index = 3 if cls is PretrainDataset else 0
        assert name in message(e) and f"entry {index}" in message(e), message(e)
    with pytest.raises(ValueError, match="empty after cleaning"):
        PretrainDataset([ok, {"image": "a.png", "caption": "..."}], root)
    with pytest.raises(ValueError, match="<entries>, entry 1"):
        PretrainDataset([ok, {"image": "a.png", "caption": "..."}], root)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="bad.json"):
        PretrainDataset(str(tmp_path / "bad.json"), root)


# -----------------------------------------------------------------------------
# flip, transforms, collate

def test_flip_mirrors_image_and_swaps_left_right():
    entries = [{"image": WORLD.path("train", 2), "caption": "a red circle to the left of a square"}]
    plain = load_image(entries[0]["image"])
    ds = PretrainDataset(entries, transform=None)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        image, caption = ds[0]
        flipped = caption == "a red circle to the right of a square"
        assert flipped or caption == entries[0]["caption"]
        expect = plain.transpose(Image.FLIP_LEFT_RIGHT) if flipped else plain
        assert np.array_equal(np.asarray(image), np.asarray(expect))
        seen.add(flipped)
    assert seen == {True, False}
    # evaluation and NLVR2 never flip
    never = RetrievalEvalDataset([{"image": entries[0]["image"], "caption": ["left"]}])
    assert all(np.array_equal(np.asarray(never[0][0]), np.asarray(plain)) for _ in range(10))
    nlvr = NLVRDataset([{"images": [entries[0]["image"]] * 2, "sentence": "the left image",
                         "label": True}])
    assert all(nlvr[0][2] == "the left image" for _ in range(10))


def test_transforms_shapes_and_normalisation():
    image = load_image(WORLD.path("train", 1))
    for res in (64, 224, 256):
        for train in (True, False):
            x = create_transform(res, train)(image)
            assert x.shape == (3, res, res) and x.dtype == torch.float32
    x = create_transform(64, False)(Image.new("RGB", (10, 10), (255, 255, 255)))
    white = (1 - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    assert torch.allclose(x[:, 0, 0], white)


class WordTokenizer:
    """Stand-in with the Tokenizer call signature: whole words, [CLS]=1, [SEP]=2, [PAD]=0."""

    def __init__(self, words):
        self.ids = {w: i + 3 for i, w in enumerate(words)}

    def __call__(self, texts, max_len):
        seqs = [([1] + [self.ids[w] for w in t.split()])[:max_len - 1] + [2] for t in texts]
        L = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])       # (B, L)
        return ids, (ids != 0).long()


def test_collate_every_dataset():
    tok = WordTokenizer(World.vocabulary())
    tf = create_transform(32, train=True)
    collate = make_collate(tok, 30)

    def batch(ds):
        return next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))

    images, ids, mask = batch(PretrainDataset(world_entries("pretrain", "train", 4), None, tf))
    assert images.shape == (4, 3, 32, 32) and ids.shape == mask.shape and ids.shape[0] == 4
    assert (ids[:, 0] == 1).all() and (mask.sum(1) == (ids != 0).sum(1)).all()
    out = batch(RetrievalTrainDataset(world_entries("retrieval", "train", 2), None, tf))
    assert [t.shape[0] for t in out] == [4] * 4 and out[3].tolist() == [0, 0, 0, 0]
    images, index = batch(RetrievalEvalDataset(world_entries("retrieval", "val", 4), None, tf))
    assert index.tolist() == [0, 1, 2, 3]
    images, q_ids, q_mask, a_ids, a_mask, counts, weights = batch(
        VQADataset(world_entries("vqa", "train", 1), None, tf))
    assert counts.tolist() == [1] * 4 and a_ids.shape[0] == 4 and weights.tolist() == [1.0] * 4
    nlvr = NLVRDataset(world_entries("nlvr", "train", 2), None, tf)
    images0, images1, ids, mask, labels = batch(nlvr)
    assert images0.shape == images1.shape == (4, 3, 32, 32) and labels.tolist() == [1, 0, 1, 0]
    images, ids, mask, labels = batch(VEDataset(world_entries("ve", "train", 2), None, tf))
    assert labels.tolist() == [2, 1, 0, 2]
    # the collate pickles (DataLoader workers under spawn/forkserver)
    import pickle
    assert pickle.loads(pickle.dumps(collate)).keywords["max_len"] == 30
