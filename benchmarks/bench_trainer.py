"""The trainer's step time against a bare DistributedDataParallel loop, and peak memory vs global batch.

    python benchmarks/bench_trainer.py [--steps 8] [--rounds 2] [--out benchmarks/results/trainer]

1. Overhead: the same tiny BERT (masked LM), data, Lamb optimizer and global batch (64 = micro 8 x acc 4 x
   2 ranks) run (a) through ``deepspeed --num_accelerators 2 --module trainers train`` and (b) through a bare
   ``torchrun`` loop with ``torch.nn.parallel.DistributedDataParallel`` (``no_sync`` during accumulation).
   Both on CPU with gloo, OMP_NUM_THREADS=1 per rank, alternating (a)/(b) ``--rounds`` times; the median
   step time after the first two steps is compared. Target: trainer / DDP <= 1.10.
2. Memory: the trainer at micro-batch 8 with global batch 64 (accumulation 4) and 4,096 (accumulation 256);
   peak RSS per rank (``ru_maxrss``) must be the same: accumulation keeps activations at one micro-batch.

Writes ``<out>.json`` and ``<out>.md`` with the machine, versions, sizes and the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODEL = {"type": "bert_mlm", "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                        "intermediate_size": 256, "hidden_dropout_prob": 0.0,
                                        "attention_probs_dropout_prob": 0.0}}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_recipe(tmp: Path, name: str, global_batch: int, steps: int) -> Path:
    import yaml

    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        from conftest import write_text_corpus

        write_text_corpus(corpus, n_docs=6000)
    r = {"model": MODEL,
         "data": {"train_files": str(corpus), "vocab_size": 512, "seq_len": 32, "max_predictions_per_seq": 5,
                  "eval_fraction": 0.0, "cache_dir": str(tmp / "cache")},
         "optimizer": {"name": "lamb", "lr": 0.01, "weight_decay": 0.01},
         "schedule": {"name": "constant"},
         "batch": {"global_batch": global_batch, "micro_batch": 8, "world_size": 2},
         "train": {"max_steps": steps, "output_dir": str(tmp / name)},
         "tracking": {"wandb": False, "progress_bar": False, "trust_ratio_every": 0}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_trainer(recipe: Path, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(_port()), "--module", "trainers", "train",
           str(recipe)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(p.stdout[-2000:] + p.stderr[-4000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_times": [r["step_time_s"] for r in rows],
            "summary": json.loads((out / "summary.json").read_text())}


def run_ddp(recipe: Path, out: Path) -> dict:
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(_port()), str(Path(__file__).resolve()),
           "--ddp-worker", str(recipe), "--ddp-out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(p.stdout[-2000:] + p.stderr[-4000:])
    return json.loads(out.read_text())


def ddp_worker(recipe_path: str, out: str):
    """The bare loop: same task, model, data order and optimizer as the trainer; DDP instead of DeepSpeed."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainers.build import build_optimizer
    from trainers.recipe import load_recipe
    from trainers.tasks import make_task
    from trainers.trainer import StepSampler, _loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    r = load_recipe(recipe_path, world_size=world)
    b = r["batch"]
    acc = b["global_batch"] // (b["micro_batch"] * world)
    torch.manual_seed(r["train"]["seed"])
    task = make_task(r)
    task.build_data(Path(r["data"]["cache_dir"]), rank == 0, dist.barrier)
    model = task.build_model()
    opt = build_optimizer(r, model, task.default_param_groups)
    ddp = DDP(model)
    steps = r["train"]["max_steps"]
    it = iter(_loader(task.train_ds, StepSampler(len(task.train_ds), b["global_batch"], b["micro_batch"], world,
                                                 rank, r["train"]["seed"], 0, steps), 0))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for j in range(acc):
            batch = next(it)
            if j < acc - 1:
                with ddp.no_sync():
                    loss = task.forward(ddp, batch)
                    (loss / acc).backward()
            else:
                loss = task.forward(ddp, batch)
                (loss / acc).backward()
            loss_sum += float(loss.detach())
        stats = torch.tensor([loss_sum], dtype=torch.float64)  # the trainer's per-step loss all-reduce
        dist.all_reduce(stats)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_times": times}))
    dist.destroy_process_group()


