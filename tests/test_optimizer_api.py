"""Lamb and Lars behave like torch.optim optimizers: closures, zero_grad, param groups, lr schedulers
(torch and Hugging Face), state_dict round trips, old checkpoints, and clear errors on bad input.
Numeric checks go through the independent reference (tests/reference.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lamb
from lamb import Lamb, Lars
from reference import RefLamb, RefLars, assert_snapshots_equal, snapshot

OPTS = {
    "lamb": (Lamb, RefLamb, dict(lr=0.01, weight_decay=0.01)),
    "lars": (Lars, RefLars, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)),
}


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _data(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


# --------------------------------------------------------------------------------------------------
# torch.optim protocol
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTS)
def test_is_torch_optimizer_and_closure_returns_loss(name):
    cls, ref_cls, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    assert isinstance(opt, torch.optim.Optimizer)
    x, y = _data()
    for _ in range(4):

        def closure():
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        # the reference steps on the gradient the closure produces at the current parameters
        loss = opt.step(closure)
        assert torch.is_tensor(loss) and loss.dim() == 0
    # replay with the reference: recompute the same gradients from the reference's parameters
    model2 = _model()
    ref = ref_cls.from_params(list(model2.parameters()), **kw)
    for _ in range(4):
        for p, r in zip(model2.parameters(), ref.params):
            p.data.copy_(r)
        model2.zero_grad()
        _loss(model2, x, y).backward()
        ref.step([[p.grad for p in model2.parameters()]])
    for p, r in zip(model.parameters(), ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", OPTS)
def test_zero_grad(name):
    cls, _, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    x, y = _data()
    _loss(model, x, y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    _loss(model, x, y).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", OPTS)
def test_step_without_grads_is_a_noop(name):
    cls, _, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert not any(opt.state[p] for p in model.parameters() if p in opt.state)


@pytest.mark.parametrize("name", OPTS)
def test_add_param_group_matches_reference(name):
    cls, ref_cls, kw = OPTS[name]
    a = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    b = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    opt = cls([a], **kw)
    ref = ref_cls.from_params([a], **kw)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        if step == 2:
            new = {"params": [b], "lr": kw["lr"] / 2, "weight_decay": 0.0}
            opt.add_param_group(new)
            ref.add_param_group(new)
            # the new group gets every default the constructor had
            for key in kw:
                if key not in new:
                    assert opt.param_groups[1][key] == kw[key]
        grads = [[torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in g["params"]] for g in opt.param_groups]
        for g, gs in zip(opt.param_groups, grads):
            for p, gr in zip(g["params"], gs):
                p.grad = gr.clone()
        opt.step()
        ref.step(grads)
    for p, r in zip([a, b], ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [a]})  # a parameter in two groups


# --------------------------------------------------------------------------------------------------
# lr schedulers: the optimizer reads lr (and betas / momentum, which OneCycleLR cycles) every step
# --------------------------------------------------------------------------------------------------

SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
}


@pytest.mark.parametrize("sched_name", SCHEDULERS)
@pytest.mark.parametrize("name", OPTS)
def test_torch_lr_schedulers(name, sched_name):
    cls, ref_cls, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    ref = ref_cls.from_params(list(model.parameters()), **kw)
    sched = SCHEDULERS[sched_name](opt)
    x, y = _data()
    lrs = []
    for _ in range(8):
        opt.zero_grad()
        _loss(model, x, y).backward()
        g = opt.param_groups[0]
        ref.groups[0].options.update({k: g[k] for k in ("lr", "betas", "momentum") if k in g})
        lrs.append(g["lr"])
        # the reference sees the package's gradient at the package's parameters
        ref.step([[p.grad for p in model.parameters()]])
        opt.step()
        sched.step()
        for p, r in zip(model.parameters(), ref.params):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
            p.data.copy_(r)  # keep both on exactly the same trajectory
    assert len(set(lrs)) > 1  # the schedule did change the lr
    if sched_name == "OneCycleLR":
        key = "betas" if name == "lamb" else "momentum"
        assert key in opt.param_groups[0]


@pytest.mark.parametrize("name", OPTS)
def test_scheduled_lr_is_used_by_the_step(name):
    """Stronger than the test above: the package's own trajectory under OneCycleLR equals the
    reference driven with the same lr / betas / momentum sequence."""
    cls, ref_cls, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    ref = ref_cls.from_params(list(model.parameters()), **kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    gen = torch.Generator().manual_seed(3)
    for _ in range(8):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in model.parameters()]
        for p, gr in zip(model.parameters(), grads):
            p.grad = gr.clone()
        g = opt.param_groups[0]
        ref.groups[0].options.update({k: g[k] for k in ("lr", "betas", "momentum") if k in g})
        opt.step()
        ref.step([grads])
        sched.step()
    for p, r in zip(model.parameters(), ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_huggingface_get_scheduler():
    transformers = pytest.importorskip("transformers")
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = Lamb([p], lr=0.1, weight_decay=0.01)
    sched = transformers.get_scheduler("linear", optimizer=opt, num_warmup_steps=2, num_training_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
        sched.step()
    want = [0.1 * (s / 2 if s < 2 else (10 - s) / 8) for s in range(10)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_huggingface_trainer_accepts_lamb():
    """transformers.Trainer(optimizers=(opt, sched)) on a tiny model, no hub access."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, labels=None):
            logits = self.fc(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(32)]
    model = Tiny()
    opt = Lamb(lamb.param_groups(model, 0.01), lr=0.05)
    sched = transformers.get_scheduler("linear", optimizer=opt, num_warmup_steps=1, num_training_steps=4)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, max_steps=4, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                 save_strategy="no", logging_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
        before = model.fc.weight.detach().clone()
        trainer.train()
    assert trainer.optimizer is opt or getattr(trainer.optimizer, "optimizer", None) is opt
    assert not torch.equal(before, model.fc.weight.detach())
    assert float(next(iter(opt.state.values()))["step"]) == 4


