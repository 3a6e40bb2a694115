"""``DataInfo``: what a generator must know of the checkpoints it is trained on.

The data module computes it from a store (``DataInfo.from_store``) and hands it to the model; the
generator keeps it in its checkpoint as plain JSON (``to_json``), so a checkpoint alone rebuilds the
tokenizer (layer shapes, normalization statistics, permutation spec) and knows its conditioning metric.
The JSON form is the ``data_info`` dict of checkpoints written before this type existed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .params import LayerShapes


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """The training data of a generator, as plain values.

    Attributes:
        layer_shapes: name -> shape of every entry of the parameter vector, in order.
        metric: the conditioning metric's name (e.g. "val_error").
        lower_is_better: whether lower values of ``metric`` are better.
        metric_range: (min, max) of ``metric`` over the training and validation runs.
        best: the best value of ``metric`` in those runs.
        init_metric: the median ``metric`` of those runs' first checkpoints.
        stats: layer name -> (mean, std) of its values in the store (per-layer normalization).
        permutation_spec: the store's neuron-permutation spec (JSON), or None.
        store_root: where the store was (informative; evaluation's default store).
        task: the task's built-in name or import path (data: never imported unless the user names it again).
        task_kwargs: the task's keyword options at training (e.g. data_dir, cartpole's hidden).
        val_runs: the runs held out for validation (their loss; settings are chosen on them), never trained on;
            empty in checkpoints written before they were recorded.
        parts: the generator's condition parts besides ``metric`` (issue 18), as JSON dicts ``{name, kind,
            range, classes}``: a categorical metric (the task's ``label_metrics``) is a "label" with ``classes``
            = its largest value in the whole store + 1 (the label's vocabulary, the one thing read from every
            run: a class only the test runs hold is still a class), any other a "scalar" with its range over
            ``runs``. Empty in checkpoints
            written before they existed.
        nonzero_stats: like ``stats``, over the nonzero entries only, for stores of compressed runs (a sample
            of their checkpoints; what a tokenizer with a mask channel normalizes by); None otherwise.
    """

    layer_shapes: LayerShapes
    metric: str
    lower_is_better: bool
    metric_range: tuple[float, float]
    best: float
    init_metric: float
    stats: Mapping[str, tuple[float, float]] | None = None
    permutation_spec: Mapping[str, Any] | None = None
    store_root: str | None = None
    task: str | None = None
    task_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    val_runs: tuple[int, ...] = ()
    parts: tuple[Mapping[str, Any], ...] = ()
    nonzero_stats: Mapping[str, tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        fix("layer_shapes", LayerShapes(self.layer_shapes))
        fix("metric_range", (float(self.metric_range[0]), float(self.metric_range[1])))
        for name in ("stats", "nonzero_stats"):
            if getattr(self, name) is not None:
                fix(name, {k: (float(v[0]), float(v[1])) for k, v in dict(getattr(self, name)).items()})
        fix("task_kwargs", dict(self.task_kwargs or {}))
        fix("val_runs", () if self.val_runs is None else tuple(int(r) for r in self.val_runs))
        fix("parts", tuple(dict(p) for p in self.parts or ()))

    @classmethod
    def from_store(cls, store, metric: str, runs: Sequence[int], *, task: str | None = None,
                   task_kwargs: Mapping[str, Any] | None = None, val_runs: Sequence[int] = (),
                   metric_values: np.ndarray | None = None, parts: Sequence[str] = (),
                   label_metrics: Sequence[str] = ()) -> DataInfo:
        """Summarize ``store`` for ``metric`` over ``runs`` (the training and validation runs, never the
        held-out test runs); ``val_runs`` are recorded as they are. ``metric_values``: the metric of every
        checkpoint to use instead of the stored one (see ``PairDataset``). ``parts``: other metrics to
        condition on; those in ``label_metrics`` are categorical."""
        all_values = store.metrics(np.arange(store.num_checkpoints))[metric] if metric_values is None \
            else np.asarray(metric_values, np.float64)
        values, init_values = [], []
        for r in runs:
            finite = all_values[store.run_checkpoints(r)]
            finite = finite[np.isfinite(finite)]
            values.append(finite)
            if len(finite):
                init_values.append(finite[0])    # the run's first checkpoint with a finite metric
        values = np.concatenate(values)
        lower = bool(store.lower_is_better.get(metric, True))
        return cls(layer_shapes=store.layer_shapes, metric=metric, lower_is_better=lower,
                   metric_range=(float(values.min()), float(values.max())),
                   best=float(values.min() if lower else values.max()),
                   init_metric=float(np.nanmedian(init_values)),
                   stats={k: (float(m), float(s)) for k, (m, s) in store.stats.items()},
                   permutation_spec=store.manifest.get("permutation_spec"), store_root=str(store.root),
                   task=task, task_kwargs=dict(task_kwargs or {}) if task is not None else {}, val_runs=val_runs,
                   parts=tuple(_part(store, name, runs, name in label_metrics) for name in parts),
                   nonzero_stats=_nonzero_stats(store, runs) if "sparsity" in (store.manifest.get("build_config")
                                                                               or {}) else None)

    def to_json(self) -> dict:
        """Plain JSON types (the ``data_info`` of a checkpoint's hyperparameters)."""
        return {
            "store_root": self.store_root,
            "task": self.task,
            "task_kwargs": dict(self.task_kwargs),
            "metric": self.metric,
            "lower_is_better": self.lower_is_better,
            "metric_range": list(self.metric_range),
            "best": self.best,
            "init_metric": self.init_metric,
            "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
            "stats": None if self.stats is None else {k: list(v) for k, v in self.stats.items()},
            "permutation_spec": None if self.permutation_spec is None else dict(self.permutation_spec),
            "val_runs": list(self.val_runs),
            "parts": [dict(p) for p in self.parts],
            **({"nonzero_stats": {k: list(v) for k, v in self.nonzero_stats.items()}}
               if self.nonzero_stats is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | DataInfo) -> DataInfo:
        """From ``to_json``'s dict (unknown keys are ignored, missing optional ones take their defaults)."""
        if isinstance(data, DataInfo):
            return data
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("layer_shapes", "metric", "lower_is_better", "metric_range", "best", "init_metric")
                   if k not in data]
        if missing:
            raise ValueError(f"data_info lacks {missing}: it must come from ParameterDataModule(...).info")
        return cls(**{k: v for k, v in data.items() if k in fields})


def _nonzero_stats(store, runs: Sequence[int], max_values: int = 2 ** 24) -> dict[str, tuple[float, float]]:
    """Per layer (mean, std) of the nonzero entries of an even sample of the checkpoints of ``runs`` (at most
    ``max_values`` values read); a layer without nonzero entries gets (0, 1)."""
    idx = np.concatenate([store.run_checkpoints(r) for r in runs])
    count = max(1, min(len(idx), max_values // max(store.num_params, 1)))
    sample = np.sort(idx[np.linspace(0, len(idx) - 1, count).round().astype(np.int64)])
    params = np.asarray(store.params(sample), np.float64)                     # [S, P]
    out = {}
    for name, sl in store.layer_shapes.slices.items():
        values = params[:, sl][params[:, sl] != 0]
        out[name] = (float(values.mean()), float(values.std())) if values.size > 1 else (0.0, 1.0)
    return out


def _part(store, name: str, runs: Sequence[int], label: bool) -> dict:
    """A condition part's description from its values over ``runs``."""
    if name not in store.metric_names:
        raise ValueError(f"condition part {name!r} is not a metric of the store; choose among {list(store.metric_names)}")
    # a label's classes are the store's whole vocabulary (a class the training runs lack is still one)
    idx = np.arange(store.num_checkpoints) if label else np.concatenate([store.run_checkpoints(r) for r in runs])
    values = np.asarray(store.metrics(idx)[name], np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        raise ValueError(f"condition part {name!r} has no finite value in the {'store' if label else 'training runs'}")
    if label:
        if (values != np.round(values)).any() or values.min() < 0:
            raise ValueError(f"label {name!r} must take whole values >= 0 (class indices)")
        return {"name": name, "kind": "label", "range": [0.0, 1.0], "classes": int(values.max()) + 1}
    lo, hi = float(values.min()), float(values.max())
    return {"name": name, "kind": "scalar", "range": [lo, hi if hi > lo else lo + 1.0], "classes": 0}