def cpu_model() -> str:
    from bench_step import machine  # the model name from /proc/cpuinfo (benchmarks/ is on sys.path here)

    return machine()["cpu"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trainer"))
    ap.add_argument("--ddp-worker")
    ap.add_argument("--ddp-out")
    a = ap.parse_args()
    if a.ddp_worker:
        return ddp_worker(a.ddp_worker, a.ddp_out)

    import deepspeed
    import torch
    import transformers

    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    recipe = make_recipe(tmp, "speed", 64, a.steps)
    trainer_t, ddp_t, rounds = [], [], []
    for rnd in range(a.rounds):
        tr = run_trainer(recipe, tmp / "speed")
        dd = run_ddp(recipe, tmp / "ddp.json")
        rounds.append(statistics.median(tr["step_times"][2:]) / statistics.median(dd["step_times"][2:]))
        trainer_t += tr["step_times"][2:]
        ddp_t += dd["step_times"][2:]
        print(f"round {rnd}: trainer {statistics.median(tr['step_times'][2:]) * 1e3:.1f} ms/step, "
              f"DDP {statistics.median(dd['step_times'][2:]) * 1e3:.1f} ms/step", flush=True)
    t_tr, t_dd = statistics.median(trainer_t), statistics.median(ddp_t)

    mem = {}
    for g in (64, 4096):
        rec = make_recipe(tmp, f"mem{g}", g, a.mem_steps)
        s = run_trainer(rec, tmp / f"mem{g}")
        mem[g] = {"accumulation": g // 16, "peak_rss_mib_per_rank": s["summary"]["peak_rss_mib_per_rank"],
                  "median_step_s": statistics.median(s["step_times"])}
        print(f"global batch {g}: accumulation {g // 16}, peak RSS per rank {mem[g]['peak_rss_mib_per_rank']} MiB",
              flush=True)

    res = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                    "backend": "gloo, CPU, 2 ranks, OMP_NUM_THREADS=1 per rank"},
        "model": MODEL, "seq_len": 32, "optimizer": "lamb.Lamb lr 0.01 wd 0.01 (bert param groups)",
        "overhead": {"global_batch": 64, "micro_batch": 8, "accumulation": 4, "steps": a.steps,
                     "rounds": a.rounds, "trainer_median_step_s": t_tr, "ddp_median_step_s": t_dd,
                     "ratio_trainer_over_ddp": t_tr / t_dd,
                     "ratio_per_round": rounds, "target": "<= 1.10"},
        "memory": {str(k): v for k, v in mem.items()},
        "memory_ratio_4096_over_64": max(mem[4096]["peak_rss_mib_per_rank"]) / max(mem[64]["peak_rss_mib_per_rank"]),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = [f"# trainer vs bare DDP ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {res['machine']}", "",
          "| | median step (ms) |", "|---|---|",
          f"| trainers (DeepSpeed engine) | {t_tr * 1e3:.1f} |", f"| bare DDP loop | {t_dd * 1e3:.1f} |",
          f"| ratio | {t_tr / t_dd:.3f} (target <= 1.10) |",
          f"| ratio per round | {', '.join(f'{x:.3f}' for x in rounds)} |", "",
          "| global batch | accumulation (micro 8, 2 ranks) | peak RSS per rank (MiB) |", "|---|---|---|"]
    md += [f"| {k} | {v['accumulation']} | {v['peak_rss_mib_per_rank']} |" for k, v in mem.items()]
    md += ["", "Other processes shared the 2 cores during this run; the ratio alternates the two loops to "
               "spread that noise, but single numbers can move by 10-20%."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
