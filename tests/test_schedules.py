"""lamb.schedules against values computed by hand from the published formulas.

NVIDIA PolyWarmUpScheduler (DeepLearningExamples BERT): p = step / total;
    lr = base * p / w while p < w, else base * (1 - p)^power.
MLPerf ResNet-50 (lars_util.py): lr = base * step / warmup while step < warmup, else
    (base - end) * (1 - min(step - warmup, D) / D)^power + end,  D = train_steps - warmup_steps + 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from lamb import Lamb, Lars, schedules


# (step, total, warmup fraction, power, expected multiplier), expectations written out by hand
POLY_WARMUP_CASES = [
    (0, 100, 0.1, 0.5, 0.0),
    (5, 100, 0.1, 0.5, 0.5),  # p = 0.05 < 0.1: 0.05 / 0.1
    (9, 100, 0.1, 0.5, 0.9),
    (10, 100, 0.1, 0.5, math.sqrt(0.9)),  # p = w: decay branch, (1 - 0.1)^0.5
    (50, 100, 0.1, 0.5, math.sqrt(0.5)),
    (75, 100, 0.1, 2.0, 0.0625),  # (1 - 0.75)^2
    (99, 100, 0.1, 0.5, 0.1),  # sqrt(0.01)
    (0, 7038, 0.2843, 0.5, 0.0),
    (1000, 7038, 0.2843, 0.5, (1000 / 7038) / 0.2843),
    (2001, 7038, 0.2843, 0.5, math.sqrt(1 - 2001 / 7038)),  # 2001/7038 = 0.28431 >= w
    (5, 100, 0.0, 0.5, math.sqrt(0.95)),  # no warmup
]


@pytest.mark.parametrize("step,total,warmup,power,expected", POLY_WARMUP_CASES)
def test_poly_warmup_by_hand(step, total, warmup, power, expected):
    assert math.isclose(schedules.poly_warmup(step, total, warmup, power), expected, rel_tol=1e-12, abs_tol=1e-15)


def test_poly_warmup_nvidia_phase1_peak():
    # NVIDIA phase 1: 7038 steps, warmup 0.2843: the multiplier rises to ~1 at step 2001 and then decays
    f = [schedules.poly_warmup(s, 7038, 0.2843) for s in range(7038)]
    peak = max(range(7038), key=lambda s: f[s])
    assert peak in (2000, 2001)
    assert all(a <= b for a, b in zip(f[:2000], f[1:2001]))
    assert all(a >= b for a, b in zip(f[2001:-1], f[2002:]))


# MLPerf 32k row of RECIPES.md: base 21.2, warmup 16 epochs; we use small numbers to do it by hand.
def test_mlperf_decay_steps_rule():
    assert schedules.mlperf_decay_steps(train_steps=100, warmup_steps=10) == 91


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),
        (5, 2.0 * 5 / 10),
        (9, 2.0 * 9 / 10),
        (10, 2.0),  # (2 - 1e-4) * 1 + 1e-4
        (20, (2.0 - 1e-4) * (1 - 10 / 91) ** 2 + 1e-4),
        (100, (2.0 - 1e-4) * (1 - 90 / 91) ** 2 + 1e-4),
        (101, 1e-4),  # s = 91 = D: the end lr
        (500, 1e-4),  # past the end the lr stays at end_lr
    ],
)
def test_mlperf_poly_by_hand(step, expected):
    got = schedules.mlperf_poly(step, base_lr=2.0, warmup_steps=10, decay_steps=91, end_lr=1e-4, power=2.0)
    assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-15)


def test_scaling_rules():
    assert math.isclose(schedules.sqrt_scaling(1e-3, 512, 32768), 1e-3 * 8.0, rel_tol=1e-12)
    assert math.isclose(schedules.linear_scaling(0.1, 256, 4096), 1.6, rel_tol=1e-12)
    assert math.isclose(schedules.sqrt_scaling(2.0, 1024, 256), 1.0, rel_tol=1e-12)


def test_poly_warmup_with_lambdalr_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lamb([p], lr=0.5)
    sched = LambdaLR(opt, lambda s: schedules.poly_warmup(s, 20, 0.25))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    want = [0.5 * ((s / 20) / 0.25 if s / 20 < 0.25 else (1 - s / 20) ** 0.5) for s in range(20)]
    assert seen == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_scheduler_helpers():
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    opt = Lars([{"params": [p]}, {"params": [q], "lr": 1.0}], lr=2.0)
    sched = schedules.mlperf_scheduler(opt, warmup_steps=10, train_steps=100, end_lr=1e-4)
    assert isinstance(sched, LambdaLR)
    lrs = []
    for _ in range(30):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()  # no grads: a no-op step, keeps the scheduler's order check quiet
        sched.step()
    for s, (a, b) in enumerate(lrs):
        for base, got in ((2.0, a), (1.0, b)):
            want = base * s / 10 if s < 10 else (base - 1e-4) * (1 - (s - 10) / 91) ** 2 + 1e-4
            assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15), (s, base, got, want)
    opt2 = Lamb([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    s2 = schedules.warmup_poly_scheduler(opt2, total_steps=10, warmup=0.2)
    got = []
    for _ in range(10):
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        s2.step()
    assert got == pytest.approx([0.1 * ((s / 10) / 0.2 if s < 2 else (1 - s / 10) ** 0.5) for s in range(10)], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "call",
    [
        lambda: schedules.poly_warmup(1, 0, 0.1),
        lambda: schedules.poly_warmup(1, 10, 1.5),
        lambda: schedules.mlperf_poly(1, base_lr=1.0, warmup_steps=2, decay_steps=0),
    ],
)
def test_bad_schedule_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
