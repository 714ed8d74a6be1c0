"""Data: caption cleaning, images, the JSON datasets of ALBEF/BLIP, transforms and collate.

Every dataset reads the JSON layouts of ALBEF/BLIP: a list of entries such as
{"image": path, "caption": str or [str, ...]}, from one or several files, or from an in-memory
list. The embedded world (world.py) plugs into the same classes: its entries name images by
"world:<seed>/<split>/<index>", which load_image renders on the fly, so

    entries = world.world_entries("pretrain", "train", 1000)   # no download, same everywhere
    dataset = PretrainDataset(entries, None, create_transform(64, train=True))
    loader = DataLoader(dataset, batch_size=32, collate_fn=make_collate(tokenizer, 30))

gives the same batches as real COCO files would, only smaller. A malformed entry, an empty
caption, a missing or unreadable image is an error naming the JSON file and the entry's index;
training skips an unreadable one (SkipUnreadable), names it, and stops past a limit.
"""

import bisect
import json
import os
import pickle
import re
import sys
import zlib
from array import array
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import world
from randaug import RandomAugment

# -----------------------------------------------------------------------------
# Text cleaning, exactly as ALBEF (so that numbers on real data are comparable)


def _first_words(text, max_words):
    """The first max_words words, split on single spaces as ALBEF and BLIP split them (runs of
    spaces, where kept, count as empty words)."""
    return " ".join(text.split(" ")[:max_words])


def pre_caption(caption, max_words=30):
    """ALBEF's caption cleaning: lower case, drop ,.'!?"()*#:;~, '-' and '/' to spaces,
    '<person>' (SBU/CC placeholders) to 'person', collapse runs of spaces, strip, keep the first
    max_words words."""
    caption = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return _first_words(caption, max_words)


def pre_caption_blip(caption, max_words=30):
    """BLIP's caption cleaning: lower case, .!"()*#:;~ to spaces (commas, apostrophes, '?', '-'
    and '/' stay), collapse runs of spaces, strip, keep the first max_words words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return _first_words(caption, max_words)


def pre_question(question, max_words=30):
    """ALBEF's question cleaning: like pre_caption, but it only strips trailing spaces and does
    not collapse inner runs of spaces (kept as ALBEF has it)."""
    question = re.sub(r"([,.'!?\"()*#:;~])", "", question.lower())
    question = question.replace("-", " ").replace("/", " ").rstrip(" ")
    return _first_words(question, max_words)


def pre_question_blip(question, max_words=50):
    """BLIP's question cleaning: lower case, drop .!"()*#:;~ (commas, apostrophes, '?', '-' and
    '/' stay), strip trailing spaces, keep the first max_words words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    return _first_words(question, max_words)


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
    # unreadable, truncated, empty files raise OSError; a few decoders the others, on bad data
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {full}: {e}") from e


# A stat waits on the file system, not the CPU (it releases the GIL): on a network file system a
# round trip of 0.2 to 1 ms, so 32 in flight check ~32x the files a second. From the kernel's
# cache a stat takes microseconds and threads cost more than they save (lab/bench_data.py exist).
STAT_THREADS = 32
STAT_CHUNK = 256    # paths per task: millions of files make thousands of tasks, not one each


