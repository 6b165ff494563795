"""One training run of the scaling experiment: (task, optimizer, batch, lr, seed) -> a result record.

Optimizers and the parameters they exclude (the recipes' conventions, RECIPES.md):

- ``lamb``:  ``lamb.Lamb`` (Alg. 2: decay inside the trust ratio, bias correction, eps 1e-6), groups from
  ``lamb.param_groups(model, wd, preset="bert")``: biases and normalisation layers get no decay, every tensor is
  adapted. Schedule: NVIDIA's ``poly_warmup`` (linear warmup, then ``(1 - p) ** 0.5``).
- ``adamw``: ``torch.optim.AdamW`` (eps 1e-6, as LAMB), same groups and schedule.
- ``lars``:  ``lamb.Lars`` (MLPerf: trust coefficient 0.001, eps 0, heavy-ball momentum 0.9), groups from
  ``preset="mlperf"``: biases and normalisation layers get neither decay nor the trust ratio, so, as in MLPerf's
  reference, they are stepped with the global lr un-adapted. Schedule: MLPerf's ``mlperf_poly`` (linear warmup,
  poly decay power 2 to 1e-4).
- ``sgd``:   ``torch.optim.SGD`` (heavy-ball momentum 0.9), the same decay exclusions and schedule as LARS.
"""

from __future__ import annotations

import math
import platform
import time

import torch
import torch.nn.functional as F

import lamb
from lamb import schedules

from . import data as data_mod
from .models import DeepCNN, TinyBert
from .protocol import TaskConfig, RunSpec, num_steps, warmup_fraction

EVAL_BATCH = {"image": 2500, "mlm": 512}
EVAL_MASK_SEED = 1234
CURVE_POINTS = 40

_DATASETS: dict[str, data_mod.Dataset] = {}


def load_dataset(cfg: TaskConfig) -> data_mod.Dataset:
    """The task's data, loaded once per process."""
    key = f"{cfg.name}|{sorted(cfg.data.items())}"
    if key not in _DATASETS:
        kw = dict(cfg.data)
        source = kw.pop("source")
        loader = {"fmnist": data_mod.load_fashion_mnist, "wiki": data_mod.load_wiki_mlm,
                  "synthetic-images": data_mod.synthetic_images, "synthetic-text": data_mod.synthetic_text}[source]
        ds = loader(**kw)
        if cfg.kind == "mlm":  # the same masks for every run's evaluation
            for split in (ds.val, ds.test):
                g = torch.Generator().manual_seed(EVAL_MASK_SEED)
                split.y = data_mod.mask_tokens(split.x, ds.vocab_size, g)
        _DATASETS[key] = ds
    return _DATASETS[key]


def build_model(cfg: TaskConfig, ds: data_mod.Dataset) -> torch.nn.Module:
    if cfg.kind == "image":
        model = DeepCNN(**cfg.model, num_classes=ds.num_classes)
        return model.to(memory_format=torch.channels_last)
    return TinyBert(ds.vocab_size, ds.train.x.shape[1], **cfg.model)


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "lamb":
        return lamb.Lamb(lamb.param_groups(model, weight_decay, preset="bert"), lr=lr, eps=1e-6)
    if name == "lars":
        return lamb.Lars(lamb.param_groups(model, weight_decay, preset="mlperf"), lr=lr, momentum=0.9,
                         trust_coefficient=0.001, eps=0.0)
    preset = "bert" if name == "adamw" else "mlperf"
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in lamb.param_groups(model, weight_decay, preset=preset)]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=1e-6)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(name: str, lr: float, step: int, total: int, warmup: float) -> float:
    if name in ("lamb", "adamw"):
        return lr * schedules.poly_warmup(step, total, warmup, power=0.5)
    w = int(round(warmup * total))
    return schedules.mlperf_poly(step, base_lr=lr, warmup_steps=w,
                                 decay_steps=schedules.mlperf_decay_steps(total, w), end_lr=1e-4, power=2.0)


def _batches(n: int, batch: int, steps: int, g: torch.Generator):
    """Index batches drawn from consecutive random permutations (an epoch boundary may fall inside a batch)."""
    buf = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while buf.numel() < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=g)])
        idx, buf = buf[:batch], buf[batch:]
        yield idx


