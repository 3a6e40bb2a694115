"""Test-only Lightning callbacks (imported by subprocesses through PYTHONPATH)."""
import json
import os
from pathlib import Path

import pytorch_lightning as pl


class RecordBatches(pl.Callback):
    """Writes, per rank, a fingerprint of every training target it saw to $RECORD_BATCHES_DIR/rank{r}.json."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        targets = batch["target"]
        self.seen += [f"{float(t.abs().sum()):.6f}:{float(t[:4].sum()):.6f}" for t in targets]

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["RECORD_BATCHES_DIR"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.seen))
