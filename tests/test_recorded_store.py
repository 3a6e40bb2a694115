"""A store recorded from another project (CheckpointRecorder, no built-in task) trains and prompts too."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from checkpoints_dataset import CheckpointRecorder, get_task, open_store
from conftest import QUIET, TINY_MODEL
from gpt_params.cli import main


class UserModule(pl.LightningModule):
    """A user's own module: its network lives under ``net.`` and it logs ``val_loss``."""

    def __init__(self, lr: float):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    task = get_task("digits_mlp")
    train, val = DataLoader(TensorDataset(*task.split("train")), batch_size=128), DataLoader(
        TensorDataset(*task.split("val")), batch_size=512)
    for run in range(8):
        pl.seed_everything(run)
        trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[CheckpointRecorder(root / "store", metrics=["val_loss"])])
        trainer.fit(UserModule(lr=0.05 * (1 + run)), train, val)
    return root


def test_recorded_store_trains_and_prompts_from_the_users_state_dict(recorded, capsys):
    store = open_store(recorded / "store")
    assert store.task is None and store.num_runs == 8 and "net.0.weight" in store.layer_shapes
    assert main(["train", "--data.root", str(recorded / "store"), "--trainer.default_root_dir", str(recorded / "run"),
                 "--trainer.max_steps", "4", "--data.batch_size", "8", *TINY_MODEL, *QUIET]) == 0
    ckpt = next((recorded / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    info = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["data_info"]
    assert info["task"] is None and info["metric"] == "val_loss"
    assert all(map(lambda v: v == v, info["metric_range"] + [info["init_metric"]]))   # no NaN leaked in
    start = recorded / "start.safetensors"
    save_file({k: v.contiguous() for k, v in UserModule(0.1).state_dict().items()}, str(start))
    out = recorded / "prompts"
    assert main(["prompt", "--ckpt", str(ckpt), "--target", "0.5", "--num", "2", "--start", str(start),
                 "--out", str(out), "--steps", "2"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 and "achieved" not in records[0]          # no task: not evaluated, with a note
    assert "not evaluated" in capsys.readouterr().err
    net = UserModule(0.1)
    from safetensors.torch import load_file
    net.load_state_dict(load_file(str(out / records[0]["file"])))       # the user's own names


def test_random_start_without_a_task_is_refused(recorded, capsys):
    ckpt = next((recorded / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    rc = main(["prompt", "--ckpt", str(ckpt), "--target", "0.5", "--num", "1", "--out", str(recorded / "p2")])
    assert rc == 2 and "--start random needs the task's model: give --task pkg.module:Class" in capsys.readouterr().err


def test_the_task_scores_the_recorders_initial_checkpoints_for_training(recorded):
    """The recorder's first checkpoint of a run comes before any validation (no metric). Given a task, the
    data module scores those checkpoints, so training pairs start at real inits and init_metric is theirs."""
    import numpy as np

    from gpt_params.training.data import ParameterDataModule
    from tests.user_task import RecordedDigits

    store = open_store(recorded / "store")
    data = ParameterDataModule(root=str(recorded / "store"), task="tests.user_task:RecordedDigits",
                               metric="val_loss", batch_size=8)
    runs = np.concatenate([data.train_run_ids, data.val_run_ids])
    first = np.array([store.run_checkpoints(int(r))[0] for r in runs])
    assert np.isnan(store.metrics(first)["val_loss"]).all()
    scored = RecordedDigits().evaluate(torch.as_tensor(np.asarray(store.params(first))))["val_loss"].double().numpy()
    np.testing.assert_allclose(data.metric_values[first], scored, rtol=1e-6)
    assert data.info.init_metric == pytest.approx(float(np.median(scored)), rel=1e-6)
    data.setup("fit")
    assert set(first[np.isin(runs, data.train_run_ids)]) <= set(data.train_set._order.tolist())
    without = ParameterDataModule(root=str(recorded / "store"), metric="val_loss", batch_size=8)   # no task
    assert without.metric_values is None and without.info.init_metric != pytest.approx(data.info.init_metric)
