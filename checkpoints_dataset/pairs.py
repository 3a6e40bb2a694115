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
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .permute import apply_permutations, random_permutations
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
    """

    def __init__(self, store: CheckpointStore | str, runs=None, metric: str | None = None, init_prob: float = 0.25,
                 ordered: bool = True, permute: bool = True, seed: int = 0,
                 fields: Literal["params", "metrics"] = "params"):
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
        per_run = [self.store.run_checkpoints(r) for r in runs]
        if not per_run or not sum(len(c) for c in per_run):
            raise ValueError("no checkpoints in the chosen runs; check `runs` and the store")
        self._order = np.concatenate(per_run)  # dataset position -> store checkpoint index (runs, steps sorted)
        lens = np.array([len(c) for c in per_run])
        self._run_len = np.repeat(lens, lens)  # [N]
        self._run_start = np.repeat(np.cumsum(lens) - lens, lens)  # [N] position of the run's initial checkpoint
        self._pos = np.arange(len(self._order)) - self._run_start  # [N] position within the run
        self._metric = self.store._metrics[self.metric].astype(np.float32)
        self.seed, self.epoch, self._worker = seed, 0, None
        self._reseed(None)

    def __len__(self) -> int:
        return len(self._order)

    def _reseed(self, worker: int | None) -> None:
        ss = np.random.SeedSequence([self.seed, self.epoch] + ([] if worker is None else [worker]))
        self._rng = np.random.default_rng(ss)
        self._torch_gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))
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

    def __getitems__(self, indices) -> list[dict]:
        info = get_worker_info()
        if info is not None and self._worker != info.id:
            self._reseed(info.id)
        positions = np.asarray(indices, np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"pair indices must be in [0, {len(self)})")
        start_pos = self.sample_starts(positions)
        start, target = self._order[start_pos], self._order[positions]  # store checkpoint indices [n]
        batch = {"start_metric": torch.from_numpy(self._metric[start]),
                 "target_metric": torch.from_numpy(self._metric[target]),
                 "start_step": torch.from_numpy(self.store.steps[start]),
                 "target_step": torch.from_numpy(self.store.steps[target]),
                 "run_id": torch.from_numpy(self.store.run_ids[target])}
        if self.fields == "params":
            n = len(positions)
            both = torch.from_numpy(self.store.params(np.concatenate([start, target])))  # [2n, P] one read
            if self.permute:
                perms = random_permutations(n, self.spec, self._torch_gen)  # per group [n, size]
                both = apply_permutations(both, self.spec, [torch.cat([p, p]) for p in perms])  # same on both
            batch["start"], batch["target"] = both[:n], both[n:]  # [n, P]
        return [{k: v[i] for k, v in batch.items()} for i in range(len(positions))]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Stack a list of pair dicts into one dict of batched tensors (same as default_collate)."""
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
