"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017), MLPerf's reference by default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lamb import _chunks
from lamb._base import LOW_PRECISION, LayerwiseOptimizer
from lamb._validation import check_bool, check_choice, check_number
from lamb.trust_ratio import trust_ratio

__all__ = ["Lars", "lars"]

_DENOMINATORS = ("sum", "norm")


class Lars(LayerwiseOptimizer):
    r"""LARS with heavy-ball momentum, as MLPerf's ResNet-50 reference (``lars_optimizer.py``) by default.

    For each parameter tensor :math:`w` with gradient :math:`g` (:math:`\lambda` = ``weight_decay``,
    :math:`\eta` = ``lr``, :math:`\mu` = ``momentum``, :math:`\tau` = ``trust_coefficient``):

    .. math::
        \begin{aligned}
        \rho &= \frac{\tau \|w\|}{\|g\| + \lambda \|w\| + \epsilon}
            && \text{denominator="sum" (LARS paper, MLPerf); 1 if } \|w\| = 0 \text{ or } \|g\| = 0 \\
        \rho &= \frac{\tau \|w\|}{\|g + \lambda w\| + \epsilon}
            && \text{denominator="norm"; 1 if } \|w\| = 0 \text{ or } \|g + \lambda w\| = 0 \\
        \rho &\leftarrow \min(\rho / \eta, 1) && \text{trust\_clip=True (apex LARC's clip mode; computed ratios only)} \\
        d &= g + \lambda w \\
        v &\leftarrow \mu v + \eta \rho d && \text{the learning rate sits inside the momentum, as in MLPerf} \\
        w &\leftarrow w - v && \text{nesterov: } w \leftarrow w - (\mu v + \eta \rho d)
        \end{aligned}

    :math:`\rho = 1` in a group with ``layer_adaptation=False``: MLPerf excludes batch norm and biases from
    both adaptation and decay (``lamb.param_groups(model, wd, preset="mlperf")``), so they take plain
    momentum SGD at the global learning rate.

    Args:
        params: parameters or param groups.
        lr: learning rate :math:`\eta` (required; MLPerf's reference uses 21.2 at batch 32k with a
            polynomial schedule, see ``lamb.schedules.mlperf_poly``).
        momentum: :math:`\mu` (0.9; 0.94 at batch 32k in MLPerf).
        weight_decay: :math:`\lambda`.
        trust_coefficient: :math:`\tau` (0.001 in the LARS paper and MLPerf).
        eps: :math:`\epsilon` in the denominator (0 in MLPerf; apex LARC uses 1e-8).
        nesterov: Nesterov momentum.
        denominator: ``"sum"`` (:math:`\|g\| + \lambda\|w\|`) or ``"norm"`` (:math:`\|g + \lambda w\|`).
        trust_clip: LARC's clip mode (apex ``LARC(clip=True)``): the local rate never exceeds the global one.
        layer_adaptation: per-group switch; ``False`` makes the ratio 1.
        master_weights: fp32 master copy and fp32 momentum for bf16/fp16 parameters.
        maximize: maximise the objective.
        foreach, fused: backend choice, as for :class:`lamb.Lamb`.

    State per parameter: ``step``, ``momentum_buffer``, ``master_param`` (with master weights) and the last
    step's ``trust_ratio``, ``weight_norm`` (:math:`\|w\|`) and ``update_norm`` (the denominator's gradient
    norm: :math:`\|g\|`, or :math:`\|g + \lambda w\|` with ``denominator="norm"``).

    References:
        You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv:1708.03888, 2017.
        MLPerf Training reference, image_classification (TF2) ``lars_optimizer.py``; apex ``LARC``.
    """

    _moment_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        *,
        denominator: str = "sum",
        trust_clip: bool = False,
        layer_adaptation: bool = True,
        master_weights: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            nesterov=nesterov, denominator=denominator, trust_clip=trust_clip, layer_adaptation=layer_adaptation,
            master_weights=master_weights, maximize=maximize, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        n = "Lars"
        check_number(n, "lr", group["lr"], low=0.0)
        check_number(n, "momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_number(n, "weight_decay", group["weight_decay"], low=0.0)
        check_number(n, "trust_coefficient", group["trust_coefficient"], low=0.0, low_open=True)
        check_number(n, "eps", group["eps"], low=0.0)
        check_choice(n, "denominator", group["denominator"], _DENOMINATORS)
        for key in ("nesterov", "trust_clip", "layer_adaptation", "master_weights", "maximize"):
            check_bool(n, key, group[key])
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError(f"{n}: invalid nesterov=True with momentum={group['momentum']!r}; "
                             "allowed: nesterov needs momentum > 0")
        if group["trust_clip"] and isinstance(group["lr"], (int, float)) and group["lr"] == 0:
            raise ValueError(f"{n}: invalid trust_clip=True with lr=0; allowed: LARC's clip divides by lr > 0")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = self._amp_state()
        for group in self.param_groups:
            params, grads, states = self._collect_for_step(group)
            if not params:
                continue
            backend = self._backend_kwargs(group, params, states)
            amp = self._amp_kwargs(backend["backend"], grad_scale, found_inf)
            if not amp and self._amp_fallback(grads, grad_scale, found_inf):
                continue
            lars(
                params,
                grads,
                [s["momentum_buffer"] for s in states],
                [s.get("master_param") for s in states],
                [s["step"] for s in states],
                [s["trust_ratio"] for s in states],
                [s["weight_norm"] for s in states],
                [s["update_norm"] for s in states],
                **backend,
                **amp,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                nesterov=group["nesterov"],
                denominator=group["denominator"],
                trust_clip=group["trust_clip"],
                adapt=group["layer_adaptation"],
                maximize=group["maximize"],
            )
            self._finish_step(group, states)
        return loss


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    master_params: list[Tensor | None],
    state_steps: list[Tensor],
    trust_ratios: list[Tensor],
    weight_norms: list[Tensor],
    update_norms: list[Tensor],
    *,
    backend: str = "single",
    **kwargs: Any,
) -> None:
    """Functional LARS: one step over lists of tensors with the math of :class:`Lars`."""
    if backend == "fused":
        from lamb._fused import _fused_lars as fn
    elif backend == "foreach":
        fn = _multi_tensor_lars
    elif backend == "single":
        fn = _single_tensor_lars
    else:
        raise ValueError(f"lars: invalid backend={backend!r}; allowed: 'single', 'foreach', 'fused'")
    fn(params, grads, momentum_buffers, master_params, state_steps, trust_ratios, weight_norms, update_norms,
       **kwargs)


