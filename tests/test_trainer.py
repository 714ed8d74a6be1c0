"""trainer.py: under 2 gloo ranks (torchrun), each rank draws its own random stream while the
sampler's shuffle is shared, and a resumed run continues exactly (ddp_probe.py fit); the
skipping of unreadable entries."""
import json
import os

import torch
from torch.utils.data import DistributedSampler

import ddp_probe
from test_train_pretrain import torchrun
from trainer import SkipUnreadable, collate_skipping


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
