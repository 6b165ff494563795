"""Hyperparameter checks that name the option, its value and what is allowed (``ValueError``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}: invalid {name}={value!r}; allowed: {allowed}")


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Check ``low <= value <= high`` (``<`` at an open end); a tensor ``lr`` counts as its number."""
    if value is None and allow_none:
        return
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    allowed = f"a finite number in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{')' if high is None else hi}"
    if allow_none:
        allowed += " or None"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            _fail(owner, name, value, allowed + " (a tensor must hold one element)")
        value_f = float(value.detach())  # construction time only: never inside step()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(owner, name, value, allowed)
        return
    else:
        value_f = float(value)
    if not math.isfinite(value_f):
        _fail(owner, name, value, allowed)
    if low is not None and (value_f < low or (low_open and value_f == low)):
        _fail(owner, name, value, allowed)
    if high is not None and (value_f > high or (high_open and value_f == high)):
        _fail(owner, name, value, allowed)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(owner, name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, name, value, "True or False")


def check_optional_bool(owner: str, name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        _fail(owner, name, value, "True, False or None")
