"""Exact LAMB and LARS under DeepSpeed ZeRO stages 1, 2 and 3: per-parameter trust ratios on flat partitions.

Under ZeRO (and DeepSpeed's bf16 optimizer) DeepSpeed replaces each param group's parameters with flat fp32
partitions, one per rank (stages 1/2) or one per rank and sub-group (stage 3), so a layer-wise optimizer
left alone computes one trust ratio per partition: the result drifts from the algorithm and depends on
the world size. After

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=Lamb(...), config=ds_config)
    lamb.deepspeed.attach(engine)

each ``step()`` cuts every flat partition into the segments that belong to the model's original
parameters, collects partial squared norms per segment, completes them with one ``all_reduce(SUM)`` per
flat partition (a param group at stages 1/2, a sub-group at stage 3) on its data-parallel group, and
applies each parameter's exact ratio (the two-pass ``norm_reduce`` path of the foreach backends and of
the fused CPU kernel). Every rank gets every parameter's full norms, so ``trust_stats()`` reports all
original parameters by name on every rank.

Partition layouts (flattened parameter ``x_j`` of ``n_j`` elements, data-parallel world ``W``, rank ``r``):

* stages 1/2: the param group's parameters are concatenated (``o_j`` = offset of ``x_j``) and padded to
  ``W * P``; rank ``r`` owns ``[r P, (r + 1) P)``, so parameter ``j``'s segment is the intersection
  ``[max(o_j, r P), min(o_j + n_j, (r + 1) P))`` (often empty, and a parameter can span ranks);
* stage 3: every parameter is sharded on its own: ``p_j = ceil(n_j / W)``, rank ``r`` holds
  ``x_j[r p_j : (r + 1) p_j]`` padded to ``p_j`` (real length ``clamp(n_j - r p_j, 0, p_j)``; DeepSpeed
  allocates the padding with ``torch.empty``, so it is not even zero),
  and a sub-group's flat partition is the concatenation of its parameters' shards, so segment ``j``
  starts at ``sum_{i<j} p_i``. The padding is left out of every view, norm and update.

Either way ``||x_j||^2 = sum_r ||x_j^(r)||^2`` (and the same for the update), which is what the
all-reduce computes.

DeepSpeed config this needs: ``"zero_allow_untested_optimizer": true``; with ``offload_optimizer``,
``"zero_force_ds_cpu_optimizer": false``; with ``max_grad_norm``, ``"gradient_clipping": 0`` (DeepSpeed's
default is 1.0). Stage 3 also needs ``offload_optimizer.device`` ``cpu`` or ``none`` (not ``nvme``: the
partitions are swapped out between steps) and no ``elastic_checkpoint`` (DeepSpeed refuses it at stage 3).
Checkpoints across world sizes: DeepSpeed 0.19.8 refuses to re-partition a client optimizer's state
(``load_optimizer_states=True`` at another DP size raises), so save :func:`consolidated_state_dict` as
client state and give it to :func:`load_consolidated_state_dict` after
``engine.load_checkpoint(dir, load_optimizer_states=False)`` (at stage 3 DeepSpeed then rebuilds the module
from the fp32 partitions of the checkpoint it names ``latest``, i.e. from the same master weights).

The layout is read from DeepSpeed's own bookkeeping (0.19.8): ``DeepSpeedZeroOptimizer``
(``runtime/zero/stage_1_and_2.py``: ``bit16_groups``, ``round_robin_bit16_groups``/``_offsets``/``_meta``,
``partition_size``, ``single_partition_of_fp32_groups``, ``real_dp_process_group``, cross-checked against
``params_in_partition``), ``BF16_Optimizer`` (``runtime/bf16_optimizer.py``: ``bf16_groups``,
``bf16_groups_flat``, ``fp32_groups_flat_partition``) and ``DeepSpeedZeroOptimizer_Stage3``
(``runtime/zero/stage3.py``: ``fp16_groups`` (the sub-groups), ``sub_group_to_group_id``,
``sub_group_process_groups``, ``fp32_partitioned_groups_flat``, cross-checked against
``fp16_partitioned_groups_flat_numel``; per parameter ``ds_shape``, ``ds_numel``, ``partition_numel()``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lamb._base import STAT_KEYS, LayerwiseOptimizer

__all__ = ["PartitionLayout", "attach", "consolidated_state_dict", "detach", "gather_state",
           "load_consolidated_state_dict"]


@dataclass
class _GroupLayout:
    """One param group on this rank: which slice of the flat partition each original parameter owns.

    ``starts[j]``/``lengths[j]``: parameter j's segment inside ``flat`` (length 0 where the parameter has no
    element on this rank; it still takes part, as an empty view, so every rank reduces the same vector and
    learns every parameter's norms). ``param_offsets[j]``: where that segment begins inside the flattened
    parameter.
    """

    flat: Tensor
    names: list[str]
    shapes: list[torch.Size]
    starts: list[int]
    lengths: list[int]
    param_offsets: list[int]
    process_group: Any
    stats: Tensor | None = None  # [k, 3]: the last step's trust_ratio, weight_norm, update_norm per parameter
    # Whether finishing a step on this partition advances the param group's ``step``: at stage 3 a param
    # group is stepped once per sub-group, and only its first sub-group counts.
    counts_group_step: bool = True

    def views(self, t: Tensor) -> list[Tensor]:
        return [t.narrow(0, s, n) for s, n in zip(self.starts, self.lengths)]


class PartitionLayout:
    """What :func:`attach` leaves on the optimizer (``optimizer._partition_layout``).

    The optimizer's ``step`` asks it for per-segment views (``collect``), the global gradient norm
    (``grad_norm``), the cross-rank reduction (``norm_reduce``) and writes back through ``finish``.
    """

    def __init__(self, groups: list[_GroupLayout], zero_optimizer: Any) -> None:
        self.groups = groups
        self._by_flat = {id(g.flat): g for g in groups}
        self._zero_optimizer = zero_optimizer

    # ------------------------------------------------------------------------------ used by step()
    def group_of(self, group: dict[str, Any]) -> _GroupLayout:
        """The flat partition the param group holds now (stages 1/2: always the same one; stage 3: DeepSpeed
        puts one sub-group's partition into ``params`` for each call of ``step``)."""
        params = group["params"]
        layout = self._by_flat.get(id(params[0])) if len(params) == 1 else None
        if layout is None:
            raise RuntimeError(
                "lamb.deepspeed: this param group is not one of the flat ZeRO partitions seen by attach(); "
                "call lamb.deepspeed.attach(engine) again after anything that rebuilds DeepSpeed's partitions"
            )
        return layout

    def collect(self, opt: LayerwiseOptimizer, group: dict[str, Any]
                ) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """Per-parameter segment views of the flat partition, its gradient and its state buffers.

        Each segment gets its own temporary ``step`` (the backends increment every step tensor they are
        given) and temporary trust statistics; :meth:`finish` writes them back.
        """
        if not group["params"]:
            # ZeRO-3 empties every param group between its sub-group steps: nothing to do here, on any rank
            # (the sub-groups, hence the collectives, are the same on every rank).
            return [], [], []
        g = self.group_of(group)
        flat = g.flat
        if flat.grad is None:
            return [], [], []
        state = _init_flat_state(opt, flat)
        step = state["step"]
        states = []
        for s, n in zip(g.starts, g.lengths):
            st: dict[str, Any] = {key: state[key].narrow(0, s, n) for key in opt._moment_keys}
            st["step"] = step.clone()
            st["trust_ratio"] = torch.ones((), dtype=torch.float32, device=flat.device)
            st["weight_norm"] = torch.zeros((), dtype=torch.float32, device=flat.device)
            st["update_norm"] = torch.zeros((), dtype=torch.float32, device=flat.device)
            states.append(st)
        return g.views(flat), g.views(flat.grad), states

    def norm_reduce(self, group: dict[str, Any]):
        """``norm_reduce`` for the foreach backends: one ``all_reduce(SUM)`` of ``[||x_j||^2.., ||u_j||^2..]``.

        Every original parameter of the group appears exactly once in the list (empty where it has no
        element on this rank), so the partial sums are already in per-parameter order.
        """
        pg = self.group_of(group).process_group

        def reduce(sq: Tensor) -> Tensor:
            sq = sq.contiguous()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pg)
            return sq

        return reduce

    def grad_norm(self, grads: list[Tensor]) -> Tensor:
        """``||G||`` over every gradient of every group on every rank, as DeepSpeed computed it this step.

        DeepSpeed steps the client optimizer one param group at a time, so the gradients of the other
        groups are not visible here; its ZeRO optimizer has already reduced the global norm (before any
        clipping) into ``_global_grad_norm``.
        """
        zo = self._zero_optimizer
        if getattr(zo, "clip_grad", 0.0):
            raise ValueError(
                "lamb.deepspeed: max_grad_norm together with DeepSpeed's gradient_clipping would normalise the "
                "gradients twice; set one of them (max_grad_norm is NVLAMB's g /= max(1, ||G||/max_grad_norm)); "
                "note that DeepSpeed's default gradient_clipping is 1.0: set \"gradient_clipping\": 0"
            )
        norm = getattr(zo, "_global_grad_norm", None)
        if norm is None:
            raise ValueError("lamb.deepspeed: max_grad_norm needs DeepSpeed's global gradient norm; "
                             "do not set zero_optimization.compute_grad_norm=false")
        device = grads[0].device if grads else None
        return torch.as_tensor(norm, dtype=torch.float32, device=device)

    def finish(self, opt: LayerwiseOptimizer, group: dict[str, Any], states: list[dict[str, Any]]) -> None:
        """Write the single ``step`` back, keep the per-parameter statistics, advance ``group["step"]``."""
        if not states:
            return
        g = self.group_of(group)
        # Every segment's copy of the step was incremented alike.
        opt.state[g.flat]["step"].copy_(states[0]["step"])
        g.stats = torch.stack([torch.stack([st[k] for k in STAT_KEYS]) for st in states])
        # DeepSpeed's elastic checkpoints read a group-level step (BASE_OPTIMIZER_STATE_STEP).
        if g.counts_group_step:
            group["step"] = int(group.get("step", 0)) + 1

    # ------------------------------------------------------------------------------ observability
    def trust_stats(self) -> dict[str, Tensor]:
        """The last step's ``[trust_ratio, weight_norm, update_norm]`` per original parameter name."""
        out = {}
        for g in self.groups:
            if g.stats is None:
                continue
            for name, row in zip(g.names, g.stats):
                out[name] = row
        return out


