"""A progress bar for logs: Lightning's tqdm bars on a terminal, a plain line every few seconds elsewhere.

Redirected to a file (CI, ``nohup``, a SLURM log), tqdm redraws its bar with a carriage return at every
update (bench/NOTES.md has the log sizes). ``LogProgressBar`` is ``TQDMProgressBar`` when stdout is a
terminal; otherwise its bars stay silent and it prints one line every ``interval`` seconds and one at the end
of training, e.g.::

    Epoch E i/n | step s/max_steps | R it/s | h:mm:ss | train/loss_step=... val/loss=...
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Optional

from pytorch_lightning.callbacks import TQDMProgressBar

from checkpoints_dataset.fileio import is_terminal


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LogProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` on a terminal; plain progress lines every ``interval`` seconds when stdout is not
    one (``plain=None``: decided at setup from ``sys.stdout.isatty()``; True/False force either)."""

    def __init__(self, interval: float = 10.0, plain: Optional[bool] = None, refresh_rate: int = 1,
                 process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.interval = interval
        self.plain = plain
        self._lines = bool(plain)
        self._t0 = self._last = 0.0
        self._step0 = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._lines = not is_terminal(sys.stdout) if self.plain is None else self.plain

    @property
    def is_enabled(self) -> bool:   # the tqdm bars (and Lightning's printing through them)
        return super().is_enabled and not self._lines

    def _printing(self) -> bool:
        return self._lines and self._enabled and self.refresh_rate > 0   # disabled on ranks other than 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0 = self._last = time.monotonic()
        self._step0 = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._printing() and time.monotonic() - self._last >= self.interval:
            self._print_line(trainer, pl_module, batch_idx + 1)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self._printing():
            self._print_line(trainer, pl_module, None)

    def line(self, trainer, pl_module, batch: Optional[int]) -> str:
        """The progress line: epoch (and batch of the epoch), global step, speed, elapsed time, metrics."""
        elapsed = time.monotonic() - self._t0
        total = self.total_train_batches
        where = f"Epoch {trainer.current_epoch}"
        if batch is not None:
            where += f" {batch}/{total if isinstance(total, int) else '?'}"
        step = f"step {trainer.global_step}" + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")
        rate = (trainer.global_step - self._step0) / elapsed if elapsed > 0 else 0.0
        metrics = " ".join(f"{k}={_fmt(v)}" for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num")
        clock = datetime.timedelta(seconds=round(elapsed))
        return " | ".join(part for part in (where, step, f"{rate:.2f} it/s", str(clock), metrics) if part)

    def _print_line(self, trainer, pl_module, batch: Optional[int]) -> None:
        self._last = time.monotonic()
        print(self.line(trainer, pl_module, batch), file=sys.stdout, flush=True)
