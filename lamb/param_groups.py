"""Which parameters get weight decay and which get layer-wise adaptation: one helper, per param group.

Kernels never look at names; this is the one place that does. A pattern is either a string, matched
against the parameter's full name (``encoder.layer.0.attention.output.LayerNorm.weight``) as a substring,
or an ``nn.Module`` subclass, matched against the module that owns the parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["NORM_LAYERS", "PRESETS", "param_groups"]

# Every normalisation layer in torch.nn: _NormBase covers BatchNorm{1,2,3}d, SyncBatchNorm, the lazy
# variants and InstanceNorm; LayerNorm, GroupNorm, RMSNorm, LocalResponseNorm are separate classes.
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    cls for cls in (
        nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm, nn.CrossMapLRN2d,
    ) if cls is not None
)

Pattern = str | type

# The conventional exclusions of the published recipes.
PRESETS: dict[str, dict[str, tuple[Pattern, ...]]] = {
    # NVIDIA's BERT (and Google's): no decay for bias, gamma, beta and LayerNorm; every tensor adapted.
    "bert": {"no_decay": ("bias", "gamma", "beta", "LayerNorm", "layer_norm", *NORM_LAYERS), "no_adapt": ()},
    # MLPerf ResNet-50 LARS: batch norm and biases excluded from both decay and the trust ratio.
    "mlperf": {"no_decay": ("bias", *NORM_LAYERS), "no_adapt": ("bias", *NORM_LAYERS)},
}


def _matches(name: str, owner: nn.Module, patterns: Iterable[Pattern]) -> bool:
    for pat in patterns:
        if isinstance(pat, str):
            if pat in name:
                return True
        elif isinstance(pat, type) and issubclass(pat, nn.Module):
            if isinstance(owner, pat):
                return True
        else:
            raise TypeError(f"param_groups: a pattern must be a str or an nn.Module subclass, got {pat!r}")
    return False


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    preset: str | None = None,
    no_decay: Iterable[Pattern] | None = None,
    no_adapt: Iterable[Pattern] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into param groups by (decayed?, adapted?).

    Args:
        model: the module; frozen parameters (``requires_grad=False``) are left out.
        weight_decay: the decay of decayed parameters; the others get 0.
        preset: ``"bert"`` (bias, gamma, beta, LayerNorm and every normalisation layer excluded from decay
            only) or ``"mlperf"`` (batch norm and biases excluded from decay and adaptation). Default:
            ``"bert"`` when neither ``no_decay`` nor ``no_adapt`` is given.
        no_decay: patterns of parameters without weight decay (replaces the preset's).
        no_adapt: patterns of parameters without the trust ratio (``layer_adaptation=False``).
        **group_options: other options set on every group (e.g. ``lr``).

    Returns:
        Non-empty param groups, each with ``params``, ``param_names``, ``weight_decay`` and
        ``layer_adaptation``; every trainable parameter appears exactly once, shared ones included.

    Examples:
        >>> opt = lamb.Lars(lamb.param_groups(resnet, 2.5e-5, preset="mlperf"), lr=21.2, momentum=0.94)
    """
    if preset is None and no_decay is None and no_adapt is None:
        preset = "bert"
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"param_groups: invalid preset={preset!r}; allowed: {', '.join(map(repr, PRESETS))} or None")
    base = PRESETS[preset] if preset is not None else {"no_decay": (), "no_adapt": ()}
    no_decay = tuple(base["no_decay"] if no_decay is None else no_decay)
    no_adapt = tuple(base["no_adapt"] if no_adapt is None else no_adapt)

    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            key = (not _matches(name, module, no_decay), not _matches(name, module, no_adapt))
            group = groups.setdefault(key, {
                "params": [], "param_names": [], **group_options,
                "weight_decay": weight_decay if key[0] else 0.0, "layer_adaptation": key[1],
            })
            group["params"].append(p)
            group["param_names"].append(name)
    order = [(True, True), (False, True), (True, False), (False, False)]
    return [groups[k] for k in order if k in groups]
