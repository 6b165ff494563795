"""Independent float64 references for LAMB and LARS, and shared test fixtures.

Written from the papers' equations, not from ``lamb/*.py``, so that the package is tested against
something it does not share code with:

* LAMB: You et al. 2020, Algorithm 2, plus every published variant switch (DeepSpeed's bias
  correction folded into the step size, L2 / decoupled decay, NVLAMB global grad pre-normalisation,
  apex ``grad_averaging=False`` and ``use_nvlamb=False``, DeepSpeed min/max coefficient, timm's
  LAMBC trust clip, the paper's phi clamp of ``||x||``).
* LARS: the MLPerf ResNet-50 reference (``lars_optimizer.py``), with the LARS paper's
  ``||g|| + wd ||w||`` denominator or ``||g + wd w||``, Nesterov momentum, and apex LARC clipping.

The references keep their own float64 copies of the parameters and their own state; the tests feed
them the same gradients as the package and compare parameters and every state tensor after each
step.  Everything is deliberately written one tensor at a time, line by line from the equations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F32_EPS = torch.finfo(torch.float32).eps

# --------------------------------------------------------------------------------------------------
# The trust ratio, defined once for both references
# --------------------------------------------------------------------------------------------------


def trust_ratio(numerator: float, denominator: float, weight_norm: float, update_norm: float) -> float:
    """``numerator / denominator``, or 1 when the weight norm or the update norm is zero."""
    if weight_norm == 0.0 or update_norm == 0.0:
        return 1.0
    return numerator / denominator


def norm64(t: torch.Tensor) -> float:
    return math.sqrt(float((t.double() ** 2).sum())) if t.numel() else 0.0


# --------------------------------------------------------------------------------------------------
# LAMB
# --------------------------------------------------------------------------------------------------

LAMB_DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-6,
    weight_decay=0.0,
    bias_correction="moments",
    weight_decay_mode="ratio",
    grad_averaging=True,
    max_grad_norm=None,
    min_trust_ratio=None,
    max_trust_ratio=None,
    trust_clip=False,
    weight_norm_bounds=None,
    adapt_decayed_only=False,
    layer_adaptation=True,
    maximize=False,
)

LARS_DEFAULTS = dict(
    lr=None,
    momentum=0.9,
    weight_decay=0.0,
    trust_coefficient=0.001,
    eps=0.0,
    nesterov=False,
    denominator="sum",
    trust_clip=False,
    layer_adaptation=True,
    maximize=False,
)

_BIAS_CORRECTION = {True: "moments", "moments": "moments", "lr": "lr", False: "none", "none": "none"}


@dataclass
class _Group:
    params: list  # float64 tensors owned by the reference
    options: dict


@dataclass
class ReferenceOptimizer:
    """Common bookkeeping: float64 parameter copies, per-parameter state, per-step grads."""

    defaults: dict
    groups: list = field(default_factory=list)
    state: dict = field(default_factory=dict)  # (group index, param index) -> dict

    @classmethod
    def from_params(cls, param_groups, **options):
        """``param_groups``: list of tensors, or list of dicts like torch.optim's."""
        ref = cls(defaults={**cls.DEFAULTS, **options})
        if param_groups and not isinstance(param_groups[0], dict):
            param_groups = [{"params": list(param_groups)}]
        for g in param_groups:
            ref.add_param_group(g)
        return ref

    def add_param_group(self, group):
        opts = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        self.groups.append(_Group([p.detach().double().clone() for p in group["params"]], opts))

    @property
    def params(self):
        return [p for g in self.groups for p in g.params]

    def step(self, grads):
        """``grads``: one list per group (tensor or None per parameter), any dtype."""
        grads = [[None if g is None else g.detach().double().clone() for g in gs] for gs in grads]
        self._step(grads)