# --------------------------------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------------------------------


def _grads(model, gen):
    return [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in model.parameters()]


@pytest.mark.parametrize(
    "name,extra",
    [
        ("lamb", {}),
        ("lamb", {"max_grad_norm": 1.0, "bias_correction": "lr", "min_trust_ratio": 0.01, "max_trust_ratio": 0.3}),
        ("lars", {}),
        ("lars", {"nesterov": True, "trust_clip": True}),
    ],
)
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_steps_identically(name, extra, foreach):
    cls, _, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), foreach=foreach, **kw, **extra)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, g in zip(model.parameters(), _grads(model, gen)):
            p.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # loads with the safe unpickler
    model2 = copy.deepcopy(model)
    opt2 = cls(model2.parameters(), foreach=foreach, **kw)  # options come from the state_dict
    opt2.load_state_dict(saved)
    for key in extra:
        assert opt2.param_groups[0][key] == extra[key]
    assert_snapshots_equal(snapshot(opt), snapshot(opt2))
    for _ in range(3):
        gs = _grads(model, gen)
        for m in (model, model2):
            for p, g in zip(m.parameters(), gs):
                p.grad = g.clone()
        opt.step()
        opt2.step()
        assert_snapshots_equal(snapshot(opt), snapshot(opt2))


@pytest.mark.parametrize(
    "name,missing",
    [
        ("lamb", "weight_norm_bounds"),
        ("lamb", "adapt_decayed_only"),
        ("lamb", "trust_clip"),
        ("lamb", "master_weights"),
        ("lamb", "weight_decay_mode"),
        ("lars", "denominator"),
        ("lars", "trust_clip"),
        ("lars", "layer_adaptation"),
    ],
)
def test_old_state_dict_without_an_option_still_loads(name, missing):
    """A checkpoint saved before ``missing`` existed: it loads, gets the default, and steps exactly
    like an optimizer that never went through a checkpoint."""
    cls, _, kw = OPTS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        for p, g in zip(model.parameters(), _grads(model, gen)):
            p.grad = g
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g[missing]
    model2 = copy.deepcopy(model)
    opt2 = cls(model2.parameters(), **kw)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0][missing] == opt.param_groups[0][missing]
    for _ in range(2):
        gs = _grads(model, gen)
        for m in (model, model2):
            for p, g in zip(m.parameters(), gs):
                p.grad = g.clone()
        opt.step()
        opt2.step()
    assert_snapshots_equal(snapshot(opt), snapshot(opt2))


