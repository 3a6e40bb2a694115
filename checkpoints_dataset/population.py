"""Build a checkpoint dataset: many training runs of one task at once, written to a store.

Runs are vectorized with torch.func: the parameters of R runs are stacked ``[R, ...]``, one
``vmap(grad(loss))`` gives every run's gradient on its own minibatch, and Adam / SGD-momentum are
written as tensor ops over the stack with per-run learning rate, weight decay and momentum (``optim``,
below the tasks; its names are re-exported here).

Every run ``r`` draws its seed and hyperparameters from ``(config.seed, r)`` alone (``draw_hparams``), so
the dataset does not depend on grouping, sharding or interruptions. Runs are split into fixed groups
``g = [g*G, (g+1)*G)``; each finished group is written atomically as one store shard ``group_{g:05d}``.
A build skips groups whose shard exists (resume after a kill) and, with ``shard=(i, N)``, builds only the
groups with ``g % N == i``. The per-group trainer is ``task.train_population`` (generic supervised
training in ``ClassificationTask``; a task may bring its own, e.g. cartpole).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import store
from .fileio import is_terminal
from .optim import (GroupResult, InitScheme, OptimizerName, PopulationConfig, adam_first, checkpoint_schedule,
                    init_optimizer_state, optimizer_step)
from .tasks import Task, TaskRef, task_id

# GroupResult, checkpoint_schedule and the optimizers live in .optim (below the tasks); re-exported here
log = logging.getLogger(__name__)

__all__ = ["GroupResult", "InitScheme", "OptimizerName", "PopulationConfig", "adam_first", "build_config",
           "build_population", "checkpoint_schedule", "draw_hparams", "init_optimizer_state", "optimizer_step",
           "init_seed", "run_seed", "shard_name", "ensure_store", "store_is_complete"]



def run_seed(seed: int, run_id: int) -> int:
    """A 63-bit seed for run ``run_id`` of a build seeded with ``seed`` (independent of grouping)."""
    state = np.random.SeedSequence([int(seed), int(run_id)]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def init_seed(seed: int, init_group: int) -> int:
    """A 63-bit seed for the init shared by the runs of ``init_group`` (``runs_per_init`` > 1)."""
    state = np.random.SeedSequence([int(seed), int(init_group), 1]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def draw_hparams(config: PopulationConfig, run_id: int) -> dict:
    """The JSON-able hyperparameters of one run, drawn from the config's ranges by its own seed. With
    ``runs_per_init`` K > 1 the run also records its ``init_group`` (run_id // K) and that group's
    ``init_seed``, and takes the group's ``init_scale``: the runs of a group start from one init."""
    seed = run_seed(config.seed, run_id)
    rng = np.random.default_rng(seed)
    optimizer = str(config.optimizers[int(rng.integers(len(config.optimizers)))])
    lr = float(np.exp(rng.uniform(np.log(config.lr[0]), np.log(config.lr[1]))))
    hparams = {
        "run_id": int(run_id), "seed": seed, "optimizer": optimizer,
        "lr": lr * (config.sgd_lr_scale if optimizer == "sgd" else 1.0),
        "weight_decay": float(rng.uniform(*config.weight_decay)),
        "momentum": float(rng.uniform(*config.momentum)),
        "init_scale": float(rng.uniform(*config.init_scale)),
        "init_scheme": config.init_scheme,
    }
    if config.compressed:   # drawn after the rest, so a run's other hyperparameters do not depend on it
        hparams["sparsity"] = float(config.sparsity[int(rng.integers(len(config.sparsity)))])
        hparams["bits"] = int(config.bits[int(rng.integers(len(config.bits)))])
    if config.runs_per_init > 1:
        group = int(run_id) // config.runs_per_init
        shared = init_seed(config.seed, group)
        hparams.update(init_group=group, init_seed=shared,
                       init_scale=float(np.random.default_rng(shared).uniform(*config.init_scale)))
    return hparams


# ---------------------------------------------------------------- the builder

def shard_name(group: int) -> str:
    return f"group_{group:05d}"


def build_config(task: "Task", config: PopulationConfig) -> dict:
    """What identifies a build: building into a store made with another one fails."""
    options = task.build_options()  # e.g. cartpole's trainer; absent when empty (stores built before keep matching)
    return {"task": task_id(task), "num_params": task.num_params, **({"task_options": options} if options else {}),
            **config.to_json()}


def build_population(task: "Task", out: str | Path, config: PopulationConfig, device: str | torch.device = "cpu",
                     shard: tuple[int, int] = (0, 1), progress: bool = True, dtype: str = "float32",
                     workers: int = 1):
    """Build (or resume) this shard's groups of runs into the store at ``out`` (parameters stored as
    ``dtype``: "float32", or "float16" for half the disk and memory).

    ``workers`` > 1 builds with that many processes (this one and spawned helpers, the torch threads split
    between them): a small network's vmapped training uses one thread better than several, so processes
    scale where threads do not. Each process takes the next group nobody holds; the store is the same as
    with one process (every run draws from its own seed). What a failed helper left, this process builds.

    Returns the opened store once every group of every shard is present (the store is then finalized),
    else None (other shards still have groups to build).
    """
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (i, N) with N >= 1 and 0 <= i < N, got {index}/{count}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (processes building at once), got {workers}")
    if config.compressed and not {"sparsity", "bits"} <= set(task.metric_names):
        raise ValueError(f"a compressed build (sparsity {config.sparsity}, bits {config.bits}) needs a task that "
                         f"trains compressed runs and scores them: task {task.name!r} has no metrics sparsity and "
                         "bits; for digits_mlp or fashion_mlp add --task-option compression=True")
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store.create_store(out, task=task_id(task), layer_shapes=task.layer_shapes,
                       metric_names=list(task.metric_names), lower_is_better=dict(task.lower_is_better),
                       permutation_spec=_spec_json(task), build_config=build_config(task, config), dtype=dtype)
    num_groups = math.ceil(config.runs / config.group_size)
    mine = [g for g in range(num_groups) if g % count == index]
    todo = [g for g in mine if not store.shard_exists(out, shard_name(g))]
    workers = max(1, min(workers, len(todo)))
    terminal = is_terminal(sys.stderr)   # in a log file, a redraw every 10 s (each is a carriage-return line)
    bar = tqdm(total=len(todo), unit="group", disable=not progress, mininterval=0.1 if terminal else 10,
               desc=f"{task.name} {len(mine) - len(todo)}/{len(mine)} groups done"
                    + (f", {workers} processes" if workers > 1 else ""),
               bar_format="{l_bar}{bar}| {n:.2f}/{total} groups [{elapsed}<{remaining}{postfix}]")

    def count_done():   # groups finished by any process (a redraw only as often as the bar's mininterval)
        bar.n = sum(store.shard_exists(out, shard_name(g)) for g in todo)
        bar.update(0)

    threads = torch.get_num_threads()
    helpers = _start_helpers(task, out, config, device, todo, workers - 1, max(1, threads // workers))
    try:
        if helpers:
            torch.set_num_threads(max(1, threads // workers))
        for g in todo:
            _build_group(task, out, config, device, g, wait=not helpers,   # helpers: skip the groups they hold
                         progress=lambda f: bar.update(max(0.0, min(f, bar.total - bar.n))))
            count_done()
            bar.set_postfix(group=g, refresh=terminal)
        for p in helpers:
            while p.is_alive():
                p.join(timeout=2.0)
                count_done()
        for g in todo if helpers else ():   # what a failed helper (or another builder) left: wait, build the rest
            _build_group(task, out, config, device, g, wait=True,
                         progress=lambda f: bar.update(max(0.0, min(f, bar.total - bar.n))))
            count_done()
    finally:
        torch.set_num_threads(threads)
        for p in helpers:   # after an error here (or Ctrl-C) no helper keeps training
            if p.is_alive():
                p.terminate()
                p.join()
        bar.close()
    failed = [p.exitcode for p in helpers if p.exitcode != 0]
    if failed:
        log.warning("%d of the %d helper build processes failed (exit codes %s; their error is printed above); "
                    "this process built the groups they left", len(failed), len(helpers), failed)
    if all(store.shard_exists(out, shard_name(g)) for g in range(num_groups)):
        store.finalize_store(out)
        return store.open_store(out)
    return None


def _build_group(task: "Task", out: Path, config: PopulationConfig, device: torch.device, g: int, wait: bool,
                 progress=None) -> None:
    """Train and write group ``g`` unless it exists; ``wait=False``: skip it while another process holds it."""
    with _group_lock(out, g, wait) as held:
        if held and not store.shard_exists(out, shard_name(g)):
            run_ids = list(range(g * config.group_size, min((g + 1) * config.group_size, config.runs)))
            hparams = [draw_hparams(config, r) for r in run_ids]
            result = task.train_population(hparams, config, device, progress=progress)   # fractions may sum past 1
            _write_group(out, g, run_ids, hparams, result)


def _helper(task: "Task", out: Path, config: PopulationConfig, device: torch.device, groups: list[int],
            threads: int) -> None:
    """A spawned build process: the groups nobody holds, in order (the parent finalizes the store)."""
    torch.set_num_threads(threads)
    for g in groups:
        _build_group(task, out, config, device, g, wait=False)


def _start_helpers(task: "Task", out: Path, config: PopulationConfig, device: torch.device, groups: list[int],
                   count: int, threads: int) -> list:
    if count < 1:
        return []
    import pickle

    import torch.multiprocessing as mp
    context = mp.get_context("spawn")   # fork after torch has started its thread pools can deadlock
    helpers = [context.Process(target=_helper, args=(task, out, config, device, groups[i + 1:] + groups[:i + 1],
                                                     threads), daemon=True) for i in range(count)]
    for i, p in enumerate(helpers):
        try:
            p.start()   # pickles the task for the new process
        except (pickle.PicklingError, AttributeError, TypeError) as e:   # a class from __main__, a lambda, a handle
            for started in helpers[:i]:
                started.terminate()
                started.join()
            raise ValueError(f"building with several processes sends the task to each of them, and task "
                             f"{task.name!r} cannot be pickled ({e}); build with one process (workers=1, "
                             "--workers 1)") from e
    return helpers


@contextlib.contextmanager
def _group_lock(out: Path, group: int, wait: bool = True):
    """An exclusive lock on building one group of runs into the store at ``out``: builders of any shards
    (several machines, or `gpt-params train` beside `build-dataset`) never train the same group at once.
    Yields whether it is held: with ``wait=False``, False at once when another process holds it."""
    with open(out / f".build-{shard_name(group)}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _spec_json(task: "Task") -> dict | None:
    try:
        return task.permutation_spec.to_json()
    except (NotImplementedError, ValueError, TypeError):  # no spec for this architecture
        return None


def _write_group(out: Path, group: int, run_ids: list[int], hparams: list[dict], result: GroupResult) -> int:
    R, C, P = result.params.shape
    return store.write_shard(
        out, shard_name(group),
        params=result.params.reshape(R * C, P).numpy(),                              # [R*C, P]
        run_ids=np.repeat(np.asarray(run_ids, dtype=np.int64), C),                    # [R*C]
        steps=np.tile(result.steps.numpy().astype(np.int64), R),
        epochs=np.tile(result.epochs.numpy().astype(np.float64), R),
        metrics={k: v.reshape(R * C).numpy() for k, v in result.metrics.items()},
        run_hparams={h["run_id"]: h for h in hparams})




def store_is_complete(s: "store.CheckpointStore") -> bool:
    """Whether a store holds all its runs (a recorded store, or a build that was not cut short)."""
    built = s.manifest.get("build_config") or {}
    return "runs" not in built or s.num_runs >= built["runs"]


def ensure_store(root: str | Path, task: TaskRef | None, config: PopulationConfig, device: str | torch.device = "cpu",
                 *, rank_zero: bool = True, option: str = "--task", timeout_s: float = 3600.0,
                 dtype: str = "float32", workers: int = 1) -> "store.CheckpointStore":
    """A complete store at ``root``: opened as it is, built with ``task`` and ``config`` when missing, or an
    interrupted build finished with the settings it recorded (its task must be built in, or the import path
    ``task`` names: a name read from a manifest is never imported otherwise; ``option`` is the user's flag
    for it). A group another process is building is waited for (``build_population``'s locks); with ``rank_zero``
    False the caller only waits for another process's build (DDP ranks). ``dtype``: the storage dtype of a new
    build ("float16" halves disk and memory); an interrupted build keeps its own. ``workers``: processes
    building at once (``build_population``)."""
    root = Path(root)
    if (root / "manifest.json").exists():
        existing = store.open_store(root)
        if store_is_complete(existing):
            return existing
        built = existing.manifest.get("build_config") or {}
        dtype = existing.manifest.get("dtype", dtype)
        options = {**(task.options if task is not None else {}), **built.get("task_options", {})}
        task = TaskRef.from_file(existing.task, options, given=None if task is None else task.name, option=option,
                                 source=f"the interrupted build at {root}")
        fields = {f.name for f in dataclasses.fields(PopulationConfig)}
        config = PopulationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in built.items()
                                     if k in fields})
    elif task is None:
        raise ValueError(f"no checkpoint store at {root}: give {option} NAME to build one there, or the "
                         "directory of an existing store")
    if not rank_zero:
        return _wait_for_store(root, timeout_s)
    log.info("Building the %s checkpoint store at %s (%d runs x %d epochs) ...", task.name, root, config.runs,
             config.epochs)
    built_store = build_population(task.task, root, config, device=device, dtype=dtype, workers=workers)  # waits for a running build
    if built_store is None:
        raise ValueError(f"the store at {root} is built in shards and some are still missing; finish them with "
                         "`gpt-params build-dataset ... --shard I/N` first")
    return built_store


def _wait_for_store(root: Path, timeout_s: float) -> "store.CheckpointStore":
    """Wait for another process's build (a finalized manifest that lists every run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            existing = store.open_store(root)
            if store_is_complete(existing):
                return existing
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(2.0)
    raise TimeoutError(f"waited {timeout_s:.0f} s for another process to build the store at {root}")
