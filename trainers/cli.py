"""``python -m trainers {train,check,prepare} RECIPE.yaml [key.path=value ...]``."""

from __future__ import annotations

import argparse
import os
import sys


def _strip_local_rank(argv: list[str]) -> list[str]:
    """Accept the launcher's ``--local_rank=N`` / ``--local_rank N`` (or ``--local-rank``) anywhere."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank", "--local-rank")):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "0")
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="python -m trainers", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a recipe (resumes from the latest checkpoint in train.output_dir)")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key.path=value (YAML value)")
    t.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this optimizer step (the schedule still spans the whole run)")
    c = sub.add_parser("check", help="validate a recipe and take one optimizer step on CPU")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    pr = sub.add_parser("prepare", help="tokenise a text corpus into the shard cache / check an image folder layout")
    pr.add_argument("recipe")
    pr.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from .recipe import RecipeError

    try:
        if args.command == "check":
            from .trainer import check

            return check(args.recipe, args.overrides)
        if args.command == "prepare":
            from .prepare import prepare

            return prepare(args.recipe, args.overrides)
        from .trainer import train

        return train(args.recipe, args.overrides, stop_at_step=args.stop_at_step)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