class RefLamb(ReferenceOptimizer):
    """LAMB, Algorithm 2 of You et al. (2020), per tensor, in float64.

    For each parameter x with gradient g at its own step t (t counts only steps where g is not None)::

        g <- -g                                       if maximize
        g <- g / max(1, ||G|| / max_grad_norm)        G: all gradients of all groups (NVLAMB)
        g <- g + wd x                                 if weight_decay_mode == "l2"
        m <- b1 m + (1 - b1) g                        (grad_averaging=False: m <- b1 m + g)
        v <- b2 v + (1 - b2) g^2
        bias_correction "moments": r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), s = lr
                        "lr":      r = m / (sqrt(v) + eps),  s = lr sqrt(1 - b2^t) / (1 - b1^t)
                        "none":    r = m / (sqrt(v) + eps),  s = lr
        u = r + wd x                                  if weight_decay_mode == "ratio", else u = r
        adapt = layer_adaptation and not (adapt_decayed_only and wd == 0)
        ratio = phi(||x||) / ||u||   (1 if ||x|| == 0 or ||u|| == 0), phi = clamp to weight_norm_bounds
        ratio = clamp(ratio, min_trust_ratio, max_trust_ratio); trust_clip: ratio <= 1   (computed ratios
                only, as DeepSpeed's kernel: a zero norm keeps ratio 1)
        ratio = 1                                     if not adapt
        x <- x - s ratio u - (lr wd x if weight_decay_mode == "decoupled")   (all from the old x)
    """

    DEFAULTS = LAMB_DEFAULTS

    def _step(self, grads):
        clip = 1.0
        mgn = self.defaults["max_grad_norm"]
        if mgn is not None:
            total = math.sqrt(sum(norm64(g) ** 2 for gs in grads for g in gs if g is not None))
            clip = max(1.0, total / mgn)
        for gi, (group, gs) in enumerate(zip(self.groups, grads)):
            o = group.options
            b1, b2 = o["betas"]
            lr, wd, eps = o["lr"], o["weight_decay"], o["eps"]
            bc = _BIAS_CORRECTION[o["bias_correction"]]
            mode = o["weight_decay_mode"]
            adapt = o["layer_adaptation"] and not (o["adapt_decayed_only"] and wd == 0)
            for pi, (x, g) in enumerate(zip(group.params, gs)):
                if g is None:
                    continue
                st = self.state.setdefault(
                    (gi, pi), {"step": 0, "exp_avg": torch.zeros_like(x), "exp_avg_sq": torch.zeros_like(x)}
                )
                st["step"] += 1
                t = st["step"]
                if o["maximize"]:
                    g = -g
                g = g / clip
                if mode == "l2" and wd != 0:
                    g = g + wd * x
                m = b1 * st["exp_avg"] + ((1 - b1) * g if o["grad_averaging"] else g)
                v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                st["exp_avg"], st["exp_avg_sq"] = m, v
                if bc == "moments":
                    r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                    s = lr
                elif bc == "lr":
                    r = m / (v.sqrt() + eps)
                    s = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                else:
                    r = m / (v.sqrt() + eps)
                    s = lr
                u = r + wd * x if mode == "ratio" else r
                w_norm, u_norm = norm64(x), norm64(u)
                phi = w_norm
                if o["weight_norm_bounds"] is not None:
                    lo, hi = o["weight_norm_bounds"]
                    phi = min(max(w_norm, lo), hi)
                ratio = trust_ratio(phi, u_norm, w_norm, u_norm)
                if w_norm != 0.0 and u_norm != 0.0:
                    # DeepSpeed's fused_lamb_cuda_kernel.cu clamps only a computed ratio: a zero norm
                    # keeps ratio 1 (timm's trust_clip clamps to <= 1, the same thing there)
                    if o["min_trust_ratio"] is not None:
                        ratio = max(ratio, o["min_trust_ratio"])
                    if o["max_trust_ratio"] is not None:
                        ratio = min(ratio, o["max_trust_ratio"])
                    if o["trust_clip"]:
                        ratio = min(ratio, 1.0)
                if not adapt:
                    ratio = 1.0
                new_x = x - s * ratio * u
                if mode == "decoupled" and wd != 0:
                    new_x = new_x - lr * wd * x
                x.copy_(new_x)
                st.update(trust_ratio=ratio, weight_norm=w_norm, update_norm=u_norm)


