"""The fine-tuning learning-rate schedules (trainer.lr_at) against the official code that they
follow: ALBEF's fine-tuning scripts stepping timm's cosine scheduler, BLIP's per-epoch cosine."""
import math

import pytest
import torch

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
