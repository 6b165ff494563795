"""The training loop on a DeepSpeed engine, and the ``check`` dry run.

Data order is a pure function of (seed, step): optimizer step ``s`` uses samples
``perm_e[k*G:(k+1)*G]`` of epoch ``e, k = divmod(s, steps_per_epoch)``; its micro-batch ``j`` on rank
``r`` is chunk ``j*world + r`` of that global batch. A resumed run therefore needs only the step, and
the same global batch is seen whatever the world size or micro-batch.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

import lamb
import lamb.deepspeed

from .build import build_optimizer, build_scheduler, deepspeed_config
from .checkpoint import load_named_state
from .recipe import batch_arithmetic, load_recipe
from .tasks import make_task


class NonFiniteLoss(RuntimeError):
    pass


class PeerLost(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); a plain ``python -m`` is world size 1."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if "OMP_NUM_THREADS" not in os.environ:  # ranks sharing cores must not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), verbose=False,
                                   auto_mpi_discovery="OMPI_COMM_WORLD_RANK" in os.environ)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_comm_error(e: BaseException) -> bool:
    names = {type(x).__name__ for x in (e, e.__cause__) if x is not None}
    text = str(e)
    return bool(names & {"DistBackendError", "DistNetworkError", "DistError"}) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Gloo", "gloo",
                            "Socket Timeout", "Timed out waiting", "Broken pipe"))


# ---------------------------------------------------------------------------------------------- data order
class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches, as lists of ``(index, epoch)``, for steps ``start..stop-1``."""

    def __init__(self, n: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int,
                 start: int, stop: int):
        self.n, self.G, self.mb, self.world, self.rank, self.seed = n, global_batch, micro_batch, world, rank, seed
        self.start, self.stop = start, stop
        self.steps_per_epoch = n // global_batch
        self.acc = global_batch // (micro_batch * world)
        self._perm_epoch, self._perm = None, None

    def global_batch(self, step: int) -> tuple[int, torch.Tensor]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return epoch, self._perm[k * self.G:(k + 1) * self.G]

    def __iter__(self):
        for step in range(self.start, self.stop):
            epoch, idx = self.global_batch(step)
            for j in range(self.acc):
                c = j * self.world + self.rank
                yield [(int(i), epoch) for i in idx[c * self.mb:(c + 1) * self.mb]]

    def __len__(self):
        return (self.stop - self.start) * self.acc