class RefLars(ReferenceOptimizer):
    """LARS as in the MLPerf ResNet-50 reference, per tensor, in float64::

        g <- -g                                          if maximize
        d = g + wd w
        denominator "sum":  ratio = tc ||w|| / (||g|| + wd ||w|| + eps)   (1 if ||w|| == 0 or ||g|| == 0)
                    "norm": ratio = tc ||w|| / (||d|| + eps)              (1 if ||w|| == 0 or ||d|| == 0)
        trust_clip (apex LARC): ratio <- min(ratio / lr, 1) where the ratio was computed (not for 1)
        ratio = 1                                        if not layer_adaptation
        v <- mu v + lr ratio d
        w <- w - v                                       (nesterov: w <- w - (mu v + lr ratio d))
    """

    DEFAULTS = LARS_DEFAULTS

    def _step(self, grads):
        for gi, (group, gs) in enumerate(zip(self.groups, grads)):
            o = group.options
            lr, mu, wd, tc, eps = o["lr"], o["momentum"], o["weight_decay"], o["trust_coefficient"], o["eps"]
            for pi, (w, g) in enumerate(zip(group.params, gs)):
                if g is None:
                    continue
                st = self.state.setdefault((gi, pi), {"step": 0, "momentum_buffer": torch.zeros_like(w)})
                st["step"] += 1
                if o["maximize"]:
                    g = -g
                d = g + wd * w
                w_norm, g_norm = norm64(w), norm64(g)
                if o["denominator"] == "sum":
                    u_norm = g_norm
                    denom = g_norm + wd * w_norm + eps
                else:
                    u_norm = norm64(d)
                    denom = u_norm + eps
                if o["layer_adaptation"]:
                    ratio = trust_ratio(tc * w_norm, denom, w_norm, u_norm)
                    if o["trust_clip"] and w_norm != 0 and u_norm != 0:
                        ratio = min(ratio / lr, 1.0)
                else:
                    ratio = 1.0
                scaled = lr * ratio * d
                buf = mu * st["momentum_buffer"] + scaled
                st["momentum_buffer"] = buf
                w.sub_(mu * buf + scaled if o["nesterov"] else buf)
                st.update(trust_ratio=ratio, weight_norm=w_norm, update_norm=u_norm)


# --------------------------------------------------------------------------------------------------
# Fixtures shared by the test files (kept here rather than in a conftest.py other helpers also own)
# --------------------------------------------------------------------------------------------------

# name, shape, initialisation.  Sizes chosen to hit the edge paths: a single element, an odd length
# that is no multiple of any vector width (18011, as apex's tests), a matrix, an empty tensor, and a
# zero-initialised tensor (||x|| = 0: ratio 1, it must still move and keep its decay).
PARAM_SPECS = (
    ("big", (18011,), "randn"),
    ("matrix", (33, 17), "randn"),
    ("one", (1,), "randn"),
    ("zeros", (7,), "zeros"),
    ("empty", (0,), "randn"),
    ("zgrad", (5,), "randn"),  # its first gradient is exactly zero (update norm 0 at step 1)
    ("sometimes", (9,), "randn"),  # gradient None at step 3: skipped that step
    ("frozen", (4,), "randn"),  # requires_grad False: never touched
)
NONE_GRAD_AT_STEP = 3


