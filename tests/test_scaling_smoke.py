"""The CPU-scale scaling experiment (benchmarks/scaling): its protocol logic, and one tiny run end to end.

The experiment itself is a benchmark, not a test; here it runs on synthetic data in seconds.
"""

import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.scaling import protocol as P  # noqa: E402


def _cfg(**kw):
    base = dict(name="t", kind="image", batches=(32, 128, 512), epochs=1.0,
                centers={"lamb": 1e-2, "lars": 2.0, "adamw": 1e-3, "sgd": 0.1},
                weight_decay={o: 0.0 for o in P.OPTIMIZERS}, base_offsets=(-2, -1, 0, 1, 2), offsets=(-2, -1, 0, 1),
                max_extend=3, seeds=(0, 1, 2), grid_seeds=1)
    base.update(kw)
    return P.TaskConfig(**base)


def _drive(cfg, metric):
    """Run the plan to completion with a fake trainer; returns (results, run count, final plan)."""
    results, n = {}, 0
    for _ in range(200):
        p = P.plan(cfg, results)
        if not p.runs:
            return results, n, p
        for r in p.runs:
            assert r.key not in results, "a run was planned twice"
            val = metric(r.optimizer, r.batch, r.lr)
            results[r.key] = {"val_metric": val + 0.01 * r.seed, "test_metric": val, "diverged": val < 0}
            n += 1
    raise AssertionError("the plan did not terminate")


def test_scaling_rules():
    assert P.scale_lr("lamb", 1e-3, 512, 32768) == pytest.approx(8e-3, rel=1e-3)  # square root: x8 over 64x
    assert P.scale_lr("adamw", 1e-3, 256, 1024) == pytest.approx(2e-3, rel=1e-3)
    # LARS/SGD: the power law through the LARS paper's endpoints, lr 2 at 512 -> 22 at 32k
    assert P.scale_lr("lars", 2.0, 512, 32768) == pytest.approx(22.0, rel=1e-3)
    assert P.scale_lr("sgd", 2.0, 512, 32768) == pytest.approx(22.0, rel=1e-3)
    cfg = _cfg()
    # linear-epoch warmup: the fraction grows with batch, the number of warmup steps stays put
    steps = {b: P.num_steps(cfg, 51200, b) for b in cfg.batches}
    warm = {b: P.warmup_fraction(cfg, b) * steps[b] for b in cfg.batches}
    assert P.warmup_fraction(cfg, 512) == 0.25
    assert max(warm.values()) == pytest.approx(min(warm.values()))


def test_settle_grid_extends_past_a_winning_edge_and_breaks_ties_to_the_centre():
    peak = {"k": 4}
    metric = lambda k: 50.0 - abs(k - peak["k"])
    g = P.settle_grid((-1, 0, 1), metric, max_extend=5)
    assert g.settled and g.best == 4 and g.ks == [-1, 0, 1, 2, 3, 4, 5] and not g.at_edge
    g = P.settle_grid((-1, 0, 1), metric, max_extend=2)         # budget runs out: settled on the edge, flagged
    assert g.best == 3 and g.at_edge
    g = P.settle_grid((-1, 0, 1), lambda k: None if k == 0 else 1.0, max_extend=2)
    assert not g.settled and g.missing == [0]
    g = P.settle_grid((-2, -1, 0, 1, 2), lambda k: 5.0 if abs(k) <= 1 else 1.0, max_extend=2)
    assert g.best == 0 and not g.at_edge                     # a plateau: the point nearest the centre
    g = P.settle_grid((-1, 0, 1), lambda k: P.DIVERGED, max_extend=2)   # everything diverges: walk down
    assert g.ks[0] == -3 and g.at_edge


