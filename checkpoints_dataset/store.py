"""The checkpoint store: a directory of memory-mapped parameter shards, a metrics table and a JSON manifest.

Layout (see README.md for the full format)::

    root/manifest.json                 format name + version, task, layer shapes, metrics, dtype, spec,
                                       build config; after finalize: shards, stats, run split, dropped counts
    root/shards/<name>.params.npy      [n, P] float32 (or float16), plain .npy, read with mmap_mode="r"
    root/shards/<name>.index.npz       run_id, step, epoch, metric/<m> arrays [n] + "meta" (JSON string:
                                       params file shape/bytes/crc32, per-run sufficient stats, dropped, hparams)

Every file is written to a temporary name in the same directory, flushed, fsync'ed and renamed (fileio.py), and
the shard's index is written after its params file: a shard without an index is not committed (ignored), and
an index whose params file is missing or has the wrong size is a truncated shard (StoreError). Temporaries of
interrupted writes are removed when the store is next created, finalized or opened, and so are the params
files of dead writers' uncommitted shards. A shard's index may name shards it ``replaces`` (the recorder merges
a fit's one-checkpoint shards into one): those are hidden from then on and deleted after the next finalize.
Every path read from a manifest or an index must name a file inside the store (StoreError otherwise). The
shard files themselves (paths, index, listing, merging, cleaning) are handled in shards.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .fileio import atomic_write, atomic_write_locked, json_bytes, write_json_atomic
from .params import LayerShapes
from .permute import PermutationSpec
from .shards import (Scan, ShardGone, StoreError, check_params, crc32_of, delete_leftovers, is_plain_name,
                     outside_error, release_pages, remove_temporaries, retrying, scan, shard_exists, shard_paths,
                     write_index)

FORMAT_NAME = "checkpoints_dataset"
FORMAT_VERSION = 1
_BASE_KEYS = ("task", "layer_shapes", "metric_names", "lower_is_better", "dtype", "build_config")

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "StoreError", "create_store", "write_shard", "shard_exists",
           "finalize_store", "open_store", "CheckpointStore", "split_last", "write_json_atomic"]  # write_json_atomic: fileio's


# ----------------------------------------------------------------------------- manifest
def _read_manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if not path.is_file():
        raise StoreError(f"{root} is not a checkpoint store (no manifest.json); build one with "
                         "`gpt-params build-dataset` or CheckpointRecorder, or check the path")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON ({e}); rebuild the store") from e
    if not isinstance(manifest, dict):
        raise StoreError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest; rebuild the store")
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(f"{root} has store format version {manifest.get('version')}, this code reads version "
                         f"{FORMAT_VERSION}; use the matching checkpoints_dataset version or rebuild the store")
    return manifest


def create_store(root, *, task: str | None, layer_shapes: Mapping, metric_names, lower_is_better: Mapping,
                 permutation_spec: dict | None, dtype: str = "float32", build_config: dict | None = None) -> None:
    """Create an empty store at ``root`` (safe when several processes call it at once).

    If a manifest exists already it must agree on task, layer shapes, metrics, dtype and build config
    (StoreError otherwise, so a build never mixes datasets); then nothing is written.
    """
    if dtype not in ("float32", "float16"):
        raise StoreError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if isinstance(permutation_spec, PermutationSpec):
        permutation_spec = permutation_spec.to_json()
    root = Path(root)
    layer_shapes = LayerShapes.of(layer_shapes)
    base = {"task": task, "layer_shapes": layer_shapes.to_json(),
            "metric_names": list(metric_names), "lower_is_better": {m: bool(lower_is_better[m]) for m in metric_names},
            "dtype": dtype, "build_config": build_config}
    base = json.loads(json.dumps(base))  # normalize tuples etc. as they will read back
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **base,
                "num_params": layer_shapes.num_params, "permutation_spec": permutation_spec}
    (root / "shards").mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    if not (root / "manifest.json").exists():
        if atomic_write(root / "manifest.json", lambda f: f.write(json_bytes(manifest)), exclusive=True):
            return
    existing = _read_manifest(root)
    diff = [k for k in _BASE_KEYS if existing.get(k) != base[k]]
    if diff:
        details = "; ".join(f"{k}: store has {existing.get(k)!r}, requested {base[k]!r}" for k in diff)
        raise StoreError(f"{root} already holds a different dataset ({details}); choose another --out "
                         "directory or delete the old store")


# ----------------------------------------------------------------------------- shards


def _per_run_stats(params: np.ndarray, run_ids: np.ndarray, layer_shapes: LayerShapes, chunk_values: int = 2**22
                   ) -> dict:
    """Per run and layer: sum, sum of squares, count (float64), for normalization stats without rereading."""
    sizes = np.array(list(layer_shapes.sizes.values()), dtype=np.int64)       # [L]
    starts = np.array(list(layer_shapes.offsets.values()), dtype=np.int64)    # [L]
    runs, inverse = np.unique(run_ids, return_inverse=True)
    s, ss = np.zeros((len(runs), len(sizes))), np.zeros((len(runs), len(sizes)))
    chunk = max(1, chunk_values // max(params.shape[1], 1))  # rows per float64 chunk (32 MB)
    if (sizes > 0).all():
        for lo in range(0, len(params), chunk):
            rows = params[lo:lo + chunk].astype(np.float64)  # [c, P]
            np.add.at(s, inverse[lo:lo + chunk], np.add.reduceat(rows, starts, axis=1))  # [c, L] layer sums
            np.add.at(ss, inverse[lo:lo + chunk], np.add.reduceat(rows * rows, starts, axis=1))
    n = np.bincount(inverse, minlength=len(runs))[:, None] * sizes[None, :]  # [r, L]
    return {"runs": runs.tolist(), "sum": s.tolist(), "sumsq": ss.tolist(), "count": n.astype(float).tolist()}


def write_shard(root, name: str, *, params, run_ids, steps, epochs, metrics: Mapping, run_hparams: Mapping | None = None,
                nan_metrics_ok=None) -> int:
    """Write one shard atomically (params file first, its index last) and return the number of rows dropped.

    Rows with non-finite parameters or metrics are dropped and counted; ``nan_metrics_ok`` (bool ``[n]`` per
    row, or ``[n, M]`` per row and metric) marks the NaN metrics that are allowed (the recorder's metrics
    not logged yet).
    """
    root = Path(root)
    manifest = _read_manifest(root)
    params = np.asarray(params.detach().cpu() if hasattr(params, "detach") else params)  # [n, P]
    n, P = params.shape if params.ndim == 2 else (None, None)
    if params.ndim != 2 or P != manifest["num_params"]:
        raise StoreError(f"shard {name!r}: params must be [n, {manifest['num_params']}], got {list(params.shape)}")
    cols = {"run_id": np.asarray(run_ids, np.int64), "step": np.asarray(steps, np.int64),
            "epoch": np.asarray(epochs, np.float64)}
    missing = [m for m in manifest["metric_names"] if m not in metrics]
    if missing:
        raise StoreError(f"shard {name!r} lacks metrics {missing}; the store records {manifest['metric_names']}")
    for m in manifest["metric_names"]:
        cols[f"metric/{m}"] = np.asarray(metrics[m], np.float64)
    for k, v in cols.items():
        if v.shape != (n,):
            raise StoreError(f"shard {name!r}: {k} must have shape [{n}], got {list(v.shape)}")
    stored = params.astype(manifest["dtype"], copy=False)
    ok_params = np.isfinite(stored).all(axis=1)
    mvals = np.stack([cols[f"metric/{m}"] for m in manifest["metric_names"]], 1) if manifest["metric_names"] else np.zeros((n, 0))
    nan_ok = np.zeros(n, bool) if nan_metrics_ok is None else np.asarray(nan_metrics_ok, bool)
    nan_ok = nan_ok[:, None] if nan_ok.ndim == 1 else nan_ok                                # [n, 1] or [n, M]
    ok_metrics = (np.isfinite(mvals) | (np.isnan(mvals) & nan_ok)).all(axis=1)
    keep = ok_params & ok_metrics
    if not keep.all():
        stored, cols = stored[keep], {k: v[keep] for k, v in cols.items()}
    stored = np.ascontiguousarray(stored)
    params_path, index_path = shard_paths(root, name)
    # the params file stays locked until its index commits it: until then only a dead writer's is an orphan
    with atomic_write_locked(params_path, lambda f: np.save(f, stored)):  # real file: written without a copy
        meta = {"params_file": params_path.name, "shape": list(stored.shape), "dtype": manifest["dtype"],
                "nbytes": params_path.stat().st_size, "crc32": crc32_of(params_path),
                "dropped": {"nonfinite_params": int((~ok_params).sum()),
                            "nonfinite_metrics": int((ok_params & ~ok_metrics).sum())},
                "stats": _per_run_stats(stored, cols["run_id"], LayerShapes.from_json(manifest["layer_shapes"])),
                "run_hparams": {str(k): v for k, v in (run_hparams or {}).items()}}
        write_index(index_path, meta, cols)
    return int((~keep).sum())


def _init_group(hparams) -> int | str | None:
    """A run's ``init_group`` from its recorded hyperparameters, hashable (a recorder may write any JSON)."""
    group = hparams.get("init_group") if isinstance(hparams, dict) else None
    return group if group is None or isinstance(group, (int, str)) else json.dumps(group, sort_keys=True)


