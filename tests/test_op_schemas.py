"""The fused kernels' op schemas, read from the sources (no build, no GPU): they parse, the CPU and CUDA ops
take the same arguments, and each marks as written exactly the tensors its kernel
writes. torch.compile relies on the marks: it keeps a written argument's update and assumes every other
argument unchanged, so a kernel that writes an unmarked tensor would be compiled wrongly."""

from __future__ import annotations

import re

import pytest
import torch

from lamb import ops

SRC = ops.source_dir()
SOURCES = {"cpu": SRC / "lamb_cpu.cpp", "cuda": SRC / "lamb_cuda_binding.cpp"}

# What each kernel writes (cuda/include/lamb_cuda.h, cuda/lamb_cpu.cpp): the one-call step and pass B write the
# parameters, their state, masters, step and statistics; pass A writes LAMB's moments (where the moments are
# fp32 and no check_finite defers them) and the pieces' squared norms, LARS's pass A only the squared norms.
STEP_STATE = {"params", "master_params", "state_steps", "trust_ratios", "weight_norms", "update_norms"}
WRITES = {
    "lamb_step_": STEP_STATE | {"exp_avgs", "exp_avg_sqs"},
    "lars_step_": STEP_STATE | {"momentum_buffers"},
    "lamb_pass_a_": {"exp_avgs", "exp_avg_sqs", "sq_norms"},
    "lamb_pass_b_": STEP_STATE | {"exp_avgs", "exp_avg_sqs"},
    "lars_pass_a_": {"sq_norms"},
    "lars_pass_b_": STEP_STATE | {"momentum_buffers"},
}


def _schemas(kind: str) -> dict[str, torch._C.FunctionSchema]:
    text = SOURCES[kind].read_text()
    block = text[text.index(f"TORCH_LIBRARY(lamb_{kind}, m)"):]
    out = {}
    for m in re.finditer(r'm\.def\(((?:\s*"[^"]*")+)', block):
        schema = "".join(re.findall(r'"([^"]*)"', m.group(1)))
        parsed = torch._C.parse_schema(schema)
        out[parsed.name] = parsed
    return out


def _impls(kind: str) -> set[str]:
    text = SOURCES[kind].read_text()
    block = text[text.index(f"TORCH_LIBRARY_IMPL(lamb_{kind}, {kind.upper()}, m)"):]
    block = block[:block.index("}")]
    return set(re.findall(r'm\.impl\("(\w+)"', block))


def _written(schema) -> set[str]:
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_step_ops_mark_what_their_kernels_write(kind):
    schemas = _schemas(kind)
    assert set(ops.STEP_OPS) <= set(schemas), sorted(schemas)
    for name in ops.STEP_OPS:
        assert _written(schemas[name]) == WRITES[name], name
    # a device kernel only (the fake implementations are registered for exactly these ops when loading)
    assert _impls(kind) == set(ops.STEP_OPS)


def test_cpu_and_cuda_ops_take_the_same_arguments():
    cpu, cuda = _schemas("cpu"), _schemas("cuda")
    for name in ops.STEP_OPS:
        a = [(x.name, str(x.type)) for x in cpu[name].arguments]
        b = [(x.name, str(x.type)) for x in cuda[name].arguments]
        assert a == b, name
