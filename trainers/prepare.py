"""``python -m trainers prepare RECIPE.yaml``: make (or check) the data a recipe reads, before the launch.

Text (BERT): reads the corpus, trains or loads the WordPiece tokenizer, packs ``data.seq_len`` sequences and
writes the memory-mapped ``.npy`` shards under ``data.cache_dir`` (the same cache ``train`` reads, keyed by
the data fields, so ``train`` finds it ready). Run it once per phase (the sequence length is part of the key).

Images (ResNet): checks the layout the recipe names: for ``imagefolder``, ``train_dir/<class>/<image>`` and
``eval_dir/<class>/<image>`` with the same class folders, as many as ``data.num_classes``; for ``idx``, that
images and labels agree; ``hf`` datasets are fetched by ``datasets`` at the first ``train``.

Exit status 0 when the data is ready, 1 with the problems listed otherwise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .recipe import load_recipe

_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def prepare(recipe_path: str, overrides: list[str]) -> int:
    recipe = load_recipe(recipe_path, overrides)
    d = recipe["data"]
    t0 = time.perf_counter()
    if recipe["model"]["type"] == "resnet":
        problems = check_images(d)
        for p in problems:
            print(f"error: {p}")
        if problems:
            return 1
        print(f"images ready [{time.perf_counter() - t0:.1f} s]")
        return 0
    from .data_text import prepare_corpus

    cache = Path(d["cache_dir"] or Path(recipe["train"]["output_dir"]) / "cache")
    nsp = recipe["model"]["type"] == "bert_pretraining"
    tok, train, ev = prepare_corpus(d, cache, nsp, True, lambda: None)
    print(f"text ready in {cache}: {len(train)} training and {len(ev)} evaluation sequences of {d['seq_len']} "
          f"tokens ({'sentence pairs + NSP' if nsp else 'masked LM'}), vocabulary {tok.get_vocab_size()} "
          f"[{time.perf_counter() - t0:.1f} s]")
    return 0


def _classes(root: str) -> tuple[list[str], dict[str, int]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    counts = {}
    for c in classes:
        counts[c] = sum(1 for _, _, names in os.walk(os.path.join(root, c)) for n in names
                        if n.lower().endswith(_IMG_EXT))
    return classes, counts


def check_images(d: dict) -> list[str]:
    """Problems with the image data the recipe names (empty when it is ready)."""
    from .data_text import resolve_path

    problems = []
    if d["format"] == "imagefolder":
        seen = {}
        for key in ("train_dir", "eval_dir"):
            if not d[key]:
                continue
            root = resolve_path(d[key])
            if not os.path.isdir(root):
                problems.append(f"data.{key}: {root} is not a folder")
                continue
            classes, counts = _classes(root)
            empty = [c for c in classes if counts[c] == 0]
            n = sum(counts.values())
            print(f"data.{key}: {root}: {len(classes)} class folders, {n} images")
            if len(classes) != d["num_classes"]:
                problems.append(f"data.{key}: {root} has {len(classes)} class folders, data.num_classes is "
                                f"{d['num_classes']}")
            if empty:
                problems.append(f"data.{key}: class folders without images: {empty[:5]}")
            seen[key] = classes
        if len(seen) == 2 and seen["train_dir"] != seen["eval_dir"]:
            diff = sorted(set(seen["train_dir"]) ^ set(seen["eval_dir"]))
            problems.append(f"data.eval_dir: its class folders differ from data.train_dir's (e.g. {diff[:5]}); "
                            f"labels are the sorted folder names, so both need the same set")
    elif d["format"] == "idx":
        from .data_image import read_idx

        for split in ("train", "eval"):
            if not d[f"{split}_images"]:
                continue
            try:
                x, y = read_idx(d[f"{split}_images"]), read_idx(d[f"{split}_labels"])
            except (OSError, ValueError) as e:
                problems.append(f"data.{split}_images: {e}")
                continue
            print(f"data.{split}: {len(x)} images {tuple(x.shape[1:])}, {len(set(y.tolist()))} labels")
            if len(x) != len(y):
                problems.append(f"data.{split}_labels: {len(y)} labels for {len(x)} images")
            if len(y) and int(y.max()) >= d["num_classes"]:
                problems.append(f"data.{split}_labels: label {int(y.max())} >= data.num_classes {d['num_classes']}")
    else:
        print(f"data.hf_dataset: {d['hf_dataset']} is fetched by datasets at the first train")
    return problems
