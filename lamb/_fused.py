"""The fused backends of :class:`lamb.Lamb` and :class:`lamb.Lars`: ``_fused_lamb`` and ``_fused_lars``.

Each is the same step as the reference backend (``lamb.lamb._single_tensor_lamb``,
``lamb.lars._single_tensor_lars``) in two passes over memory, in one kernel call for all the tensors of a
device (``torch.ops.lamb_cpu.*`` on CPU, ``torch.ops.lamb_cuda.*`` on CUDA; built by :mod:`lamb.ops`):

    LAMB  pass A  read g, x, m, v; write m, v; sum ||x||^2 and ||u||^2 per tensor     24 B/param (fp32)
          ratio   per tensor, on the tensors' device (no host sync on CUDA)
          pass B  read x, m, v; recompute u; write x (and the bf16/fp16 copy)           16 B/param
    LARS  pass A  read g, w; sum ||w||^2 and ||g||^2 (or ||g + wd w||^2)                 8 B/param
          pass B  read g, w, v; write v, w                                               20 B/param

Skipping a step (GradScaler's inf/NaN protocol): ``found_inf`` (a tensor, non-zero: skip), a non-finite
``grad_divisor`` or ``grad_scale`` skip the whole call before anything is written, without a host sync on
CUDA; skipped steps leave the parameters, every state tensor and ``step`` unchanged. ``grad_scale``
divides the gradients (unscaling folded into pass A). With ``check_finite=True`` the kernel also finds
non-finite gradients itself: LAMB's pass A then only reads, and pass B recomputes the moments from g and
writes m, v, x (44 B/param instead of 40); LARS's pass A only reads anyway, so its check is free.

bf16/fp16 parameters without master weights keep m, v in 16 bits, and the update u is computed from the
step's fp32 moments before they are rounded to that storage, as the reference backend does (from the rounded
fp16 ``v`` a small gradient's ``(1 - beta2) g^2`` would underflow to 0 and ``m / (sqrt(v) + eps)`` become
``m / eps``). Pass B cannot get that u back from the stored moments, so for these tensors LAMB's pass A only
reads and pass B recomputes m, v from g, as with ``check_finite`` (22 B/param instead of 20), except where the
CPU kernel keeps u in its cache-block scratch.

Partitioned parameters (``norm_reduce``, ZeRO-1/2 and ZeRO-Offload through :mod:`lamb.deepspeed`): the
tensors are pieces of parameters, so their norms are partial. The step then runs as two ops per device,
``lamb_pass_a_`` (pass A; writes the pieces' partial squared norms, float64) and ``lamb_pass_b_`` (ratio
from the completed norms, pass B, ``step += 1``), with one ``norm_reduce`` call between them: the same
bytes per parameter as the one-call step. Skipped steps write nothing in either pass (pass A reports
zeros, so the collective inside ``norm_reduce`` still runs on every rank); with ``check_finite`` a piece
with an inf/NaN gradient reports a NaN ``||u||^2`` (LARS: ``||d||^2``), which the reduction spreads to every
rank, and pass B skips the step wherever a completed one is NaN. An inf one is not a skip: a finite gradient
above 1.8e19 overflows its fp32 squares, and the one-call step goes ahead with it too.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lamb import ops

__all__ = ["fused_supported", "fused_preferred", "_fused_lamb", "_fused_lars", "FUSED_DTYPES"]

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WD_MODES = {"ratio": 0, "l2": 1, "decoupled": 2}
_BIAS = {"moments": 0, "lr": 1, "none": 2}
_DENOMINATORS = {"sum": 0, "norm": 1}


def _dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps or overlaps in some order of its dimensions (contiguous,
    channels_last, a transpose): the kernels then step that memory as one flat array, elementwise with the
    tensors that share its strides (the norms do not depend on the order)."""
    if t.numel() == 0 or t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


@lru_cache(maxsize=None)
def _device_status(device_type: str, index: int | None) -> tuple[bool, str]:
    if device_type == "cpu":
        return ops.cpu_status()
    if device_type == "cuda":
        return ops.cuda_status(torch.device("cuda", index) if index is not None else None)
    return False, f"no fused kernel exists for {device_type} tensors (fused kernels: cpu, cuda)"


def fused_supported(tensors: list[Tensor]) -> tuple[bool, str]:
    """Whether a fused kernel can step these parameters: ``(True, "")`` or ``(False, reason)``.

    The reason says what is missing and how to fix it (a compiler, a CUDA build of torch, a dtype).
    Cheap enough to call every step: nothing is compiled here.
    """
    for t in tensors:
        if t.dtype not in FUSED_DTYPES:
            return False, (f"the fused kernels support float32, bfloat16 and float16 parameters, not {t.dtype} "
                           f"(parameter of shape {tuple(t.shape)}); use foreach=True or fused=False")
        if not _dense(t):
            return False, (f"a parameter of shape {tuple(t.shape)} and strides {t.stride()} is a view with gaps or "
                           f"overlaps; the fused kernels need dense parameters (use foreach=True, or step a "
                           f"contiguous copy)")
    seen = set()
    for t in tensors:
        key = (t.device.type, t.device.index)
        if key in seen:
            continue
        seen.add(key)
        if key[0] == "cpu":
            ok, why = ops.cpu_status()  # not cached: it turns True once a build exists
        else:
            ok, why = _device_status(*key)
        if not ok:
            return False, why
    return True, ""


