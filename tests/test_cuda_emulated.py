"""The CUDA kernels of cuda/ run on the CPU under an emulator, against the float64 references.

tests/cuda_emu builds the real ``cuda/lamb_kernels.cu`` and ``cuda/lars_kernels.cu`` with g++ and a small CUDA
stand-in (every block of a launch in turn, the 512 threads of a block as fibers with real barriers), plus a
driver that does what the torch binding does around the launchers (scratch table, chunk prefix, one batch per
dtype combination, the prologue / pass A / finalize / pass B sequence and the split step's two ops).  So a
machine without a GPU runs the GPU code's launcher (chunking, relaunch at 36 tensors or 240 blocks, a tensor
that continues into the next launch), its vector and scalar paths, block reductions, the prologue and
finalize kernels and the split-step kernels, and this file compares the results with

* tests/reference.py's float64 RefLamb / RefLars (written from the papers), to reference.fp32_tolerance, the
  tolerance the fp32 package is held to against them (tests/test_lamb_reference.py, test_lars_reference.py);
* the package's fp32 reference backend to TOL32, what tests/test_fused_gpu.py checks on a real GPU.

Not covered (the emulator cannot see them): warp-level behaviour and scheduling, memory coalescing and
timing, the device math library (powf's and the fp16 intrinsics' device rounding: lamb_math.h's host paths
run instead), and the torch binding's own code beyond lamb_params / lars_params (its argument checks and
allocations are mirrored by tests/cuda_emu/driver.cpp, not compiled).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cuda_emu import emulated_ops as emu
from reference import (
    _BIAS_CORRECTION,
    F32_EPS,
    RefLamb,
    RefLars,
    fp32_tolerance,
    make_grads,
    make_params,
    param_names,
)

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="g++ not found: the CUDA emulator needs a host "
                                "C++20 compiler (apt-get install g++)")

from lamb.lamb import _single_tensor_lamb  # noqa: E402
from lamb.lars import _single_tensor_lars  # noqa: E402
import test_lamb_reference  # noqa: E402
import test_lars_reference  # noqa: E402
from test_fused_cpu import (  # noqa: E402
    LAMB_KW, LAMB_VARIANTS, LARS_KW, LARS_VARIANTS, SHAPES, SPLIT_LAMB_VARIANTS, SPLIT_LARS_VARIANTS, SPLIT_SHAPES,
    STEPS, TOL32, _check_large_finite_gradient, _check_split, _close, _grads, _lamb_call, _lars_call, _params,
    _Pieces, _state, check_fp32_grads, close64, close_to_stored, fp32_grads, fp32_tol, lamb64_stored, ref_lamb64,
    ref_lars64,
)

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _built():
    emu.build()


# ------------------------------------------------------------------------------------------- references
def _ref_grads(grads, kw):
    """The gradients as RefLamb sees them: a fixed NVLAMB divisor is applied to them (RefLamb only knows
    max_grad_norm; ``g / divisor`` is what its clip does)."""
    div = kw.get("grad_divisor")
    div = 1.0 if div is None else float(div)
    return [[g.double() / div for g in grads]]


LAMB_STATE = (("m", "exp_avg"), ("v", "exp_avg_sq"))
LARS_STATE = (("m", "momentum_buffer"),)


def _compare_ref(ref, params, states, tol, state_keys, what="", gi=0):
    """Parameters (the masters where there are), state buffers, step and statistics against the reference."""
    for i, (p, st) in enumerate(zip(params, states)):
        master = st["master"]
        close64(master if master is not None else p, ref.groups[gi].params[i], tol, f"{what} param {i}")
        if master is not None:
            assert torch.equal(p, master.to(p.dtype)), f"{what} param {i} is not its master rounded"
        rst = ref.state.get((gi, i))
        if rst is None:
            assert st["step"].item() == 0, f"{what} param {i}: stepped without a gradient"
            continue
        assert st["step"].item() == rst["step"], f"{what} param {i}: step {st['step'].item()} != {rst['step']}"
        for key, rkey in state_keys:
            close64(st[key], rst[rkey], tol, f"{what} {rkey} {i}")
        for key, rkey in (("tr", "trust_ratio"), ("wn", "weight_norm"), ("un", "update_norm")):
            got, want = float(st[key]), rst[rkey]
            assert math.isclose(got, want, rel_tol=max(tol, 4 * F32_EPS), abs_tol=1e-30), (what, i, rkey, got, want)


def _numel(params):
    return max(p.numel() for p in params)


# ------------------------------------------------------------------------------------------- LAMB variants
def _lamb_variant_run(kw, dtype, steps=STEPS, shapes=SHAPES):
    """Emulated CUDA, float64 reference and the fp32 package reference side by side; the float64 comparison
    after every step."""
    masters = dtype != torch.float32
    params = _params(dtype, shapes=shapes)
    emu_p, pkg_p = [p.clone() for p in params], [p.clone() for p in params]
    emu_s, pkg_s = _state(emu_p, masters), _state(pkg_p, masters)
    ref = ref_lamb64(params, kw)
    for step in range(steps):
        g = _grads(params, step)
        _lamb_call(emu.lamb, emu_p, [x.clone() for x in g], emu_s, **kw)
        _lamb_call(_single_tensor_lamb, pkg_p, g, pkg_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        ref.step(_ref_grads(g, kw))
        tol = fp32_tolerance(step + 1, _numel(params), beta2=kw["beta2"])
        _compare_ref(ref, emu_p, emu_s, tol, LAMB_STATE, f"step {step + 1}")
    return emu_p, emu_s, pkg_p, pkg_s


def _close_to_package(emu_p, emu_s, pkg_p, pkg_s, keys):
    """tests/test_fused_gpu.py's comparison with the fp32 reference backend."""
    for i in range(len(emu_p)):
        masters = emu_s[i]["master"] is not None
        _close(pkg_s[i]["master"] if masters else pkg_p[i], emu_s[i]["master"] if masters else emu_p[i], TOL32,
               f"param {i}")
        for k in keys:
            _close(pkg_s[i][k], emu_s[i][k], TOL32, f"{k} {i}")
        assert emu_s[i]["step"].item() == STEPS


