"""Time one optimizer step on CPU for a BERT-shaped parameter set: fused LAMB vs its peers.

    python benchmarks/bench_fused_cpu.py [--rounds 5] [--repeats 3] [--layers 9] [--hidden 512] [--no-compiled]

Peers in the same run: lamb.Lamb fused (and fused with its cache blocking off, and with no scratch for a tensor
alone in its block) / foreach / reference, torch.compile of the foreach step, timm's Lamb, torch-optimizer's Lamb,
and torch.optim.AdamW(fused=True) as the yardstick (one pass, 28 bytes a parameter; fused LAMB moves 40).

Times: every backend in one process, in rounds. Within a round the backends are stepped round-robin
(``--repeats`` steps each), so load from other jobs on a shared machine hits them alike. Between rounds every
backend's tensors (parameters, gradients, optimizer state) move to fresh allocations, the backends taking
turns in a shuffled order: where a tensor's pages land in memory changes a memory-bound step by up to ~10%
on these VMs (two identical fused optimizers created at different times in one process differed by 9%), so
one allocation per backend would mix that luck into the comparison. The process first puts glibc's allocator
in the state a training process has it (training_allocator_state: temporaries come from the heap, not from
fresh mmaps), which the peers that allocate every step depend on. Reported per backend: the min and median
step over all rounds, and per round its best step over lamb_fused's best step in the same round ("paired"),
as the median over rounds with the range. Memory: each backend again in its own subprocess, recording the
peak resident memory added by stepping (VmHWM after two steps minus VmRSS before, the peak reset through
/proc/self/clear_refs). Writes benchmarks/results/fused_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = ["lamb_fused", "lamb_fused_unblocked", "lamb_fused_no_lone_scratch", "lamb_foreach", "lamb_compiled",
            "lamb_reference", "timm_lamb", "torch_optimizer_lamb", "torch_adamw_fused"]


# Roles of bert_roles' tensors (bench_tensor_classes.py times each role on its own).
EMBEDDING, FEED_FORWARD, ATTENTION, SMALL = (
    "word embedding", "feed-forward matrices", "attention matrices (+ pooler)",
    "the rest (position/type embeddings, biases, LayerNorm)")


def bert_roles(layers: int, hidden: int, vocab: int = 30522,
               positions: int = 512) -> list[tuple[str, tuple[int, ...]]]:
    """(role, shape) of each parameter of a BERT encoder, in model order."""
    inter, h = 4 * hidden, hidden
    out = [(EMBEDDING, (vocab, h)), (SMALL, (positions, h)), (SMALL, (2, h)), (SMALL, (h,)), (SMALL, (h,))]
    for _ in range(layers):
        out += [(ATTENTION, (h, h)), (SMALL, (h,))] * 4  # q, k, v, attention output
        out += [(SMALL, (h,)), (SMALL, (h,))]             # LayerNorm
        out += [(FEED_FORWARD, (inter, h)), (SMALL, (inter,)), (FEED_FORWARD, (h, inter)), (SMALL, (h,))]
        out += [(SMALL, (h,)), (SMALL, (h,))]             # LayerNorm
    out += [(ATTENTION, (h, h)), (SMALL, (h,))]           # pooler
    return out


def bert_shapes(layers: int, hidden: int, vocab: int = 30522, positions: int = 512) -> list[tuple[int, ...]]:
    return [shape for _, shape in bert_roles(layers, hidden, vocab, positions)]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def make(backend: str, layers: int, hidden: int, shapes: list[tuple[int, ...]] | None = None):
    """(step function, parameters, optimizer) for one backend on its own copy of the parameters.

    The parameters have ``shapes``, by default the BERT-shaped set ``bert_shapes(layers, hidden)``.
    """
    import torch

    torch.manual_seed(0)
    shapes = bert_shapes(layers, hidden) if shapes is None else shapes
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    kw = dict(lr=1e-3, weight_decay=0.01)
    step = None
    if backend.startswith("lamb_"):
        import lamb

        # The fused kernel with a set cache block: lamb_fused@<elems> (--blocks sweeps it), and
        # lamb_fused_unblocked (block 0, blocking off: what blocking gains); lamb_fused_no_lone_scratch: the
        # default block, but a tensor alone in its block recomputes u in pass B (scratch limit 0: what the
        # scratch of such tensors gains).  -1: the kernel's default.
        block, limit = {"lamb_fused_unblocked": (0, -1), "lamb_fused_no_lone_scratch": (-1, 0)}.get(
            backend, (int(backend.split("@")[1]), -1) if backend.startswith("lamb_fused@") else (None, None))
        flags = dict(fused=True) if block is not None else {
            "lamb_fused": dict(fused=True), "lamb_foreach": dict(foreach=True),
            "lamb_compiled": dict(foreach=True), "lamb_reference": dict(foreach=False)}[backend]
        opt = lamb.Lamb(params, eps=1e-6, **kw, **flags)
        step = opt.step
        if backend == "lamb_compiled":
            step = torch.compile(opt.step)
        if block is not None:
            from lamb import ops

            ops.load_cpu()  # the wrapper calls the kernel's knobs before the first step loads it

            def step(_step=opt.step, _block=block, _limit=limit):
                prev = (torch.ops.lamb_cpu.set_cache_block(_block), torch.ops.lamb_cpu.set_scratch_limit(_limit))
                try:
                    _step()
                finally:
                    torch.ops.lamb_cpu.set_cache_block(prev[0])
                    torch.ops.lamb_cpu.set_scratch_limit(prev[1])
    elif backend == "timm_lamb":
        from bench_step import _load_timm_lamb  # timm's Lamb without torchvision (see bench_step.py)

        opt = _load_timm_lamb()(params, eps=1e-6, **kw)
    elif backend == "torch_optimizer_lamb":
        import torch_optimizer

        opt = torch_optimizer.Lamb(params, eps=1e-6, **kw)
    elif backend == "torch_adamw_fused":
        opt = torch.optim.AdamW(params, fused=True, **kw)
    else:
        raise ValueError(backend)
    step = step or opt.step
    step()  # warm-up: state allocation, kernel build/load, compilation
    if backend == "lamb_compiled":
        step()  # the first call compiles the state-initialising step; the steady-state graph compiles here
    return step, params, opt


def training_allocator_state() -> None:
    """Put glibc's allocator where a training process has it: its mmap threshold raised to ~32 MiB.

    glibc serves a large allocation with a fresh mmap (new pages, a page fault each) until a freed mmapped block
    raises its threshold to that block's size, at most 32 MiB; from then on temporaries up to that size come from
    the heap and are reused. Any training step frees activations that large, but a fresh benchmark process may
    not have, and then peers that allocate temporaries every step (timm, torch-optimizer, the foreach and
    reference backends) run ~15-25% slower than in training (timm's Lamb on the Zen 1 VM: ~440 ms against
    ~345 ms). The fused kernels allocate nothing per step and are not affected. Freeing one block just under 32 MiB
    sets it.
    """
    import torch

    block = torch.empty((32 << 20) // 4 - 4096)
    block.fill_(0.0)  # touch the pages, as a real tensor's would be
    del block


def relocate(params, opt) -> None:
    """Move every tensor of one backend (parameters, gradients, optimizer state) to a fresh allocation.

    ``set_`` keeps each tensor object (the optimizer and a compiled step hold them) and swaps its storage; the
    old storage is freed once the new one exists, so the next backend's allocations may land there.
    """
    import torch

    with torch.no_grad():
        for p in params:
            p.set_(p.detach().clone())
            p.grad.set_(p.grad.clone())
            for v in opt.state[p].values():
                if torch.is_tensor(v):
                    v.set_(v.clone())


def memory_one(backend: str, layers: int, hidden: int, repeats: int) -> dict:
    """In a fresh process: the peak resident memory that stepping adds (VmHWM after minus VmRSS before)."""
    training_allocator_state()
    step, params, _ = make(backend, layers, hidden)
    n, nt = sum(p.numel() for p in params), len(params)
    rss0 = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status("VmHWM") - rss0 if hwm_reset else None
    return dict(backend=backend, params=n, tensors=nt, step_peak_extra_bytes=peak)


def time_rounds(backends: list[str], layers: int, hidden: int, rounds: int, repeats: int,
                seed: int = 0, shapes: list[tuple[int, ...]] | None = None) -> dict[str, dict]:
    """All backends in one process: ``rounds`` rounds of ``repeats`` round-robin steps each, every backend's
    tensors relocated (in a shuffled order) between rounds; see the module docstring. ``shapes``: as in make."""
    built, out = {}, {}
    for b in backends:
        try:
            built[b] = make(b, layers, hidden, shapes)
        except Exception as e:  # noqa: BLE001 - a peer that is not installed
            out[b] = dict(backend=b, error=f"{type(e).__name__}: {e}")
    rng = random.Random(seed)
    names = list(built)
    times: dict[str, list[list[float]]] = {b: [] for b in names}
    for r in range(rounds):
        if r > 0:
            order = names[:]
            rng.shuffle(order)
            for b in order:
                _, params, opt = built[b]
                relocate(params, opt)
                built[b][0]()  # one untimed step: the new pages' first-touch faults are not a step's cost
        for b in names:
            times[b].append([])
        order = names[:]
        rng.shuffle(order)  # who steps first in a round changes too
        for _ in range(repeats):
            for b in order:
                t0 = time.perf_counter()
                built[b][0]()
                times[b][-1].append(time.perf_counter() - t0)
    for b in names:
        _, params, _ = built[b]
        flat = sorted(t for rt in times[b] for t in rt)
        round_min = [min(rt) for rt in times[b]]
        out[b] = dict(backend=b, params=sum(p.numel() for p in params), tensors=len(params),
                      min_ms=flat[0] * 1e3, median_ms=statistics.median(flat) * 1e3, rounds=rounds,
                      repeats=repeats, round_min_ms=[t * 1e3 for t in round_min],
                      times_ms=[[t * 1e3 for t in rt] for rt in times[b]])
    if "lamb_fused" in names:
        ref = out["lamb_fused"]["round_min_ms"]
        for b in names:
            # Paired: this backend's best step over lamb_fused's best step in the same round (same allocations
            # round, same load from other jobs), then the median and the range over rounds.
            per_round = [t / f for t, f in zip(out[b]["round_min_ms"], ref)]
            out[b]["paired_over_fused"] = statistics.median(per_round)
            out[b]["paired_over_fused_range"] = [min(per_round), max(per_round)]
    return out


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("timm", "torch-optimizer", "lamb"):
        try:
            out[mod.replace("-", "_")] = version(mod)
        except PackageNotFoundError:
            out[mod.replace("-", "_")] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers: "AMD EPYC" alone does not tell Zen 1 from Zen 4."""
    info = {}
    try:  # the first processor's fields
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = info.get("model name", "unknown")
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return cpu


