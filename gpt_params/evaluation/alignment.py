"""Prompt alignment (G.pt's definition), section 1 of the evaluation suite.

From each held-out run's initial checkpoint, prompts ``linspace(best metric in the data, that checkpoint's
metric)``; per network ``R^2 = 1 - SSE/SST`` of achieved vs prompted (``alignment_r2``), mean and median
over networks. Start-free generators ignore the starts (the held-out inits still set each network's
prompt range); unconditional ones ignore the prompts (their alignment measures the absence of control).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from gpt_params.evaluation import plots
from gpt_params.evaluation.common import best_value, generate, held_out_runs, metric_of, mode_notes, start_points


def alignment_r2(prompted: np.ndarray, achieved: np.ndarray) -> np.ndarray:
    """G.pt's prompt alignment per network: ``R^2 = 1 - SSE / SST`` of ``achieved [R, M]`` against
    ``prompted [R, M]`` (rows: networks, columns: prompts) -> ``[R]``. 1 is perfect; a constant output
    scores <= 0; unbounded below. Rows whose prompts are all equal (SST = 0) give NaN."""
    prompted = np.asarray(prompted, dtype=np.float64)
    achieved = np.asarray(achieved, dtype=np.float64)
    if prompted.ndim != 2 or prompted.shape != achieved.shape:
        raise ValueError(f"prompted and achieved must both be [networks, prompts], got "
                         f"{list(prompted.shape)} and {list(achieved.shape)}")
    sse = ((achieved - prompted) ** 2).sum(axis=1)
    sst = ((prompted - prompted.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)


def prompt_alignment(gen, task, store, runs: int | Sequence[int] = 32, num_prompts: int = 20, *,
                     sampler: str | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                     device=None, notes: list[str] | None = None) -> tuple[dict, Figure]:
    """G.pt's prompt alignment over ``runs`` held-out runs (an int: the first of ``store.test_runs``)."""
    notes = [] if notes is None else notes
    mode_notes(gen, "prompt_alignment", notes)
    run_ids = held_out_runs(store, runs, notes)
    start, start_metric = start_points(task, store, run_ids, gen.metric, device=device)  # [R, P], [R]
    best = best_value(gen)
    prompted = np.linspace(np.full(len(run_ids), best), start_metric, num_prompts, axis=1)  # [R, M]
    R, M = prompted.shape
    starts = start.repeat_interleave(M, dim=0)  # [R*M, P]
    out = generate(gen, starts, np.repeat(start_metric, M), prompted.ravel(), sampler=sampler, steps=steps,
                   guidance=guidance, seed=seed)  # [R*M, P]
    achieved = metric_of(task, out, gen.metric, device=device).reshape(R, M)  # one batched scoring
    r2 = alignment_r2(prompted, achieved)
    finite = r2[np.isfinite(r2)]
    result = {"metric": gen.metric, "num_networks": R, "num_prompts": M, "best_in_data": best,
              "mean": float(finite.mean()) if finite.size else math.nan,
              "median": float(np.median(finite)) if finite.size else math.nan,
              "per_network": r2, "run_ids": run_ids, "start_metric": start_metric,
              "prompted": prompted, "achieved": achieved}
    return result, plots.alignment_figure(prompted, achieved, gen.data_range, gen.metric)