@pytest.mark.parametrize("variant", list(LAMB_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_masters"])
def test_lamb_matches_references(variant, dtype):
    kw = {**LAMB_KW, **LAMB_VARIANTS[variant]}
    emu_p, emu_s, pkg_p, pkg_s = _lamb_variant_run(kw, dtype)
    _close_to_package(emu_p, emu_s, pkg_p, pkg_s, ("m", "v", "tr", "wn", "un"))


@pytest.mark.parametrize("variant", ["paper", "l2", "decoupled", "nvlamb_divisor", "check_finite", "tensor_lr"])
def test_lamb_fp16_masters_matches_references(variant):
    kw = {**LAMB_KW, **LAMB_VARIANTS[variant]}
    emu_p, emu_s, pkg_p, pkg_s = _lamb_variant_run(kw, torch.float16)
    _close_to_package(emu_p, emu_s, pkg_p, pkg_s, ("m", "v", "tr"))


@pytest.mark.parametrize("grad_scale", [1.0, 0.01])
@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_lamb_low_precision_without_masters(dtype, check_finite, grad_scale):
    """16-bit moments and parameters (pass A only reads, pass B recomputes m, v and takes u from their fp32
    values) against the float64 equations with storage rounding, as tests/test_fused_cpu.py's test of that name."""
    params = _params(dtype, shapes=[(5,), (18011,), (64, 33)])
    p, st = [x.clone() for x in params], _state(params)
    grads = [_grads(params, step, grad_scale) for step in range(STEPS)]
    for g in grads:
        _lamb_call(emu.lamb, p, [x.clone() for x in g], st, **LAMB_KW, check_finite=check_finite)
    close_to_stored(p, st, lamb64_stored(params, grads, dtype), dtype)
    assert all(s["step"].item() == STEPS for s in st)


# Two param groups as lamb.Lamb steps them (per group the parameters that have a gradient; max_grad_norm's
# divisor from the global norm; trust_clip folded into max_trust_ratio), on reference.make_params: a zero
# parameter, a zero first gradient, a gradient missing at step 3, a frozen parameter, an empty tensor.
def _lamb_class_kw(o, global_norm):
    hi = o["max_trust_ratio"]
    if o["trust_clip"]:
        hi = 1.0 if hi is None else min(hi, 1.0)
    mgn = o["max_grad_norm"]
    return dict(grad_divisor=None if mgn is None else torch.tensor(max(1.0, global_norm / mgn)),
                lr=o["lr"], beta1=o["betas"][0], beta2=o["betas"][1], eps=o["eps"], weight_decay=o["weight_decay"],
                weight_decay_mode=o["weight_decay_mode"], bias_correction=_BIAS_CORRECTION[o["bias_correction"]],
                grad_averaging=o["grad_averaging"],
                adapt=o["layer_adaptation"] and not (o["adapt_decayed_only"] and o["weight_decay"] == 0),
                min_trust_ratio=o["min_trust_ratio"], max_trust_ratio=hi,
                weight_norm_bounds=o["weight_norm_bounds"], maximize=o["maximize"])


def _lars_class_kw(o, global_norm):
    return dict(lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                trust_coefficient=o["trust_coefficient"], eps=o["eps"], nesterov=o["nesterov"],
                denominator=o["denominator"], trust_clip=o["trust_clip"], adapt=o["layer_adaptation"],
                maximize=o["maximize"])


def _run_groups(module, ref_cls, kw_of, op, call, state_keys, variant, steps=4):
    opts, g1_over = module.VARIANTS[variant]
    params, g0, g1 = make_params(dtype=torch.float32)
    groups = [g0, g1]
    spec = [{"params": g0}, {"params": g1, "weight_decay": 0.0, "lr": 0.05 if ref_cls is RefLars else 0.02,
                                                **g1_over}]
    ref = ref_cls.from_params(spec, **{**module.BASE, **opts})
    names = param_names(params)
    data = [[p.detach().clone() for p in g] for g in groups]
    states = [[None] * len(g) for g in groups]
    frozen = params["frozen"].detach().clone()
    for step in range(1, steps + 1):
        grads = make_grads(groups, step, names=names)
        grads = [[None if g is None else g.float() for g in gs] for gs in grads]
        ref_grads = [[None if g is None else g.double() for g in gs] for gs in grads]
        global_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for gs in grads for g in gs if g is not None))
        for gi, (ps, gs) in enumerate(zip(data, grads)):
            idx = [i for i, g in enumerate(gs) if g is not None]
            for i in idx:
                if states[gi][i] is None:
                    states[gi][i] = _state([ps[i]])[0]
            kw = kw_of(ref.groups[gi].options, global_norm)
            call(op, [ps[i] for i in idx], [gs[i] for i in idx], [states[gi][i] for i in idx], **kw)
        ref.step(ref_grads)
        tol = (fp32_tolerance(step, 18011, beta2=ref.defaults["betas"][1]) if ref_cls is RefLamb
               else fp32_tolerance(step, 18011, ops=8))
        for gi in range(2):
            st = [s if s is not None else _state([p])[0] for p, s in zip(data[gi], states[gi])]
            _compare_ref(ref, data[gi], st, tol, state_keys, f"{variant} step {step} group {gi}", gi=gi)
    assert torch.equal(data[0][next(i for i, x in enumerate(g0) if x is params["frozen"])], frozen)


