"""The fused CPU kernel (cuda/lamb_cpu.cpp, the CPU twin of the CUDA kernels) against the reference backend.

Tolerances come from fp32 rounding: the fused kernel and the reference evaluate the same expressions in
fp32 but differ in a few roundings (reciprocal multipliers for the bias corrections and the gradient
divisor, norms summed in short fp32 runs added in double rather than by torch's fp32 reduction), so each
step may move an element by a few ulps of its magnitude and of its update; over ``STEPS`` steps that is
``ULPS * STEPS`` eps relative.
"""

from __future__ import annotations

import copy
import math
import shutil
import subprocess

import pytest
import torch

from lamb import ops
from lamb.lamb import _single_tensor_lamb
from lamb.lars import _single_tensor_lars
from reference import RefLamb, RefLars, fp32_tolerance

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


ISAS = {"avx512": 2, "avx2": 1, "base": 0}


@pytest.fixture(params=list(ISAS))
def isa(request):
    want = ISAS[request.param]
    try:
        got = torch.ops.lamb_cpu.set_isa(want)
    except RuntimeError:
        pytest.skip(f"{request.param} not available on this machine")
    assert got == want
    yield request.param
    torch.ops.lamb_cpu.set_isa(-1)


# Cache blocks and scratch limits (elements): the default block (256Ki..2Mi by the cache size; every test set here
# fits in one block, which keeps u in the scratch) and small blocks that cut SHAPES into the blocks [1..18011],
# [33x65, empty], [40000] (a tensor larger than the block is a block alone), whose 40000 keeps a scratch under
# the default limit and recomputes u in pass B under a limit of 0.
BLOCKS = {"default": (-1, -1), "small": (20000, -1), "small_no_lone_scratch": (20000, 0)}


@pytest.fixture(params=list(BLOCKS))
def block(request):
    blk, limit = BLOCKS[request.param]
    torch.ops.lamb_cpu.set_cache_block(blk)
    torch.ops.lamb_cpu.set_scratch_limit(limit)
    yield request.param
    torch.ops.lamb_cpu.set_cache_block(-1)
    torch.ops.lamb_cpu.set_scratch_limit(-1)


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
def test_lamb_fp32_matches_reference(variant, isa, block):
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


