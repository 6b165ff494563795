"""The fused CUDA kernels against the reference backend (and apex FusedLAMB where installed).

Marked ``gpu``: skipped without a CUDA device. Same tolerances as tests/test_fused_cpu.py (the CUDA build
uses --fmad=false, so it rounds as the CPU twin does).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from tests.test_fused_cpu import (  # noqa: E402
    LAMB_KW, LAMB_VARIANTS, LARS_KW, LARS_VARIANTS, STEPS, TOL32, _check_large_finite_gradient, _close, _grads,
    _lamb_call, _lars_call, _params, _state, check_fp32_grads, close_to_stored, fp32_tol, lamb64_stored,
)


def _cuda(xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


def _state_cuda(params, masters=False):
    st = _state(params, masters)
    return [{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in st]


@pytest.fixture(scope="module", autouse=True)
def _built():
    from lamb import ops

    ok, why = ops.cuda_status()
    if not ok:
        pytest.skip(why)
    ops.load_cuda()


@pytest.mark.parametrize("variant", list(LAMB_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lamb_cuda_matches_reference(variant, dtype):
    from lamb._fused import _fused_lamb
    from lamb.lamb import _single_tensor_lamb

    kw = {**LAMB_KW, **LAMB_VARIANTS[variant]}
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    masters = dtype != torch.float32
    params = _params(dtype)
    ref_p, fus_p = [p.clone() for p in params], _cuda([p.clone() for p in params])
    ref_s, fus_s = _state(ref_p, masters), _state_cuda(fus_p, masters)
    for step in range(STEPS):
        g = _grads(params, step)
        _lamb_call(_single_tensor_lamb, ref_p, g, ref_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        _lamb_call(_fused_lamb, fus_p, _cuda(g), fus_s, **kw_cuda)
    for i in range(len(params)):
        a = ref_s[i]["master"] if masters else ref_p[i]
        b = fus_s[i]["master"] if masters else fus_p[i]
        _close(a, b.cpu(), TOL32, f"param {i}")
        for k in ("m", "v", "tr", "wn", "un"):
            _close(ref_s[i][k], fus_s[i][k].cpu(), TOL32, f"{k} {i}")
        assert fus_s[i]["step"].item() == STEPS


@pytest.mark.parametrize("variant", list(LARS_VARIANTS))
def test_lars_cuda_matches_reference(variant):
    from lamb._fused import _fused_lars
    from lamb.lars import _single_tensor_lars

    kw = {**LARS_KW, **LARS_VARIANTS[variant]}
    params = _params()
    ref_p, fus_p = [p.clone() for p in params], _cuda([p.clone() for p in params])
    ref_s, fus_s = _state(ref_p), _state_cuda(fus_p)
    for step in range(STEPS):
        g = _grads(params, step)
        _lars_call(_single_tensor_lars, ref_p, g, ref_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        _lars_call(_fused_lars, fus_p, _cuda(g), fus_s, **kw)
    for i in range(len(params)):
        _close(ref_p[i], fus_p[i].cpu(), TOL32, f"param {i}")


@pytest.mark.parametrize("grad_scale", [1.0, 0.01])
@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lamb_cuda_low_precision_without_masters(dtype, check_finite, grad_scale):
    """16-bit moments: u from the step's fp32 moments, against the float64 equations with storage rounding
    (tests/test_fused_cpu.py's test of that name)."""
    from lamb._fused import _fused_lamb

    params = _params(dtype, shapes=[(5,), (18011,), (64, 33), (40000,)])
    p, st = _cuda([x.clone() for x in params]), _state_cuda(params)
    grads = [_grads(params, step, grad_scale) for step in range(STEPS)]
    for g in grads:
        _lamb_call(_fused_lamb, p, _cuda(g), st, **LAMB_KW, check_finite=check_finite)
    close_to_stored(p, st, lamb64_stored(params, grads, dtype), dtype)


@pytest.mark.parametrize("masters", [True, False], ids=["masters", "no_masters"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_cuda_fp32_gradients_of_16bit_parameters(algo, dtype, masters):
    """float32 gradients of bf16/fp16 parameters against the float64 references (tests/test_fused_cpu.py's
    test of that name)."""
    from lamb._fused import _fused_lamb, _fused_lars

    check_fp32_grads(algo, _fused_lamb if algo == "lamb" else _fused_lars, dtype, masters, fp32_tol(algo),
                     to_device=_cuda)


def test_cuda_matches_cpu_twin():
    """Same math header, no FMA contraction: CPU twin and GPU agree to the norms' summation order."""
    from lamb._fused import _fused_lamb

    params = _params()
    cpu_p, gpu_p = [p.clone() for p in params], _cuda([p.clone() for p in params])
    cpu_s, gpu_s = _state(cpu_p), _state_cuda(gpu_p)
    for step in range(STEPS):
        g = _grads(params, step)
        _lamb_call(_fused_lamb, cpu_p, g, cpu_s, **LAMB_KW)
        _lamb_call(_fused_lamb, gpu_p, _cuda(g), gpu_s, **LAMB_KW)
    for a, b in zip(cpu_p, gpu_p):
        _close(a, b.cpu(), 4 * STEPS * torch.finfo(torch.float32).eps, "cpu twin vs cuda")


def test_cuda_skip_without_sync():
    from lamb._fused import _fused_lamb

    params = _cuda(_params(shapes=[(7,), (18011,)]))
    st = _state_cuda(params)
    _lamb_call(_fused_lamb, params, _cuda(_grads(params, 0)), st, **LAMB_KW)
    before = copy.deepcopy((params, st))
    bad = _cuda(_grads(params, 1))
    bad[1][3] = float("nan")
    _lamb_call(_fused_lamb, params, bad, st, **LAMB_KW, check_finite=True)
    _lamb_call(_fused_lamb, params, _cuda(_grads(params, 1)), st, **LAMB_KW,
               found_inf=torch.ones((), device="cuda"))
    for p0, p1 in zip(before[0], params):
        assert torch.equal(p0, p1)
    for s0, s1 in zip(before[1], st):
        for k in ("m", "v", "step", "tr"):
            assert torch.equal(s0[k], s1[k])


def _on_device(call, device="cuda"):
    """``call`` (as _lamb_call / _lars_call) run on copies on ``device``, the results copied back in place."""
    def run(fn, params, grads, st, **kw):
        dev = [p.to(device) for p in params]
        dev_st = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in st]
        call(fn, dev, [g.to(device) for g in grads], dev_st, **kw)
        for p, d in zip(params, dev):
            p.copy_(d)
        for s, d in zip(st, dev_st):
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    v.copy_(d[k])
    return run


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_check_finite_takes_large_finite_gradients(algo):
    from lamb._fused import _fused_lamb, _fused_lars

    _check_large_finite_gradient(*((_fused_lamb, _on_device(_lamb_call), LAMB_KW) if algo == "lamb"
                                   else (_fused_lars, _on_device(_lars_call), LARS_KW)))


def test_cuda_graph_capture_needs_no_sync():
    from lamb._fused import _fused_lamb

    params = _cuda(_params(shapes=[(1024,), (18011,)]))
    grads = _cuda(_grads(params, 0))
    st = _state_cuda(params)
    _lamb_call(_fused_lamb, params, grads, st, **LAMB_KW)  # warm-up (build, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _lamb_call(_fused_lamb, params, grads, st, **LAMB_KW)
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.slow
def test_cuda_64bit_indexing():
    """A tensor of more than 2^31 elements (bf16: 4 GiB a buffer)."""
    from lamb._fused import _fused_lamb

    n = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 6 * n * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones_like(p)
    st = _state_cuda([p])
    _lamb_call(_fused_lamb, [p], [g], st, **{**LAMB_KW, "weight_decay": 0.0})
    # every element moves by the same amount: check both ends of the tensor
    assert p[0].item() == p[-1].item() != 1.0
    assert abs(st[0]["wn"].item() - n**0.5) / n**0.5 < 1e-6


def test_vs_apex_fused_lamb():
    apex = pytest.importorskip("apex.optimizers")
    import lamb

    torch.manual_seed(0)
    ps = [torch.randn(s, device="cuda") for s in [(18011,), (4096, 1024), (1,)]]
    a = [torch.nn.Parameter(p.clone()) for p in ps]
    b = [torch.nn.Parameter(p.clone()) for p in ps]
    oa = apex.FusedLAMB(a, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0, use_nvlamb=True)
    ob = lamb.Lamb(b, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0, eps=1e-6, fused=True)
    for _ in range(STEPS):
        gs = [torch.randn_like(p) for p in ps]
        for x, y, g in zip(a, b, gs):
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        _close(x.detach().cpu(), y.detach().cpu(), 1e-5, "vs apex FusedLAMB")
