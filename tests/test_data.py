"""data.py: caption cleaning, the JSON datasets with their errors (over files and over the
embedded world's entries), the flip, transforms and collate."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import world
from data import (CaptionDataset, NLVRDataset, PretrainDataset, RetrievalEvalDataset,
                  RetrievalTrainDataset, VEDataset, VQADataset, create_transform, load_image,
                  make_collate, pre_caption, pre_question, swap_left_right)
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
    # ALBEF's decoder weights: each answer's share of the annotators; a Visual Genome answer (one
    # string) weighs vg_weight
    vqa_file = write_json(tmp_path / "vqa_vg.json", [
        {"question_id": 1, "question": "What is it?", "image": "a.png",
         "answer": ["dog"] * 5 + ["cat"] * 2 + ["cube"] * 3, "dataset": "vqa"},
        {"question_id": 2, "question": "Color?", "image": "b.png", "answer": "red",
         "dataset": "vg"}])
    vqa = VQADataset(vqa_file, str(tmp_path), tf, weighting="share", vg_weight=0.2)
    assert dict(zip(*vqa[0][2:])) == pytest.approx({"dog": 0.5, "cat": 0.2, "cube": 0.3})
    assert vqa[1][2:] == (["red"], [0.2])
    assert VQADataset(vqa_file, str(tmp_path), tf)[1][2:] == (["red"], [0.5])

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
    assert len(train) == 4 * world.CAPTIONS_PER_IMAGE
    assert all(isinstance(e["caption"], str) for e in train)
    assert RetrievalTrainDataset(train, None, tf)[7][2] == 1
    test = RetrievalEvalDataset(world_entries("retrieval", "test", 4), None,
                                create_transform(64, False))
    assert len(test) == 4 and len(test.text) == 4 * world.CAPTIONS_PER_IMAGE
    vqa = VQADataset(world_entries("vqa", "val", 3), None, tf, answer_list=world_answer_list())
    _, _, answers, weights = vqa[0]
    assert len(answers) == 1 and weights == [1.0]
    assert len(NLVRDataset(world_entries("nlvr", "val", 3), None, tf)) == 6
    assert VEDataset(world_entries("ve", "val", 3), None, tf)[2][2] == 0     # contradiction
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
