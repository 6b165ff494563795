"""Atomic, verified checkpoints: the DeepSpeed engine checkpoint plus what DeepSpeed does not keep.

Layout under ``<output_dir>/checkpoints``::

    latest                  the tag of the newest complete checkpoint (written atomically)
    step_00000040/          one checkpoint: DeepSpeed's files (model, optimizer, lr scheduler),
        trainer.json        step, samples seen, world size, the recipe, the W&B run id
        rng_rank{r}.pt      each rank's torch / numpy / python RNG states
        manifest.json       size and sha256 of every file above (written last)
    .tmp/                   where a checkpoint is written before ``os.replace`` moves it in place

A checkpoint without a manifest, with a missing file or a checksum mismatch is refused, naming the
checkpoint and the file. Old checkpoints are pruned to the last ``keep``.
The output directory must be shared by all ranks (as DeepSpeed's own checkpoints assume).
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
    def save(self, engine, step: int, trainer_state: dict):
        tag = self.tag(step)
        if self.rank == 0:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        self.barrier()
        engine.save_checkpoint(str(self.tmp), tag=tag, save_latest=False)
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

    def load(self, engine, tag: str) -> dict:
        path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"checkpoint {self.dir / tag}: DeepSpeed could not load it")
        state = json.loads((self.dir / tag / "trainer.json").read_text())
        rng = self.dir / tag / f"rng_rank{self.rank}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=True))
        else:
            warnings.warn(f"{rng} missing (the world size changed?); RNG states not restored on this rank")
        return state
