"""Atomic, verified checkpoints: the DeepSpeed engine checkpoint plus what DeepSpeed does not keep.

Layout under ``<output_dir>/checkpoints``::

    latest                  the tag of the newest complete checkpoint (written atomically)
    step_00000040/          one checkpoint: DeepSpeed's files (model, optimizer, lr scheduler),
        trainer.json        step, samples seen, world size, ZeRO stage, the recipe, the W&B run id
        rng_rank{r}.pt      each rank's torch / numpy / python RNG states
        manifest.json       size and sha256 of every file above (written last)
    .tmp/                   where a checkpoint is written before ``os.replace`` moves it in place

A checkpoint without a manifest, with a missing file or a checksum mismatch is refused, naming the
checkpoint and the file. Old checkpoints are pruned to the last ``keep``.
The output directory must be shared by all ranks (as DeepSpeed's own checkpoints assume).

World size and ZeRO: at the checkpoint's own world size and stage DeepSpeed restores everything itself
(bit-exact). Under ZeRO-1/2/3 with LAMB/LARS the client state also holds
``lamb.deepspeed.consolidated_state_dict`` (key ``"lamb"``: every parameter's fp32 value, step and moments
by name), so a run can resume at another world size or stage: DeepSpeed then loads the model and the lr
scheduler only (``load_optimizer_states=False``; 0.19.8 cannot re-partition a client optimizer) and the
optimizer state comes from that copy. A stage-0 checkpoint holds the whole optimizer state anyway.
ZeRO-3 checkpoints are written per rank (``zero_pp_rank_<r>_mp_rank_00_model_states.pt``, whose module
entries hold only shards) and DeepSpeed reads them only at stage 3 with no more ranks than were saved;
every other move to or from stage 3 skips DeepSpeed's loader: the weights come from the consolidated copy
(``param``), the buffers, lr scheduler and step counters from rank 0's model-states file
(:meth:`Checkpointer._load_by_name`).

:func:`read_named_state` reads a checkpoint's weights and per-parameter optimizer state by name, whatever
the world size and stage it was written with; ``train.init_from`` (BERT phase 2) starts from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    """All RNG states as tensors / plain Python values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": [py[0], list(py[1]), py[2]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Checkpointer:
    def __init__(self, output_dir: str | Path, rank: int, keep: int, barrier, broadcast):
        self.dir = Path(output_dir) / "checkpoints"
        self.tmp = self.dir / ".tmp"
        self.rank, self.keep, self.barrier, self.broadcast = rank, keep, barrier, broadcast

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    # ---------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict, client_state: dict | None = None):
        tag = self.tag(step)
        if self.rank == 0:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        self.barrier()
        engine.save_checkpoint(str(self.tmp), tag=tag, save_latest=False, client_state=client_state or {})
        work = self.tmp / tag
        work.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), work / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            (work / "trainer.json").write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
        self.barrier()
        if self.rank == 0:
            files = sorted(p for p in work.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(work)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
            for p in files:
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
            atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            final = self.dir / tag
            if final.exists():  # re-reached after resuming from an older checkpoint
                shutil.rmtree(final)
            os.replace(work, final)
            _fsync_dir(self.dir)
            atomic_write_text(self.dir / "latest", tag)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._prune()
        self.barrier()

    def _prune(self):
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for t in tags[:-self.keep]:
            shutil.rmtree(self.dir / t, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def verify(self, tag: str) -> Path:
        path = self.dir / tag
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path}: named by {self.dir / 'latest'} but missing")
        mpath = path / MANIFEST
        if not mpath.exists():
            raise CheckpointError(f"checkpoint {path} is torn: no {MANIFEST} (the write did not finish)")
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is not valid JSON ({e})") from None
        for name, meta in manifest.items():
            f = path / name
            if not f.exists():
                raise CheckpointError(f"checkpoint {path} is torn: {name} is missing")
            if f.stat().st_size != meta["bytes"]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                      f"the manifest says {meta['bytes']}")
            if _sha256(f) != meta["sha256"]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its sha256 check")
        return path

    def latest(self) -> str | None:
        """Rank 0 finds and verifies the newest checkpoint; every rank gets its tag (or the error)."""
        result = None
        if self.rank == 0:
            try:
                if self.tmp.exists():
                    warnings.warn(f"an interrupted checkpoint write was left in {self.tmp}; ignoring it")
                    shutil.rmtree(self.tmp, ignore_errors=True)
                pointer = self.dir / "latest"
                if pointer.exists():
                    tag = pointer.read_text().strip()
                    self.verify(tag)
                    result = ("ok", tag)
                elif any(self.dir.glob("step_*")):
                    raise CheckpointError(f"{self.dir}: checkpoints present but no 'latest' pointer; "
                                          f"write the tag to resume from into {pointer}")
                else:
                    result = ("ok", None)
            except CheckpointError as e:
                result = ("error", str(e))
        result = self.broadcast(result)
        if result[0] == "error":
            raise CheckpointError(result[1])
        return result[1]

    def load(self, engine, tag: str, optimizer=None, world_size: int = 1, zero_stage: int = 0) -> dict:
        """Resume ``engine`` (and its client ``optimizer``); returns the checkpoint's ``trainer.json``."""
        state = json.loads((self.dir / tag / "trainer.json").read_text())
        saved_world, saved_stage = state.get("world_size", world_size), state.get("zero_stage", 0)
        native = (saved_world == world_size and saved_stage == zero_stage) or saved_stage == zero_stage == 0
        ckpt = self.dir / tag
        # DeepSpeed's loader reads <dir>/<tag>/ with this stage's file names, one file per rank at stage 3.
        ds_loads = (saved_stage != 3 and zero_stage != 3) or (
            saved_stage == zero_stage == 3 and (ckpt / _zero3_states_file(world_size - 1)).exists())
        if ds_loads:
            path, client = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=native,
                                                  load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"checkpoint {self.dir / tag}: DeepSpeed could not load it")
        else:
            client = self._load_by_name(engine, ckpt, zero_stage)
        if not native:
            sd = (client or {}).get("lamb")
            if sd is None:
                raise CheckpointError(
                    f"checkpoint {self.dir / tag} was written at world size {saved_world}, ZeRO stage {saved_stage} "
                    f"without a consolidated optimizer state; it resumes only at that world size and stage "
                    f"(this run: {world_size}, stage {zero_stage})")
            load_named_state(optimizer, sd["state"], reset_step=False, group_steps=sd.get("group_steps"))
            # the optimizer's param groups (and their lr) were not loaded: take the lr from the restored schedule
            sched = getattr(engine, "lr_scheduler", None)
            if sched is not None:
                for g, lr in zip(optimizer.param_groups, sched.get_last_lr()):
                    g["lr"] = lr
            if self.rank == 0:
                print(f"note: checkpoint from world size {saved_world} (ZeRO {saved_stage}) resumed at world size "
                      f"{world_size} (ZeRO {zero_stage}) from its consolidated optimizer state", flush=True)
        rng = ckpt / f"rng_rank{self.rank}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=True))
        else:
            warnings.warn(f"{rng} missing (the world size changed?); RNG states not restored on this rank")
        return state


    @staticmethod
    def _load_by_name(engine, ckpt: Path, zero_stage: int) -> dict:
        """What ``engine.load_checkpoint(load_optimizer_states=False)`` restores, without DeepSpeed's loader.

        For the moves DeepSpeed 0.19.8 cannot load (to or from ZeRO-3, or stage 3 at more ranks than saved).
        Needs the consolidated optimizer state (it holds the only whole copy of a stage-3 run's weights);
        the weights reach the module here (stages 0-2) or through ``load_consolidated_state_dict`` (stage
        3, which writes the shards). Returns the client state, as DeepSpeed's loader would.
        """
        sd = torch.load(model_states_file(ckpt), map_location="cpu", weights_only=False)
        if sd.get("lamb") is None:
            raise CheckpointError(f"checkpoint {ckpt} holds no consolidated optimizer state (client key 'lamb'), "
                                  f"and DeepSpeed cannot load it at ZeRO stage {zero_stage} and this world size "
                                  "(it reads ZeRO-3 checkpoints only at stage 3 with at most the saved ranks)")
        state, module = sd["lamb"]["state"], engine.module
        with torch.no_grad():
            # By the module's own names, not its state dict: a tied parameter (BERT's decoder weight) has
            # one name in named_parameters and in the consolidated state, but two state-dict entries, the
            # second a ZeRO-3 placeholder.
            buffers = dict(module.named_buffers())
            for name, value in sd["module"].items():
                if name in buffers:  # not sharded by ZeRO-3: whole in every checkpoint
                    buffers[name].copy_(value)
            if zero_stage != 3:  # at stage 3 load_consolidated_state_dict writes the parameters' shards
                for name, p in module.named_parameters():
                    if name not in state or "param" not in state[name]:
                        raise CheckpointError(f"checkpoint {ckpt}: no fp32 value for parameter {name!r}")
                    p.copy_(state[name]["param"].view_as(p).to(p.dtype))
        sched = getattr(engine, "lr_scheduler", None)
        if sched is not None and sd.get("lr_scheduler") is not None:
            sched.load_state_dict(sd["lr_scheduler"])
        engine.global_steps = sd["global_steps"]
        engine.global_samples = sd.get("global_samples", engine.global_steps * engine.train_batch_size())
        engine.skipped_steps = sd["skipped_steps"]
        return {k: v for k, v in sd.items() if k not in ("module", "optimizer", "lr_scheduler")}


