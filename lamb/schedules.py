"""Learning-rate schedules of the published large-batch runs and the batch-size scaling rules.

Each schedule is a small pure function of the optimizer step; ``*_lambda`` wraps it for
``torch.optim.lr_scheduler.LambdaLR`` (which multiplies each group's initial lr by the returned factor).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "poly_warmup", "poly_warmup_lambda", "mlperf_poly", "mlperf_poly_lambda", "mlperf_decay_steps",
    "sqrt_scaling", "linear_scaling", "warmup_poly_scheduler", "mlperf_scheduler",
]


def _check(name: str, value: float, low: float, *, open_low: bool = False, high: float | None = None) -> None:
    bad = not math.isfinite(value) or value < low or (open_low and value == low) or (high is not None and value > high)
    if bad:
        rng = f"{'(' if open_low else '['}{low}, {'inf' if high is None else high}]"
        raise ValueError(f"schedules: invalid {name}={value!r}; allowed: {rng}")


def poly_warmup(step: int, total_steps: int, warmup: float, power: float = 0.5) -> float:
    r"""NVIDIA's ``PolyWarmUpScheduler`` (BERT, NVLAMB) as a multiplier of the base lr.

    .. math:: p = \text{step} / \text{total};\quad
              f = p / w \ (p < w), \qquad f = (1 - p)^{\text{power}} \ (\text{otherwise})

    Args:
        step: optimizer steps taken so far (0 for the first step).
        total_steps: the run's number of optimizer steps (7,038 / 1,563 in NVIDIA's BERT phases).
        warmup: warmup as a fraction of ``total_steps`` (0.2843 / 0.128); 0 for none.
        power: decay exponent (0.5 in NVIDIA's BERT).
    """
    _check("total_steps", total_steps, 0, open_low=True)
    _check("warmup", warmup, 0.0, high=1.0)
    _check("power", power, 0.0)
    p = step / total_steps
    if p < warmup:
        return p / warmup
    return max(0.0, 1.0 - p) ** power


def mlperf_decay_steps(train_steps: int, warmup_steps: int) -> int:
    """MLPerf's ``decay_steps = train_steps - warmup_steps + 1`` (``lars_util.py``)."""
    return train_steps - warmup_steps + 1


def mlperf_poly(step: int, *, base_lr: float, warmup_steps: int, decay_steps: int, end_lr: float = 1e-4,
                power: float = 2.0) -> float:
    r"""MLPerf ResNet-50 LARS schedule (``lars_util.py``): linear warmup from 0, then polynomial decay.

    .. math::
        \eta = \eta_0 \, \text{step} / \text{warmup} \quad (\text{step} < \text{warmup}), \qquad
        \eta = (\eta_0 - \eta_{end}) (1 - \min(s, D) / D)^{\text{power}} + \eta_{end},\ s = \text{step} - \text{warmup}

    Returns the learning rate itself (not a multiplier).
    """
    _check("warmup_steps", warmup_steps, 0)
    _check("decay_steps", decay_steps, 0, open_low=True)
    _check("power", power, 0.0)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    s = min(step - warmup_steps, decay_steps)
    return (base_lr - end_lr) * (1.0 - s / decay_steps) ** power + end_lr


def sqrt_scaling(base_lr: float, base_batch: int, batch: int) -> float:
    """Square-root rule (the LAMB paper): ``lr = base_lr * sqrt(batch / base_batch)``."""
    _check("base_batch", base_batch, 0, open_low=True)
    _check("batch", batch, 0, open_low=True)
    return base_lr * math.sqrt(batch / base_batch)


def linear_scaling(base_lr: float, base_batch: int, batch: int) -> float:
    """Linear rule (Goyal et al. 2017): ``lr = base_lr * batch / base_batch``."""
    _check("base_batch", base_batch, 0, open_low=True)
    _check("batch", batch, 0, open_low=True)
    return base_lr * batch / base_batch


def poly_warmup_lambda(total_steps: int, warmup: float, power: float = 0.5) -> Callable[[int], float]:
    """``poly_warmup`` as a ``LambdaLR`` factor."""
    poly_warmup(0, total_steps, warmup, power)  # validate now, not at the first step
    return lambda step: poly_warmup(step, total_steps, warmup, power)


def mlperf_poly_lambda(*, base_lr: float, warmup_steps: int, decay_steps: int, end_lr: float = 1e-4,
                       power: float = 2.0) -> Callable[[int], float]:
    """``mlperf_poly`` divided by ``base_lr``, as a ``LambdaLR`` factor (the group's lr must be ``base_lr``)."""
    _check("base_lr", base_lr, 0.0, open_low=True)
    kw = dict(base_lr=base_lr, warmup_steps=warmup_steps, decay_steps=decay_steps, end_lr=end_lr, power=power)
    mlperf_poly(0, **kw)
    return lambda step: mlperf_poly(step, **kw) / base_lr


def warmup_poly_scheduler(optimizer: Optimizer, total_steps: int, warmup: float, power: float = 0.5) -> LambdaLR:
    """A ``LambdaLR`` running NVIDIA's poly-warmup schedule on every group's initial lr."""
    return LambdaLR(optimizer, poly_warmup_lambda(total_steps, warmup, power))


def mlperf_scheduler(optimizer: Optimizer, *, warmup_steps: int, train_steps: int, end_lr: float = 1e-4,
                     power: float = 2.0) -> LambdaLR:
    """A ``LambdaLR`` running MLPerf's schedule with each group's initial lr as its base lr."""
    decay = mlperf_decay_steps(train_steps, warmup_steps)
    fns = [mlperf_poly_lambda(base_lr=float(g["lr"]), warmup_steps=warmup_steps, decay_steps=decay,
                              end_lr=end_lr, power=power) for g in optimizer.param_groups]
    return LambdaLR(optimizer, fns)
