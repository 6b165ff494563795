"""Where fused LAMB's step time goes against torch's fused AdamW: the BERT-shaped set split by tensor class.

    python benchmarks/bench_tensor_classes.py [--rounds 9] [--repeats 3] [--blocks 262144,1048576,2097152]

bench_fused_cpu.py times the whole set; this script times each class of its tensors on its own, because the
classes meet the two-pass kernel differently. The word embedding (vocab x hidden, 35% of the parameters) is
larger than any cache block, so pass B reads it from memory a second time (40 bytes an element against AdamW's
28; bench_memory_floor.py measures that floor). The feed-forward and attention matrices fit a block, where pass
A keeps each element's update in a cache-resident scratch and pass B reads w and u from cache, so in the ideal
they cost what AdamW's one pass costs. The rest (position and token-type embeddings, biases, LayerNorm) is small.

For each class, one process times torch.optim.AdamW(fused=True), lamb.Lamb(fused=True) at its default cache
block, with blocking off, and at each ``--blocks`` size, in rounds as bench_fused_cpu.time_rounds does (steps
round-robin, tensors moved to fresh allocations between rounds). Reported per class: AdamW's step, its share of
AdamW's time over all classes, and each LAMB variant's step over AdamW's step in the same round (the median over
rounds, and the range). The whole set is timed the same way, with timm's Lamb, and the summary puts the classes
together: the set's ratio as the classes predict it, the ratio that the ">= 6x timm's Lamb" target asks for on
this machine (timm / AdamW over 6), and what that leaves for the tensors other than the embedding
(embedding share x its ratio + the rest's share x x = the asked ratio).
Writes benchmarks/results/tensor_classes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_fused_cpu import (
    ATTENTION,
    EMBEDDING,
    FEED_FORWARD,
    SMALL,
    bert_roles,
    bert_shapes,
    machine,
    time_rounds,
    training_allocator_state,
    versions,
)

HERE = Path(__file__).resolve().parent
WHOLE = "whole set"


def bert_classes(layers: int, hidden: int, vocab: int = 30522, positions: int = 512) -> dict[str, list[tuple]]:
    """The tensors of ``bert_shapes(layers, hidden)`` grouped by their role in ``bert_roles``."""
    classes: dict[str, list[tuple]] = {role: [] for role in (EMBEDDING, FEED_FORWARD, ATTENTION, SMALL)}
    for role, shape in bert_roles(layers, hidden, vocab, positions):
        classes[role].append(shape)
    return classes


def _over_adamw(rows: dict, backend: str) -> tuple[float, float, float]:
    """Median and range over rounds of backend's best step over AdamW's best step in the same round."""
    per_round = [t / a for t, a in zip(rows[backend]["round_min_ms"], rows["torch_adamw_fused"]["round_min_ms"])]
    return statistics.median(per_round), min(per_round), max(per_round)


def _fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})"


def summarise(classes: dict[str, dict], lamb_rows: list[str]) -> dict:
    """Shares of AdamW's time, the per-class ratios, and what they imply for the set (see the docstring)."""
    parts = {c: r for c, r in classes.items() if c != WHOLE}
    adamw = {c: statistics.median(r["torch_adamw_fused"]["round_min_ms"]) for c, r in parts.items()}
    total = sum(adamw.values())
    share = {c: a / total for c, a in adamw.items()}
    ratio = {c: {b: _over_adamw(r, b) for b in lamb_rows} for c, r in classes.items()}
    out = {"adamw_ms": adamw, "share_of_adamw": share, "over_adamw": ratio}
    out["predicted_default"] = sum(share[c] * ratio[c]["lamb_fused"][0] for c in parts)
    out["predicted_best_block"] = sum(share[c] * min(v[0] for v in ratio[c].values()) for c in parts)
    whole = classes.get(WHOLE, {})
    if "timm_lamb" in whole:
        timm = _over_adamw(whole, "timm_lamb")
        asked = timm[0] / 6.0
        e = share[EMBEDDING]
        out.update({"timm_over_adamw": timm, "asked_over_adamw": asked,
                    "rest_must_average": (asked - e * ratio[EMBEDDING]["lamb_fused"][0]) / (1.0 - e)})
    return out


