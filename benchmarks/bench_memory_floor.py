"""What two-pass LAMB can reach against one-pass AdamW on this machine, for a tensor larger than the caches.

    python benchmarks/bench_memory_floor.py [--elems 15627264] [--rounds 40]

The fused LAMB kernel needs every tensor's norms before it can update it, so a tensor that does not fit in the
last-level cache is read twice: pass A reads g, w, m, v and writes m, v (24 bytes an fp32 element), pass B
reads w, m, v and writes w (16 bytes). AdamW is one pass (reads g, w, m, v, writes w, m, v: 28 bytes). The byte
count alone makes 40 / 28 = 1.43; what a memory system delivers also depends on the mix of reads and writes
and on the number of streams. This script measures that floor directly: the same three loops written as
plainly as possible (C++, OpenMP, ``-O3 -march=native``, the Adam/LAMB math of the real kernels), built here
with torch.utils.cpp_extension, beside torch's fused AdamW and this package's fused LAMB on a tensor of the
same size, steps interleaved in rounds so that load from other jobs hits them alike.

Reported, as medians over rounds of ratios within a round: plain pass A + plain pass B over the plain AdamW
loop (the floor for two passes on this machine), torch's fused AdamW over the plain AdamW loop, the fused LAMB
kernel over torch's fused AdamW, and each loop's GB/s. The default size is BERT's word embedding
(30522 x 512), the one tensor of the benchmark set in bench_fused_cpu.py that no cache block holds.
Writes benchmarks/results/memory_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_fused_cpu import machine, versions

HERE = Path(__file__).resolve().parent

# The three loops: Adam moments, then AdamW's update (one pass), or LAMB's u and norms (pass A, the moments
# written back) and LAMB's update with a given step s = lr * ||w|| / ||u|| (pass B, u recomputed from m, v).
SOURCE = r"""
#include <torch/extension.h>
#include <cmath>

static float* f(torch::Tensor t) { return t.data_ptr<float>(); }

void adamw(torch::Tensor g_, torch::Tensor w_, torch::Tensor m_, torch::Tensor v_, double lr, double wd) {
  const float* __restrict__ g = f(g_); float* __restrict__ w = f(w_); float* __restrict__ m = f(m_);
  float* __restrict__ v = f(v_); const int64_t n = g_.numel(); const float a = lr, d = 1.0f - lr * wd;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float mi = 0.9f * m[i] + 0.1f * g[i], vi = 0.999f * v[i] + 0.001f * g[i] * g[i];
    m[i] = mi; v[i] = vi;
    w[i] = d * w[i] - a * mi / (std::sqrt(vi) + 1e-6f);
  }
}

std::vector<double> lamb_a(torch::Tensor g_, torch::Tensor w_, torch::Tensor m_, torch::Tensor v_, double wd) {
  const float* __restrict__ g = f(g_); const float* __restrict__ w = f(w_); float* __restrict__ m = f(m_);
  float* __restrict__ v = f(v_); const int64_t n = g_.numel(); const float k = wd;
  double sw = 0, su = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : sw, su)
  for (int64_t i = 0; i < n; ++i) {
    const float mi = 0.9f * m[i] + 0.1f * g[i], vi = 0.999f * v[i] + 0.001f * g[i] * g[i];
    m[i] = mi; v[i] = vi;
    const float u = mi / (std::sqrt(vi) + 1e-6f) + k * w[i];
    sw += w[i] * w[i]; su += u * u;
  }
  return {sw, su};
}

