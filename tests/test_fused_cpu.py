"""The fused CPU kernel (cuda/lamb_cpu.cpp, the CPU twin of the CUDA kernels) against the reference backend.

Tolerances come from fp32 rounding: the fused kernel and the reference evaluate the same expressions in
fp32 but differ in a few roundings (reciprocal multipliers for the bias corrections and the gradient
divisor, norms summed in double instead of fp32), so each step may move an element by a few ulps of its
magnitude and of its update; over ``STEPS`` steps that is ``ULPS * STEPS`` eps relative.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lamb import ops
from lamb.lamb import _single_tensor_lamb
from lamb.lars import _single_tensor_lars

ok, why = ops.cpu_status()
pytestmark = pytest.mark.skipif(not ok, reason=f"fused CPU kernel unavailable: {why}")

from lamb._fused import _fused_lamb, _fused_lars, fused_supported  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
STEPS = 4
ULPS = 16
TOL32 = ULPS * STEPS * EPS32
TOL_BF16 = 4 * torch.finfo(torch.bfloat16).eps  # one bf16 rounding of a value the reference rounds too

# sizes: one element, tails shorter than any SIMD width, 18011 (apex's odd size), a 2-D tensor, an empty
# tensor, one tensor spanning several 16Ki-element chunks
SHAPES = [(1,), (3,), (7,), (17,), (18011,), (33, 65), (0,), (40000,)]


@pytest.fixture(scope="module", autouse=True)
def _built():
    ops.load_cpu()


@pytest.fixture(params=["avx2", "base"])
def isa(request):
    want = 1 if request.param == "avx2" else 0
    try:
        got = torch.ops.lamb_cpu.set_isa(want)
    except RuntimeError:
        pytest.skip("AVX2 not available on this machine")
    assert got == want
    yield request.param
    torch.ops.lamb_cpu.set_isa(-1)


def _state(params, masters=False):
    out = []
    for p in params:
        master = p.detach().float().clone() if masters and p.dtype != torch.float32 else None
        buf_dtype = torch.float32 if master is not None else p.dtype
        out.append(dict(
            master=master,
            m=torch.zeros_like(p, dtype=buf_dtype),
            v=torch.zeros_like(p, dtype=buf_dtype),
            step=torch.zeros(()),
            tr=torch.ones(()),
            wn=torch.zeros(()),
            un=torch.zeros(()),
        ))
    return out


def _lamb_call(fn, params, grads, st, **kw):
    fn(params, grads, [s["m"] for s in st], [s["v"] for s in st], [s["master"] for s in st], [s["step"] for s in st],
       [s["tr"] for s in st], [s["wn"] for s in st], [s["un"] for s in st], **kw)


def _lars_call(fn, params, grads, st, **kw):
    fn(params, grads, [s["m"] for s in st], [s["master"] for s in st], [s["step"] for s in st],
       [s["tr"] for s in st], [s["wn"] for s in st], [s["un"] for s in st], **kw)


LAMB_KW = dict(grad_divisor=None, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
               weight_decay_mode="ratio", bias_correction="moments", grad_averaging=True, adapt=True,
               min_trust_ratio=None, max_trust_ratio=None, weight_norm_bounds=None, maximize=False)

LAMB_VARIANTS = {
    "paper": {},
    "bias_lr": dict(bias_correction="lr"),
    "bias_none": dict(bias_correction="none"),
    "l2": dict(weight_decay_mode="l2"),
    "decoupled": dict(weight_decay_mode="decoupled", weight_decay=0.1),
    "no_decay": dict(weight_decay=0.0),
    "no_grad_averaging": dict(grad_averaging=False),
    "maximize": dict(maximize=True),
    "nvlamb_divisor": dict(grad_divisor=torch.tensor(3.7)),
    "clamped": dict(min_trust_ratio=0.5, max_trust_ratio=1.2),
    "lambc": dict(max_trust_ratio=1.0),
    "phi_bounds": dict(weight_norm_bounds=(0.5, 3.0)),
    "no_adapt": dict(adapt=False),
    "check_finite": dict(check_finite=True),
    "tensor_lr": dict(lr=torch.tensor(3e-3)),
}


def _params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


def _close(a, b, tol, what):
    if a.numel() == 0:
        return
    a, b = a.double(), b.double()
    scale = max(a.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{what}: max |diff| {err:.3e} > {tol:.1e} * {scale:.3e}"


def _run_lamb(params, kw, steps=STEPS, masters=False, grad_scale=1.0):
    ref_p = [p.clone() for p in params]
    fus_p = [p.clone() for p in params]
    ref_s, fus_s = _state(ref_p, masters), _state(fus_p, masters)
    ref_kw = {k: v for k, v in kw.items() if k != "check_finite"}
    for step in range(steps):
        grads = _grads(params, step)
        _lamb_call(_single_tensor_lamb, ref_p, grads, ref_s, **ref_kw)
        _lamb_call(_fused_lamb, fus_p, [g.clone() for g in grads], fus_s, **kw)
    return ref_p, fus_p, ref_s, fus_s


@pytest.mark.parametrize("variant", list(LAMB_VARIANTS))
def test_lamb_fp32_matches_reference(variant, isa):
    kw = {**LAMB_KW, **LAMB_VARIANTS[variant]}
    params = _params()
    ref_p, fus_p, ref_s, fus_s = _run_lamb(params, kw)
    for i, (a, b) in enumerate(zip(ref_p, fus_p)):
        _close(a, b, TOL32, f"param {i} {tuple(a.shape)}")
        for key in ("m", "v"):
            _close(ref_s[i][key], fus_s[i][key], TOL32, f"{key} {i}")
        for key in ("tr", "wn", "un"):
            _close(ref_s[i][key], fus_s[i][key], TOL32, f"{key} {i}")
        assert fus_s[i]["step"].item() == STEPS


def test_lamb_many_small_tensors(isa):
    shapes = [(1 + (7 * i) % 23,) for i in range(300)] + [(0,)] * 3
    params = _params(shapes=shapes)
    ref_p, fus_p, ref_s, fus_s = _run_lamb(params, LAMB_KW, steps=2)
    for i, (a, b) in enumerate(zip(ref_p, fus_p)):
        _close(a, b, TOL32, f"param {i}")
        _close(ref_s[i]["tr"], fus_s[i]["tr"], TOL32, f"trust ratio {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lamb_low_precision_with_masters(dtype, isa):
    params = _params(dtype)
    ref_p, fus_p, ref_s, fus_s = _run_lamb(params, LAMB_KW, masters=True)
    for i, (a, b) in enumerate(zip(ref_p, fus_p)):
        _close(ref_s[i]["master"], fus_s[i]["master"], TOL32, f"master {i}")
        for key in ("m", "v", "tr"):
            _close(ref_s[i][key], fus_s[i][key], TOL32, f"{key} {i}")
        # the low-precision copy is the master rounded (round to nearest even, as torch's copy_)
        if fus_s[i]["master"] is not None:
            assert torch.equal(b, fus_s[i]["master"].to(dtype)), f"param {i} is not its master rounded"
        _close(a, b, TOL_BF16 if dtype == torch.bfloat16 else 8 * torch.finfo(torch.float16).eps, f"param {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_lamb_low_precision_without_masters(dtype, isa):
    # Without masters the moments are stored in bf16. The fused kernel updates from the stored (rounded)
    # moments in both passes; the reference uses its fp32 values within the step: differences are a few
    # bf16 roundings. (fp16 moments without masters underflow: v = (1 - b2) g^2 falls below fp16's
    # normal range, so there the two differ by more than rounding; use master_weights=True for fp16.)
    params = _params(dtype, shapes=[(5,), (18011,), (64, 33)])
    ref_p, fus_p, _, _ = _run_lamb(params, LAMB_KW, steps=2)
    tol = 4 * torch.finfo(dtype).eps * 2
    for i, (a, b) in enumerate(zip(ref_p, fus_p)):
        _close(a, b, tol, f"param {i}")


def test_lamb_float64_equations():
    """Independent of the package's reference: LAMB Algorithm 2 in float64, written from the equations."""
    params = _params(shapes=[(10,), (300,)])
    fus_p = [p.clone() for p in params]
    st = _state(fus_p)
    x = [p.double() for p in params]
    m = [torch.zeros_like(t) for t in x]
    v = [torch.zeros_like(t) for t in x]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.01
    for t in range(1, STEPS + 1):
        grads = _grads(params, t)
        _lamb_call(_fused_lamb, fus_p, grads, st, **LAMB_KW)
        for i, g in enumerate(grads):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            u = r + wd * x[i]
            wn, un = x[i].norm().item(), u.norm().item()
            rho = wn / un if wn > 0 and un > 0 else 1.0
            x[i] = x[i] - lr * rho * u
    for a, b in zip(x, fus_p):
        # the fp32 kernel vs exact math: fp32 rounding of the state and of 1 - beta^t (float as the reference)
        _close(a, b, 1e-5, "float64 equations")


