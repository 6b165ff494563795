"""Fused LAMB/LARS on one GPU: time, bytes moved, GB/s against the device's copy bandwidth (and apex).

    python benchmarks/bench_fused_gpu.py [--layers 24 --hidden 1024] [--dtype fp32|bf16-master]

BERT-shaped parameters (BERT-large by default). Bytes a parameter a step (fp32): fused LAMB 40 (44 with
check_finite), fused LARS 28, apex FusedLAMB 52; bf16 with fp32 masters: LAMB 2+4+4+4 read + 8 written
in pass A, 4+4+4 read + 4+2 written in pass B = 40. The copy bandwidth is that of a large
device-to-device copy (read + write). Writes benchmarks/results/fused_gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def timeit(fn, repeats=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def copy_bandwidth() -> float:
    a = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / t


def main() -> None:
    import sys

    sys.path.insert(0, str(HERE))
    from bench_fused_cpu import bert_shapes

    import lamb

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype", choices=["fp32", "bf16-master"], default="fp32")
    ap.add_argument("--out", default=str(HERE / "results" / "fused_gpu"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_gpu.py needs a CUDA device")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    shapes = bert_shapes(args.layers, args.hidden)
    n = sum(torch.Size(s).numel() for s in shapes)

    def params():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(s, device="cuda") * 0.02).to(dtype)) for s in shapes]
        for p in ps:
            p.grad = (torch.randn_like(p, dtype=torch.float32) * 1e-3).to(dtype)
        return ps

    mw = dtype != torch.float32
    runs = {
        "lamb_fused": (lambda ps: lamb.Lamb(ps, lr=1e-3, weight_decay=0.01, fused=True, master_weights=mw), 40),
        "lamb_foreach": (lambda ps: lamb.Lamb(ps, lr=1e-3, weight_decay=0.01, foreach=True, master_weights=mw), None),
        "lars_fused": (lambda ps: lamb.Lars(ps, lr=1.0, weight_decay=1e-4, fused=True, master_weights=mw), 28),
        "torch_adamw_fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 28),
    }
    try:
        from apex.optimizers import FusedLAMB

        runs["apex_fused_lamb"] = (lambda ps: FusedLAMB(ps, lr=1e-3, weight_decay=0.01), 52)
    except ImportError:
        pass
    bw = copy_bandwidth()
    rows = []
    for name, (make, bytes_pp) in runs.items():
        ps = params()
        opt = make(ps)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = timeit(opt.step)
        peak = torch.cuda.max_memory_allocated() - base
        row = dict(backend=name, ms=t * 1e3, step_peak_extra_bytes=peak)
        if bytes_pp:
            row.update(bytes_per_param=bytes_pp, gbps=bytes_pp * n / t / 1e9, fraction_of_copy_bw=bytes_pp * n / t / bw)
        rows.append(row)
        print(row, flush=True)
        del opt, ps
        torch.cuda.empty_cache()
    report = dict(device=torch.cuda.get_device_name(), copy_bandwidth_gbps=bw / 1e9, params=n, dtype=args.dtype,
                  versions=dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version()),
                  rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# Fused kernels on {report['device']}", "",
             f"{n / 1e6:.1f}M params ({args.dtype}), copy bandwidth {bw / 1e9:.0f} GB/s, versions {report['versions']}",
             "", "| backend | ms | GB/s | of copy BW | extra peak MiB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['ms']:.2f} | {r.get('gbps', float('nan')):.0f} | "
                     f"{r.get('fraction_of_copy_bw', float('nan')):.2f} | {r['step_peak_extra_bytes'] / 2**20:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
