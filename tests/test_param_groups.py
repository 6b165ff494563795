"""lamb.param_groups: which parameters are decayed and adapted, by module type and by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lamb
from lamb import Lamb, Lars


class Block(nn.Module):
    """Every normalisation layer of torch.nn next to Linear / Conv / Embedding layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm1d(6)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm3d(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(6)
        self.LayerNorm = nn.LayerNorm(6)  # HF BERT's attribute name
        self.rms = nn.RMSNorm(6)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


NORM_MODULES = ("bn1", "bn2", "bn3", "inorm", "gn", "ln", "LayerNorm", "rms")


def _index(groups):
    """name -> (weight_decay, layer_adaptation); checks each parameter appears exactly once."""
    out = {}
    ids = []
    for g in groups:
        assert len(g["params"]) == len(g["param_names"]) > 0
        for n, p in zip(g["param_names"], g["params"]):
            assert n not in out, f"{n} in two groups"
            out[n] = (g["weight_decay"], g.get("layer_adaptation", True))
            ids.append(id(p))
    assert len(ids) == len(set(ids))
    return out


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_bert_preset_excludes_bias_and_norms_from_decay_only():
    m = Block()
    idx = _index(lamb.param_groups(m, 0.01, preset="bert"))
    assert set(idx) == _trainable(m)
    for name, (wd, adapt) in idx.items():
        module = name.rsplit(".", 1)[0]
        excluded = name.endswith("bias") or module in NORM_MODULES
        assert wd == (0.0 if excluded else 0.01), name
        assert adapt is True, name


def test_mlperf_preset_excludes_bn_and_bias_from_decay_and_adaptation():
    m = Block()
    idx = _index(lamb.param_groups(m, 2.5e-5, preset="mlperf"))
    assert set(idx) == _trainable(m)
    for name, (wd, adapt) in idx.items():
        module = name.rsplit(".", 1)[0]
        excluded = name.endswith("bias") or module in NORM_MODULES
        assert wd == (0.0 if excluded else 2.5e-5), name
        assert adapt is (not excluded), name
    # conv/linear/embedding weights are decayed and adapted
    for n in ("conv.weight", "fc.weight", "head.weight", "embed.weight"):
        assert idx[n] == (2.5e-5, True)


@pytest.mark.parametrize("norm_type", [nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.RMSNorm])
def test_every_norm_layer_is_matched_by_module_type(norm_type):
    norm = norm_type(2, 4) if norm_type is nn.GroupNorm else (norm_type(4, affine=True) if "Instance" in norm_type.__name__ else norm_type(4))
    m = nn.Sequential(nn.Linear(4, 4, bias=False), norm)
    idx = _index(lamb.param_groups(m, 0.1, no_decay=lamb.NORM_LAYERS))
    assert idx["0.weight"][0] == 0.1
    norm_names = [n for n in idx if n.startswith("1.")]
    assert norm_names, "norm layer has parameters"
    for n in norm_names:
        assert idx[n][0] == 0.0, n


def test_custom_patterns_by_name_and_type_and_group_options():
    m = Block()
    groups = lamb.param_groups(m, 0.05, no_decay=("embed", nn.Conv2d), no_adapt=("head",), lr=0.3)
    idx = _index(groups)
    assert all(g["lr"] == 0.3 for g in groups)
    assert idx["embed.weight"] == (0.0, True)
    assert idx["conv.weight"][0] == 0.0 and idx["conv.bias"][0] == 0.0
    assert idx["head.weight"] == (0.05, False)
    assert idx["fc.weight"] == (0.05, True)
    assert idx["fc.bias"] == (0.05, True)  # custom no_decay replaces the preset's


def test_shared_parameter_appears_once():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    m[1].weight = m[0].weight
    groups = lamb.param_groups(m, 0.1)
    n = sum(len(g["params"]) for g in groups)
    assert n == len({id(p) for p in m.parameters()})


def test_groups_work_in_lamb_and_lars_and_exclusions_take_effect():
    """The groups feed the optimizers: an excluded bias gets no decay (with zero grads, LARS moves a
    decayed weight by the decay term only and leaves the excluded bias where it is)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    groups = lamb.param_groups(m, 0.1, preset="mlperf")
    opt = Lars(groups, lr=1.0, momentum=0.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # ||g|| = 0: ratio 1; d = g + wd w = 0.1 w: w <- w - 1.0 * 0.1 w
    torch.testing.assert_close(m[0].weight.detach(), 0.9 * before["0.weight"])
    for n in ("0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(dict(m.named_parameters())[n].detach(), before[n], rtol=0, atol=0)
    Lamb(lamb.param_groups(m, 0.01, preset="bert"), lr=1e-3).step()


def test_bad_preset_raises():
    with pytest.raises(ValueError, match="preset"):
        lamb.param_groups(nn.Linear(2, 2), 0.1, preset="nope")
