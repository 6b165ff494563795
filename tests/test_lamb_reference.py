"""Lamb against the independent float64 reference (tests/reference.py), step by step.

Every variant switch is run for 7 steps on the edge-case parameter set of ``reference.make_params``
(sizes 1, 18011, a matrix, an empty tensor, a zero-initialised tensor, a gradient that is exactly
zero at step 1, a gradient that is None at step 3, a frozen parameter), in two param groups (the
second with weight_decay 0 and its own lr), with foreach off, on, and on with a small cache block.  After
every step the parameters and every state tensor (step, exp_avg, exp_avg_sq, trust_ratio, weight_norm,
update_norm) are compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from lamb import Lamb, _chunks
from reference import (
    F32_EPS,
    RefLamb,
    fp32_tolerance,
    make_grads,
    make_params,
    param_names,
    set_grads,
    state_items,
)

STEPS = 7

# name -> (optimizer options, overrides for group 1).  Group 0 always uses the optimizer's options;
# group 1 sets weight_decay 0 and lr 0.02 unless the variant overrides it.
VARIANTS = {
    "alg2_default": ({}, {}),
    "alg2_no_decay": ({"weight_decay": 0.0}, {}),
    "bias_correction_off": ({"bias_correction": False}, {}),
    "bias_correction_none_str": ({"bias_correction": "none"}, {}),
    "bias_correction_moments_str": ({"bias_correction": "moments"}, {}),
    "bias_correction_lr_deepspeed": ({"bias_correction": "lr"}, {}),
    "decay_l2": ({"weight_decay_mode": "l2"}, {}),
    "decay_decoupled": ({"weight_decay_mode": "decoupled"}, {}),
    "decay_decoupled_lr_bias": ({"weight_decay_mode": "decoupled", "bias_correction": "lr"}, {}),
    "no_grad_averaging": ({"grad_averaging": False}, {}),
    "max_grad_norm_active": ({"max_grad_norm": 1.0}, {}),
    "max_grad_norm_inactive": ({"max_grad_norm": 1e6}, {}),
    "ratio_clamp_deepspeed": ({"min_trust_ratio": 0.01, "max_trust_ratio": 0.3}, {}),
    "ratio_min_only": ({"min_trust_ratio": 0.9}, {}),
    "ratio_max_only": ({"max_trust_ratio": 0.5}, {}),
    "lambc_trust_clip": ({"trust_clip": True}, {}),
    "weight_norm_bounds": ({"weight_norm_bounds": (0.5, 10.0)}, {}),
    "adapt_decayed_only": ({"adapt_decayed_only": True}, {}),
    "layer_adaptation_off_group": ({}, {"layer_adaptation": False, "weight_decay": 0.01}),
    "maximize": ({"maximize": True}, {}),
    "betas_eps": ({"betas": (0.5, 0.9), "eps": 1e-3}, {}),
    "nvlamb": ({"max_grad_norm": 1.0, "adapt_decayed_only": True, "weight_decay": 0.01}, {}),
    "deepspeed_bing_bert": (
        {"bias_correction": False, "min_trust_ratio": 0.01, "max_trust_ratio": 0.3, "max_grad_norm": 1.0},
        {},
    ),
    "apex_l2_noavg": ({"weight_decay_mode": "l2", "grad_averaging": False, "max_grad_norm": 1.0}, {}),
    "timm_lambc_decoupled": ({"trust_clip": True, "weight_decay_mode": "decoupled", "max_grad_norm": 1.0}, {}),
}

BASE = dict(lr=0.01, weight_decay=0.05)


def build(variant, dtype=torch.float64, foreach=False, seed=0):
    opts, g1_over = VARIANTS[variant]
    params, g0, g1 = make_params(dtype=dtype, seed=seed)
    groups = [{"params": g0}, {"params": g1, "weight_decay": 0.0, "lr": 0.02, **g1_over}]
    kw = {**BASE, **opts}
    ref = RefLamb.from_params(groups, **kw)
    opt = Lamb(groups, foreach=foreach, **kw)
    return params, [g0, g1], opt, ref


def compare(opt, ref, step, rtol, atol_scale, label=""):
    """Parameters and every state tensor, against the reference; atol is relative to each tensor's
    largest magnitude so that elements near zero are compared at the same absolute precision."""
    pkg_params = [p for g in opt.param_groups for p in g["params"]]
    for i, (p, r) in enumerate(zip(pkg_params, ref.params)):
        scale = float(r.abs().max()) if r.numel() else 1.0
        torch.testing.assert_close(
            p.detach().double(), r, rtol=rtol, atol=atol_scale * max(scale, 1e-30), msg=lambda m: f"{label} step {step} param {i}: {m}"
        )
    for key, st, rst in state_items(opt, ref):
        if rst is None:
            assert not st or float(st.get("step", 0)) == 0, f"{label} step {step} {key}: state without a step"
            continue
        assert float(st["step"]) == rst["step"], (label, step, key, st["step"], rst["step"])
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0
        for name in ("exp_avg", "exp_avg_sq"):
            r = rst[name]
            scale = float(r.abs().max()) if r.numel() else 1.0
            torch.testing.assert_close(
                st[name].double(), r, rtol=rtol, atol=atol_scale * max(scale, 1e-30), msg=lambda m: f"{label} step {step} {key} {name}: {m}"
            )
        # observability tensors are float32 0-dim whatever the parameter dtype
        for name in ("trust_ratio", "weight_norm", "update_norm"):
            assert st[name].dim() == 0, name
            got, want = float(st[name]), rst[name]
            assert math.isclose(got, want, rel_tol=max(rtol, 4 * F32_EPS), abs_tol=1e-30), (label, step, key, name, got, want)


# The backends under test: the reference for-loop, foreach, and foreach with a cache block of 561 elements
# (lamb._chunks.BLOCK; the default 2**18 holds this whole parameter set in one block): "big" (18011) is then cut
# into 33 pieces, each a block alone whose direction goes to the tensor-sized buffer, "matrix" (33x17 = 561)
# fills a block alone (the one-piece ops straight into the scratch), and the small tensors are packed together.
BACKENDS = {"for_loop": (False, None), "foreach": (True, None), "foreach_block561": (True, 561)}


def _backend(name, monkeypatch):
    foreach, block = BACKENDS[name]
    if block is not None:
        monkeypatch.setattr(_chunks, "BLOCK", block)
    return foreach


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_matches_reference(variant, backend, monkeypatch):
    params, groups, opt, ref = build(variant, foreach=_backend(backend, monkeypatch))
    names = param_names(params)
    frozen_before = params["frozen"].detach().clone()
    for step in range(1, STEPS + 1):
        grads = make_grads(groups, step, names=names)
        set_grads(groups, grads)
        before_sometimes = params["sometimes"].detach().clone()
        opt.step()
        ref.step(grads)
        compare(opt, ref, step, rtol=1e-12, atol_scale=1e-12, label=variant)
        if step == 3:  # gradient None this step: parameter untouched
            assert torch.equal(params["sometimes"].detach(), before_sometimes)
    assert torch.equal(params["frozen"].detach(), frozen_before)
    assert params["frozen"] not in opt.state or not opt.state[params["frozen"]]
    # the zero-initialised parameter moved (ratio 1, not 0) and its state records ratio 1 at step 1
    assert params["zeros"].detach().abs().sum() > 0


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "variant", ["alg2_default", "bias_correction_lr_deepspeed", "decay_decoupled", "nvlamb", "deepspeed_bing_bert"]
)
def test_float32_matches_reference(variant, backend, monkeypatch):
    """fp32 run against the float64 reference fed the same (fp32-representable) init and gradients."""
    params, groups, opt, ref = build(variant, dtype=torch.float32, foreach=_backend(backend, monkeypatch))
    names = param_names(params)
    numel = max(p.numel() for p in params.values())
    for step in range(1, STEPS + 1):
        grads = make_grads(groups, step, names=names)
        grads = [[None if g is None else g.float().double() for g in gs] for gs in grads]
        set_grads(groups, grads)
        opt.step()
        ref.step(grads)
        tol = fp32_tolerance(step, numel, beta2=opt.param_groups[0]["betas"][1])
        compare(opt, ref, step, rtol=tol, atol_scale=tol, label=variant)


def test_foreach_equals_for_loop_float64_tight():
    """The two backends agree with each other to rounding (params and every state tensor)."""
    a = build("nvlamb", foreach=False)
    b = build("nvlamb", foreach=True)
    for step in range(1, STEPS + 1):
        for params, groups, opt, _ in (a, b):
            set_grads(groups, make_grads(groups, step, names=param_names(params)))
            opt.step()
    pa = [p for g in a[2].param_groups for p in g["params"]]
    pb = [p for g in b[2].param_groups for p in g["params"]]
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        sx, sy = a[2].state.get(x, {}), b[2].state.get(y, {})
        assert sx.keys() == sy.keys()
        for k in sx:
            torch.testing.assert_close(sx[k].double(), sy[k].double(), rtol=1e-12, atol=1e-14, msg=k)


def test_zero_parameter_moves_and_keeps_decay():
    """||x|| = 0 gives ratio 1 (not 0): a zero-initialised weight moves at the first step by exactly
    lr * r (Adam's first step r = g/(|g|+eps) elementwise with bias correction), and afterwards its
    decay term is part of the update."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = Lamb([p], lr=0.1, weight_decay=0.5, eps=0.0)
    g = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    # first step with bias correction: m_hat = g, v_hat = g^2, r = sign(g); u = r + wd*0 = r; ratio 1
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(g), rtol=1e-12, atol=0)
    assert float(opt.state[p]["trust_ratio"]) == 1.0
    # second step with a zero gradient: u = r + wd x with x != 0 now: the decay is applied
    ref = RefLamb.from_params([torch.zeros(4, dtype=torch.float64)], lr=0.1, weight_decay=0.5, eps=0.0)
    ref.step([[g]])
    p.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    ref.step([[torch.zeros(4, dtype=torch.float64)]])
    torch.testing.assert_close(p.detach(), ref.params[0], rtol=1e-12, atol=1e-15)