def _ratio(w_norm: Tensor, g_norm: Tensor, *, lr: float | Tensor, weight_decay: float, trust_coefficient: float,
           eps: float, denominator: str, trust_clip: bool) -> Tensor:
    """LARS's :math:`\\rho` from the norms (stacked or 0-dim); ``g_norm`` is ||g|| or ||g + wd w||."""
    denom = g_norm + weight_decay * w_norm + eps if denominator == "sum" else g_norm + eps
    rho = trust_ratio(trust_coefficient * w_norm, denom, zero_check=(w_norm, g_norm))
    if trust_clip:
        # LARC clip: local lr = min(lr * rho, lr), i.e. rho -> min(rho / lr, 1), on a computed ratio only:
        # a zero norm keeps ratio 1, also where lr > 1 (apex LARC skips both the ratio and the clip there).
        rho = torch.where((w_norm > 0) & (g_norm > 0), torch.clamp(rho / lr, max=1.0), rho)
    return rho


def _single_tensor_lars(
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
) -> None:
    """The reference backend: one tensor at a time, line for line the math in :class:`Lars`'s docstring."""
    for i, param in enumerate(params):
        w_store = master_params[i] if master_params[i] is not None else param
        dt = torch.float32 if w_store.dtype in LOW_PRECISION else w_store.dtype
        state_steps[i] += 1

        w = w_store.to(dt)
        g = grads[i].to(dt)
        if maximize:
            g = -g
        d = g + weight_decay * w if weight_decay != 0 else g

        w_norm = torch.linalg.vector_norm(w)
        g_norm = torch.linalg.vector_norm(g if denominator == "sum" else d)
        if adapt:
            rho = _ratio(w_norm, g_norm, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                         eps=eps, denominator=denominator, trust_clip=trust_clip)
        else:
            rho = torch.ones_like(w_norm)

        scaled = lr * rho * d
        v = momentum * momentum_buffers[i].to(dt) + scaled
        w_new = w - (momentum * v + scaled if nesterov else v)

        momentum_buffers[i].copy_(v)
        w_store.copy_(w_new)
        if master_params[i] is not None:
            param.copy_(w_store)
        trust_ratios[i].copy_(rho)
        weight_norms[i].copy_(w_norm)
        update_norms[i].copy_(g_norm)