@pytest.mark.parametrize("masters", [True, False], ids=["masters", "no_masters"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_fp32_gradients_of_16bit_parameters(algo, dtype, masters):
    """float32 gradients of bf16/fp16 parameters (the G32 combinations) against the float64 references, as
    tests/test_fused_cpu.py's test of that name."""
    check_fp32_grads(algo, emu.lamb if algo == "lamb" else emu.lars, dtype, masters, fp32_tol(algo),
                     shapes=[(5,), (18011,), (64, 33)])


@pytest.mark.parametrize("variant", list(test_lamb_reference.VARIANTS))
def test_lamb_two_groups_match_float64_reference(variant):
    _run_groups(test_lamb_reference, RefLamb, _lamb_class_kw, emu.lamb, _lamb_call, LAMB_STATE, variant)


# ------------------------------------------------------------------------------------------- LARS variants
# the fused tests' variants, and a tensor lr (read by the finalize kernel, where LARC's clip divides by it)
EMU_LARS_VARIANTS = {**LARS_VARIANTS, "tensor_lr_larc": dict(lr=torch.tensor(0.01), trust_clip=True)}


@pytest.mark.parametrize("variant", list(EMU_LARS_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_masters"])
def test_lars_matches_references(variant, dtype):
    kw = {**LARS_KW, **EMU_LARS_VARIANTS[variant]}
    masters = dtype != torch.float32
    params = _params(dtype)
    emu_p, pkg_p = [p.clone() for p in params], [p.clone() for p in params]
    emu_s, pkg_s = _state(emu_p, masters), _state(pkg_p, masters)
    ref = ref_lars64(params, kw)
    for step in range(STEPS):
        g = _grads(params, step)
        _lars_call(emu.lars, emu_p, [x.clone() for x in g], emu_s, **kw)
        _lars_call(_single_tensor_lars, pkg_p, g, pkg_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        ref.step([[x.double() for x in g]])
        _compare_ref(ref, emu_p, emu_s, fp32_tolerance(step + 1, _numel(params), ops=8), LARS_STATE,
                     f"step {step + 1}")
    _close_to_package(emu_p, emu_s, pkg_p, pkg_s, ("m", "tr", "wn", "un"))


@pytest.mark.parametrize("variant", list(test_lars_reference.VARIANTS))
def test_lars_two_groups_match_float64_reference(variant):
    _run_groups(test_lars_reference, RefLars, _lars_class_kw, emu.lars, _lars_call, LARS_STATE, variant)


# ------------------------------------------------------------------------------------------- the launcher
def test_launcher_relaunches_and_continues_a_tensor():
    """More than 36 tensors and more than 240 chunks in one call, three dtype combinations.

    fp32 batch: 36 tensors fill the first launch; 30 more and 210 chunks of the big tensor fill the second
    (240 blocks) mid-tensor, so the big tensor continues in slot 0 of the third launch with its last 2
    chunks and 3 more tensors.  The bf16 and fp16 tensors with masters sit between them in call order, so
    the chunk bases and ids of each batch interleave with the others'."""
    big = 211 * 65536 + 1234
    small = [(1 + (5 * i) % 40,) for i in range(36)]
    shapes = small + [(0,), (3,)] + [(2 + i,) for i in range(30)] + [(big,), (65537,), (7,), (0,)] + [(5,), (1,), (9,)]
    dtypes = ([torch.float32] * 36 + [torch.float32, torch.bfloat16] + [torch.float32] * 30 +
              [torch.float32, torch.float16, torch.float16, torch.bfloat16] + [torch.float32] * 3)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes, dtypes)]
    st = [_state([p], masters=p.dtype != torch.float32)[0] for p in params]
    ref = ref_lamb64(params, LAMB_KW)
    g = [(torch.randn(p.shape, generator=gen)).to(p.dtype) for p in params]
    _lamb_call(emu.lamb, params, g, st, **LAMB_KW)
    log = emu.launches()
    ref.step(_ref_grads(g, LAMB_KW))
    _compare_ref(ref, params, st, fp32_tolerance(1, big, beta2=LAMB_KW["beta2"]), LAMB_STATE)

    names = [name for name, *_ in log]
    assert names == (["lamb_prologue_kernel"] + ["multi_tensor_kernel<N>"] * 5 + ["lamb_finalize_kernel<false>"] +
                     ["multi_tensor_kernel<N>"] * 5), names
    passes = [blocks for name, blocks, *_ in log if name.startswith("multi_tensor")]
    # pass A then pass B: fp32 [36, 240, 5], bf16 with masters [1] (3 elements and an empty tensor), fp16
    # with masters [2 + 1]
    assert passes == [36, 240, 5, 1, 3] * 2, passes
    assert all(threads == 512 for name, _, threads, _ in log)
    assert max(nbytes for *_, nbytes in log) <= 4096  # the CUDA kernel-argument limit the launcher relies on


class _Guarded:
    """A tensor inside a larger buffer, offset by ``offset`` elements from a 64-byte boundary, with guard
    elements around it that the kernels must leave alone (an out-of-bounds write changes them)."""

    PAD = 64
    FILL = -12288.0  # exact in every dtype here

    def __init__(self, src: torch.Tensor, offset: int, dtype=None):
        dtype = dtype or src.dtype
        self.buf = torch.full((self.PAD + offset + src.numel() + self.PAD,), self.FILL, dtype=dtype)
        self.lo = self.PAD + offset
        self.t = self.buf[self.lo:self.lo + src.numel()]
        self.t.copy_(src.reshape(-1))

    def guards_intact(self) -> bool:
        before, after = self.buf[:self.lo], self.buf[self.lo + self.t.numel():]
        return bool((before == self.FILL).all() and (after == self.FILL).all())


@pytest.mark.parametrize("dtype, grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16_masters", "bf16_masters_fp32_grads"])
@pytest.mark.parametrize("misaligned", ["none", "all", "grad_only", "state_only"])
def test_vector_and_scalar_paths_stay_in_bounds(dtype, grad_dtype, misaligned):
    """Lengths off the vector width and one misaligned tensor (or only one of its buffers: the
    vectorised path needs every address aligned, each for its own dtype's vector), over several chunks,
    inside guard zones."""
    shapes = [(1,), (3,), (7,), (18011,), (2 * 65536 + 3,), (65536,)]
    masters = dtype != torch.float32
    params = _params(dtype, shapes=shapes)
    ref = ref_lamb64(params, LAMB_KW)
    offs = {"none": (0, 0, 0), "all": (1, 1, 1), "grad_only": (0, 1, 0), "state_only": (0, 0, 1)}[misaligned]
    gp = [_Guarded(p, offs[0]) for p in params]
    st = _state(params, masters)
    gs = {k: [_Guarded(s[k], offs[2]) for s in st] for k in ("m", "v")}
    gm = [_Guarded(s["master"], offs[2]) for s in st] if masters else []
    for i, s in enumerate(st):
        s["m"], s["v"] = gs["m"][i].t, gs["v"][i].t
        if masters:
            s["master"] = gm[i].t
    p = [x.t for x in gp]
    for step in range(2):
        g = _grads(params, step) if grad_dtype == dtype else fp32_grads(params, step)
        gg = [_Guarded(x, offs[1]) for x in g]
        _lamb_call(emu.lamb, p, [x.t for x in gg], st, **LAMB_KW)
        ref.step(_ref_grads(g, LAMB_KW))
        assert all(x.guards_intact() for x in gg)
    if misaligned == "all":
        assert all(x.t.data_ptr() % 16 for x in gp), "the tensors must not be 16-byte aligned"
    assert all(x.guards_intact() for x in gp + gs["m"] + gs["v"] + gm), "a kernel wrote outside a tensor"
    _compare_ref(ref, p, st, fp32_tolerance(2, 2 * 65536, beta2=LAMB_KW["beta2"]), LAMB_STATE)


def test_lars_scalar_path_and_guards():
    shapes = [(1,), (7,), (18011,), (65536 + 5,)]
    params = _params(shapes=shapes)
    ref = ref_lars64(params, LARS_KW)
    gp = [_Guarded(x, 1) for x in params]
    st = _state(params)
    gb = [_Guarded(s["m"], 1) for s in st]
    for s, b in zip(st, gb):
        s["m"] = b.t
    p = [x.t for x in gp]
    for step in range(2):
        g = _grads(params, step)
        gg = [_Guarded(x, 3) for x in g]
        _lars_call(emu.lars, p, [x.t for x in gg], st, **LARS_KW)
        ref.step([[x.double() for x in g]])
        assert all(x.guards_intact() for x in gg)
    assert all(x.guards_intact() for x in gp + gb)
    _compare_ref(ref, p, st, fp32_tolerance(2, 65536, ops=8), LARS_STATE)


def test_empty_calls():
    p, g = [torch.zeros(0)] * 2, [torch.zeros(0)] * 2
    st = _state(p)
    _lamb_call(emu.lamb, p, g, st, **LAMB_KW)
    # no pass A / B launches for empty tensors; the per-tensor step still counts (as the reference's)
    assert [name for name, *_ in emu.launches()] == ["lamb_prologue_kernel", "lamb_finalize_kernel<false>"]
    assert all(s["step"].item() == 1 and s["tr"].item() == 1.0 for s in st)
    _lamb_call(emu.lamb, [], [], [], **LAMB_KW)


def test_dispatch_rejects_an_unknown_combination():
    assert emu.dispatch_unknown_combo() == 1  # cudaErrorInvalidValue


# ------------------------------------------------------------------------------------------- skipping steps
def _mixed_params():
    # two batches (fp32, bf16 with masters): the bad gradient sits in the second, so the first batch's
    # pass A must not have written anything when the finalize kernel finds it
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen).to(dt) for s, dt in
              (((7,), torch.float32), ((18011,), torch.float32), ((0,), torch.float32), ((300,), torch.bfloat16))]
    st = [_state([p], masters=p.dtype != torch.float32)[0] for p in params]
    return params, st


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_skipped_steps_write_nothing(algo):
    fn, call, kw = (emu.lamb, _lamb_call, LAMB_KW) if algo == "lamb" else (emu.lars, _lars_call, LARS_KW)
    params, st = _mixed_params()
    call(fn, params, _grads(params, 0), st, **kw)
    before = copy.deepcopy((params, st))
    keys = ("master", "m", "v", "step", "tr", "wn", "un")

    def unchanged(what):
        for p0, p1 in zip(before[0], params):
            assert torch.equal(p0, p1), what
        for s0, s1 in zip(before[1], st):
            for k in keys:
                if s0[k] is not None:
                    assert torch.equal(s0[k], s1[k]), f"{what}: state {k} changed"

    launches = None
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = _grads(params, 1)
        bad[3][17] = bad_value
        call(fn, params, bad, st, **kw, check_finite=True)
        unchanged(f"{bad_value} gradient with check_finite")
        launches = launches or emu.launches()
    cases = {"found_inf": dict(found_inf=torch.tensor(1.0)),
             "inf grad_scale": dict(grad_scale=torch.tensor(math.inf)),
             "NaN grad_scale": dict(grad_scale=torch.tensor(math.nan)),
             "zero grad_scale": dict(grad_scale=torch.tensor(0.0))}
    if algo == "lamb":
        cases["inf NVLAMB divisor"] = dict(grad_divisor=torch.tensor(math.inf))
    for what, extra in cases.items():
        call(fn, params, _grads(params, 1), st, **{**kw, **extra})
        unchanged(what)
        # the skip is decided on the device: every kernel is still launched (no host sync)
        assert [n for n, *_ in emu.launches()] == [n for n, *_ in launches], what
    call(fn, params, _grads(params, 1), st, **kw, check_finite=True, found_inf=torch.tensor(0.0))
    assert all(s["step"].item() == 2 for s in st), "a finite step must apply"
    assert not torch.equal(before[0][1], params[1])