# ---------------------------------------------------------------------------------------------- by name
_NOT_MOMENTS = {"step", "param", "trust_ratio", "weight_norm", "update_norm", "master_param"}


def _zero3_states_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def model_states_file(ckpt: Path) -> Path:
    """Rank 0's DeepSpeed model-states file: ``mp_rank_00_model_states.pt``, at ZeRO-3 one per rank."""
    for name in ("mp_rank_00_model_states.pt", _zero3_states_file(0)):
        if (Path(ckpt) / name).exists():
            return Path(ckpt) / name
    raise CheckpointError(f"checkpoint {ckpt}: no mp_rank_00_model_states.pt (nor a ZeRO-3 {_zero3_states_file(0)})")


def _whole_weights(module_sd: dict, lamb_state: dict | None) -> dict:
    """The module's state dict with every parameter covered by the consolidated state replaced by its fp32
    value: a ZeRO-3 checkpoint's module entries are shards (empty placeholders) except for the parameters
    DeepSpeed keeps whole, and under ZeRO the fp32 value is the master the run continues from."""
    if not lamb_state:
        return module_sd
    out = dict(module_sd)
    for name, value in module_sd.items():
        st = lamb_state.get(name)
        if st is not None and "param" in st:
            out[name] = st["param"].to(value.dtype)
    return out


