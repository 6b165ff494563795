"""trainers: recipes, launches the way users launch, equivalences, resume, failures (CPU, a few minutes).

Equality of floats: a data-parallel run and a one-process run sum the same per-sample gradients in a
different order (gloo's all-reduce of two halves vs one accumulation over four micro-batches), so the
gradients differ by a few fp32 ulps (relative ~1e-7 x the number of terms). LAMB divides the update by
its own norm, so such differences move parameters by ~lr x 1e-6 relative per step at most; after 3 steps
with lr 1e-2 we allow |a - b| <= 1e-5 + 1e-4 |b| (100x the estimate, far below the ~1e-2 a step moves
them). Parameters on the two ranks and a resumed run must be bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_idx_images, write_text_corpus

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # a hung rank fails the test instead of hanging CI


def _env(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    env.pop("TRAINERS_FAIL_AT", None)
    return env


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, tmp_path, ranks=1, env=None, check=True, timeout=TIMEOUT):
    if ranks == 1:
        cmd = [sys.executable, "-m", "trainers", *args]
    else:
        cmd = ["deepspeed", "--num_accelerators", str(ranks), "--master_port", str(_port()), "--module",
               "trainers", *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**_env(tmp_path), **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def bert_recipe(tmp_path, name="r", **sections):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_text_corpus(corpus)
    r = {
        "model": {"type": "bert_mlm", "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                 "intermediate_size": 64, "hidden_dropout_prob": 0.0,
                                                 "attention_probs_dropout_prob": 0.0}},
        "data": {"train_files": str(corpus), "vocab_size": 200, "seq_len": 32, "max_predictions_per_seq": 5,
                 "eval_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
        "optimizer": {"name": "lamb", "lr": 0.01, "weight_decay": 0.01},
        "schedule": {"name": "poly_warmup", "warmup_proportion": 0.25},
        "batch": {"global_batch": 16, "micro_batch": 4, "world_size": 2},
        "train": {"max_steps": 3, "output_dir": str(tmp_path / f"out_{name}")},
        "tracking": {"progress_bar": False, "trust_ratio_every": 1},
    }
    for sec, vals in sections.items():
        r[sec] = {**r.get(sec, {}), **vals}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path, Path(r["train"]["output_dir"])


def final_params(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("change, field", [
    ({"train": {"max_step": 3}}, "train.max_step: unknown key"),
    ({"batch": {"global_batch": "16"}}, "batch.global_batch: expected int"),
    ({"optimizer": {"lr": -1.0}}, "optimizer.lr: must be > 0"),
    ({"batch": {"global_batch": 20}}, "batch.global_batch: 20 is not divisible by micro_batch x world_size"),
    # ZeRO-3 is supported (tests/test_trainers_zero.py); NVMe optimizer offload is not
    ({"deepspeed": {"zero_stage": 3, "config": {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}}},
     "deepspeed.config.zero_optimization.offload_optimizer.device: nvme: LAMB computes a per-layer trust ratio"),
    ({"train": {"grad_clip": 1.0}, "optimizer": {"name": "lamb", "lr": 0.01, "options": {"max_grad_norm": 1.0}}},
     "train.grad_clip / optimizer.options.max_grad_norm: both set"),
    ({"deepspeed": {"offload_optimizer": True}}, "deepspeed.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3"),
    ({"optimizer": {"name": "lion"}}, "optimizer.name: 'lion' is not one of"),
    ({"model": {"type": "bert_mlm", "preset": "resnet50"}}, "model.preset"),
])
def test_bad_recipe_rejected_by_name(tmp_path, change, field):
    from trainers.recipe import RecipeError, load_recipe

    path, _ = bert_recipe(tmp_path, **change)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_bad_recipe_cli_and_overrides(tmp_path):
    path, out = bert_recipe(tmp_path)
    p = run(["train", str(path), "train.warmup=3"], tmp_path, check=False)
    assert p.returncode == 2 and "train.warmup: unknown key" in p.stderr and str(path) in p.stderr
    assert not out.exists()  # nothing started


def test_check_dry_run(tmp_path):
    path, _ = bert_recipe(tmp_path, model={"type": "bert_pretraining"})
    p = run(["check", str(path)], tmp_path)
    assert "global batch 16 = micro-batch 4 x accumulation 2 x world size 2" in p.stdout
    assert "dry run: one optimizer step" in p.stdout


def test_repo_recipes_valid():
    from trainers.recipe import load_recipe

    for f in sorted((ROOT / "recipes").rglob("*.yaml")):
        load_recipe(f)


# ------------------------------------------------------------------------------------------ equivalences
@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path):
    two, out2 = bert_recipe(tmp_path, "two")
    one, out1 = bert_recipe(tmp_path, "one")
    run(["train", str(two)], tmp_path, ranks=2)
    run(["train", str(one)], tmp_path)  # same global batch 16: micro-batch 4 x accumulation 4 x 1
    s = json.loads((out2 / "summary.json").read_text())
    assert len(s["param_sha256_per_rank"]) == 2 and s["ranks_identical"]
    assert_close(final_params(out2), final_params(out1))
    m1, m2 = metrics(out1), metrics(out2)
    assert [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert "trust_ratio_mean" in m2[-1]


def test_accumulation_equivalence(tmp_path):
    acc, out_a = bert_recipe(tmp_path, "acc4", batch={"micro_batch": 4, "world_size": 1})
    big, out_b = bert_recipe(tmp_path, "acc1", batch={"micro_batch": 16, "world_size": 1})
    run(["train", str(acc)], tmp_path)
    run(["train", str(big)], tmp_path)
    assert_close(final_params(out_a), final_params(out_b))


# ------------------------------------------------------------------------------------------ resume
def test_stop_and_resume_is_bit_exact(tmp_path):
    # dropout on: the RNG states must be restored too
    model = {"type": "bert_pretraining", "config": {"hidden_size": 32, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "intermediate_size": 64}}
    full, out_f = bert_recipe(tmp_path, "full", model=model, train={"max_steps": 4, "output_dir": str(tmp_path / "f")})
    part, out_p = bert_recipe(tmp_path, "part", model=model,
                              train={"max_steps": 4, "output_dir": str(tmp_path / "p"), "checkpoint_every": 1,
                                     "keep_checkpoints": 2})
    run(["train", str(full)], tmp_path)
    p = run(["train", str(part), "--stop-at-step", "2"], tmp_path)
    assert not (out_p / "final").exists()
    p = run(["train", str(part)], tmp_path)  # the same command again resumes
    assert "resumed from" in p.stdout and "step_00000002" in p.stdout
    assert_equal(final_params(out_p), final_params(out_f))
    assert metrics(out_p) == [{**r, "samples_per_s": r2["samples_per_s"], "step_time_s": r2["step_time_s"]}
                              for r, r2 in zip(metrics(out_f), metrics(out_p))]
    assert sorted(x.name for x in (out_p / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]

    # a corrupt checkpoint is detected and named
    target = out_p / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(data)
    p = run(["train", str(part), "train.max_steps=5"], tmp_path, check=False)
    assert p.returncode == 2
    assert "step_00000004 is corrupt: mp_rank_00_model_states.pt fails its sha256 check" in p.stderr


# ------------------------------------------------------------------------------------------ failures
def test_nonfinite_loss_stops_or_skips(tmp_path):
    boom = {"name": "sgd", "lr": 1.0e30}
    stop, _ = bert_recipe(tmp_path, "stop", optimizer=boom, schedule={"name": "constant"})
    p = run(["train", str(stop)], tmp_path, check=False)
    assert p.returncode == 1 and "non-finite loss at step 2" in p.stdout
    skip, out = bert_recipe(tmp_path, "skip", optimizer=boom, schedule={"name": "constant"},
                            train={"nonfinite": "skip"})
    p = run(["train", str(skip)], tmp_path)
    assert "non-finite loss at step 2: optimizer step skipped" in p.stdout
    assert [r.get("skipped", False) for r in metrics(out)] == [False, True, True]


@pytest.mark.distributed
def test_dead_rank_stops_the_others(tmp_path):
    path, _ = bert_recipe(tmp_path, "dead", train={"max_steps": 50})
    p = run(["train", str(path)], tmp_path, ranks=2, env={"TRAINERS_FAIL_AT": "1:3"}, check=False, timeout=120)
    assert p.returncode != 0
    assert "rank 1: failed at step 3: RuntimeError: injected failure" in p.stderr


# ------------------------------------------------------------------------------------------ images
def test_resnet_lars_on_idx(tmp_path):
    files = write_idx_images(tmp_path)
    r = {
        "model": {"type": "resnet", "config": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                               "layer_type": "basic", "downsample_in_first_stage": False}},
        "data": {"format": "idx", "train_images": str(files["train"][0]), "train_labels": str(files["train"][1]),
                 "eval_images": str(files["t10k"][0]), "eval_labels": str(files["t10k"][1]), "num_classes": 4,
                 "channels": 1, "augment": {"random_crop_padding": 2, "hflip": True}},
        "optimizer": {"name": "lars", "lr": 1.0, "weight_decay": 1e-4, "options": {"momentum": 0.9}},
        "schedule": {"name": "mlperf_poly", "warmup_steps": 1},
        "batch": {"global_batch": 32, "micro_batch": 16},
        "train": {"max_steps": 3, "eval_every": 2, "label_smoothing": 0.1, "output_dir": str(tmp_path / "o")},
        "tracking": {"progress_bar": False, "trust_ratio_every": 1},
    }
    path = tmp_path / "resnet.yaml"
    path.write_text(yaml.safe_dump(r))
    run(["train", str(path)], tmp_path)
    ev = [json.loads(x) for x in (tmp_path / "o" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ev] == [2, 3] and all(0 <= e["eval/top1"] <= e["eval/top5"] <= 1 for e in ev)
    m = metrics(tmp_path / "o")
    assert len(m) == 3 and all({"step", "loss", "lr", "samples_per_s"} <= r.keys() for r in m)
    assert m[-1]["trust_ratio_max"] > 0


# ------------------------------------------------------------------------------------------ BERT phase 2
def test_phase2_init_from_keeps_weights_and_moments_restarts_step_and_schedule(tmp_path):
    # NVIDIA's phase 2: "resets the step counter and lr, but keeps the phase-1 Adam moments"; another seq_len
    from lamb.schedules import poly_warmup

    one, out1 = bert_recipe(tmp_path, "phase1", batch={"micro_batch": 16, "world_size": 1},
                            train={"max_steps": 3, "output_dir": str(tmp_path / "p1")})
    two, out2 = bert_recipe(tmp_path, "phase2", data={"seq_len": 48, "max_predictions_per_seq": 8},
                            optimizer={"lr": 0.005}, schedule={"name": "poly_warmup", "warmup_proportion": 0.5},
                            batch={"global_batch": 8, "micro_batch": 8, "world_size": 1},
                            train={"max_steps": 4, "init_from": str(out1), "output_dir": str(tmp_path / "p2")})
    run(["train", str(one)], tmp_path)
    p = run(["train", str(two), "--stop-at-step", "0"], tmp_path)  # checkpoint the initial state
    assert "initialised from" in p.stdout and "step_00000003" in p.stdout
    src = torch.load(out1 / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt", weights_only=False)
    new = torch.load(out2 / "checkpoints" / "step_00000000" / "mp_rank_00_model_states.pt", weights_only=False)
    assert_equal(new["module"], src["module"])  # phase 2 starts from phase 1's final weights
    for g_new, g_src in zip(new["optimizer"]["param_groups"], src["optimizer"]["param_groups"]):
        assert g_new["param_names"] == g_src["param_names"]
        for i, j in zip(g_new["params"], g_src["params"]):
            a, b = new["optimizer"]["state"][i], src["optimizer"]["state"][j]
            assert float(b["step"]) == 3 and float(a["step"]) == 0  # bias correction restarts
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert new["lr_scheduler"]["last_epoch"] == 0
    meta = json.loads((out2 / "checkpoints" / "step_00000000" / "trainer.json").read_text())
    assert meta["step"] == 0 and meta["init_from"]["step"] == 3

    p = run(["train", str(two)], tmp_path)  # its own checkpoint now wins over init_from
    assert "resumed from" in p.stdout and "initialised from" not in p.stdout
    m = metrics(out2)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert [r["lr"] for r in m] == pytest.approx([0.005 * poly_warmup(t, 4, 0.5) for t in range(4)])
    end = torch.load(out2 / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {float(s["step"]) for s in end["optimizer"]["state"].values()} == {4.0}
