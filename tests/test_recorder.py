"""CheckpointRecorder: real (tiny, CPU) Lightning fits write a store; new fits add runs; resuming continues."""
import math

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from checkpoints_dataset import CheckpointRecorder, PairDataset, open_store  # noqa: E402


class TinyModule(pl.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_error", (self.net(x).argmax(1) != y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    return torch.utils.data.DataLoader(data, batch_size=16)


def _fit(tmp_path, max_epochs, ckpt_path=None, callbacks=()):
    rec = CheckpointRecorder(tmp_path / "store", metrics=["train_loss", "val_error"])
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[rec, *callbacks], enable_progress_bar=False,
                         logger=False, enable_checkpointing=bool(callbacks), accelerator="cpu",
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    torch.manual_seed(max_epochs)
    trainer.fit(TinyModule(), _loader(0), _loader(1), ckpt_path=ckpt_path)
    return rec


def test_fits_become_runs_and_resume_continues(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path, 2, callbacks=[ckpt])
    store = open_store(tmp_path / "store")
    assert store.num_runs == 1 and store.num_checkpoints == 3  # init + 2 epochs
    assert list(store.layer_shapes) == list(TinyModule().state_dict())  # names exactly the state_dict keys
    first = store.metrics(store.run_checkpoints(0))
    assert math.isnan(first["val_error"][0]) and math.isnan(first["train_loss"][0])  # initial: nothing logged
    assert np.isfinite(first["train_loss"][1:]).all() and store.manifest["dropped"]["nonfinite_metrics"] == 0
    assert store.permutation_spec is not None and store.permutation_spec.groups[0].axes[0][0] == "net.0.weight"
    init = store.params(store.run_checkpoints(0)[:1])[0]
    assert not np.allclose(init, store.params(store.run_checkpoints(0)[-1:])[0])  # training moved the params

    _fit(tmp_path, 2)  # a new fit: a new run
    assert open_store(tmp_path / "store").num_runs == 2

    _fit(tmp_path, 4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # resumed: continues run 0
    store = open_store(tmp_path / "store")
    assert store.num_runs == 2
    steps = store.steps[store.run_checkpoints(0)]
    assert steps.tolist() == [0, 4, 8, 12, 16]
    assert np.isfinite(store.metrics(store.run_checkpoints(0))["val_error"][1:]).all()
    pairs = PairDataset(store, runs=[0, 1], metric="val_error")
    # the NaN-metric initial checkpoints of both runs never condition a pair
    assert len(pairs) == 8 - 2 and pairs[3]["target"].shape == (store.num_params,)
    batch = pairs.get_batch(np.arange(len(pairs)))
    assert torch.isfinite(batch["start_metric"]).all() and torch.isfinite(batch["target_metric"]).all()


def test_every_n_steps_and_include(tmp_path):
    rec = CheckpointRecorder(tmp_path / "s", metrics=["train_loss"], every_n_epochs=None, every_n_steps=3,
                             include=["net.2.*"])
    trainer = pl.Trainer(max_epochs=2, callbacks=[rec], enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, accelerator="cpu", enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(TinyModule(), _loader(0))
    store = open_store(tmp_path / "s")
    assert list(store.layer_shapes) == ["net.2.weight", "net.2.bias"]
    assert store.permutation_spec is None  # the hidden group also moves net.0.*, which is not recorded
    # steps 3 (epoch 0: the epoch-level train_loss is not logged yet, NaN and kept) and 6 after the initial one
    assert store.steps.tolist() == [0, 3, 6] and store.manifest["dropped"]["nonfinite_metrics"] == 0
    loss = store.metrics(np.arange(3))["train_loss"]
    assert math.isnan(loss[0]) and math.isnan(loss[1]) and math.isfinite(loss[2])
    assert store.epochs[2] == pytest.approx(1.5)


class DivergingModule(TinyModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("bad", float("nan") if self.current_epoch == 1 else 1.0, on_epoch=True, on_step=False)
        return loss


def test_a_logged_nan_drops_the_checkpoint(tmp_path):
    rec = CheckpointRecorder(tmp_path / "s", metrics=["bad"], every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=3, callbacks=[rec], enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, accelerator="cpu", enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(DivergingModule(), _loader(0))
    store = open_store(tmp_path / "s")
    assert store.steps.tolist() == [0, 4, 12] and store.manifest["dropped"]["nonfinite_metrics"] == 1


def test_each_checkpoint_is_committed_before_the_next_step_and_a_fit_ends_as_one_shard(tmp_path):
    root = tmp_path / "s"
    seen = []

    class Probe(pl.Callback):   # after the recorder: what is on disk when the next step starts
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, open_store(root).steps.tolist()))

    rec = CheckpointRecorder(root, metrics=["train_loss"], every_n_epochs=None, every_n_steps=1)
    trainer = pl.Trainer(max_steps=6, callbacks=[rec, Probe()], enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, accelerator="cpu", enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(TinyModule(), _loader(0))
    assert seen == [(s, list(range(s + 1))) for s in range(6)]   # step s starts with checkpoints 0..s on disk
    store = open_store(root)
    assert store.steps.tolist() == list(range(7)) and len(store.manifest["shards"]) == 1   # merged at fit end
    assert sorted(p.name for p in (root / "shards").iterdir()) == [
        f"{store.manifest['shards'][0]['name']}.{ext}" for ext in ("index.npz", "params.npy")]

    buffered = CheckpointRecorder(tmp_path / "b", metrics=["train_loss"], every_n_epochs=None, every_n_steps=1,
                                  flush_every=4)   # opt-in buffering: same store, fewer writes
    trainer = pl.Trainer(max_steps=6, callbacks=[buffered], enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, accelerator="cpu", enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0)
    torch.manual_seed(0)
    trainer.fit(TinyModule(), _loader(0))
    assert open_store(tmp_path / "b").steps.tolist() == list(range(7))
    with pytest.raises(ValueError, match="flush_every"):
        CheckpointRecorder(tmp_path / "c", flush_every=0)


_KILLED_FIT = '''
import pytorch_lightning as pl
import torch
from torch import nn
from checkpoints_dataset import CheckpointRecorder

torch.set_num_threads(1)


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Report(pl.Callback):   # runs after the recorder: the checkpoint of this step was recorded
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(trainer.global_step, flush=True)


def fit(root, max_steps, report=False):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    recorder = CheckpointRecorder(root, metrics=["train_loss"], every_n_epochs=None, every_n_steps=1)
    pl.Trainer(max_steps=max_steps, callbacks=[recorder] + [Report()] * report, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="cpu").fit(Module(), data)
    return recorder
'''


@pytest.mark.parametrize("kill_after", [3, 40])
def test_sigkill_keeps_every_recorded_checkpoint_and_the_next_fit_appends(tmp_path, kill_after, monkeypatch):
    """A recorded fit killed with SIGKILL keeps every checkpoint whose step had ended (the initial one and one
    per optimizer step up to the last completed step, possibly one more whose write had finished); the store
    opens as it is, and the next fit adds run 1 and leaves run 0 untouched."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "store"
    (tmp_path / "killed_fit.py").write_text(_KILLED_FIT)   # one module for the killed fit and the next one
    out = open(tmp_path / "steps.txt", "w")
    child = subprocess.Popen([sys.executable, "-c", "import sys, killed_fit; killed_fit.fit(sys.argv[1], 10**6, True)",
                              str(root)], stdout=out, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONUNBUFFERED": "1",
                                  "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    try:
        deadline = time.monotonic() + 120
        while len(list((root / "shards").glob("*.index.npz"))) < kill_after:   # committed shards
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the recorded fit wrote too few checkpoints in 120 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
        out.close()
    assert child.returncode == -signal.SIGKILL
    reported = [int(s) for s in (tmp_path / "steps.txt").read_text().split()]   # steps whose hooks had ended

    store = open_store(root, verify="full")   # opens without a finalize; every file checks out
    steps = store.steps[store.run_checkpoints(0)].tolist()
    assert store.num_runs == 1 and len(steps) >= kill_after and steps == list(range(len(steps)))
    assert set(reported) <= set(steps) and steps[-1] <= (reported[-1] if reported else 0) + 1
    assert np.isfinite(store.params(np.arange(len(store)))).all()
    assert not [p for p in root.rglob("*.tmp")]   # temporaries of a write the kill interrupted: removed
    names = lambda ext: sorted(p.name[:-len(ext)] for p in (root / "shards").glob(f"*{ext}"))
    assert names(".params.npy") == names(".index.npz")   # and a params file the kill left without its index
    before = store.params(store.run_checkpoints(0))

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "killed_fit", raising=False)
    import killed_fit
    rec = killed_fit.fit(root, 3)   # the next fit, same recorder and out_dir
    store = open_store(root)
    assert store.runs.tolist() == [0, 1] and rec.run_id is None
    assert store.steps[store.run_checkpoints(0)].tolist() == steps
    assert np.array_equal(store.params(store.run_checkpoints(0)), before)
    assert store.steps[store.run_checkpoints(1)].tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_fits_recording_into_one_store_at_once_get_distinct_run_ids(tmp_path):
    """Two fits start together on one out_dir (a sweep): each claims its own run id and keeps its own steps."""
    import os
    import subprocess
    import sys

    (tmp_path / "killed_fit.py").write_text(_KILLED_FIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", "import sys, killed_fit; killed_fit.fit(sys.argv[1], 20)",
                               str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    store = open_store(tmp_path / "store")
    assert store.runs.tolist() == [0, 1]
    assert all(store.steps[store.run_checkpoints(r)].tolist() == list(range(21)) for r in (0, 1))


@pytest.mark.slow
def test_a_fit_claims_its_run_id_under_the_store_s_recorder_lock(tmp_path):
    """While another fit holds the lock (between reading the run ids and committing its first checkpoint), a
    fit records nothing; then it claims the next id."""
    import fcntl
    import os
    import subprocess
    import sys

    (tmp_path / "killed_fit.py").write_text(_KILLED_FIT)
    root = tmp_path / "store"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    with open(root / ".recorder.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", "import sys, killed_fit; killed_fit.fit(sys.argv[1], 3)",
                                 str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        assert proc.returncode is None and not list(root.glob("shards/*.index.npz"))   # waiting at the claim
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert proc.wait(timeout=300) == 0 and open_store(root).runs.tolist() == [0]
