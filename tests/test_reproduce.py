"""The commands that reproduce the paper's downstream rows (ALBEF + ELIP, BLIP + ELIP) start and
finish: each (task, preset) of train_downstream.py on tiny files in the official JSON layouts
(ALBEF's and BLIP's data/*.json), one training step, with the architecture and resolution shrunk
by flags, from a tiny checkpoint of the matching backbone."""
import json

import pytest
from PIL import Image

import train_downstream
from test_downstream import pretrained, pretrained_blip  # noqa: F401 (fixtures)

COLOURS = [(220, 40, 40), (40, 200, 70), (40, 90, 235), (245, 215, 30)]
NAMES = ["red", "green", "blue", "yellow"]


def images(root, folder):
    (root / folder).mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (40, 30), colour).save(root / folder / f"{i}.jpg")
    return [f"{folder}/{i}.jpg" for i in range(len(COLOURS))]


def official_files(tmp_path, task, preset):
    """{flag: value} of the data flags, the files written in the layout the official code reads."""
    root = tmp_path / "images"
    ims = images(root, "train2014")

    def write(name, entries):
        (tmp_path / name).write_text(json.dumps(entries))
        return str(tmp_path / name)

    if task in ("retrieval", "caption"):      # ALBEF's coco_*.json / BLIP's coco_karpathy_*.json
        train = write("train.json", [{"image": im, "caption": f"A {n} picture.", "image_id": str(i)}
                                     for i, (im, n) in enumerate(zip(ims, NAMES)) for _ in range(2)])
        tests = [write(f"{s}.json", [{"image": im, "caption": [f"A {n} picture.", f"{n} colour!"]}
                                     for im, n in zip(ims, NAMES)]) for s in ("val", "test")]
        return {"train_file": train, "test_file": ",".join(tests), "image_root": str(root)}
    if task == "vqa":                         # ALBEF's vqa_train.json, vg_qa.json, vqa_test.json
        vg = images(root, "VG_100K")
        qa = lambda i, im, n, d: {"question_id": i, "question": "What colour is it?",
                                  "answer": [n] * (10 if d == "vqa" else 1), "image": im, "dataset": d}
        train = write("vqa_train.json", [qa(i, im, n, "vqa") for i, (im, n) in enumerate(zip(ims, NAMES))])
        vg_qa = write("vg_qa.json", [qa(10 + i, im, n, "vg") for i, (im, n) in enumerate(zip(vg, NAMES))])
        test = write("vqa_test.json", [{"question_id": 100 + i, "question": "What colour is it?",
                                        "image": im, "dataset": "vqa"} for i, im in enumerate(ims)])
        return {"train_file": f"{train},{vg_qa}", "test_file": test, "image_root": str(root),
                "answer_list": write("answer_list.json", NAMES)}
    if task == "ve":                          # ALBEF's ve_train.json, ve_dev.json, ve_test.json
        labels = ["entailment", "neutral", "contradiction", "entailment"]
        entries = [{"image": im, "sentence": f"A {n} thing.", "label": lab}
                   for im, n, lab in zip(ims, NAMES, labels)]
        return {"train_file": write("ve_train.json", entries),
                "val_file": write("ve_dev.json", entries),      # the preset selects on it
                "test_file": write("ve_test.json", entries), "image_root": str(root)}
    entries = [{"images": [ims[i], ims[(i + 1) % 4]], "sentence": f"The left image is {n}.",
                "label": "True" if i % 2 else "False"} for i, n in enumerate(NAMES)]
    return {"train_file": write("nlvr_train.json", entries),       # ALBEF's nlvr_*.json
            "val_file": write("nlvr_dev.json", entries),
            "test_file": write("nlvr_test.json", entries), "image_root": str(root)}


@pytest.mark.parametrize("task, preset", [k for k in train_downstream.TASK_PRESETS
                                          if k[1] != "world"])
def test_paper_commands_start(tmp_path, pretrained, pretrained_blip, task, preset):
    ckpt = pretrained_blip if preset.startswith("blip") else pretrained
    data = official_files(tmp_path, task, preset)
    flags = ["--task", task, "--preset", preset, "--pretrained", ckpt,
             *[x for k, v in data.items() for x in (f"--{k}", v)],
             # shrink: the tiny checkpoint's 32 px ViT fine-tunes at 48 px (not 384), one step
             "--img_size", "48", "--batch_size", "2", "--eval_batch_size", "2", "--max_steps", "1",
             "--eval_k", "3", "--num_workers", "0", "--max_length", "8",
             "--out_dir", str(tmp_path / "out")]
    train_downstream.main(flags)
    rec = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(rec["test"]) == data["test_file"].split(",")
    assert rec["img_size"] == 48 and rec["weights"]["interpolated"]
    preset_values = train_downstream.TASK_PRESETS[(task, preset)]
    assert rec["config"]["run"]["schedule"] == preset_values["schedule"]
    assert rec["config"]["run"]["lr"] == preset_values["lr"]
    if task == "vqa":                         # the test-dev layout has no answers: predictions only
        preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
        assert [p["question_id"] for p in preds[data["test_file"]]] == [100, 101, 102, 103]