def test_tensor_lr_matches_float_lr():
    a = _model()
    b = copy.deepcopy(a)
    oa = Lamb(a.parameters(), lr=0.01, weight_decay=0.01)
    ob = Lamb(b.parameters(), lr=torch.tensor(0.01, dtype=torch.float64), weight_decay=0.01)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        gs = _grads(a, gen)
        for m in (a, b):
            for p, g in zip(m.parameters(), gs):
                p.grad = g.clone()
        oa.step()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

P = lambda: [nn.Parameter(torch.ones(2))]  # noqa: E731

BAD_LAMB = [
    ("lr", dict(lr=-1e-3), "-0.001"),
    ("eps", dict(eps=-1e-6), "-1e-06"),
    ("betas", dict(betas=(1.0, 0.999)), "1.0"),
    ("betas", dict(betas=(0.9, -0.1)), "-0.1"),
    ("betas", dict(betas=(0.9, 1.5)), "1.5"),
    ("weight_decay", dict(weight_decay=-0.01), "-0.01"),
    ("bias_correction", dict(bias_correction="sometimes"), "sometimes"),
    ("weight_decay_mode", dict(weight_decay_mode="adamw"), "adamw"),
    ("trust_ratio", dict(min_trust_ratio=0.5, max_trust_ratio=0.1), "0.5"),
    ("min_trust_ratio", dict(min_trust_ratio=-0.5), "-0.5"),
    ("max_grad_norm", dict(max_grad_norm=0.0), "0.0"),
    ("max_grad_norm", dict(max_grad_norm=-1.0), "-1.0"),
    ("weight_norm_bounds", dict(weight_norm_bounds=(2.0, 1.0)), "2.0"),
    ("foreach", dict(foreach=True, fused=True), "fused"),
]

BAD_LARS = [
    ("lr", dict(lr=-0.1), "-0.1"),
    ("momentum", dict(lr=0.1, momentum=-0.9), "-0.9"),
    ("weight_decay", dict(lr=0.1, weight_decay=-1e-4), "-0.0001"),
    ("trust_coefficient", dict(lr=0.1, trust_coefficient=0.0), "0.0"),
    ("trust_coefficient", dict(lr=0.1, trust_coefficient=-0.001), "-0.001"),
    ("eps", dict(lr=0.1, eps=-1.0), "-1.0"),
    ("nesterov", dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    ("denominator", dict(lr=0.1, denominator="max"), "max"),
    ("foreach", dict(lr=0.1, foreach=True, fused=True), "fused"),
]


def _check_error(cls, kwargs, name, value):
    with pytest.raises(ValueError) as e:
        cls(P(), **kwargs)
    msg = str(e.value)
    assert name in msg, msg
    assert value in msg, msg


@pytest.mark.parametrize("name,kwargs,value", BAD_LAMB, ids=[f"{n}={v}" for n, _, v in BAD_LAMB])
def test_lamb_bad_hyperparameters(name, kwargs, value):
    _check_error(Lamb, kwargs, name, value)


@pytest.mark.parametrize("name,kwargs,value", BAD_LARS, ids=[f"{n}={v}" for n, _, v in BAD_LARS])
def test_lars_bad_hyperparameters(name, kwargs, value):
    _check_error(Lars, kwargs, name, value)


def test_range_messages_name_the_allowed_range():
    with pytest.raises(ValueError) as e:
        Lamb(P(), betas=(0.9, 1.0))
    msg = str(e.value)
    assert "betas" in msg and "1.0" in msg and ("[0" in msg or "0 <=" in msg or "0.0" in msg), msg
    with pytest.raises(ValueError) as e:
        Lars(P(), lr=0.1, trust_coefficient=0.0)
    msg = str(e.value)
    assert "trust_coefficient" in msg and ("(0" in msg or "> 0" in msg), msg


def test_bad_group_option_in_add_param_group_raises():
    opt = Lamb(P(), lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "weight_decay": -1.0})


@pytest.mark.parametrize("cls,kw", [(Lamb, {}), (Lars, {"lr": 0.1})])
def test_sparse_gradient_raises(cls, kw):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters(), **kw)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"):
        opt.step()


@pytest.mark.parametrize("cls,kw", [(Lamb, {}), (Lars, {"lr": 0.1})])
def test_complex_parameter_raises(cls, kw):
    p = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises((RuntimeError, ValueError, TypeError), match="(?i)complex"):
        opt = cls([p], **kw)
        p.grad = torch.ones_like(p)
        opt.step()
