"""The LightningDataModule: a checkpoint store -> (start, target) pairs with permutation augmentation.

Runs are split three ways: the store's own held-out test runs (never seen in training; prompt alignment
is measured on them), a few validation runs (the val loss), and the rest for training. The module only
opens its store: ``prepare_store`` (which ``gpt-params train`` calls before it builds anything) builds a
missing store or finishes an interrupted build first. An existing store's manifest decides the task; a
task it names by import path is imported only when ``--data.task`` names the same path.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from checkpoints_dataset.info import DataInfo
from checkpoints_dataset.pairs import PairBatches, PairDataset
from checkpoints_dataset.population import PopulationConfig, ensure_store, store_is_complete
from checkpoints_dataset.store import CheckpointStore, open_store, split_last
from checkpoints_dataset.tasks import Task, TaskRef
from checkpoints_dataset.tasks.ref import plain_json

log = logging.getLogger(__name__)


def _task_kwargs(task_options: Optional[dict], data_dir: Optional[str], store: Optional[CheckpointStore]) -> dict:
    """The task's keyword options: ``task_options``, ``data_dir``, and the options the store was built with
    (which shape its networks, e.g. cartpole's ``hidden``)."""
    kwargs = dict(task_options or {})
    if data_dir:
        kwargs["data_dir"] = data_dir
    if store is not None:
        kwargs.update((store.manifest.get("build_config") or {}).get("task_options", {}))
    return kwargs


def _check_task_options(root: Path, given: Optional[dict], built: dict) -> None:
    """Refuse task options that contradict the ones the store was built with (e.g. another trainer)."""
    given = {k: plain_json(v) for k, v in (given or {}).items()}  # tuples as lists, as the manifest
    clash = sorted(k for k, v in built.items() if k in given and given[k] != v)
    if clash:
        raise ValueError(f"the store at {root} was built with the task options {built}; "
                         f"--data.task_options differ on {clash}: drop them to use (or finish) this store, "
                         "or build another one with another --data.root")


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


class ParameterDataModule(pl.LightningDataModule):
    """Pairs of checkpoints from one run of a store, for training the generator.

    Args:
        root: the checkpoint store (``prepare_store`` builds it when missing).
        task: built-in task name or "pkg.module:Class"; needed to build a store, to evaluate the networks of
            a store recorded by another project, and to import a user task a store names (the same path).
        metric: the conditioning metric (default: the task's, e.g. val_error for digits_mlp, so that
            test metrics stay held out; test_error gives G.pt's setting).
        batch_size: pairs per step (per device).
        num_workers: DataLoader worker processes.
        init_prob: probability that a pair starts at the run's initial checkpoint (prompts start from
            fresh inits; the prototype found 0.25 doubles alignment over uniform starts).
        ordered: target later than start in the run (G.pt); False allows any two checkpoints.
        augment: "permute" applies one random function-preserving neuron permutation per pair.
        best_boost: targets among the best ``best_fraction`` of the training checkpoints (by the metric) are
            drawn with weight ``1 + best_boost`` (others 1), with replacement; 0 (default): each target once
            per epoch. The best prompts are the rarest targets; this shows them more often.
        best_fraction: what "the best" means for ``best_boost`` (a fraction of the training checkpoints).
        val_runs: training runs set aside for the validation loss.
        build_runs: runs to build when the store is missing.
        build_epochs: epochs per run when building.
        build_checkpoints: checkpoints per run when building (the init and the last step included).
        build_dtype: storage dtype of the parameters when building ("float16" halves disk and memory).
        build_group_size: runs trained together when building (fewer: less memory for large networks; the
            runs are the same for any grouping).
        build_optimizers: the optimizers runs draw from when building (a subset of adam, sgd).
        build_lr: the (low, high) learning-rate range runs draw from, log-uniformly (Adam's scale).
        build_sparsity: final sparsities runs draw from when building (compressed runs, with the task option
            ``compression: true``; ``[0.0]``: dense).
        build_bits: bit widths runs draw from when building (``[32]``: float).
        build_seed: seed of the build.
        build_device: device of the build ("cpu" or "cuda").
        build_workers: processes building at once (the torch threads split between them; a small network
            trains faster on one thread per process than on several threads in one; default 1).
        build_runs_per_init: runs that start from one init when building (default 1): with K > 1, runs
            k*K ... k*K + K - 1 share their init and differ in data order and hyperparameters, so the data
            holds several trajectories from each start; test and validation runs are whole init groups.
        data_dir: where the task's data files are (Fashion-MNIST); None: the task's default.
        task_options: other keyword options of the task, e.g. ``{trainer: es}`` for cartpole's evolution
            strategies. A build records the ones that shape its runs, and resumes with those.
        seed: seed of pair sampling and augmentation (each rank adds its rank).
        pair_device: "cpu": training pairs are read from the memory-mapped store per batch (in
            ``num_workers`` processes). A device such as "cuda": the training runs' parameters are loaded
            once onto it and whole batches are sampled and permuted there (no workers; needs the store's
            training runs to fit in its memory). "cuda" means the trainer's own device.
        verify: "full" checks every shard's checksum when opening the store (reads it once); "size" only
            checks that the files have their recorded sizes.
        parts: other metrics of the store to condition on besides ``metric`` (the generator's condition
            parts, e.g. ``[label]`` for a field's class; the task's ``label_metrics`` are categorical).
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
        best_boost: float = 0.0,
        best_fraction: float = 0.1,
        val_runs: int = 8,
        build_runs: int = 512,
        build_epochs: int = 20,
        build_checkpoints: int = 32,
        build_dtype: Literal["float32", "float16"] = "float32",
        build_group_size: int = PopulationConfig.group_size,
        build_optimizers: tuple[str, ...] = PopulationConfig.optimizers,
        build_lr: tuple[float, float] = PopulationConfig.lr,
        build_sparsity: tuple[float, ...] = PopulationConfig.sparsity,
        build_bits: tuple[int, ...] = PopulationConfig.bits,
        build_seed: int = 0,
        build_device: str = "cpu",
        build_workers: int = 1,
        build_runs_per_init: int = 1,
        data_dir: Optional[str] = None,
        task_options: Optional[dict] = None,
        seed: int = 0,
        pair_device: str = "cpu",
        verify: Literal["size", "full"] = "full",
        parts: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root).expanduser().resolve()
        self.store = self._open()
        self.task_ref = self._resolve_task(task)
        self.task: Optional[Task] = None if self.task_ref is None else self.task_ref.task
        metric = metric or self._default_metric()
        if metric not in self.store.metric_names:
            raise ValueError(f"--data.metric {metric!r} is not in the store at {self.root}; "
                             f"choose one of {list(self.store.metric_names)}")
        self.metric = metric
        if not best_boost >= 0 or not 0.0 < best_fraction <= 1.0:   # (NaN fails too)
            raise ValueError(f"--data.best_boost must be >= 0 (got {best_boost}) and --data.best_fraction in (0, 1] "
                             f"(got {best_fraction})")
        test = set(int(r) for r in self.store.test_runs)
        train = np.array([r for r in self.store.train_runs if int(r) not in test])
        if len(train) < 2:
            raise ValueError(f"the store at {self.root} has {self.store.num_runs} runs, {len(test)} of them held "
                             "out for testing: training needs at least 2 more (one for validation); build or "
                             "record more runs (at least 7)")
        n_val = min(val_runs, max(len(train) // 5, 1))
        head, tail = split_last(train, n_val, self.store.init_group)   # whole init groups (runs_per_init)
        if not tail:
            raise ValueError(f"the store at {self.root} has its training runs in one init group (runs_per_init): "
                             "validation needs runs from another init; build more runs (at least 3 init groups)")
        self.train_run_ids, self.val_run_ids = np.array(head, dtype=np.int64), np.array(tail, dtype=np.int64)
        seen = np.concatenate([self.train_run_ids, self.val_run_ids])
        self.metric_values = self._scored_metric(seen)
        self.info = DataInfo.from_store(
            self.store, metric, seen,
            task=None if self.task_ref is None else self.task_ref.name,
            task_kwargs=None if self.task_ref is None else self.task_ref.options, val_runs=self.val_run_ids,
            metric_values=self.metric_values, parts=list(parts or []),
            label_metrics=() if self.task is None else tuple(self.task.label_metrics))

    def _scored_metric(self, runs: np.ndarray) -> Optional[np.ndarray]:
        """The conditioning metric of every checkpoint, with the ones the store has none for among ``runs``
        scored by the task (a recorded run's first checkpoint comes before any validation, so without this
        no training pair would start at a real init); None when nothing is missing or there is no task."""
        if self.task is None or self.metric not in self.task.metric_names:
            return None
        values = np.array(self.store.metrics(np.arange(self.store.num_checkpoints))[self.metric], dtype=np.float64)
        idx = np.concatenate([self.store.run_checkpoints(int(r)) for r in runs])
        missing = idx[~np.isfinite(values[idx])]
        if not len(missing):
            return None
        scores = self.task.evaluate(torch.from_numpy(np.asarray(self.store.params(missing), np.float32)))
        values[missing] = scores[self.metric].double().numpy()
        log.info("scored %d checkpoints the store has no %s for with task %s", len(missing), self.metric,
                 self.task_ref.name)
        return values

    # ----------------------------------------------------------------- store
    @staticmethod
    def prepare_store(root: str = "data/digits_mlp", task: Optional[str] = "digits_mlp", build_runs: int = 512,
                      build_epochs: int = 20, build_checkpoints: int = 32, build_dtype: str = "float32",
                      build_group_size: int = PopulationConfig.group_size,
                      build_optimizers: tuple[str, ...] = PopulationConfig.optimizers,
                      build_lr: tuple[float, float] = PopulationConfig.lr,
                      build_sparsity: tuple[float, ...] = PopulationConfig.sparsity,
                      build_bits: tuple[int, ...] = PopulationConfig.bits, build_seed: int = 0, build_device: str = "cpu",
                      build_workers: int = 1, build_runs_per_init: int = 1,
                      data_dir: Optional[str] = None, task_options: Optional[dict] = None,
                      **_other_options) -> CheckpointStore:
        """Make sure the store at ``root`` is complete before a data module opens it: build it when missing
        (``task``, ``build_*``), finish an interrupted build with its own settings, refuse options that
        contradict the store's. Under DDP only rank 0 builds; the other ranks wait for it. Takes the data
        module's arguments (``**config.data``); ``gpt-params train`` calls it first."""
        root_path = Path(root).expanduser().resolve()
        if (root_path / "manifest.json").exists():
            built = open_store(root_path).manifest.get("build_config") or {}
            _check_task_options(root_path, task_options, built.get("task_options", {}))
        ref = None
        if task is not None:
            ref = TaskRef(task, _task_kwargs(task_options, data_dir, None))
        config = PopulationConfig(runs=build_runs, epochs=build_epochs, num_checkpoints=build_checkpoints,
                                  group_size=build_group_size, optimizers=tuple(build_optimizers),
                                  lr=(float(build_lr[0]), float(build_lr[1])), seed=build_seed,
                                  sparsity=tuple(float(v) for v in build_sparsity), bits=tuple(int(v) for v in build_bits),
                                  runs_per_init=build_runs_per_init)
        return ensure_store(root_path, ref, config, device=build_device, rank_zero=_is_rank_zero(),
                            option="--data.task", dtype=build_dtype, workers=build_workers)

    def _open(self) -> CheckpointStore:
        if not (self.root / "manifest.json").exists():
            raise ValueError(f"no checkpoint store at {self.root}: build one first (`gpt-params train` does, with "
                             "--data.task NAME; in Python call ParameterDataModule.prepare_store(root=..., task=...)"
                             " or `gpt-params build-dataset --out DIR`), or give --data.root DIR of an existing store")
        store = open_store(self.root, verify=self.hparams.verify)
        dropped = store.manifest.get("dropped") or {}
        if any(dropped.values()):
            log.warning("the store at %s left out %d checkpoints with non-finite parameters and %d with non-finite "
                        "metrics when they were written; training uses the rest", self.root,
                        dropped.get("nonfinite_params", 0), dropped.get("nonfinite_metrics", 0))
        _check_task_options(self.root, self.hparams.task_options,
                            (store.manifest.get("build_config") or {}).get("task_options", {}))
        if not store_is_complete(store):
            raise ValueError(f"the store at {self.root} holds {store.num_runs} of its runs: finish the build first "
                             "(`gpt-params train` resumes it, or `gpt-params build-dataset` with the same --out)")
        return store

    def _resolve_task(self, given: Optional[str]) -> Optional[TaskRef]:
        """The store's own task (a name from its manifest: built in, or the import path ``--data.task`` gives
        again); for a store recorded by another project (no task in its manifest), the given task if it builds
        this architecture (else None: networks are not evaluated)."""
        kwargs = _task_kwargs(self.hparams.task_options, self.hparams.data_dir, self.store)
        if self.store.task is None:
            if given is None:
                return None
            ref = TaskRef(given, kwargs)
            try:
                ref.check_shapes(self.store.layer_shapes, f"the store at {self.root}")
            except ValueError:
                log.warning("the store at %s was recorded by another project and --data.task %s does not build its "
                            "architecture; generated networks will not be evaluated (pass --data.task "
                            "pkg.module:Class to evaluate them)", self.root, given)
                return None
            return ref
        ref = TaskRef.from_file(self.store.task, kwargs, given=given, option="--data.task",
                                source=f"the store at {self.root}")
        ref.task   # a task that cannot be built with its options says so first
        try:
            ref.check_shapes(self.store.layer_shapes, f"the store at {self.root}")
        except ValueError:
            if self.hparams.task_options:
                raise ValueError(f"--data.task_options {self.hparams.task_options} build {ref.name} networks of "
                                 f"other shapes than the store's at {self.root}: drop the options that change "
                                 "them") from None
            raise
        return ref

    def _default_metric(self) -> str:
        """The task's default metric when the store has it, else the store's first validation metric."""
        names = list(self.store.metric_names)
        if self.task is not None and self.task.default_metric in names:
            return self.task.default_metric
        return next((m for m in names if m.startswith("val")), names[0])

    # ----------------------------------------------------------- dataloaders
    def _dataset(self, runs: np.ndarray, seed: int, device=None) -> PairDataset:
        return PairDataset(self.store, runs=runs, metric=self.metric, init_prob=self.hparams.init_prob,
                           ordered=self.hparams.ordered, permute=self.hparams.augment == "permute",
                           seed=seed, device=device, metric_values=self.metric_values,
                           parts=[p["name"] for p in self.info.parts])

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
            replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
            batches = PairBatches(self.train_set, self.hparams.batch_size, replicas, rank=rank, seed=self.hparams.seed,
                                  weights=self._target_weights())
            return DataLoader(batches, batch_size=None)
        weights = self._target_weights()
        # its own generator: the draws do not depend on the model's use of the global RNG, and every DDP
        # rank draws the same list, of which Lightning's sampler wrapper gives each rank its own slice
        sampler = None if weights is None else WeightedRandomSampler(
            torch.from_numpy(weights), len(weights), generator=torch.Generator().manual_seed(self.hparams.seed))
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=sampler is None,
                          sampler=sampler, drop_last=True, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def _target_weights(self) -> Optional[np.ndarray]:
        """Sampling weights of the training targets (``best_boost``), None for uniform epochs."""
        if not self.hparams.best_boost:
            return None
        return self.train_set.target_weights(self.hparams.best_fraction, self.hparams.best_boost)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
