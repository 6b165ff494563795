"""Mixed precision (GradScaler skip, bf16 master weights) and torch.compile (no graph breaks, no host
sync: a full graph equals eager)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lamb import Lamb, Lars
from reference import RefLamb, RefLars, assert_snapshots_equal, fp32_tolerance, snapshot

BF16_EPS = torch.finfo(torch.bfloat16).eps

OPTS = {
    "lamb": (Lamb, RefLamb, dict(lr=0.01, weight_decay=0.01, max_grad_norm=1.0)),
    "lars": (Lars, RefLars, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)),
}


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)


# --------------------------------------------------------------------------------------------------
# GradScaler
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", OPTS)
def test_grad_scaler_skips_step_on_inf_nan(name, bad):
    cls, ref_cls, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    ref = ref_cls.from_params(list(model.parameters()), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 6), torch.randn(8, 2)

    def backward():
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()

    # a normal step: the reference gets the unscaled gradients (the scale is a power of 2: exact)
    backward()
    grads = [p.grad.double() / 2.0**10 for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    ref.step([grads])
    tol = fp32_tolerance(1, 64)
    for p, r in zip(model.parameters(), ref.params):
        torch.testing.assert_close(p.detach().double(), r, rtol=tol, atol=tol)
    # an overflowing step: skipped, params and every state tensor untouched, scale backed off
    before = snapshot(opt)
    backward()
    next(model.parameters()).grad.view(-1)[0] = bad
    scaler.step(opt)
    scaler.update()
    assert_snapshots_equal(before, snapshot(opt))
    assert scaler.get_scale() == 2.0**9


# --------------------------------------------------------------------------------------------------
# bf16 parameters with fp32 master weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", OPTS)
def test_bf16_master_weights_follow_fp32_reference(name, foreach):
    cls, ref_cls, kw = OPTS[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in ((257,), (16, 9), (1,))]
    opt = cls(params, master_weights=True, foreach=foreach, **kw)
    ref = ref_cls.from_params(params, **kw)  # float64 copy of the bf16 init (exact)
    steps = 6
    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen).bfloat16() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([grads])
        tol = fp32_tolerance(step, 257)
        for p, r in zip(params, ref.params):
            st = opt.state[p]
            master = st["master_param"]
            assert master.dtype == torch.float32
            moment = st["exp_avg"] if name == "lamb" else st["momentum_buffer"]
            assert moment.dtype == torch.float32
            # the master follows the reference to fp32 accuracy ...
            torch.testing.assert_close(master.double(), r, rtol=tol, atol=tol * float(r.abs().max()))
            # ... and the bf16 parameter is the master rounded to bf16
            assert torch.equal(p.detach(), master.bfloat16())
            torch.testing.assert_close(p.detach().double(), r, rtol=BF16_EPS, atol=tol)
    # state_dict keeps the masters (and moments) in fp32 and restores them in fp32
    sd = opt.state_dict()
    for s in sd["state"].values():
        assert s["master_param"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(params2, master_weights=True, foreach=foreach, **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(params, params2):
        for key, v in opt.state[p].items():
            assert opt2.state[q][key].dtype == v.dtype, key
            assert torch.equal(opt2.state[q][key], v), key
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen).bfloat16() for p in params]
        for ps in (params, params2):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opt.step()
        opt2.step()
    assert_snapshots_equal(snapshot(opt), snapshot(opt2))


def test_bf16_without_master_weights_keeps_bf16_state_math_in_fp32():
    """No master copy: the parameter and its state stay bf16-typed or fp32 as the package documents,
    and the step still moves the parameter in the reference's direction."""
    p = torch.randn(64, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    opt = Lamb([p], lr=0.05, weight_decay=0.01)
    ref = RefLamb.from_params([p], lr=0.05, weight_decay=0.01)
    g = torch.randn(64, generator=torch.Generator().manual_seed(2)).bfloat16()
    p.grad = g.clone()
    opt.step()
    ref.step([[g]])
    assert "master_param" not in opt.state[p]
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.detach().double(), ref.params[0], rtol=2 * BF16_EPS, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# torch.compile: the whole step is one graph (no graph break, no host sync) and equals eager
# --------------------------------------------------------------------------------------------------

COMPILE_OPTS = {
    # NVLAMB/DeepSpeed switches that need a global norm and clamps: any .item() would break the graph
    "lamb": (Lamb, dict(lr=0.01, weight_decay=0.01, max_grad_norm=1.0, min_trust_ratio=0.01, max_trust_ratio=0.5, foreach=True)),
    "lars": (Lars, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True, foreach=True)),
}


@pytest.mark.parametrize("name", COMPILE_OPTS)
def test_compiled_step_full_graph_equals_eager(name):
    cls, kw = COMPILE_OPTS[name]
    _compiled_against_eager(cls, kw, (torch.float32,) * 3, "cpu")