def read_named_state(ckpt: Path) -> tuple[dict, dict]:
    """``(weights, state)`` of one checkpoint folder, by parameter name, on the CPU.

    ``weights``: the module's state dict. ``state``: ``{name: {"step", moment buffers..., ["param"]}}`` from
    the consolidated ZeRO copy (client key ``"lamb"``) or, for stage 0, DeepSpeed's copy of the optimizer's
    ``state_dict()`` mapped through the param groups' ``param_names``.
    """
    f = model_states_file(ckpt)
    # our own checkpoint (verified by its manifest); DeepSpeed's file holds non-tensor objects
    sd = torch.load(f, map_location="cpu", weights_only=False)
    weights = sd["module"]
    if sd.get("lamb") is not None:
        return _whole_weights(weights, sd["lamb"]["state"]), sd["lamb"]["state"]
    opt = sd.get("optimizer")
    if not opt or "state" not in opt:
        raise CheckpointError(f"checkpoint {ckpt}: holds no optimizer state by parameter (a ZeRO checkpoint "
                              f"written without the consolidated state)")
    state = {}
    for gi, g in enumerate(opt["param_groups"]):
        names = g.get("param_names")
        if names is None or len(names) != len(g["params"]):
            raise CheckpointError(f"checkpoint {ckpt}: optimizer param group {gi} has no param_names")
        for name, pid in zip(names, g["params"]):
            if pid in opt["state"]:
                state[name] = opt["state"][pid]
    return weights, state


