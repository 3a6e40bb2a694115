"""kill -9 of `gpt-params train` anywhere leaves checkpoints that load and resume: every checkpoint is written to
a temporary file in its directory, fsync'ed and renamed (AtomicCheckpointIO), and the leftovers of a killed
write are removed later."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from checkpoints_dataset.fileio import remove_stale_temps
from checkpoints_dataset.store import open_store
from gpt_params.cli import main
from gpt_params.cli.train import with_atomic_checkpoints
from gpt_params.core.generator import Generator
from gpt_params.training import AtomicCheckpointIO

from conftest import train_args

LEFTOVER = ".last.ckpt." + "0123456789abcdef" * 2 + ".tmp"    # the name a killed write leaves
WIDE_MODEL = ["--model.dit.hidden_size", "256", "--model.dit.depth", "4"]   # a ~90 MB checkpoint: a slow write


# ----------------------------------------------------------------------------- the writer, in process
def test_a_save_replaces_the_file_whole_and_removes_leftovers(tmp_path):
    (tmp_path / LEFTOVER).write_bytes(b"half a checkpoint")
    (tmp_path / ".notes.tmp").write_text("not ours")
    AtomicCheckpointIO().save_checkpoint({"x": torch.arange(3)}, tmp_path / "last.ckpt")
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "last.ckpt"]
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~_umask()   # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.zeros(1000)}, tmp_path / "last.ckpt")
    before = (tmp_path / "last.ckpt").read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"x": torch.ones(1000)}, tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]   # no temporary file left


def test_leftovers_are_removed_at_load_but_not_while_their_writer_holds_them(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.arange(3)}, tmp_path / "last.ckpt")
    (tmp_path / LEFTOVER).write_bytes(b"half a checkpoint")
    with open(tmp_path / LEFTOVER, "rb") as writing:      # a live writer in another process holds its file
        fcntl.flock(writing, fcntl.LOCK_EX)
        assert remove_stale_temps(tmp_path) == []
        io.save_checkpoint({"x": torch.arange(4)}, tmp_path / "other.ckpt")
        io.load_checkpoint(tmp_path / "last.ckpt", weights_only=True)
        assert (tmp_path / LEFTOVER).exists()
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt", weights_only=True)["x"], torch.arange(3))
    assert not (tmp_path / LEFTOVER).exists()          # its writer is gone: removed at the load


def test_a_users_checkpoint_io_is_kept_and_a_bare_wrapper_gets_ours():
    assert [type(p) for p in with_atomic_checkpoints(None)] == [AtomicCheckpointIO]
    assert [type(p) for p in with_atomic_checkpoints(["bf16-mixed"])] == [str, AtomicCheckpointIO]
    own = TorchCheckpointIO()
    assert with_atomic_checkpoints([own]) == [own]
    wrapper = AsyncCheckpointIO()
    assert with_atomic_checkpoints(wrapper) == [wrapper] and isinstance(wrapper.checkpoint_io, AtomicCheckpointIO)
    wrapped = AsyncCheckpointIO(own)
    assert with_atomic_checkpoints([wrapped]) == [wrapped] and wrapped.checkpoint_io is own


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- SIGKILL of `gpt-params train`
def _start(store, root: Path, log: Path, extra=(), env=None) -> subprocess.Popen:
    args = train_args(store, root, steps=100_000, extra=["--final_eval_runs", "0", *extra])
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "gpt_params", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"gave up waiting (rc={proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(poll)
    return found


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _ckpt_dir(root: Path) -> Path:
    return root / "lightning_logs" / "version_0" / "checkpoints"


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def _check_loads_and_resumes(store, ckpt: Path, root: Path, extra=()) -> int:
    """Every checkpoint next to ``ckpt`` loads; training resumes from ``ckpt`` and reaches its max_steps."""
    for other in ckpt.parent.glob("*.ckpt"):
        torch.load(other, map_location="cpu", weights_only=True)
    Generator.load(ckpt)
    step = _step(ckpt)
    assert step > 0
    assert main(train_args(store, root, steps=step + 2,
                           extra=["--ckpt_path", str(ckpt), "--final_eval_runs", "0", *extra])) == 0
    assert _step(_ckpt_dir(root) / "last.ckpt") == step + 2
    return step


@pytest.mark.slow
def test_kill_while_the_store_is_built_then_train_again(tmp_path):
    """(a) killed while `gpt-params train` builds its store: no checkpoint yet; the next run finishes the store
    and trains to max_steps."""
    store, root = tmp_path / "store", tmp_path / "run"
    build = ["--data.build_runs", "24", "--data.build_epochs", "2"]
    proc = _start(store, root, tmp_path / "train.log", extra=build)
    _wait_for(lambda: (store / "manifest.json").exists(), proc, tmp_path / "train.log", poll=0.002)
    _kill(proc)
    assert not list(store.glob("shards/*.index.npz")), "the build was over: the test did not hit it"
    assert not list(root.rglob("*.ckpt"))
    assert main(train_args(store, tmp_path / "again", steps=10, extra=["--final_eval_runs", "0", *build])) == 0
    assert _step(_ckpt_dir(tmp_path / "again") / "last.ckpt") == 10
    assert open_store(store).num_runs == 24


@pytest.mark.slow
def test_kill_between_checkpoints_resumes(tiny_digits_store, tmp_path):
    """(b) killed after some checkpoints (the default ModelCheckpoint writes last.ckpt every epoch: 8 steps
    here), at a moment unrelated to them."""
    root, log = tmp_path / "run", tmp_path / "train.log"
    proc = _start(tiny_digits_store, root, log)
    last = _ckpt_dir(root) / "last.ckpt"
    _wait_for(lambda: last.exists() and _step(last) >= 16, proc, log)
    time.sleep(0.7)
    _kill(proc)
    _check_loads_and_resumes(tiny_digits_store, last, tmp_path / "resumed")


@pytest.fixture
def tmpdir_elsewhere(tmp_path):
    """An environment whose $TMPDIR is on another file system than tmp_path where there is one (/dev/shm), as
    on clusters: Lightning's own writer then copies its temporary file *into* last.ckpt instead of renaming
    it, which a kill tears; the kill test below must catch that writer (it does: size 0, EOFError)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev):
        yield dict(os.environ)
        return
    other = Path(tempfile.mkdtemp(dir=shm, prefix="test_kill."))
    yield {**os.environ, "TMPDIR": str(other)}
    shutil.rmtree(other, ignore_errors=True)


