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
        fused: ``True`` the fused kernel (raises where none can run), ``None`` choose.

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
            backend = self._backend_kwargs(group, params)
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

    Working through the tensors in chunks (``lamb._chunks``) bounds the temporaries: the update ``u`` is
    built in one buffer per chunk (plus a gradient copy where it must change), never for all parameters.
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

    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              weight_decay_mode=weight_decay_mode, bias_correction=bias_correction)
    ratio_kw = dict(adapt=adapt, min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio,
                    weight_norm_bounds=weight_norm_bounds)
    chunks = _chunks.by_numel(xs)
    if norm_reduce is None:
        # One pass per chunk: moments, direction, norms, ratio, update; the direction buffer is then freed.
        for idx in chunks:
            _foreach_moments(idx, xs, grads, exp_avgs, exp_avg_sqs, state_steps, grad_divisor=grad_divisor,
                             maximize=maximize, grad_averaging=grad_averaging, **kw)
            u = _foreach_direction(idx, xs, exp_avgs, exp_avg_sqs, state_steps, **kw)
            w_norm, u_norm = _foreach_norms([xs[i] for i in idx], u)
            rho = _ratios(w_norm, u_norm, **ratio_kw)
            _foreach_apply(idx, xs, u, rho, state_steps, **kw)
            _finish(idx, params, master_params, xs, trust_ratios, weight_norms, update_norms, rho, w_norm, u_norm)
        return

    # Partitioned tensors (ZeRO): each tensor here is a piece of a parameter, and its norms are partial.
    # Pass A updates the moments and collects partial squared norms; one norm_reduce call (an all-reduce)
    # completes them; pass B recomputes the direction from the new moments and applies it.
    k = len(xs)
    partial_w: list[Tensor] = [None] * k  # type: ignore[list-item]
    partial_u: list[Tensor] = [None] * k  # type: ignore[list-item]
    for idx in chunks:
        _foreach_moments(idx, xs, grads, exp_avgs, exp_avg_sqs, state_steps, grad_divisor=grad_divisor,
                         maximize=maximize, grad_averaging=grad_averaging, **kw)
        u = _foreach_direction(idx, xs, exp_avgs, exp_avg_sqs, state_steps, **kw)
        for i, w_sq, u_sq in zip(idx, _foreach_sq_norms([xs[i] for i in idx]), _foreach_sq_norms(u)):
            partial_w[i], partial_u[i] = w_sq, u_sq
        del u
    full = norm_reduce(torch.cat([torch.stack(partial_w), torch.stack(partial_u)]))
    w_all, u_all = full.sqrt().chunk(2)
    for idx in chunks:
        sel = torch.tensor(idx, device=w_all.device)
        w_norm, u_norm = w_all[sel].to(xs[idx[0]].dtype), u_all[sel].to(xs[idx[0]].dtype)
        rho = _ratios(w_norm, u_norm, **ratio_kw)
        u = _foreach_direction(idx, xs, exp_avgs, exp_avg_sqs, state_steps, **kw)
        _foreach_apply(idx, xs, u, rho, state_steps, **kw)
        _finish(idx, params, master_params, xs, trust_ratios, weight_norms, update_norms, rho, w_norm, u_norm)


def _foreach_moments(idx, xs, grads, exp_avgs, exp_avg_sqs, state_steps, *, grad_divisor, maximize, grad_averaging,
                     lr, beta1, beta2, eps, weight_decay, weight_decay_mode, bias_correction) -> None:
    """step += 1; g <- g / divisor (+ wd x for "l2"); m <- b1 m + (1-b1) g (or b1 m + g); v <- b2 v + (1-b2) g^2."""
    x = [xs[i] for i in idx]
    m = [exp_avgs[i] for i in idx]
    v = [exp_avg_sqs[i] for i in idx]
    g = [grads[i] if grads[i].dtype == x[k].dtype else grads[i].to(x[k].dtype) for k, i in enumerate(idx)]
    torch._foreach_add_([state_steps[i] for i in idx], 1)
    # A private gradient copy only where it must change: the caller's .grad stays untouched.
    if maximize:
        g = torch._foreach_neg(g)
    if grad_divisor is not None:
        g = torch._foreach_div(g, grad_divisor)
    if weight_decay_mode == "l2" and weight_decay != 0:
        g = torch._foreach_add(g, x, alpha=weight_decay)
    if grad_averaging:
        torch._foreach_lerp_(m, g, 1 - beta1)
    else:
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)


