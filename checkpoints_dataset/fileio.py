"""Atomic file writes, and the removal of what interrupted ones leave behind (used by both packages).

``atomic_write(path, write)`` calls ``write(f)`` on a temporary file next to ``path``, flushes and fsyncs it,
renames it over ``path`` and fsyncs the directory: a reader (or a later run after a crash, ``kill -9`` or a
full disk) sees the old file or the new one, never a half-written one; when ``write`` raises, ``path`` is
left as it was and the temporary file is removed.

Temporary files are named ``.<file name>.<32 hex digits>.tmp`` (``is_temp_name``) and stay locked
(``fcntl.flock``) by their writer until the rename. ``remove_stale_temps(directory)`` deletes the ones of
writers that died (no lock held): stores call it when opened or written, the commands on their output
directories. Other files are never touched.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import IO, Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - platforms without flock: stale temporaries are then never removed
    fcntl = None

_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporaries (``.<name>.<uuid4 hex>.tmp``)."""
    return bool(_TEMP_RE.match(name))


def fsync_dir(path) -> None:
    """fsync a directory, so that a rename in it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock(fd: int, blocking: bool) -> bool:
    """flock(LOCK_EX) ``fd``: True when held, False when another process holds it or locks are unsupported."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _open_temp(path: Path) -> tuple[IO[bytes], Path]:
    """A new locked temporary file next to ``path``. If a cleaner removed it between our create and our lock
    (it found it unlocked), start over with another name."""
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        f = open(tmp, "xb")
        if _lock(f.fileno(), blocking=True) and os.fstat(f.fileno()).st_nlink == 0:
            f.close()
            continue
        return f, tmp


def atomic_write(path, write: Callable[[IO[bytes]], object], *, exclusive: bool = False) -> bool:
    """Write ``path`` through ``write(binary file)``: temporary file in the same directory, fsync, rename.

    With ``exclusive`` the temporary file is hard-linked instead, so an existing ``path`` is kept: returns
    False then (True when written). If ``write`` raises, ``path`` is unchanged and the temporary is removed.
    """
    return _write(Path(path), write, exclusive, keep_lock=False)


def atomic_write_locked(path, write: Callable[[IO[bytes]], object]) -> IO[bytes]:
    """``atomic_write``, returning the written file still open and ``flock``-ed: until the caller closes it, a
    cleaner (``lock_is_free``) knows the file's writer is alive (a store's params file, until its index
    commits it)."""
    return _write(Path(path), write, False, keep_lock=True)


def _write(path: Path, write, exclusive: bool, keep_lock: bool):
    f, tmp = _open_temp(path)
    done = False
    try:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        done = True
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if not (done and keep_lock):
            f.close()  # releases the lock only now: a cleaner never takes a temporary that is still in use
    fsync_dir(path.parent)
    return f if keep_lock else True


def lock_is_free(path) -> bool:
    """Whether no process holds ``path``'s writer lock (``atomic_write_locked``): False also where locks are
    not supported, so callers that delete on True never delete a file in use."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        return _lock(fd, blocking=False)
    finally:
        os.close(fd)


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_bytes(obj, allow_nan: bool = True) -> bytes:
    return json.dumps(obj, indent=1, allow_nan=allow_nan).encode()


def write_json_atomic(path, obj, *, allow_nan: bool = True) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: readers see the old file or the new one, never a
    half-written one. The JSON is built before the file is touched (a ValueError leaves the old file)."""
    write_bytes_atomic(path, json_bytes(obj, allow_nan))


def savefig_atomic(fig, path, **savefig_kwargs) -> None:
    """``fig.savefig`` to ``path`` atomically (format from the suffix, e.g. ``.png``); a failing
    render leaves the previous file."""
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    atomic_write(path, lambda f: fig.savefig(f, **savefig_kwargs))


def remove_stale_temps(directory) -> list[Path]:
    """Delete the temporaries (``is_temp_name``) that interrupted writes left in ``directory`` (not recursive).

    A temporary is removed only when no live writer holds its lock, so writers in other processes are safe.
    Other files are never touched; where files cannot be removed (read-only directory) they stay. Returns
    the removed paths."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # missing, not a directory, unreadable
        return removed
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _lock(fd, blocking=False):
                continue  # a live writer (or no locking on this file system): leave it
            opened, current = os.fstat(fd), os.stat(entry.path, follow_symlinks=False)
            if (opened.st_ino, opened.st_dev) != (current.st_ino, current.st_dev):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass  # renamed meanwhile, or a read-only directory
        finally:
            os.close(fd)
    return removed


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (progress bars redraw there; in a log file they should not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False
