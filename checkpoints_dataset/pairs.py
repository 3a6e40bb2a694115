"""Training pairs (start checkpoint, target checkpoint) from one run of a store, as G.pt samples them.

Item ``i`` has the ``i``-th checkpoint of the chosen runs as its target. Its start is the run's initial
checkpoint with probability ``init_prob``, else (``ordered=True``) uniform among the run's earlier
checkpoints, or (``ordered=False``) uniform among the run's other checkpoints. A run's initial checkpoint
as target has itself as start when ordered. With ``permute=True`` one random neuron permutation per pair
is applied identically to start and target.

A batch is fetched by ``__getitems__`` (which DataLoader uses with automatic batching): one fancy-indexed
memmap read for all starts and targets and one batched ``apply_permutations`` call. Randomness comes from
the dataset's own numpy and torch generators, seeded from ``(seed, epoch, worker id)``: call
``set_epoch(e)`` each epoch; inside DataLoader workers each worker reseeds itself on first use.

Where the chosen runs fit in an accelerator's memory, ``PairDataset(..., device="cuda")`` loads their
parameters once as one ``[N, P]`` tensor there; ``get_batch`` then gathers and permutes whole batches on
that device (no disk reads, no host-to-device copy of parameters), and ``PairBatches`` serves those
batches to a ``DataLoader(..., batch_size=None)`` (no workers: the work is a few kernels per batch).
Start positions are drawn on the host exactly as in the default path, so pairs follow the same
distribution; with ``device="cpu"`` and the same seed both paths give identical batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .permute import apply_permutations
from .store import CheckpointStore, open_store


def _default_metric(store: CheckpointStore) -> str:
    """The manifest's ``default_metric`` if given, else ``val_error`` if recorded, else the first metric."""
    name = store.manifest.get("default_metric") or ("val_error" if "val_error" in store.metric_names else None)
    return name or store.metric_names[0]