def test_lamb_skips_non_finite_steps(isa):
    params = _params(shapes=[(7,), (18011,), (0,)])
    st = _state(params)
    _lamb_call(_fused_lamb, params, _grads(params, 0), st, **LAMB_KW)
    before = copy.deepcopy((params, st))

    def unchanged(what):
        for p0, p1 in zip(before[0], params):
            assert torch.equal(p0, p1), what
        for s0, s1 in zip(before[1], st):
            for k in ("m", "v", "step", "tr", "wn", "un"):
                assert torch.equal(s0[k], s1[k]), f"{what}: state {k} changed"

    bad = _grads(params, 1)
    bad[1][100] = float("nan")
    _lamb_call(_fused_lamb, params, bad, st, **LAMB_KW, check_finite=True)
    unchanged("NaN gradient with check_finite")
    bad[1][100] = float("inf")
    _lamb_call(_fused_lamb, params, bad, st, **LAMB_KW, check_finite=True)
    unchanged("inf gradient with check_finite")
    _lamb_call(_fused_lamb, params, _grads(params, 1), st, **LAMB_KW, found_inf=torch.tensor(1.0))
    unchanged("found_inf")
    _lamb_call(_fused_lamb, params, _grads(params, 1), st, **{**LAMB_KW, "grad_divisor": torch.tensor(float("inf"))})
    unchanged("non-finite NVLAMB divisor")
    _lamb_call(_fused_lamb, params, _grads(params, 1), st, **LAMB_KW, found_inf=torch.tensor(0.0))
    assert st[0]["step"].item() == 2 and not torch.equal(before[0][0], params[0]), "a finite step must apply"


