"""Every recipe in recipes/ loads and validates; the full-size ones pass ``check`` and ``prepare`` on tiny data.

The full-size recipes are checked with their data overridden (``key.path=value``) to small local files this
test makes, and the global batch shrunk to the tiny training set (micro-batch 1). ResNet-50 runs at its real
size. BERT-Large at seq 512 takes ~1-2 minutes on two cores for one step, so the default run checks the
BERT recipes with 2 encoder layers (``model.config.num_hidden_layers=2``, everything else as written) and
the real size is behind the ``slow`` marker. Each header's batch arithmetic and cluster are checked against
the recipe's own numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import write_text_corpus

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted((ROOT / "recipes").rglob("*.yaml"))
FULL = sorted((ROOT / "recipes").glob("*.yaml"))
BERT = [f for f in FULL if f.name.startswith("bert")]
RESNET = [f for f in FULL if f.name.startswith("resnet")]


def test_recipes_found():
    assert len(FULL) >= 4 and {f.name for f in FULL} >= {
        "bert_large_lamb_phase1.yaml", "bert_large_lamb_phase2.yaml", "resnet50_lars_32k.yaml",
        "resnet50_lamb_32k.yaml"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_loads_and_validates(path):
    from trainers.recipe import load_recipe

    load_recipe(path)


def _num(s: str) -> int:
    return int(s.replace(",", ""))


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.name)
def test_header_batch_arithmetic_and_launch(path):
    from trainers.recipe import batch_arithmetic, load_recipe

    r = load_recipe(path)
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    m = re.search(r"Batch arithmetic: global ([\d,]+) = micro-batch (\d+) x accumulation (\d+) x world size (\d+)",
                  header)
    assert m, f"{path.name}: no 'Batch arithmetic: global G = micro-batch M x accumulation A x world size W' line"
    g, mb, acc, world = map(_num, m.groups())
    assert g == mb * acc * world
    assert (g, mb, world) == (r["batch"]["global_batch"], r["batch"]["micro_batch"], r["batch"]["world_size"])
    assert batch_arithmetic(r, world) == (acc, None)
    c = re.search(r"Cluster: (\d+) nodes x (\d+) \S+ = (\d+) GPUs", header)
    assert c, f"{path.name}: no 'Cluster: N nodes x G <GPU> = W GPUs' line"
    nodes, gpus, total = map(int, c.groups())
    assert nodes * gpus == total == world
    launch = re.search(r"deepspeed --hostfile \S+ --num_nodes (\d+) --num_gpus (\d+) --module trainers train (\S+)",
                       header)
    assert launch and (int(launch[1]), int(launch[2])) == (nodes, gpus)
    assert launch[3] == f"recipes/{path.name}"
    assert re.search(r"^# Sources \(.+\):", header, re.M), f"{path.name}: no 'Sources (...):' line naming where the numbers come from"


def test_bert_phase2_starts_from_phase1():
    from trainers.recipe import load_recipe

    p1 = load_recipe(ROOT / "recipes" / "bert_large_lamb_phase1.yaml")
    p2 = load_recipe(ROOT / "recipes" / "bert_large_lamb_phase2.yaml")
    assert p2["train"]["init_from"] == p1["train"]["output_dir"]
    assert p1["model"] == p2["model"]  # same architecture, 512 positions in both
    assert p1["model"]["config"]["max_position_embeddings"] == 512
    assert p1["optimizer"]["options"] == p2["optimizer"]["options"]
    assert (p1["data"]["seq_len"], p2["data"]["seq_len"]) == (128, 512)


# ------------------------------------------------------------------------------------------ tiny data
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    corpus = write_text_corpus(tmp / "corpus.txt")
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for c in ("n01", "n02"):
            d = tmp / "imagenet" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp, corpus


def _bert_overrides(tmp, corpus, name):
    return [f"data.train_files={corpus}", "data.tokenizer=null", "data.vocab_size=200", "data.eval_fraction=0",
            f"data.cache_dir={tmp / 'cache'}", f"train.output_dir={tmp / ('out_' + name)}",
            "batch.global_batch=4", "batch.micro_batch=1", "batch.world_size=4", "data.num_workers=0"]


def _image_overrides(tmp, name):
    return [f"data.train_dir={tmp / 'imagenet' / 'train'}", f"data.eval_dir={tmp / 'imagenet' / 'val'}",
            f"train.output_dir={tmp / ('out_' + name)}", "batch.global_batch=8", "batch.micro_batch=1",
            "batch.world_size=8", "data.num_workers=0"]


def _cli(args, capsys):
    from trainers.cli import main

    rc = main(args)
    return rc, capsys.readouterr().out


def _check_ok(out, recipe):
    assert "recipe valid" in out and "dry run: one optimizer step with micro-batch 1" in out, out
    assert "deepspeed config:" in out


@pytest.mark.parametrize("path", BERT, ids=lambda p: p.name)
def test_bert_prepare_and_check(tiny, path, capsys):
    tmp, corpus = tiny
    ov = _bert_overrides(tmp, corpus, path.stem)
    rc, out = _cli(["prepare", str(path), *ov], capsys)
    assert rc == 0 and "text ready in" in out
    assert list((tmp / "cache").glob("text-*/train_00000.npy"))
    rc, out = _cli(["check", str(path), *ov, "model.config.num_hidden_layers=2"], capsys)
    assert rc == 0
    _check_ok(out, path)
    assert "BertForPreTraining" in out


@pytest.mark.slow
@pytest.mark.parametrize("path", BERT, ids=lambda p: p.name)
def test_bert_large_check_real_size(tiny, path, capsys):
    tmp, corpus = tiny
    rc, out = _cli(["check", str(path), *_bert_overrides(tmp, corpus, path.stem)], capsys)
    assert rc == 0
    _check_ok(out, path)
    assert "BertForPreTraining, 30" in out  # ~305 M parameters with the tiny test vocabulary


@pytest.mark.parametrize("path", RESNET, ids=lambda p: p.name)
def test_resnet_prepare_and_check(tiny, path, capsys):
    tmp, _ = tiny
    ov = _image_overrides(tmp, path.stem)
    rc, out = _cli(["prepare", str(path), *ov, "data.num_classes=2"], capsys)
    assert rc == 0 and "2 class folders, 8 images" in out and "images ready" in out
    rc, out = _cli(["prepare", str(path), *ov], capsys)  # the recipe's 1000 classes: the layout is refused
    assert rc == 1 and "has 2 class folders, data.num_classes is 1000" in out
    rc, out = _cli(["check", str(path), *ov], capsys)  # ResNet-50 at its real size
    assert rc == 0
    _check_ok(out, path)
    assert "ResNetForImageClassification, 25.5" in out


def test_prepare_finds_mismatched_class_folders(tiny, tmp_path, capsys):
    tmp, _ = tiny
    import shutil

    shutil.copytree(tmp / "imagenet" / "val", tmp_path / "val")
    (tmp_path / "val" / "n02").rename(tmp_path / "val" / "n03")
    rc, out = _cli(["prepare", str(RESNET[0]), f"data.train_dir={tmp / 'imagenet' / 'train'}",
                    f"data.eval_dir={tmp_path / 'val'}", "data.num_classes=2"], capsys)
    assert rc == 1 and "class folders differ from data.train_dir" in out
