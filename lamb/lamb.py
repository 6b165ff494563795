"""LAMB: layer-wise adaptive moments (You et al., ICLR 2020), with its published variants as switches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lamb import _chunks
from lamb._base import LOW_PRECISION, LayerwiseOptimizer
from lamb._validation import check_bool, check_choice, check_number
from lamb.trust_ratio import trust_ratio

__all__ = ["Lamb", "lamb"]

_BIAS_CORRECTION = {True: "moments", "moments": "moments", "lr": "lr", False: "none", "none": "none"}
_WEIGHT_DECAY_MODES = ("ratio", "l2", "decoupled")


class Lamb(LayerwiseOptimizer):
    r"""LAMB, Algorithm 2 of You et al. (2020) by default, as a drop-in ``torch.optim`` optimizer.

    For each parameter tensor :math:`x` with gradient :math:`g` at step :math:`t`
    (:math:`\lambda` = ``weight_decay``, :math:`\eta` = ``lr``):

    .. math::
        \begin{aligned}
        g &\leftarrow g / \max(1, \|G\| / \text{max\_grad\_norm})
            && \text{NVLAMB pre-normalisation, } G \text{ = every gradient of every group (off by default)} \\
        g &\leftarrow g + \lambda x && \text{weight\_decay\_mode="l2" only} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g && \text{grad\_averaging=False: } \beta_1 m + g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        r &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}
            && \text{bias\_correction=True (paper)} \\
        r &= \frac{m}{\sqrt{v} + \epsilon},\ \eta_t = \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
            && \text{bias\_correction="lr" (DeepSpeed); False: } \eta_t = \eta \\
        u &= r + \lambda x && \text{weight\_decay\_mode="ratio" (paper); else } u = r \\
        \rho &= \operatorname{clamp}\bigl(\phi(\|x\|) / \|u\|,\ \rho_{min}, \rho_{max}\bigr),
            \quad \rho = 1 \text{ if } \|x\| = 0 \text{ or } \|u\| = 0 \\
        x &\leftarrow x - \eta_t \rho u - \eta \lambda x_{old} && \text{last term: "decoupled" only}
        \end{aligned}

    :math:`\phi` is the identity unless ``weight_norm_bounds=(lo, hi)`` clamps :math:`\|x\|`. The ratio is 1
    in a group with ``layer_adaptation=False``, and with ``adapt_decayed_only=True`` in a group whose
    weight decay is 0.

    Args:
        params: parameters or param groups (as for any ``torch.optim`` optimizer); see
            :func:`lamb.param_groups` for the conventional decay/adaptation exclusions.
        lr: learning rate :math:`\eta` (float or 0-dim tensor).
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`, added to :math:`\sqrt{\hat v}` (1e-6 as in the paper's BERT runs and NVIDIA's).
        weight_decay: :math:`\lambda`.
        bias_correction: ``True`` or ``"moments"`` (the paper), ``"lr"`` (folded into the step size, as
            DeepSpeed's FusedLamb and apex's Adam-style kernels do), ``False`` or ``"none"`` (the LAMB
            authors' ResNet code and DeepSpeed's BERT recipe).
        weight_decay_mode: ``"ratio"`` (Algorithm 2: decay inside the trust ratio), ``"l2"`` (added to the
            gradient before the moments, classic L2 as in the paper's Algorithm 2 footnote and
            torch-optimizer's ``Lamb(adam=...)`` lineage), ``"decoupled"`` (AdamW-style, outside the ratio:
            ``x -= lr * weight_decay * x``).
        grad_averaging: ``False`` accumulates :math:`m \leftarrow \beta_1 m + g` (apex FusedLAMB's option).
        max_grad_norm: global gradient pre-normalisation of NVIDIA's NVLAMB (1.0 in their BERT recipe);
            ``None`` (default) disables it.
        min_trust_ratio, max_trust_ratio: clamp of computed ratios (DeepSpeed's ``min_coeff``/``max_coeff``,
            0.01 and 0.3 in its BERT recipe). A zero-norm ratio stays 1.
        trust_clip: LAMBC (Fong et al. 2020; timm's ``trust_clip``): ratio at most 1. Same as
            ``max_trust_ratio=1``.
        weight_norm_bounds: ``(lo, hi)`` bounds of the paper's :math:`\phi(\|x\|)`; ``None``: identity.
        adapt_decayed_only: apply the ratio only in groups with weight decay (apex FusedLAMB with
            ``use_nvlamb=False``, NVIDIA's default); ``False`` (default, the paper and NVLAMB): everywhere.
        layer_adaptation: per-group switch; ``False`` makes the ratio 1 (set by :func:`lamb.param_groups`).
        master_weights: keep an fp32 master copy (``state["master_param"]``) and fp32 moments for bf16/fp16
            parameters; the low-precision parameter is refreshed from the master after every step.
        maximize: maximise the objective.
        foreach: ``True`` multi-tensor backend, ``False`` the single-tensor reference, ``None`` choose.
        fused: ``True`` the fused kernel (loaded, or built, when the group is added; a step raises where none
            can run), ``None`` choose (the fused kernel where it is built, else foreach; foreach under
            torch.compile).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``master_param`` (with master weights) and
    the last step's ``trust_ratio``, ``weight_norm`` (:math:`\|x\|`) and ``update_norm`` (:math:`\|u\|`).

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lamb(lamb.param_groups(model, weight_decay=0.01, preset="bert"), lr=2e-3)

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020.
        NVIDIA DeepLearningExamples BERT (NVLAMB); DeepSpeed FusedLamb; apex FusedLAMB.
    """

    _moment_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool | str = True,
        weight_decay_mode: str = "ratio",
        grad_averaging: bool = True,
        max_grad_norm: float | None = None,
        min_trust_ratio: float | None = None,
        max_trust_ratio: float | None = None,
        trust_clip: bool = False,
        weight_norm_bounds: tuple[float, float] | None = None,
        adapt_decayed_only: bool = False,
        layer_adaptation: bool = True,
        master_weights: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            weight_decay_mode=weight_decay_mode, grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
            min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio, trust_clip=trust_clip,
            weight_norm_bounds=weight_norm_bounds, adapt_decayed_only=adapt_decayed_only,
            layer_adaptation=layer_adaptation, master_weights=master_weights, maximize=maximize,
            foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        n = "Lamb"
        check_number(n, "lr", group["lr"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{n}: invalid betas={betas!r}; allowed: a pair (beta1, beta2) in [0, 1)")
        check_number(n, "beta1 (betas[0])", betas[0], low=0.0, high=1.0, high_open=True)
        check_number(n, "beta2 (betas[1])", betas[1], low=0.0, high=1.0, high_open=True)
        check_number(n, "eps", group["eps"], low=0.0)
        check_number(n, "weight_decay", group["weight_decay"], low=0.0)
        check_choice(n, "bias_correction", group["bias_correction"], _BIAS_CORRECTION)
        check_choice(n, "weight_decay_mode", group["weight_decay_mode"], _WEIGHT_DECAY_MODES)
        check_number(n, "max_grad_norm", group["max_grad_norm"], low=0.0, low_open=True, allow_none=True)
        check_number(n, "min_trust_ratio", group["min_trust_ratio"], low=0.0, allow_none=True)
        check_number(n, "max_trust_ratio", group["max_trust_ratio"], low=0.0, low_open=True, allow_none=True)
        lo, hi = group["min_trust_ratio"], _max_ratio(group)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(
                f"{n}: invalid min_trust_ratio={lo!r} with max_trust_ratio={hi!r}"
                + (" (trust_clip=True caps it at 1)" if group["trust_clip"] else "")
                + "; allowed: min_trust_ratio <= max_trust_ratio"
            )
        bounds = group["weight_norm_bounds"]
        if bounds is not None:
            ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2
            if ok:
                check_number(n, "weight_norm_bounds[0]", bounds[0], low=0.0)
                check_number(n, "weight_norm_bounds[1]", bounds[1], low=0.0, low_open=True)
                ok = bounds[0] <= bounds[1]
            if not ok:
                raise ValueError(
                    f"{n}: invalid weight_norm_bounds={bounds!r}; allowed: None or (lo, hi) with 0 <= lo <= hi"
                )
        for key in ("grad_averaging", "trust_clip", "adapt_decayed_only", "layer_adaptation",
                    "master_weights", "maximize"):
            check_bool(n, key, group[key])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        collected = [self._collect_for_step(group) for group in self.param_groups]
        grad_scale, found_inf = self._amp_state()
        global_norm = None
        if any(g["max_grad_norm"] is not None for g in self.param_groups):
            all_grads = [grad for _, grads, _ in collected for grad in grads]
            global_norm = (_global_grad_norm(all_grads) if self._partition_layout is None
                           else self._partition_layout.grad_norm(all_grads))  # ZeRO: across ranks and groups
            if grad_scale is not None:
                global_norm = global_norm / grad_scale  # the norm of the unscaled gradients

        for group, (params, grads, states) in zip(self.param_groups, collected):
            if not params:
                continue
            grad_divisor = None
            if group["max_grad_norm"] is not None:
                # max(1, ||G|| / max_norm): divides only when the global norm is above the threshold.
                grad_divisor = torch.clamp(global_norm / group["max_grad_norm"], min=1.0)
            backend = self._backend_kwargs(group, params, states)
            amp = self._amp_kwargs(backend["backend"], grad_scale, found_inf)
            if not amp and self._amp_fallback(grads, grad_scale, found_inf):
                continue
            beta1, beta2 = group["betas"]
            lamb(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s.get("master_param") for s in states],
                [s["step"] for s in states],
                [s["trust_ratio"] for s in states],
                [s["weight_norm"] for s in states],
                [s["update_norm"] for s in states],
                **backend,
                **amp,
                grad_divisor=grad_divisor,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                weight_decay_mode=group["weight_decay_mode"],
                bias_correction=_BIAS_CORRECTION[group["bias_correction"]],
                grad_averaging=group["grad_averaging"],
                adapt=_adapts(group),
                min_trust_ratio=group["min_trust_ratio"],
                max_trust_ratio=_max_ratio(group),
                weight_norm_bounds=group["weight_norm_bounds"],
                maximize=group["maximize"],
            )
            self._finish_step(group, states)
        return loss


def _max_ratio(group: dict[str, Any]) -> float | None:
    """``max_trust_ratio`` with LAMBC's ``trust_clip`` (ratio <= 1) folded in."""
    hi = group["max_trust_ratio"]
    if group["trust_clip"]:
        hi = 1.0 if hi is None else min(hi, 1.0)
    return hi


def _adapts(group: dict[str, Any]) -> bool:
    """Whether the trust ratio applies in this group (a config decision, never a tensor value)."""
    if not group["layer_adaptation"]:
        return False
    return not (group["adapt_decayed_only"] and group["weight_decay"] == 0)


def _global_grad_norm(grads: list[Tensor]) -> Tensor:
    """``||G||``: the L2 norm of all gradients together, in fp32 (fp64 for fp64 gradients), no host sync."""
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    norms = [torch.linalg.vector_norm(g, dtype=dtype).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def lamb(
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
    backend: str = "single",
    **kwargs: Any,
) -> None:
    """Functional LAMB: one step over lists of tensors with the math of :class:`Lamb`.

    ``backend`` is ``"single"`` (the reference), ``"foreach"`` or ``"fused"``; the keyword arguments are
    those of the backends (see ``_single_tensor_lamb``).
    """
    if backend == "fused":
        from lamb._fused import _fused_lamb as fn
    elif backend == "foreach":
        fn = _multi_tensor_lamb
    elif backend == "single":
        fn = _single_tensor_lamb
    else:
        raise ValueError(f"lamb: invalid backend={backend!r}; allowed: 'single', 'foreach', 'fused'")
    fn(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, trust_ratios, weight_norms,
       update_norms, **kwargs)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Math in fp32 for bf16/fp16 storage, else in the storage dtype (fp32 or fp64)."""
    return torch.float32 if t.dtype in LOW_PRECISION else t.dtype


def _single_tensor_lamb(
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
) -> None:
    """The reference backend: one tensor at a time, line for line the math in :class:`Lamb`'s docstring."""
    for i, param in enumerate(params):
        x_store = master_params[i] if master_params[i] is not None else param
        dt = _compute_dtype(x_store)
        step_t = state_steps[i]
        step_t += 1
        t = step_t.to(dt)

        x = x_store.to(dt)
        g = grads[i].to(dt)
        if maximize:
            g = -g
        if grad_divisor is not None:
            g = g / grad_divisor.to(dt)
        if weight_decay_mode == "l2" and weight_decay != 0:
            g = g + weight_decay * x

        m = beta1 * exp_avgs[i].to(dt) + ((1 - beta1) if grad_averaging else 1.0) * g
        v = beta2 * exp_avg_sqs[i].to(dt) + (1 - beta2) * g * g

        step_size = lr
        if bias_correction == "moments":
            r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        else:
            r = m / (v.sqrt() + eps)
            if bias_correction == "lr":
                step_size = lr * (1 - beta2**t).sqrt() / (1 - beta1**t)

        u = r + weight_decay * x if weight_decay_mode == "ratio" and weight_decay != 0 else r

        w_norm = torch.linalg.vector_norm(x)
        u_norm = torch.linalg.vector_norm(u)
        if adapt:
            phi = w_norm if weight_norm_bounds is None else w_norm.clamp(*weight_norm_bounds)
            rho = trust_ratio(phi, u_norm, zero_check=(w_norm, u_norm),
                              min_ratio=min_trust_ratio, max_ratio=max_trust_ratio)
        else:
            rho = torch.ones_like(w_norm)

        x_new = x - step_size * rho * u
        if weight_decay_mode == "decoupled" and weight_decay != 0:
            x_new = x_new - lr * weight_decay * x

        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        x_store.copy_(x_new)
        if master_params[i] is not None:
            param.copy_(x_store)
        trust_ratios[i].copy_(rho)
        weight_norms[i].copy_(w_norm)
        update_norms[i].copy_(u_norm)


def _multi_tensor_lamb(
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
    norm_reduce: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """The foreach backend: the same math with ``torch._foreach_*`` ops over chunks of tensors.

    The bias corrections are folded into per-tensor scalars (``_Scalars``): the ops build
    ``u' = m / (sqrt(v) + c_eps) + c_wd x`` with ``u = c_norm u'``, and the update is one
    ``x += coef u'``. On CPU (eager) the work is cache-blocked (``lamb._chunks.by_block``): small tensors
    packed into blocks of about ``BLOCK`` elements, each block's ~13 ops (moments, direction, norms,
    update) running on data in cache with three reused scratch buffers; a larger tensor is cut into flat
    pieces whose directions go to one buffer as large as the largest such tensor, applied once the
    piece norms are summed (in float64). DRAM traffic: read x, g, m, v, write m, v, u'; read x, u', write x
    (small tensors: read x, g, m, v, write m, v, x). Elsewhere (GPU, torch.compile) the blocks are
    whole-tensor chunks (``lamb._chunks.by_numel``) with new buffers per chunk.
    Low-precision tensors without master weights take the reference path, since their math is fp32.

    ``norm_reduce`` (ZeRO partitions, see ``lamb.deepspeed``): the tensors are pieces of parameters;
    it takes the 1-D tensor ``[||x_1||^2 .. ||x_k||^2, ||u_1||^2 .. ||u_k||^2]`` of partial squared norms
    (in the order of the input lists) and returns the full squared norms of the parameters they belong to,
    in the same layout.
    """
    xs = [m if m is not None else p for p, m in zip(params, master_params)]
    low = [i for i, x in enumerate(xs) if x.dtype in LOW_PRECISION]
    if low:
        if norm_reduce is not None:
            raise ValueError("lamb: partitioned (norm_reduce) steps need fp32 tensors or master weights")
        pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
        kw = dict(grad_divisor=grad_divisor, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                  bias_correction=bias_correction, grad_averaging=grad_averaging, adapt=adapt,
                  min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio,
                  weight_norm_bounds=weight_norm_bounds, maximize=maximize)
        _single_tensor_lamb(*(pick(s, low) for s in (params, grads, exp_avgs, exp_avg_sqs, master_params,
                                                     state_steps, trust_ratios, weight_norms, update_norms)),
                            **kw)
        rest = [i for i in range(len(xs)) if i not in set(low)]
        if not rest:
            return
        params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, trust_ratios, weight_norms, \
            update_norms, xs = (pick(s, rest) for s in (params, grads, exp_avgs, exp_avg_sqs, master_params,
                                                      state_steps, trust_ratios, weight_norms, update_norms, xs))

    if len({x.device for x in xs}) > 1 and norm_reduce is None:
        # One device at a time: the per-tensor scalars below live on one device.
        for dev in dict.fromkeys(x.device for x in xs):
            sub = [i for i, x in enumerate(xs) if x.device == dev]
            _multi_tensor_lamb(*([s[i] for i in sub] for s in (params, grads, exp_avgs, exp_avg_sqs, master_params,
                                                              state_steps, trust_ratios, weight_norms, update_norms)),
                               grad_divisor=grad_divisor, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                               bias_correction=bias_correction, grad_averaging=grad_averaging, adapt=adapt,
                               min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio,
                               weight_norm_bounds=weight_norm_bounds, maximize=maximize)
        return

    k = len(xs)
    # Cache blocking on CPU (eager): big tensors are cut into flat pieces, small ones packed together, so a
    # block's successive ops stay in cache. Elsewhere (GPU, torch.compile, which fuses the ops itself) the
    # blocks are the whole-tensor chunks of ``_chunks.by_numel``.
    split = not torch.compiler.is_compiling() and all(x.device.type == "cpu" for x in xs)
    if split:
        contiguous = [x.is_contiguous() and grads[i].is_contiguous() and exp_avgs[i].is_contiguous()
                      and exp_avg_sqs[i].is_contiguous() and (master_params[i] is None or params[i].is_contiguous())
                      for i, x in enumerate(xs)]
        blocks = _chunks.by_block(xs, contiguous)
        # Three scratch buffers per dtype (gradient copy, denominator, direction) reused by every block: fresh
        # buffers per op would be new pages each time (page faults) and push the block's data out of cache.
        scratch = {}
        for blk in blocks:
            dt = xs[blk[0][0]].dtype
            scratch[dt] = max(scratch.get(dt, 0), sum(b - a for _, a, b in blk))
        scratch = {dt: torch.empty((3, n), dtype=dt) for dt, n in scratch.items()}
    else:
        scratch = None
        blocks = [[(i, 0, xs[i].numel()) for i in idx] for idx in _chunks.by_numel(xs)]

    # Per-tensor scalars (1-D over all tensors, in their compute dtype): the bias corrections folded into
    # the direction u' = m / (sqrt(v) + c_eps) + c_wd x = u / c_norm, so that ||u|| = c_norm ||u'|| and
    # x <- x - step_size rho c_norm u'.
    torch._foreach_add_(state_steps, 1)
    sc = _Scalars(xs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                  weight_decay_mode=weight_decay_mode, bias_correction=bias_correction)
    ratio_kw = dict(adapt=adapt, min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio,
                    weight_norm_bounds=weight_norm_bounds)
    mom_kw = dict(grad_divisor=grad_divisor, maximize=maximize, grad_averaging=grad_averaging, beta1=beta1,
                  beta2=beta2, weight_decay=weight_decay, weight_decay_mode=weight_decay_mode)
    rho_all: list[Tensor] = [None] * k  # type: ignore[list-item]
    w_all: list[Tensor] = [None] * k  # type: ignore[list-item]
    u_all: list[Tensor] = [None] * k  # type: ignore[list-item]

    # Pass A: moments, direction and norms per block. A block of whole tensors (not partitioned) finishes
    # at once while its direction is in cache; pieces of a larger tensor (and every ZeRO piece) keep partial
    # squared norms for pass B, which recomputes the direction from the new moments and applies it.
    # A tensor cut into pieces (CPU, not partitioned) writes its direction into a buffer as large as the
    # largest such tensor (the embedding), applied once its norms are complete: no recomputation.
    whole = lambda blk: all(a == 0 and b == xs[i].numel() for i, a, b in blk)
    ubuf = {}
    if scratch is not None and norm_reduce is None:
        for blk in blocks:
            if not whole(blk):
                i = blk[0][0]
                ubuf[xs[i].dtype] = max(ubuf.get(xs[i].dtype, 0), xs[i].numel())
        ubuf = {dt: torch.empty(n, dtype=dt) for dt, n in ubuf.items()}
    deferred: list[list[tuple[int, int, int]]] = []
    part_idx: list[int] = []
    part_w: list[Tensor] = []
    part_u: list[Tensor] = []
    for blk in blocks:
        x, m, v = (_pieces(s, blk) for s in (xs, exp_avgs, exp_avg_sqs))
        bufs = _scratch_views(scratch, x)
        piece = bool(ubuf) and not whole(blk)  # one piece of a tensor cut by _chunks.by_block
        if piece:
            i, a, b = blk[0]
            if a == 0:
                u_full, pw, pu = ubuf[xs[i].dtype][:xs[i].numel()], [], []
            bufs[2] = [u_full[a:b]]
        _foreach_moments(x, _pieces(grads, blk), m, v, bufs, **mom_kw)
        u = _foreach_direction(x, m, v, sc, blk, bufs)
        wn, un = torch._foreach_norm(x), torch._foreach_norm(u)
        ids = [i for i, _, _ in blk]
        if piece:
            pw += wn
            pu += un
            if b == xs[i].numel():  # the last piece: complete the norms (in float64), apply in one op
                sel = torch.tensor([i], device=sc.device)
                w_norm = torch.linalg.vector_norm(torch.stack(pw).double()).to(sc.dtype).reshape(1)
                u_norm = torch.linalg.vector_norm(torch.stack(pu).double()).to(sc.dtype).reshape(1)
                if sc.c_norm is not None:
                    u_norm = u_norm * sc.c_norm[sel]
                rho = _ratios(w_norm, u_norm, **ratio_kw)
                _foreach_apply([xs[i]], [u_full.view(xs[i].shape)], rho, sc, sel, [i],
                               _master_pieces(params, master_params, [(i, 0, xs[i].numel())]))
                rho_all[i], w_all[i], u_all[i] = rho[0], w_norm[0], u_norm[0]
        elif norm_reduce is None and whole(blk):
            sel = torch.tensor(ids, device=sc.device)
            w_norm, u_norm = torch.stack(wn).to(sc.dtype), torch.stack(un).to(sc.dtype)
            if sc.c_norm is not None:
                u_norm = u_norm * sc.c_norm[sel]
            rho = _ratios(w_norm, u_norm, **ratio_kw)
            _foreach_apply(x, u, rho, sc, sel, ids, _master_pieces(params, master_params, blk))
            for i, r, w_, u_ in zip(ids, rho.unbind(), w_norm.unbind(), u_norm.unbind()):
                rho_all[i], w_all[i], u_all[i] = r, w_, u_
        else:
            deferred.append(blk)
            part_idx += ids
            part_w += wn
            part_u += un
        del u

    if deferred:
        # Complete the partial norms: sum the pieces of each tensor locally (in float64 on CPU: no
        # under/overflow of the squares), then across ranks with norm_reduce.
        rdt = sc.dtype
        acc = torch.float64 if split else rdt
        sel = torch.tensor(part_idx, device=sc.device)
        tids = sorted(set(part_idx))
        tsel = torch.tensor(tids, device=sc.device)
        sq_w = torch.zeros(k, dtype=acc, device=sc.device).index_add_(0, sel, torch.stack(part_w).to(acc) ** 2)
        sq_u = torch.zeros(k, dtype=acc, device=sc.device).index_add_(0, sel, torch.stack(part_u).to(acc) ** 2)
        if sc.c_norm is not None:
            sq_u = sq_u * sc.c_norm.to(acc) ** 2
        if norm_reduce is not None:
            full = norm_reduce(torch.cat([sq_w.to(rdt), sq_u.to(rdt)])).to(acc)
            sq_w, sq_u = full.chunk(2)
        w_norm, u_norm = sq_w[tsel].sqrt().to(rdt), sq_u[tsel].sqrt().to(rdt)
        rho = _ratios(w_norm, u_norm, **ratio_kw)
        rho_k = torch.ones(k, dtype=rdt, device=sc.device).index_copy_(0, tsel, rho)
        for i, r, w_, u_ in zip(tids, rho.unbind(), w_norm.unbind(), u_norm.unbind()):
            rho_all[i], w_all[i], u_all[i] = r, w_, u_
        for blk in deferred:
            x, m, v = (_pieces(s, blk) for s in (xs, exp_avgs, exp_avg_sqs))
            ids = [i for i, _, _ in blk]
            u = _foreach_direction(x, m, v, sc, blk, _scratch_views(scratch, x))
            sel = torch.tensor(ids, device=sc.device)
            _foreach_apply(x, u, rho_k[sel], sc, sel, ids, _master_pieces(params, master_params, blk))
            del u

    _finish(trust_ratios, weight_norms, update_norms, rho_all, w_all, u_all)


def _scratch_views(scratch: dict | None, x: list[Tensor]) -> list[list[Tensor]] | None:
    """Three lists of views of the scratch buffers shaped as the block's pieces (None: allocate instead)."""
    if scratch is None:
        return None
    buf = scratch[x[0].dtype]
    out: list[list[Tensor]] = [[], [], []]
    off = 0
    for xi in x:
        n = xi.numel()
        for j in range(3):
            out[j].append(buf[j, off:off + n].view(xi.shape))
        off += n
    return out


def _pieces(tensors: list[Tensor], blk: list[tuple[int, int, int]]) -> list[Tensor]:
    """The block's pieces of ``tensors``: the tensor itself where whole, else a flat view."""
    return [tensors[i] if a == 0 and b == tensors[i].numel() else tensors[i].view(-1)[a:b] for i, a, b in blk]


def _master_pieces(params, master_params, blk) -> tuple[list[int], list[Tensor]] | None:
    """Positions in the block of the pieces with master weights, and the matching low-precision pieces."""
    keep = [j for j, (i, _, _) in enumerate(blk) if master_params[i] is not None]
    return (keep, _pieces(params, [blk[j] for j in keep])) if keep else None


class _Scalars:
    """Per-tensor scalars of one step: u' = m / (sqrt(v) + c_eps) + c_wd x, ||u|| = c_norm ||u'||,
    x <- x (1 - decay) + coef u' with coef = -step_size * rho * c_norm.

    ``"moments"``: c_eps = eps sqrt(bc2), c_wd = wd bc1 / sqrt(bc2), c_norm = sqrt(bc2) / bc1 (per tensor:
    the steps may differ); ``"lr"``: step_size = lr sqrt(bc2) / bc1; ``"none"``: plain. A constant is kept
    as a Python number (or a 0-dim tensor for a tensor lr) so that the foreach ops take their scalar forms.
    """

    def __init__(self, xs, state_steps, *, lr, beta1, beta2, eps, weight_decay, weight_decay_mode, bias_correction):
        self.dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
        self.device = xs[0].device
        dt, dev = self.dtype, self.device
        decayed = weight_decay != 0
        self.c_eps: float | list[Tensor] = eps
        self.c_wd: float | list[Tensor] | None = weight_decay if weight_decay_mode == "ratio" and decayed else None
        self.c_norm: Tensor | None = None
        self.step_size: Any = lr if not isinstance(lr, Tensor) else lr.to(device=dev, dtype=dt)
        self.decay = None
        if weight_decay_mode == "decoupled" and decayed:
            decay = 1 - lr * weight_decay
            self.decay = decay.to(device=dev, dtype=dt) if isinstance(decay, Tensor) else decay
        if bias_correction in ("moments", "lr"):
            t = torch.stack([s.to(device=dev, dtype=dt) for s in state_steps])
            bc1 = 1 - torch.pow(beta1, t)
            sb2 = (1 - torch.pow(beta2, t)).sqrt()
            if bias_correction == "moments":
                self.c_norm = sb2 / bc1
                self.c_eps = list((eps * sb2).unbind())
                if self.c_wd is not None:
                    self.c_wd = list((weight_decay * bc1 / sb2).unbind())
            else:
                self.step_size = self.step_size * sb2 / bc1
        # coef(rho) = -step_size * rho * c_norm, per tensor
        self._coef_base = -self.step_size if self.c_norm is None else -self.step_size * self.c_norm

    def coef(self, rho: Tensor, sel: Tensor) -> Tensor:
        base = self._coef_base
        return rho * (base[sel] if isinstance(base, Tensor) and base.dim() == 1 else base)


def _per_piece(values, ids):
    """A per-tensor scalar for a block: a Python number as is, else the list of 0-dim tensors per piece."""
    return values if not isinstance(values, list) else [values[i] for i in ids]


def _foreach_moments(x, g, m, v, bufs, *, grad_divisor, maximize, grad_averaging, beta1, beta2, weight_decay,
                     weight_decay_mode) -> None:
    """g <- g / divisor (+ wd x for "l2"); m <- b1 m + (1-b1) g (or b1 m + g); v <- b2 v + (1-b2) g^2."""
    l2 = weight_decay_mode == "l2" and weight_decay != 0
    if bufs is not None and (grad_divisor is not None or maximize or l2):
        # A private gradient copy only where it must change: the caller's .grad stays untouched.
        divisor = None if grad_divisor is None else (-grad_divisor if maximize else grad_divisor)
        if _one_pass(g, bufs[0]) and (divisor is not None or maximize):
            # One piece: g / divisor (or -g) straight into the copy, the same op as copy-then-divide in place.
            if divisor is not None:
                torch.div(g[0], divisor, out=bufs[0][0])
            else:
                torch.neg(g[0], out=bufs[0][0])
            g = bufs[0]
        else:
            torch._foreach_copy_(bufs[0], g)
            g = bufs[0]
            if divisor is not None:
                torch._foreach_div_(g, divisor)
            elif maximize:
                torch._foreach_neg_(g)
        if l2:
            torch._foreach_add_(g, x, alpha=weight_decay)
    else:
        g = [gi if gi.dtype == xi.dtype else gi.to(xi.dtype) for gi, xi in zip(g, x)]
        if grad_divisor is not None:
            g = torch._foreach_div(g, -grad_divisor if maximize else grad_divisor)
        elif maximize:
            g = torch._foreach_neg(g)
        if l2:
            g = torch._foreach_add(g, x, alpha=weight_decay)
    if grad_averaging:
        torch._foreach_lerp_(m, g, 1 - beta1)
    else:
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)


def _foreach_direction(x, m, v, sc: _Scalars, blk, bufs) -> list[Tensor]:
    """u' = m / (sqrt(v) + c_eps) [+ c_wd x for "ratio"]: in the scratch views ``bufs`` or in new buffers."""
    ids = [i for i, _, _ in blk]
    one = bufs is not None and _one_pass(v, bufs[1])
    if bufs is None:
        d = torch._foreach_sqrt(v)
    else:
        d, u = bufs[1], bufs[2]
        if one:  # one piece: each "copy into the scratch, then op in place" as one out= op (same rounding)
            torch.sqrt(v[0], out=d[0])
        else:
            torch._foreach_copy_(d, v)
            torch._foreach_sqrt_(d)
    torch._foreach_add_(d, _per_piece(sc.c_eps, ids))
    if sc.c_wd is None:
        if bufs is None:
            return torch._foreach_div(m, d)
        if one:
            torch.div(m[0], d[0], out=u[0])
        else:
            torch._foreach_copy_(u, m)
            torch._foreach_div_(u, d)
        return u
    c_wd = _per_piece(sc.c_wd, ids)
    if bufs is None:
        u = torch._foreach_mul(x, c_wd)
    elif one:
        torch.mul(x[0], c_wd if not isinstance(c_wd, list) else c_wd[0], out=u[0])
    else:
        torch._foreach_copy_(u, x)
        torch._foreach_mul_(u, c_wd)
    torch._foreach_addcdiv_(u, m, d)
    return u


def _one_pass(src: list[Tensor], dst: list[Tensor]) -> bool:
    """Whether ``dst <- op(src)`` can run as one out= op instead of ``copy_`` then the op in place: a block of
    one piece (the large tensors, cut by ``_chunks.by_block``: nearly all the bytes) whose source already has
    the scratch's dtype, so the op computes in the same dtype either way. Packed blocks of many small tensors
    keep the foreach pair (one call each instead of one Python call per tensor)."""
    return len(src) == 1 and src[0].dtype == dst[0].dtype


def _ratios(w_norm: Tensor, u_norm: Tensor, *, adapt: bool, min_trust_ratio: float | None,
            max_trust_ratio: float | None, weight_norm_bounds: tuple[float, float] | None) -> Tensor:
    """rho per tensor from stacked norms: clamp(phi(||x||) / ||u||), 1 at a zero norm, 1 without adaptation."""
    if not adapt:
        return torch.ones_like(w_norm)
    phi = w_norm if weight_norm_bounds is None else w_norm.clamp(*weight_norm_bounds)
    return trust_ratio(phi, u_norm, zero_check=(w_norm, u_norm), min_ratio=min_trust_ratio, max_ratio=max_trust_ratio)


def _foreach_apply(x, u, rho, sc: _Scalars, sel: Tensor, ids: list[int], param_pieces) -> None:
    """x <- x (1 - lr wd) [decoupled] - step_size rho c_norm u' in one op; low-precision params refreshed."""
    coef = sc.coef(rho, sel)
    if sc.decay is not None:
        torch._foreach_mul_(x, sc.decay)
    torch._foreach_addcmul_(x, u, list(coef.to(x[0].dtype).unbind()))
    if param_pieces is not None:
        keep, dst = param_pieces
        torch._foreach_copy_(dst, [x[j] for j in keep])


def _finish(trust_ratios, weight_norms, update_norms, rho, w_norm, u_norm) -> None:
    """Record the trust statistics (fp32 state), one foreach copy each."""
    torch._foreach_copy_(trust_ratios, list(torch.stack(rho).float().unbind()))
    torch._foreach_copy_(weight_norms, list(torch.stack(w_norm).float().unbind()))
    torch._foreach_copy_(update_norms, list(torch.stack(u_norm).float().unbind()))