def _multi_tensor_lars(
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
    norm_reduce: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """The foreach backend: the same math with ``torch._foreach_*`` ops over chunks of tensors.

    One temporary per chunk: ``d = g + wd w`` (later scaled in place to ``lr rho d``). ``norm_reduce``
    (ZeRO partitions): takes ``[||w_1||^2 .. ||w_k||^2, ||g_1||^2 .. ||g_k||^2]`` of the pieces, in the
    order of the input lists, and returns the full parameters' squared norms in the same layout.
    """
    ws = [m if m is not None else p for p, m in zip(params, master_params)]
    low = [i for i, w in enumerate(ws) if w.dtype in LOW_PRECISION]
    if low:
        if norm_reduce is not None:
            raise ValueError("lars: partitioned (norm_reduce) steps need fp32 tensors or master weights")
        pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
        kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                  eps=eps, nesterov=nesterov, denominator=denominator, trust_clip=trust_clip, adapt=adapt,
                  maximize=maximize)
        _single_tensor_lars(*(pick(s, low) for s in (params, grads, momentum_buffers, master_params, state_steps,
                                                     trust_ratios, weight_norms, update_norms)), **kw)
        rest = [i for i in range(len(ws)) if i not in set(low)]
        if not rest:
            return
        params, grads, momentum_buffers, master_params, state_steps, trust_ratios, weight_norms, update_norms, \
            ws = (pick(s, rest) for s in (params, grads, momentum_buffers, master_params, state_steps,
                                          trust_ratios, weight_norms, update_norms, ws))

    ratio_kw = dict(lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
                    denominator=denominator, trust_clip=trust_clip)
    chunks = _chunks.by_numel(ws)
    if norm_reduce is None:
        for idx in chunks:
            torch._foreach_add_([state_steps[i] for i in idx], 1)
            d, w_norm, g_norm = _foreach_direction(idx, ws, grads, weight_decay=weight_decay, maximize=maximize,
                                                   denominator=denominator)
            rho = _ratio(w_norm, g_norm, **ratio_kw) if adapt else torch.ones_like(w_norm)
            _foreach_apply(idx, ws, momentum_buffers, d, rho, lr=lr, momentum=momentum, nesterov=nesterov)
            _finish(idx, params, master_params, ws, trust_ratios, weight_norms, update_norms, rho, w_norm, g_norm)
        return

    # Partitioned tensors (ZeRO): pass A collects partial squared norms, one norm_reduce call (an
    # all-reduce) completes them, pass B recomputes the direction and applies it.
    k = len(ws)
    partial_w: list[Tensor] = [None] * k  # type: ignore[list-item]
    partial_g: list[Tensor] = [None] * k  # type: ignore[list-item]
    for idx in chunks:
        torch._foreach_add_([state_steps[i] for i in idx], 1)
        d, w_norm, g_norm = _foreach_direction(idx, ws, grads, weight_decay=weight_decay, maximize=maximize,
                                               denominator=denominator)
        del d
        for j, i in enumerate(idx):
            partial_w[i], partial_g[i] = w_norm[j] * w_norm[j], g_norm[j] * g_norm[j]
    full = norm_reduce(torch.cat([torch.stack(partial_w), torch.stack(partial_g)])).sqrt()
    w_all, g_all = full.chunk(2)
    for idx in chunks:
        sel = torch.tensor(idx, device=w_all.device)
        w_norm, g_norm = w_all[sel], g_all[sel]
        d, _, _ = _foreach_direction(idx, ws, grads, weight_decay=weight_decay, maximize=maximize,
                                     denominator=denominator)
        rho = _ratio(w_norm, g_norm, **ratio_kw) if adapt else torch.ones_like(w_norm)
        _foreach_apply(idx, ws, momentum_buffers, d, rho, lr=lr, momentum=momentum, nesterov=nesterov)
        _finish(idx, params, master_params, ws, trust_ratios, weight_norms, update_norms, rho, w_norm, g_norm)


def _foreach_direction(idx, ws, grads, *, weight_decay, maximize, denominator) -> tuple[list[Tensor], Tensor, Tensor]:
    """d = g + wd w in a new buffer list, with ||w|| and the denominator's gradient norm (||g|| or ||d||)."""
    w = [ws[i] for i in idx]
    dt = w[0].dtype
    g = [grads[i] if grads[i].dtype == dt else grads[i].to(dt) for i in idx]
    if maximize:
        g = torch._foreach_neg(g)
    w_norm = torch.stack(torch._foreach_norm(w)).to(dt)
    if denominator == "sum":
        g_norm = torch.stack(torch._foreach_norm(g)).to(dt)
    d = torch._foreach_add(g, w, alpha=weight_decay) if weight_decay != 0 else torch._foreach_mul(g, 1.0)
    if denominator == "norm":
        g_norm = torch.stack(torch._foreach_norm(d)).to(dt)
    return d, w_norm, g_norm


def _foreach_apply(idx, ws, momentum_buffers, d, rho, *, lr, momentum, nesterov) -> None:
    """d <- lr rho d;  v <- mu v + d;  w <- w - v   (nesterov: w <- w - (mu v + d))."""
    w = [ws[i] for i in idx]
    v = [momentum_buffers[i] for i in idx]
    torch._foreach_mul_(d, list((rho * lr).unbind()))
    torch._foreach_mul_(v, momentum)
    torch._foreach_add_(v, d)
    if nesterov:
        torch._foreach_add_(d, v, alpha=momentum)
        torch._foreach_sub_(w, d)
    else:
        torch._foreach_sub_(w, v)


def _finish(idx, params, master_params, ws, trust_ratios, weight_norms, update_norms, rho, w_norm, g_norm) -> None:
    """Refresh low-precision params from their masters and record the trust statistics."""
    for i in idx:
        if master_params[i] is not None:
            params[i].copy_(ws[i])
    torch._foreach_copy_([trust_ratios[i] for i in idx], list(rho.float().unbind()))
    torch._foreach_copy_([weight_norms[i] for i in idx], list(w_norm.float().unbind()))
    torch._foreach_copy_([update_norms[i] for i in idx], list(g_norm.float().unbind()))