def _identity(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@pytest.mark.slow
def test_kill_during_the_write_of_last_ckpt_keeps_the_previous_one(tiny_digits_store, tmp_path, tmpdir_elsewhere):
    """(c) killed the moment a new last.ckpt starts being written (a ~90 MB write): its temporary file appears,
    or, with a writer that writes in place, last.ckpt changes. The last.ckpt left loads and resumes, and the
    leftover is removed when the resumed run loads it."""
    root, log = tmp_path / "run", tmp_path / "train.log"
    proc = _start(tiny_digits_store, root, log, extra=WIDE_MODEL, env=tmpdir_elsewhere)
    ckpts = _ckpt_dir(root)
    last = ckpts / "last.ckpt"
    _wait_for(last.exists, proc, log)
    time.sleep(0.2)                              # past the rename of the first one
    before = _identity(last)
    leftovers = lambda: [n for n in os.listdir(ckpts) if n.startswith(".last.ckpt.") and n.endswith(".tmp")]
    _wait_for(lambda: leftovers() or _identity(last) != before, proc, log, poll=0.001)
    _kill(proc)
    hit = leftovers() or (_identity(last) or (0, -1))[1] != before[1]   # a temporary file, or a torn last.ckpt
    assert hit, "the kill came after the write: the test did not hit it"
    _check_loads_and_resumes(tiny_digits_store, last, tmp_path / "resumed", extra=WIDE_MODEL)
    assert not leftovers()                       # removed when the resumed run loaded last.ckpt