def load_named_state(optimizer, state: dict, *, reset_step: bool, group_steps: list | None = None,
                     weights: dict | None = None):
    """Give ``optimizer`` the per-name ``state`` (from :func:`read_named_state`), at any world size or stage.

    ``reset_step``: the step counters start again from 0 (BERT phase 2: Adam's bias correction restarts)
    while the moments are kept. Under ZeRO (``lamb.deepspeed.attach``-ed) the state is cut into this rank's
    partitions, fp32 master values included (``param``, else ``weights``).
    """
    layout = getattr(optimizer, "_partition_layout", None)
    if layout is not None:
        import lamb.deepspeed

        full = {}
        for g in layout.groups:
            for name in g.names:
                src = state.get(name)
                if src is None:
                    raise CheckpointError(f"optimizer state for parameter {name!r} missing in the checkpoint")
                param = src["param"] if "param" in src else (weights or {}).get(name)
                if param is None:
                    raise CheckpointError(f"no fp32 value for parameter {name!r} in the checkpoint")
                st = {"param": param.float(), "step": torch.zeros((), dtype=torch.float32) if reset_step
                      else torch.as_tensor(src["step"], dtype=torch.float32)}
                for key in optimizer._moment_keys:
                    st[key] = src[key].float()
                full[name] = st
        steps = [0] * len(optimizer.param_groups) if reset_step or group_steps is None else group_steps
        lamb.deepspeed.load_consolidated_state_dict(optimizer, {
            "format": "lamb.deepspeed/1", "optimizer": type(optimizer).__name__, "state": full,
            "group_steps": steps})
        return
    for gi, g in enumerate(optimizer.param_groups):
        names = g.get("param_names")
        if names is None:
            raise CheckpointError(f"optimizer param group {gi} has no param_names; cannot match state by name")
        for name, p in zip(names, g["params"]):
            src = state.get(name)
            if src is None:
                raise CheckpointError(f"optimizer state for parameter {name!r} missing in the checkpoint")
            st = optimizer.state[p]
            st.clear()
            if hasattr(optimizer, "_init_param_state"):  # lamb.Lamb / lamb.Lars: all keys, then overwrite
                st = optimizer._init_param_state(g, p)
            for key, v in src.items():
                if key in _NOT_MOMENTS or not torch.is_tensor(v):
                    continue
                if v.shape != p.shape:
                    raise CheckpointError(f"optimizer state {key} of {name!r}: shape {tuple(v.shape)} in the "
                                          f"checkpoint, {tuple(p.shape)} in this model")
                st[key] = v.to(device=p.device, dtype=torch.float32 if v.is_floating_point() else v.dtype).clone()
            step = 0 if reset_step else src.get("step", 0)
            st["step"] = torch.as_tensor(step, dtype=torch.float32, device=p.device).clone().reshape(())
            if "param" in src and not reset_step:  # fp32 value of a ZeRO run (equal to the module's in fp32)
                with torch.no_grad():
                    p.copy_(src["param"].view_as(p).to(p.dtype))
        if "step" in g and group_steps is None:
            g["step"] = 0 if reset_step else g["step"]