@torch.no_grad()
def evaluate(cfg: TaskConfig, model: torch.nn.Module, split: data_mod.Split) -> tuple[float, float]:
    """(metric in %, mean loss): top-1 accuracy, or masked-token accuracy for MLM."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    bs = EVAL_BATCH[cfg.kind]
    for i in range(0, len(split), bs):
        if cfg.kind == "image":
            logits, target = model(split.x[i:i + bs]), split.y[i:i + bs]
        else:
            inputs, mask, _ = split.y
            m = mask[i:i + bs]
            logits, target = model(inputs[i:i + bs], m), split.x[i:i + bs][m]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        total += target.numel()
    model.train()
    return 100.0 * correct / total, loss_sum / total


def run(cfg: TaskConfig, spec: RunSpec, *, threads: int | None = None) -> dict:
    """Train one configuration and return its record (metrics, curve, timing, last trust ratios)."""
    if threads:
        torch.set_num_threads(threads)
    ds = load_dataset(cfg)
    torch.manual_seed(spec.seed)
    model = build_model(cfg, ds)
    wd = cfg.weight_decay[spec.optimizer]
    opt = build_optimizer(spec.optimizer, model, spec.lr, wd)
    n = len(ds.train)
    total = num_steps(cfg, n, spec.batch)
    if total < 1:
        raise ValueError(f"{cfg.name}: batch {spec.batch} gives no step with {n} examples x {cfg.epochs} epochs")
    warm = warmup_fraction(cfg, spec.batch)
    g = torch.Generator().manual_seed(spec.seed)
    every = max(1, total // CURVE_POINTS)
    curve, acc, cnt = [], 0.0, 0
    diverged = False
    t0 = time.perf_counter()
    for step, idx in enumerate(_batches(n, spec.batch, total, g)):
        lr_t = lr_at(spec.optimizer, spec.lr, step, total, warm)
        for group in opt.param_groups:
            group["lr"] = lr_t
        if cfg.kind == "image":
            loss = F.cross_entropy(model(ds.train.x[idx]), ds.train.y[idx])
        else:
            inputs, mask, labels = data_mod.mask_tokens(ds.train.x[idx], ds.vocab_size, g)
            loss = F.cross_entropy(model(inputs, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = loss.item()
        if not math.isfinite(lv):
            diverged = True
            curve.append([step + 1, None])
            break
        acc += lv
        cnt += 1
        if (step + 1) % every == 0 or step + 1 == total:
            curve.append([step + 1, acc / cnt])
            acc, cnt = 0.0, 0
    train_s = time.perf_counter() - t0
    val_metric, val_loss = evaluate(cfg, model, ds.val)
    test_metric, test_loss = evaluate(cfg, model, ds.test)
    if not (math.isfinite(val_loss) and math.isfinite(test_loss)):
        diverged = True
    if diverged:  # NaN weights: argmax of NaN logits is meaningless, so count a diverged run at chance
        chance = 100.0 / ds.num_classes if cfg.kind == "image" else 0.0
        val_metric = test_metric = chance
    ratios = {}
    if spec.optimizer in ("lamb", "lars"):
        names = {id(p): n_ for n_, p in model.named_parameters()}
        for group in opt.param_groups:
            if group.get("layer_adaptation", True):
                for p in group["params"]:
                    tr = opt.state.get(p, {}).get("trust_ratio")
                    if tr is not None:
                        ratios[names[id(p)]] = float(tr)
    return {
        "task": spec.task, "optimizer": spec.optimizer, "batch": spec.batch, "lr": spec.lr, "seed": spec.seed,
        "fingerprint": cfg.fingerprint(), "steps": total, "steps_done": step + 1, "warmup": warm,
        "weight_decay": wd, "epochs": cfg.epochs, "n_train": n,
        "val_metric": val_metric, "val_loss": val_loss, "test_metric": test_metric, "test_loss": test_loss,
        "diverged": diverged, "train_seconds": round(train_s, 3), "threads": torch.get_num_threads(),
        "us_per_example": round(1e6 * train_s / max(1, (step + 1) * spec.batch), 2),
        "curve": curve, "trust_ratios": ratios, "host": platform.node(),
    }


def time_per_example(cfg: TaskConfig, batch: int, steps: int = 3) -> float:
    """Seconds per training example at ``batch`` (a few AdamW steps): the cost model of the run-time estimate."""
    ds = load_dataset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, ds)
    opt = build_optimizer("adamw", model, 1e-4, 0.0)
    g = torch.Generator().manual_seed(0)
    batch = min(batch, len(ds.train))
    ts = []
    for step, idx in enumerate(_batches(len(ds.train), batch, steps + 1, g)):
        t = time.perf_counter()
        if cfg.kind == "image":
            loss = F.cross_entropy(model(ds.train.x[idx]), ds.train.y[idx])
        else:
            inputs, mask, labels = data_mod.mask_tokens(ds.train.x[idx], ds.vocab_size, g)
            loss = F.cross_entropy(model(inputs, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            ts.append(time.perf_counter() - t)
    return min(ts) / batch
