"""Rank-0 tracking: ``metrics.jsonl``, Weights & Biases, a progress bar.

W&B runs offline when ``WANDB_MODE=offline`` or no API key is configured (``tracking.mode: auto``), and
resumes the same run id after a restart. Every ``tracking.trust_ratio_every`` steps the per-layer trust
ratios of LAMB/LARS go to W&B as a histogram (and their summary into ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    return "online" if _has_api_key() else "offline"


def trust_ratios(optimizer) -> dict[str, float]:
    """Per-parameter trust ratio of the last step, read from the optimizer state (empty for AdamW/SGD)."""
    if hasattr(optimizer, "trust_stats"):
        return {k: float(v[0]) for k, v in optimizer.trust_stats().items()}
    out = {}
    for gi, g in enumerate(optimizer.param_groups):
        names = g.get("param_names") or [f"group{gi}.param{j}" for j in range(len(g["params"]))]
        for n, p in zip(names, g["params"]):
            st = optimizer.state.get(p, {})
            if "trust_ratio" in st:
                out[n] = float(st["trust_ratio"])
    return out


class Tracker:
    """Does nothing on ranks other than 0."""

    def __init__(self, recipe, output_dir: Path, rank: int, start_step: int, total_steps: int, run_id: str | None):
        self.active = rank == 0
        self.t = recipe["tracking"]
        self.run = None
        self.bar = None
        self.run_id = run_id
        if not self.active:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = output_dir / "metrics.jsonl"
        self.eval_path = output_dir / "eval.jsonl"
        for p in (self.metrics_path, self.eval_path):
            _truncate(p, start_step)
        self.metrics = open(self.metrics_path, "a")
        self.evals = open(self.eval_path, "a")
        if self.t["wandb"] and wandb_mode(self.t["mode"]) != "disabled":
            import wandb

            self.run = wandb.init(project=self.t["project"], name=self.t["run_name"], config=dict(recipe),
                                  dir=os.environ.get("WANDB_DIR", str(output_dir)), mode=wandb_mode(self.t["mode"]),
                                  id=run_id, resume="allow", reinit="finish_previous")
            self.run_id = self.run.id
        if self.t["progress_bar"]:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, optimizer=None):
        if not self.active:
            return
        row = {"step": step, **metrics}
        hist = None
        every = self.t["trust_ratio_every"]
        if optimizer is not None and every and step % every == 0:
            tr = trust_ratios(optimizer)
            if tr:
                vals = [v for v in tr.values() if math.isfinite(v)]
                row["trust_ratio_mean"] = sum(vals) / max(1, len(vals))
                row["trust_ratio_min"], row["trust_ratio_max"] = min(vals, default=0), max(vals, default=0)
                hist = vals
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.run is not None:
            import wandb

            data = {("train/" + k if "/" not in k else k): v for k, v in metrics.items()
                    if isinstance(v, (int, float))}
            if hist:
                data["train/trust_ratio"] = wandb.Histogram(hist)
            self.run.log(data, step=step)
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.3g}")

    def log_eval(self, step: int, metrics: dict):
        if not self.active:
            return
        self.evals.write(json.dumps({"step": step, **metrics}) + "\n")
        self.evals.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)
        msg = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        (self.bar.write if self.bar is not None else print)(f"step {step}: {msg}")

    def close(self):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.evals.close()
        if self.run is not None:
            self.run.finish()


def _truncate(path: Path, start_step: int):
    """After resuming at step s, forget rows with step > s so the file matches an uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) <= start_step:
                keep.append(line)
        except ValueError:  # a torn last line
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)
