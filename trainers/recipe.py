"""Recipes: one YAML file per run, validated completely before anything starts.

A recipe has the sections ``model``, ``data``, ``optimizer``, ``schedule``, ``batch``, ``train``,
``deepspeed`` and ``tracking``. :func:`load_recipe` reads it with ``yaml.safe_load``, applies
``key.path=value`` overrides, fills defaults and checks every field; any problem raises
:class:`RecipeError` naming the file and the field (``recipe.yaml: batch.global_batch: ...``).

The batch arithmetic is ``global_batch = micro_batch x accumulation x world_size``: the recipe fixes
``global_batch`` and ``micro_batch``; the accumulation follows from the world size of the launch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = ["RecipeError", "Recipe", "load_recipe", "batch_arithmetic", "SCHEMA"]


class RecipeError(ValueError):
    """A recipe problem; the message names the file and the field."""


_REQUIRED = object()


@dataclass(frozen=True)
class F:
    """One field: accepted types, default (``_REQUIRED`` if none), optional value check."""

    types: tuple
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    choices: tuple | None = None


def _pos(v):
    return None if v > 0 else "must be > 0"


def _nonneg(v):
    return None if v >= 0 else "must be >= 0"


def _prob(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


def _frac(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


_STR_LIST = (str, list)
_NUM = (int, float)

_TEXT_DATA = {
    "train_files": F(_STR_LIST + (type(None),)),
    "eval_files": F(_STR_LIST + (type(None),)),
    "hf_dataset": F((str, type(None))),
    "hf_config": F((str, type(None))),
    "hf_split": F((str,), "train"),
    "format": F((str,), "auto", choices=("auto", "text", "json", "jsonl", "csv", "parquet")),
    "text_field": F((str,), "text"),
    "eval_fraction": F(_NUM, 0.01, _frac),
    "max_documents": F((int, type(None))),
    "tokenizer": F((str, type(None))),
    "vocab_size": F((int,), 8192, _pos),
    "lowercase": F((bool,), True),
    "seq_len": F((int,), 128, lambda v: None if v >= 8 else "must be >= 8"),
    "max_predictions_per_seq": F((int,), 20, _pos),
    "mask_prob": F(_NUM, 0.15, _prob),
    "cache_dir": F((str, type(None))),
    "num_workers": F((int,), 0, _nonneg),
    "eval_samples": F((int, type(None))),
}

_IMAGE_DATA = {
    "format": F((str,), _REQUIRED, choices=("idx", "imagefolder", "hf")),
    "train_images": F((str, type(None))),
    "train_labels": F((str, type(None))),
    "eval_images": F((str, type(None))),
    "eval_labels": F((str, type(None))),
    "train_dir": F((str, type(None))),
    "eval_dir": F((str, type(None))),
    "hf_dataset": F((str, type(None))),
    "hf_config": F((str, type(None))),
    "hf_split": F((str,), "train"),
    "hf_eval_split": F((str,), "test"),
    "image_field": F((str,), "image"),
    "label_field": F((str,), "label"),
    "num_classes": F((int,), _REQUIRED, _pos),
    "channels": F((int,), 3, lambda v: None if v in (1, 3) else "must be 1 or 3"),
    "image_size": F((int, type(None))),
    "mean": F((list,), None),
    "std": F((list,), None),
    "augment": {
        "random_crop_padding": F((int,), 0, _nonneg),
        "random_resized_crop": F((bool,), False),
        "hflip": F((bool,), False),
    },
    "max_train_samples": F((int, type(None))),
    "eval_samples": F((int, type(None))),
    "num_workers": F((int,), 0, _nonneg),
}

SCHEMA: dict[str, Any] = {
    "model": {
        "type": F((str,), _REQUIRED, choices=("bert_pretraining", "bert_mlm", "resnet")),
        "preset": F((str, type(None)), None,
                    choices=(None, "bert-tiny", "bert-base", "bert-large", "resnet18", "resnet34", "resnet50")),
        "config": F((dict,), {}),
    },
    "data": None,  # chosen by model.type: _TEXT_DATA or _IMAGE_DATA
    "optimizer": {
        "name": F((str,), _REQUIRED, choices=("lamb", "lars", "adamw", "sgd")),
        "lr": F(_NUM, _REQUIRED, _pos),
        "weight_decay": F(_NUM, 0.0, _nonneg),
        "param_groups": F((str,), "auto", choices=("auto", "bert", "mlperf", "bn", "none")),
        "options": F((dict,), {}),
    },
    "schedule": {
        "name": F((str,), "constant", choices=("constant", "poly_warmup", "mlperf_poly", "linear")),
        "warmup_steps": F((int, type(None)), None, _nonneg),
        "warmup_proportion": F(_NUM + (type(None),), None, _frac),
        "warmup_epochs": F(_NUM + (type(None),), None, _nonneg),  # steps = round(epochs x steps per epoch)
        "power": F(_NUM + (type(None),), None),
        "end_lr": F(_NUM, 1e-4, _nonneg),
        "decay_steps": F((int, type(None)), None, _pos),  # mlperf_poly only; default train - warmup + 1
    },
    "batch": {
        "global_batch": F((int,), _REQUIRED, _pos),
        "micro_batch": F((int,), _REQUIRED, _pos),
        "world_size": F((int,), 1, _pos),
    },
    "train": {
        "max_steps": F((int, type(None)), None, _pos),
        "epochs": F(_NUM + (type(None),), None, _pos),
        "precision": F((str,), "fp32", choices=("fp32", "bf16")),
        "grad_clip": F(_NUM, 0.0, _nonneg),
        "label_smoothing": F(_NUM, 0.0, _frac),
        "eval_every": F((int,), 0, _nonneg),
        "eval_every_epochs": F(_NUM + (type(None),), None, _pos),  # steps = round(epochs x steps per epoch)
        "checkpoint_every": F((int,), 0, _nonneg),
        "keep_checkpoints": F((int,), 3, _pos),
        "output_dir": F((str,), _REQUIRED),
        "seed": F((int,), 0, _nonneg),
        "nonfinite": F((str,), "stop", choices=("stop", "skip")),
        "log_every": F((int,), 1, _pos),
        "dist_timeout_s": F((int,), 600, _pos),
        # BERT phase 2: start from the latest checkpoint of another run's output_dir (weights + optimizer
        # moments; step, lr schedule and data position restart). Ignored once this run has a checkpoint.
        "init_from": F((str, type(None))),
    },
    "deepspeed": {
        "zero_stage": F((int,), 0, lambda v: None if v in (0, 1, 2, 3) else "must be 0, 1, 2 or 3"),
        "offload_optimizer": F((bool,), False),  # ZeRO-Offload: optimizer state and step on the CPU
        "config": F((dict,), {}),
    },
    "tracking": {
        "wandb": F((bool,), True),
        "mode": F((str,), "auto", choices=("auto", "online", "offline", "disabled")),
        "project": F((str,), "lamb"),
        "run_name": F((str, type(None))),
        "trust_ratio_every": F((int,), 10, _nonneg),
        "progress_bar": F((bool,), True),
        # the published convergence point, e.g. eval/top1 0.759 (MLPerf); its first step is recorded
        "target_metric": F((str, type(None))),
        "target_value": F(_NUM + (type(None),), None),
        "stop_at_target": F((bool,), False),  # MLPerf: the run ends at the first evaluation reaching it
    },
}

# ZeRO-1/2 flatten whole tensors into per-rank partitions, ZeRO-3 shards every tensor; lamb.deepspeed.attach
# recovers each tensor's exact norms from either, as long as the fp32 partitions stay in memory between
# steps: ZeRO-3's NVMe optimizer offload swaps them (and their state) out, which attach does not follow.
NVME_REFUSAL = ("{name} computes a per-layer trust ratio over whole tensors from the fp32 partitions that "
                "lamb.deepspeed reads in memory; NVMe offload swaps them out between steps (use "
                "deepspeed.offload_optimizer: true, the CPU)")


class Recipe(dict):
    """A validated recipe (a plain nested dict) plus the path it came from."""

    path: str = "<recipe>"

    def __getattr__(self, item):  # recipe.train["max_steps"] or recipe.train.max_steps
        try:
            v = self[item]
        except KeyError as e:
            raise AttributeError(item) from e
        return _Section(v) if isinstance(v, dict) else v

    def to_json(self) -> str:
        return json.dumps(self, sort_keys=True)


class _Section(dict):
    def __getattr__(self, item):
        try:
            v = self[item]
        except KeyError as e:
            raise AttributeError(item) from e
        return _Section(v) if isinstance(v, dict) and item != "config" and item != "options" else v


def _type_name(types):
    names = {int: "int", float: "float", str: "string", bool: "bool", list: "list", dict: "mapping",
             type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _validate(section: dict, schema: dict, prefix: str, errors: list[str]) -> dict:
    out = {}
    if not isinstance(section, dict):
        errors.append(f"{prefix.rstrip('.')}: must be a mapping, got {type(section).__name__}")
        return out
    for key in section:
        if key not in schema:
            known = ", ".join(sorted(schema))
            errors.append(f"{prefix}{key}: unknown key (known: {known})")
    for key, spec in schema.items():
        name = prefix + key
        if isinstance(spec, dict):
            out[key] = _validate(section.get(key) or {}, spec, name + ".", errors)
            continue
        if key not in section:
            if spec.default is _REQUIRED:
                errors.append(f"{name}: required")
            out[key] = copy.deepcopy(spec.default)
            continue
        v = section[key]
        ok_types = spec.types
        if isinstance(v, bool) and bool not in ok_types:
            ok = False
        elif isinstance(v, int) and not isinstance(v, bool) and float in ok_types:
            ok = True
            v = v if int in ok_types else float(v)
        else:
            ok = isinstance(v, ok_types)
        if not ok:
            errors.append(f"{name}: expected {_type_name(ok_types)}, got {type(v).__name__} {v!r}")
            continue
        if spec.choices is not None and v not in spec.choices:
            errors.append(f"{name}: {v!r} is not one of {', '.join(map(repr, spec.choices))}")
            continue
        if spec.check is not None and v is not None:
            msg = spec.check(v)
            if msg:
                errors.append(f"{name}: {msg} (got {v!r})")
                continue
        out[key] = v
    return out


def _set_path(d: dict, dotted: str, value: Any, where: str):
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"{where}: override {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str], where: str) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"{where}: override {o!r} is not of the form key.path=value")
        k, v = o.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v != "" else None))
    return out


def batch_arithmetic(recipe: dict, world_size: int) -> tuple[int, str | None]:
    """Return (accumulation, error) for a world size."""
    g, m = recipe["batch"]["global_batch"], recipe["batch"]["micro_batch"]
    if g % (m * world_size):
        return 0, (f"batch.global_batch: {g} is not divisible by micro_batch x world_size = {m} x {world_size} "
                   f"= {m * world_size}")
    return g // (m * world_size), None


def load_recipe(path: str | Path, overrides: list[str] = (), world_size: int | None = None) -> Recipe:
    """Read, override, fill and validate a recipe. ``world_size`` defaults to ``batch.world_size``."""
    path = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections")
    for k, v in parse_overrides(list(overrides), path):
        _set_path(raw, k, v, path)

    errors: list[str] = []
    schema = dict(SCHEMA)
    mtype = (raw.get("model") or {}).get("type") if isinstance(raw.get("model"), dict) else None
    schema["data"] = _IMAGE_DATA if mtype == "resnet" else _TEXT_DATA
    rec = _validate(raw, schema, "", errors)

    if not errors:
        _cross_checks(rec, world_size or rec["batch"]["world_size"], errors)
    if errors:
        raise RecipeError(f"{path}: invalid recipe:\n  " + "\n  ".join(errors))
    out = Recipe(rec)
    out.path = path
    return out


def _cross_checks(r: dict, world_size: int, errors: list[str]):
    b, t, d, o, s = r["batch"], r["train"], r["data"], r["optimizer"], r["schedule"]
    if b["micro_batch"] > b["global_batch"]:
        errors.append(f"batch.micro_batch: {b['micro_batch']} is larger than batch.global_batch {b['global_batch']}")
    else:
        _, err = batch_arithmetic(r, world_size)
        if err:
            errors.append(err)
    if (t["max_steps"] is None) == (t["epochs"] is None):
        errors.append("train.max_steps / train.epochs: give exactly one of them")
    warm = [k for k in ("warmup_steps", "warmup_proportion", "warmup_epochs") if s[k] is not None]
    if len(warm) > 1:
        errors.append(f"schedule.{' / schedule.'.join(warm)}: give at most one of them")
    if s["name"] == "mlperf_poly" and not warm:
        errors.append("schedule.warmup_steps: required for mlperf_poly (or warmup_proportion / warmup_epochs)")
    if s["decay_steps"] is not None and s["name"] != "mlperf_poly":
        errors.append(f"schedule.decay_steps: only used by mlperf_poly, not {s['name']!r}")
    if t["eval_every"] and t["eval_every_epochs"] is not None:
        errors.append("train.eval_every / train.eval_every_epochs: give at most one of them")
    tr = r["tracking"]
    if (tr["target_metric"] is None) != (tr["target_value"] is None):
        errors.append("tracking.target_metric / tracking.target_value: give both or neither")
    if tr["stop_at_target"] and tr["target_metric"] is None:
        errors.append("tracking.stop_at_target: needs tracking.target_metric and tracking.target_value")
    if t["init_from"] is not None and Path(t["init_from"]).resolve() == Path(t["output_dir"]).resolve():
        errors.append("train.init_from: is this run's own train.output_dir (a run resumes from its own "
                      "checkpoints by itself)")
    ds = r["deepspeed"]
    stage = ds["zero_stage"]
    device = ((ds["config"].get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    if device == "nvme" and o["name"] in ("lamb", "lars"):
        errors.append("deepspeed.config.zero_optimization.offload_optimizer.device: nvme: "
                      + NVME_REFUSAL.format(name=o["name"].upper()))
    if ds["offload_optimizer"] and stage not in (1, 2, 3):
        errors.append(f"deepspeed.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3 (got {stage})")
    if t["grad_clip"] > 0 and o["options"].get("max_grad_norm") is not None:
        errors.append(f"train.grad_clip / optimizer.options.max_grad_norm: both set ({t['grad_clip']} and "
                      f"{o['options']['max_grad_norm']}); each normalises the global gradient norm, together they "
                      "would do it twice: set one of them (max_grad_norm is NVLAMB's pre-normalisation)")
    if r["model"]["type"] == "resnet":
        fmt = d["format"]
        need = {"idx": ("train_images", "train_labels"), "imagefolder": ("train_dir",), "hf": ("hf_dataset",)}[fmt]
        for k in need:
            if not d.get(k):
                errors.append(f"data.{k}: required for data.format: {fmt}")
        for k in ("mean", "std"):
            if d[k] is not None and len(d[k]) != d["channels"]:
                errors.append(f"data.{k}: needs {d['channels']} values (data.channels), got {len(d[k])}")
    else:
        if not d["train_files"] and not d["hf_dataset"]:
            errors.append("data.train_files: required (or data.hf_dataset)")
        if d["max_predictions_per_seq"] >= d["seq_len"]:
            errors.append(f"data.max_predictions_per_seq: {d['max_predictions_per_seq']} must be < data.seq_len")
    if r["model"]["preset"] is not None:
        p = r["model"]["preset"]
        if (r["model"]["type"] == "resnet") != p.startswith("resnet"):
            errors.append(f"model.preset: {p!r} does not fit model.type {r['model']['type']!r}")
