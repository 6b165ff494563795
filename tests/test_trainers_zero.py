"""trainers under DeepSpeed ZeRO-1/2/3 with LAMB (CPU, gloo, 2 ranks through the deepspeed launcher).

``lamb.deepspeed.attach`` makes LAMB exact on ZeRO's flat partitions (ZeRO-3: per-tensor shards), so a
ZeRO-1, 2 or 3 run equals a ZeRO-0 run on the same global batch up to the summation order of the gradients
(the tolerance argument of tests/test_trainers_train.py: |a - b| <= 1e-5 + 1e-4 |b| after 4 steps).
Resuming at the checkpoint's world size is DeepSpeed's own restore and must be bit-exact; resuming at
another world size goes through the consolidated optimizer state saved with every ZeRO checkpoint and
matches within the same tolerance (ZeRO-1 and ZeRO-3: 2 ranks -> 1 process).

Eleven launches (five of them 2-rank), about 3 minutes on two cores.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_trainers_train import assert_close, assert_equal, bert_recipe, final_params, metrics, run

from trainers.checkpoint import model_states_file

pytestmark = pytest.mark.distributed

LAMB = {"name": "lamb", "lr": 0.01, "weight_decay": 0.01, "options": {"max_grad_norm": 1.0}}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """ZeRO-0 in one process, ZeRO-1, 2 and 3 on 2 ranks: same recipe, global batch 16, 4 steps."""
    tmp = tmp_path_factory.mktemp("zero")
    out = {}
    for name, stage, ranks in (("z0", 0, 1), ("z1", 1, 2), ("z2", 2, 2), ("z3", 3, 2)):
        path, o = bert_recipe(tmp, name, optimizer=LAMB, deepspeed={"zero_stage": stage},
                              train={"max_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 3,
                                     "output_dir": str(tmp / f"out_{name}")})
        out[name] = (path, o, run(["train", str(path)], tmp, ranks=ranks))
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("name", ["z1", "z2", "z3"])
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
    # the world-size-independent optimizer state (ZeRO-3: in every rank's zero_pp_rank_<r> file)
    sd = torch.load(model_states_file(out / "checkpoints" / "step_00000004"), weights_only=False)
    assert sd["lamb"]["format"] == "lamb.deepspeed/1"


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


@pytest.mark.parametrize("name", ["z1", "z3"])
def test_zero_resume_at_another_world_size(zero_runs, name):
    path, out, _ = zero_runs[name]
    _, out0, _ = zero_runs["z0"]
    tmp = zero_runs["tmp"]
    dst = tmp / f"resume_one_{name}"
    _rewind(out, dst, 2)
    p = run(["train", str(path), f"train.output_dir={dst}"], tmp, ranks=1)  # 2 ranks -> 1 process
    assert f"resumed at world size 1 (ZeRO {name[1]}) from its consolidated optimizer state" in p.stdout
    assert_close(final_params(dst), final_params(out))
    assert_close(final_params(dst), final_params(out0))
    m, m_full = metrics(dst), metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    for a, b in zip(m[2:], m_full[2:]):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("name, stage, ranks", [("z3", 0, 1), ("z1", 3, 2)])
def test_zero_resume_at_another_stage(zero_runs, name, stage, ranks):
    # Moves DeepSpeed's loader cannot make (a ZeRO-3 checkpoint at stage 0, a ZeRO-1 one at stage 3): the
    # weights and moments come from the consolidated state, the rest from rank 0's model-states file.
    path, out, _ = zero_runs[name]
    _, out0, _ = zero_runs["z0"]
    tmp = zero_runs["tmp"]
    dst = tmp / f"resume_{name}_at_z{stage}"
    _rewind(out, dst, 2)
    p = run(["train", str(path), f"train.output_dir={dst}", f"deepspeed.zero_stage={stage}"], tmp, ranks=ranks)
    assert (f"resumed at world size {ranks} (ZeRO {stage}) from its consolidated optimizer state") in p.stdout
    assert_close(final_params(dst), final_params(out0))
    m, m_full = metrics(dst), metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    for a, b in zip(m[2:], m_full[2:]):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["z1", "z3"])
def test_phase2_init_from_a_zero_run(zero_runs, name):
    # phase 1 at ZeRO-1 or ZeRO-3 on 2 ranks, phase 2 in one process at ZeRO-0 with another sequence length:
    # its initial state (--stop-at-step 0) holds phase 1's weights and moments with the step at 0. A ZeRO-3
    # checkpoint holds only shards of the module; the weights come from its consolidated state, and the
    # tied decoder weight (one parameter, two state-dict names) from the word embeddings.
    _, out1, _ = zero_runs[name]
    tmp = zero_runs["tmp"]
    path, out2 = bert_recipe(tmp, f"phase2_{name}", optimizer=LAMB, data={"seq_len": 48, "max_predictions_per_seq": 8},
                             train={"max_steps": 2, "init_from": str(out1), "output_dir": str(tmp / f"p2_{name}")})
    p = run(["train", str(path), "--stop-at-step", "0"], tmp)
    assert "initialised from" in p.stdout
    src = torch.load(model_states_file(out1 / "checkpoints" / "step_00000004"), weights_only=False)
    new = torch.load(out2 / "checkpoints" / "step_00000000" / "mp_rank_00_model_states.pt", weights_only=False)
    if name == "z1":
        assert_equal(new["module"], src["module"])
    else:
        final = final_params(out1)  # phase 1's whole weights at step 4, gathered by the trainer
        assert set(final) <= set(new["module"])
        for k, v in final.items():
            assert torch.equal(new["module"][k], v), k
        tied = [k for k in new["module"] if k not in final]  # save_pretrained writes a tied tensor once
        assert any(k.endswith("decoder.weight") for k in tied), tied
        emb = next(k for k in final if k.endswith("word_embeddings.weight"))
        for k in tied:
            v = new["module"][k]
            want = final[emb] if k.endswith("decoder.weight") else next(
                (x for x in final.values() if x.shape == v.shape and torch.equal(x, v)), None)
            assert want is not None and torch.equal(v, want), k
    opt = new["optimizer"]
    n = 0
    for g in opt["param_groups"]:
        for pname, pid in zip(g["param_names"], g["params"]):
            st, ref = opt["state"][pid], src["lamb"]["state"][pname]
            assert float(st["step"]) == 0.0
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], ref[k]), (pname, k)
            n += 1
    assert n == len(src["lamb"]["state"])
