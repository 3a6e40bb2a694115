"""Test-only Lightning callbacks (imported by subprocesses through PYTHONPATH) and small data writers."""
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl


def write_idx(path, array: np.ndarray) -> None:
    """A gzip IDX file of uint8 ``array`` (the Fashion-MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(directory, n_train=40, n_test=20) -> dict:
    """Random Fashion-MNIST-shaped IDX files in ``directory`` (file name -> array), so that the Fashion tasks
    run without the real data."""
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
             "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test)}
    for name, arr in files.items():
        write_idx(Path(directory) / name, arr)
    return files


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


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_args(tmp_path, config: str, fashion: bool = False) -> list[str]:
    """`gpt-params train --config configs/<config>.yaml` with its store at ``tmp_path/store``; ``fashion``: on the
    test's own small Fashion-MNIST-shaped files (``tmp_path/fashion``)."""
    args = ["train", "--config", str(CONFIGS / f"{config}.yaml"), "--data.root", str(tmp_path / "store")]
    if fashion:
        data = tmp_path / "fashion"
        data.mkdir()
        fake_fashion(data, n_train=200, n_test=30)
        args += ["--data.data_dir", str(data)]
    return args