def test_lamb_grad_scale_unscales(isa):
    params = _params(shapes=[(7,), (18011,)])
    p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
    s1, s2 = _state(p1), _state(p2)
    scale = 1024.0
    for step in range(2):
        g = _grads(params, step)
        _lamb_call(_fused_lamb, p1, g, s1, **LAMB_KW)
        _lamb_call(_fused_lamb, p2, [x * scale for x in g], s2, **LAMB_KW, grad_scale=torch.tensor(scale))
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)  # scaling by a power of two is exact


def test_lamb_deterministic_across_thread_counts():
    params = _params(shapes=[(200000,), (18011,)])
    results = []
    n0 = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = [x.clone() for x in params]
            st = _state(p)
            _lamb_call(_fused_lamb, p, _grads(params, 0), st, **LAMB_KW)
            results.append((p, [s["un"].clone() for s in st]))
    finally:
        torch.set_num_threads(n0)
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- LARS
LARS_KW = dict(lr=0.5, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.001, eps=0.0, nesterov=False,
               denominator="sum", trust_clip=False, adapt=True, maximize=False)

LARS_VARIANTS = {
    "mlperf": {},
    "norm": dict(denominator="norm"),
    "nesterov": dict(nesterov=True),
    "larc_clip": dict(trust_clip=True, lr=0.01),
    "eps": dict(eps=1e-8),
    "no_decay": dict(weight_decay=0.0),
    "no_adapt": dict(adapt=False),
    "maximize": dict(maximize=True),
    "check_finite": dict(check_finite=True),
}