class PairDataset(Dataset):
    """(start, target) checkpoint pairs of one run: dicts of float32 tensors ``start [P]``, ``target [P]``,
    ``start_metric []``, ``target_metric []`` (plus ``start_step``, ``target_step``, ``run_id`` int64).

    Args:
        store: a CheckpointStore or its path.
        runs: run ids to draw from (default: the store's train runs; pass ``store.test_runs`` for held-out).
        metric: the conditioning metric (default: see ``_default_metric``).
        init_prob: chance the start is the run's initial checkpoint.
        ordered: target later than start (G.pt) or any other checkpoint of the run.
        permute: apply permutation augmentation (needs the store's permutation spec).
        fields: "params" (full pairs) or "metrics" (metrics and steps only, no params read: quick checks).
        seed: base seed of the dataset's generators.
        metric_values: the metric of every checkpoint of the store (``[num_checkpoints]``, store order) to use
            instead of the stored one, e.g. with a task's scores where the store has none (None: the store's).
        device: None (default): parameters are read from the memory-mapped store per batch. A device
            ("cuda", "cpu", ...): the chosen runs' parameters are loaded once as one tensor there, and
            batches are gathered and permuted on it (its own generator on that device).
        parts: other metrics of the target checkpoint a batch carries as ``target_parts [n, E]`` (float32,
            in this order): the generator's condition parts, e.g. a field's ``label``.
    """

    def __init__(self, store: CheckpointStore | str, runs=None, metric: str | None = None, init_prob: float = 0.25,
                 ordered: bool = True, permute: bool = True, seed: int = 0,
                 fields: Literal["params", "metrics"] = "params", device: str | torch.device | None = None,
                 metric_values: np.ndarray | None = None, parts: Sequence[str] = ()):
        self.store = store if isinstance(store, CheckpointStore) else open_store(store)
        self.metric = metric or _default_metric(self.store)
        if self.metric not in self.store.metric_names:
            raise ValueError(f"metric {self.metric!r} is not in the store; choose one of {self.store.metric_names}")
        if not 0.0 <= init_prob <= 1.0:
            raise ValueError(f"init_prob must be in [0, 1], got {init_prob}")
        if fields not in ("params", "metrics"):
            raise ValueError(f"fields must be 'params' or 'metrics', got {fields!r}")
        self.spec = self.store.permutation_spec
        if permute and fields == "params" and self.spec is None:
            raise ValueError("the store has no permutation spec; pass permute=False (or rebuild the store with a spec)")
        self.init_prob, self.ordered, self.permute, self.fields = init_prob, ordered, permute, fields
        runs = self.store.train_runs if runs is None else np.asarray(runs, np.int64).reshape(-1)
        metric_all = self.store._metrics[self.metric] if metric_values is None else np.asarray(metric_values, np.float64)
        if metric_all.shape != (self.store.num_checkpoints,):
            raise ValueError(f"metric_values must have one value per checkpoint of the store "
                             f"[{self.store.num_checkpoints}], got {list(metric_all.shape)}")
        # checkpoints without a finite metric cannot condition a pair (the recorder's initial checkpoint
        # before any metric was logged): a run starts at its first checkpoint with a finite metric
        per_run = [c[np.isfinite(metric_all[c])] for c in (self.store.run_checkpoints(r) for r in runs)]
        per_run = [c for c in per_run if len(c)]
        if not per_run or not sum(len(c) for c in per_run):
            raise ValueError("no checkpoints in the chosen runs; check `runs` and the store")
        self._order = np.concatenate(per_run)  # dataset position -> store checkpoint index (runs, steps sorted)
        lens = np.array([len(c) for c in per_run])
        self._run_len = np.repeat(lens, lens)  # [N]
        self._run_start = np.repeat(np.cumsum(lens) - lens, lens)  # [N] position of the run's initial checkpoint
        self._pos = np.arange(len(self._order)) - self._run_start  # [N] position within the run
        self._metric = metric_all.astype(np.float32)
        self.parts = list(parts)
        missing = [p for p in self.parts if p not in self.store.metric_names]
        if missing:
            raise ValueError(f"condition parts {missing} are not metrics of the store; choose among "
                             f"{list(self.store.metric_names)}")
        self._parts = (np.stack([self.store._metrics[p] for p in self.parts], 1).astype(np.float32)
                       if self.parts else None)  # [num_checkpoints, E]
        if self._parts is not None and not np.isfinite(self._parts[self._order]).all():
            raise ValueError(f"the chosen runs have checkpoints without a finite value of the parts {self.parts}")
        self.device = None if device is None else torch.device(device)
        self._resident = None if self.device is None or fields != "params" else self._load_resident()
        self.seed, self.epoch, self._worker = seed, 0, None
        self._reseed(None)

    def _load_resident(self) -> torch.Tensor:
        """The chosen runs' parameters as one float32 tensor ``[N, P]`` on ``self.device`` (dataset order)."""
        need = len(self._order) * self.store.num_params * 4
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > 0.8 * free:
                raise ValueError(f"the chosen runs' parameters take {need / 2**30:.2f} GiB but {self.device} has "
                                 f"{free / 2**30:.2f} GiB free; use device=None (memory-mapped reads) or fewer runs")
        return torch.from_numpy(self.store.params(self._order)).to(self.device)  # [N, P]

    def __len__(self) -> int:
        return len(self._order)

    def target_weights(self, best_fraction: float, boost: float) -> np.ndarray:
        """Sampling weights of the positions ``[N]``: ``1 + boost`` where the target is among the best
        ``best_fraction`` of the chosen checkpoints by the metric (in the store's direction; checkpoints tied
        at the cut count as the best too, so a discrete metric may boost a little more), else 1."""
        if not 0.0 < best_fraction <= 1.0 or not boost >= 0:   # (NaN fails too)
            raise ValueError(f"best_fraction must be in (0, 1] and boost >= 0, got {best_fraction} and {boost}")
        m = self._metric[self._order].astype(np.float64)                          # [N] the targets' metric
        lower = self.store.lower_is_better.get(self.metric, True)
        cut = np.quantile(m, best_fraction if lower else 1.0 - best_fraction)
        return np.where(m <= cut if lower else m >= cut, 1.0 + boost, 1.0)

    def _reseed(self, worker: int | None) -> None:
        ss = np.random.SeedSequence([self.seed, self.epoch] + ([] if worker is None else [worker]))
        self._rng = np.random.default_rng(ss)
        seed = int(ss.generate_state(1, np.uint64)[0] >> 1)
        self._torch_gen = torch.Generator(self.device or "cpu").manual_seed(seed)
        self._worker = worker

    def set_epoch(self, epoch: int) -> None:
        """Reseed for a new epoch (different pairs and permutations each epoch, reproducible)."""
        self.epoch = int(epoch)
        self._reseed(self._worker)

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._reseed(self._worker)

    def sample_starts(self, positions: np.ndarray) -> np.ndarray:
        """Start positions (in the dataset's order) for the target positions, drawn as the class describes."""
        pos, run_len, run_start = self._pos[positions], self._run_len[positions], self._run_start[positions]
        u = self._rng.random(len(positions))
        if self.ordered:
            other = np.floor(u * pos).astype(np.int64)  # uniform in [0, pos) ; pos = 0 -> 0 (the init itself)
        else:
            other = np.floor(u * np.maximum(run_len - 1, 1)).astype(np.int64)  # uniform over the other checkpoints
            other = np.where(run_len > 1, other + (other >= pos), pos)
        take_init = self._rng.random(len(positions)) < self.init_prob
        if not self.ordered:
            take_init &= pos > 0  # the init is "another" checkpoint only when the target is not the init
        return run_start + np.where(take_init, 0, other)

    def get_batch(self, indices) -> dict[str, torch.Tensor]:
        """The pairs at dataset positions ``indices`` as one dict of batched tensors (on ``device`` when set)."""
        info = get_worker_info()
        if info is not None and self._worker != info.id:
            self._reseed(info.id)
        positions = np.asarray(indices, np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"pair indices must be in [0, {len(self)})")
        start_pos = self.sample_starts(positions)
        start, target = self._order[start_pos], self._order[positions]  # store checkpoint indices [n]
        batch = {"start_metric": torch.from_numpy(self._metric[start]),
                 "target_metric": torch.from_numpy(self._metric[target]),
                 "start_step": torch.from_numpy(self.store.steps[start]),
                 "target_step": torch.from_numpy(self.store.steps[target]),
                 "run_id": torch.from_numpy(self.store.run_ids[target])}
        if self._parts is not None:
            batch["target_parts"] = torch.from_numpy(self._parts[target])  # [n, E]
        if self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.fields == "params":
            n = len(positions)
            if self._resident is None:
                both = torch.from_numpy(self.store.params(np.concatenate([start, target])))  # [2n, P] one read
            else:
                rows = torch.from_numpy(np.concatenate([start_pos, positions])).to(self.device, non_blocking=True)
                both = self._resident[rows]  # [2n, P] one gather on the device
            if self.permute:
                gen = self._torch_gen  # on the device: same draws as random_permutations for the CPU
                perms = [torch.rand(n, g.size, generator=gen, device=gen.device).argsort(dim=1)
                         for g in self.spec.groups]  # per group [n, size]
                both = apply_permutations(both, self.spec, [torch.cat([p, p]) for p in perms])  # same on both
            batch["start"], batch["target"] = both[:n], both[n:]  # [n, P]
        return batch

    def __getitems__(self, indices) -> list[dict]:
        batch = self.get_batch(indices)
        return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["run_id"]))]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Stack a list of pair dicts into one dict of batched tensors (same as default_collate)."""
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class PairBatches(IterableDataset):
    """Whole batches of a ``PairDataset`` for ``DataLoader(PairBatches(...), batch_size=None)``.

    Each pass is a fresh random order of the dataset's positions, the same on every rank (drawn from
    ``(seed, pass)``), of which rank ``rank`` of ``num_replicas`` takes every ``num_replicas``-th position
    (DistributedSampler's split), cut into ``len(dataset) // (batch_size * num_replicas)`` batches of
    ``batch_size`` (the rest dropped, like ``drop_last``): the ranks of a DDP job train on disjoint targets,
    the same number of batches each. Start checkpoints and permutations come from each rank's dataset.
    With ``weights [N]`` a pass is ``N`` positions drawn with replacement in proportion to them instead
    (``WeightedRandomSampler``'s draw), split between the ranks the same way: disjoint slices of one shared
    draw, in which a target may recur, within a rank and across ranks.
    """

    def __init__(self, dataset: PairDataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 weights: np.ndarray | None = None):
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size} and {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if len(dataset) < batch_size * num_replicas:
            raise ValueError(f"{len(dataset)} pairs make no full batch of {batch_size} on {num_replicas} "
                             "replica(s); lower the batch size or add runs")
        self.dataset, self.batch_size, self.num_replicas = dataset, batch_size, num_replicas
        self.rank, self.seed, self._passes = rank, seed, 0
        self.weights = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
        if self.weights is not None and self.weights.shape != (len(dataset),):
            raise ValueError(f"weights must have one value per position [{len(dataset)}], got {list(self.weights.shape)}")

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.num_replicas)

    def __iter__(self):
        rng, n = np.random.default_rng([self.seed, self._passes]), len(self.dataset)
        shared = rng.permutation(n) if self.weights is None else rng.choice(n, n, p=self.weights)  # [N] positions
        self._passes += 1
        order = shared[self.rank::self.num_replicas]                                              # [N / replicas]
        for b in range(len(self)):
            yield self.dataset.get_batch(order[b * self.batch_size:(b + 1) * self.batch_size])
