"""digits_mlp: sklearn's 8x8 digits (embedded, no download) with a 64-32-10 ReLU MLP.

Inputs are the 64 pixel values / 16 (in [0, 1]); the 1,797 images are split 60/20/20 into
train/val/test by a fixed permutation drawn from ``split_seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .base import ClassificationTask


class DigitsMLP(ClassificationTask):
    """``hidden``: the width of the hidden layer, or a list of widths for several (``hidden=[32, 32]``: the MLP
    64-32-32-10). ``compression=True`` adds the metrics ``sparsity`` and ``bits`` (for compressed builds)."""

    name = "digits_mlp"

    def __init__(self, hidden: int | Sequence[int] = 32, split_seed: int = 0, compression: bool = False):
        widths = [hidden] if isinstance(hidden, (int, np.integer)) else list(hidden)
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"hidden must be a width >= 1 or a non-empty list of them, got {hidden!r}")
        self.hidden = int(widths[0]) if len(widths) == 1 else [int(w) for w in widths]
        self.split_seed = int(split_seed)
        self.compression = bool(compression)

    def build_options(self) -> dict:
        """The options that change what a build produces, when they differ from the defaults."""
        defaults = {"hidden": 32, "split_seed": 0, "compression": False}
        return {k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v}

    def build_model(self) -> nn.Module:
        widths = [64, *([self.hidden] if isinstance(self.hidden, int) else self.hidden)]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], 10))

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits  # heavy (about a second): only when the data is first needed

        data = load_digits()
        x = torch.tensor(data.data / 16.0, dtype=torch.float32)          # [1797, 64]
        y = torch.tensor(data.target, dtype=torch.int64)                  # [1797]
        order = torch.from_numpy(np.random.default_rng(self.split_seed).permutation(len(y)))
        n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
        parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        return {k: (x[i], y[i]) for k, i in parts.items()}