def split_last(runs: Sequence[int], n: int, init_group: Callable[[int], Any]) -> tuple[list[int], list[int]]:
    """Split sorted run ids into (head, tail): the tail holds the last ``n`` runs, widened to whole init groups
    (runs whose ``init_group(run)`` is the same non-None value start from one init; no tail init is in the
    head), and at least one group stays in the head."""
    runs = [int(r) for r in runs]
    if n <= 0:
        return runs, []
    key = lambda r: ("group", init_group(r)) if init_group(r) is not None else ("run", r)
    tail_keys = {key(r) for r in runs[len(runs) - n:]}
    head = [r for r in runs if key(r) not in tail_keys]
    if not head:   # one group holds the last n: keep the first group for the head
        first = key(runs[0])
        head, tail_keys = [r for r in runs if key(r) == first], tail_keys - {first}
    return head, [r for r in runs if key(r) in tail_keys]


def _summarize(root: Path, manifest: dict, shards: Mapping[str, tuple[dict, dict]], test_fraction: float,
               min_test_runs: int) -> dict:
    """Manifest fields derived from the shards' indexes: shards, runs, split, stats, dropped counts."""
    dropped = {"nonfinite_params": 0, "nonfinite_metrics": 0}
    sums: dict[int, np.ndarray] = {}
    L = len(manifest["layer_shapes"])
    entries, total = [], 0
    for name, (meta, _) in shards.items():
        check_params(root, name, meta)
        if meta["shape"][1:] != [manifest["num_params"]] or meta["dtype"] != manifest["dtype"]:
            raise StoreError(f"shard {name!r} holds {meta['dtype']} params of shape {meta['shape']}, but the manifest "
                             f"says {manifest['dtype']} [n, {manifest['num_params']}]: the manifest does not match its "
                             "shards; remove the foreign shard or rebuild the store")
        entries.append({"name": name, "rows": meta["shape"][0], "nbytes": meta["nbytes"]})
        total += meta["shape"][0]
        for k in dropped:
            dropped[k] += meta["dropped"][k]
        st = meta["stats"]
        for r, rid in enumerate(st["runs"]):
            acc = sums.setdefault(int(rid), np.zeros((3, L)))
            acc += np.array([st["sum"][r], st["sumsq"][r], st["count"][r]])
    runs = sorted(sums)
    n_test = min(max(min_test_runs, math.ceil(test_fraction * len(runs))), max(len(runs) - 1, 0))
    hparams = {int(k): v for meta, _ in shards.values() for k, v in meta["run_hparams"].items()}
    train, test = split_last(runs, n_test, lambda r: _init_group(hparams.get(r)))
    acc = sum((sums[r] for r in train), np.zeros((3, L)))
    stats = {}
    for j, (layer, _) in enumerate(manifest["layer_shapes"]):
        s, ss, c = acc[:, j]
        mean = s / c if c else 0.0
        stats[layer] = [float(mean), float(math.sqrt(max(ss / c - mean ** 2, 0.0))) if c else 1.0]
    return {"shards": entries, "num_checkpoints": total, "num_runs": len(runs), "train_runs": train,
            "test_runs": test, "stats": stats, "dropped": dropped,
            "split": {"test_fraction": test_fraction, "min_test_runs": min_test_runs}}