@pytest.mark.parametrize("split", [False, True], ids=["one_call", "split"])
@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_check_finite_takes_large_finite_gradients(algo, split):
    """The CPU twin's test of the same name: the CUDA kernels summed g * g for the check, and skipped the step
    (the split step: skipped on the overflowed ||d||^2 that pass B reads)."""
    _check_large_finite_gradient(*((emu.lamb, _lamb_call, LAMB_KW) if algo == "lamb"
                                   else (emu.lars, _lars_call, LARS_KW)), split=split)


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_grad_scale_unscales(algo):
    fn, call, kw = (emu.lamb, _lamb_call, LAMB_KW) if algo == "lamb" else (emu.lars, _lars_call, LARS_KW)
    params = _params(shapes=[(7,), (18011,)])
    p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
    s1, s2 = _state(p1), _state(p2)
    for step in range(2):
        g = _grads(params, step)
        call(fn, p1, g, s1, **kw)
        call(fn, p2, [x * 1024.0 for x in g], s2, **kw, grad_scale=torch.tensor(1024.0))
    for a, b in zip(p1 + [s["un"] for s in s1], p2 + [s["un"] for s in s2]):
        assert torch.equal(a, b)  # scaling by a power of two is exact


# ------------------------------------------------------------------------------------------- split step
@pytest.mark.parametrize("variant", list(SPLIT_LAMB_VARIANTS))
def test_lamb_split_pieces_match_references(variant):
    kw = {**LAMB_KW, **SPLIT_LAMB_VARIANTS[variant]}
    params = _params(shapes=SPLIT_SHAPES)
    pkg_p = [p.clone() for p in params]
    pkg_s = _state(pkg_p)
    ref = ref_lamb64(params, kw)
    pc = _Pieces(params)
    for step in range(STEPS):
        grads = _grads(params, step)
        _lamb_call(_single_tensor_lamb, pkg_p, grads, pkg_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        _lamb_call(emu.lamb, pc.pieces, pc.grads(grads), pc.piece_state, **kw, norm_reduce=pc.norm_reduce)
        ref.step(_ref_grads(grads, kw))
    assert pc.reduce_calls == STEPS
    _check_split(pkg_p, pkg_s, pc, ("m", "v"))  # the fp32 package reference, as the CPU twin's split tests
    tol = fp32_tolerance(STEPS, _numel(params), beta2=kw["beta2"])
    for j, flat in enumerate(pc.flat):  # the float64 reference on the whole tensors
        close64(flat, ref.params[j].reshape(-1), tol, f"param {j}")
        for key, rkey in LAMB_STATE:
            close64(pc.state[j][key], ref.state[(0, j)][rkey].reshape(-1), tol, f"{rkey} {j}")
        for key, rkey in (("tr", "trust_ratio"), ("wn", "weight_norm"), ("un", "update_norm")):
            for got in pc.stats(j, key):  # every piece reports its parameter's full statistics
                assert math.isclose(float(got), ref.state[(0, j)][rkey], rel_tol=tol, abs_tol=1e-30), (j, rkey)


def test_lamb_split_bf16_with_masters():
    params = _params(torch.bfloat16, shapes=SPLIT_SHAPES)
    ref = ref_lamb64(params, LAMB_KW)
    pc = _Pieces(params, masters=True)
    for step in range(STEPS):
        grads = _grads(params, step)
        _lamb_call(emu.lamb, pc.pieces, pc.grads(grads), pc.piece_state, **LAMB_KW, norm_reduce=pc.norm_reduce)
        ref.step(_ref_grads(grads, LAMB_KW))
    tol = fp32_tolerance(STEPS, _numel(params), beta2=LAMB_KW["beta2"])
    for j in range(len(params)):
        close64(pc.state[j]["master"], ref.params[j].reshape(-1), tol, f"master {j}")
        assert torch.equal(pc.flat[j], pc.state[j]["master"].to(torch.bfloat16))


@pytest.mark.parametrize("variant", list(SPLIT_LARS_VARIANTS))
def test_lars_split_pieces_match_references(variant):
    kw = {**LARS_KW, **SPLIT_LARS_VARIANTS[variant]}
    params = _params(shapes=SPLIT_SHAPES)
    pkg_p = [p.clone() for p in params]
    pkg_s = _state(pkg_p)
    ref = ref_lars64(params, kw)
    pc = _Pieces(params)
    for step in range(STEPS):
        grads = _grads(params, step)
        _lars_call(_single_tensor_lars, pkg_p, grads, pkg_s, **{k: v for k, v in kw.items() if k != "check_finite"})
        _lars_call(emu.lars, pc.pieces, pc.grads(grads), pc.piece_state, **kw, norm_reduce=pc.norm_reduce)
        ref.step([[g.double() for g in grads]])
    assert pc.reduce_calls == STEPS
    _check_split(pkg_p, pkg_s, pc, ("m",))
    tol = fp32_tolerance(STEPS, _numel(params), ops=8)
    for j, flat in enumerate(pc.flat):
        close64(flat, ref.params[j].reshape(-1), tol, f"param {j}")
        close64(pc.state[j]["m"], ref.state[(0, j)]["momentum_buffer"].reshape(-1), tol, f"momentum {j}")


@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_split_skips_write_nothing(algo):
    """A NaN in one piece: its partial ||u||^2 is NaN, the sum spreads it to every piece and pass B skips all."""
    fn, call, kw = (emu.lamb, _lamb_call, LAMB_KW) if algo == "lamb" else (emu.lars, _lars_call, LARS_KW)
    params = _params(shapes=[(7,), (18011,), (0,)])
    pc = _Pieces(params)
    call(fn, pc.pieces, pc.grads(_grads(params, 0)), pc.piece_state, **kw, norm_reduce=pc.norm_reduce)
    before = copy.deepcopy((pc.flat, pc.state, pc.piece_state))
    seen = []

    def reduce(sq):
        seen.append(sq.clone())
        return pc.norm_reduce(sq)

    bad = _grads(params, 1)
    bad[1][100] = float("nan")
    call(fn, pc.pieces, pc.grads(bad), pc.piece_state, **kw, check_finite=True, norm_reduce=reduce)
    assert seen[-1].isnan().sum() == 1, "exactly the piece holding the NaN reports a NaN partial norm"
    call(fn, pc.pieces, pc.grads(_grads(params, 1)), pc.piece_state, **kw, found_inf=torch.tensor(1.0),
         norm_reduce=reduce)
    assert not seen[-1].any(), "a skipped step reports zeros (the collective still runs)"
    for a, b in zip(before[0], pc.flat):
        assert torch.equal(a, b)
    for s0, s1 in zip(before[1] + before[2], pc.state + pc.piece_state):
        for k in ("m", "v", "step", "tr", "wn", "un"):
            assert torch.equal(s0[k], s1[k]), k
    call(fn, pc.pieces, pc.grads(_grads(params, 1)), pc.piece_state, **kw, check_finite=True,
         norm_reduce=pc.norm_reduce)
    assert all(st["step"].item() == 2 for st in pc.piece_state)


def test_split_without_reduction_equals_one_call_step():
    """Whole tensors and an identity norm_reduce: the split kernels compute exactly the one-call step."""
    params = _params(shapes=SPLIT_SHAPES)
    p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
    s1, s2 = _state(p1), _state(p2)
    for step in range(2):
        g = _grads(params, step)
        _lamb_call(emu.lamb, p1, g, s1, **LAMB_KW)
        _lamb_call(emu.lamb, p2, g, s2, **LAMB_KW, norm_reduce=lambda sq: sq)
    for x, y in zip(p1 + [s["un"] for s in s1], p2 + [s["un"] for s in s2]):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("algo", ["lamb", "lars"])
def test_deterministic_under_any_thread_order(algo):
    """The same call twice, and with the threads of a block run in reverse or shuffled order between barriers:
    bit-identical.  A barrier missing from a block reduction makes the sums depend on that order."""
    fn, call, kw = (emu.lamb, _lamb_call, LAMB_KW) if algo == "lamb" else (emu.lars, _lars_call, LARS_KW)
    params = _params(shapes=[(200000,), (18011,), (5,)])
    results = []
    for mode in (0, 0, 1, 2, 3):
        p = [x.clone() for x in params]
        st = _state(p)
        with emu.schedule(mode):
            for step in range(2):
                call(fn, p, _grads(params, step), st, **kw)
        results.append(p + [s[k] for s in st for k in ("m", "tr", "wn", "un")])
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)
