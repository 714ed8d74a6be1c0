"""data.py: caption cleaning, the JSON datasets with their errors (over files and over the
embedded world's entries), the flip, transforms and collate, all on named samples and batches
(dicts). The world aids' dataset (WorldPretrainDataset) is tested in tests/test_world_aids.py."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data
import randaug
import world
from data import (CaptionDataset, NLVRDataset, PretrainDataset, RetrievalEvalDataset,
                  RetrievalTrainDataset, VEDataset, VQADataset, create_transform, load_image,
                  make_collate, pre_caption, pre_caption_blip, pre_question, pre_question_blip,
                  swap_left_right)
from tokenizer import Tokenizer
from world import World, render_path, world_answer_list, world_entries

WORLD = World(0)


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


def test_pre_caption_as_blip():
    # BLIP/data/utils.py:10-29: .!"()*#:;~ become spaces; commas, apostrophes, ?, - and / stay
    assert pre_caption_blip("A man's  DOG (running)-on the beach!! #fun, ok?") == \
        "a man's dog running -on the beach fun, ok?"
    assert pre_caption_blip(" ".join(str(i) for i in range(50))).split() == \
        [str(i) for i in range(30)]


def test_pre_question_as_blip():
    # BLIP/data/utils.py pre_question: .!"()*#:;~ are dropped (not spaced), the right end
    # stripped, inner runs of spaces kept, the first max_ques_words (50) words kept
    assert pre_question_blip("What  COLOR is the cat's tail-end, (roughly)? ") == \
        "what  color is the cat's tail-end, roughly?"
    assert pre_question_blip(" ".join(str(i) for i in range(60))).split() == \
        [str(i) for i in range(50)]


def test_swap_left_right_whole_words_only():
    assert swap_left_right("a cat to the left of a dog, right?") == \
        "a cat to the right of a dog, left?"
    assert swap_left_right("leftover rights bright") == "leftover rights bright"
    assert swap_left_right(swap_left_right("top left and right")) == "top left and right"


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
    sample = ds[0]
    assert set(sample) == {"image", "text"}            # the model's batch keys come from these
    assert sample["image"].shape == (3, 32, 32) and sample["text"] == "a dog"
    assert {ds[1]["text"] for _ in range(30)} == {"x y", "left z"}

    rt = RetrievalTrainDataset(write_json(tmp_path / "rt.json", [
        {"image": "a.png", "caption": "one", "image_id": "img_a"},
        {"image": "a.png", "caption": "two", "image_id": "img_a"},
        {"image": "b.png", "caption": "three", "image_id": 7}]), str(tmp_path), tf, flip=False)
    assert set(rt[0]) == {"image", "text", "image_id"}
    assert [rt[i]["image_id"] for i in range(3)] == [0, 0, 1] and rt[2]["text"] == "three"

    re_eval = RetrievalEvalDataset(write_json(tmp_path / "re.json", [
        {"image": "a.png", "caption": ["one", "two"]}, {"image": "b.png", "caption": ["three"]}]),
        str(tmp_path), tf)
    assert re_eval.text == ["one", "two", "three"]
    assert re_eval.img2txt == [[0, 1], [2]] and re_eval.txt2img == [0, 0, 1]
    assert set(re_eval[1]) == {"image", "index"} and re_eval[1]["index"] == 1

    vqa_file = write_json(tmp_path / "vqa.json", [
        {"question_id": 1, "question": "What is it?", "image": "a.png",
         "answer": ["dog"] * 5 + ["cat"] * 2 + ["left"] * 3},
        {"question_id": 2, "question": "Color?", "image": "b.png", "answer": ["red"]}])
    vqa = VQADataset(vqa_file, str(tmp_path), tf, train=False)
    assert vqa.answer_list == ["cat", "dog", "left", "red"] and vqa.question_ids == [1, 2]
    assert set(vqa[0]) == {"image", "question", "index"}
    assert (vqa[0]["question"], vqa[0]["index"]) == ("what is it", 0)
    vqa = VQADataset(vqa_file, str(tmp_path), tf, answer_list=["dog", "cat"])
    torch.manual_seed(0)
    for _ in range(10):
        sample = vqa[0]
        assert set(sample) == {"image", "question", "answers", "weights"}
        answers, weights = sample["answers"], sample["weights"]
        flipped = "right" in answers
        side = "right" if flipped else "left"
        assert dict(zip(answers, weights)) == {"dog": 1.0, "cat": 2 / 3, side: 1.0}
    assert vqa.answer_list == ["dog", "cat"]
    # ALBEF's decoder weights: each answer's share of the annotators; a Visual Genome answer (one
    # string) weighs vg_weight
    vqa_file = write_json(tmp_path / "vqa_vg.json", [
        {"question_id": 1, "question": "What is it?", "image": "a.png",
         "answer": ["dog"] * 5 + ["cat"] * 2 + ["cube"] * 3, "dataset": "vqa"},
        {"question_id": 2, "question": "Color?", "image": "b.png", "answer": "red",
         "dataset": "vg"}])
    vqa = VQADataset(vqa_file, str(tmp_path), tf, weighting="share", vg_weight=0.2)
    assert dict(zip(vqa[0]["answers"], vqa[0]["weights"])) == \
        pytest.approx({"dog": 0.5, "cat": 0.2, "cube": 0.3})
    assert (vqa[1]["answers"], vqa[1]["weights"]) == (["red"], [0.2])
    vg = VQADataset(vqa_file, str(tmp_path), tf)[1]
    assert (vg["answers"], vg["weights"]) == (["red"], [0.5])

    nlvr = NLVRDataset(write_json(tmp_path / "nlvr.json", [
        {"images": ["a.png", "b.png"], "sentence": "The left image has a dog.", "label": "True"},
        {"images": ["b.png", "c.png"], "sentence": "no", "label": False}]), str(tmp_path), tf)
    sample = nlvr[0]
    assert set(sample) == {"image0", "image1", "text", "label"}
    assert sample["image0"].shape == sample["image1"].shape == (3, 32, 32)
    assert (sample["text"], sample["label"], nlvr[1]["label"]) == ("the left image has a dog", 1, 0)
    assert not torch.equal(sample["image0"], sample["image1"])

    ve = VEDataset(write_json(tmp_path / "ve.json", [
        {"image": "a.png", "sentence": "A dog.", "label": "entailment"},
        {"image": "b.png", "sentence": "A cat.", "label": "contradiction"}]),
        str(tmp_path), tf, train=False)
    assert set(ve[0]) == {"image", "text", "label"}
    assert (ve[0]["text"], ve[0]["label"]) == ("a dog", 2) and ve[1]["label"] == 0

    cap_file = write_json(tmp_path / "cap.json", [{"image": "a.png", "caption": ["One.", "Two"]}])
    cap = CaptionDataset(cap_file, str(tmp_path), tf, train=False)
    assert cap.references == [["one", "two"]] and cap[0]["index"] == 0
    assert set(cap[0]) == {"image", "index"}
    assert set(CaptionDataset(cap_file, str(tmp_path), tf)[0]) == {"image", "text"}    # train


def test_world_entries_through_the_datasets():
    tf = create_transform(64, train=True)
    ds = PretrainDataset(world_entries("pretrain", "train", 8), None, tf)
    sample = ds[3]
    assert set(sample) == {"image", "text"}         # no aids' keys (WorldPretrainDataset's)
    assert sample["image"].shape == (3, 64, 64) and isinstance(sample["text"], str)
    train = world_entries("retrieval", "train", 4)
    assert len(train) == 4 * world.CAPTIONS_PER_IMAGE
    assert all(isinstance(e["caption"], str) for e in train)
    assert RetrievalTrainDataset(train, None, tf)[7]["image_id"] == 1
    test = RetrievalEvalDataset(world_entries("retrieval", "test", 4), None,
                                create_transform(64, False))
    assert len(test) == 4 and len(test.text) == 4 * world.CAPTIONS_PER_IMAGE
    vqa = VQADataset(world_entries("vqa", "val", 3), None, tf, answer_list=world_answer_list())
    assert len(vqa[0]["answers"]) == 1 and vqa[0]["weights"] == [1.0]
    assert len(NLVRDataset(world_entries("nlvr", "val", 3), None, tf)) == 6
    assert VEDataset(world_entries("ve", "val", 3), None, tf)[2]["label"] == 0     # contradiction
    with pytest.raises(ValueError, match="unknown task"):
        world_entries("detection", "train", 1)
    with pytest.raises(ValueError, match="bad world image path"):
        PretrainDataset([{"image": "world:0/training/3", "caption": "a"}])
    # a "world:" path loads as the world renders it
    path = WORLD.path("val", 5)
    image = load_image(path)
    assert image.size == (world.WORLD_RES, world.WORLD_RES)
    assert np.array_equal(np.asarray(image), np.asarray(render_path(path)))


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
                           ("vqastr.json", {"image": "a.png", "question": "x", "question_id": 1,
                                            "answer": "red"}, VQADataset),
                           ("source.json", {"image": "a.png", "question": "x", "question_id": 1,
                                            "answer": ["red"], "dataset": "gqa"}, VQADataset),
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
        sample = ds[0]
        image, caption = sample["image"], sample["text"]
        flipped = caption == "a red circle to the right of a square"
        assert flipped or caption == entries[0]["caption"]
        expect = plain.transpose(Image.FLIP_LEFT_RIGHT) if flipped else plain
        assert np.array_equal(np.asarray(image), np.asarray(expect))
        seen.add(flipped)
    assert seen == {True, False}
    # evaluation and NLVR2 never flip
    never = RetrievalEvalDataset([{"image": entries[0]["image"], "caption": ["left"]}])
    assert all(np.array_equal(np.asarray(never[0]["image"]), np.asarray(plain)) for _ in range(10))
    nlvr = NLVRDataset([{"images": [entries[0]["image"]] * 2, "sentence": "the left image",
                         "label": True}])
    assert all(nlvr[0]["text"] == "the left image" for _ in range(10))


def test_flip_without_swapping_words():
    entries = [{"image": WORLD.path("train", 2), "caption": "a red circle to the left of a square"}]
    plain = np.asarray(load_image(entries[0]["image"]))
    ds = PretrainDataset(entries, transform=None, swap_words=False)
    torch.manual_seed(0)
    images = [np.asarray(ds[0]["image"]) for _ in range(20)]
    assert any(not np.array_equal(im, plain) for im in images)               # some mirrored
    assert all(ds[0]["text"] == entries[0]["caption"] for _ in range(20))    # text untouched
    # the downstream datasets take it as their attribute (tasks.task_dataset sets it)
    vqa = VQADataset([{"question": "what is on the left", "answer": ["left"],
                       "image": entries[0]["image"]}])
    assert vqa.question_ids == [None]                 # an entry may lack its question_id
    vqa.swap_words = False
    samples = [vqa[0] for _ in range(20)]
    assert all((s["question"], s["answers"]) == ("what is on the left", ["left"]) for s in samples)
    vqa.swap_words = True
    assert any(vqa[0]["answers"] == ["right"] for _ in range(20))


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

    out = batch(PretrainDataset(world_entries("pretrain", "train", 4), None, tf))
    assert set(out) == {"image", "text_ids", "text_mask"}          # ELIPModel.forward's batch
    ids, mask = out["text_ids"], out["text_mask"]
    assert out["image"].shape == (4, 3, 32, 32) and ids.shape == mask.shape and ids.shape[0] == 4
    assert (ids[:, 0] == 1).all() and (mask.sum(1) == (ids != 0).sum(1)).all()
    out = batch(RetrievalTrainDataset(world_entries("retrieval", "train", 2), None, tf))
    assert set(out) == {"image", "text_ids", "text_mask", "image_id"}
    assert [t.shape[0] for t in out.values()] == [4] * 4 and out["image_id"].tolist() == [0] * 4
    assert out["image_id"].dtype == torch.long
    out = batch(RetrievalEvalDataset(world_entries("retrieval", "val", 4), None, tf))
    assert set(out) == {"image", "index"} and out["index"].tolist() == [0, 1, 2, 3]
    out = batch(VQADataset(world_entries("vqa", "train", 1), None, tf))
    assert set(out) == {"image", "question_ids", "question_mask", "answers_ids", "answers_mask",
                        "answers_count", "weights"}
    assert out["answers_count"].tolist() == [1] * 4 and out["answers_ids"].shape[0] == 4
    assert out["weights"].tolist() == [1.0] * 4 and out["weights"].dtype == torch.float32
    out = batch(NLVRDataset(world_entries("nlvr", "train", 2), None, tf))
    assert set(out) == {"image0", "image1", "text_ids", "text_mask", "label"}
    assert out["image0"].shape == out["image1"].shape == (4, 3, 32, 32)
    assert out["label"].tolist() == [1, 0, 1, 0]
    out = batch(VEDataset(world_entries("ve", "train", 2), None, tf))
    assert set(out) == {"image", "text_ids", "text_mask", "label"}
    assert out["label"].tolist() == [2, 1, 0, 2]
    # the collate pickles (DataLoader workers under spawn/forkserver)
    import pickle
    assert pickle.loads(pickle.dumps(collate)).keywords["max_len"] == 30


def test_collate_pads_to_max_len_as_blip():
    tok = Tokenizer.build(["a red ball and a blue cube"])
    batch = [{"image": torch.zeros(3, 4, 4), "text": "a red ball"},
             {"image": torch.zeros(3, 4, 4), "text": "a blue cube and a ball"}]
    short = make_collate(tok, 10)(batch)
    ids, mask = short["text_ids"], short["text_mask"]
    padded = make_collate(tok, 30, pad_to_max_len=True)(batch)
    ids30, mask30 = padded["text_ids"], padded["text_mask"]
    assert ids30.shape == mask30.shape == (2, 30)
    assert torch.equal(ids30[:, :ids.shape[1]], ids) and torch.equal(mask30.sum(1), mask.sum(1))
    assert (ids30[:, ids.shape[1]:] == tok.pad_id).all() and mask30[:, ids.shape[1]:].sum() == 0


# -----------------------------------------------------------------------------
# RandAugment against the official numpy/cv2 formulas (ALBEF/dataset/randaugment.py), written
# out here: the geometric ops as cv2.warpAffine's forward matrices, bilinear, border 128

def warp_reference(image, matrix):
    """cv2.warpAffine(image, matrix, border 128): out(p) = bilinear image(matrix^-1 p). Also
    whether all four neighbours of each sample lie inside or all outside the image."""
    C, H, W = image.shape
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    padded = np.pad(image.astype(np.float64), ((0, 0), (1, 1), (1, 1)), constant_values=128)

    def at(y, x):
        inside = (x >= -1) & (x <= W) & (y >= -1) & (y <= H)
        return np.where(inside, padded[:, np.clip(y + 1, 0, H + 1), np.clip(x + 1, 0, W + 1)],
                        128.0)

    out = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
           + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    inside = [(x >= 0) & (x < W) & (y >= 0) & (y < H)
              for y in (y0, y0 + 1) for x in (x0, x0 + 1)]
    return np.round(out), np.logical_and.reduce(inside) | ~np.logical_or.reduce(inside)


def official_matrix(op, m, sign, H, W):
    """The forward matrices of ALBEF/dataset/randaugment.py (shear_x_func ... rotate_func)."""
    level = sign * m / 10
    if op == "ShearX":
        return np.array([[1, level * 0.3, 0], [0, 1, 0]])
    if op == "ShearY":
        return np.array([[1, 0, 0], [level * 0.3, 1, 0]])
    if op == "TranslateX":
        return np.array([[1, 0, -level * 10], [0, 1, 0]])
    if op == "TranslateY":
        return np.array([[1, 0, 0], [0, 1, -level * 10]])
    a = math.radians(level * 30)      # cv2.getRotationMatrix2D((W / 2, H / 2), degree, 1)
    cx, cy, al, be = W / 2, H / 2, math.cos(a), math.sin(a)
    return np.array([[al, be, (1 - al) * cx - be * cy], [-be, al, be * cx + (1 - al) * cy]])


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
@pytest.mark.parametrize("sign", [1, -1])
def test_randaug_geometry_is_the_official_cv2_warp(op, sign):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8, generator=g)
    ours = randaug.randaug_op(image, op, 7, sign).numpy().astype(np.float64)
    ref, clean = warp_reference(image.numpy(), official_matrix(op, 7, sign, 40, 52))
    # on noise, a half-pixel error would leave tens of levels everywhere; along the edge of
    # the grey fill torchvision blends image and fill its own way (a one-pixel band)
    assert clean.mean() > 0.8 and (ref[:, ~clean] != 128).any()
    assert np.abs(ours - ref)[:, clean].max() <= 1


def test_randaug_colour_ops_are_the_official_formulas():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(60, 181, (3, 24, 24), dtype=torch.uint8, generator=g)
    x = image.numpy().astype(np.float64)
    f = 7 / 10 * 1.8 + 0.1                                            # enhance_level_to_args
    # brightness_func: (arange(256) * factor).clip(0, 255).astype(uint8)
    bright = np.clip(np.arange(256, dtype=np.float32) * np.float32(f), 0, 255).astype(np.uint8)
    assert np.array_equal(randaug.randaug_op(image, "Brightness", 7, 1).numpy(),
                          bright[image.numpy()])
    # autocontrast_func: each channel stretched from [min, max] to [0, 255], truncated
    lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    stretched = np.clip(np.floor((x - lo) * 255 / (hi - lo)), 0, 255)
    assert np.abs(randaug.randaug_op(image, "AutoContrast", 7, 1).numpy() - stretched).max() <= 1
    # sharpness_func: blend with the 3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13 blur inside the border
    kernel = np.ones((3, 3)) / 13
    kernel[1, 1] = 5 / 13
    blur = np.round(sum(kernel[i, j] * x[:, i:i + 22, j:j + 22] for i in range(3) for j in range(3)))
    sharp = np.floor(blur + f * (x[:, 1:-1, 1:-1] - blur))
    out = randaug.randaug_op(image, "Sharpness", 7, 1).numpy()
    assert np.abs(out[:, 1:-1, 1:-1] - sharp).max() <= 1 and np.array_equal(out[:, 0], image[:, 0])
    # equalize_func (PIL's equalize): per channel lut = cumsum(step // 2, hist[:-1]) // step
    lut_out = []
    for ch in image.numpy():
        hist = np.bincount(ch.ravel(), minlength=256)
        step = hist[hist > 0][:-1].sum() // 255
        lut = np.clip((np.concatenate([[step // 2], hist[:-1]]).cumsum()) // step, 0, 255)
        lut_out.append(lut[ch])
    assert np.array_equal(randaug.randaug_op(image, "Equalize", 7, 1).numpy(), np.stack(lut_out))
    # BLIP's strength 5 makes both enhance factors 1: no change
    for op in ("Brightness", "Sharpness", "Identity"):
        assert torch.equal(randaug.randaug_op(image, op, 5, 1), image)


def test_randaugment_draws_n_ops_with_replacement_each_applied_half_the_time(monkeypatch):
    calls = []
    monkeypatch.setattr(randaug, "randaug_op", lambda image, op, m, sign: calls.append(
        (len(seen), op, m, sign)) or image)
    aug, seen = randaug.RandomAugment(2, 7), []
    torch.manual_seed(0)
    for _ in range(4000):
        seen.append(aug(torch.zeros(3, 2, 2, dtype=torch.uint8)))
    per_call = np.bincount([c[0] for c in calls], minlength=4000)
    assert abs(per_call.mean() - 1.0) < 0.05                           # 2 ops x p 0.5
    assert abs((per_call == 2).mean() - 0.25) < 0.03                    # independently
    ops = [c[1] for c in calls]
    assert set(ops) == set(randaug.RANDAUG_OPS)
    assert all(abs(ops.count(o) / len(ops) - 0.1) < 0.02 for o in randaug.RANDAUG_OPS)
    twice = [i for i in range(4000) if per_call[i] == 2]
    same = sum(calls[k][1] == calls[k + 1][1] for k in range(len(calls) - 1)
               if calls[k][0] == calls[k + 1][0])
    assert abs(same / len(twice) - 0.1) < 0.03                          # with replacement
    assert {c[2] for c in calls} == {7} and abs(np.mean([c[3] for c in calls])) < 0.05


def test_transform_without_randaugment_is_unchanged():
    image = load_image(WORLD.path("train", 1))
    old = data.transforms.Compose([
        data.transforms.RandomResizedCrop(64, scale=(0.8, 1.0),
                                          interpolation=data.InterpolationMode.BICUBIC),
        data.transforms.ToTensor(), data.transforms.Normalize(data.CLIP_MEAN, data.CLIP_STD)])
    torch.manual_seed(3)
    a = create_transform(64, True, (0.8, 1.0))(image)
    torch.manual_seed(3)
    assert torch.equal(a, old(image))
    torch.manual_seed(3)
    b = create_transform(64, True, (0.8, 1.0), randaug_n=2, randaug_m=7)(image)
    assert b.shape == a.shape and b.dtype == a.dtype


# -----------------------------------------------------------------------------
# corpus scale: packed entries, the existence check split over ranks

def test_packed_list_holds_the_records():
    records = [{"images": [f"{i}.jpg"], "captions": ["a b"] * (i % 3 + 1)} for i in range(50)]
    packed = data.PackedList()
    for r in records:
        packed.append(r)
    assert len(packed) == 50 and list(packed) == records
    assert packed[7] == records[7] and packed[-1] == records[-1]
    assert packed[7] is not packed[7]                     # a fresh copy: nothing stored is touched
    with pytest.raises(IndexError):
        packed[50]
    assert list(pickle.loads(pickle.dumps(packed))) == records       # spawned workers get a copy


def test_missing_images_split_over_ranks_and_named(tmp_path):
    write_pngs(tmp_path, ["a.png"])
    one = write_json(tmp_path / "one.json", [{"image": "a.png", "caption": "x"}] * 3)
    two = write_json(tmp_path / "two.json", [{"image": "a.png", "caption": "x"},
                                             {"image": "gone1.png", "caption": "x"},
                                             {"image": "gone2.png", "caption": "x"}])
    ds = PretrainDataset([one, two], str(tmp_path), check_images=False)
    assert ds.origin(4) == f"{two}, entry 1" and ds.origin(2) == f"{one}, entry 2"
    count, first = ds.missing_images()
    assert count == 2 and first == [f"{two}, entry {k}: image not found: {tmp_path}/gone{k}.png"
                                    for k in (1, 2)]
    shares = [ds.missing_images(rank, 3) for rank in range(3)]
    assert sum(n for n, _ in shares) == 2
    assert sorted(m for _, ms in shares for m in ms) == first
    with pytest.raises(FileNotFoundError, match=r"two.json, entry 1: .*gone1.png \(and 1 more"):
        PretrainDataset([one, two], str(tmp_path))


def counting_isfile(monkeypatch) -> list:
    """os.path.isfile, recording every path it is asked about (list.append is atomic, so the
    check's threads may call it at once)."""
    calls, isfile = [], os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: calls.append(p) or isfile(p))
    return calls


