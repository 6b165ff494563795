"""Worker for tests/test_zero_exact.py: LAMB/LARS inside DeepSpeed ZeRO 0/1/2/3 (CPU, gloo) against one process.

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
optimizer calls on rank 0 ran it, and ``flats``, how many flat partitions there are), ``sg=N`` (ZeRO-3
``sub_group_size``: a param group then spans several sub-groups, each stepped by its own ``step`` call),
``p0`` (ZeRO-3 ``stage3_param_persistence_threshold: 0``: no parameter of this small model stays whole),
``bf16`` (DeepSpeed's ``bf16``; every rank trains on the whole global batch, so that the averaged bf16
gradient equals the single-process one exactly, ``(g + g) / 2 == g``; the reference is a bf16 model with
``master_weights=True``, and ``param`` compares the fp32 master weights, ``param16`` the bf16 module),
``fp32acc`` (``data_types.grad_accum_dtype: fp32``, which makes ZeRO-1 bf16 use DeepSpeed's
``BF16_Optimizer``; without it bf16 ZeRO-1 is ``DeepSpeedZeroOptimizer`` with bf16 gradients), ``steps=N``
(instead of ``--steps``), ``save=DIR`` (save a checkpoint at the end, with the optimizer's
``lamb.deepspeed.consolidated_state_dict``), ``load=DIR`` (resume from one, at any world size; the steps
continue from the checkpoint's step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lamb
import lamb.deepspeed

GLOBAL_BATCH = 8
TOTAL_STEPS = 10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.LayerNorm(13), nn.Linear(13, 11), nn.Tanh(),
                         nn.Linear(11, 3))


def make_optimizer(kind: str, model: nn.Module, clip: bool, fused: bool = False, master: bool = False):
    groups = lamb.param_groups(model, weight_decay=0.01, preset="bert")
    backend = {"fused": True} if fused else {"foreach": True}
    if master:  # the single-process bf16 reference keeps fp32 masters, as DeepSpeed's partitions do
        backend["master_weights"] = True
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


def batch(step: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)
    return x.to(dtype), y.to(dtype)


def loss_fn(out, y):
    return ((out - y) ** 2).mean()


def reference(kind: str, clip: bool, steps: int, fused: bool = False, bf16: bool = False):
    """Plain PyTorch, one process, the whole global batch: params, per-parameter state, trust stats.

    With ``bf16`` the model is bf16 and the optimizer keeps fp32 masters: ``params`` are then the masters
    and ``params16`` the bf16 parameters (else both are the parameters).
    """
    model = make_model()
    if bf16:
        model = model.to(torch.bfloat16)
    opt = make_optimizer(kind, model, clip, fused, master=bf16)
    for t in range(steps):
        x, y = batch(t, torch.bfloat16 if bf16 else torch.float32)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: {k: v.clone() for k, v in st.items() if k in opt._moment_keys or k == "step"}
             for p, st in opt.state.items()}
    params16 = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {names[p]: st["master_param"].clone() for p, st in opt.state.items()} if bf16 else params16
    return params, params16, state, {n: s.clone() for n, s in opt.trust_stats().items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def run_case(spec: str, steps: int, rank: int, world: int):
    import deepspeed

    kind, stage, *flags = spec.split(":")
    stage = int(stage)
    opts = {f.split("=")[0]: (f.split("=", 1)[1] if "=" in f else True) for f in flags}
    bf16 = "bf16" in opts
    model = make_model()
    opt = make_optimizer(kind, model, "clip" in opts, "fused" in opts)
    if "fused" in opts:
        count_fused_split_calls()
    FUSED_SPLIT_CALLS[0] = 0
    zero = {"stage": stage}
    if stage < 3:  # DeepSpeed refuses elastic checkpoints at stage 3 (its save raises)
        zero["elastic_checkpoint"] = True
    if "offload" in opts:
        zero["offload_optimizer"] = {"device": "cpu"}
    if "align" in opts:
        zero["parameter_alignment"] = True
    if "rr" in opts:
        zero["round_robin_gradients"] = True
    if "sg" in opts:
        zero["sub_group_size"] = int(opts["sg"])
    if "p0" in opts:  # no persistent parameters: every forward gathers each parameter from its shards
        zero["stage3_param_persistence_threshold"] = 0
    # bf16: every rank sees the whole global batch (see the module docstring), so the batch per rank is 8
    per = GLOBAL_BATCH if bf16 else GLOBAL_BATCH // world
    config = {
        "train_batch_size": per * world,
        "train_micro_batch_size_per_gpu": per,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19's default is 1.0: the reference does not clip
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
        if "fp32acc" in opts:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    wrapper = type(engine.optimizer).__name__
    if "noattach" not in opts:
        lamb.deepspeed.attach(engine)
    start = 0
    if "load" in opts:
        own = (f"zero_pp_rank_{world - 1}_mp_rank_00_model_states.pt" if stage == 3
               else "mp_rank_00_model_states.pt")
        if os.path.exists(os.path.join(opts["load"], "ckpt", own)):
            # DeepSpeed loads the model; the optimizer state comes from the world-size-independent copy.
            _, client = engine.load_checkpoint(opts["load"], load_optimizer_states=False,
                                               load_lr_scheduler_states=False)
            start = engine.global_steps
        elif stage == 3:
            # DeepSpeed 0.19.8 cannot load this checkpoint here: at stage 3 each rank reads its own
            # zero_pp_rank_<r> file (missing at a larger world size, or when the checkpoint is not a
            # stage-3 one). The consolidated copy holds every fp32 master weight, and at stage 3
            # load_consolidated_state_dict writes them into the module's shards too.
            client = torch.load(rank0_model_states(opts["load"]), map_location="cpu", weights_only=False)
            start = client["global_steps"]
        else:
            raise ValueError(f"{spec}: DeepSpeed cannot load {opts['load']} at stage {stage}")
        lamb.deepspeed.load_consolidated_state_dict(opt, client["lamb"])
    steps = int(opts.get("steps", steps))
    dtype = torch.bfloat16 if bf16 else torch.float32
    for t in range(start, start + steps):
        x, y = batch(t, dtype)
        if not bf16:
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()
    if "save" in opts:
        engine.save_checkpoint(opts["save"], tag="ckpt",
                               client_state={"lamb": lamb.deepspeed.consolidated_state_dict(opt)})
        return None
    done = start + steps

    params = module_params(engine, stage)
    flats = 0
    if opt._partition_layout is not None:
        flats = len(opt._partition_layout.groups)
        full = lamb.deepspeed.gather_state(opt)
        state = {n: {k: v for k, v in st.items() if k != "param"} for n, st in full.items()}
        masters = {n: st["param"] for n, st in full.items()}
        stats = opt.trust_stats()
    elif stage == 0 and not bf16:
        names = {p: n for n, p in engine.module.named_parameters()}
        state = {names[p]: dict(st) for p, st in opt.state.items()}
        masters = params
        stats = opt.trust_stats()
    else:  # an unattached partitioned run: only the parameters compare
        state, stats, masters = None, None, params
    if rank != 0:
        return None
    split_calls = FUSED_SPLIT_CALLS[0]
    ref_params, ref_params16, ref_state, ref_stats = reference(kind, "clip" in opts, done, "fused" in opts, bf16)
    out = {"param": max(rel(masters[n], ref_params[n]) for n in ref_params),
           "param16": max(rel(params[n], ref_params16[n]) for n in ref_params16),
           "fused_split_calls": split_calls, "flats": flats, "wrapper": wrapper}
    if state is not None:
        out["state"] = max(rel(state[n][k], ref_state[n][k]) for n in ref_state for k in ref_state[n])
        out["stats"] = max(rel(stats[n], ref_stats[n]) for n in ref_stats)
        out["stat_names"] = sorted(stats) == sorted(ref_stats)
    return out


def rank0_model_states(path: str) -> str:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        f = os.path.join(path, "ckpt", name)
        if os.path.exists(f):
            return f
    raise FileNotFoundError(f"no model states file of rank 0 in {path}/ckpt")


def module_params(engine, stage: int) -> dict[str, torch.Tensor]:
    """The module's parameters by name; at stage 3 gathered from the shards (a collective on every rank)."""
    named = list(engine.module.named_parameters())
    if stage < 3:
        return {n: p.detach().clone() for n, p in named}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


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
