"""A user's own training, recorded with ``CheckpointRecorder`` (issue 16: "users will not run 512 trainings").

Trains ``--runs`` runs of a LightningModule of its own (a 64-32-32-10 tanh MLP on sklearn's digits, the
splits of ``bench.user_tasks.TwoLayerDigits``; Adam, learning rate log-uniform in [3e-4, 1e-2], a seed per
run), recording the network and its logged ``val_error`` / ``val_loss`` after every epoch into one store.
Then train and evaluate a generator as a user would, naming the task that scores these networks:

    python -m bench.record_user_store --out data/recorded_2layer --runs 48
    PYTHONPATH=. gpt-params train --data.root data/recorded_2layer --data.task bench.user_tasks:RecordedTwoLayer
    PYTHONPATH=. gpt-params evaluate --ckpt <last.ckpt> --out eval --task bench.user_tasks:RecordedTwoLayer

Run from the repository root: the task is imported by its path, ``bench.user_tasks``. A killed recording
resumes: complete runs already in the store count, a run cut short does not (it stays in the store).
"""
from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from bench.user_tasks import RecordedTwoLayer, TanhNet
from checkpoints_dataset import CheckpointRecorder, open_store


class UserModule(pl.LightningModule):
    """A user's module: the network under ``net.``, ``val_error`` and ``val_loss`` logged per epoch."""

    def __init__(self, lr: float):
        super().__init__()
        self.net = TanhNet().net
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_error", (logits.argmax(-1) != y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def recorded_runs(out, epochs: int) -> tuple[int, int]:
    """(complete runs, all runs) in the store: a killed fit leaves a run with fewer than ``epochs + 1``
    checkpoints, which does not count."""
    try:
        store = open_store(out)
    except (FileNotFoundError, ValueError):
        return 0, 0
    runs = np.unique(store.run_ids)
    return sum(len(store.run_checkpoints(r)) >= epochs + 1 for r in runs), len(runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the store to record into (runs already there are kept)")
    p.add_argument("--runs", type=int, default=48)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)   # one progress bar, not a fit's chatter per run
    task = RecordedTwoLayer()
    train, val = task.split("train"), task.split("val")
    done, recorded = recorded_runs(args.out, args.epochs)
    t0 = time.perf_counter()
    for run in tqdm(range(recorded, recorded + args.runs - done), desc="recording runs", initial=done, total=args.runs):
        lr = math.exp(np.random.default_rng(run).uniform(math.log(3e-4), math.log(1e-2)))   # a run's seed sets all
        pl.seed_everything(run, verbose=False)
        trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             callbacks=[CheckpointRecorder(args.out, metrics=["val_error", "val_loss"])])
        trainer.fit(UserModule(lr),
                    DataLoader(TensorDataset(*train), batch_size=args.batch_size, shuffle=True),
                    DataLoader(TensorDataset(*val), batch_size=len(val[1])))
    store = open_store(args.out)
    print(f"{store.num_runs} runs, {store.num_checkpoints} checkpoints in {args.out} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
