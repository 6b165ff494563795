"""Lars against the independent float64 MLPerf reference (tests/reference.py), step by step.

Same fixture as the LAMB tests: sizes 1 / 18011 / matrix / empty / zero-initialised, a gradient
exactly zero at step 1, a gradient None at step 3, a frozen parameter, two param groups (the second
with weight_decay 0 and its own lr), foreach off and on; params and every state tensor compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from lamb import Lars
from reference import (
    F32_EPS,
    RefLars,
    fp32_tolerance,
    make_grads,
    make_params,
    param_names,
    set_grads,
    state_items,
)

STEPS = 7
BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)

# name -> (optimizer options, overrides for group 1 (default: weight_decay 0, lr 0.05))
VARIANTS = {
    "mlperf_default": ({}, {}),
    "paper_tc": ({"trust_coefficient": 0.001, "lr": 2.0}, {}),
    "no_momentum": ({"momentum": 0.0}, {}),
    "nesterov": ({"nesterov": True}, {}),
    "denominator_norm": ({"denominator": "norm"}, {}),
    "denominator_norm_nesterov": ({"denominator": "norm", "nesterov": True}, {}),
    "eps": ({"eps": 1e-2}, {}),
    # LARC clip: group 0 (lr 1e-3, ratio ~ tc = 2e-2 > lr) is clipped to ratio 1, group 1 (lr 0.05) is not
    "larc_clip": ({"trust_clip": True, "lr": 1e-3}, {}),
    "larc_clip_norm": ({"trust_clip": True, "lr": 1e-3, "denominator": "norm"}, {}),
    "layer_adaptation_off_group": ({}, {"layer_adaptation": False, "weight_decay": 1e-3}),
    "maximize": ({"maximize": True}, {}),
    "mlperf_resnet_32k": ({"momentum": 0.94, "weight_decay": 2.5e-5, "trust_coefficient": 0.001, "lr": 21.2}, {"layer_adaptation": False}),
    "no_decay": ({"weight_decay": 0.0}, {}),
}


def build(variant, dtype=torch.float64, foreach=False):
    opts, g1_over = VARIANTS[variant]
    params, g0, g1 = make_params(dtype=dtype)
    groups = [{"params": g0}, {"params": g1, "weight_decay": 0.0, "lr": 0.05, **g1_over}]
    kw = {**BASE, **opts}
    ref = RefLars.from_params(groups, **kw)
    opt = Lars(groups, foreach=foreach, **kw)
    return params, [g0, g1], opt, ref


def compare(opt, ref, step, rtol, atol_scale, label=""):
    pkg_params = [p for g in opt.param_groups for p in g["params"]]
    for i, (p, r) in enumerate(zip(pkg_params, ref.params)):
        scale = float(r.abs().max()) if r.numel() else 1.0
        torch.testing.assert_close(
            p.detach().double(), r, rtol=rtol, atol=atol_scale * max(scale, 1e-30), msg=lambda m: f"{label} step {step} param {i}: {m}"
        )
    for key, st, rst in state_items(opt, ref):
        if rst is None:
            assert not st or float(st.get("step", 0)) == 0
            continue
        assert float(st["step"]) == rst["step"], (label, step, key)
        r = rst["momentum_buffer"]
        scale = float(r.abs().max()) if r.numel() else 1.0
        torch.testing.assert_close(
            st["momentum_buffer"].double(), r, rtol=rtol, atol=atol_scale * max(scale, 1e-30),
            msg=lambda m: f"{label} step {step} {key} momentum_buffer: {m}",
        )
        for name in ("trust_ratio", "weight_norm", "update_norm"):
            got, want = float(st[name]), rst[name]
            assert math.isclose(got, want, rel_tol=max(rtol, 4 * F32_EPS), abs_tol=1e-30), (label, step, key, name, got, want)


@pytest.mark.parametrize("foreach", [False, True], ids=["for_loop", "foreach"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_matches_reference(variant, foreach):
    params, groups, opt, ref = build(variant, foreach=foreach)
    names = param_names(params)
    frozen = params["frozen"].detach().clone()
    for step in range(1, STEPS + 1):
        grads = make_grads(groups, step, names=names)
        set_grads(groups, grads)
        before = params["sometimes"].detach().clone()
        opt.step()
        ref.step(grads)
        compare(opt, ref, step, rtol=1e-12, atol_scale=1e-12, label=variant)
        if step == 3:
            assert torch.equal(params["sometimes"].detach(), before)
    assert torch.equal(params["frozen"].detach(), frozen)
    assert params["zeros"].detach().abs().sum() > 0


@pytest.mark.parametrize("foreach", [False, True], ids=["for_loop", "foreach"])
@pytest.mark.parametrize("variant", ["mlperf_default", "nesterov", "denominator_norm", "larc_clip"])
def test_float32_matches_reference(variant, foreach):
    params, groups, opt, ref = build(variant, dtype=torch.float32, foreach=foreach)
    names = param_names(params)
    numel = max(p.numel() for p in params.values())
    for step in range(1, STEPS + 1):
        grads = make_grads(groups, step, names=names)
        grads = [[None if g is None else g.float().double() for g in gs] for gs in grads]
        set_grads(groups, grads)
        opt.step()
        ref.step(grads)
        # the momentum buffer accumulates the scaled updates: same error model as LAMB (see
        # reference.fp32_tolerance), with fewer elementwise ops
        tol = fp32_tolerance(step, numel, ops=8)
        compare(opt, ref, step, rtol=tol, atol_scale=tol, label=variant)


def test_mlperf_local_lr_by_hand():
    """One step by hand: local lr = eta ||w|| / (||g|| + wd ||w|| + eps); v = lr*ratio*(g + wd w); w -= v."""
    w0 = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||w|| = 5
    g = torch.tensor([0.0, 2.0], dtype=torch.float64)  # ||g|| = 2
    lr, wd, tc, mu = 0.5, 0.1, 0.01, 0.9
    p = w0.clone().requires_grad_()
    opt = Lars([p], lr=lr, momentum=mu, weight_decay=wd, trust_coefficient=tc)
    p.grad = g.clone()
    opt.step()
    ratio = tc * 5.0 / (2.0 + wd * 5.0)
    v1 = lr * ratio * (g + wd * w0)
    torch.testing.assert_close(p.detach(), w0 - v1, rtol=1e-14, atol=0)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], v1, rtol=1e-14, atol=0)
    assert math.isclose(float(opt.state[p]["trust_ratio"]), ratio, rel_tol=1e-6)
    # second step, nesterov off: v2 = mu v1 + lr ratio2 d2
    w1 = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    ratio2 = tc * w1.norm().item() / (2.0 + wd * w1.norm().item())
    v2 = mu * v1 + lr * ratio2 * (g + wd * w1)
    torch.testing.assert_close(p.detach(), w1 - v2, rtol=1e-14, atol=1e-16)


def test_zero_parameter_gets_ratio_one():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = Lars([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    p.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), rtol=1e-14, atol=0)
    assert float(opt.state[p]["trust_ratio"]) == 1.0


@pytest.mark.parametrize("foreach", [False, True], ids=["for_loop", "foreach"])
def test_larc_clip_leaves_zero_norm_ratio_at_one(foreach):
    """apex LARC clips only a computed ratio (``if param_norm != 0 and grad_norm != 0: ... if clip:
    adaptive_lr = min(adaptive_lr / lr, 1)``): a zero-initialised parameter keeps ratio 1 and moves by
    lr * g whatever lr is.  LARS learning rates are often above 1 (MLPerf: 10 to 24.7), where
    clipping the 1 to min(1 / lr, 1) would shrink its step by lr."""
    lr = 4.0
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = Lars([p], lr=lr, momentum=0.9, trust_clip=True, foreach=foreach)
    ref = RefLars.from_params([p], lr=lr, momentum=0.9, trust_clip=True)
    g = torch.ones(2, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    ref.step([[g]])
    torch.testing.assert_close(p.detach(), ref.params[0], rtol=1e-14, atol=0)  # -4.0 each
    assert float(opt.state[p]["trust_ratio"]) == 1.0
