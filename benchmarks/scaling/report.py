"""Outputs of the scaling experiment, all recomputed from ``results.jsonl``: the markdown table, the plots, W&B.

- ``table.md``: test metric mean +- std over seeds per optimizer x batch x protocol, the chosen lrs, and the
  provenance (machine, versions, exact command, data, model, grids, seeds).
- ``<task>_vs_batch.png``: metric against batch size, one line per optimizer, a panel per protocol.
- ``<task>_vs_lr.png``: metric against lr (the sensitivity curves), a panel per batch, a line per optimizer;
  protocol A's lr is circled, protocol B's choice starred.
- W&B (offline): one run per task holding the tables, the training curves of every run and the plots.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
from pathlib import Path

from .protocol import RULE_NAME, TaskConfig, plan, seeds_at, grid_lr, warmup_fraction

LABEL = {"lamb": "LAMB", "lars": "LARS", "adamw": "AdamW", "sgd": "SGD+momentum"}
COLOR = {"lamb": "tab:red", "lars": "tab:purple", "adamw": "tab:blue", "sgd": "tab:green"}
METRIC_LABEL = {"image": "test accuracy (%)", "mlm": "masked-token test accuracy (%)"}


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(cfg: TaskConfig, results: dict) -> dict:
    """Per (optimizer, batch): protocol A/B lrs, their test metrics over seeds, and the grid (lr -> metrics)."""
    p = plan(cfg, results)
    out = {}
    for (opt, b), cell in p.cells.items():
        entry = {"center": cell.center, "protocols": {}, "grid": []}
        for proto, lr, edge in (("A", cell.lr_a, cell.edge_a), ("B", cell.lr_b, cell.edge_b)):
            if lr is None:
                continue
            recs = seeds_at(results, cfg, opt, b, lr)
            vals = [r["test_metric"] for r in recs]
            m, s = mean_std(vals)
            entry["protocols"][proto] = {"lr": lr, "mean": m, "std": s, "n": len(vals), "edge": edge,
                                         "diverged": sum(bool(r["diverged"]) for r in recs)}
        if cell.grid is not None and cell.center is not None:
            for k in cell.grid.ks:
                lr = grid_lr(cell.center, cfg.grid_factor, k)
                recs = seeds_at(results, cfg, opt, b, lr)
                if recs:
                    m, s = mean_std([r["test_metric"] for r in recs])
                    vm, _ = mean_std([r["val_metric"] for r in recs])
                    entry["grid"].append({"k": k, "lr": lr, "mean": m, "std": s, "n": len(recs), "val": vm,
                                          "diverged": sum(bool(r["diverged"]) for r in recs)})
        out[(opt, b)] = entry
    return out


def _fmt(d: dict | None) -> str:
    if not d or d["n"] == 0:
        return "-"
    s = f"{d['mean']:.2f} ± {d['std']:.2f}"
    if d["n"] != 3:
        s += f" (n={d['n']})"
    if d["edge"]:
        s += " †"
    if d["diverged"]:
        s += f" ({d['diverged']} div.)"
    return s


def machine_info() -> dict:
    import torch
    try:
        import lamb
        lamb_version = lamb.__version__
    except Exception:  # noqa: BLE001
        lamb_version = "?"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "lamb": lamb_version, "platform": platform.platform()}


def _wall_line(sessions: list[dict]) -> str:
    """The experiment's wall clock from the recorded executions (timing.json), with the load they started on."""
    if not sessions:
        return "- wall clock: not recorded (results from an earlier version of the experiment)"
    total = sum(s["wall_seconds"] for s in sessions)
    parts = "; ".join(f"{s['runs']} runs in {s['wall_seconds'] / 60:.1f} min on {s['workers']} worker(s), "
                      f"load {s['load_at_start']:.1f} -> {s['load_at_end']:.1f}, started {s['started']}"
                      for s in sessions)
    return f"- wall clock: {total / 60:.1f} min in {len(sessions)} execution(s) ({parts})"