def total_steps(recipe, n_train: int) -> int:
    t, G = recipe["train"], recipe["batch"]["global_batch"]
    if n_train < G:
        raise ValueError(f"{recipe.path}: batch.global_batch {G} is larger than the training set ({n_train} samples)")
    if t["max_steps"] is not None:
        return t["max_steps"]
    return max(1, int(t["epochs"] * (n_train // G)))


def _loader(ds, sampler, workers):
    # its own generator: creating an iterator must not draw from the global RNG (bit-exact resume)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                       generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- helpers
class StepGuard:
    """Lets the trainer skip one optimizer step: DeepSpeed sees ``overflow`` and skips the scheduler too."""

    def __init__(self, optimizer):
        self.skip = False
        step = optimizer.step
        optimizer.overflow = False

        def guarded(opt, *a, **k):
            opt.overflow = self.skip
            if self.skip:
                return None
            return step(*a, **k)

        optimizer.step = types.MethodType(guarded, optimizer)  # a bound method, as LRScheduler expects


def param_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for n, p in sorted(module.named_parameters()):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def whole_params(module: torch.nn.Module, zero_stage: int):
    """Context in which every parameter holds its full value: ZeRO-3 keeps only shards outside the forward
    and backward, so it gathers them (a collective: every rank enters it) and re-partitions on exit."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def _log0(rank, msg):
    if rank == 0:
        print(msg, flush=True)


@torch.no_grad()
def evaluate(task, engine, ds, micro_batch, world, rank, workers) -> dict:
    engine.eval()
    idx = list(range(rank, len(ds), world))
    batches = [idx[i:i + micro_batch] for i in range(0, len(idx), micro_batch)]
    sums: dict[str, float] = {}
    for batch in _loader(ds, batches, workers):
        for k, v in task.eval_sums(engine, batch).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    keys = _broadcast(sorted(sums))
    t = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    engine.train()
    return task.summarize(dict(zip(keys, t.tolist())))


# ---------------------------------------------------------------------------------------------- train
def train(recipe_path: str, overrides: list[str], stop_at_step: int | None = None) -> int:
    import deepspeed

    from .checkpoint import Checkpointer
    from .tracking import Tracker

    pre = load_recipe(recipe_path, overrides, world_size=1)  # the timeout is needed before the world is known
    rank, world, local_rank = init_distributed(pre["train"]["dist_timeout_s"])
    recipe = load_recipe(recipe_path, overrides, world_size=world)
    t, b = recipe["train"], recipe["batch"]
    acc, _ = batch_arithmetic(recipe, world)
    out = Path(t["output_dir"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(_yaml(recipe))
        if world != b["world_size"]:
            print(f"note: recipe targets world size {b['world_size']}, running on {world}; "
                  f"accumulation adjusted to keep the global batch", flush=True)
    _log0(rank, f"global batch {b['global_batch']} = micro-batch {b['micro_batch']} x accumulation {acc} "
                f"x world size {world}")

    torch.manual_seed(t["seed"])  # model init is identical on every rank (DeepSpeed also broadcasts it)
    task = make_task(recipe)
    cache = Path(recipe["data"].get("cache_dir") or out / "cache")
    task.build_data(cache, is_builder=local_rank == 0, barrier=_barrier)
    steps = total_steps(recipe, len(task.train_ds))
    steps_per_epoch = len(task.train_ds) // b["global_batch"]
    model = task.build_model()

    ckpt = Checkpointer(out, rank, t["keep_checkpoints"], _barrier, _broadcast)
    tag = ckpt.latest()
    init = None
    if tag is None and t["init_from"]:  # BERT phase 2: weights and moments of another run, step 0
        init = _read_init(t["init_from"], rank)
        _load_weights(model, init["weights"], t["init_from"], recipe.path)

    optimizer = build_optimizer(recipe, model, task.default_param_groups)
    guard = StepGuard(optimizer)  # before the scheduler, which wraps optimizer.step
    scheduler = build_scheduler(recipe, optimizer, steps, steps_per_epoch)
    stage = recipe["deepspeed"]["zero_stage"]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(recipe, world))
    layout = None
    if isinstance(optimizer, (lamb.Lamb, lamb.Lars)):
        # ZeRO-1/2/3: per-parameter trust ratios on DeepSpeed's flat partitions (a no-op without partitions)
        layout = lamb.deepspeed.attach(engine, optimizer)

    start, run_id, target_step = 0, None, None
    if tag is not None:
        state = ckpt.load(engine, tag, optimizer, world, stage)
        start, run_id, target_step = state["step"], state.get("wandb_run_id"), state.get("target_reached_step")
        _log0(rank, f"resumed from {ckpt.dir / tag} at step {start}")
    else:
        if init is not None:
            load_named_state(optimizer, init["state"], reset_step=True, weights=init["weights"])
            _log0(rank, f"initialised from {init['path']} (its step {init['step']}): weights and optimizer moments; "
                        f"step, lr schedule and data position start from 0")
        torch.manual_seed(t["seed"] + 1 + rank)  # dropout etc.: independent streams per rank
    if start >= steps:
        _log0(rank, f"nothing to do: step {start} of {steps} already reached")
        return 0

    def save(step_):
        client = {"lamb": lamb.deepspeed.consolidated_state_dict(optimizer)} if layout is not None else None
        trainer_state = {"step": step_, "samples": step_ * b["global_batch"], "world_size": world,
                         "zero_stage": stage, "recipe": dict(recipe), "wandb_run_id": tracker.run_id,
                         "target_reached_step": target_step}
        if init is not None:
            trainer_state["init_from"] = {"path": str(init["path"]), "step": init["step"]}
        ckpt.save(engine, step_, trainer_state, client)

    tracker = Tracker(recipe, out, rank, start, steps, run_id)
    stop = min(steps, stop_at_step) if stop_at_step is not None else steps
    if stop <= start:  # --stop-at-step 0: checkpoint the initial state (e.g. a phase-2 start) and exit
        if tag is None:
            save(start)
        tracker.close()
        return 0
    eval_every = t["eval_every"] or (max(1, round(t["eval_every_epochs"] * steps_per_epoch))
                                     if t["eval_every_epochs"] else 0)
    tr = recipe["tracking"]
    sampler = StepSampler(len(task.train_ds), b["global_batch"], b["micro_batch"], world, rank, t["seed"],
                          start, stop)
    it = iter(_loader(task.train_ds, sampler, recipe["data"]["num_workers"]))
    fail = os.environ.get("TRAINERS_FAIL_AT")  # test hook "rank:step": raise on that rank at that step
    step = start
    try:
        for step in range(start + 1, stop + 1):
            if fail and fail == f"{rank}:{step}":
                raise RuntimeError(f"injected failure (TRAINERS_FAIL_AT={fail})")
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum, bad = 0.0, 0.0
            for j in range(acc):
                batch = next(it)
                loss = task.forward(engine, batch)
                lv = float(loss.detach())
                bad = bad or float(not torch.isfinite(torch.tensor(lv)))
                loss_sum += lv
                if j == acc - 1:  # one small all-reduce per optimizer step: mean loss and the NaN flag
                    stats = torch.tensor([loss_sum, bad], dtype=torch.float64)
                    if world > 1:
                        dist.all_reduce(stats)
                    if stats[1] > 0:
                        if t["nonfinite"] == "stop":
                            raise NonFiniteLoss(f"non-finite loss at step {step} (train.nonfinite: stop); "
                                                f"last checkpoint in {ckpt.dir}")
                        guard.skip = True
                engine.backward(loss)
                engine.step()
            skipped = guard.skip
            if skipped:
                _log0(rank, f"warning: non-finite loss at step {step}: optimizer step skipped (train.nonfinite: skip)")
                guard.skip = False
            dt = time.perf_counter() - t0
            mean_loss = float(stats[0]) / (acc * world)
            tracker.log(step, {"loss": mean_loss, "lr": lr, "samples_per_s": b["global_batch"] / dt,
                               "step_time_s": dt, **({"skipped": True} if skipped else {})},
                        optimizer if step % max(1, t["log_every"]) == 0 else None)
            reached = False
            if task.eval_ds is not None and eval_every and step % eval_every == 0 and step != steps:
                ev = evaluate(task, engine, task.eval_ds, b["micro_batch"], world, rank, recipe["data"]["num_workers"])
                tracker.log_eval(step, ev)
                if target_step is None and _target_reached(tr, ev):
                    target_step, reached = step, True
                    _log0(rank, f"target {tr['target_metric']} >= {tr['target_value']} reached at step {step}")
            stop_now = reached and tr["stop_at_target"]
            if (t["checkpoint_every"] and step % t["checkpoint_every"] == 0) or step == stop or stop_now:
                save(step)
            if stop_now:
                _log0(rank, "stopping at the target (tracking.stop_at_target)")
                break
    except NonFiniteLoss as e:
        _log0(rank, f"error: {e}")
        tracker.close()
        return 1
    except Exception as e:
        if _is_comm_error(e):
            print(f"rank {rank}: lost contact with another rank during step {step}: it probably died "
                  f"(see its error above); exiting. ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                  file=sys.stderr, flush=True)
            os._exit(3)  # a collective is broken: a normal shutdown could block in atexit handlers
        print(f"rank {rank}: failed at step {step}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise

    summary = {"step": step, "total_steps": steps}
    if step == steps and task.eval_ds is not None:
        ev = evaluate(task, engine, task.eval_ds, b["micro_batch"], world, rank, recipe["data"]["num_workers"])
        tracker.log_eval(step, ev)
        summary.update(ev)
        if target_step is None and _target_reached(recipe["tracking"], ev):
            target_step = step
    if recipe["tracking"]["target_metric"]:
        summary["target"] = {"metric": recipe["tracking"]["target_metric"],
                             "value": recipe["tracking"]["target_value"], "reached_step": target_step}
    import resource

    with whole_params(engine.module, stage):
        mine = (param_digest(engine.module), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if rank == 0 and step == steps:  # the trained model, loadable with transformers' from_pretrained
            engine.module.save_pretrained(str(out / "final"))
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    digests = [g[0] for g in gathered]
    if rank == 0:
        summary["peak_rss_mib_per_rank"] = [round(g[1], 1) for g in gathered]
        summary["param_sha256_per_rank"] = digests
        summary["ranks_identical"] = len(set(digests)) == 1
        if not summary["ranks_identical"]:
            print("warning: parameters differ between ranks", file=sys.stderr)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    tracker.close()
    _barrier()
    return 0


def _target_reached(tr: dict, ev: dict) -> bool:
    m = tr["target_metric"]
    return m is not None and m in ev and ev[m] >= tr["target_value"]


def _read_init(src: str, rank: int) -> dict:
    """The latest checkpoint of the run in ``src`` (its output_dir), verified, read by name on every rank."""
    from .checkpoint import Checkpointer, CheckpointError, read_named_state
    from .recipe import RecipeError

    c = Checkpointer(src, rank, 1, _barrier, _broadcast)
    try:
        tag = c.latest()
    except CheckpointError as e:
        raise RecipeError(f"train.init_from: {e}") from None
    if tag is None:
        raise RecipeError(f"train.init_from: {src} has no checkpoint ({c.dir} is empty or missing)")
    weights, state = read_named_state(c.dir / tag)
    meta = json.loads((c.dir / tag / "trainer.json").read_text())
    return {"path": c.dir / tag, "step": meta.get("step"), "weights": weights, "state": state}


def _fill_tied_placeholders(own: dict, weights: dict) -> dict:
    """A ZeRO-3 checkpoint stores each parameter's shard only, and the consolidated state that makes the
    weights whole again holds a tied parameter (BERT's decoder weight = the word embeddings) under its first
    name only: the second name keeps an empty placeholder. Give it the value of the name it is tied to (the
    two state-dict entries of a tied parameter share storage in the model being loaded)."""
    tied: dict[int, list[str]] = {}
    for k, v in own.items():
        if v.numel():
            tied.setdefault(v.data_ptr(), []).append(k)
    out = dict(weights)
    for names in tied.values():
        whole = next((out[n] for n in names if n in out and out[n].shape == own[n].shape), None)
        for n in names:
            if whole is not None and n in out and out[n].numel() == 0:
                out[n] = whole
    return out


def _load_weights(model, weights: dict, src: str, where: str):
    from .recipe import RecipeError

    own = model.state_dict()
    weights = _fill_tied_placeholders(own, weights)
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise RecipeError(f"{where}: train.init_from: {src} holds a different model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); model.type/preset/config must match the first phase")
    for k, v in own.items():
        if weights[k].shape != v.shape:
            hint = (" (set model.config.max_position_embeddings equal in both phases, e.g. 512)"
                    if "position" in k else "")
            raise RecipeError(f"{where}: train.init_from: {k} has shape {tuple(weights[k].shape)} in {src}, "
                              f"{tuple(v.shape)} here{hint}")
    model.load_state_dict(weights)


def _yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(dict(recipe), sort_keys=False)


# ---------------------------------------------------------------------------------------------- check
def check(recipe_path: str, overrides: list[str]) -> int:
    """Validate, then build the full model and data pipeline and take one optimizer step on CPU."""
    recipe = load_recipe(recipe_path, overrides)
    b = recipe["batch"]
    w = b["world_size"]
    acc, _ = batch_arithmetic(recipe, w)
    print(f"{recipe_path}: recipe valid")
    print(f"global batch {b['global_batch']} = micro-batch {b['micro_batch']} x accumulation {acc} "
          f"x world size {w}")
    torch.manual_seed(recipe["train"]["seed"])
    task = make_task(recipe)
    out = Path(recipe["train"]["output_dir"])
    t0 = time.perf_counter()
    task.build_data(Path(recipe["data"].get("cache_dir") or out / "cache"), True, lambda: None)
    steps = total_steps(recipe, len(task.train_ds))
    steps_per_epoch = len(task.train_ds) // b["global_batch"]
    print(f"data: {len(task.train_ds)} training samples"
          + (f", {len(task.eval_ds)} evaluation samples" if task.eval_ds is not None else "")
          + f"; {steps} optimizer steps ({steps * b['global_batch'] / len(task.train_ds):.2f} epochs)"
          + f" [{time.perf_counter() - t0:.1f} s]")
    model = task.build_model()
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, {n / 1e6:.2f} M parameters")
    optimizer = build_optimizer(recipe, model, task.default_param_groups)
    scheduler = build_scheduler(recipe, optimizer, steps, steps_per_epoch)
    if recipe["train"]["init_from"]:
        print(f"init_from: {recipe['train']['init_from']} (read when training starts without a checkpoint of its own)")
    mb = min(2, b["micro_batch"])
    batch = torch.utils.data.default_collate([task.train_ds[(i, 0)] for i in range(mb)])
    loss = task.forward(model, batch)
    loss.backward()
    optimizer.step()
    scheduler.step()
    if not torch.isfinite(loss.detach()):
        print(f"error: the dry-run loss is {float(loss.detach())}")
        return 1
    print(f"dry run: one optimizer step with micro-batch {mb}: loss {float(loss.detach()):.4f}, "
          f"{type(optimizer).__name__}, next lr {scheduler.get_last_lr()[0]:.4g}")
    print("deepspeed config:", json.dumps(deepspeed_config(recipe, w), sort_keys=True))
    return 0
