"""A store's shard files: names and paths (confined to the store), reading and checking an index, listing the
committed shards, merging shards and deleting what interrupted or superseded writes left (store.py has the
manifest and the reader; the format is in README.md).

A shard is committed by its index file, written (atomically) after its params file; while it writes, the
params file stays locked (``fileio.atomic_write_locked``), so a params file without an index whose lock is
free was left by a dead writer and may be deleted. A merged shard's index lists the shards it ``replaces``:
one rename commits the merge, the replaced shards are hidden from then on and deleted once the manifest no
longer lists them. Readers that find a shard gone under them (a merge in another process) read again.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import time
import zlib
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from .fileio import atomic_write, atomic_write_locked, lock_is_free, remove_stale_temps


class StoreError(ValueError):
    """A directory that is not a valid checkpoint store (the message names the problem and the fix)."""


class ShardGone(StoreError):
    """A shard's files vanished while it was read: another process merged it into a new shard (read again)."""


# ----------------------------------------------------------------------------- names and paths
def is_plain_name(name) -> bool:
    """A file name that stays in its directory: no separator, not absolute, not '.' or '..', no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not os.path.isabs(name))


def shard_paths(root: Path, name: str) -> tuple[Path, Path]:
    """(params file, index file) of shard ``name``, refusing names that would leave ``root/shards``."""
    if not is_plain_name(name) or name.startswith("."):
        raise StoreError(f"invalid shard name {name!r}: use a plain file name without '/'")
    return root / "shards" / f"{name}.params.npy", root / "shards" / f"{name}.index.npz"


def outside_error(root: Path, where: Path, what: str, value,
                  fix: str = "delete that shard's index file and rebuild the shard") -> StoreError:
    """The error for a path read from a store file (``where``) that does not stay inside the store."""
    return StoreError(f"{where}: {what} {value!r} does not name a file inside the store {root} (absolute paths, "
                      "'/' and '..' are refused, so a store never makes us read or delete elsewhere); this file "
                      f"is corrupt or was not written by checkpoints_dataset: restore it, or {fix}")


def params_path_of(root: Path, name: str, meta: dict) -> Path:
    """The params file that shard ``name``'s index names, checked to lie in ``root/shards``."""
    value, index_path = meta.get("params_file"), shard_paths(root, name)[1]
    if not is_plain_name(value):
        raise outside_error(root, index_path, "params_file", value)
    path = root / "shards" / value
    if path.is_symlink() and not path.resolve().is_relative_to((root / "shards").resolve()):
        raise outside_error(root, index_path, "params_file", f"{value} -> {os.readlink(path)}")
    return path


# ----------------------------------------------------------------------------- files
def crc32_of(path: Path) -> int:
    with open(path, "rb") as f:
        crc = 0
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def release_pages(array: np.ndarray) -> None:
    """Drop a memory map's pages from this process's resident set (they stay in the OS page cache), so
    that sampling from a store of any size keeps resident memory flat."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def write_index(index_path: Path, meta: dict, cols: dict) -> None:
    """Commit a shard: its index, written atomically after its params file."""
    atomic_write(index_path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **cols))


def read_index(root: Path, name: str) -> tuple[dict, dict]:
    """A shard's index: (meta, columns); ShardGone when its file vanished, StoreError when unreadable."""
    index_path = shard_paths(root, name)[1]
    try:
        with np.load(index_path) as z:
            cols = {k: z[k] for k in z.files}
        meta = json.loads(str(cols.pop("meta")))
    except FileNotFoundError as e:
        raise ShardGone(f"shard {name!r}: its index {index_path} vanished while the store was read; "
                         "open the store again") from e
    except Exception as e:
        raise StoreError(f"shard {name!r}: unreadable index {index_path} ({e}); delete it and rebuild that shard") from e
    replaces = meta.get("replaces", [])
    if not isinstance(replaces, list) or not all(is_plain_name(r) and not r.startswith(".") for r in replaces):
        raise outside_error(root, index_path, "replaces", replaces)
    return meta, cols


def check_params(root: Path, name: str, meta: dict, verify: Literal["size", "full"] = "size") -> Path:
    """The shard's params file, checked: inside the store, present, of the recorded size (and crc32)."""
    params_path = params_path_of(root, name, meta)
    if not params_path.is_file():
        if not shard_paths(root, name)[1].exists():
            raise ShardGone(f"shard {name!r} vanished while the store was read; open the store again")
        raise StoreError(f"shard {name!r}: params file {params_path} is missing; rebuild that shard "
                         "(delete its index file and rerun the build)")
    if params_path.stat().st_size != meta["nbytes"]:
        raise StoreError(f"shard {name!r}: params file {params_path} is truncated or changed "
                         f"({params_path.stat().st_size} bytes, index says {meta['nbytes']}); rebuild that shard")
    if verify == "full" and crc32_of(params_path) != meta["crc32"]:
        raise StoreError(f"shard {name!r}: checksum mismatch in {params_path}; rebuild that shard")
    return params_path


def load_index(root: Path, name: str, verify: Literal["size", "full"] = "size") -> tuple[dict, dict]:
    """Read and check a committed shard: (meta, columns). StoreError when its params file is missing/truncated."""
    meta, cols = read_index(root, name)
    check_params(root, name, meta, verify)
    return meta, cols


