"""The experiment's design as data plus pure functions: task configs, lr scaling rules, lr grids, the run plan.

Everything here is a function of the config and of the results gathered so far, so a killed experiment resumes
by recomputing the plan from ``results.jsonl``, and the protocol logic is unit-tested without training anything.

Protocols (both read from the same runs):

- **A (the LAMB paper's):** the lr is tuned once at the smallest batch ``b0`` (best validation metric on the base
  grid), then scaled by rule: ``lr(b) = lr0 * (b / b0) ** p`` with ``p = 1/2`` for LAMB and AdamW (square root,
  the LAMB paper) and ``p = log(22/2) / log(32768/512) = 0.577`` for LARS and SGD (the power law through the LARS
  paper's AlexNet-BN endpoints, lr 2 at 512 -> 22 at 32k: sub-linear). Warmup is scaled with batch (below).
- **B (Nado et al. 2021's):** the lr is tuned at every batch size on a grid centred on protocol A's lr, so
  protocol A's lr is always a point of protocol B's grid and the runs are shared.

Every grid is geometric (``center * factor**k``); while its best point is on an edge the grid is extended past that
edge (up to ``max_extend`` points a side), so every chosen lr ends interior unless the extension budget ran out
(flagged in the table). The grid is run with ``grid_seeds`` seeds; the chosen lrs of both protocols are then run with
every seed, and the table reports test metric mean +- std over seeds. Selection uses the validation split only.

Warmup (both protocols): linear-epoch warmup as in the LAMB paper, i.e. the warmup *fraction* grows with batch,
``warmup(b) = warmup_at_max * b / b_max`` of the run's steps, which is the same number of warmup steps at every batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

OPTIMIZERS = ("lamb", "lars", "adamw", "sgd")
LARS_EXPONENT = math.log(22 / 2) / math.log(32768 / 512)   # 0.5766
RULE_EXPONENT = {"lamb": 0.5, "adamw": 0.5, "lars": LARS_EXPONENT, "sgd": LARS_EXPONENT}
RULE_NAME = {"lamb": "sqrt", "adamw": "sqrt", "lars": "LARS power 0.577", "sgd": "LARS power 0.577"}
DIVERGED = -1.0  # selection metric of a diverged run: below chance, so it never wins a grid


@dataclass(frozen=True)
class TaskConfig:
    """One task of the experiment. ``run_fields`` (everything that changes a run's outcome) is fingerprinted."""
    name: str                                  # "fmnist" | "mlm" | "synthetic-images" | "synthetic-text"
    kind: str                                  # "image" | "mlm"
    batches: tuple[int, ...]                   # the ladder; batches[0] is protocol A's tuning batch
    epochs: float                              # fixed epoch budget (steps = floor(epochs * n_train / batch))
    centers: dict[str, float]                  # centre of the base-batch lr grid, per optimizer
    weight_decay: dict[str, float]
    data: dict[str, Any] = field(default_factory=dict)    # loader kwargs
    model: dict[str, Any] = field(default_factory=dict)   # model kwargs
    warmup_at_max: float = 0.25                # warmup fraction at the largest batch (scaled down with batch)
    grid_factor: float = 2.0
    base_offsets: tuple[int, ...] = (-2, -1, 0, 1, 2)
    offsets: tuple[int, ...] = (-2, -1, 0, 1)
    max_extend: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    grid_seeds: int = 1
    optimizers: tuple[str, ...] = OPTIMIZERS
    metric: str = "accuracy"                   # reported: test accuracy (%) or masked-token accuracy (%)

    def run_fields(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "epochs": self.epochs, "max_batch": max(self.batches),
                "weight_decay": self.weight_decay, "data": self.data, "model": self.model,
                "warmup_at_max": self.warmup_at_max}

    def fingerprint(self) -> str:
        blob = json.dumps(self.run_fields(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def replace(self, **kw) -> "TaskConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class RunSpec:
    task: str
    optimizer: str
    batch: int
    lr: float
    seed: int
    stage: int = 0          # 0 base grid, 1 other grids, 2 extra seeds (scheduling priority only)

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        return run_key(self.task, self.optimizer, self.batch, self.lr, self.seed)


def lr_key(lr: float) -> str:
    return f"{lr:.4g}"


def round_lr(lr: float) -> float:
    return float(lr_key(lr))


def run_key(task: str, optimizer: str, batch: int, lr: float, seed: int) -> tuple[str, str, int, str, int]:
    return (task, optimizer, int(batch), lr_key(lr), int(seed))


def scale_lr(optimizer: str, lr0: float, base_batch: int, batch: int) -> float:
    """Protocol A's rule: ``lr0 * (batch / base_batch) ** p`` (p = 1/2 for LAMB/AdamW, 0.577 for LARS/SGD)."""
    return round_lr(lr0 * (batch / base_batch) ** RULE_EXPONENT[optimizer])


def grid_lr(center: float, factor: float, k: int) -> float:
    return round_lr(center * factor ** k)


def warmup_fraction(cfg: TaskConfig, batch: int) -> float:
    return min(0.5, cfg.warmup_at_max * batch / max(cfg.batches))


def num_steps(cfg: TaskConfig, n_train: int, batch: int) -> int:
    return int(cfg.epochs * n_train // batch)


def selection_metric(record: dict) -> float:
    return DIVERGED if record.get("diverged") else float(record["val_metric"])


@dataclass
class GridState:
    ks: list[int]
    missing: list[int]
    best: int | None = None
    at_edge: bool = False     # settled with the best on an edge (extension budget exhausted)

    @property
    def settled(self) -> bool:
        return self.best is not None


def settle_grid(offsets: Iterable[int], metric_at: Callable[[int], float | None], max_extend: int) -> GridState:
    """Walk a geometric grid: report missing points, else pick the best, extending past an edge that wins.

    ``metric_at(k)`` is the selection metric at ``center * factor**k`` (None while not run). Ties go to the point
    closest to the centre (k = 0), then to the smaller lr; if every point diverged, the grid walks down.
    """
    ks = sorted(set(offsets))
    lo, hi = ks[0] - max_extend, ks[-1] + max_extend
    while True:
        vals = {k: metric_at(k) for k in ks}
        missing = [k for k in ks if vals[k] is None]
        if missing:
            return GridState(ks, missing)
        top = max(vals.values())
        if top <= DIVERGED:  # every point diverged: walk down
            best = ks[0]
        else:
            best = min((k for k in ks if vals[k] == top), key=lambda k: (abs(k), k))
        if best == ks[0] and best > lo:
            ks.insert(0, best - 1)
            continue
        if best == ks[-1] and best < hi:
            ks.append(best + 1)
            continue
        return GridState(ks, [], best, at_edge=best in (ks[0], ks[-1]) and len(ks) > 1)


@dataclass
class Cell:
    """What the plan knows about one (optimizer, batch)."""
    optimizer: str
    batch: int
    center: float | None = None          # protocol A's lr at this batch (None until the base grid settles)
    grid: GridState | None = None
    lr_a: float | None = None
    lr_b: float | None = None
    edge_a: bool = False
    edge_b: bool = False


@dataclass
class Plan:
    runs: list[RunSpec]                  # runnable now
    cells: dict[tuple[str, int], Cell]
    remaining_estimate: int              # runs still to come, counting grids not yet reachable (no extensions)
    done: bool


def plan(cfg: TaskConfig, results: dict[tuple, dict]) -> Plan:
    """The runs that can start now given ``results`` (run_key -> record), and what is settled.

    Stage 0: the base-batch grid of every optimizer. Stage 1 (once an optimizer's base grid is settled): a grid at
    every other batch centred on protocol A's scaled lr. Stage 2: every seed at the chosen lrs of both protocols.
    """
    runs: list[RunSpec] = []
    cells: dict[tuple[str, int], Cell] = {}
    remaining = 0
    b0 = cfg.batches[0]
    grid_seeds = cfg.seeds[: max(1, cfg.grid_seeds)]
    extra_seeds = [s for s in cfg.seeds if s not in grid_seeds]

    def metric_fn(opt: str, batch: int, center: float):
        def metric_at(k: int) -> float | None:
            lr = grid_lr(center, cfg.grid_factor, k)
            recs = [results.get(run_key(cfg.name, opt, batch, lr, s)) for s in grid_seeds]
            if any(r is None for r in recs):
                return None
            return sum(selection_metric(r) for r in recs) / len(recs)
        return metric_at

    def need(opt: str, batch: int, lr: float, seeds: Iterable[int], stage: int) -> int:
        n = 0
        for s in seeds:
            if run_key(cfg.name, opt, batch, lr, s) not in results:
                runs.append(RunSpec(cfg.name, opt, batch, lr, s, stage))
                n += 1
        return n

    for opt in cfg.optimizers:
        base_center = round_lr(cfg.centers[opt])
        base = settle_grid(cfg.base_offsets, metric_fn(opt, b0, base_center), cfg.max_extend)
        for k in base.missing:
            need(opt, b0, grid_lr(base_center, cfg.grid_factor, k), grid_seeds, 0)
        cell0 = cells[(opt, b0)] = Cell(opt, b0, base_center, base)
        if not base.settled:
            remaining += len(base.missing) * len(grid_seeds)
            remaining += (len(cfg.batches) - 1) * (len(cfg.offsets) * len(grid_seeds) + 2 * len(extra_seeds))
            remaining += len(extra_seeds)
            continue
        lr0 = grid_lr(base_center, cfg.grid_factor, base.best)
        cell0.lr_a = cell0.lr_b = lr0
        cell0.edge_a = cell0.edge_b = base.at_edge
        remaining += need(opt, b0, lr0, extra_seeds, 2)
        for b in cfg.batches[1:]:
            center = scale_lr(opt, lr0, b0, b)
            g = settle_grid(cfg.offsets, metric_fn(opt, b, center), cfg.max_extend)
            cell = cells[(opt, b)] = Cell(opt, b, center, g, lr_a=center, edge_a=base.at_edge)
            for k in g.missing:
                remaining += need(opt, b, grid_lr(center, cfg.grid_factor, k), grid_seeds, 1)
            remaining += need(opt, b, center, extra_seeds, 2)
            if g.settled:
                cell.lr_b = grid_lr(center, cfg.grid_factor, g.best)
                cell.edge_b = g.at_edge
                remaining += need(opt, b, cell.lr_b, extra_seeds, 2)
            else:
                remaining += len(extra_seeds)
    # a run may be listed twice (protocol A's and B's lr coincide): keep one
    unique = list({r.key: r for r in runs}.values())
    unique.sort(key=lambda r: (r.stage, r.optimizer, r.batch, r.lr, r.seed))
    done = not unique and all(c.lr_b is not None for c in cells.values()) and len(cells) == len(cfg.optimizers) * len(cfg.batches)
    return Plan(unique, cells, remaining, done)


def seeds_at(results: dict[tuple, dict], cfg: TaskConfig, opt: str, batch: int, lr: float) -> list[dict]:
    return [r for s in cfg.seeds if (r := results.get(run_key(cfg.name, opt, batch, lr, s))) is not None]