def make_params(dtype=torch.float64, seed=0, device="cpu"):
    """Two param groups: group 0 decayed (options of the optimizer), group 1 with weight_decay 0 and a
    different lr (so adapt_decayed_only and per-group options are exercised)."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape, init in PARAM_SPECS:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) if init == "randn" else torch.zeros(shape)
        p = t.to(dtype).to(device).requires_grad_(name != "frozen")
        params[name] = p
    group0 = [params[n] for n in ("big", "matrix", "zeros", "frozen", "sometimes")]
    group1 = [params[n] for n in ("one", "empty", "zgrad")]
    return params, group0, group1


def make_grads(group_params, step, seed=1, scale=1.0, names=None):
    """Deterministic gradients for ``step`` (1-based) for a list of lists of params; None where the
    parameter is frozen or where the fixture says the gradient is missing at this step."""
    names = names or {}
    out = []
    for gi, ps in enumerate(group_params):
        gs = []
        for pi, p in enumerate(ps):
            name = names.get(id(p), "")
            gen = torch.Generator().manual_seed(seed * 100003 + step * 1009 + gi * 101 + pi)
            if not p.requires_grad or (name == "sometimes" and step == NONE_GRAD_AT_STEP):
                gs.append(None)
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            if name == "zgrad" and step == 1:
                g = torch.zeros_like(g)
            gs.append(g)
        out.append(gs)
    return out


def set_grads(group_params, grads):
    for ps, gs in zip(group_params, grads):
        for p, g in zip(ps, gs):
            p.grad = None if g is None else g.to(dtype=p.dtype, device=p.device).clone()


def param_names(params):
    return {id(p): n for n, p in params.items()}


def state_items(opt, ref):
    """Yield (label, package state dict, reference state dict) pairs in order."""
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            yield (gi, pi), opt.state.get(p, {}), ref.state.get((gi, pi))


def fp32_tolerance(steps: int, numel: int, ops: int = 16, beta2: float | None = None) -> float:
    """Relative tolerance for an fp32 run against the float64 reference.

    Each step rounds O(ops) float32 operations per element (moments, sqrt, division, decay, the update
    and the write to the parameter), each with relative error at most eps32 / 2; the two norms are
    reductions whose relative error grows at most like log2(numel) eps32 with pairwise / blocked
    summation.  The trust ratio carries both norms' error into the whole update, and errors of
    successive steps add up (nothing amplifies them over a handful of steps), so after ``steps`` steps
    the error relative to the size of the quantity is bounded by about
    steps * (ops + 2 log2(numel)) * eps32.

    With ``beta2`` (LAMB's bias correction computed in fp32): 1 - beta2^t cancels, and beta2 itself
    is only known to eps32 / 2 in fp32, so 1 - beta2 carries a relative error up to
    eps32 / (2 (1 - beta2)) (1.3e-5 for fp32(0.999)); through the square root that is
    eps32 / (4 (1 - beta2)) on every update, accumulated over the steps.
    """
    per_step = ops + 2 * math.log2(max(numel, 2))
    if beta2 is not None:
        per_step += 1 / (4 * (1 - beta2))
    return steps * per_step * F32_EPS


def snapshot(opt):
    """Deep copy of parameters and every state tensor of a torch optimizer."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {
        (gi, pi): {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in opt.state.get(p, {}).items()}
        for gi, g in enumerate(opt.param_groups)
        for pi, p in enumerate(g["params"])
    }
    return params, state


def assert_snapshots_equal(a, b):
    pa, sa = a
    pb, sb = b
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), (k, sa[k].keys(), sb[k].keys())
        for key in sa[k]:
            if torch.is_tensor(sa[k][key]):
                torch.testing.assert_close(sa[k][key], sb[k][key], rtol=0, atol=0, msg=f"{k} {key}")
            else:
                assert sa[k][key] == sb[k][key]


def load_timm_lamb():
    """timm.optim.lamb.Lamb without importing timm's __init__ (which pulls torchvision)."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("timm")
    if spec is None:
        return None
    root = list(spec.submodule_search_locations)[0]
    if "timm" not in sys.modules:
        for name, path in (("timm", root), ("timm.optim", root + "/optim")):
            m = types.ModuleType(name)
            m.__path__ = [path]
            sys.modules[name] = m
    import timm.optim.lamb as tl

    return tl.Lamb
