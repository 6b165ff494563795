"""The layer-wise trust ratio shared by LAMB and LARS, with its zero-norm rule and its clamps.

Both optimizers scale each parameter tensor's step by a ratio of norms:

    LAMB (You et al. 2020, Alg. 2):   rho = phi(||x||) / ||u||
    LARS (You et al. 2017):           rho = eta ||w|| / (||g|| + lambda ||w|| + eps)

and both need the same rule where a norm is zero: a zero-initialised tensor (||x|| = 0) or a zero update
would give 0 or 0/0, so the ratio is 1 there (optax's ``scale_by_trust_ratio``, apex, timm, MLPerf all
agree). Everything here works on tensors with ``torch.where``: no ``.item()``, no host synchronisation,
so it is safe inside ``torch.compile`` and CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["trust_ratio"]


def trust_ratio(
    numerator: Tensor,
    denominator: Tensor,
    *,
    zero_check: tuple[Tensor, Tensor],
    min_ratio: float | None = None,
    max_ratio: float | None = None,
) -> Tensor:
    """``numerator / denominator`` where both norms in ``zero_check`` are non-zero, else 1; then clamped.

    Args:
        numerator: the scaled parameter norm (``phi(||x||)`` for LAMB, ``eta ||w||`` for LARS).
        denominator: the update-side norm (``||u||`` for LAMB, ``||g|| + lambda ||w|| + eps`` for LARS).
        zero_check: the two raw norms whose zero gives ratio 1 (``(||x||, ||u||)`` for LAMB,
            ``(||w||, ||g||)`` for LARS, as MLPerf's reference checks the gradient norm, not the
            denominator).
        min_ratio, max_ratio: optional clamp of the ratio (DeepSpeed's ``min_coeff``/``max_coeff``;
            LAMBC's trust clip is ``max_ratio=1``). As in DeepSpeed's kernel, the clamp applies to a
            computed ratio only: a zero norm still gives exactly 1.

    Returns:
        A tensor broadcast from the inputs (0-dim for one tensor, 1-D for stacked norms).
    """
    a, b = zero_check
    nonzero = (a > 0) & (b > 0)
    # Dividing where the denominator is 0 gives inf/nan that torch.where discards; no branch needed.
    ratio = numerator / denominator
    if min_ratio is not None or max_ratio is not None:
        ratio = ratio.clamp(min=min_ratio, max=max_ratio)
    return torch.where(nonzero, ratio, torch.ones_like(ratio))
