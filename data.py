"""Data: caption cleaning, images, the JSON datasets of ALBEF/BLIP, transforms and collate.

Every dataset reads the JSON layouts of ALBEF/BLIP: a list of entries such as
{"image": path, "caption": str or [str, ...]}, from one or several files, or from an in-memory
list. The embedded world (world.py) plugs into the same classes: its entries name images by
"world:<seed>/<split>/<index>", which load_image renders on the fly, so

    entries = world.world_entries("pretrain", "train", 1000)   # no download, same everywhere
    dataset = PretrainDataset(entries, None, create_transform(64, train=True))
    loader = DataLoader(dataset, batch_size=32, collate_fn=make_collate(tokenizer, 30))

gives the same batches as real COCO files would, only smaller. Nothing is skipped silently: a
malformed entry, an empty caption or a missing image is an error that names the JSON file and
the index of the entry.
"""

import json
import os
import re
from collections import Counter
from functools import partial

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import world

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
# Images


def load_image(path, image_root=None):
    """PIL RGB image. A "world:" path renders that scene of the embedded world (world.WORLD_RES
    pixels a side); any other path is read from disk, joined to image_root when one is given."""
    if path.startswith("world:"):
        return world.render_path(path)
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
                        world.parse_world_path(path)   # rendered on load: only the name can be wrong
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
    """{"question_id", "question", "answer": [str, ...], "image"}, and optionally "dataset": "vqa"
    or "vg" (Visual Genome QA, whose "answer" may be one string), as ALBEF's files.
    train -> (image, question, answers, weights): each distinct answer once, with its weight:
    weighting "score", the VQA soft score min(1, count / 3) (a classifier's target), or "share",
    count / number of answers (ALBEF's and BLIP's decoder); a VG answer weighs vg_weight (ALBEF
    0.5, BLIP 0.2). eval -> (image, question, index); answers optional.
    .answer_list: the candidate answers (a list, a JSON file of one, or all answers seen)."""

    def __init__(self, source, image_root=None, transform=None, train=True, answer_list=None,
                 max_words=30, check_images=True, weighting="score", vg_weight=0.5):
        if weighting not in ("score", "share"):
            raise ValueError(f"weighting must be 'score' or 'share', got {weighting!r}")
        self.train, self.max_words = train, max_words
        self.weighting, self.vg_weight = weighting, vg_weight
        super().__init__(source, image_root, transform, train, check_images)
        if isinstance(answer_list, (str, os.PathLike)):
            with open(answer_list, encoding="utf-8") as f:
                answer_list = json.load(f)
        self.answer_list = answer_list or sorted({a for it in self.items for a in it["answers"]})
        self.question_ids = [item["question_id"] for item in self.items]

    def parse(self, entry):
        dataset = entry.get("dataset", "vqa")
        if dataset not in ("vqa", "vg"):
            raise ValueError(f"'dataset' must be 'vqa' or 'vg', got {dataset!r}")
        answers = []
        if self.train or "answer" in entry:
            answers = _field(entry, "answer", (list, str) if dataset == "vg" else list,
                             "a list of strings")
        answers = [answers] if isinstance(answers, str) else answers
        if (self.train and not answers) or not all(isinstance(a, str) for a in answers):
            raise ValueError("'answer' must be a non-empty list of strings")
        return {"images": [_field(entry, "image", str, "a string")],
                "question_id": _field(entry, "question_id", (str, int), "a string or an int"),
                "question": _texts(entry, "question", pre_question, self.max_words)[0],
                "answers": answers, "dataset": dataset}

    def __getitem__(self, i):
        item = self.items[i]
        (image,), (question, *answers) = self.load(i, item["question"], *item["answers"])
        if not self.train:
            return image, question, i
        counts = Counter(answers)
        if item["dataset"] == "vg":
            weights = [self.vg_weight] * len(counts)
        elif self.weighting == "share":
            weights = [k / len(answers) for k in counts.values()]
        else:
            weights = [min(1.0, k / 3) for k in counts.values()]
        return image, question, list(counts), weights


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


VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}     # ALBEF's label ids


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
