"""CheckpointRecorder: a Lightning callback that turns any training into a checkpoint dataset.

Add it to a Trainer and each ``fit`` becomes one run of a store at ``out_dir`` (the format of store.py):
the initial checkpoint at the start of training, then one checkpoint every ``every_n_epochs`` epochs and/or
every ``every_n_steps`` optimizer steps, each with the chosen logged metrics (``trainer.callback_metrics``).
A metric not logged yet is stored as NaN (the initial checkpoint's, or an epoch-level metric before the first
epoch ends) and does not drop the checkpoint; a logged non-finite value does. A fit resumed from a Lightning
checkpoint (``ckpt_path=...``) continues its own run: the run id lives in the callback's state. Only global rank zero writes.
Fits recording into one store at once (a sweep) get distinct run ids: a fit claims the next free id under a
lock and commits its initial checkpoint before it lets go.

Resuming after a kill: checkpoints recorded after the Lightning checkpoint the fit resumes from stay in the run,
and the resumed fit records only steps past the last one recorded. Lightning does not restore the RNG state, so
the steps between that checkpoint and the kill are retrained on another trajectory; the run then holds the
killed trajectory up to the kill and the resumed one after it.

By default every checkpoint is committed to the store (as a one-checkpoint shard, atomically) before the next
training step, so a ``kill -9`` loses nothing recorded; ``flush_every=n`` buffers up to n checkpoints in memory
instead (fewer, larger writes; a kill loses the buffer). At the end of a fit (and when training raises) the
fit's shards are merged into one and the store is finalized; a store a killed fit left behind opens as it is
(``open_store`` finalizes it) and the next fit appends to it. This is the only module of the package that
imports Lightning.
"""

from __future__ import annotations

import fcntl
import fnmatch
import logging
import math
import re
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch

from .params import LayerShapes, float_layer_shapes
from .permute import PermutationSpec, infer_permutation_spec
from .shards import merge_shards, retrying, scan
from .store import create_store, finalize_store, write_shard

log = logging.getLogger(__name__)

_HIGHER_IS_BETTER = ("acc", "return", "reward", "auc", "f1", "score", "precision", "recall")


def _select(names: list[str], include: str | list[str] | None) -> list[str]:
    """``include``: None (all), a regex (``re.search`` on the name) or a list of globs (``fnmatch``)."""
    if include is None:
        return names
    if isinstance(include, str):
        pattern = re.compile(include)
        return [n for n in names if pattern.search(n)]
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in include)]


def _restricted_spec(module: torch.nn.Module, shapes: dict) -> dict | None:
    """The inferred spec, keeping only the groups whose every axis is a recorded entry (else None)."""
    try:
        spec = infer_permutation_spec(module)
    except ValueError:
        return None
    groups = [g for g in spec.groups if all(name in shapes for name, _, _ in g.axes)]
    return PermutationSpec(shapes, groups).to_json() if groups else None


