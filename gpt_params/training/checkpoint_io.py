"""Checkpoint writes that a kill cannot tear.

Lightning's ``TorchCheckpointIO`` serializes a checkpoint in memory and hands it to fsspec, whose local
"transaction" writes a temporary file in ``$TMPDIR`` and ``shutil.move``s it onto the checkpoint's name: a
rename when ``$TMPDIR`` is on the checkpoint's file system, otherwise a copy *into* the existing file (a
``kill -9`` during the copy leaves a truncated ``last.ckpt``), never an fsync, and every kill leaves its
temporary file in ``$TMPDIR`` for good.

``AtomicCheckpointIO`` writes next to the checkpoint instead, through ``checkpoints_dataset.fileio.atomic_write``:
``torch.save`` into ``.<name>.<32 hex>.tmp`` in the checkpoint's own directory, flush, fsync, ``os.replace``
onto the name, fsync the directory. Readers (and a resumed run) see the old file or the new one, never a
partial one. The writer holds an exclusive ``flock`` on its temporary file until the rename, so a temporary
file nobody holds is a dead writer's: such leftovers are removed (``fileio.remove_stale_temps``) at the next
write in that directory and when a checkpoint of that directory is loaded (a resume). Remote paths
(``s3://`` ...) keep Lightning's writer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.utils import get_protocol
from pytorch_lightning.plugins.io import TorchCheckpointIO

from checkpoints_dataset.fileio import atomic_write, remove_stale_temps


def _local_path(path) -> Optional[Path]:
    """``path`` as a local Path, or None for a remote URL."""
    path = str(path)
    if get_protocol(path) not in ("file", "local"):
        return None
    return Path(path.split("://", 1)[1] if "://" in path else path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable: temporary file in the checkpoint's
    directory, fsync, ``os.replace``; a good checkpoint is never replaced by a partial one. Leftovers of killed
    writes are removed at the next write in the directory and when one of its checkpoints is loaded.
    ``gpt-params train`` uses it unless ``--trainer.plugins`` names another CheckpointIO."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        target = _local_path(path)
        if target is None or storage_options is not None:   # remote, or options Lightning's writer refuses
            return super().save_checkpoint(checkpoint, path, storage_options)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent)
        atomic_write(target, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        local = _local_path(path)
        if local is not None:   # a resume: what a killed writer left next to this checkpoint goes
            remove_stale_temps(local.parent)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
