"""The CUDA kernels of cuda/ built for the CPU emulator, as drop-ins for ``lamb._fused._fused_lamb`` / ``_fused_lars``.

``build()`` compiles, with g++ and ``-DLAMB_CUDA_EMULATE``, the real ``cuda/lamb_kernels.cu`` and
``cuda/lars_kernels.cu`` together with this folder's CUDA stand-in (``cuda_runtime.h``, ``emu_runtime.cpp``)
and ``driver.cpp`` (the torch binding's host sequence behind a C API) into one shared library, cached under
the temp dir by a digest of every source and flag.  ``lamb()`` and ``lars()`` take the arguments of
``_fused_lamb`` / ``_fused_lars`` (CPU tensors standing in for device memory) and run the binding's sequence
of launches: prologue, pass A, finalize, pass B, or with ``norm_reduce`` the split step's two ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from lamb import ops
from lamb._fused import _BIAS, _DENOMINATORS, _WD_MODES, _grad_like, _scalar_on

HERE = Path(__file__).resolve().parent
SRC = ops.source_dir()
BINDING = SRC / "lamb_cuda_binding.cpp"
HOST_SOURCES = [HERE / "emu_runtime.cpp", HERE / "driver.cpp"]
KERNEL_SOURCES = [SRC / "lamb_kernels.cu", SRC / "lars_kernels.cu"]
# -ffp-contract=off: no FMA contraction, as the CUDA build's --fmad=false.  -fsanitize=alignment,bounds: every
# misaligned typed access (a vector load the GPU would fault on) and every index past a fixed-size array is
# reported as a fault, through handlers in emu_runtime.cpp (no sanitizer runtime is linked).
CXXFLAGS = ["-O1", "-std=c++20", "-fPIC", "-ffp-contract=off", "-DLAMB_CUDA_EMULATE",
            "-fsanitize=alignment,bounds", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror"]

# lamb_math::Combo by (parameter dtype, master weights); an fp32 gradient of a 16-bit parameter adds G32.
COMBOS = {(torch.float32, False): 0, (torch.bfloat16, False): 1, (torch.float16, False): 2,
          (torch.bfloat16, True): 3, (torch.float16, True): 4}
G32 = 4  # kBF16G32 - kBF16


def compiler() -> str | None:
    return shutil.which("g++")


# ------------------------------------------------------------------------------------------------ build
def _binding_params() -> str:
    """lamb_params() and lars_params() of the torch binding, verbatim (the driver includes them)."""
    text = BINDING.read_text()
    out = []
    for ret, name in (("LambParams", "lamb_params"), ("LarsParams", "lars_params")):
        m = re.search(rf"^{ret} {name}\(.*?^}}\n", text, re.M | re.S)
        if m is None:
            raise RuntimeError(f"{BINDING}: no top-level `{ret} {name}(...)` to extract for the emulator's driver")
        out.append(m.group(0))
    return f"// extracted from {BINDING.name} by tests/cuda_emu/emulated_ops.py\n" + "\n".join(out)


def _digest(cxx: str) -> str:
    h = hashlib.sha256()
    files = sorted(HERE.glob("*.h")) + HOST_SOURCES + KERNEL_SOURCES + sorted((SRC / "include").iterdir())
    for f in files + [BINDING]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(CXXFLAGS).encode())
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


_lib = None


def build() -> ctypes.CDLL:
    """Compile (once per source digest) and load the emulated kernels."""
    global _lib
    if _lib is not None:
        return _lib
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("g++ not found on PATH")
    out_dir = Path(tempfile.gettempdir()) / "lamb_cuda_emu" / _digest(cxx)
    so = out_dir / "lamb_cuda_emu.so"
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "binding_params.inc").write_text(_binding_params())
        tag = f"{os.getpid()}"
        inc = ["-I", str(HERE), "-I", str(SRC / "include"), "-I", str(out_dir)]
        jobs = []  # one compiler per source, in parallel (a few seconds each)
        for src in HOST_SOURCES + KERNEL_SOURCES:
            obj = out_dir / f"{src.name}.{tag}.o"
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            cmd = [cxx, *CXXFLAGS, *inc, "-c", *lang, str(src), "-o", str(obj)]
            jobs.append((cmd, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for cmd, _, proc in jobs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{err[-6000:]}")
        tmp = out_dir / f"lamb_cuda_emu.{tag}.so"
        link = [cxx, "-shared", *[str(obj) for _, obj, _ in jobs], "-o", str(tmp)]
        res = subprocess.run(link, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"linking the CUDA emulator failed:\n{' '.join(link)}\n{res.stderr[-6000:]}")
        os.replace(tmp, so)  # atomic: concurrent builders each write their own file
        for _, obj, _ in jobs:
            obj.unlink()
    lib = ctypes.CDLL(str(so))
    for name in ("emu_lamb_step", "emu_lars_step"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    for name in ("emu_lamb_pass_a", "emu_lamb_pass_b", "emu_lars_pass_a", "emu_lars_pass_b"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p]
    lib.emu_driver_error.restype = ctypes.c_char_p
    lib.emu_fault.restype = ctypes.c_char_p
    lib.emu_launch_info.restype = ctypes.c_char_p
    lib.emu_launch_info.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
    lib.emu_set_schedule.argtypes = [ctypes.c_int]
    _lib = lib
    return lib


# ------------------------------------------------------------------------------------------------ C structs
class _Tensor(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("master", ctypes.c_void_p), ("numel", ctypes.c_int64), ("combo", ctypes.c_int32),
                ("pad", ctypes.c_int32), ("step", ctypes.c_void_p), ("trust_ratio", ctypes.c_void_p),
                ("weight_norm", ctypes.c_void_p), ("update_norm", ctypes.c_void_p)]


class _Scalars(ctypes.Structure):
    _fields_ = [("found_inf", ctypes.c_void_p), ("grad_divisor", ctypes.c_void_p),
                ("grad_scale", ctypes.c_void_p), ("lr", ctypes.c_void_p)]


class _LambArgs(ctypes.Structure):
    _fields_ = [(k, ctypes.c_double) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")] + [
        ("weight_decay_mode", ctypes.c_int64), ("bias_correction", ctypes.c_int64)] + [
        (k, ctypes.c_int32) for k in ("grad_averaging", "adapt", "maximize", "check_finite", "has_min_trust_ratio",
                                      "has_max_trust_ratio", "has_weight_norm_lo", "has_weight_norm_hi")] + [
        (k, ctypes.c_double) for k in ("min_trust_ratio", "max_trust_ratio", "weight_norm_lo", "weight_norm_hi")]


class _LarsArgs(ctypes.Structure):
    _fields_ = [(k, ctypes.c_double) for k in ("lr", "momentum", "weight_decay", "trust_coefficient", "eps")] + [
        ("denominator", ctypes.c_int64)] + [
        (k, ctypes.c_int32) for k in ("nesterov", "trust_clip", "adapt", "maximize", "check_finite", "pad")]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_like(t: Tensor, p: Tensor, what: str) -> None:
    # the binding's check_like
    if t.numel() != p.numel() or (t.numel() and (not t.is_contiguous() or t.stride() != p.stride())):
        raise RuntimeError(f"lamb emulated CUDA: {what} must be dense with the parameter's {p.numel()} elements")


def _check_scalar(t: Tensor, what: str) -> None:
    if t.dtype != torch.float32 or t.numel() != 1:
        raise RuntimeError(f"lamb emulated CUDA: {what} must be a one-element float32 tensor")


def _tensors(params, grads, bufs1, bufs2, masters, steps, trs, wns, uns):
    n = len(params)
    arr = (_Tensor * n)()
    for i, p in enumerate(params):
        master = masters[i] if masters else None  # an empty list: no masters (the binding's rule)
        if p.numel() and not p.is_contiguous():
            raise RuntimeError(f"lamb emulated CUDA: parameter {i} is not dense")
        _check_like(grads[i], p, "a gradient")
        _check_like(bufs1[i], p, "a state buffer")
        if bufs2 is not None:
            _check_like(bufs2[i], p, "a state buffer")
        if master is not None:
            _check_like(master, p, "a master parameter")
        for t, what in ((steps[i], "state step"), (trs[i], "trust_ratio"), (wns[i], "weight_norm"),
                        (uns[i], "update_norm")):
            _check_scalar(t, what)
        # the binding's combo_of
        combo = COMBOS.get((p.dtype, master is not None))
        state_dtype = torch.float32 if master is not None else p.dtype
        fp32_grad = grads[i].dtype == torch.float32 and p.dtype != torch.float32
        if combo is None or bufs1[i].dtype != state_dtype or not (grads[i].dtype == p.dtype or fp32_grad):
            raise RuntimeError(f"lamb emulated CUDA: unsupported dtypes for parameter {i}")
        combo += G32 if fp32_grad else 0
        arr[i] = _Tensor(p.data_ptr(), grads[i].data_ptr(), bufs1[i].data_ptr(),
                         None if bufs2 is None else bufs2[i].data_ptr(), _ptr(master), p.numel(), combo, 0,
                         steps[i].data_ptr(), trs[i].data_ptr(), wns[i].data_ptr(), uns[i].data_ptr())
    return arr


def _raise_on_error(lib, rc: int) -> None:
    fault = lib.emu_fault().decode()
    if rc != 0 or fault:
        raise RuntimeError(f"lamb emulated CUDA: {lib.emu_driver_error().decode()} {fault}".strip())


def _split(lib, name: str, arr, n: int, scalars, args, norm_reduce) -> None:
    """As lamb._fused._split_step on one device: pass A, one norm_reduce, pass B."""
    sq = torch.empty(2 * n, dtype=torch.float64)
    _raise_on_error(lib, getattr(lib, f"emu_{name}_pass_a")(arr, n, ctypes.byref(scalars), ctypes.byref(args),
                                                            sq.data_ptr()))
    full = norm_reduce(sq)
    if not isinstance(full, Tensor) or full.shape != (2 * n,):
        raise RuntimeError(f"lamb: norm_reduce must return a 1-D tensor of {2 * n} squared norms (the layout it "
                           f"was given), got {type(full).__name__} {getattr(full, 'shape', '')}")
    full = full.to(dtype=torch.float64).contiguous()
    _raise_on_error(lib, getattr(lib, f"emu_{name}_pass_b")(arr, n, ctypes.byref(scalars), ctypes.byref(args),
                                                            full.data_ptr()))


def _lr(lr: float | Tensor) -> tuple[float, Tensor | None]:
    """As lamb._fused._lr for a CUDA device: a tensor lr stays a tensor, read by the kernels."""
    if isinstance(lr, Tensor):
        return 0.0, _scalar_on(lr, torch.device("cpu"))
    return float(lr), None


# ------------------------------------------------------------------------------------------------ the ops
def lamb(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, trust_ratios, weight_norms,
         update_norms, *, grad_divisor, lr, beta1, beta2, eps, weight_decay, weight_decay_mode, bias_correction,
         grad_averaging, adapt, min_trust_ratio, max_trust_ratio, weight_norm_bounds, maximize,
         grad_scale=None, found_inf=None, check_finite=False, norm_reduce=None) -> None:
    """``lamb._fused._fused_lamb`` on the emulated CUDA kernels (the CUDA device path of it)."""
    if not params:
        return
    lib = build()
    lib.emu_reset()
    grads = [_grad_like(g, p) for g, p in zip(grads, params)]
    arr = _tensors(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, trust_ratios, weight_norms,
                   update_norms)
    cpu = torch.device("cpu")
    lr_f, lr_t = _lr(lr)
    keep = [_scalar_on(found_inf, cpu), _scalar_on(grad_divisor, cpu), _scalar_on(grad_scale, cpu), lr_t]
    scalars = _Scalars(*map(_ptr, keep))
    lo, hi = weight_norm_bounds if weight_norm_bounds is not None else (None, None)
    args = _LambArgs(lr=lr_f, beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
                     weight_decay_mode=_WD_MODES[weight_decay_mode], bias_correction=_BIAS[bias_correction],
                     grad_averaging=int(bool(grad_averaging)), adapt=int(bool(adapt)), maximize=int(bool(maximize)),
                     check_finite=int(bool(check_finite)),
                     has_min_trust_ratio=int(min_trust_ratio is not None),
                     has_max_trust_ratio=int(max_trust_ratio is not None),
                     has_weight_norm_lo=int(lo is not None), has_weight_norm_hi=int(hi is not None),
                     min_trust_ratio=float(min_trust_ratio or 0.0), max_trust_ratio=float(max_trust_ratio or 0.0),
                     weight_norm_lo=float(lo or 0.0), weight_norm_hi=float(hi or 0.0))
    if norm_reduce is None:
        _raise_on_error(lib, lib.emu_lamb_step(arr, len(params), ctypes.byref(scalars), ctypes.byref(args)))
    else:
        _split(lib, "lamb", arr, len(params), scalars, args, norm_reduce)
    del keep


def lars(params, grads, momentum_buffers, master_params, state_steps, trust_ratios, weight_norms, update_norms, *,
         lr, momentum, weight_decay, trust_coefficient, eps, nesterov, denominator, trust_clip, adapt, maximize,
         grad_scale=None, found_inf=None, check_finite=False, norm_reduce=None) -> None:
    """``lamb._fused._fused_lars`` on the emulated CUDA kernels (the CUDA device path of it)."""
    if not params:
        return
    lib = build()
    lib.emu_reset()
    grads = [_grad_like(g, p) for g, p in zip(grads, params)]
    arr = _tensors(params, grads, momentum_buffers, None, master_params, state_steps, trust_ratios, weight_norms,
                   update_norms)
    cpu = torch.device("cpu")
    lr_f, lr_t = _lr(lr)
    keep = [_scalar_on(found_inf, cpu), None, _scalar_on(grad_scale, cpu), lr_t]
    scalars = _Scalars(*map(_ptr, keep))
    args = _LarsArgs(lr=lr_f, momentum=float(momentum), weight_decay=float(weight_decay),
                     trust_coefficient=float(trust_coefficient), eps=float(eps),
                     denominator=_DENOMINATORS[denominator], nesterov=int(bool(nesterov)),
                     trust_clip=int(bool(trust_clip)), adapt=int(bool(adapt)), maximize=int(bool(maximize)),
                     check_finite=int(bool(check_finite)), pad=0)
    if norm_reduce is None:
        _raise_on_error(lib, lib.emu_lars_step(arr, len(params), ctypes.byref(scalars), ctypes.byref(args)))
    else:
        _split(lib, "lars", arr, len(params), scalars, args, norm_reduce)
    del keep


# ------------------------------------------------------------------------------------------------ introspection
def launches() -> list[tuple[str, int, int, int]]:
    """The launches of the last ``lamb()`` / ``lars()`` call: (kernel, blocks, threads, argument bytes)."""
    lib = build()
    out = []
    info = (ctypes.c_longlong * 3)()
    for i in range(lib.emu_launch_count()):
        name = lib.emu_launch_info(i, info).decode()
        out.append((name, info[0], info[1], info[2]))
    return out


@contextlib.contextmanager
def schedule(mode: int):
    """Run the threads of a block between barriers in index order (0), reversed (1) or shuffled (seed >= 2)."""
    lib = build()
    lib.emu_set_schedule(mode)
    try:
        yield
    finally:
        lib.emu_set_schedule(0)


def dispatch_unknown_combo() -> int:
    """The cudaError_t that LAMB_CUDA_DISPATCH returns for a dtype combination it does not know."""
    return build().emu_dispatch_unknown_combo()