class CheckpointRecorder(pl.Callback):
    """Record a LightningModule's parameter vector and logged metrics along training into a store.

    Args:
        out_dir: the store directory (created on first use; later fits add runs).
        metrics: names of logged metrics to record (``self.log(name, ...)`` in the module).
        every_n_epochs: record at the end of every n-th training epoch (None: never).
        every_n_steps: record after every n-th optimizer step (None: never).
        include: which state_dict float entries to record: None (all), a regex string matched with
            ``re.search`` against each name, or a list of globs (``["net.*.weight", "head.*"]``).
        lower_is_better: per metric; default guesses False for names containing acc/return/reward/auc/f1/score.
        dtype: "float32" or "float16" storage.
        flush_every: checkpoints per write. 1 (default): each checkpoint is on disk, as a committed shard,
            before training goes on, so a ``kill -9`` loses none (a few ms per checkpoint on a local disk,
            mostly fsync). n > 1 (opt-in buffering): up to n checkpoints wait in memory and a kill loses
            them; the buffer is also written at the end of fit, when training raises, and by ``flush()``.

    However a fit ends, its shards are merged into one and the store is finalized; after a kill, the store
    keeps one shard per recorded checkpoint of the killed fit, opens as it is, and the next fit adds a run.
    """

    def __init__(self, out_dir, metrics=(), every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 include: str | list[str] | None = None, lower_is_better: dict[str, bool] | None = None,
                 dtype: Literal["float32", "float16"] = "float32", flush_every: int = 1):
        super().__init__()
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1 (1: every checkpoint is written at once), "
                             f"got {flush_every!r}")
        self.out_dir = Path(out_dir)
        self.metric_names = list(metrics)
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.include, self.dtype, self.flush_every = include, dtype, flush_every
        given = lower_is_better or {}
        self.lower_is_better = {m: given.get(m, not any(k in m.lower() for k in _HIGHER_IS_BETTER))
                                for m in self.metric_names}
        self.run_id: int | None = None
        self._resumed = False
        self._names: list[str] = []
        self._shapes = LayerShapes()  # the recorded entries' layout, set at train start
        self._buffer: list[tuple[np.ndarray, int, float, list[float], list[bool]]] = []
        self._last_step = -1
        self._written: list[str] = []      # shards this fit wrote, merged into one when it ends
        self._written_steps: list[int] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(out_dir=str(self.out_dir))

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "out_dir": str(self.out_dir)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.run_id = state_dict.get("run_id")
        self._resumed = self.run_id is not None

    # ------------------------------------------------------------------ store bookkeeping
    def _recorded_steps(self) -> dict[int, int]:
        """run id -> largest recorded step, from the committed shards' indexes (small files)."""
        out: dict[int, int] = {}
        for _, cols in retrying(lambda: scan(self.out_dir)).shards.values():
            for rid, step in zip(cols["run_id"].tolist(), cols["step"].tolist()):
                out[rid] = max(out.get(rid, -1), step)
        return out

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: float, initial: bool = False) -> None:
        step = trainer.global_step
        if step <= self._last_step:  # a resumed fit replays steps already recorded
            return
        sd = pl_module.state_dict()
        vec = self._shapes.join({n: sd[n].detach().float().cpu()[None] for n in self._names})[0].numpy()  # [P]
        logged = trainer.callback_metrics
        values = [float(logged[m]) if m in logged else math.nan for m in self.metric_names]
        not_yet = [initial or m not in logged for m in self.metric_names]   # NaN allowed: nothing logged yet
        self._buffer.append((vec, step, epoch, values, not_yet))
        self._last_step = step
        if len(self._buffer) >= self.flush_every:
            self._write_buffer()

    def flush(self) -> None:
        """Write the buffered checkpoints (if any) as a shard and finalize the store (manifest, stats, split)."""
        self._write_buffer()
        if self.out_dir.joinpath("manifest.json").exists():
            finalize_store(self.out_dir)

    def _write_buffer(self) -> None:
        """Commit the buffered checkpoints as one shard (atomic; the manifest is refreshed later)."""
        if not self._buffer or self.run_id is None:
            return
        vecs, steps, epochs, values, not_yet = zip(*self._buffer)
        values = np.array(values, np.float64).reshape(len(steps), len(self.metric_names))  # [n, M]
        name = f"run{self.run_id:06d}-step{steps[0]:09d}-{steps[-1]:09d}-{uuid.uuid4().hex[:6]}"
        write_shard(self.out_dir, name, params=np.stack(vecs), run_ids=[self.run_id] * len(steps), steps=steps,
                    epochs=epochs, metrics={m: values[:, j] for j, m in enumerate(self.metric_names)},
                    nan_metrics_ok=np.array(not_yet, bool).reshape(len(steps), len(self.metric_names)))
        self._buffer.clear()
        self._written.append(name)
        self._written_steps += [steps[0], steps[-1]]

    def _finish(self) -> None:
        """The fit ends: write the buffer, merge the fit's shards into one, finalize the store."""
        self._write_buffer()
        if len(self._written) > 1:
            first, last = min(self._written_steps), max(self._written_steps)
            merge_shards(self.out_dir, self._written,
                          f"run{self.run_id:06d}-step{first:09d}-{last:09d}-{uuid.uuid4().hex[:6]}")
        self._written, self._written_steps = [], []
        if self.out_dir.joinpath("manifest.json").exists():
            finalize_store(self.out_dir)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        shapes = float_layer_shapes(pl_module)
        self._names = _select(list(shapes), self.include)
        if not self._names:
            raise ValueError(f"CheckpointRecorder: include={self.include!r} matches no floating state_dict entry "
                             f"of {type(pl_module).__name__} (entries: {list(shapes)[:10]})")
        shapes = self._shapes = LayerShapes({n: shapes[n] for n in self._names})
        cls = type(pl_module)
        create_store(self.out_dir, task=None, layer_shapes=shapes, metric_names=self.metric_names,
                     lower_is_better=self.lower_is_better, permutation_spec=_restricted_spec(pl_module, shapes),
                     dtype=self.dtype, build_config={"recorder": {"module": f"{cls.__module__}.{cls.__qualname__}",
                                                                  "include": self.include}})
        if self._resumed:
            self._last_step = self._recorded_steps().get(self.run_id, -1)
            self._resumed = False
            return
        # Claim a run id: the next free one, held by a committed shard before another fit (a sweep recording into
        # the same store at once) can read the store's run ids.
        with open(self.out_dir / ".recorder.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.run_id = max(self._recorded_steps(), default=-1) + 1
                self._last_step = -1
                self._record(trainer, pl_module, epoch=float(trainer.current_epoch), initial=True)
                self._write_buffer()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            frac = (batch_idx + 1) / max(trainer.num_training_batches, 1) if math.isfinite(
                trainer.num_training_batches) else 0.0
            self._record(trainer, pl_module, epoch=trainer.current_epoch + frac)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and trainer.is_global_zero and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._record(trainer, pl_module, epoch=float(trainer.current_epoch + 1))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._finish()
        self.run_id, self._resumed = None, False  # the next fit is a new run

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self._finish()
        except Exception as err:  # keep the training's own error in front; what was committed stays committed
            log.warning("CheckpointRecorder: could not finish the store at %s after the training failed (%s); "
                        "its committed checkpoints are kept and open_store finalizes it", self.out_dir, err)
