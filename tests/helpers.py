"""Test-only Lightning callbacks (imported by subprocesses through PYTHONPATH)."""
import json
import os
from pathlib import Path

import pytorch_lightning as pl


class RecordBatches(pl.Callback):
    """Writes, per rank, the ``[epoch, run_id, target_step]`` of every training pair it trained on to
    $RECORD_BATCHES_DIR/rank{r}.json (one list per batch). A pair's target is one checkpoint of the store,
    named by its run and step; the start and the permutation are drawn per rank and say nothing of which
    checkpoints a rank reads."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        epoch = trainer.current_epoch
        self.batches.append([[epoch, int(r), int(s)] for r, s in zip(batch["run_id"].tolist(),
                                                                      batch["target_step"].tolist())])

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["RECORD_BATCHES_DIR"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.batches))