def test_missing_images_checks_each_distinct_file_once(tmp_path, monkeypatch):
    write_pngs(tmp_path, ["a.png", "b.png"])
    # COCO's layout: an entry per caption, so every image is listed several times
    entries = [{"image": name, "caption": f"caption {k}"}
               for name in ["a.png", "gone.png", "b.png", "world:0/train/1", "a.png"]
               for k in range(3)]
    ds = PretrainDataset(entries, str(tmp_path), check_images=False)
    calls = counting_isfile(monkeypatch)
    count, first = ds.missing_images()
    assert sorted(calls) == [f"{tmp_path}/{n}" for n in ("a.png", "b.png", "gone.png")]
    assert count == 1 and first == [f"<entries>, entry 3: image not found: {tmp_path}/gone.png"]


def serial_missing(ds) -> tuple[int, list[str]]:
    """The answer of a plain loop: each distinct file in corpus order, once, one at a time."""
    seen, messages = set(), []
    for i in range(len(ds)):
        for path in ds.items[i]["images"]:
            full = os.path.join(ds.image_root, path)
            if full not in seen:
                seen.add(full)
                if not os.path.isfile(full):
                    messages.append(f"{ds.origin(i)}: image not found: {full}")
    return len(messages), messages


def test_missing_images_in_parallel_and_over_ranks_give_the_serial_answer(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    names = [f"d{k % 7}/{k}.jpg" for k in range(700)]       # more files than one chunk of stats
    for k in range(7):
        (tmp_path / f"d{k}").mkdir()
    for name in names[:600]:
        (tmp_path / name).touch()
    listed = [names[k] for k in rng.integers(0, 700, 2000)]  # repeats, in no order
    ds = PretrainDataset([{"image": n, "caption": "x"} for n in listed], str(tmp_path),
                         check_images=False)
    serial = serial_missing(ds)
    assert 50 < serial[0] < 100                                # some of the 100 missing
    assert ds.missing_images(keep=2000, threads=8) == serial
    assert ds.missing_images(keep=2000, threads=1) == serial
    calls = counting_isfile(monkeypatch)
    shares = [ds.missing_images(rank, 2, keep=2000, threads=8) for rank in range(2)]
    assert sum(n for n, _ in shares) == serial[0] and all(n > 0 for n, _ in shares)
    assert sorted(m for _, ms in shares for m in ms) == sorted(serial[1])
    assert len(calls) == len(set(calls)) == len(set(listed))  # the ranks split the distinct files
    assert ds.missing_images(keep=3)[1] == serial[1][:3]


@pytest.mark.parametrize("content", [b"", b"GIF89a but not really", None])
def test_unreadable_images_raise_oserror_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:                                   # a JPEG cut in the middle
        Image.new("RGB", (64, 48), (200, 30, 30)).save(path, quality=90)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(OSError, match="cannot read image .*bad.jpg"):
        load_image(str(path))
