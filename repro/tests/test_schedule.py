"""The one learning-rate schedule: each experiment's warm-up and cosine as its closed form, step by step
through torch's LRScheduler, and a state_dict that resumes to the same learning rates."""

from __future__ import annotations

import math

import pytest
import torch

from adoptim_repro.schedule import Schedule, WarmupCosine


def _lm_closed_form(step, steps, base, warmup, min_ratio):
    # The language models' schedule as lm_train wrote it before it became WarmupCosine.
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("steps,base,warmup,ratio", [(1000, 2e-3, 100, 0.1), (300, 1e-3, 9, 0.0), (40, 2e-3, 5, 0.1)])
def test_language_model_schedule_is_its_closed_form_exactly(steps, base, warmup, ratio):
    fn = WarmupCosine(base, steps, warmup, floor=ratio)
    assert [fn(t) for t in range(steps + 1)] == [_lm_closed_form(t, steps, base, warmup, ratio)
                                                 for t in range(steps + 1)]  # bit for bit


def test_cifar_and_swin_schedules_are_their_closed_forms():
    total = 390
    cifar = WarmupCosine(0.01, total)  # cosine from lr to 0, no warm-up
    for t in range(total + 1):
        assert cifar(t) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * t / total)), rel=1e-14, abs=1e-18)
    spe, warm, epochs = 5, 2, 10  # Swin: warm-up from 1e-6 over 2 epochs, then cosine to 1e-5
    swin = WarmupCosine(1e-3, epochs * spe, warm * spe, floor=1e-5 / 1e-3, start=1e-6, reach_peak_after_warmup=True)
    for t in range(epochs * spe + 1):
        if t < warm * spe:
            want = 1e-6 + (1e-3 - 1e-6) * t / (warm * spe)
        else:
            want = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (t - warm * spe) / ((epochs - warm) * spe)))
        assert swin(t) == pytest.approx(want, rel=1e-13)
    assert swin(warm * spe) == pytest.approx(1e-3) and swin(epochs * spe) == pytest.approx(1e-5)


def _optimizer():
    p = torch.nn.Parameter(torch.ones(2))
    return p, torch.optim.SGD([{"params": [p]}, {"params": []}], lr=123.0)


def test_schedule_sets_every_group_to_the_function_of_the_step():
    fn = WarmupCosine(0.5, 20, 4, floor=0.1)
    p, opt = _optimizer()
    sched = Schedule(opt, fn)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert seen == [[fn(t)] * 2 for t in range(20)]
    assert sched.get_last_lr() == [fn(20)] * 2


def test_state_dict_resumes_to_the_same_learning_rates():
    fn = WarmupCosine(0.5, 30, 5, floor=0.1)

    def run(n, state=None):
        p, opt = _optimizer()
        sched = Schedule(opt, fn)
        if state is not None:
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        lrs = []
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones(2)
            opt.step()
            sched.step()
        return lrs, {"opt": opt.state_dict(), "sched": sched.state_dict()}

    whole, _ = run(30)
    first, saved = run(12)
    assert saved["sched"] == {"last_epoch": 12}  # plain data: loads with weights_only=True
    rest, _ = run(18, saved)
    assert first + rest == whole
    # A checkpoint that holds only the step (written before the schedule had a state) resumes the same.
    _, bare = run(12)
    bare["sched"] = {"last_epoch": 12}
    bare["opt"]["param_groups"][0]["lr"] = 99.0  # whatever lr the old checkpoint held
    assert run(18, bare)[0] == rest