def test_lamb_many_small_tensors(isa, block):
    shapes = [(1 + (7 * i) % 23,) for i in range(300)] + [(0,)] * 3
    params = _params(shapes=shapes)
    ref_p, fus_p, ref_s, fus_s = _run_lamb(params, LAMB_KW, steps=2)
    for i, (a, b) in enumerate(zip(ref_p, fus_p)):
        _close(a, b, TOL32, f"param {i}")
        _close(ref_s[i]["tr"], fus_s[i]["tr"], TOL32, f"trust ratio {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lamb_low_precision_with_masters(dtype, isa, block):
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


def stored64(ref, grads_per_step, dtype, keys):
    """Steps the float64 reference ``ref`` (tests/reference.py) for parameters and state stored in ``dtype``
    (bf16/fp16 without master weights): within a step everything is exact from the stored values; after it
    what is stored (x and the state ``keys``) is rounded to ``dtype``. Returns the stored x and each key's
    state (float64)."""
    for grads in grads_per_step:
        ref.step([grads])
        states = [ref.state[(0, i)] for i in range(len(ref.params))]
        for t in ref.params + [st[k] for st in states for k in keys]:
            t.copy_(t.to(dtype).double())
    return (ref.params, *([st[k] for st in states] for k in keys))


def ref_lamb64(params, kw=None):
    """tests/reference.py's float64 RefLamb on float64 copies of ``params``, with the options the fused kernel's
    arguments ``kw`` mean (default LAMB_KW)."""
    kw = LAMB_KW if kw is None else kw
    return RefLamb.from_params(
        [p.double() for p in params], lr=float(kw["lr"]), betas=(kw["beta1"], kw["beta2"]), eps=kw["eps"],
        weight_decay=kw["weight_decay"], weight_decay_mode=kw["weight_decay_mode"],
        bias_correction=kw["bias_correction"], grad_averaging=kw["grad_averaging"],
        min_trust_ratio=kw["min_trust_ratio"], max_trust_ratio=kw["max_trust_ratio"],
        weight_norm_bounds=kw["weight_norm_bounds"], layer_adaptation=kw["adapt"], maximize=kw["maximize"])


def ref_lars64(params, kw=None):
    """tests/reference.py's float64 RefLars, as ref_lamb64 (default LARS_KW)."""
    kw = LARS_KW if kw is None else kw
    return RefLars.from_params(
        [p.double() for p in params], lr=float(kw["lr"]), momentum=kw["momentum"], weight_decay=kw["weight_decay"],
        trust_coefficient=kw["trust_coefficient"], eps=kw["eps"], nesterov=kw["nesterov"],
        denominator=kw["denominator"], trust_clip=kw["trust_clip"], layer_adaptation=kw["adapt"],
        maximize=kw["maximize"])


def lamb64_stored(params, grads_per_step, dtype):
    """LAMB in float64 (RefLamb, LAMB_KW) with x, m, v stored in ``dtype``: see stored64."""
    return stored64(ref_lamb64(params), grads_per_step, dtype, ("exp_avg", "exp_avg_sq"))


def close_to_stored(params, states, stored, dtype, what=""):
    """Parameters and moments against lamb64_stored's: fp32 arithmetic against float64 flips a rounding to the
    storage type now and then, one unit of it (2 eps relative to the largest magnitude)."""
    tol = 2 * torch.finfo(dtype).eps
    for i, (x, m, v) in enumerate(zip(*stored)):
        _close(x, params[i].cpu(), tol, f"{what}param {i}")
        _close(m, states[i]["m"].cpu(), tol, f"{what}m {i}")
        _close(v, states[i]["v"].cpu(), tol, f"{what}v {i}")


# Gradient scales: 1 (v in fp16's normal range) and 0.01 (v = (1 - b2) g^2 around 1e-7, where fp16 is
# subnormal or 0 and u taken from the stored v instead of the step's would be m / eps).
@pytest.mark.parametrize("grad_scale", [1.0, 0.01])
@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lamb_low_precision_without_masters(dtype, check_finite, grad_scale, isa, block):
    """16-bit moments: the fused kernel's u comes from the step's fp32 moments (pass B recomputes them where no
    scratch holds u), as the float64 equations with storage rounding and the package's reference."""
    params = _params(dtype, shapes=[(5,), (18011,), (64, 33), (40000,)])
    fus_p, ref_p = [p.clone() for p in params], [p.clone() for p in params]
    fus_s, ref_s = _state(fus_p), _state(ref_p)
    grads = [_grads(params, step, grad_scale) for step in range(STEPS)]
    for g in grads:
        _lamb_call(_fused_lamb, fus_p, [x.clone() for x in g], fus_s, **LAMB_KW, check_finite=check_finite)
        _lamb_call(_single_tensor_lamb, ref_p, g, ref_s, **LAMB_KW)
    close_to_stored(fus_p, fus_s, lamb64_stored(params, grads, dtype), dtype, "float64: ")
    close_to_stored(fus_p, fus_s, ([p.double() for p in ref_p], [s["m"] for s in ref_s], [s["v"] for s in ref_s]),
                    dtype, "reference backend: ")


def test_lamb_low_precision_without_masters_split_ops():
    """The split ops (ZeRO pieces) with 16-bit moments: whole tensors and an identity norm_reduce give the
    one-call step's result."""
    params = _params(torch.float16, shapes=[(5,), (18011,), (40000,)])
    p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
    s1, s2 = _state(p1), _state(p2)
    try:
        # the one-call step: blocks [5, 18011] keep u in the scratch, 40000 alone recomputes it in pass B
        torch.ops.lamb_cpu.set_cache_block(20000)
        torch.ops.lamb_cpu.set_scratch_limit(0)
        for step in range(3):
            g = _grads(params, step, 0.01)
            _lamb_call(_fused_lamb, p1, g, s1, **LAMB_KW)
            _lamb_call(_fused_lamb, p2, g, s2, **LAMB_KW, norm_reduce=lambda sq: sq)
    finally:
        torch.ops.lamb_cpu.set_cache_block(-1)
        torch.ops.lamb_cpu.set_scratch_limit(-1)
    for x, y in zip(p1 + [s["m"] for s in s1] + [s["v"] for s in s1], p2 + [s["m"] for s in s2] + [s["v"] for s in s2]):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------- fp32 gradients, 16-bit params
def fp32_grads(params, step):
    """float32 gradients for any parameters (a bf16/fp16 parameter's with ``Tensor.grad_dtype = float32``):
    N(0, 1) plus 1/3, values that no 16-bit type holds, so rounding them to the parameter's dtype shows."""
    g = torch.Generator().manual_seed(2000 + step)
    return [torch.randn(p.shape, generator=g) + 1 / 3 for p in params]


FP32_GRAD_SHAPES = [(5,), (18011,), (64, 33), (40000,)]


def close64(got, want, tol, what):
    """As tests/test_lamb_reference.py's compare: relative to each element, with an absolute floor of tol times
    the largest magnitude."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.double().reshape(want.shape), want, rtol=tol, atol=tol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def check_fp32_grads(algo, step_fn, dtype, masters, fp32_tol, to_device=lambda xs: xs, shapes=FP32_GRAD_SHAPES):
    """One fused LAMB or LARS kernel (``step_fn``: the CPU op wrapper, the emulated CUDA one, or a wrapper
    over the GPU's) on bf16/fp16 parameters with float32 gradients, against the float64 reference fed the same
    float32 gradients: with master weights the masters and the fp32 state to the fp32 tolerance
    (``fp32_tol(step, numel)``); without, x and the state stored in ``dtype`` (stored64) to 2 eps of ``dtype``.
    Rounding the gradients to ``dtype`` first (what the kernels did before they took float32 gradients) is off
    by up to 2^-9 (bf16) or 2^-12 (fp16) relative in m with masters."""
    params = _params(dtype, shapes=shapes)
    p = to_device([x.clone() for x in params])
    st = [{k: (to_device([v])[0] if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
          for s in _state(params, masters)]
    grads = [fp32_grads(params, step) for step in range(STEPS)]
    call, kw, keys = ((_lamb_call, LAMB_KW, ("exp_avg", "exp_avg_sq")) if algo == "lamb" else
                      (_lars_call, LARS_KW, ("momentum_buffer",)))
    ref = ref_lamb64(params) if algo == "lamb" else ref_lars64(params)
    mine = ("m", "v") if algo == "lamb" else ("m",)
    if not masters:
        for g in grads:
            call(step_fn, p, to_device(g), st, **kw)
        want = stored64(ref, grads, dtype, keys)
        tol = 2 * torch.finfo(dtype).eps
        for i in range(len(params)):
            _close(want[0][i], p[i].cpu(), tol, f"param {i}")
            for k, key in enumerate(mine):
                _close(want[1 + k][i], st[i][key].cpu(), tol, f"{key} {i}")
        return
    numel = max(x.numel() for x in params)
    for step, g in enumerate(grads, start=1):
        call(step_fn, p, to_device(g), st, **kw)
        ref.step([g])
        for i in range(len(params)):
            tol = fp32_tol(step, numel)
            close64(st[i]["master"].cpu(), ref.params[i], tol, f"step {step}, master {i}")
            assert torch.equal(p[i], st[i]["master"].to(dtype)), f"param {i} is not its master rounded"
            for key, rkey in zip(mine, keys):
                close64(st[i][key].cpu(), ref.state[(0, i)][rkey], tol, f"step {step}, {key} {i}")
            close64(st[i]["tr"].cpu(), torch.tensor(ref.state[(0, i)]["trust_ratio"], dtype=torch.float64), tol,
                    f"step {step}, trust ratio {i}")


def fp32_tol(algo):
    """reference.fp32_tolerance for LAMB (with its fp32 bias correction) or LARS."""
    if algo == "lamb":
        return lambda step, numel: fp32_tolerance(step, numel, beta2=LAMB_KW["beta2"])
    return lambda step, numel: fp32_tolerance(step, numel, ops=8)


@pytest.mark.parametrize("masters", [True, False], ids=["masters", "no_masters"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_fp32_gradients_of_16bit_parameters(algo, dtype, masters, isa, block):
    check_fp32_grads(algo, _fused_lamb if algo == "lamb" else _fused_lars, dtype, masters, fp32_tol(algo))


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="Tensor.grad_dtype needs a newer torch")
@pytest.mark.parametrize("masters", [True, False], ids=["masters", "no_masters"])
@pytest.mark.parametrize("cls", ["Lamb", "Lars"])
def test_class_steps_fp32_gradients_of_bf16_parameters(cls, masters):
    """``Lamb``/``Lars(fused=True)`` on bf16 parameters whose gradients are float32 (``grad_dtype``): the kernel
    reads them as they are (no copy) and agrees with the float64 reference (masters) or with the reference
    backend to the bf16 rounding of what is stored (no masters)."""
    import lamb
    from lamb._fused import _grad_like

    opts = _LAYOUT_OPTS[cls]
    Opt = getattr(lamb, cls)
    values = _params(torch.bfloat16, shapes=[(41, 37), (300,), (5,)])
    grads = [fp32_grads(values, step) for step in range(3)]
    ref = (RefLamb if cls == "Lamb" else RefLars).from_params([v.double() for v in values], **opts)

    def run(**flags):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        for p in params:
            p.grad_dtype = torch.float32
        opt = Opt(params, master_weights=masters, **opts, **flags)
        for g in grads:
            for p, x in zip(params, g):
                p.grad = x.clone()
                assert _grad_like(p.grad, p) is p.grad
            opt.step()
        return params, opt

    fused, opt = run(fused=True)
    if masters:
        for g in grads:
            ref.step([g])
        tol = fp32_tol(cls.lower())(3, 41 * 37)
        for i, p in enumerate(fused):
            close64(opt.state[p]["master_param"], ref.params[i], tol, f"master {i}")
    else:
        backend, _ = run(foreach=False, fused=False)
        for i, (a, b) in enumerate(zip(backend, fused)):
            _close(a.detach(), b.detach(), 2 * torch.finfo(torch.bfloat16).eps, f"param {i}")


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_kernel_refuses_other_gradient_dtypes(algo, monkeypatch):
    """A gradient neither in the parameter's dtype nor float32 for a 16-bit parameter is refused by the kernel
    (the Python side converts such gradients before; this is the op's own check), naming both dtypes, before
    anything is written."""
    import lamb._fused

    monkeypatch.setattr(lamb._fused, "_grad_like", lambda g, p: g)
    call, fn, kw = (_lamb_call, _fused_lamb, LAMB_KW) if algo == "lamb" else (_lars_call, _fused_lars, LARS_KW)
    for pd, gd in [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16), (torch.float16, torch.float64)]:
        params = _params(pd, shapes=[(7,), (3,)])
        st, before = _state(params), [p.clone() for p in params]
        grads = [torch.ones(7, dtype=pd), torch.ones(3, dtype=gd)]
        with pytest.raises(RuntimeError, match=rf"gradient dtype {_ATEN[gd]} differs from the parameter's "
                                               rf"{_ATEN[pd]}.*float32 for a bfloat16/float16 parameter"):
            call(fn, params, grads, st, **kw)
        assert all(torch.equal(a, b) for a, b in zip(params, before)) and all(s["step"] == 0 for s in st)


_ATEN = {torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half", torch.float64: "Double"}


@pytest.mark.parametrize("cls", ["Lamb", "Lars"])
def test_class_fused_mixes_master_and_fp32_parameters(cls):
    """One group of bf16, fp32 and fp16 parameters with master_weights=True (the 16-bit ones get masters, the fp32
    one none: two kernel calls, one of them with no master list) against the float64 reference; a skipped
    step (GradScaler's found_inf) leaves every parameter of both calls as it was."""
    import lamb

    opts = _LAYOUT_OPTS[cls]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32]
    gen = torch.Generator().manual_seed(11)
    values = [torch.randn(s, generator=gen).to(dt) for s, dt in zip([(41, 37), (300,), (5,), (18011,)], dtypes)]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    opt = getattr(lamb, cls)(params, master_weights=True, fused=True, **opts)
    ref = (RefLamb if cls == "Lamb" else RefLars).from_params([v.double() for v in values], **opts)
    for step in range(1, 4):
        grads = [torch.randn(v.shape, generator=gen).to(v.dtype) for v in values]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step([grads])
        tol = fp32_tol(cls.lower())(step, 18011)
        for i, p in enumerate(params):
            got = opt.state[p]["master_param"] if p.dtype != torch.float32 else p.detach()
            close64(got, ref.params[i], tol, f"step {step}, param {i} ({p.dtype})")
    before = [p.detach().clone() for p in params] + [opt.state[p]["master_param"].clone() for p in params[::2]]
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    after = [p.detach() for p in params] + [opt.state[p]["master_param"] for p in params[::2]]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step wrote"
    assert all(opt.state[p]["step"].item() == 3 for p in params)


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


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# 64-bit indexing: one fp16 tensor of more than 2^31 elements (4 GiB a buffer; LARS needs three, LAMB four).
# Ones everywhere and no weight decay: every element takes the same step, so both ends must agree and move.
BIG = 2**31 + 4099


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["lars", "lamb"])
def test_64bit_indexing(algo):
    buffers = 3 if algo == "lars" else 4  # p, g, m (and v)
    if _available_bytes() < buffers * BIG * 2 + (2 << 30):
        pytest.skip(f"needs {buffers} x 4 GiB of free memory")
    p = torch.ones(BIG, dtype=torch.float16)
    g = torch.ones_like(p)
    st = dict(master=None, m=torch.zeros_like(p), step=torch.zeros(()), tr=torch.ones(()), wn=torch.zeros(()),
              un=torch.zeros(()))
    if algo == "lars":
        _lars_call(_fused_lars, [p], [g], [st], **{**LARS_KW, "lr": 1.0, "weight_decay": 0.0})
        # ratio = tc ||w|| / ||g|| = tc, so every w = 1 - lr tc
        assert st["tr"].item() == pytest.approx(LARS_KW["trust_coefficient"], rel=1e-6)
    else:
        st["v"] = torch.zeros_like(p)
        _lamb_call(_fused_lamb, [p], [g], [st], **{**LAMB_KW, "weight_decay": 0.0})
        # bias-corrected m = v = 1: u = 1 / (1 + eps) everywhere, ratio = ||w|| / ||u||, so every w = 1 - lr;
        # fp32's 0.999 puts 1 - beta2 (and so v's bias correction) 1.3e-5 off, 6.4e-6 through the square root
        assert st["un"].item() == pytest.approx(BIG**0.5 / (1 + LAMB_KW["eps"]), rel=1e-5)
    assert st["wn"].item() == pytest.approx(BIG**0.5, rel=1e-6)
    assert p[0].item() == p[BIG // 2].item() == p[-1].item() != 1.0
    assert st["step"].item() == 1


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


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_cache_blocking_is_bit_identical(algo):
    """Blocked stepping (pass A, ratios, pass B per block of tensors) sums every tensor's norms over the same
    chunks in the same order as one block of everything, so parameters, state and statistics are identical."""
    shapes = [(3,), (40000,), (17,), (0,), (300, 70), (5,)] + [(1 + i,) for i in range(40)]
    params = _params(shapes=shapes)
    fn, call, kw = ((_fused_lamb, _lamb_call, LAMB_KW) if algo == "lamb" else (_fused_lars, _lars_call, LARS_KW))
    out = {}
    try:
        # (block, scratch limit for a tensor alone in its block): 40000 alone with and without its scratch
        for blk, limit in ((0, -1), (1, -1), (1, 0), (100, -1), (100, 0), (20000, -1), (20000, 0), (10**9, -1)):
            torch.ops.lamb_cpu.set_cache_block(blk)
            torch.ops.lamb_cpu.set_scratch_limit(limit)
            p = [x.clone() for x in params]
            st = _state(p)
            for step in range(3):
                call(fn, p, _grads(params, step), st, **kw)
            out[blk, limit] = p + [s[k] for s in st for k in ("m", "v", "tr", "wn", "un", "step")]
    finally:
        torch.ops.lamb_cpu.set_cache_block(-1)
        torch.ops.lamb_cpu.set_scratch_limit(-1)
    for key, tensors in out.items():
        for i, (a, b) in enumerate(zip(out[0, -1], tensors)):
            assert torch.equal(a, b), f"block, scratch limit {key}: tensor {i} differs from the unblocked step"


def _l3_bytes() -> int:
    """The L3 size as the kernel reports it (sysfs, the cache cpu0 shares), else glibc's getconf; 0 if unknown."""
    from pathlib import Path

    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (d / "level").read_text().strip() == "3":
                txt = (d / "size").read_text().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
                return int(txt.rstrip("KMG")) * mult
        except (OSError, ValueError):
            return 0
    getconf = shutil.which("getconf")
    if getconf is None:
        return 0
    out = subprocess.run([getconf, "LEVEL3_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    return int(out) if out.isdigit() else 0  # glibc's getconf prints sysconf(_SC_LEVEL3_CACHE_SIZE)


def test_default_cache_block_follows_the_cache_size():
    # The default: the largest power of two in [256Ki, 2Mi] elements whose 20 B an element fill at most half
    # the last-level cache, 1Mi where the cache size is unknown (cuda/lamb_cpu.cpp, default_block).
    llc = _l3_bytes()
    if llc <= 0:
        expected = 1 << 20
    else:
        expected = 1 << 18
        while expected * 2 <= 1 << 21 and expected * 2 * 40 <= llc:
            expected *= 2
    prev = torch.ops.lamb_cpu.set_cache_block(-1)
    try:
        assert torch.ops.lamb_cpu.set_cache_block(-1) == expected
        assert torch.ops.lamb_cpu.set_cache_block(12345) == expected
        assert torch.ops.lamb_cpu.set_cache_block(-1) == 12345
    finally:
        torch.ops.lamb_cpu.set_cache_block(prev)


def test_default_scratch_limit_follows_the_cache_size():
    # A tensor alone in its block keeps u in the scratch up to the size whose 20 B an element come to twice the
    # last-level cache, at most 4Mi elements, 4Mi where the cache size is unknown (default_scratch_limit).
    llc = _l3_bytes()
    expected = 1 << 22 if llc <= 0 else min(1 << 22, 2 * llc // 20)
    prev = torch.ops.lamb_cpu.set_scratch_limit(-1)
    try:
        assert torch.ops.lamb_cpu.set_scratch_limit(-1) == expected
        assert torch.ops.lamb_cpu.set_scratch_limit(777) == expected
        assert torch.ops.lamb_cpu.set_scratch_limit(-1) == 777
    finally:
        torch.ops.lamb_cpu.set_scratch_limit(prev)


def test_isa_cap_from_the_environment(monkeypatch):
    # LAMB_CPU_ISA caps the loops picked from cpuid (set_isa(-1) re-reads it); an unknown value is an error that
    # names the allowed ones instead of being read as "no cap".
    best = torch.ops.lamb_cpu.set_isa(-1)
    try:
        monkeypatch.setenv("LAMB_CPU_ISA", "base")
        assert torch.ops.lamb_cpu.set_isa(-1) == 0
        monkeypatch.setenv("LAMB_CPU_ISA", "avx2")
        assert torch.ops.lamb_cpu.set_isa(-1) == min(best, 1)
        monkeypatch.setenv("LAMB_CPU_ISA", "sse9")
        with pytest.raises(RuntimeError, match=r"LAMB_CPU_ISA='sse9' is not one of base, avx2, avx512"):
            torch.ops.lamb_cpu.set_isa(-1)
    finally:
        monkeypatch.delenv("LAMB_CPU_ISA", raising=False)
        assert torch.ops.lamb_cpu.set_isa(-1) == best


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_check_finite_skips_the_whole_step_with_small_blocks(algo):
    # A NaN in the last tensor must stop the step before the first block is written: check_finite steps
    # in one block whatever the block size.
    params = _params(shapes=[(30000,), (30000,), (7,)])
    fn, call, kw = ((_fused_lamb, _lamb_call, LAMB_KW) if algo == "lamb" else (_fused_lars, _lars_call, LARS_KW))
    p = [x.clone() for x in params]
    st = _state(p)
    grads = _grads(params, 0)
    grads[-1][3] = float("nan")
    try:
        torch.ops.lamb_cpu.set_cache_block(100)
        call(fn, p, grads, st, **kw, check_finite=True)
    finally:
        torch.ops.lamb_cpu.set_cache_block(-1)
    for a, b, s in zip(params, p, st):
        assert torch.equal(a, b) and not s["m"].any() and s["step"].item() == 0


def _check_large_finite_gradient(fn, call, kw, split=False):
    """3e19 is finite, but its square overflows fp32: the finiteness check must not read it as inf (the norms
    are summed in fp32), so the checked step equals the unchecked one instead of being skipped. ``split``: the
    same through the split step (pieces of the parameters and norm_reduce), whose pass B sees only the reduced
    squared norms, an overflowed one among them."""
    params = _params(shapes=[(1000,), (7,)])
    grads = _grads(params, 0)
    grads[0][10] = 3e19
    out = {}
    for checked in (False, True):
        if split:
            pc = _Pieces(params)
            call(fn, pc.pieces, pc.grads(grads), pc.piece_state, **kw, check_finite=checked,
                 norm_reduce=pc.norm_reduce)
            p, st = pc.flat, pc.state + pc.piece_state
        else:
            p = [x.clone() for x in params]
            st = _state(p)
            call(fn, p, [g.clone() for g in grads], st, **kw, check_finite=checked)
        out[checked] = p + [s[k] for s in st for k in ("m", "v", "step")]
    assert out[True][-1].item() == 1, "the checked step was skipped"
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("split", [False, True], ids=["one_call", "split"])
@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_check_finite_takes_large_finite_gradients(algo, split):
    _check_large_finite_gradient(*((_fused_lamb, _lamb_call, LAMB_KW) if algo == "lamb"
                                   else (_fused_lars, _lars_call, LARS_KW)), split=split)


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
def test_lars_fp32_matches_reference(variant, isa, block):
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


# Dense layouts other than contiguous: a transpose, channels_last, a permuted 3-D tensor (and a contiguous one).
def _laid_out(values):
    t, cl, perm, flat = values
    return [t.t().contiguous().t(), cl.contiguous(memory_format=torch.channels_last),
            perm.permute(2, 0, 1).contiguous().permute(1, 2, 0), flat.clone()]


_LAYOUT_OPTS = {"Lamb": dict(lr=1e-2, weight_decay=0.01), "Lars": dict(lr=0.5, weight_decay=1e-4)}


@pytest.mark.parametrize("cls", ["Lamb", "Lars"])
def test_fused_steps_any_dense_layout(cls):
    """Parameters that fill their memory in another dimension order step as their contiguous values would (the
    float64 reference); so does state loaded from a contiguous model, and state kept across a change of the
    parameters' layout (what ``model.to(memory_format=...)`` does)."""
    import lamb

    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(s, generator=gen) for s in [(41, 37), (8, 3, 5, 5), (6, 7, 9), (300,)]]
    opts = _LAYOUT_OPTS[cls]
    Opt, Ref = (lamb.Lamb, RefLamb) if cls == "Lamb" else (lamb.Lars, RefLars)
    ref = Ref.from_params([v.double() for v in values], **opts)

    def grads(step):
        g = torch.Generator().manual_seed(100 + step)
        return [torch.randn(v.shape, generator=g) for v in values]

    def check(params, steps, what):
        tol = fp32_tolerance(steps, max(v.numel() for v in values), beta2=0.999 if cls == "Lamb" else None)
        for i, (p, want) in enumerate(zip(params, ref.params)):
            torch.testing.assert_close(p.detach().double(), want, rtol=tol, atol=tol * float(want.abs().max()),
                                       msg=lambda m: f"{what}, param {i}: {m}")

    def run(opt, params, steps, grad_in_layout=False):
        for step in steps:
            for p, g in zip(params, grads(step)):
                p.grad = torch.empty_like(p).copy_(g) if grad_in_layout else g
            opt.step()
            ref.step([grads(step)])

    contiguous = [torch.nn.Parameter(v.clone()) for v in values]
    opt = Opt(contiguous, fused=True, **opts)
    run(opt, contiguous, range(2))
    check(contiguous, 2, "contiguous")
    # resume the contiguous model's state into the other layouts; the gradients arrive contiguous (copied into
    # the parameters' layout) or in it (as autograd gives them)
    params = [torch.nn.Parameter(x) for x in _laid_out([p.detach() for p in contiguous])]
    assert not any(p.is_contiguous() for p in params[:3])
    opt2 = Opt(params, fused=True, **opts)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt2, params, [2])
    run(opt2, params, [3], grad_in_layout=True)
    check(params, 4, "resumed into other layouts")
    for p in params:
        for key in opt2._moment_keys:
            assert opt2.state[p][key].stride() == p.stride(), f"{key} not laid out as its parameter"
    # the parameters change layout under the optimizer (Module.to(memory_format=...) sets .data)
    for p in params:
        p.data = p.data.contiguous()
    run(opt2, params, [4])
    check(params, 5, "after the parameters' layout changed")


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


# ------------------------------------------------------------------------------------------- split step (norm_reduce)
# ZeRO cuts each flat partition into pieces of parameters and steps the pieces with ``norm_reduce`` (see
# lamb/deepspeed.py). Here one process plays every rank: each parameter is flattened and cut into pieces
# (views, some empty, listed out of parameter order), the state buffers alike, and norm_reduce sums the
# pieces' partial squared norms per parameter. The fused split step on the pieces must equal the reference
# backend on the whole tensors, to the same fp32 tolerance as the one-call step.
SPLIT_SHAPES = [(1,), (7,), (18011,), (33, 65), (0,), (40000,)]


class _Pieces:
    """Parameters flattened and cut into views; per piece: its owner, its own step and trust statistics."""

    def __init__(self, params, masters=False, seed=0):
        self.flat = [p.clone().reshape(-1) for p in params]
        self.state = _state(self.flat, masters)
        g = torch.Generator().manual_seed(seed)
        cuts = []
        for j, t in enumerate(self.flat):
            n = t.numel()
            inner = sorted(torch.randint(0, n + 1, (3,), generator=g).tolist()) if n else []
            bounds = [0, *inner, n]
            cuts += [(j, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]  # includes empty pieces
        order = torch.randperm(len(cuts), generator=g).tolist()
        self.cuts = [cuts[i] for i in order]
        self.owner = [j for j, _, _ in self.cuts]
        self.reduce_calls = 0
        self.pieces, self.piece_state = [], []
        for j, lo, hi in self.cuts:
            st = self.state[j]
            self.pieces.append(self.flat[j][lo:hi])
            self.piece_state.append(dict(
                master=None if st["master"] is None else st["master"][lo:hi],
                m=st["m"][lo:hi], v=st["v"][lo:hi], step=torch.zeros(()), tr=torch.ones(()),
                wn=torch.zeros(()), un=torch.zeros(())))

    def grads(self, grads):
        flat = [g.reshape(-1) for g in grads]
        return [flat[j][lo:hi] for j, lo, hi in self.cuts]

    def norm_reduce(self, sq):
        """What one all_reduce(SUM) over ranks gives: each piece's entry becomes its parameter's full sum."""
        self.reduce_calls += 1
        k = len(self.pieces)
        assert sq.shape == (2 * k,)
        owner = torch.tensor(self.owner)
        out = torch.empty_like(sq)
        for half in (0, k):
            full = torch.zeros(len(self.flat), dtype=sq.dtype).index_add_(0, owner, sq[half:half + k])
            out[half:half + k] = full[owner]
        return out

    def stats(self, j, key):
        return [st[key] for (o, _, _), st in zip(self.cuts, self.piece_state) if o == j]


def _close_floor(a, b, tol, floor, what):
    """As _close, relative to at least ``floor``: a state buffer is compared relative to its largest magnitude
    in the whole group (as in one flat partition), since a momentum that cancels to a small value in a tiny
    tensor keeps the absolute rounding of the terms it was summed from."""
    if a.numel() == 0:
        return
    a, b = a.double(), b.double()
    scale = max(a.abs().max().item(), floor, 1e-30)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{what}: max |diff| {err:.3e} > {tol:.1e} * {scale:.3e}"


def _check_split(ref_p, ref_s, pc, keys, tol=TOL32):
    for j, a in enumerate(ref_p):
        _close(a.reshape(-1), pc.flat[j], tol, f"param {j} {tuple(a.shape)}")
        for key in keys:
            if ref_s[j][key] is not None:
                floor = max(s[key].abs().max().item() for s in ref_s if s[key].numel())
                _close_floor(ref_s[j][key].reshape(-1), pc.state[j][key].reshape(-1), tol, floor, f"{key} {j}")
        for key in ("tr", "wn", "un"):
            for got in pc.stats(j, key):  # every piece reports its parameter's full statistics
                _close(ref_s[j][key], got, tol, f"{key} {j}")
        for step in pc.stats(j, "step"):
            assert step.item() == ref_s[j]["step"].item()


SPLIT_LAMB_VARIANTS = {
    "paper": {},
    "bias_lr": dict(bias_correction="lr"),
    "bias_none": dict(bias_correction="none"),
    "l2": dict(weight_decay_mode="l2"),
    "decoupled": dict(weight_decay_mode="decoupled", weight_decay=0.1),
    "no_grad_averaging": dict(grad_averaging=False),
    "maximize": dict(maximize=True),
    "nvlamb_divisor": dict(grad_divisor=torch.tensor(3.7)),
    "clamped": dict(min_trust_ratio=0.5, max_trust_ratio=1.2),
    "lambc": dict(max_trust_ratio=1.0),
    "phi_bounds": dict(weight_norm_bounds=(0.5, 3.0)),
    "no_adapt": dict(adapt=False),
    "check_finite": dict(check_finite=True),
}


@pytest.mark.parametrize("variant", list(SPLIT_LAMB_VARIANTS))
def test_lamb_split_pieces_match_reference_whole(variant):
    kw = {**LAMB_KW, **SPLIT_LAMB_VARIANTS[variant]}
    params = _params(shapes=SPLIT_SHAPES)
    ref_p = [p.clone() for p in params]
    ref_s = _state(ref_p)
    pc = _Pieces(params)
    for step in range(STEPS):
        grads = _grads(params, step)
        _lamb_call(_single_tensor_lamb, ref_p, grads, ref_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        _lamb_call(_fused_lamb, pc.pieces, pc.grads(grads), pc.piece_state, **kw, norm_reduce=pc.norm_reduce)
    assert pc.reduce_calls == STEPS  # one reduction a step (one all-reduce under ZeRO)
    _check_split(ref_p, ref_s, pc, ("m", "v"))


def test_lamb_split_bf16_with_masters():
    params = _params(torch.bfloat16, shapes=SPLIT_SHAPES)
    ref_p = [p.clone() for p in params]
    ref_s = _state(ref_p, masters=True)
    pc = _Pieces(params, masters=True)
    for step in range(STEPS):
        grads = _grads(params, step)
        _lamb_call(_single_tensor_lamb, ref_p, grads, ref_s, **LAMB_KW)
        _lamb_call(_fused_lamb, pc.pieces, pc.grads(grads), pc.piece_state, **LAMB_KW, norm_reduce=pc.norm_reduce)
    for j in range(len(params)):
        _close(ref_s[j]["master"].reshape(-1), pc.state[j]["master"], TOL32, f"master {j}")
        assert torch.equal(pc.flat[j], pc.state[j]["master"].to(torch.bfloat16))


SPLIT_LARS_VARIANTS = {
    "mlperf": {},
    "norm": dict(denominator="norm"),
    "nesterov": dict(nesterov=True),
    "norm_nesterov": dict(denominator="norm", nesterov=True),
    "larc_clip": dict(trust_clip=True, lr=0.01),
    "eps": dict(eps=1e-8),
    "no_adapt": dict(adapt=False),
    "maximize": dict(maximize=True),
    "check_finite": dict(check_finite=True),
}


@pytest.mark.parametrize("variant", list(SPLIT_LARS_VARIANTS))
def test_lars_split_pieces_match_reference_whole(variant):
    kw = {**LARS_KW, **SPLIT_LARS_VARIANTS[variant]}
    params = _params(shapes=SPLIT_SHAPES)
    ref_p = [p.clone() for p in params]
    ref_s = _state(ref_p)
    pc = _Pieces(params)
    for step in range(STEPS):
        grads = _grads(params, step)
        _lars_call(_single_tensor_lars, ref_p, grads, ref_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        _lars_call(_fused_lars, pc.pieces, pc.grads(grads), pc.piece_state, **kw, norm_reduce=pc.norm_reduce)
    assert pc.reduce_calls == STEPS
    _check_split(ref_p, ref_s, pc, ("m",))


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_split_skips_write_nothing_and_still_reduce(algo):
    """A skipped step changes nothing on any piece, and norm_reduce still runs (it is a collective)."""
    params = _params(shapes=[(7,), (18011,), (0,)])
    pc = _Pieces(params)
    fn, call, kw = (_fused_lamb, _lamb_call, LAMB_KW) if algo == "lamb" else (_fused_lars, _lars_call, LARS_KW)
    call(fn, pc.pieces, pc.grads(_grads(params, 0)), pc.piece_state, **kw, norm_reduce=pc.norm_reduce)
    before = copy.deepcopy((pc.flat, pc.state, pc.piece_state))

    def unchanged(what):
        for a, b in zip(before[0], pc.flat):
            assert torch.equal(a, b), what
        for s0, s1 in zip(before[1] + before[2], pc.state + pc.piece_state):
            for k in ("m", "v", "step", "tr", "wn", "un"):
                assert torch.equal(s0[k], s1[k]), f"{what}: state {k} changed"

    calls = pc.reduce_calls
    bad = _grads(params, 1)
    bad[1][100] = float("nan")  # one piece on one "rank" sees it: every piece of the step must skip
    call(fn, pc.pieces, pc.grads(bad), pc.piece_state, **kw, check_finite=True, norm_reduce=pc.norm_reduce)
    unchanged("NaN gradient with check_finite")
    bad[1][100] = float("inf")
    call(fn, pc.pieces, pc.grads(bad), pc.piece_state, **kw, check_finite=True, norm_reduce=pc.norm_reduce)
    unchanged("inf gradient with check_finite")
    call(fn, pc.pieces, pc.grads(_grads(params, 1)), pc.piece_state, **kw, found_inf=torch.tensor(1.0),
         norm_reduce=pc.norm_reduce)
    unchanged("found_inf")
    call(fn, pc.pieces, pc.grads(_grads(params, 1)), pc.piece_state, **kw, grad_scale=torch.tensor(float("inf")),
         norm_reduce=pc.norm_reduce)
    unchanged("non-finite grad_scale")
    if algo == "lamb":
        call(fn, pc.pieces, pc.grads(_grads(params, 1)), pc.piece_state,
             **{**kw, "grad_divisor": torch.tensor(float("nan"))}, norm_reduce=pc.norm_reduce)
        unchanged("non-finite NVLAMB divisor")
    assert pc.reduce_calls == calls + (5 if algo == "lamb" else 4)
    call(fn, pc.pieces, pc.grads(_grads(params, 1)), pc.piece_state, **kw, check_finite=True,
         found_inf=torch.tensor(0.0), norm_reduce=pc.norm_reduce)
    assert all(st["step"].item() == 2 for st in pc.piece_state), "a finite step must apply"
    assert not torch.equal(before[0][1], pc.flat[1])


def test_split_grad_scale_unscales():
    params = _params(shapes=[(7,), (18011,)])
    a, b = _Pieces(params), _Pieces(params)
    for step in range(2):
        g = _grads(params, step)
        _lamb_call(_fused_lamb, a.pieces, a.grads(g), a.piece_state, **LAMB_KW, norm_reduce=a.norm_reduce)
        _lamb_call(_fused_lamb, b.pieces, b.grads([x * 1024.0 for x in g]), b.piece_state, **LAMB_KW,
                   grad_scale=torch.tensor(1024.0), norm_reduce=b.norm_reduce)
    for x, y in zip(a.flat, b.flat):
        assert torch.equal(x, y)  # scaling by a power of two is exact


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_split_pieces_match_one_call_fused_step_on_whole_tensors(algo):
    """Pieces + norm_reduce against the one-call fused step on the whole tensors: the same per-element math,
    only the norms' double sums are added in another order, so a ratio moves by an ulp at most."""
    fn, call, kw, keys = ((_fused_lamb, _lamb_call, LAMB_KW, ("m", "v")) if algo == "lamb"
                          else (_fused_lars, _lars_call, {**LARS_KW, "trust_clip": True, "lr": 0.01}, ("m",)))
    params = _params(shapes=SPLIT_SHAPES)
    one = [p.clone() for p in params]
    one_s = _state(one)
    pc = _Pieces(params)
    for step in range(STEPS):
        grads = _grads(params, step)
        call(fn, one, grads, one_s, **kw)
        call(fn, pc.pieces, pc.grads(grads), pc.piece_state, **kw, norm_reduce=pc.norm_reduce)
    _check_split(one, one_s, pc, keys, tol=2 * STEPS * EPS32)


def test_split_without_reduction_equals_one_call_step_on_whole_tensors():
    """Whole tensors with an identity norm_reduce: the split ops compute exactly the one-call step."""
    params = _params(shapes=SPLIT_SHAPES)
    p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
    s1, s2 = _state(p1), _state(p2)
    for step in range(2):
        g = _grads(params, step)
        _lamb_call(_fused_lamb, p1, g, s1, **LAMB_KW)
        _lamb_call(_fused_lamb, p2, g, s2, **LAMB_KW, norm_reduce=lambda sq: sq)
    for x, y in zip(p1 + [s["un"] for s in s1], p2 + [s["un"] for s in s2]):
        assert torch.equal(x, y)


def test_split_norm_reduce_must_keep_the_layout():
    params = _params(shapes=[(7,), (9,)])
    st = _state(params)
    with pytest.raises(RuntimeError, match="norm_reduce must return"):
        _lamb_call(_fused_lamb, params, _grads(params, 0), st, **LAMB_KW, norm_reduce=lambda sq: sq[:2])


@pytest.mark.parametrize("flags, expect", [
    (dict(), "fused"), (dict(fused=True), "fused"), (dict(fused=False), "foreach"), (dict(foreach=True), "foreach"),
])
def test_partitioned_groups_choose_the_fused_cpu_kernel(flags, expect):
    """Under lamb.deepspeed.attach (ZeRO): CPU fp32 pieces take the fused split step unless foreach is asked for."""
    import lamb

    p = torch.nn.Parameter(torch.zeros(10))
    opt = lamb.Lamb([p], **flags)
    pieces = [p.detach()[:4], p.detach()[4:]]
    assert opt._partitioned_backend(opt.param_groups[0], pieces) == expect
    assert opt._partitioned_backend(opt.param_groups[0], [x.double() for x in pieces]) == "foreach"
