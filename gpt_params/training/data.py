"""The LightningDataModule: a checkpoint store -> (start, target) pairs with permutation augmentation.

Runs are split three ways: the store's own held-out test runs (never seen in training; prompt alignment
is measured on them), a few validation runs (the val loss), and the rest for training. The store is
built at ``root`` when it is missing (``--data.task`` names the task then); an existing store's
manifest decides the task.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from checkpoints_dataset.pairs import PairBatches, PairDataset
from checkpoints_dataset.store import open_store
from checkpoints_dataset.tasks import get_task
from checkpoints_dataset.population import PopulationConfig, build_population


def _plain(value):
    """A JSON-like value as the manifest keeps it: tuples as lists, numpy scalars as Python numbers."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _make_task(name: str, kwargs: dict):
    try:
        return get_task(name, **kwargs)
    except TypeError as e:
        raise ValueError(f"task {name!r} cannot be built with the options {kwargs}: {e}") from None


def _complete(store) -> bool:
    """Whether a store holds all its runs (a recorded store, or a build that was not cut short)."""
    built = store.manifest.get("build_config") or {}
    return "runs" not in built or store.num_runs >= built["runs"]


class ParameterDataModule(pl.LightningDataModule):
    """Pairs of checkpoints from one run of a store, for training the generator.

    Args:
        root: the checkpoint store (built here when missing).
        task: built-in task name or "pkg.module:Class"; only needed to build a store or to evaluate
            the networks of a store recorded by another project.
        metric: the conditioning metric (default: the task's, e.g. val_error for digits_mlp, so that
            test metrics stay held out; test_error gives G.pt's setting).
        batch_size: pairs per step (per device).
        num_workers: DataLoader worker processes.
        init_prob: probability that a pair starts at the run's initial checkpoint (prompts start from
            fresh inits; the prototype found 0.25 doubles alignment over uniform starts).
        ordered: target later than start in the run (G.pt); False allows any two checkpoints.
        augment: "permute" applies one random function-preserving neuron permutation per pair.
        val_runs: training runs set aside for the validation loss.
        build_runs: runs to build when the store is missing.
        build_epochs: epochs per run when building.
        build_seed: seed of the build.
        build_device: device of the build ("cpu" or "cuda").
        data_dir: where the task's data files are (Fashion-MNIST); None: the task's default.
        task_options: other keyword options of the task, e.g. ``{trainer: es}`` for cartpole's evolution
            strategies. A build records the ones that shape its runs, and resumes with those.
        seed: seed of pair sampling and augmentation (each rank adds its rank).
        pair_device: "cpu": training pairs are read from the memory-mapped store per batch (in
            ``num_workers`` processes). A device such as "cuda": the training runs' parameters are loaded
            once onto it and whole batches are sampled and permuted there (no workers; needs the store's
            training runs to fit in its memory). "cuda" means the trainer's own device.
    """

    def __init__(
        self,
        root: str = "data/digits_mlp",
        task: Optional[str] = "digits_mlp",
        metric: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        init_prob: float = 0.25,
        ordered: bool = True,
        augment: Literal["permute", "none"] = "permute",
        val_runs: int = 8,
        build_runs: int = 512,
        build_epochs: int = 20,
        build_seed: int = 0,
        build_device: str = "cpu",
        data_dir: Optional[str] = None,
        task_options: Optional[dict] = None,
        seed: int = 0,
        pair_device: str = "cpu",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root).expanduser().resolve()
        self.store = self._open_or_build()
        self.task_name = self._resolve_task(task)
        if task_options and self.task_name is not None:  # options given: they must build the store's networks
            shapes = _make_task(self.task_name, self._task_kwargs()).layer_shapes
            if {k: tuple(v) for k, v in shapes.items()} != dict(self.store.layer_shapes):
                raise ValueError(f"--data.task_options {task_options} build {self.task_name} networks of other "
                                 f"shapes than the store's at {self.root}: drop the options that change them")
        metric = metric or self._default_metric()
        if metric not in self.store.metric_names:
            raise ValueError(f"--data.metric {metric!r} is not in the store at {self.root}; "
                             f"choose one of {list(self.store.metric_names)}")
        self.metric = metric
        test = set(int(r) for r in self.store.test_runs)
        train = np.array([r for r in self.store.train_runs if int(r) not in test])
        if len(train) < 2:
            raise ValueError(f"the store at {self.root} has {self.store.num_runs} runs, {len(test)} of them held "
                             "out for testing: training needs at least 2 more (one for validation); build or "
                             "record more runs (at least 7)")
        n_val = min(val_runs, max(len(train) // 5, 1))
        self.val_run_ids, self.train_run_ids = train[-n_val:], train[:-n_val]
        self.info = self._make_info()

    # ----------------------------------------------------------------- store
    def _task_kwargs(self) -> dict:
        """The task's keyword options: ``task_options``, ``data_dir``, and the options the store was built with
        (which shape its networks, e.g. cartpole's ``hidden``)."""
        kwargs = dict(self.hparams.task_options or {})
        if self.hparams.data_dir:
            kwargs["data_dir"] = self.hparams.data_dir
        store = getattr(self, "store", None)  # None while the store is being opened or built
        if store is not None:
            kwargs.update((store.manifest.get("build_config") or {}).get("task_options", {}))
        return kwargs

    def _check_task_options(self, built: dict) -> None:
        """Refuse task options that contradict the ones the store was built with (e.g. another trainer)."""
        given = {k: _plain(v) for k, v in (self.hparams.task_options or {}).items()}  # tuples as lists, as the manifest
        clash = sorted(k for k, v in built.items() if k in given and given[k] != v)
        if clash:
            raise ValueError(f"the store at {self.root} was built with the task options {built}; "
                             f"--data.task_options differ on {clash}: drop them to use (or finish) this store, "
                             "or build another one with another --data.root")

    def _open_or_build(self):
        """Open the store; build it (rank 0 only) when missing, finish it when a build was cut short."""
        rank_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
        config, task_name, options = None, self.hparams.task, {}
        if (self.root / "manifest.json").exists():
            store = open_store(self.root)
            built = store.manifest.get("build_config") or {}
            self._check_task_options(built.get("task_options", {}))
            if _complete(store):
                return store
            task_name = store.task       # an interrupted build: resume it with its own settings
            options = built.get("task_options", {})
            fields = {f.name for f in dataclasses.fields(PopulationConfig)}
            config = PopulationConfig(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in built.items() if k in fields})
        elif task_name is None:
            raise ValueError(f"no checkpoint store at {self.root}: give --data.task NAME to build one "
                             "there, or --data.root DIR of an existing store")
        if not rank_zero:
            return self._wait_for_store()
        task = _make_task(task_name, {**self._task_kwargs(), **options})
        config = config or PopulationConfig(runs=self.hparams.build_runs, epochs=self.hparams.build_epochs,
                                            seed=self.hparams.build_seed)
        print(f"Building the {task.name} checkpoint store at {self.root} "
              f"({config.runs} runs x {config.epochs} epochs) ...", flush=True)
        store = build_population(task, self.root, config, device=self.hparams.build_device)
        if store is None:
            raise RuntimeError(f"the store at {self.root} is built in shards and some are still missing; "
                               "finish them with `gpt-params build-dataset ... --shard I/N` first")
        return store

    def _wait_for_store(self, timeout_s: float = 3600.0):
        """Other ranks wait for rank 0's build (a finalized manifest that lists every run)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                store = open_store(self.root)
                if _complete(store):
                    return store
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(2.0)
        raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to build the store at {self.root}")

    def _resolve_task(self, given: Optional[str]) -> Optional[str]:
        """The store's own task; for a store recorded by another project (no task in its manifest), the
        given task if it builds this architecture (else None: networks are not evaluated)."""
        if self.store.task is not None or given is None:
            return self.store.task
        shapes = get_task(given, **self._task_kwargs()).layer_shapes
        if {k: tuple(v) for k, v in shapes.items()} == dict(self.store.layer_shapes):
            return given
        print(f"note: the store at {self.root} was recorded by another project and --data.task {given} does "
              "not build its architecture; generated networks will not be evaluated (pass --data.task "
              "pkg.module:Class to evaluate them)", flush=True)
        return None

    def _default_metric(self) -> str:
        if self.task_name is not None:
            try:
                return get_task(self.task_name, **self._task_kwargs()).default_metric
            except Exception:   # a user task that cannot be imported here: fall back to the store
                pass
        names = list(self.store.metric_names)
        return next((m for m in names if m.startswith("val")), names[0])

    def _make_info(self) -> dict:
        """Everything the generator needs to be rebuilt from its checkpoint (plain JSON types)."""
        store, metric = self.store, self.metric
        all_values = store.metrics(np.arange(store.num_checkpoints))[metric]
        values, init_values = [], []
        for r in np.concatenate([self.train_run_ids, self.val_run_ids]):   # never the held-out test runs
            idx = store.run_checkpoints(r)
            finite = all_values[idx][np.isfinite(all_values[idx])]
            values.append(finite)
            if len(finite):
                init_values.append(finite[0])    # the run's first checkpoint with a finite metric
        values = np.concatenate(values)
        lower = bool(store.lower_is_better.get(metric, True))
        spec = store.manifest.get("permutation_spec")
        return {
            "store_root": str(self.root),
            "task": self.task_name,
            "task_kwargs": self._task_kwargs() if self.task_name is not None else {},
            "metric": metric,
            "lower_is_better": lower,
            "metric_range": [float(values.min()), float(values.max())],
            "best": float(values.min() if lower else values.max()),
            "init_metric": float(np.nanmedian(init_values)),
            "layer_shapes": {k: list(v) for k, v in store.layer_shapes.items()},
            "stats": {k: [float(m), float(s)] for k, (m, s) in store.stats.items()},
            "permutation_spec": spec,
        }

    # ----------------------------------------------------------- dataloaders
    def _dataset(self, runs: np.ndarray, seed: int, device=None) -> PairDataset:
        return PairDataset(self.store, runs=runs, metric=self.metric, init_prob=self.hparams.init_prob,
                           ordered=self.hparams.ordered, permute=self.hparams.augment == "permute",
                           seed=seed, device=device)

    def _pair_device(self) -> Optional[torch.device]:
        """None for memory-mapped reads ("cpu"), else the device the training pairs live on."""
        name = self.hparams.pair_device
        if name == "cpu":
            return None
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and self.trainer is not None:
            root = self.trainer.strategy.root_device  # this rank's GPU under DDP
            device = root if root.type == "cuda" else device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--data.pair_device {name!r} needs CUDA, which is not available here; "
                             "use --data.pair_device cpu")
        return device

    def setup(self, stage: str) -> None:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.train_set = self._dataset(self.train_run_ids, self.hparams.seed + rank, self._pair_device())
        self.val_set = self._dataset(self.val_run_ids, 10_000 + self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        if self.train_set.device is not None:   # whole batches drawn on the device, no workers
            replicas = self.trainer.world_size if self.trainer is not None else 1
            return DataLoader(PairBatches(self.train_set, self.hparams.batch_size, replicas), batch_size=None)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