def _foreach_direction(idx, xs, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
                       weight_decay_mode, bias_correction) -> list[Tensor]:
    """u = (m / bc1) / (sqrt(v / bc2) + eps) [+ wd x for "ratio"], built in place in one new buffer list."""
    x = [xs[i] for i in idx]
    m = [exp_avgs[i] for i in idx]
    v = [exp_avg_sqs[i] for i in idx]
    dt = x[0].dtype
    if bias_correction == "moments":
        t = [state_steps[i].to(dt) for i in idx]
        bc1 = [1 - torch.pow(beta1, ti) for ti in t]
        bc2 = [1 - torch.pow(beta2, ti) for ti in t]
        u = torch._foreach_div(v, bc2)
        torch._foreach_sqrt_(u)
    else:
        u = torch._foreach_sqrt(v)
    torch._foreach_add_(u, eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, m)
    if bias_correction == "moments":
        torch._foreach_div_(u, bc1)
    if weight_decay_mode == "ratio" and weight_decay != 0:
        torch._foreach_add_(u, x, alpha=weight_decay)
    return u


def _foreach_sq_norms(tensors: list[Tensor]) -> list[Tensor]:
    """Squared L2 norms (0-dim), for partial norms that are summed across ranks before the square root."""
    return [n * n for n in torch._foreach_norm(tensors)]


def _foreach_norms(x: list[Tensor], u: list[Tensor]) -> tuple[Tensor, Tensor]:
    dt = x[0].dtype
    return torch.stack(torch._foreach_norm(x)).to(dt), torch.stack(torch._foreach_norm(u)).to(dt)


def _ratios(w_norm: Tensor, u_norm: Tensor, *, adapt: bool, min_trust_ratio: float | None,
            max_trust_ratio: float | None, weight_norm_bounds: tuple[float, float] | None) -> Tensor:
    """rho per tensor from stacked norms: clamp(phi(||x||) / ||u||), 1 at a zero norm, 1 without adaptation."""
    if not adapt:
        return torch.ones_like(w_norm)
    phi = w_norm if weight_norm_bounds is None else w_norm.clamp(*weight_norm_bounds)
    return trust_ratio(phi, u_norm, zero_check=(w_norm, u_norm), min_ratio=min_trust_ratio, max_ratio=max_trust_ratio)


def _foreach_apply(idx, xs, u, rho, state_steps, *, lr, beta1, beta2, eps, weight_decay, weight_decay_mode,
                   bias_correction) -> None:
    """x <- x (1 - lr wd) [decoupled] - step_size * rho * u, with u scaled in place."""
    x = [xs[i] for i in idx]
    dt = x[0].dtype
    scale = rho * lr
    if bias_correction == "lr":
        t = torch.stack([state_steps[i].to(dt) for i in idx])
        scale = scale * (1 - torch.pow(beta2, t)).sqrt() / (1 - torch.pow(beta1, t))
    torch._foreach_mul_(u, list(torch.neg(scale).unbind()))
    if weight_decay_mode == "decoupled" and weight_decay != 0:
        decay = 1 - lr * weight_decay
        torch._foreach_mul_(x, decay.to(dt) if isinstance(decay, Tensor) else decay)
    torch._foreach_add_(x, u)


def _finish(idx, params, master_params, xs, trust_ratios, weight_norms, update_norms, rho, w_norm, u_norm) -> None:
    """Refresh low-precision params from their masters and record the trust statistics."""
    for i in idx:
        if master_params[i] is not None:
            params[i].copy_(xs[i])
    torch._foreach_copy_([trust_ratios[i] for i in idx], list(rho.float().unbind()))
    torch._foreach_copy_([weight_norms[i] for i in idx], list(w_norm.float().unbind()))
    torch._foreach_copy_([update_norms[i] for i in idx], list(u_norm.float().unbind()))