void lamb_b(torch::Tensor w_, torch::Tensor m_, torch::Tensor v_, double s, double wd) {
  float* __restrict__ w = f(w_); const float* __restrict__ m = f(m_); const float* __restrict__ v = f(v_);
  const int64_t n = w_.numel(); const float a = s, k = wd;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) w[i] -= a * (m[i] / (std::sqrt(v[i]) + 1e-6f) + k * w[i]);
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    build_dir = Path(tempfile.gettempdir()) / "lamb_memory_floor"
    build_dir.mkdir(exist_ok=True)
    return load_inline("lamb_memory_floor", SOURCE, functions=["adamw", "lamb_a", "lamb_b"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elems", type=int, default=30522 * 512, help="elements of the one fp32 tensor")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default=str(HERE / "results" / "memory_floor"))
    args = ap.parse_args()
    if args.elems < 1 or args.rounds < 1:
        ap.error(f"--elems and --rounds must be at least 1, got {args.elems} and {args.rounds}")

    import torch
    from tqdm import tqdm

    import lamb

    ext = build()
    torch.manual_seed(0)
    n = args.elems
    g, w = torch.randn(n) * 1e-3, torch.randn(n) * 0.02
    m, v = torch.zeros(n), torch.zeros(n)
    p_adamw, p_lamb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    p_adamw.grad, p_lamb.grad = g.clone(), g.clone()
    adamw = torch.optim.AdamW([p_adamw], lr=1e-3, weight_decay=0.01, fused=True)
    fused = lamb.Lamb([p_lamb], lr=1e-3, weight_decay=0.01, eps=1e-6, fused=True)

    def plain_two_pass():
        sw, su = ext.lamb_a(g, w, m, v, 0.01)
        ext.lamb_b(w, m, v, 1e-3 * (sw / su) ** 0.5 if su > 0 else 0.0, 0.01)

    steps = {
        "plain_adamw": lambda: ext.adamw(g, w, m, v, 1e-3, 0.01),
        "plain_lamb_a": lambda: ext.lamb_a(g, w, m, v, 0.01),
        "plain_lamb_b": lambda: ext.lamb_b(w, m, v, 1e-9, 0.01),
        "plain_lamb_two_pass": plain_two_pass,
        "torch_adamw_fused": adamw.step,
        "lamb_fused": fused.step,
    }
    for step in steps.values():  # warm-up: state allocation, kernel load
        step()
    times = {k: [] for k in steps}
    for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # neither always first after another
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    nbytes = {"plain_adamw": 28, "plain_lamb_a": 24, "plain_lamb_b": 16, "plain_lamb_two_pass": 40,
              "torch_adamw_fused": 28, "lamb_fused": 40}
    rows = [dict(name=k, bytes_per_elem=nbytes[k], median_ms=statistics.median(t) * 1e3, min_ms=min(t) * 1e3,
                 gb_per_s=nbytes[k] * n / min(t) / 1e9) for k, t in times.items()]
    ratios = {
        "plain_two_pass_over_plain_adamw": ratio("plain_lamb_two_pass", "plain_adamw"),
        "plain_a_plus_b_over_plain_adamw": statistics.median(
            (a + b) / c for a, b, c in zip(times["plain_lamb_a"], times["plain_lamb_b"], times["plain_adamw"])),
        "torch_adamw_fused_over_plain_adamw": ratio("torch_adamw_fused", "plain_adamw"),
        "lamb_fused_over_plain_two_pass": ratio("lamb_fused", "plain_lamb_two_pass"),
        "lamb_fused_over_torch_adamw_fused": ratio("lamb_fused", "torch_adamw_fused"),
    }
    report = dict(machine=machine(), versions=versions(), elems=n, rounds=args.rounds, rows=rows, ratios=ratios)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Memory floor: two passes against one, for a tensor larger than the caches",
        "",
        f"Command: `python benchmarks/bench_memory_floor.py --elems {n} --rounds {args.rounds}`",
        "",
        f"One fp32 tensor of {n:,} elements ({n * 4 / 2**20:.0f} MiB a buffer). Machine: {report['machine']}",
        f"Versions: {report['versions']}",
        "",
        ("plain_*: the loops as plainly written as possible (C++, OpenMP, -O3 -march=native), the Adam/LAMB math "
         "of the real kernels. Ratios: the median over rounds of the ratio within a round."),
        "",
        "| step | bytes/elem | min ms | median ms | GB/s (min) |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['name']} | {r['bytes_per_elem']} | {r['min_ms']:.2f} | {r['median_ms']:.2f} | {r['gb_per_s']:.1f} |"
          for r in rows],
        "",
        (f"- plain two-pass LAMB / plain AdamW = {ratios['plain_two_pass_over_plain_adamw']:.2f} "
         f"(pass A + pass B timed apart: {ratios['plain_a_plus_b_over_plain_adamw']:.2f}; bytes alone: 40/28 = 1.43)"),
        f"- torch fused AdamW / plain AdamW = {ratios['torch_adamw_fused_over_plain_adamw']:.2f}",
        f"- lamb fused / plain two-pass LAMB = {ratios['lamb_fused_over_plain_two_pass']:.2f}",
        f"- lamb fused / torch fused AdamW = {ratios['lamb_fused_over_torch_adamw_fused']:.2f}",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