def shard_exists(root, name: str) -> bool:
    """Whether shard ``name`` is committed and its params file complete."""
    try:
        load_index(Path(root), name)
        return True
    except (StoreError, FileNotFoundError, OSError):
        return False


# ----------------------------------------------------------------------------- listing and cleaning
class Scan(NamedTuple):
    shards: dict[str, tuple[dict, dict]]  # committed shards, sorted by name: (meta, columns)
    replaced: set[str]                     # names that merged shards replace (hidden, whether present or not)
    leftover: list[str]                    # replaced shards with files still there
    uncommitted: list[str]                 # params files without an index and not referenced by one


def scan(root: Path) -> Scan:
    """The committed shards, leaving out those that a merged shard replaces; and what may be deleted."""
    shards = root / "shards"
    index_names = sorted(p.name[:-len(".index.npz")] for p in shards.glob("*.index.npz") if not p.name.startswith("."))
    read = {name: read_index(root, name) for name in index_names}
    replaced = {r for meta, _ in read.values() for r in meta.get("replaces", ())}
    params_names = {p.name[:-len(".params.npy")] for p in shards.glob("*.params.npy") if not p.name.startswith(".")}
    referenced = {meta.get("params_file") for meta, _ in read.values()}
    uncommitted = sorted(n for n in params_names - set(read) - replaced if f"{n}.params.npy" not in referenced)
    return Scan({n: v for n, v in read.items() if n not in replaced}, replaced,
                 sorted(replaced & (set(read) | params_names)), uncommitted)


def retrying(read, attempts: int = 5):
    """``read()``, again when a shard vanished under it (another process merged shards meanwhile)."""
    for attempt in range(attempts):
        try:
            return read()
        except ShardGone:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def remove_temporaries(root: Path) -> None:
    """Remove the temporary files that interrupted writes left in the store (never a file in use)."""
    remove_stale_temps(root)
    remove_stale_temps(root / "shards")


def delete_leftovers(root: Path, found: Scan) -> None:
    """Delete merged-away shards (index first: hidden already, now uncommitted too), and the params files of
    shards whose writer died before committing them: only when no process holds their writer lock (a live
    writer keeps it until its index is written) and still no index names them. Nothing where the store is
    read-only."""
    try:
        for name in found.leftover:
            for path in reversed(shard_paths(root, name)):
                path.unlink(missing_ok=True)
        for name in found.uncommitted:
            params_path, index_path = shard_paths(root, name)
            if lock_is_free(params_path) and not index_path.exists():
                params_path.unlink(missing_ok=True)
    except OSError:
        pass


# ----------------------------------------------------------------------------- merging
def merge_shards(root, names: list[str], name: str) -> None:
    """Write shard ``name`` holding the rows of the committed shards ``names``, in order, with their drop
    counts, stats and hyperparameters; its index lists them under ``replaces``, which hides them from then
    on (one rename commits the merge). Params are streamed, one chunk in memory at a time. The replaced
    shards' files are deleted by the next ``finalize_store``, after the manifest stops listing them."""
    root = Path(root)
    parts = [(n, *load_index(root, n)) for n in names]                        # (name, meta, cols)
    if not parts or len({(meta["dtype"], *meta["shape"][1:]) for _, meta, _ in parts}) != 1:
        raise StoreError(f"cannot merge shards {names}: give shards of one dtype and parameter count")
    dtype, P = np.dtype(parts[0][1]["dtype"]), parts[0][1]["shape"][1]
    rows = sum(meta["shape"][0] for _, meta, _ in parts)
    params_path, index_path = shard_paths(root, name)
    crc = 0

    def write(f) -> None:
        nonlocal crc
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": (rows, P)})
        crc = zlib.crc32(header.getvalue())
        f.write(header.getvalue())
        step = max(1, (1 << 24) // max(P * dtype.itemsize, 1))                # rows per 16 MB chunk
        for part, meta, _ in parts:
            if not meta["shape"][0]:
                continue
            array = np.load(params_path_of(root, part, meta), mmap_mode="r")   # [n_i, P]
            for lo in range(0, len(array), step):
                chunk = np.ascontiguousarray(array[lo:lo + step]).tobytes()
                crc = zlib.crc32(chunk, crc)
                f.write(chunk)
            release_pages(array)

    stats: dict[int, np.ndarray] = {}
    dropped = {"nonfinite_params": 0, "nonfinite_metrics": 0}
    hparams: dict[str, dict] = {}
    for _, meta, _ in parts:
        st = meta["stats"]
        for r, rid in enumerate(st["runs"]):
            stats[int(rid)] = stats.get(int(rid), 0) + np.array([st["sum"][r], st["sumsq"][r], st["count"][r]])
        for k in dropped:
            dropped[k] += meta["dropped"][k]
        hparams.update(meta["run_hparams"])
    runs = sorted(stats)
    cols = {k: np.concatenate([c[k] for _, _, c in parts]) for k in parts[0][2]}
    with atomic_write_locked(params_path, write):   # locked until the index commits it
        meta = {"params_file": params_path.name, "shape": [rows, P], "dtype": parts[0][1]["dtype"],
                "nbytes": params_path.stat().st_size, "crc32": crc, "dropped": dropped,
                "stats": {"runs": runs, **{k: [stats[r][j].tolist() for r in runs] for j, k in
                                           enumerate(("sum", "sumsq", "count"))}},
                "run_hparams": hparams, "replaces": list(names)}
        write_index(index_path, meta, cols)