def _compiled_against_eager(cls, kw, dtypes, device, steps=3):
    """``cls(**kw)`` stepped eagerly and through ``torch.compile(fullgraph=True)`` (a graph break, e.g. a
    .item() host sync, raises) on the same parameters and gradients; parameters and every state tensor agree
    after each step. Returns the compiled optimizer."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    shapes = ((33,), (5, 7), (1,))
    eager_p = [torch.randn(s, generator=gen).to(device=device, dtype=dt).requires_grad_()
               for s, dt in zip(shapes, dtypes)]
    comp_p = [p.detach().clone().requires_grad_() for p in eager_p]
    eager, comp = cls(eager_p, **kw), cls(comp_p, **kw)

    @torch.compile(fullgraph=True, backend="inductor")
    def compiled_step():
        comp.step()

    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype) for p in eager_p]
        for ps in (eager_p, comp_p):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        eager.step()
        compiled_step()
        tol = fp32_tolerance(step, 64)
        for p, q in zip(eager_p, comp_p):
            torch.testing.assert_close(q, p, rtol=tol, atol=tol)
            for key, v in eager.state[p].items():
                torch.testing.assert_close(comp.state[q][key], v, rtol=tol, atol=tol, msg=key)
        assert all(comp.state[q]["step"].item() == step for q in comp_p)
    return comp


def test_explain_reports_no_graph_break():
    torch._dynamo.reset()
    p = torch.randn(10).requires_grad_()
    opt = Lamb([p], lr=0.01, weight_decay=0.01, max_grad_norm=1.0, foreach=False)
    p.grad = torch.randn(10)
    opt.step()  # state exists: explain sees the steady-state step
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons


# The fused kernels compile too: their ops have fake (shape-only) implementations, so the step is one graph with
# the kernel in it (fullgraph=True), and a parameter group that mixes master-weight parameters with fp32 ones
# (two kernel calls) as well. With both backend flags None a compiled step takes foreach, even where the
# fused kernel is built (its eager choice), since that choice looks at the file system.
BF16, F32 = torch.bfloat16, torch.float32
FUSED_COMPILE = {
    "lamb_fused": (Lamb, dict(lr=0.01, weight_decay=0.01, max_grad_norm=1.0, fused=True), (F32, F32, F32)),
    "lars_fused": (Lars, dict(lr=0.1, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True, fused=True),
                   (F32, F32, F32)),
    "lamb_fused_mixed_masters": (Lamb, dict(lr=0.01, weight_decay=0.01, fused=True, master_weights=True),
                                 (BF16, F32, BF16)),
    "lars_fused_mixed_masters": (Lars, dict(lr=0.1, weight_decay=1e-3, fused=True, master_weights=True),
                                 (BF16, F32, BF16)),
    "lamb_default_kernel_built": (Lamb, dict(lr=0.01, weight_decay=0.01), (F32, F32, F32)),
}


def _fused_kernel_or_skip(device: str) -> None:
    """Load the fused kernel of ``device`` (built: with both flags None eager then takes it), or skip."""
    from lamb import ops

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ok, why = ops.cpu_status() if device == "cpu" else ops.cuda_status()
    if not ok:
        pytest.skip(f"fused {device} kernel unavailable: {why}")
    (ops.load_cpu if device == "cpu" else ops.load_cuda)()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FUSED_COMPILE)
def test_compiled_fused_step_full_graph_equals_eager(name, device):
    _fused_kernel_or_skip(device)
    cls, kw, dtypes = FUSED_COMPILE[name]
    comp = _compiled_against_eager(cls, kw, dtypes, device)
    # the kernel is in the graph where fused=True, and not where the flags are None
    graphs = torch._dynamo.explain(comp.step)().graphs
    in_graph = any(f"lamb_{device}" in str(g.graph) for g in graphs)
    assert in_graph == bool(kw.get("fused")), [str(g.graph) for g in graphs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [Lamb, Lars], ids=["lamb", "lars"])
def test_compiled_fused_step_follows_a_tensor_lr_without_recompiling(cls, device):
    """A tensor lr (torch.compile keeps it out of its guards) goes to the fused kernel as a tensor, which reads
    its value at every call: no host read breaks the graph (fullgraph=True), a schedule that writes the tensor
    in place (as torch's schedulers do with a tensor lr) recompiles nothing after the first steps, and the steps
    follow an eager run with the same float lrs exactly."""
    from torch._dynamo.utils import counters

    _fused_kernel_or_skip(device)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    eager_p = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in ((33,), (5, 7))]
    comp_p = [p.detach().clone().requires_grad_() for p in eager_p]
    kw = dict(weight_decay=0.01, fused=True)
    eager, comp = cls(eager_p, lr=0.01, **kw), cls(comp_p, lr=torch.tensor(0.01, device=device), **kw)

    @torch.compile(fullgraph=True, backend="inductor")
    def compiled_step():
        comp.step()

    graphs = []
    for step in range(6):
        lr = 0.01 / (1 + step)
        eager.param_groups[0]["lr"] = lr
        comp.param_groups[0]["lr"].fill_(lr)
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in eager_p]
        for ps in (eager_p, comp_p):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        eager.step()
        compiled_step()
        graphs.append(counters["stats"]["unique_graphs"])
        for p, q in zip(eager_p, comp_p):
            assert torch.equal(p, q), f"step {step + 1}"
    assert len(set(graphs[2:])) == 1, f"recompiled after the second step: graphs so far {graphs}"