def fused_preferred(tensors: list[Tensor]) -> bool:
    """Whether ``fused=None`` should take the fused kernel: supported here and already built (or built
    ahead of time), so that choosing it never starts a compile in the middle of training. Not inside a
    torch.compile trace: there foreach, which the compiler turns into its own fused loops (as torch.optim's
    defaults), and whose choice needs no look at the file system in the traced step."""
    if not tensors or torch.compiler.is_compiling() or not fused_supported(tensors)[0]:
        return False
    devices = {t.device.type for t in tensors}
    if "cpu" in devices and not ops.is_cpu_built():
        return False
    if "cuda" in devices and not ops.is_cuda_built():
        return False
    return True


def _op(device: torch.device, name: str) -> Any:
    if device.type == "cpu":
        ops.load_cpu()
        return getattr(torch.ops.lamb_cpu, name)
    if device.type == "cuda":
        ops.load_cuda()
        return getattr(torch.ops.lamb_cuda, name)
    raise RuntimeError(f"lamb: no fused kernel for {device.type} tensors")


def _calls(params: list[Tensor], master_params: list[Tensor | None]) -> dict[tuple[torch.device, bool], list[int]]:
    """The parameters' indices by (device, has a master): one kernel call each. A call without masters passes
    an empty master list, not a list of None: torch.compile's inductor cannot take a written list holding None
    (``Tensor(d!)?[]``). Nothing the caller sees depends on the split: found_inf and the grad divisor are
    the same tensors in every call, and a cache block of the CPU kernel changes no bit of the result."""
    out: dict[tuple[torch.device, bool], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        out[(p.device, master_params[i] is not None)].append(i)
    return out


def _grad_like(g: Tensor, p: Tensor) -> Tensor:
    """The gradient in the parameter's memory layout (a copy only where it differs), and in the parameter's
    dtype, except that an fp32 gradient of a bf16/fp16 parameter (``Tensor.grad_dtype``) stays fp32: the
    kernels read it as it is, where rounding it to 16 bits would lose precision the reference backend keeps."""
    dtype = g.dtype if (g.dtype == torch.float32 and p.dtype in (torch.bfloat16, torch.float16)) else p.dtype
    if g.dtype == dtype and (g.numel() == 0 or g.stride() == p.stride()) and _dense(g):
        return g
    out = torch.empty_like(p, dtype=dtype)
    out.copy_(g)
    return out


def _scalar_on(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32) if (t.device != device or t.dtype != torch.float32) else t


def _lr(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """``(float lr, tensor lr or None)`` for the kernels' ``lr`` and ``lr_tensor``. A tensor lr stays a tensor
    (read by the CPU kernel, or on the device by the CUDA kernels), so that no host read of it breaks a step
    compiled by torch.compile, which keeps a tensor lr out of its guards: a schedule then does not recompile."""
    if isinstance(lr, Tensor):
        if device.type == "cpu" and lr.device.type == "cpu" and lr.is_floating_point():
            return 0.0, lr
        if device.type == "cpu" or lr.device.type == "cpu":
            return float(lr), None
        return 0.0, _scalar_on(lr, device)
    return float(lr), None


def _split_step(name: str, calls: list[tuple[torch.device, list[int], list[Any], list[Any], list[Any], tuple]],
                n: int, norm_reduce: Callable[[Tensor], Tensor]) -> None:
    """Pass A on every device, one ``norm_reduce`` over ``[||x_1||^2..||x_n||^2, ||u_1||^2..||u_n||^2]`` (input
    order), pass B on every device. ``calls``: per device ``(device, idx, head, stats, tail, hyper)``, the
    arguments of the one-call op ``head + stats + tail + hyper``."""
    parts = []
    for device, idx, head, _stats, tail, hyper in calls:
        sq = torch.empty(2 * len(idx), dtype=torch.float64, device=device)
        _op(device, f"{name}_pass_a_")(*head, sq, *tail, *hyper)
        parts.append(sq)
    if len(calls) == 1:
        partial = parts[0]
    else:  # several devices: one vector in input order, on the first parameter's device
        home = calls[0][0]
        partial = torch.empty(2 * n, dtype=torch.float64, device=home)
        for (_, idx, *_), sq in zip(calls, parts):
            pos = torch.tensor(idx + [n + i for i in idx], device=home)
            partial.index_copy_(0, pos, sq.to(home))
    full = norm_reduce(partial)
    if not isinstance(full, Tensor) or full.shape != (2 * n,):
        raise RuntimeError(f"lamb: norm_reduce must return a 1-D tensor of {2 * n} squared norms (the layout it "
                           f"was given), got {type(full).__name__} {getattr(full, 'shape', '')}")
    for device, idx, head, stats, tail, hyper in calls:
        if len(calls) == 1:
            sq = full
        else:
            sq = full[torch.tensor(idx + [n + i for i in idx], device=full.device)]
        sq = sq.to(device=device, dtype=torch.float64).contiguous()
        _op(device, f"{name}_pass_b_")(*head, *stats, sq, *tail, *hyper)


def _fused_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    master_params: list[Tensor | None],
    state_steps: list[Tensor],
    trust_ratios: list[Tensor],
    weight_norms: list[Tensor],
    update_norms: list[Tensor],
    *,
    grad_divisor: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_decay_mode: str,
    bias_correction: str,
    grad_averaging: bool,
    adapt: bool,
    min_trust_ratio: float | None,
    max_trust_ratio: float | None,
    weight_norm_bounds: tuple[float, float] | None,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    check_finite: bool = False,
    norm_reduce: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """The fused LAMB backend: the keyword arguments of ``_single_tensor_lamb`` plus the step-skipping ones.

    Args (beyond the reference backend's):
        grad_scale: GradScaler's scale (0-dim tensor); the gradients are divided by it in pass A.
        found_inf: 0-dim tensor; non-zero skips the step (nothing written, ``step`` not advanced).
        check_finite: also skip the step when a gradient in this call is inf/NaN (44 instead of 40 bytes
            a parameter; see the module docstring).
        norm_reduce: the tensors are pieces of parameters (ZeRO partitions), as for the foreach backend
            (``lamb.lamb._multi_tensor_lamb``): called once with the pieces' partial squared norms
            ``[||x_1||^2 .. ||x_k||^2, ||u_1||^2 .. ||u_k||^2]`` (input order, float64) and returns the full
            parameters' squared norms in the same layout. ``None``: the one-call step.
    """
    if not params:
        return
    lo, hi = weight_norm_bounds if weight_norm_bounds is not None else (None, None)
    hyper = (float(beta1), float(beta2), float(eps), float(weight_decay), _WD_MODES[weight_decay_mode],
             _BIAS[bias_correction], bool(grad_averaging), bool(adapt),
             None if min_trust_ratio is None else float(min_trust_ratio),
             None if max_trust_ratio is None else float(max_trust_ratio),
             None if lo is None else float(lo), None if hi is None else float(hi), bool(maximize), bool(check_finite))
    calls = []
    for (device, has_master), idx in _calls(params, master_params).items():
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        lr_f, lr_t = _lr(lr, device)
        head = [
            pick(params),
            [_grad_like(grads[i], params[i]) for i in idx],
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(master_params) if has_master else [],
            pick(state_steps),
        ]
        stats = [pick(trust_ratios), pick(weight_norms), pick(update_norms)]
        tail = [_scalar_on(grad_divisor, device), _scalar_on(grad_scale, device), _scalar_on(found_inf, device)]
        tail.append(lr_t)
        if norm_reduce is None:
            _op(device, "lamb_step_")(*head, *stats, *tail, lr_f, *hyper)
        else:
            calls.append((device, idx, head, stats, tail, (lr_f, *hyper)))
    if norm_reduce is not None:
        _split_step("lamb", calls, len(params), norm_reduce)


def _fused_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    master_params: list[Tensor | None],
    state_steps: list[Tensor],
    trust_ratios: list[Tensor],
    weight_norms: list[Tensor],
    update_norms: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    denominator: str,
    trust_clip: bool,
    adapt: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    check_finite: bool = False,
    norm_reduce: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """The fused LARS backend: the keyword arguments of ``_single_tensor_lars`` plus ``grad_scale``,
    ``found_inf`` and ``check_finite`` (as for :func:`_fused_lamb`; LARS's check costs no extra bytes), and
    ``norm_reduce`` as for the foreach backend (``lamb.lars._multi_tensor_lars``): it completes the pieces'
    ``[||w_1||^2 .. ||w_k||^2, ||g_1||^2 .. ||g_k||^2]`` (``||g + wd w||^2`` for denominator "norm")."""
    if not params:
        return
    hyper = (float(momentum), float(weight_decay), float(trust_coefficient), float(eps), bool(nesterov),
             _DENOMINATORS[denominator], bool(trust_clip), bool(adapt), bool(maximize), bool(check_finite))
    calls = []
    for (device, has_master), idx in _calls(params, master_params).items():
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        lr_f, lr_t = _lr(lr, device)
        head = [
            pick(params),
            [_grad_like(grads[i], params[i]) for i in idx],
            pick(momentum_buffers),
            pick(master_params) if has_master else [],
            pick(state_steps),
        ]
        stats = [pick(trust_ratios), pick(weight_norms), pick(update_norms)]
        tail = [_scalar_on(grad_scale, device), _scalar_on(found_inf, device)]
        tail.append(lr_t)
        if norm_reduce is None:
            _op(device, "lars_step_")(*head, *stats, *tail, lr_f, *hyper)
        else:
            calls.append((device, idx, head, stats, tail, (lr_f, *hyper)))
    if norm_reduce is not None:
        _split_step("lars", calls, len(params), norm_reduce)
