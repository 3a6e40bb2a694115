"""A user's own task, imported by its path ``tests.user_task:SmallDigits`` (see test_untrusted.py)."""
from torch import nn

from checkpoints_dataset.tasks.digits import DigitsMLP


class SmallDigits(DigitsMLP):
    """sklearn's digits with a narrower MLP (64-8-10): not a built-in task."""

    name = "small_digits"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