def report_lines(report: dict, command: str) -> list[str]:
    s, lamb_rows = report["summary"], report["lamb_rows"]
    lines = [
        "# Fused LAMB against torch's fused AdamW, by tensor class of the BERT-shaped set",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {report['machine']}",
        f"Versions: {report['versions']}",
        "",
        (f"{report['rounds']} rounds x {report['repeats']} steps per optimizer, each class in one process, tensors "
         "moved to fresh allocations between rounds (as in bench_fused_cpu.py). Ratios: per round, the LAMB "
         "variant's best step over AdamW's best step; the median over rounds and the range. "
         f"Default cache block: {report['cache_block']} elements; a tensor alone in its block keeps its update "
         f"in the scratch up to {report.get('scratch_limit')} elements (lamb_fused_no_lone_scratch: none does)."),
        "",
        ("| class | elements | tensors | AdamW ms | share of AdamW time | "
         + " | ".join(f"{b} / AdamW" for b in lamb_rows) + " |"),
        "|---|---:|---:|---:|---:|" + "---|" * len(lamb_rows),
    ]
    for c, r in report["classes"].items():
        a = r["torch_adamw_fused"]
        share = s["share_of_adamw"].get(c)
        adamw_ms = statistics.median(a["round_min_ms"])
        lines.append(f"| {c} | {a['params'] / 1e6:.2f}M | {a['tensors']} | {adamw_ms:.2f} | "
                     f"{'' if share is None else f'{share:.1%}'} | "
                     + " | ".join(_fmt(tuple(s["over_adamw"][c][b])) for b in lamb_rows) + " |")
    lines += ["", "Put together (classes weighted by their share of AdamW's time):",
              (f"- the set at the default block, as the classes predict it: {s['predicted_default']:.2f}x AdamW "
               f"(measured on the whole set: {s['over_adamw'][WHOLE]['lamb_fused'][0]:.2f}x); with each class at "
               f"its best setting in this run: {s['predicted_best_block']:.2f}x")]
    if "asked_over_adamw" in s:
        e = EMBEDDING
        lines += [
            (f"- timm's Lamb takes {_fmt(tuple(s['timm_over_adamw']))}x AdamW on the whole set, so >= 6x timm "
             f"asks for fused <= {s['asked_over_adamw']:.2f}x AdamW"),
            f"- with the word embedding at its {s['over_adamw'][e]['lamb_fused'][0]:.2f}x "
            f"({s['share_of_adamw'][e]:.1%} of AdamW's time), the other tensors would have to average "
            + (f"{s['rest_must_average']:.2f}x AdamW (1.00 would be pass B for free)" if s["rest_must_average"] > 0
               else f"{s['rest_must_average']:.2f}x AdamW: below zero, out of reach whatever they do"),
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--blocks", default="262144,1048576,2097152",
                    help="comma-separated cache blocks (elements) timed as extra lamb_fused@<elems> columns")
    ap.add_argument("--no-timm", action="store_true", help="skip timm's Lamb on the whole set")
    ap.add_argument("--out", default=str(HERE / "results" / "tensor_classes"))
    args = ap.parse_args()
    for name in ("rounds", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    try:
        blocks = [int(x) for x in args.blocks.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--blocks must be comma-separated integers (elements), got {args.blocks!r}")
    if any(b < 0 for b in blocks):
        ap.error(f"--blocks must be >= 0 (0: blocking off), got {args.blocks!r}")
    from tqdm import tqdm

    lamb_rows = ["lamb_fused", "lamb_fused_unblocked", "lamb_fused_no_lone_scratch"]
    lamb_rows += [f"lamb_fused@{b}" for b in blocks]
    classes = bert_classes(args.layers, args.hidden)
    classes[WHOLE] = bert_shapes(args.layers, args.hidden)
    training_allocator_state()
    timed = {}
    for c, shapes in tqdm(classes.items(), desc="classes", unit="class"):
        backends = ["torch_adamw_fused"] + lamb_rows + (["timm_lamb"] if c == WHOLE and not args.no_timm else [])
        rows = time_rounds(backends, args.layers, args.hidden, args.rounds, args.repeats, args.seed, shapes)
        failed = {b: r["error"] for b, r in rows.items() if "error" in r}
        if failed and (c != WHOLE or set(failed) != {"timm_lamb"}):
            raise SystemExit(f"{c}: could not time {failed}")
        timed[c] = {b: {k: v for k, v in r.items() if k != "times_ms"} for b, r in rows.items() if "error" not in r}
    import torch

    report = {"machine": machine(), "versions": versions(), "rounds": args.rounds, "repeats": args.repeats,
              "seed": args.seed, "layers": args.layers, "hidden": args.hidden,
              # -1: report the default, keep it
              "cache_block": int(torch.ops.lamb_cpu.set_cache_block(-1)),
              "scratch_limit": int(torch.ops.lamb_cpu.set_scratch_limit(-1)),
              "lamb_rows": lamb_rows, "classes": timed, "summary": summarise(timed, lamb_rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    command = (f"python benchmarks/bench_tensor_classes.py --rounds {args.rounds} --repeats {args.repeats} "
               f"--layers {args.layers} --hidden {args.hidden} --blocks {args.blocks}"
               + (" --no-timm" if args.no_timm else ""))
    lines = report_lines(report, command)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