def write_table(path: Path, cfgs: list[TaskConfig], results: dict, *, command: str, meta: dict) -> str:
    info = machine_info()
    lines = [
        "# Large-batch scaling on CPU: LAMB, LARS, AdamW, SGD (issue 5)", "",
        "Written by `benchmarks/scaling/experiment.py`; regenerate with:", "", "```", command, "```", "",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}; machine: {info['cpu']}, {info['cores']} cores; "
        f"{meta.get('workers', 1)} worker process(es) x {meta.get('threads', 1)} thread(s)",
        f"- versions: python {info['python']}, torch {info['torch']}, lamb {info['lamb']}",
        f"- runs: {meta.get('n_runs', '?')}; training time {meta.get('train_hours', 0):.2f} core-hours",
        _wall_line(meta.get("sessions") or []),
        "",
        "Protocol A (the LAMB paper's): lr tuned at the smallest batch on the validation split, then scaled by rule "
        "(square root for LAMB/AdamW; `lr0 (b/b0)^0.577` for LARS/SGD, the power law through the LARS paper's "
        "lr 2 at 512 -> 22 at 32k). Protocol B (Nado et al. 2021): lr tuned at every batch on a grid centred on "
        "protocol A's lr. Both: the same runs, linear-epoch warmup (the same number of warmup steps at every batch), "
        "selection on validation, test metric reported as mean ± std over seeds at the chosen lr. "
        "† = chosen lr on the edge of its grid after the extension budget ran out. Diverged runs count at chance.",
        "",
    ]
    for cfg in cfgs:
        res = {k: v for k, v in results.items() if k[0] == cfg.name}
        summ = summarise(cfg, res)
        desc = meta.get("descriptions", {}).get(cfg.name, {})
        steps = meta.get("steps", {}).get(cfg.name, {})
        lines += [f"## {cfg.name}: {METRIC_LABEL[cfg.kind]}", ""]
        if desc:
            lines += [f"- data: {desc.get('data', '')}", f"- model: {desc.get('model', '')}"]
        lines += [
            f"- budget: {cfg.epochs:g} epochs at every batch; optimizer steps: "
            + ", ".join(f"{b}: {steps.get(b, '?')}" for b in cfg.batches),
            "- warmup fraction: " + ", ".join(f"{b}: {warmup_fraction(cfg, b):.3f}" for b in cfg.batches),
            "- weight decay: " + ", ".join(f"{LABEL[o]} {cfg.weight_decay[o]:g}" for o in cfg.optimizers),
            f"- lr grid: factor {cfg.grid_factor:g}; base batch offsets {list(cfg.base_offsets)} around "
            + ", ".join(f"{LABEL[o]} {cfg.centers[o]:g}" for o in cfg.optimizers)
            + f"; other batches offsets {list(cfg.offsets)} around protocol A's lr; up to {cfg.max_extend} "
              f"extensions a side; grid seeds {cfg.seeds[:cfg.grid_seeds]}, all seeds {list(cfg.seeds)} at the "
              "chosen lrs",
            "",
            "| optimizer | protocol | " + " | ".join(f"batch {b}" for b in cfg.batches) + " |",
            "|---|---|" + "---|" * len(cfg.batches),
        ]
        for opt in cfg.optimizers:
            for proto in ("A", "B"):
                cells = [_fmt(summ.get((opt, b), {}).get("protocols", {}).get(proto)) for b in cfg.batches]
                lines.append(f"| {LABEL[opt]} | {proto} | " + " | ".join(cells) + " |")
        lines += ["", "Chosen learning rates (A / B):", "",
                  "| optimizer | rule | " + " | ".join(f"batch {b}" for b in cfg.batches) + " |",
                  "|---|---|" + "---|" * len(cfg.batches)]
        for opt in cfg.optimizers:
            cells = []
            for b in cfg.batches:
                pr = summ.get((opt, b), {}).get("protocols", {})
                a, bb = pr.get("A"), pr.get("B")
                cells.append(f"{a['lr']:.3g} / {bb['lr']:.3g}" if a and bb else (f"{a['lr']:.3g} / -" if a else "-"))
            lines.append(f"| {LABEL[opt]} | {RULE_NAME[opt]} | " + " | ".join(cells) + " |")
        lines += ["", "Sensitivity (test metric at each grid lr; seed-0 grid, mean over seeds where more ran):", ""]
        for b in cfg.batches:
            row = []
            for opt in cfg.optimizers:
                pts = summ.get((opt, b), {}).get("grid", [])
                row.append(f"{LABEL[opt]}: " + ", ".join(
                    f"{g['lr']:.3g}→{'div' if g['diverged'] == g['n'] else format(g['mean'], '.1f')}" for g in pts))
            lines.append(f"- batch {b}: " + "; ".join(row))
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(out_dir: Path, cfg: TaskConfig, results: dict) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: v for k, v in results.items() if k[0] == cfg.name}
    summ = summarise(cfg, res)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    titles = {"A": "A: lr tuned at the smallest batch, scaled by rule", "B": "B: lr tuned at every batch"}
    for ax, proto in zip(axes, ("A", "B")):
        for opt in cfg.optimizers:
            xs, ys, es = [], [], []
            for b in cfg.batches:
                d = summ.get((opt, b), {}).get("protocols", {}).get(proto)
                if d and d["n"]:
                    xs.append(b), ys.append(d["mean"]), es.append(d["std"])
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABEL[opt], color=COLOR[opt])
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.batches), [str(b) for b in cfg.batches])
        ax.set_xlabel("batch size")
        ax.set_title(titles[proto], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(METRIC_LABEL[cfg.kind])
    axes[0].legend()
    fig.suptitle(f"{cfg.name}: {cfg.epochs:g} epochs at every batch, mean ± std over {len(cfg.seeds)} seed(s)")
    fig.tight_layout()
    p = out_dir / f"{cfg.name}_vs_batch.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    n = len(cfg.batches)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.6), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], cfg.batches):
        for opt in cfg.optimizers:
            entry = summ.get((opt, b))
            if not entry or not entry["grid"]:
                continue
            g = entry["grid"]
            ax.errorbar([x["lr"] for x in g], [x["mean"] for x in g], yerr=[x["std"] for x in g], marker=".",
                        capsize=2, label=LABEL[opt], color=COLOR[opt])
            pr = entry["protocols"]
            if "A" in pr and pr["A"]["n"]:
                ax.plot([pr["A"]["lr"]], [pr["A"]["mean"]], "o", mfc="none", ms=10, color=COLOR[opt])
            if "B" in pr and pr["B"]["n"]:
                ax.plot([pr["B"]["lr"]], [pr["B"]["mean"]], "*", ms=10, color=COLOR[opt])
        ax.set_xscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("peak lr")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(METRIC_LABEL[cfg.kind])
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{cfg.name}: lr sensitivity (○ protocol A's scaled lr, ★ protocol B's choice)")
    fig.tight_layout()
    p = out_dir / f"{cfg.name}_vs_lr.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def log_wandb(wandb_dir: Path, experiment: str, cfgs: list[TaskConfig], results: dict, images: dict,
              table_text: str, meta: dict) -> list[str]:
    """One offline W&B run per task: config, the run table, the summary table, every training curve, the plots."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    wandb_dir.mkdir(parents=True, exist_ok=True)
    ids = []
    for cfg in cfgs:
        res = [v for k, v in sorted(results.items()) if k[0] == cfg.name]
        if not res:
            continue
        run = wandb.init(project="lamb-scaling", name=f"{experiment}-{cfg.name}", group=experiment,
                         dir=str(wandb_dir), mode="offline", reinit="finish_previous",
                         config={**cfg.run_fields(), "batches": list(cfg.batches), "centers": cfg.centers,
                                 "grid_factor": cfg.grid_factor, "seeds": list(cfg.seeds), **meta.get("run", {})})
        cols = ["optimizer", "batch", "lr", "seed", "steps", "val_metric", "test_metric", "test_loss", "diverged",
                "train_seconds"]
        run.log({"runs": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in res])})
        summ = summarise(cfg, {k: v for k, v in results.items() if k[0] == cfg.name})
        rows = []
        for (opt, b), e in sorted(summ.items()):
            for proto, d in e["protocols"].items():
                rows.append([opt, b, proto, d["lr"], d["mean"], d["std"], d["n"]])
        run.log({"summary": wandb.Table(columns=["optimizer", "batch", "protocol", "lr", "mean", "std", "n"],
                                        data=rows)})
        curve_rows = [[f"{r['optimizer']}-b{r['batch']}-lr{r['lr']:g}-s{r['seed']}", r["optimizer"], r["batch"],
                       r["lr"], r["seed"], s, loss] for r in res for s, loss in r["curve"] if loss is not None]
        run.log({"curves": wandb.Table(columns=["run", "optimizer", "batch", "lr", "seed", "step", "train_loss"],
                                       data=curve_rows)})
        run.log({p.stem: wandb.Image(str(p)) for p in images.get(cfg.name, [])})
        run.summary["table_md"] = table_text
        ids.append(run.id)
        run.finish()
    return ids