def l3_size() -> str:
    """The L3 that cpu0 shares, as sysfs gives it ("32768K"): what sets the kernel's default cache block
    (cuda/lamb_cpu.cpp reads the same files)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                return (index / "size").read_text().strip()
        except OSError:
            pass
    return "unknown"


def machine() -> dict:
    import torch

    cpu, l3 = cpu_model(), l3_size()
    try:  # the loops the fused kernel picked from cpuid (0 baseline, 1 AVX2, 2 AVX-512)
        from lamb import ops

        ops.load_cpu()
        kernel_isa = {0: "baseline", 1: "AVX2", 2: "AVX-512"}[int(torch.ops.lamb_cpu.set_isa(-1))]
    except Exception as e:  # noqa: BLE001
        kernel_isa = f"unavailable ({type(e).__name__})"
    return {"cpu": cpu, "l3": l3, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "lamb_cpu_isa": kernel_isa,
            "platform": platform.platform()}


def _paired(r: dict, invert: bool = False) -> str:
    """The paired ratio with its range over rounds, e.g. '1.41 (1.37-1.46)'; invert: lamb_fused over r."""
    med, (lo, hi) = r["paired_over_fused"], r["paired_over_fused_range"]
    if invert:
        med, lo, hi = 1 / med, 1 / hi, 1 / lo
    return f"{med:.2f} ({lo:.2f}-{hi:.2f})"


def report_lines(report: dict, command: str) -> list[str]:
    """The Markdown report: the table and the issue's targets, from the rows of time_rounds."""
    rows = report["rows"]
    by = {r["backend"]: r for r in rows if "min_ms" in r}
    n = next((r["params"] for r in rows if "params" in r), 0)
    nt = next((r["tensors"] for r in rows if "tensors" in r), 0)
    first = next(iter(by.values()), {})
    lines = [
        "# Fused CPU LAMB: one optimizer step, BERT-shaped parameters",
        "",
        f"Command: `{command}`",
        "",
        f"Parameters: {n / 1e6:.1f}M fp32 in {nt} tensors (BERT-shaped: vocab 30522, hidden "
        f"{report['hidden']}, {report['layers']} layers).",
        f"Machine: {report['machine']}",
        f"Versions: {report['versions']}",
        "",
        report["note"] + ".",
        "",
        f"{first.get('rounds', 0)} rounds x {first.get('repeats', 0)} steps per backend, every backend's tensors "
        "moved to fresh allocations (in a shuffled order) between rounds. min / median: over all steps. "
        "x fused: min over min. paired: per round, this backend's best step over lamb_fused's best step in "
        "that round; the median over rounds, and the range.",
        "",
        "| backend | min ms | median ms | x fused | x fused, paired (range) | extra peak RSS during step (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "min_ms" not in r:
            lines.append(f"| {r['backend']} | failed: {r['error']} | | | | |")
            continue
        peak = r.get("step_peak_extra_bytes")
        paired = _paired(r) if "paired_over_fused" in r else "n/a"
        lines.append(f"| {r['backend']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
                     f"{report['ratios'].get(r['backend'] + '_over_fused', float('nan')):.2f} | {paired} | "
                     f"{'n/a' if peak is None else f'{peak / 2**20:.1f}'} |")
    if "lamb_fused" in by:
        f = by["lamb_fused"]["min_ms"]
        lines += ["", "Targets (paired median, range over rounds in brackets):"]
        if "timm_lamb" in by:
            t = by["timm_lamb"]
            lines.append(f"- timm Lamb / fused = {_paired(t)} paired, {t['min_ms'] / f:.2f} min over min "
                         "(target >= 6)")
        if "torch_adamw_fused" in by:
            a = by["torch_adamw_fused"]
            lines.append(f"- fused / torch AdamW(fused=True) = {_paired(a, invert=True)} paired, "
                         f"{f / a['min_ms']:.2f} min over min (target <= 1.6; bytes 40 vs 28 = 1.43 without "
                         "cache blocking)")
        if "lamb_fused_unblocked" in by:
            u = by["lamb_fused_unblocked"]
            lines.append(f"- cache blocking: unblocked / blocked = {_paired(u)} paired, {u['min_ms'] / f:.2f} "
                         f"min over min (default block: {report['cache_block']} elements; pass B finds w and u "
                         "in cache for the tensors of a block)")
        if "lamb_fused_no_lone_scratch" in by:
            u = by["lamb_fused_no_lone_scratch"]
            lines.append(f"- scratch of a tensor alone in its block: without / with = {_paired(u)} paired, "
                         f"{u['min_ms'] / f:.2f} min over min (default limit: {report.get('scratch_limit')} "
                         "elements; larger tensors recompute u in pass B)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds, with fresh allocations between them")
    ap.add_argument("--repeats", type=int, default=3, help="steps per backend per round")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled orders")
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--backends", nargs="*", default=BACKENDS)
    ap.add_argument("--no-compiled", action="store_true", help="skip torch.compile (slow to compile on few cores)")
    ap.add_argument("--blocks", default="", help="comma-separated cache blocks (elements) to time as extra "
                    "lamb_fused@<elems> rows, e.g. 262144,524288,1048576,2097152,4194304")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "fused_cpu"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(memory_one(args.one, args.layers, args.hidden, 2)))
        return
    for name in ("rounds", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    backends = [b for b in args.backends if not (args.no_compiled and b == "lamb_compiled")]
    backends += [f"lamb_fused@{int(x)}" for x in args.blocks.split(",") if x.strip()]
    training_allocator_state()
    timed = time_rounds(backends, args.layers, args.hidden, args.rounds, args.repeats, args.seed)
    rows = []
    for b in backends:
        row = timed[b]
        if "error" not in row and "@" not in b:  # memory: the block sweep rows share lamb_fused's
            cmd = [sys.executable, __file__, "--one", b, "--layers", str(args.layers), "--hidden", str(args.hidden)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            mem = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}
            row["step_peak_extra_bytes"] = mem.get("step_peak_extra_bytes")
        rows.append(row)
        print({k: v for k, v in row.items() if k != "times_ms"}, flush=True)

    by = {r["backend"]: r for r in rows if "min_ms" in r}
    ratios = {}
    if "lamb_fused" in by:
        f = by["lamb_fused"]["min_ms"]
        for name, r in by.items():
            ratios[f"{name}_over_fused"] = r["min_ms"] / f
    import torch

    try:  # -1 returns the current (default) value and keeps it
        default_block = torch.ops.lamb_cpu.set_cache_block(-1)
        scratch_limit = torch.ops.lamb_cpu.set_scratch_limit(-1)
    except (AttributeError, RuntimeError):  # the fused kernel was not among the backends
        default_block = scratch_limit = None
    report = dict(machine=machine(), versions=versions(), rows=rows, ratios=ratios, cache_block=default_block,
                  scratch_limit=scratch_limit,
                  layers=args.layers, hidden=args.hidden, rounds=args.rounds, repeats=args.repeats, seed=args.seed,
                  note=("glibc's mmap threshold raised first, as in a training process; one warm-up step per "
                        "backend (and one after each relocation); the machine is shared "
                        "with other jobs, so absolute times are noisy (ratios within one run are what to compare)"),
                  bytes_per_param={"lamb_fused": 40, "torch_adamw_fused": 28})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    command = (f"python benchmarks/bench_fused_cpu.py --rounds {args.rounds} --repeats {args.repeats} "
               f"--layers {args.layers} --hidden {args.hidden}"
               + (f" --backends {' '.join(args.backends)}" if args.backends != BACKENDS else "")
               + (" --no-compiled" if args.no_compiled else "")
               + (f" --blocks {args.blocks}" if args.blocks else ""))
    lines = report_lines(report, command)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