def test_trust_ratio_is_weight_norm_over_update_norm_per_tensor():
    """Algorithm 2 by hand on one step: ratio = ||x|| / ||r + wd x|| with r = sign(g) at step 1."""
    x0 = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||x|| = 5
    p = x0.clone().requires_grad_()
    wd, lr = 0.1, 0.01
    opt = Lamb([p], lr=lr, weight_decay=wd, eps=0.0)
    p.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    u = torch.tensor([1.0, -1.0], dtype=torch.float64) + wd * x0
    ratio = 5.0 / u.norm().item()
    torch.testing.assert_close(p.detach(), x0 - lr * ratio * u, rtol=1e-14, atol=0)
    assert math.isclose(float(opt.state[p]["trust_ratio"]), ratio, rel_tol=1e-6)
    assert math.isclose(float(opt.state[p]["weight_norm"]), 5.0, rel_tol=1e-6)
    assert math.isclose(float(opt.state[p]["update_norm"]), u.norm().item(), rel_tol=1e-6)


def test_max_grad_norm_is_global_over_all_groups():
    """NVLAMB pre-normalisation divides every gradient by the norm over all params of all groups:
    with two groups holding one tensor each, scaling one group's gradient changes the other's moments."""
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = Lamb([{"params": [a]}, {"params": [b]}], lr=0.1, max_grad_norm=1.0)
    a.grad = torch.full((3,), 3.0, dtype=torch.float64)  # ||G|| = sqrt(27 + 48) = sqrt(75)
    b.grad = torch.full((3,), 4.0, dtype=torch.float64)
    opt.step()
    total = math.sqrt(27 + 48)
    # exp_avg = (1 - b1) * g / total
    torch.testing.assert_close(opt.state[a]["exp_avg"], torch.full((3,), 0.1 * 3.0 / total, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.state[b]["exp_avg"], torch.full((3,), 0.1 * 4.0 / total, dtype=torch.float64), rtol=1e-12, atol=0)


def test_bias_correction_lr_mode_equals_deepspeed_formula():
    """DeepSpeed: step_size = lr sqrt(1 - b2^t) / (1 - b1^t), r = m / (sqrt(v) + eps), checked by hand
    at step 1 with weight decay 0 and layer adaptation off (ratio 1), so p1 = p0 - step_size * r."""
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b1, b2, eps, lr = 0.9, 0.999, 1e-6, 0.1
    opt = Lamb([{"params": [p], "layer_adaptation": False}], lr=lr, betas=(b1, b2), eps=eps, bias_correction="lr")
    g = torch.tensor([0.5, -2.0], dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    m, v = (1 - b1) * g, (1 - b2) * g * g
    step_size = lr * math.sqrt(1 - b2) / (1 - b1)
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64) - step_size * m / (v.sqrt() + eps), rtol=1e-13, atol=0)
