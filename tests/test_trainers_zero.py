"""trainers under DeepSpeed ZeRO-1/2 with LAMB (CPU, gloo, 2 ranks through the deepspeed launcher).

``lamb.deepspeed.attach`` makes LAMB exact on ZeRO's flat partitions, so a ZeRO-1 or ZeRO-2 run equals a
ZeRO-0 run on the same global batch up to the summation order of the gradients (the tolerance argument
of tests/test_trainers_train.py: |a - b| <= 1e-5 + 1e-4 |b| after 4 steps). Resuming at the checkpoint's
world size is DeepSpeed's own restore and must be bit-exact; resuming at another world size goes through
the consolidated optimizer state saved with every ZeRO checkpoint and matches within the same tolerance.

Five launches (three of them 2-rank), about 2.5 minutes on two cores.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_trainers_train import assert_close, assert_equal, bert_recipe, final_params, metrics, run

pytestmark = pytest.mark.distributed

LAMB = {"name": "lamb", "lr": 0.01, "weight_decay": 0.01, "options": {"max_grad_norm": 1.0}}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """ZeRO-0 in one process, ZeRO-1 and ZeRO-2 on 2 ranks: same recipe, global batch 16, 4 steps."""
    tmp = tmp_path_factory.mktemp("zero")
    out = {}
    for name, stage, ranks in (("z0", 0, 1), ("z1", 1, 2), ("z2", 2, 2)):
        path, o = bert_recipe(tmp, name, optimizer=LAMB, deepspeed={"zero_stage": stage},
                              train={"max_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 3,
                                     "output_dir": str(tmp / f"out_{name}")})
        out[name] = (path, o, run(["train", str(path)], tmp, ranks=ranks))
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("name", ["z1", "z2"])
def test_zero_equals_zero0(zero_runs, name):
    _, out, p = zero_runs[name]
    _, out0, _ = zero_runs["z0"]
    assert "global batch 16 = micro-batch 4 x accumulation 2 x world size 2" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["ranks_identical"]
    assert_close(final_params(out), final_params(out0))
    m, m0 = metrics(out), metrics(out0)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    for a, b in zip(m, m0):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # The trust ratios are per original parameter (attach), as in one process. Only the first two steps
    # compare: the attention key biases have an exactly zero gradient (softmax ignores a shift), so theirs
    # is rounding noise that depends on the summation order, Adam scales it to O(1), and from step 3 on
    # (once those biases are nonzero) their ratios differ between runs; the parameters stay close.
    for a, b in zip(m[:2], m0[:2]):
        assert a["trust_ratio_mean"] == pytest.approx(b["trust_ratio_mean"], rel=1e-6)
    ts = json.loads((out / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    assert ts["world_size"] == 2 and ts["zero_stage"] == int(name[1])
    sd = torch.load(out / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)
    assert sd["lamb"]["format"] == "lamb.deepspeed/1"  # the world-size-independent optimizer state


def _rewind(src, dst, step):
    """A copy of a run's output_dir whose newest checkpoint is ``step`` (as if it had stopped there)."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    for f in ("final", "summary.json"):
        shutil.rmtree(dst / f, ignore_errors=True) if (dst / f).is_dir() else (dst / f).unlink(missing_ok=True)


def test_zero1_resume_is_bit_exact(zero_runs):
    path, out, _ = zero_runs["z1"]
    tmp = zero_runs["tmp"]
    dst = tmp / "resume_same"
    _rewind(out, dst, 2)
    p = run(["train", str(path), f"train.output_dir={dst}"], tmp, ranks=2)
    assert "resumed from" in p.stdout and "step_00000002" in p.stdout
    assert_equal(final_params(dst), final_params(out))
    strip = ("samples_per_s", "step_time_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in metrics(dst)] == \
           [{k: v for k, v in r.items() if k not in strip} for r in metrics(out)]


def test_zero1_resume_at_another_world_size(zero_runs):
    path, out, _ = zero_runs["z1"]
    _, out0, _ = zero_runs["z0"]
    tmp = zero_runs["tmp"]
    dst = tmp / "resume_one"
    _rewind(out, dst, 2)
    p = run(["train", str(path), f"train.output_dir={dst}"], tmp, ranks=1)  # 2 ranks -> 1 process
    assert "resumed at world size 1 (ZeRO 1) from its consolidated optimizer state" in p.stdout
    assert_close(final_params(dst), final_params(out))
    assert_close(final_params(dst), final_params(out0))
    m, m_full = metrics(dst), metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    for a, b in zip(m[2:], m_full[2:]):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_phase2_init_from_a_zero_run(zero_runs):
    # phase 1 at ZeRO-1 on 2 ranks, phase 2 in one process at ZeRO-0 with another sequence length:
    # its initial state (--stop-at-step 0) holds phase 1's weights and moments with the step at 0
    _, out1, _ = zero_runs["z1"]
    tmp = zero_runs["tmp"]
    path, out2 = bert_recipe(tmp, "phase2", optimizer=LAMB, data={"seq_len": 48, "max_predictions_per_seq": 8},
                             train={"max_steps": 2, "init_from": str(out1), "output_dir": str(tmp / "p2")})
    p = run(["train", str(path), "--stop-at-step", "0"], tmp)
    assert "initialised from" in p.stdout
    src = torch.load(out1 / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)
    new = torch.load(out2 / "checkpoints" / "step_00000000" / "mp_rank_00_model_states.pt", weights_only=False)
    assert_equal(new["module"], src["module"])
    opt = new["optimizer"]
    n = 0
    for g in opt["param_groups"]:
        for name, pid in zip(g["param_names"], g["params"]):
            st, ref = opt["state"][pid], src["lamb"]["state"][name]
            assert float(st["step"]) == 0.0
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], ref[k]), (name, k)
            n += 1
    assert n == len(src["lamb"]["state"])
