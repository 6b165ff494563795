"""Worker for tests/test_zero_exact.py: LAMB/LARS inside DeepSpeed ZeRO 0/1/2 (CPU, gloo) against one process.

Launched by torchrun, one process per rank. Each case builds the same 3-layer MLP (odd sizes, so that
partitions split parameters and end in padding), two param groups (bias and LayerNorm without decay),
and trains 10 steps on a global batch of 8 that every world size cuts into equal rank slices. Rank 0
also trains the same model with the same optimizer in plain PyTorch on the whole batch, and writes, per
case, the largest relative difference ``||a - b|| / ||b||`` over the parameters, the optimizer state
(mapped back to per-parameter tensors) and the trust statistics.

    python -m torch.distributed.run --nproc_per_node 2 tests/zero_worker.py --out r.json \\
        --cases lamb:1,lars:2:offload

A case is ``optimizer:stage[:flag...]`` with flags ``offload`` (ZeRO-Offload to CPU), ``noattach`` (no
``lamb.deepspeed.attach``: the per-partition behaviour), ``clip`` (Lamb's ``max_grad_norm``), ``align``
(``zero_optimization.parameter_alignment``), ``rr`` (``round_robin_gradients``, stage 2),
``fused`` (``fused=True`` instead of ``foreach=True``, in the ZeRO run and the reference: ZeRO's CPU fp32
partitions then take the fused CPU kernel's split step; the result reports ``fused_split_calls``, how many
optimizer calls on rank 0 ran it), ``steps=N`` (instead of ``--steps``), ``save=DIR`` (save a checkpoint at the end, with the optimizer's
``lamb.deepspeed.consolidated_state_dict``), ``load=DIR`` (resume from one, at any world size; the steps
continue from the checkpoint's step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lamb  # noqa: E402
import lamb.deepspeed  # noqa: E402

GLOBAL_BATCH = 8
TOTAL_STEPS = 10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.LayerNorm(13), nn.Linear(13, 11), nn.Tanh(),
                         nn.Linear(11, 3))


def make_optimizer(kind: str, model: nn.Module, clip: bool, fused: bool = False):
    groups = lamb.param_groups(model, weight_decay=0.01, preset="bert")
    backend = {"fused": True} if fused else {"foreach": True}
    if kind == "lamb":
        return lamb.Lamb(groups, lr=2e-2, max_grad_norm=0.05 if clip else None, **backend)
    return lamb.Lars(groups, lr=0.5, momentum=0.9, trust_coefficient=0.02, **backend)


FUSED_SPLIT_CALLS = [0]


def count_fused_split_calls() -> None:
    """Wrap the fused backends so that the worker can report that the split (norm_reduce) path ran."""
    import lamb._fused as fused

    for name in ("_fused_lamb", "_fused_lars"):
        fn = getattr(fused, name)
        if getattr(fn, "_counted", False):
            continue

        def wrapped(*args, _fn=fn, **kwargs):
            if kwargs.get("norm_reduce") is not None:
                FUSED_SPLIT_CALLS[0] += 1
            return _fn(*args, **kwargs)

        wrapped._counted = True
        setattr(fused, name, wrapped)


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def loss_fn(out, y):
    return ((out - y) ** 2).mean()


def reference(kind: str, clip: bool, steps: int, fused: bool = False):
    """Plain PyTorch, one process, the whole global batch: params, per-parameter state, trust stats."""
    model = make_model()
    opt = make_optimizer(kind, model, clip, fused)
    for t in range(steps):
        x, y = batch(t)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: {k: v.clone() for k, v in st.items() if k in opt._moment_keys or k == "step"}
             for p, st in opt.state.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, state, {n: s.clone() for n, s in opt.trust_stats().items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def run_case(spec: str, steps: int, rank: int, world: int):
    import deepspeed

    kind, stage, *flags = spec.split(":")
    stage = int(stage)
    opts = {f.split("=")[0]: (f.split("=", 1)[1] if "=" in f else True) for f in flags}
    model = make_model()
    opt = make_optimizer(kind, model, "clip" in opts, "fused" in opts)
    if "fused" in opts:
        count_fused_split_calls()
    FUSED_SPLIT_CALLS[0] = 0
    zero = {"stage": stage, "elastic_checkpoint": True}
    if "offload" in opts:
        zero["offload_optimizer"] = {"device": "cpu"}
    if "align" in opts:
        zero["parameter_alignment"] = True
    if "rr" in opts:
        zero["round_robin_gradients"] = True
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19's default is 1.0: the reference does not clip
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if stage == 3:  # not supported: attach must say so instead of stepping per shard
        try:
            lamb.deepspeed.attach(engine)
        except NotImplementedError as e:
            return {"stage3_refused": str(e)} if rank == 0 else None
        return {"stage3_refused": None} if rank == 0 else None
    if "noattach" not in opts:
        lamb.deepspeed.attach(engine)
    start = 0
    if "load" in opts:
        # DeepSpeed loads the model; the optimizer state comes from the world-size-independent copy.
        _, client = engine.load_checkpoint(opts["load"], load_optimizer_states=False,
                                           load_lr_scheduler_states=False)
        lamb.deepspeed.load_consolidated_state_dict(opt, client["lamb"])
        start = engine.global_steps
    steps = int(opts.get("steps", steps))
    per = GLOBAL_BATCH // world
    for t in range(start, start + steps):
        x, y = batch(t)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
    if "save" in opts:
        engine.save_checkpoint(opts["save"], tag="ckpt",
                               client_state={"lamb": lamb.deepspeed.consolidated_state_dict(opt)})
        return None
    done = start + steps

    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if opt._partition_layout is not None:
        full = lamb.deepspeed.gather_state(opt)
        state = {n: {k: v for k, v in st.items() if k != "param"} for n, st in full.items()}
        stats = opt.trust_stats()
    elif stage == 0:
        names = {p: n for n, p in engine.module.named_parameters()}
        state = {names[p]: dict(st) for p, st in opt.state.items()}
        stats = opt.trust_stats()
    else:  # an unattached partitioned run: only the parameters compare
        state, stats = None, None
    if rank != 0:
        return None
    split_calls = FUSED_SPLIT_CALLS[0]
    ref_params, ref_state, ref_stats = reference(kind, "clip" in opts, done, "fused" in opts)
    out = {"param": max(rel(params[n], ref_params[n]) for n in ref_params), "fused_split_calls": split_calls}
    if state is not None:
        out["state"] = max(rel(state[n][k], ref_state[n][k]) for n in ref_state for k in ref_state[n])
        out["stats"] = max(rel(stats[n], ref_stats[n]) for n in ref_stats)
        out["stat_names"] = sorted(stats) == sorted(ref_stats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=TOTAL_STEPS)
    args = ap.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for spec in args.cases.split(","):
        results[spec] = run_case(spec, args.steps, rank, world)
        dist.barrier()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