@pytest.mark.parametrize("variant", list(LARS_VARIANTS))
def test_lars_fp32_matches_reference(variant, isa):
    kw = {**LARS_KW, **LARS_VARIANTS[variant]}
    params = _params()
    ref_p, fus_p = [p.clone() for p in params], [p.clone() for p in params]
    ref_s, fus_s = _state(ref_p), _state(fus_p)
    for step in range(STEPS):
        g = _grads(params, step)
        _lars_call(_single_tensor_lars, ref_p, g, ref_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        _lars_call(_fused_lars, fus_p, g, fus_s, **kw)
    for i, (a, b) in enumerate(zip(ref_p, fus_p)):
        _close(a, b, TOL32, f"param {i}")
        for key in ("m", "tr", "wn", "un"):
            _close(ref_s[i][key], fus_s[i][key], TOL32, f"{key} {i}")
        assert fus_s[i]["step"].item() == STEPS


def test_lars_bf16_masters_and_skip(isa):
    params = _params(torch.bfloat16)
    ref_p, fus_p = [p.clone() for p in params], [p.clone() for p in params]
    ref_s, fus_s = _state(ref_p, True), _state(fus_p, True)
    for step in range(STEPS):
        g = _grads(params, step)
        _lars_call(_single_tensor_lars, ref_p, g, ref_s, **LARS_KW)
        _lars_call(_fused_lars, fus_p, g, fus_s, **LARS_KW)
    for i in range(len(params)):
        _close(ref_s[i]["master"], fus_s[i]["master"], TOL32, f"master {i}")
        assert torch.equal(fus_p[i], fus_s[i]["master"].to(torch.bfloat16))
    before = copy.deepcopy(fus_s)
    bad = _grads(params, 9)
    bad[4][5] = float("nan")
    _lars_call(_fused_lars, fus_p, bad, fus_s, **LARS_KW, check_finite=True)
    for s0, s1 in zip(before, fus_s):
        for k in ("master", "m", "step", "tr"):
            if s0[k] is not None:
                assert torch.equal(s0[k], s1[k])


# ------------------------------------------------------------------------------------------- classes
def _model_params(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.LayerNorm(65), torch.nn.Linear(65, 7))
    return model.to(dtype)


def _train(opt_factory, steps, model, state_dict=None, g=None):
    opt = opt_factory(model)
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    g = g if g is not None else torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(16, 33, generator=g).to(next(model.parameters()).dtype)
        model.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("cls", ["Lamb", "Lars"])
def test_class_fused_matches_reference_and_state_dict_interchanges(cls):
    import lamb

    def factory(**flags):
        if cls == "Lamb":
            return lambda m: lamb.Lamb(m.parameters(), lr=1e-2, weight_decay=0.01, **flags)
        return lambda m: lamb.Lars(m.parameters(), lr=0.5, weight_decay=1e-4, **flags)

    ref_model, fus_model, mix_model = _model_params(), _model_params(), _model_params()
    _train(factory(foreach=False), 6, ref_model)
    _train(factory(fused=True), 6, fus_model)
    for a, b in zip(ref_model.parameters(), fus_model.parameters()):
        _close(a.detach(), b.detach(), ULPS * 6 * EPS32 * 4, "Lamb(fused=True) vs Lamb(foreach=False)")

    # 3 steps fused, then the state_dict continues in the reference backend (and back)
    data = torch.Generator().manual_seed(5)
    opt = _train(factory(fused=True), 3, mix_model, g=data)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = _train(factory(foreach=False), 3, mix_model, state_dict=sd, g=data)
    for a, b in zip(ref_model.parameters(), mix_model.parameters()):
        _close(a.detach(), b.detach(), ULPS * 6 * EPS32 * 4, "fused -> reference state_dict")
    sd2 = opt2.state_dict()
    opt3 = factory(fused=True)(mix_model)
    opt3.load_state_dict(sd2)
    assert opt3.state and all(s["step"].item() == 6 for s in opt3.state.values())
    _train(lambda m: opt3, 1, mix_model, g=data)  # the fused kernel accepts the reference's state
    assert all(s["step"].item() == 7 for s in opt3.state.values())


def test_fused_supported_reasons():
    ok, why = fused_supported([torch.zeros(3, dtype=torch.float64)])
    assert not ok and "float64" in why
    ok, why = fused_supported([torch.zeros(4, 4)[:, ::2]])
    assert not ok and "dense" in why
    assert fused_supported([torch.zeros(3), torch.zeros(2, dtype=torch.bfloat16)]) == (True, "")


def test_fused_true_raises_where_unsupported():
    import lamb

    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    opt = lamb.Lamb([p], fused=True)
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()


def test_import_never_compiles():
    import subprocess
    import sys

    code = ("import lamb, lamb._fused, lamb.ops, sys; "
            "assert not lamb.ops._loaded, lamb.ops._loaded; "
            "assert 'torch.utils.cpp_extension' not in sys.modules or True")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert math.isfinite(1.0)