def _init_flat_state(opt: LayerwiseOptimizer, flat: Tensor) -> dict[str, Any]:
    """State of a flat partition: ``step`` (0-dim fp32) and the moment buffers, shaped like the partition.

    No per-parameter statistics here: DeepSpeed's checkpoints treat every tensor in this dict either as a
    partition (re-cut at another world size) or as a value shared by all ranks.
    """
    state = opt.state[flat]
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=flat.device)
    elif state["step"].dim() != 0:  # DeepSpeed's elastic restore may pad a 0-dim step to shape [1]
        state["step"] = state["step"].reshape(-1)[0].to(torch.float32).clone()
    for key in opt._moment_keys:
        if key not in state:
            state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    for key in STAT_KEYS:
        state.pop(key, None)
    return state


# ---------------------------------------------------------------------------------------- layouts
def _segments(offsets: list[int], numels: list[int], lo: int, hi: int) -> tuple[list[int], list[int], list[int]]:
    """Intersect each parameter's ``[offset, offset + numel)`` in the flat group with the rank's ``[lo, hi)``."""
    starts, lengths, inner = [], [], []
    for off, n in zip(offsets, numels):
        s, e = max(off, lo), min(off + n, hi)
        if s < e:
            starts.append(s - lo)
            lengths.append(e - s)
            inner.append(s - off)
        else:
            starts.append(0)
            lengths.append(0)
            inner.append(0)
    return starts, lengths, inner


