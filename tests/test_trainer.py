"""trainer.py: the fine-tuning learning-rate schedules (trainer.lr_at) against the official code
that they follow: ALBEF's fine-tuning scripts stepping timm's cosine scheduler, BLIP's per-epoch
cosine. Under 2 gloo ranks (torchrun), each rank draws its own random stream while the sampler's
shuffle is shared, a resumed run continues exactly, and a loader failing on one rank stops
them all (ddp_probe.py fit); the skipping of unreadable entries."""
import json
import math
import os

import pytest
import torch
from torch.utils.data import DistributedSampler

import ddp_probe
from test_train_pretrain import torchrun
from data import SkipUnreadable, collate_skipping
from trainer import RunConfig, lr_at


def albef_rates(epochs, warmup_epochs, steps_per_epoch, lr, warmup_lr, min_lr, at_epoch_start):
    """The learning rate of every iteration as ALBEF's fine-tuning scripts produce it: timm's
    CosineLRScheduler (t_initial = epochs, cycle limit 1, and warmup_prefix True, the default of
    ALBEF's copy in scheduler/cosine_lr.py) stepped with
    step(i // 100) after iteration i of epoch 0 while i <= 100 x warmup_epochs, then once per
    epoch: step(epoch + warmup + 1) at its end (Retrieval.py, VE.py, NLVR.py) or
    step(epoch + warmup) at the start of epochs >= 1 (VQA.py, Pretrain.py)."""
    timm = pytest.importorskip("timm.scheduler")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = timm.CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
                                   warmup_lr_init=warmup_lr, warmup_prefix=True, cycle_limit=1,
                                   t_in_epochs=True)
    rates = []
    for epoch in range(epochs):
        if at_epoch_start and epoch > 0:
            sched.step(epoch + warmup_epochs)
        for i in range(steps_per_epoch):
            rates.append(opt.param_groups[0]["lr"])
            if epoch == 0 and i % 100 == 0 and i <= warmup_epochs * 100:
                sched.step(i // 100)
        if not at_epoch_start:
            sched.step(epoch + warmup_epochs + 1)
    return rates


@pytest.mark.parametrize("epochs, warmup_epochs, lr, steps, at_start", [
    (5, 1, 1e-5, 250, False),        # retrieval (COCO, Flickr30K)
    (8, 4, 2e-5, 450, True),         # VQA
    (3, 1, 2e-5, 130, False),        # SNLI-VE
])
def test_albef_schedule_equals_timm_stepped_as_albef(epochs, warmup_epochs, lr, steps, at_start):
    run = RunConfig(schedule="albef", epochs=epochs, lr=lr, warmup_lr=1e-5, min_lr=1e-6,
                    warmup_steps=100 * warmup_epochs)
    want = albef_rates(epochs, warmup_epochs, steps, lr, 1e-5, 1e-6, at_start)
    ours = [lr_at(s, steps, run) for s in range(epochs * steps)]
    assert ours == pytest.approx(want, rel=1e-12)
    assert len(set(want)) >= epochs       # every epoch has its own rate


def test_epoch_cosine_is_blips():
    run = RunConfig(schedule="epoch_cosine", epochs=6, lr=1e-5, min_lr=0.0)
    for step in range(6 * 7):
        epoch = step // 7      # BLIP's cosine_lr_schedule(optimizer, epoch, max_epoch, init, min)
        want = (1e-5 - 0.0) * 0.5 * (1.0 + math.cos(math.pi * epoch / 6)) + 0.0
        assert lr_at(step, 7, run) == pytest.approx(want, rel=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule 'step' is not one of .*epoch_cosine"):
        RunConfig(schedule="step")



def test_two_ranks_own_streams_shared_shuffle_exact_resume(tmp_path):
    proc = torchrun([os.path.join("tests", "ddp_probe.py"), "fit", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    def draws(name, rank):
        with open(tmp_path / name / f"draws_{rank}.json") as f:
            return {int(s): d for s, d in json.load(f).items()}

    straight = [draws("straight", r) for r in (0, 1)]
    resumed = [draws("resumed", r) for r in (0, 1)]
    assert sorted(straight[0]) == list(range(1, 7))
    for rank in (0, 1):
        assert resumed[rank] == straight[rank]       # the same batches and draws, bit for bit
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the shuffle is the shared DistributedSampler's: 32 samples, 2 ranks x 4 a step, 4 steps an
    # epoch; each rank reads its part of the same permutation
    for rank in (0, 1):
        for epoch, steps in ((0, range(1, 5)), (1, range(5, 7))):
            sampler = DistributedSampler(range(ddp_probe.SAMPLES), 2, rank, shuffle=True, seed=0,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            got = [i for s in steps for i in straight[rank][s]["index"]]
            assert got == [float(i) for i in list(sampler)[:len(got)]]
    # each rank its own stream: in the data (flips, crops) and in the step (masks, negatives)
    for step in range(1, 7):
        for key in ("augment", "in_step"):
            assert straight[0][step][key] != straight[1][step][key], (step, key)
    # a loader failing on rank 1 stops both ranks at the same step, with its message
    for rank in (0, 1):
        stopped = (tmp_path / "failing" / f"stopped_{rank}.txt").read_text()
        assert "data loading failed on rank 1: ValueError: broken sample" in stopped
    logged = [json.loads(line) for line in open(tmp_path / "failing" / "log.jsonl")]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]


class Flaky(torch.utils.data.Dataset):
    """Sample i is i, unless i is bad: then reading it raises OSError, as an unreadable image."""

    def __init__(self, n, bad):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"cannot read image {i}.jpg")
        return i


def test_skip_unreadable_takes_the_next_entry_and_reports_the_skipped():
    ds = SkipUnreadable(Flaky(6, {1, 2, 5}), max_tries=4)
    assert ds[0] == (0, [])
    assert ds[1] == (3, [(1, "cannot read image 1.jpg"), (2, "cannot read image 2.jpg")])
    assert ds[5] == (0, [(5, "cannot read image 5.jpg")])                 # wraps around
    assert SkipUnreadable(Flaky(6, {1, 2, 3}), max_tries=2)[1][0] is None  # gives up
    assert SkipUnreadable(Flaky(3, {0, 1, 2}), max_tries=10)[0] == (
        None, [(i, f"cannot read image {i}.jpg") for i in range(3)])      # each entry once
    batch, skipped = collate_skipping([ds[1], ds[4]], torch.utils.data.default_collate)
    assert batch.tolist() == [3, 4] and [i for i, _ in skipped] == [1, 2]
    assert collate_skipping([ds[0], (None, [(7, "x")])],
                            torch.utils.data.default_collate)[0] is None
