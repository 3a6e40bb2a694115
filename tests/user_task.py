"""A user's own task, imported by its path ``tests.user_task:SmallDigits`` (see test_untrusted.py)."""
from torch import nn

from checkpoints_dataset.tasks.digits import DigitsMLP


class SmallDigits(DigitsMLP):
    """sklearn's digits with a narrower MLP (64-8-10): not a built-in task."""

    name = "small_digits"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


class RecordedDigits(DigitsMLP):
    """The network of test_recorded_store.py's UserModule (64-16-10 under ``net.``), scored on digits."""

    name = "recorded_digits"

    def build_model(self) -> nn.Module:
        return _Net()
