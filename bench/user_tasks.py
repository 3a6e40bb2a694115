"""A user's own task for the issue-16 study: a two-hidden-layer MLP on sklearn's digits, written as a user
would write it (a plain ``ClassificationTask``, not a subclass of the built-in ``digits_mlp``), and given
to the tools by its import path:

    PYTHONPATH=. gpt-params build-dataset --task bench.user_tasks:TwoLayerDigits --out data/user_2layer --runs 512
    PYTHONPATH=. gpt-params train --data.root data/user_2layer --data.task bench.user_tasks:TwoLayerDigits

(from the repository root: the import path must be importable). ``RecordedTwoLayer`` scores the networks
``bench/record_user_store.py`` records.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from checkpoints_dataset.tasks.base import ClassificationTask


class TwoLayerDigits(ClassificationTask):
    """sklearn's 8x8 digits, pixels / 16, a 64-32-32-10 ReLU MLP; 60/20/20 split by a fixed permutation."""

    name = "two_layer_digits"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        data = load_digits()
        x = torch.tensor(data.data / 16.0, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.int64)
        order = torch.from_numpy(np.random.default_rng(1).permutation(len(y)))   # not digits_mlp's split
        n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
        parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        return {k: (x[i], y[i]) for k, i in parts.items()}


class TanhNet(nn.Module):
    """The network of ``bench/record_user_store.py``'s LightningModule: its parameters are named ``net.*``
    there, so the task builds the same names."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RecordedTwoLayer(TwoLayerDigits):
    """The task of a store recorded with ``CheckpointRecorder`` from a user's own training
    (``bench/record_user_store.py``): a 64-32-32-10 tanh MLP on the same digits splits."""

    name = "recorded_two_layer"

    def build_model(self) -> nn.Module:
        return TanhNet()