def test_plan_protocol_a_b_share_runs_and_every_best_lr_is_interior():
    cfg = _cfg()
    # a fake accuracy surface: per optimizer an optimum lr that grows like batch**0.3 (slower than the rules)
    opt_lr = {o: cfg.centers[o] * 2.0 ** 1.7 for o in cfg.optimizers}
    best_lr = lambda o, b: opt_lr[o] * (b / 32) ** 0.3
    metric = lambda o, b, lr: 90.0 - 10 * abs(math.log2(lr / best_lr(o, b)))
    results, n, p = _drive(cfg, metric)
    assert p.done
    for o in cfg.optimizers:
        c0 = p.cells[(o, 32)]
        lr0 = c0.lr_a
        assert c0.lr_b == lr0 and not c0.edge_a
        assert lr0 == P.grid_lr(cfg.centers[o], 2.0, 2)                   # the grid walked up to the optimum
        for b in cfg.batches[1:]:
            c = p.cells[(o, b)]
            assert c.lr_a == P.scale_lr(o, lr0, 32, b)                     # protocol A: the rule
            assert c.grid.best not in (c.grid.ks[0], c.grid.ks[-1])          # protocol B: interior
            assert abs(math.log2(c.lr_b / best_lr(o, b))) <= 0.5 + 1e-9      # ... and nearest the optimum
            assert 0 in c.grid.ks                                            # A's lr is a point of B's grid
            for lr in {c.lr_a, c.lr_b}:                                      # every seed at both choices
                assert len(P.seeds_at(results, cfg, o, b, lr)) == len(cfg.seeds)
            others = [k for k in c.grid.ks if P.grid_lr(c.center, 2.0, k) not in (c.lr_a, c.lr_b)]
            for k in others:                                                 # grid-only points: one seed
                assert len(P.seeds_at(results, cfg, o, b, P.grid_lr(c.center, 2.0, k))) == 1
    # the larger batches wait for the base grid: the first plan holds base-batch runs only
    first = P.plan(cfg, {})
    assert {r.batch for r in first.runs} == {32} and len(first.runs) == 4 * 5


def test_read_idx_roundtrip(tmp_path):
    from benchmarks.scaling.data import read_idx

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), arr)


def test_smoke_experiment_end_to_end(tmp_path):
    """The whole pipeline on synthetic data: runs, results.jsonl, table.md rows, PNGs; a rerun resumes."""
    pytest.importorskip("matplotlib")
    from benchmarks.scaling import experiment

    argv = ["--smoke", "--workers", "1", "--no-wandb", "--out", str(tmp_path)]
    assert experiment.main(argv) == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    cfgs = experiment.smoke_tasks()
    assert {r["task"] for r in recs} == {c.name for c in cfgs}
    assert {r["optimizer"] for r in recs} == set(P.OPTIMIZERS)
    for c in cfgs:
        assert {r["batch"] for r in recs if r["task"] == c.name} == set(c.batches)
        assert P.plan(c, experiment.load_results(tmp_path / "results.jsonl", [c])).done
    assert all(math.isfinite(r["test_metric"]) and r["steps"] >= 1 for r in recs)

    table = (tmp_path / "table.md").read_text()
    assert "python -m benchmarks.scaling.experiment --smoke" in table
    for c in cfgs:
        assert f"## {c.name}" in table
        header = "| optimizer | protocol | " + " | ".join(f"batch {b}" for b in c.batches) + " |"
        assert header in table
    for label in ("LAMB", "LARS", "AdamW", "SGD+momentum"):
        for proto in ("A", "B"):
            rows = [x for x in table.splitlines() if x.startswith(f"| {label} | {proto} |")]
            assert len(rows) == len(cfgs)
            assert all("±" in x and "| - |" not in x for x in rows)
    for c in cfgs:
        for suffix in ("vs_batch", "vs_lr"):
            png = tmp_path / f"{c.name}_{suffix}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the execution's wall clock is recorded beside the results and quoted in the table
    sessions = json.loads((tmp_path / "timing.json").read_text())
    assert len(sessions) == 1 and sessions[0]["runs"] == len(lines) and sessions[0]["wall_seconds"] > 0
    assert f"- wall clock: {sessions[0]['wall_seconds'] / 60:.1f} min in 1 execution(s) ({len(lines)} runs" in table

    assert experiment.main(argv) == 0          # everything is in results.jsonl: nothing runs again
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(lines)
    assert len(json.loads((tmp_path / "timing.json").read_text())) == 1  # an execution that ran nothing adds none
