"""What LAMB and LARS share as ``torch.optim.Optimizer`` subclasses: option checks on every param group,
backend choice (reference loop, foreach, fused), fp32 master weights, and state_dict handling that keeps
fp32 state fp32 for low-precision parameters.

The subclasses own the math (``lamb/lamb.py``, ``lamb/lars.py``); this module never looks at it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from lamb._validation import check_optional_bool

__all__ = ["LayerwiseOptimizer", "LOW_PRECISION"]

LOW_PRECISION = (torch.bfloat16, torch.float16)

# The last step's trust ratio and the two norms behind it, per parameter: 0-dim fp32 tensors that a
# tracker reads without a host sync. Kept fp32 whatever the parameter's dtype.
STAT_KEYS = ("trust_ratio", "weight_norm", "update_norm")


def _fused_support(params: list[Tensor]) -> tuple[bool, str]:
    try:
        from lamb import _fused
    except ImportError as e:  # a build of the package without the kernels' Python glue
        return False, f"the fused backend is not part of this installation ({e})"
    return _fused.fused_supported(params)


def _fused_preferred(params: list[Tensor]) -> bool:
    try:
        from lamb import _fused
    except ImportError:
        return False
    return _fused.fused_preferred(params)


class LayerwiseOptimizer(Optimizer):
    """Base class of :class:`lamb.Lamb` and :class:`lamb.Lars`; not meant to be used on its own.

    Subclasses set ``_moment_keys`` (the per-parameter state buffers shaped like the parameter),
    implement ``_validate_group(group)`` and ``step``.
    """

    _moment_keys: tuple[str, ...] = ()
    # Set by lamb.deepspeed.attach under ZeRO-1/2/3: cuts each flat partition into the original parameters.
    _partition_layout: Any = None

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        # GradScaler protocol (as torch's fused Adam): with fused=True, torch.amp.GradScaler neither unscales
        # nor syncs; it sets self.grad_scale and self.found_inf and the kernel unscales and skips on device.
        if defaults.get("fused"):
            self._step_supports_amp_scaling = True

    @staticmethod
    def _load_fused_kernels(params: list[Tensor]) -> None:
        """Load (building on first use) the fused kernels of a fused=True group's devices when the group is
        added rather than in the first step, so that a step compiled by torch.compile finds them loaded
        (loading is not traceable). Where no fused kernel can run nothing happens here: the step raises
        with the reason."""
        if not params or not _fused_support(params)[0]:
            return
        from lamb import ops

        for kind in sorted({p.device.type for p in params}):
            (ops.load_cpu if kind == "cpu" else ops.load_cuda)()

    def _amp_state(self) -> tuple[Tensor | None, Tensor | None]:
        """``(grad_scale, found_inf)`` that GradScaler left for this step, or ``(None, None)``."""
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    @staticmethod
    def _amp_kwargs(backend: str, grad_scale: Tensor | None, found_inf: Tensor | None) -> dict[str, Any]:
        """The fused kernels unscale and skip on device; the other backends go through ``_amp_fallback``."""
        if backend == "fused" and (grad_scale is not None or found_inf is not None):
            return {"grad_scale": grad_scale, "found_inf": found_inf}
        return {}

    @staticmethod
    def _amp_fallback(grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
        """For a group that is not fused under GradScaler's fused protocol (a group overriding fused=False):
        do what GradScaler does for other optimizers. Returns True to skip the group's step; otherwise the
        gradients are unscaled in place. The ``found_inf`` read is a host sync, as in GradScaler itself."""
        if found_inf is not None and bool(found_inf.item()):
            return True
        if grad_scale is not None and grads:
            torch._foreach_div_(grads, grad_scale.to(grads[0].device))
        return False

    # ----------------------------------------------------------------------------------- options
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, then checks the group's options and parameters.

        A rejected group is removed again, so a bad call leaves the optimizer as it was.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_backend_flags(group)
            self._validate_group(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters (got a {p.dtype} "
                        f"parameter of shape {tuple(p.shape)}); view it as real with torch.view_as_real"
                    )
        except Exception:
            self.param_groups.pop()
            raise
        if group["fused"]:
            self._load_fused_kernels(group["params"])

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _validate_backend_flags(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_optional_bool(name, "foreach", group["foreach"])
        check_optional_bool(name, "fused", group["fused"])
        if group["fused"] and group["foreach"]:
            raise ValueError(f"{name}: fused=True and foreach=True cannot be set together; choose one")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Old checkpoints keep loading: options added after they were saved take their defaults.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ----------------------------------------------------------------------------------- backends
    def _backend(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """``"fused"``, ``"foreach"`` or ``"single"`` for this group, decided in this one place.

        ``fused=True`` where no fused kernel can run raises: no silent fallback. With both flags None,
        the fused kernel is taken where it is built and supports the tensors, else foreach (foreach under
        torch.compile: see ``lamb._fused.fused_preferred``).
        """
        if group["fused"]:
            ok, reason = _fused_support(params)
            if not ok:
                raise RuntimeError(f"{type(self).__name__}(fused=True) cannot run here: {reason}")
            return "fused"
        if group["foreach"] is False:
            return "single"
        if group["foreach"] is None and group["fused"] is None and _fused_preferred(params):
            return "fused"
        return "foreach"

    # ----------------------------------------------------------------------------------- ZeRO partitions
    # Without lamb.deepspeed.attach these are _collect / _backend / nothing; attached, step() works on
    # per-parameter views of DeepSpeed's flat partitions and completes the norms across ranks.
    def _collect_for_step(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        if self._partition_layout is None:
            return self._collect(group)
        return self._partition_layout.collect(self, group)

    def _backend_kwargs(self, group: dict[str, Any], params: list[Tensor],
                        states: list[dict[str, Any]]) -> dict[str, Any]:
        if self._partition_layout is None:
            backend = self._backend(group, params)
            if backend == "fused":
                self._lay_out_like_params(params, states)
            return {"backend": backend}
        # Pieces of parameters: the two-pass norm_reduce path (foreach, or the fused CPU split step).
        return {"backend": self._partitioned_backend(group, params),
                "norm_reduce": self._partition_layout.norm_reduce(group)}

    def _partitioned_backend(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """Backend for ZeRO partition pieces: ``"fused"`` (the CPU kernel's split step) where they are CPU fp32
        (ZeRO-Offload, or DeepSpeed's CPU accelerator) and fused=True, or fused=None with foreach unset and
        the kernel built; else ``"foreach"``. fused=True where the kernel cannot run raises, as ``_backend``."""
        if group["fused"] is False or group["foreach"]:
            return "foreach"
        if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            return "foreach"
        if group["fused"]:
            ok, reason = _fused_support(params)
            if not ok:
                raise RuntimeError(f"{type(self).__name__}(fused=True) cannot run here: {reason}")
            return "fused"
        return "fused" if group["foreach"] is None and _fused_preferred(params) else "foreach"

    def _finish_step(self, group: dict[str, Any], states: list[dict[str, Any]]) -> None:
        if self._partition_layout is not None:
            self._partition_layout.finish(self, group, states)

    # ----------------------------------------------------------------------------------- state
    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """Create ``state[p]`` on first use: step, moments, optional fp32 master copy, stats."""
        state = self.state[p]
        if len(state) == 0:
            # The step lives on the parameter's device as a tensor: bias corrections then need no
            # host sync, and torch.compile does not recompile every step.
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
            master = group["master_weights"] and p.dtype in LOW_PRECISION
            if master:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            buffer_dtype = torch.float32 if master else p.dtype
            for key in self._moment_keys:
                state[key] = torch.zeros_like(p, dtype=buffer_dtype, memory_format=torch.preserve_format)
            for key in STAT_KEYS:
                state[key] = torch.ones((), dtype=torch.float32, device=p.device) if key == "trust_ratio" \
                    else torch.zeros((), dtype=torch.float32, device=p.device)
        return state

    def _lay_out_like_params(self, params: list[Tensor], states: list[dict[str, Any]]) -> None:
        """Before a fused step: the kernels read a parameter's state buffers with the parameter's strides, so a
        buffer laid out differently (state loaded from a contiguous model into a channels_last one, or a model
        converted with ``.to(memory_format=...)`` after its state was created) is copied once, in the state, into
        the parameter's layout. Values are unchanged; every later step finds the strides equal."""
        keys = (*self._moment_keys, "master_param")
        for p, st in zip(params, states):
            stride = p.stride()
            for key in keys:
                buf = st.get(key)
                if buf is not None and buf.stride() != stride and p.numel():
                    st[key] = torch.empty_like(p, dtype=buf.dtype).copy_(buf)

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """Parameters with a gradient, their gradients and their (lazily created) states."""
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use torch.optim.SparseAdam for sparse embeddings"
                )
            params.append(p)
            grads.append(p.grad)
            states.append(self._init_param_state(group, p))
        return params, grads, states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but fp32 master weights, fp32 moments kept
        beside them and the trust statistics stay fp32 (torch would cast them to the parameter's
        bf16/fp16 dtype), and ``step`` moves to the parameter's device."""
        keep: dict[tuple[int, str], Tensor] = {}
        for pid, st in state_dict["state"].items():
            has_master = "master_param" in st
            for key, value in st.items():
                if not isinstance(value, Tensor):
                    continue
                if key in STAT_KEYS or key == "master_param" or (has_master and key in self._moment_keys):
                    keep[(pid, key)] = value
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params))
        for (pid, key), value in keep.items():
            p = id_to_param[pid]
            self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        for p, st in self.state.items():
            if "step" in st and isinstance(st["step"], Tensor) and st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)

    # ----------------------------------------------------------------------------------- observability
    def _named_params(self) -> Iterator[tuple[str, Tensor]]:
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                yield (names[pi] if names else f"group{gi}.param{pi}"), p

    def trust_stats(self) -> dict[str, Tensor]:
        """The last step's ``[trust_ratio, weight_norm, update_norm]`` per parameter, as fp32 tensors.

        Keys are parameter names where the param groups carry ``param_names`` (as
        :func:`lamb.param_groups` and ``model.named_parameters()`` give), else ``group{i}.param{j}``.
        Nothing is copied to the host: ``.tolist()`` or a tracker does that when it wants the numbers.
        Parameters that have not been stepped yet are left out.
        """
        if self._partition_layout is not None:
            return self._partition_layout.trust_stats()
        out = {}
        for name, p in self._named_params():
            st = self.state.get(p)
            if st and "trust_ratio" in st:
                out[name] = torch.stack([st[k] for k in STAT_KEYS])
        return out
