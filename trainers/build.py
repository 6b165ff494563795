"""Optimizer, learning-rate schedule and the DeepSpeed config, all derived from the recipe.

The ``lamb`` optimizers go to DeepSpeed as client optimizers (``deepspeed.initialize(optimizer=...)``) and
the schedule as a client ``LambdaLR``, which DeepSpeed steps once per optimizer step (at the
gradient-accumulation boundary), not per micro-step.
"""

from __future__ import annotations

import inspect

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(recipe, model: torch.nn.Module, default_groups: str) -> torch.optim.Optimizer:
    import lamb

    o = recipe["optimizer"]
    preset = default_groups if o["param_groups"] == "auto" else o["param_groups"]
    if preset == "none":
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "param_names": [n for n, p in model.named_parameters() if p.requires_grad],
                   "weight_decay": o["weight_decay"]}]
    elif preset == "bn":  # batch norm excluded from weight decay only (the LAMB authors' ResNet-50)
        groups = lamb.param_groups(model, o["weight_decay"], no_decay=(torch.nn.modules.batchnorm._BatchNorm,),
                                   no_adapt=())
    else:
        groups = lamb.param_groups(model, o["weight_decay"], preset=preset)
    cls = {"lamb": lamb.Lamb, "lars": lamb.Lars, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[o["name"]]
    if cls in (torch.optim.AdamW, torch.optim.SGD):
        for g in groups:
            g.pop("layer_adaptation", None)
    opts = dict(o["options"])
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr", "weight_decay"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ValueError(f"{recipe.path}: optimizer.options: {cls.__name__} has no option(s) {', '.join(bad)} "
                         f"(it takes: {', '.join(sorted(allowed))})")
    if "betas" in opts:
        opts["betas"] = tuple(opts["betas"])
    return cls(groups, lr=o["lr"], weight_decay=o["weight_decay"], **opts)


def warmup_steps(recipe, total_steps: int, steps_per_epoch: int | None = None) -> int:
    """Warmup in optimizer steps: given, a proportion of the run, or epochs x (training samples // global batch)."""
    s = recipe["schedule"]
    if s["warmup_steps"] is not None:
        return s["warmup_steps"]
    if s["warmup_epochs"] is not None:
        if steps_per_epoch is None:
            raise ValueError("schedule.warmup_epochs needs the number of steps per epoch")
        return int(round(s["warmup_epochs"] * steps_per_epoch))
    return int(round((s["warmup_proportion"] or 0.0) * total_steps))


def build_scheduler(recipe, optimizer, total_steps: int, steps_per_epoch: int | None = None) -> LambdaLR:
    """``LambdaLR`` whose factor at optimizer step ``t`` (0 for the first) is the schedule's multiplier."""
    from lamb import schedules

    from .recipe import RecipeError

    s = recipe["schedule"]
    w = warmup_steps(recipe, total_steps, steps_per_epoch)
    if w >= total_steps and s["name"] != "constant":
        raise RecipeError(f"{recipe.path}: schedule.warmup_steps: {w} warmup steps leave no decay in a run of "
                          f"{total_steps} steps")
    if s["name"] == "constant":
        return LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / w) if w else 1.0)
    if s["name"] == "linear":  # the LAMB paper: linear warmup, linear decay to 0
        def f(t):
            if t < w:
                return (t + 1) / w
            return max(0.0, (total_steps - t) / max(1, total_steps - w))
        return LambdaLR(optimizer, f)
    if s["name"] == "poly_warmup":
        return LambdaLR(optimizer, schedules.poly_warmup_lambda(total_steps, w / total_steps,
                                                                 s["power"] if s["power"] is not None else 0.5))
    # MLPerf derives decay_steps = train_steps - warmup_steps + 1; a recipe may pin the published value
    decay = s["decay_steps"] or schedules.mlperf_decay_steps(total_steps, w)
    power = s["power"] if s["power"] is not None else 2.0
    return LambdaLR(optimizer, [schedules.mlperf_poly_lambda(base_lr=float(g["lr"]), warmup_steps=w, decay_steps=decay,
                                                             end_lr=s["end_lr"], power=power)
                                for g in optimizer.param_groups])


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(recipe, world_size: int) -> dict:
    """The DeepSpeed config, generated (never hand-written): batch arithmetic, clipping, ZeRO, precision.

    ZeRO-1/2/3 with LAMB/LARS (made exact by ``lamb.deepspeed.attach``) need ``zero_allow_untested_optimizer``;
    ZeRO-Offload needs ``zero_force_ds_cpu_optimizer: false`` (else DeepSpeed swaps in its CPU Adam);
    ``gradient_clipping`` is ``train.grad_clip`` (0 unless set: DeepSpeed's own default would be 1.0, which
    together with ``max_grad_norm`` would normalise twice).
    """
    b, t, ds = recipe["batch"], recipe["train"], recipe["deepspeed"]
    acc = b["global_batch"] // (b["micro_batch"] * world_size)
    zero = {"stage": ds["zero_stage"]}
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {
        "train_batch_size": b["global_batch"],
        "train_micro_batch_size_per_gpu": b["micro_batch"],
        "gradient_accumulation_steps": acc,
        "gradient_clipping": float(t["grad_clip"]),
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds["offload_optimizer"]:
        cfg["zero_force_ds_cpu_optimizer"] = False
    if t["precision"] == "bf16":
        # autocast keeps fp32 parameters, so the client optimizer keeps exact fp32 state on every backend
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return _merge(cfg, ds["config"])