def _zero12_layout(zo: Any, names: dict[int, str]) -> list[_GroupLayout]:
    """Layout of ``DeepSpeedZeroOptimizer`` (stages 1 and 2, with or without CPU offload)."""
    out = []
    for i, params in enumerate(zo.bit16_groups):
        pg = zo.real_dp_process_group[i]
        rank = dist.get_rank(group=pg)
        size = int(zo.partition_size[i])
        lo, hi = rank * size, (rank + 1) * size
        rr = zo.round_robin_bit16_groups[i]
        offset_of = {id(p): off for p, off in zip(rr, zo.round_robin_bit16_offsets[i])}
        # Shapes from DeepSpeed's meta copies: with dynamic state offload p.data may be a placeholder.
        meta = getattr(zo, "round_robin_bit16_meta", None)
        shape_of = {id(p): (m.shape if meta is not None else p.shape)
                    for p, m in zip(rr, meta[i] if meta is not None else rr)}
        shapes = [shape_of[id(p)] for p in params]
        numels = [int(torch.Size(s).numel()) for s in shapes]
        starts, lengths, inner = _segments([offset_of[id(p)] for p in params], numels, lo, hi)
        flat = zo.single_partition_of_fp32_groups[i]
        _check_partition(flat, size, i)
        local = {id(p) for p, n in zip(params, lengths) if n > 0}
        theirs = {id(p) for p in zo.params_in_partition[i]}
        if local != theirs:
            raise RuntimeError(
                f"lamb.deepspeed: param group {i}: the segments computed from DeepSpeed's offsets disagree "
                "with its params_in_partition; this DeepSpeed version lays partitions out differently"
            )
        out.append(_GroupLayout(flat, [_name(names, p, i, j) for j, p in enumerate(params)], shapes, starts,
                                lengths, inner, pg))
    return out