def finalize_store(root, test_fraction: float = 0.1, min_test_runs: int = 4) -> None:
    """Write shards list, per-layer (mean, std) over train runs, run split and dropped counts to the manifest.

    Test runs are the last ``max(min_test_runs, ceil(test_fraction * runs))`` run ids (G.pt's split), but
    at least one run stays for training. Safe to call again whenever shards are added. Also removes the
    temporaries of interrupted writes and, once the manifest no longer lists them, merged-away shards.
    """
    root = Path(root)
    _read_manifest(root)      # a store, before anything in it is cleaned
    remove_temporaries(root)

    def finalize() -> Scan:
        manifest = _read_manifest(root)
        found = scan(root)
        manifest.update(_summarize(root, manifest, found.shards, test_fraction, min_test_runs))
        atomic_write(root / "manifest.json", lambda f: f.write(json_bytes(manifest)))
        return found

    delete_leftovers(root, retrying(finalize))


# ----------------------------------------------------------------------------- reading
class CheckpointStore:
    """A read-only view of a store. Parameters stay on disk (memory-mapped); tables are loaded (small)."""

    def __init__(self, root, verify: Literal["size", "full"] = "size"):
        self.root = Path(root)
        _read_manifest(self.root)   # a store (a path read from a checkpoint may name any directory), then clean
        remove_temporaries(self.root)
        manifest, shards = retrying(lambda: self._read(verify))
        self.manifest = manifest
        self.task = manifest["task"]
        self.layer_shapes = LayerShapes.from_json(manifest["layer_shapes"])
        self.num_params = manifest["num_params"]
        self.metric_names = list(manifest["metric_names"])
        self.lower_is_better = dict(manifest["lower_is_better"])
        self.stats = {k: tuple(v) for k, v in manifest["stats"].items()}
        self.train_runs = np.asarray(manifest["train_runs"], np.int64)
        self.test_runs = np.asarray(manifest["test_runs"], np.int64)
        spec = manifest.get("permutation_spec")
        self.permutation_spec = PermutationSpec.from_json(spec) if spec else None
        self._arrays, cols, self._hparams = [], [], {}
        for array, meta, c in shards:
            self._arrays.append(array)
            self._hparams.update({int(k): v for k, v in meta["run_hparams"].items()})
            cols.append(c)
        cat = lambda k, dt: np.concatenate([c[k] for c in cols]).astype(dt) if cols else np.zeros(0, dt)
        self.run_ids, self.steps, self.epochs = cat("run_id", np.int64), cat("step", np.int64), cat("epoch", np.float64)
        self._metrics = {m: cat(f"metric/{m}", np.float64) for m in self.metric_names}
        self._offsets = np.cumsum([0] + [len(a) for a in self._arrays])  # shard i holds [off[i], off[i+1])
        self._by_run = np.lexsort((self.steps, self.run_ids))  # checkpoint indices sorted by (run, step)
        self._run_bounds = np.searchsorted(self.run_ids[self._by_run], np.unique(self.run_ids), side="left")
        self._run_list = np.unique(self.run_ids)

    def _read(self, verify) -> tuple[dict, list]:
        """The manifest (refreshed when shards were added or merged since the last finalize) and, per listed
        shard, (params memory map, meta, columns)."""
        manifest = _read_manifest(self.root)
        listed = []
        for entry in manifest.get("shards", []):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not is_plain_name(name) or name.startswith("."):
                raise outside_error(self.root, self.root / "manifest.json", "shard name", name,
                                    "rewrite its shard list with checkpoints_dataset.finalize_store(store)")
            listed.append(name)
        found = scan(self.root)
        on_disk = found.shards
        missing = sorted(set(listed) - set(on_disk) - found.replaced)
        if missing:
            raise StoreError(f"{self.root}: the manifest lists shards {missing} whose index files are missing; "
                             "rebuild them (rerun the build) or run finalize_store to drop them from the manifest")
        if "stats" not in manifest or listed != list(on_disk):  # shards added since the last finalize: refresh
            split = manifest.get("split", {"test_fraction": 0.1, "min_test_runs": 4})
            manifest.update(_summarize(self.root, manifest, on_disk, split["test_fraction"], split["min_test_runs"]))
            try:
                atomic_write(self.root / "manifest.json", lambda f: f.write(json_bytes(manifest)))
            except OSError:
                found = None  # read-only store: keep the refreshed manifest in memory
        if found is not None:
            delete_leftovers(self.root, found)
        shards = []
        for entry in manifest["shards"]:
            meta, c = on_disk[entry["name"]]
            if meta["shape"][0] != entry["rows"]:
                raise StoreError(f"{self.root}: shard {entry['name']!r} has {meta['shape'][0]} rows but the manifest "
                                 f"says {entry['rows']}: the manifest does not match its shards; run finalize_store")
            path = check_params(self.root, entry["name"], meta, verify)
            try:
                array = (np.load(path, mmap_mode="r") if meta["shape"][0] else
                         np.zeros(meta["shape"], manifest["dtype"]))
            except FileNotFoundError as e:
                raise ShardGone(f"shard {entry['name']!r} vanished while the store was read") from e
            shards.append((array, meta, c))
        return manifest, shards

    num_runs = property(lambda self: len(self._run_list))
    num_checkpoints = property(lambda self: len(self.run_ids))
    runs = property(lambda self: self._run_list.copy())

    def __len__(self) -> int:
        return self.num_checkpoints

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_checkpoints):
            raise IndexError(f"checkpoint indices must be in [0, {self.num_checkpoints}), got {idx.min()}..{idx.max()}")
        return idx

    def params(self, indices) -> np.ndarray:
        """Parameter vectors ``[k, P]`` float32 of the given checkpoints (one fancy-indexed read per shard)."""
        idx = self._check_indices(indices)
        out = np.empty((len(idx), self.num_params), np.float32)  # [k, P]
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            rows = idx[where] - self._offsets[s]
            order = np.argsort(rows, kind="stable")  # sorted rows read sequentially
            out[where[order]] = self._arrays[s][rows[order]]
            release_pages(self._arrays[s])
        return out

    def metrics(self, indices) -> dict[str, np.ndarray]:
        idx = self._check_indices(indices)
        return {m: v[idx] for m, v in self._metrics.items()}

    def run_checkpoints(self, run_id) -> np.ndarray:
        """Checkpoint indices of one run, sorted by step."""
        r = np.searchsorted(self._run_list, run_id)
        if r >= len(self._run_list) or self._run_list[r] != run_id:
            raise KeyError(f"run {run_id} is not in the store (runs {self._run_list[:5].tolist()}...)")
        end = self._run_bounds[r + 1] if r + 1 < len(self._run_bounds) else len(self._by_run)
        return self._by_run[self._run_bounds[r]:end]

    def run_hparams(self, run_id) -> dict:
        return dict(self._hparams.get(int(run_id), {}))

    def init_group(self, run_id):
        """The init group of a run (runs of one group start from one init: ``runs_per_init``), or None."""
        return _init_group(self._hparams.get(int(run_id)))

    def __repr__(self) -> str:
        return (f"CheckpointStore({str(self.root)!r}, task={self.task!r}, runs={self.num_runs}, "
                f"checkpoints={self.num_checkpoints}, params={self.num_params})")


def open_store(root, verify: Literal["size", "full"] = "size") -> CheckpointStore:
    """Open a store for reading. ``verify="full"`` also checks every params file's crc32 (reads all data)."""
    return CheckpointStore(root, verify)