def missing_files(paths: list[str], threads: int = STAT_THREADS) -> list[str]:
    """The paths that are not existing files (os.path.isfile), in their order, checked `threads`
    at a time in chunks of at most STAT_CHUNK (fewer when every thread would not get one)."""
    size = max(1, min(STAT_CHUNK, len(paths) // max(1, threads)))
    chunks = [paths[k:k + size] for k in range(0, len(paths), size)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = pool.map(lambda chunk: [p for p in chunk if not os.path.isfile(p)], chunks)
        return [p for missing in found for p in missing]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def create_transform(res, train, crop_scale=(0.2, 1.0), randaug_n=0, randaug_m=0):
    """ALBEF/BLIP transforms without the flip, which the datasets do together with the text.
    crop_scale: the area range of the random crop; ALBEF's (0.2, 1.0) can cut out the object a
    caption names, harmless on web captions but a lie in the embedded world, which uses a milder one.
    randaug_n, randaug_m: RandAugment's operations per image (0: none) and strength, in training."""
    bicubic = InterpolationMode.BICUBIC
    resize = (transforms.RandomResizedCrop(res, scale=crop_scale, interpolation=bicubic) if train
              else transforms.Resize((res, res), interpolation=bicubic))
    to_tensor = [transforms.ToTensor()]
    if train and randaug_n:     # as ALBEF/BLIP: after the crop and the flip, on 8-bit pixels
        to_tensor = [transforms.PILToTensor(), RandomAugment(randaug_n, randaug_m),
                     transforms.ConvertImageDtype(torch.float32)]
    return transforms.Compose([resize, *to_tensor, transforms.Normalize(CLIP_MEAN, CLIP_STD)])


# -----------------------------------------------------------------------------
# Datasets


def _field(entry, key, types, what, optional=False):
    """entry[key], of one of `types`; an optional key the entry lacks gives None."""
    if key not in entry:
        if optional:
            return None
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
    """Yield (name, list of entries) per JSON file of `source`: a path, a list of paths, or a list
    of entries (one list, named "<entries>")."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if not all(isinstance(s, (str, os.PathLike)) for s in source):
        yield "<entries>", source
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
        yield str(file), entries


class PackedList(Sequence):
    """A read-only list of small records (the parsed entries), each pickled into one growing
    buffer, found by its offset. A DataLoader worker forked from the main process shares these
    pages for good: reading record i unpickles a fresh copy and writes nothing stored. A list of
    dicts instead is copied into every worker page by page, as reading it updates reference
    counts and the garbage collector walks it (a million entries: hundreds of MB per worker)."""

    def __init__(self):
        self.buffer, self.offsets = bytearray(), array("q", [0])

    def append(self, record):
        self.buffer += pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        self.offsets.append(len(self.buffer))

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} records")
        i %= len(self)
        return pickle.loads(memoryview(self.buffer)[self.offsets[i]:self.offsets[i + 1]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class JSONDataset(Dataset):
    """The shared base: reads and validates every entry at construction (self.parse, per
    dataset), checks that image files exist (if check_images; see missing_images), loads and
    transforms images, and mirrors an image together with its text when `flip` (p=0.5). Errors
    name the JSON file and the entry index.
    source: a JSON path, a list of paths (concatenated), or a list of entries ("<entries>")."""

    swap_words = True   # a mirrored image's texts swap left and right
    blank_unreadable = False    # for_evaluation: an unreadable image is read as a black one

    def __init__(self, source, image_root, transform, flip, check_images):
        self.image_root, self.transform, self.flip = image_root, transform, flip
        self.unreadable = []
        # entries packed (PackedList: no Python object per entry), each file's first index
        self.items, self.files = PackedList(), []
        for name, entries in _read(source):
            self.files.append((name, len(self.items)))
            for k, entry in enumerate(entries):
                try:
                    if not isinstance(entry, dict):
                        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
                    item = self.parse(entry)
                    for path in item["images"]:
                        if path.startswith("world:"):
                            world.parse_world_path(path)   # rendered on load: only the name can be wrong
                except ValueError as e:
                    raise ValueError(f"{name}, entry {k}: {e}") from None
                self.items.append(item)
        if not self.items:
            raise ValueError("the dataset has no entries")
        if check_images:
            missing, first = self.missing_images()
            if missing:
                raise FileNotFoundError(first[0] + (f" (and {missing - 1} more images are "
                                                    f"missing)" if missing > 1 else ""))

    def __len__(self):
        return len(self.items)

    def origin(self, i):
        """"<file>, entry <index in that file>" of entry i."""
        name, first = self.files[bisect.bisect_right([f for _, f in self.files], i) - 1]
        return f"{name}, entry {i - first}"

    def missing_images(self, rank: int = 0, world_size: int = 1, keep: int = 5,
                       threads: int = STAT_THREADS) -> tuple[int, list[str]]:
        """(how many, the first `keep` messages) of the image files that do not exist, each named
        with the first entry that lists it. Each distinct file (COCO lists an image 5 times) is
        checked once, `threads` at a time; under DDP a rank checks the files whose path hashes
        to it (crc32, the same in every process), and the ranks add up their counts."""
        first = {}   # image path -> the first entry that lists it
        for i in range(len(self)):
            for path in self.items[i]["images"]:
                # surrogatepass: any str encodes, so every path hashes
                if path not in first and not path.startswith("world:") and \
                        zlib.crc32(path.encode("utf-8", "surrogatepass")) % world_size == rank:
                    first[path] = i
        root = self.image_root
        entry_of = {(os.path.join(root, path) if root else path): i for path, i in first.items()}
        missing = missing_files(list(entry_of), threads)
        return len(missing), [f"{self.origin(entry_of[p])}: image not found: {p}"
                              for p in missing[:keep]]

    def load(self, i, *texts):
        """The transformed image(s) of entry i and `texts`; on a coin flip (if self.flip) the
        images are mirrored and (if self.swap_words) left/right swapped in every text, so the
        text stays true."""
        flip = self.flip and bool(torch.rand(()) < 0.5)
        images = []
        for path in self.items[i]["images"]:
            try:
                image = load_image(path, self.image_root)
            except (OSError, ValueError) as e:
                if not self.blank_unreadable:
                    raise type(e)(f"{self.origin(i)}: {e}") from e
                self.unreadable.append(f"{self.origin(i)}: {e}")
                print(f"warning: {self.unreadable[-1]}; scored as a black image", file=sys.stderr)
                image = Image.new("RGB", (world.WORLD_RES, world.WORLD_RES))
            image = ImageOps.mirror(image) if flip else image
            images.append(self.transform(image) if self.transform else image)
        return images, [swap_left_right(t) if flip and self.swap_words else t for t in texts]

    def random_choice(self, texts):
        # torch's generator, which DataLoader seeds in every worker, so runs are reproducible
        return texts[int(torch.randint(len(texts), ()))]


def for_evaluation(dataset: JSONDataset) -> JSONDataset:
    """The dataset, set to score an unreadable image as a black one (named on stderr and in
    dataset.unreadable) instead of raising: a test set cannot skip a sample the way training
    does without changing what is measured, and a run that trained for days must still end with
    its metrics (the callers report how many images were blank). Evaluation loads in the main
    process, so dataset.unreadable sees every one."""
    dataset.blank_unreadable = True
    return dataset


class PretrainDataset(JSONDataset):
    """{"image", "caption": str or [str]} -> {"image", "text"}: one caption drawn at random.
    clean: the caption cleaning (pre_caption as ALBEF, pre_caption_blip as BLIP)."""

    def __init__(self, source, image_root=None, transform=None, max_words=30, flip=True,
                 check_images=True, clean=pre_caption, swap_words=True):
        self.max_words, self.clean, self.swap_words = max_words, clean, swap_words
        super().__init__(source, image_root, transform, flip, check_images)

    def parse(self, entry):
        return {"images": [_field(entry, "image", str, "a string")],
                "captions": _texts(entry, "caption", self.clean, self.max_words)}

    def __getitem__(self, i):
        (image,), (text,) = self.load(i, self.random_choice(self.items[i]["captions"]))
        return {"image": image, "text": text}


class RetrievalTrainDataset(PretrainDataset):
    """{"image", "caption", "image_id"} -> {"image", "text", "image_id": the index of the
    entry's image_id}, as ALBEF."""

    def __init__(self, source, image_root=None, transform=None, max_words=30, flip=True,
                 check_images=True, clean=pre_caption):
        super().__init__(source, image_root, transform, max_words, flip, check_images, clean)
        ids = {}
        for item in self.items:
            ids.setdefault(item["image_id"], len(ids))
        self.img_ids = ids

    def parse(self, entry):
        return {**super().parse(entry),
                "image_id": _field(entry, "image_id", (str, int), "a string or an int")}

    def __getitem__(self, i):
        return {**super().__getitem__(i), "image_id": self.img_ids[self.items[i]["image_id"]]}


class RetrievalEvalDataset(PretrainDataset):
    """{"image", "caption": [str, ...]} one entry per image -> {"image", "index"}. All captions are
    in .text; .img2txt[i] lists the captions of image i, .txt2img[t] the image of caption t."""

    def __init__(self, source, image_root=None, transform=None, max_words=30, check_images=True,
                 clean=pre_caption):
        super().__init__(source, image_root, transform, max_words, False, check_images, clean)
        self.text, self.img2txt, self.txt2img = [], [], []
        for i, item in enumerate(self.items):
            self.img2txt.append(list(range(len(self.text), len(self.text) + len(item["captions"]))))
            self.text += item["captions"]
            self.txt2img += [i] * len(item["captions"])

    def __getitem__(self, i):
        (image,), _ = self.load(i)
        return {"image": image, "index": i}


class CaptionDataset(PretrainDataset):
    """Captioning on the retrieval files. train: {"image", "text"} like PretrainDataset; eval:
    {"image", "index"}, the cleaned reference captions of image i in .references[i] and the captions
    as the file has them in .raw_references[i] (the COCO evaluation cleans them its own way); an
    entry's "image_id", if it has one, in its item."""

    def __init__(self, source, image_root=None, transform=None, train=True, max_words=30,
                 check_images=True, clean=pre_caption):
        super().__init__(source, image_root, transform, max_words, train, check_images, clean)
        self.train = train
        self.references = [item["captions"] for item in self.items]
        self.raw_references = [item["raw"] for item in self.items]

    def parse(self, entry):
        item = super().parse(entry)
        return {**item, "raw": [entry["caption"]] if isinstance(entry["caption"], str)
                else list(entry["caption"]),
                "image_id": _field(entry, "image_id", (str, int), "a string or an int", True)}

    def __getitem__(self, i):
        if self.train:
            return super().__getitem__(i)
        (image,), _ = self.load(i)
        return {"image": image, "index": i}


class VQADataset(JSONDataset):
    """{"question_id", "question", "answer": [str, ...], "image"}, and optionally "dataset": "vqa"
    or "vg" (Visual Genome QA, whose "answer" may be one string), as ALBEF's files; an entry
    without "question_id" has None in .question_ids.
    train -> {"image", "question", "answers", "weights"}: each distinct answer once, with its weight:
    weighting "score", the VQA soft score min(1, count / 3) (a classifier's target), or "share",
    count / number of answers (ALBEF's and BLIP's decoder); a VG answer weighs vg_weight (ALBEF
    0.5, BLIP 0.2). eval -> {"image", "question", "index"}; answers optional. clean: the question
    cleaning (pre_question as ALBEF, pre_question_blip as BLIP).
    .answer_list: the candidate answers (a list, a JSON file of one, or all answers seen)."""

    def __init__(self, source, image_root=None, transform=None, train=True, answer_list=None,
                 max_words=30, check_images=True, weighting="score", vg_weight=0.5,
                 clean=pre_question):
        if weighting not in ("score", "share"):
            raise ValueError(f"weighting must be 'score' or 'share', got {weighting!r}")
        self.train, self.max_words, self.clean = train, max_words, clean
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
                "question_id": _field(entry, "question_id", (str, int), "a string or an int", True),
                "question": _texts(entry, "question", self.clean, self.max_words)[0],
                "answers": answers, "dataset": dataset}

    def __getitem__(self, i):
        item = self.items[i]
        (image,), (question, *answers) = self.load(i, item["question"], *item["answers"])
        if not self.train:
            return {"image": image, "question": question, "index": i}
        counts = Counter(answers)
        if item["dataset"] == "vg":
            weights = [self.vg_weight] * len(counts)
        elif self.weighting == "share":
            weights = [k / len(answers) for k in counts.values()]
        else:
            weights = [min(1.0, k / 3) for k in counts.values()]
        return {"image": image, "question": question, "answers": list(counts), "weights": weights}


class NLVRDataset(JSONDataset):
    """{"images": [left, right], "sentence", "label": bool or "True"/"False"}, and optionally
    NLVR2's "identifier" (kept in the item) ->
    {"image0", "image1", "text", "label": 0/1}. Never flipped: in NLVR2 'left' may name an image or a
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
                "label": int(label in (True, "True")),
                "identifier": _field(entry, "identifier", str, "a string", optional=True)}

    def __getitem__(self, i):
        (image0, image1), (sentence,) = self.load(i, self.items[i]["sentence"])
        return {"image0": image0, "image1": image1, "text": sentence,
                "label": self.items[i]["label"]}


VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}     # ALBEF's label ids


class VEDataset(JSONDataset):
    """{"image", "sentence", "label": "entailment"|"neutral"|"contradiction"} ->
    {"image", "text", "label"} with ALBEF's ids: contradiction 0, neutral 1, entailment 2."""

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
        return {"image": image, "text": sentence, "label": self.items[i]["label"]}


# -----------------------------------------------------------------------------
# Collate


def pad_to(ids, mask, max_len, pad_id):
    """(B, L) ids and mask padded on the right to (B, max_len), as BLIP's tokenizer call
    (padding='max_length'); the padding is masked, so it changes no result."""
    return (F.pad(ids, (0, max_len - ids.shape[1]), value=pad_id),
            F.pad(mask, (0, max_len - mask.shape[1])))


def collate(batch, tokenizer, max_len, pad_to_max_len=False):
    """Samples (dicts) -> one batch (a dict), field by field: a tensor is stacked (images
    (B, 3, H, W)); a text "k" becomes "k_ids" and "k_mask" (B, L), L the longest (or max_len with
    pad_to_max_len); an int becomes a LongTensor (B,); a list of texts per sample (VQA answers,
    every caption of an image) becomes "k_ids", "k_mask" over all of them (sum n, L) and
    "k_count", the n of each sample (B,); a list of floats (VQA weights) one FloatTensor
    (sum n,)."""
    out = {}
    for key in batch[0]:
        column = [sample[key] for sample in batch]
        first = column[0]
        if torch.is_tensor(first):
            out[key] = torch.stack(column)
        elif isinstance(first, str):
            ids, mask = tokenizer(column, max_len)
            out[f"{key}_ids"], out[f"{key}_mask"] = (
                pad_to(ids, mask, max_len, tokenizer.pad_id) if pad_to_max_len else (ids, mask))
        elif isinstance(first, int):
            out[key] = torch.tensor(column, dtype=torch.long)
        elif first and isinstance(first[0], str):
            out[f"{key}_ids"], out[f"{key}_mask"] = tokenizer(
                [t for texts in column for t in texts], max_len)
            out[f"{key}_count"] = torch.tensor([len(texts) for texts in column])
        else:
            out[key] = torch.tensor([x for xs in column for x in xs], dtype=torch.float)
    return out


def make_collate(tokenizer, max_len, pad_to_max_len=False):
    """collate_fn for any dataset here; tokenizer(texts, max_len) -> (ids, mask). A partial of a
    module function, so DataLoader workers can pickle it."""
    return partial(collate, tokenizer=tokenizer, max_len=max_len, pad_to_max_len=pad_to_max_len)


def to_device(batch: dict, device) -> dict:
    """A collated batch's tensors on the device (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# Entries whose image cannot be read, in training


class SkipUnreadable(Dataset):
    """dataset[i], or, if its image cannot be read (the dataset raises OSError: unreadable,
    truncated, empty or missing file), the next entry's, and so on: returns (sample, [(index,
    message) of each entry skipped]). The skipped entries travel with the sample, so they reach
    the main process from DataLoader workers too. After `max_tries` unreadable entries in a row
    the sample is None: the run stops then (Watch), as the limit is passed."""

    def __init__(self, dataset, max_tries: int, seed: tuple[int, ...] = ()):
        self.dataset, self.max_tries = dataset, min(max_tries, len(dataset))
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        # each sample draws its crop, flip, caption and RandAugment from its own generator, seeded
        # by (seed, index): the same in the main process as in any worker, so the data do not
        # depend on num_workers and a resumed run draws what the uninterrupted one would
        sample_seed = int(np.random.SeedSequence([*self.seed, i]).generate_state(1, np.uint64)[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)    # the CPU's alone: a GPU's
                                                                # stream is the training's
            skipped = []
            for j in range(i, i + self.max_tries):
                j %= len(self.dataset)
                try:
                    return self.dataset[j], skipped
                except OSError as e:
                    skipped.append((j, str(e)))
            return None, skipped


def collate_skipping(batch, collate):
    """(collate(samples), the entries skipped to get them); (None, ...) if a sample is None."""
    samples, skipped = zip(*batch)
    batch = None if any(s is None for s in samples) else collate(list(samples))
    return batch, [s for ss in skipped for s in ss]