def _bf16_layout(bo: Any, names: dict[int, str]) -> list[_GroupLayout]:
    """Layout of DeepSpeed's ``BF16_Optimizer`` (bf16 parameters, fp32 partitions, ZeRO-1 style)."""
    out = []
    for i, params in enumerate(bo.bf16_groups):
        pg = bo.real_dp_process_group[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        size = bo.bf16_groups_flat[i].numel() // world
        numels = [p.numel() for p in params]
        offsets = list(itertools.accumulate([0] + numels[:-1]))
        starts, lengths, inner = _segments(offsets, numels, rank * size, (rank + 1) * size)
        flat = bo.fp32_groups_flat_partition[i]
        _check_partition(flat, size, i)
        out.append(_GroupLayout(flat, [_name(names, p, i, j) for j, p in enumerate(params)],
                                [p.shape for p in params], starts, lengths, inner, pg))
    return out


def _zero3_layout(zo: Any, names: dict[int, str]) -> list[_GroupLayout]:
    """Layout of ``DeepSpeedZeroOptimizer_Stage3``: one :class:`_GroupLayout` per sub-group.

    Sub-group ``i`` holds parameters ``fp16_groups[i]`` (a run of one param group, cut where the shards'
    running size reaches ``sub_group_size``); its fp32 partition ``fp32_partitioned_groups_flat[i]`` is the
    concatenation of their shards, ``partition_numel() = ceil(ds_numel / W)`` elements each, rank ``r``
    holding elements ``[r p, (r + 1) p)`` of the flattened parameter (``partition_parameters.py``,
    ``_partition_param``). Sub-groups are built from the parameters' sizes alone, so every rank has the same
    sub-groups in the same order and takes part in the same all-reduces.
    """
    if getattr(zo, "swap_optimizer", False):
        raise NotImplementedError(
            "lamb.deepspeed.attach: ZeRO-3 with offload_optimizer.device nvme swaps the fp32 partitions and "
            "their state out between steps; use offload_optimizer.device cpu or none")
    out = []
    seen_groups: set[int] = set()
    for i, params in enumerate(zo.fp16_groups):
        pg = zo.sub_group_process_groups[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        shapes = [torch.Size(p.ds_shape) for p in params]
        numels = [int(p.ds_numel) for p in params]
        parts = [int(p.partition_numel()) for p in params]
        for p, n, part in zip(params, numels, parts):
            if part != -(-n // world):
                raise RuntimeError(
                    f"lamb.deepspeed: ZeRO-3 sub-group {i}: parameter {_name(names, p, i, 0)} of {n} elements has "
                    f"a shard of {part}, expected ceil({n} / {world}); this DeepSpeed version shards differently")
        starts = list(itertools.accumulate([0] + parts[:-1]))
        lengths = [max(0, min(n - rank * part, part)) for n, part in zip(numels, parts)]
        inner = [rank * part if length else 0 for part, length in zip(parts, lengths)]
        size = sum(parts)
        if size != int(zo.fp16_partitioned_groups_flat_numel[i]):
            raise RuntimeError(f"lamb.deepspeed: ZeRO-3 sub-group {i}: the shards add up to {size} elements, "
                               f"DeepSpeed's flat partition has {zo.fp16_partitioned_groups_flat_numel[i]}")
        flat = zo.fp32_partitioned_groups_flat[i]
        _check_partition(flat, size, i)
        gid = int(zo.sub_group_to_group_id[i])
        out.append(_GroupLayout(flat, [_name(names, p, i, j) for j, p in enumerate(params)], shapes, starts,
                                lengths, inner, pg, counts_group_step=gid not in seen_groups))
        seen_groups.add(gid)
    return out


def _check_partition(flat: Tensor, size: int, i: int) -> None:
    if flat.dim() != 1 or flat.numel() != size or flat.dtype != torch.float32:
        raise RuntimeError(f"lamb.deepspeed: param group {i}: expected a 1-D fp32 partition of {size} elements, "
                           f"got {flat.dtype} {tuple(flat.shape)}")


def _name(names: dict[int, str], p: Tensor, i: int, j: int) -> str:
    return names.get(id(p), f"group{i}.param{j}")


# ---------------------------------------------------------------------------------------- public API
def attach(engine: Any, optimizer: LayerwiseOptimizer | None = None) -> PartitionLayout | None:
    """Make a :class:`lamb.Lamb` or :class:`lamb.Lars` inside a DeepSpeed engine exact under ZeRO-1/2/3.

    Call it once, right after ``deepspeed.initialize`` (before ``engine.load_checkpoint``). Without ZeRO
    partitions (stage 0 in fp32) there is nothing to do and it returns ``None``, so it is safe to call
    whatever the config. What it reads from DeepSpeed's optimizer is listed in the module docstring; the
    names come from ``engine.module.named_parameters()``.

    Args:
        engine: the ``DeepSpeedEngine`` returned by ``deepspeed.initialize``.
        optimizer: the client optimizer; by default the one DeepSpeed wraps (``engine.optimizer.optimizer``).

    Returns:
        The :class:`PartitionLayout` set on the optimizer, or ``None`` where the optimizer sees whole tensors.

    Raises:
        TypeError: the optimizer is not a LAMB/LARS from this package.
        NotImplementedError: ZeRO-3 with ``offload_optimizer.device: nvme`` (state swapped out between steps).
        RuntimeError: DeepSpeed's bookkeeping does not describe the optimizer's partitions.
    """
    wrapper = engine.optimizer
    client = optimizer if optimizer is not None else getattr(wrapper, "optimizer", wrapper)
    if not isinstance(client, LayerwiseOptimizer):
        raise TypeError(f"lamb.deepspeed.attach: expected a lamb.Lamb or lamb.Lars inside the engine, "
                        f"got {type(client).__name__}")
    names = {id(p): n for n, p in engine.module.named_parameters()}
    if hasattr(wrapper, "round_robin_bit16_groups") and hasattr(wrapper, "single_partition_of_fp32_groups"):
        groups = _zero12_layout(wrapper, names)
    elif hasattr(wrapper, "bf16_groups") and hasattr(wrapper, "fp32_groups_flat_partition"):
        groups = _bf16_layout(wrapper, names)
    elif _is_stage3(wrapper):
        groups = _zero3_layout(wrapper, names)
        _check_zero3_groups(wrapper, client, groups)
        layout = PartitionLayout(groups, wrapper)
        client._partition_layout = layout
        return layout
    else:
        client._partition_layout = None
        return None
    if len(groups) != len(client.param_groups):
        raise RuntimeError(f"lamb.deepspeed.attach: DeepSpeed has {len(groups)} partitioned groups, the "
                           f"optimizer {len(client.param_groups)}")
    for pg, g in zip(client.param_groups, groups):
        if len(pg["params"]) != 1 or pg["params"][0] is not g.flat:
            raise RuntimeError("lamb.deepspeed.attach: the optimizer's param groups are not DeepSpeed's flat "
                               "partitions; pass the optimizer given to deepspeed.initialize")
        pg.setdefault("step", 0)
        _init_flat_state(client, g.flat)
    layout = PartitionLayout(groups, wrapper)
    client._partition_layout = layout
    return layout


def _check_zero3_groups(zo: Any, client: LayerwiseOptimizer, groups: list[_GroupLayout]) -> None:
    """Stage 3 keeps every param group's ``params`` empty between steps and puts one sub-group's partition
    in for each ``step`` call (``_optimizer_step``), so check the mapping instead of the groups' contents."""
    if getattr(zo, "optimizer", None) is not client:
        raise RuntimeError("lamb.deepspeed.attach: the optimizer is not the one DeepSpeed's ZeRO-3 optimizer "
                           "steps; pass the optimizer given to deepspeed.initialize")
    n = len(client.param_groups)
    bad = sorted({int(g) for g in zo.sub_group_to_group_id.values() if not 0 <= int(g) < n})
    if bad:
        raise RuntimeError(f"lamb.deepspeed.attach: ZeRO-3 maps sub-groups to param groups {bad}, the optimizer "
                           f"has {n}")
    for pg in client.param_groups:
        pg.setdefault("step", 0)
    for g in groups:
        _init_flat_state(client, g.flat)


def detach(optimizer: LayerwiseOptimizer) -> None:
    """Undo :func:`attach`: the optimizer treats each flat partition as one tensor again (per-partition ratios)."""
    optimizer._partition_layout = None


def gather_state(optimizer: LayerwiseOptimizer) -> dict[str, dict[str, Tensor]]:
    """Collective: every original parameter's full state (``param``, ``step``, moment buffers), on every rank.

    Each rank fills its own segments into zero tensors shaped like the parameters, then one ``all_reduce``
    (SUM) per group assembles them: the segments of different ranks never overlap. For checks and for
    converting a ZeRO run's optimizer state into a single-process ``Lamb``/``Lars`` state.
    """
    layout = optimizer._partition_layout
    if layout is None:
        raise RuntimeError("lamb.deepspeed.gather_state: the optimizer is not attached (lamb.deepspeed.attach)")
    out: dict[str, dict[str, Tensor]] = {}
    for g in layout.groups:
        state = _init_flat_state(optimizer, g.flat)
        keys = ["param", *optimizer._moment_keys]
        numels = [int(torch.Size(s).numel()) for s in g.shapes]
        total = sum(numels)
        buf = torch.zeros(len(keys), total, dtype=torch.float32, device=g.flat.device)
        bases = list(itertools.accumulate([0] + numels[:-1]))
        for r, key in enumerate(keys):
            src = g.flat if key == "param" else state[key]
            for base, s, n, inner in zip(bases, g.starts, g.lengths, g.param_offsets):
                if n:
                    buf[r, base + inner: base + inner + n].copy_(src.detach().narrow(0, s, n))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=g.process_group)
        for name, shape, base, n in zip(g.names, g.shapes, bases, numels):
            out[name] = {key: buf[r, base: base + n].view(shape).clone() for r, key in enumerate(keys)}
            out[name]["step"] = state["step"].clone()
    return out


def consolidated_state_dict(optimizer: LayerwiseOptimizer) -> dict[str, Any]:
    """Collective: the optimizer's state per original parameter name, independent of the world size.

    Holds each parameter's fp32 master value (``param``), ``step`` and moment buffers, and the groups'
    step counters. Save it with the checkpoint (``engine.save_checkpoint(dir, client_state={"lamb": sd})``;
    DeepSpeed writes the client state once) and give it back to :func:`load_consolidated_state_dict` at any
    world size: DeepSpeed 0.19.8 refuses to re-partition a client optimizer's ZeRO state itself.
    """
    return {
        "format": "lamb.deepspeed/1",
        "optimizer": type(optimizer).__name__,
        "state": gather_state(optimizer),
        "group_steps": [int(g.get("step", 0)) for g in optimizer.param_groups],
    }


def load_consolidated_state_dict(optimizer: LayerwiseOptimizer, state_dict: dict[str, Any]) -> None:
    """Cut a :func:`consolidated_state_dict` into this rank's partitions (any world size).

    Writes the fp32 master partition too, so bf16 runs resume from exact master weights. No communication
    at stages 1/2. At stage 3 it is a collective (call it on every rank): the masters are also copied into
    the module's own shards and the persistent parameters (small ones DeepSpeed keeps whole on every rank)
    are gathered again, as after a step, so the module holds the loaded values even where
    ``engine.load_checkpoint`` was not used (DeepSpeed 0.19.8 reads stage-3 checkpoints only per saved rank,
    ``zero_pp_rank_<r>_*``: it cannot load one at a larger world size).
    """
    layout = optimizer._partition_layout
    if layout is None:
        raise RuntimeError("lamb.deepspeed.load_consolidated_state_dict: call lamb.deepspeed.attach(engine) first")
    if state_dict.get("format") != "lamb.deepspeed/1" or state_dict.get("optimizer") != type(optimizer).__name__:
        raise ValueError(f"lamb.deepspeed.load_consolidated_state_dict: expected a {type(optimizer).__name__} "
                         f"state from lamb.deepspeed.consolidated_state_dict, got format "
                         f"{state_dict.get('format')!r} for {state_dict.get('optimizer')!r}")
    saved = state_dict["state"]
    missing = [n for g in layout.groups for n in g.names if n not in saved]
    if missing:
        raise ValueError(f"lamb.deepspeed.load_consolidated_state_dict: no saved state for {missing[:5]}")
    with torch.no_grad():
        for g in layout.groups:  # stage 3: several partitions (sub-groups) per param group
            state = _init_flat_state(optimizer, g.flat)
            for name, s, n, inner in zip(g.names, g.starts, g.lengths, g.param_offsets):
                src = saved[name]
                state["step"].copy_(src["step"])
                if not n:
                    continue
                g.flat.narrow(0, s, n).copy_(src["param"].reshape(-1)[inner: inner + n])
                for key in optimizer._moment_keys:
                    state[key].narrow(0, s, n).copy_(src[key].reshape(-1)[inner: inner + n])
        for pg, step in zip(optimizer.param_groups, state_dict["group_steps"]):
            pg["step"] = step
    if _is_stage3(layout._zero_optimizer):
        _push_stage3_masters(layout._zero_optimizer)


def _is_stage3(zo: Any) -> bool:
    return hasattr(zo, "fp32_partitioned_groups_flat") and hasattr(zo, "sub_group_to_group_id")


def _push_stage3_masters(zo: Any) -> None:
    """Collective: the fp32 partitions into the module's shards, as ``DeepSpeedZeroOptimizer_Stage3.step`` does.

    Every parameter is released to its shard first (``checkpoint_event_prologue``), each sub-group's fp32
    partition is copied into its bit16 shards (``_reassign_or_swap_out_partitioned_parameters``; a no-op
    copy where an fp32 model's shards are the partition itself), and the persistent parameters are
    gathered again (``checkpoint_event_epilogue``): DeepSpeed only gathers parameters that are not
    available, so without the release they would keep their old full values.
    """
    with torch.no_grad():
        zo.checkpoint_event_prologue()
        for i in range(len(zo.fp16_groups)):
            zo._reassign_or_swap_out_partitioned_parameters(i)
        zo.checkpoint_event_epilogue()
