"""Diversity, section 5 of the evaluation suite: networks generated for one prompt (only the sampling noise
differs) against trained networks of similar metric: pairwise aligned distances (weight matching, see
``novelty``) and, on data tasks, pairwise agreement of their test-split predictions.

Trained networks of similar metric come from different inits, and a generator conditioned on a start
checkpoint learns from one trajectory per init: from one start it should vary little (the data's
target given a start is nearly one network). ``across_starts`` compares like with like: one network
from each of several held-out inits, for the same prompt, against the same kind of trained networks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (aligned_to, as_tensor, best_value, checkpoints_near, generate,
                                          generate_best, has_data, held_out_runs, metric_of, predictions,
                                          run_endpoints, start_points, summary)


def _pairwise(params: torch.Tensor, spec) -> np.ndarray:
    """Aligned L2 distance of every pair i < j of ``params [K, P]`` -> ``[K(K-1)/2]``."""
    out = [float((aligned_to(params[i], params[j:j + 1], spec)[0] - params[i]).norm())
           for i in range(len(params)) for j in range(i + 1, len(params))]
    return np.array(out)


def _agreement(preds: np.ndarray) -> np.ndarray:
    """Fraction of identical predictions of every pair i < j of ``preds [K, n]``."""
    i, j = np.triu_indices(len(preds), k=1)
    return (preds[i] == preds[j]).mean(axis=1)


def diversity(gen, task, store, runs: int | Sequence[int] = 32, *, num_networks: int = 8, sampler: str | None = None,
              steps: int | None = None, guidance: float | None = None, seed: int = 0, device=None,
              notes: list[str] | None = None) -> tuple[dict, Figure]:
    """Networks generated for one prompt (the first held-out run's init, the data's best metric; only the
    sampling noise differs) against the final checkpoints of training runs closest in metric: pairwise
    aligned distances and, on data tasks, pairwise agreement of test-split predictions. ``across_starts``:
    the same distances for one network from each of the first ``num_networks`` held-out inits (fewer when
    there are fewer runs), against the training runs' final checkpoints closest to their metric."""
    notes = [] if notes is None else notes
    spec = task.permutation_spec
    run_ids = held_out_runs(store, runs, notes)
    start, start_metric = start_points(task, store, run_ids[:1], gen.metric, device=device)  # [1, P]
    gen_params = generate(gen, start.expand(num_networks, -1), np.repeat(start_metric, num_networks),
                          np.full(num_networks, best_value(gen)), sampler=sampler, steps=steps,
                          guidance=guidance, seed=seed)  # [G, P]
    gen_metric = metric_of(task, gen_params, gen.metric, device=device)
    _, finals = run_endpoints(store, store.train_runs)
    trained_idx = checkpoints_near(store, finals, [np.median(gen_metric)], num_networks, metric=gen.metric)
    trained = as_tensor(store.params(trained_idx))  # [T, P]
    dist = {"generated": _pairwise(gen_params, spec), "trained": _pairwise(trained, spec)}
    across = None
    if not getattr(gen, "uses_start", True):
        notes.append("diversity: the generator ignores the start; across_starts skipped")
    elif len(run_ids) > 1:
        starts_params, starts_metric = generate_best(gen, task, store, run_ids, num_networks, sampler=sampler,
                                                     steps=steps, guidance=guidance, seed=seed, device=device)
        near = checkpoints_near(store, finals, [np.median(starts_metric)], num_networks, metric=gen.metric)
        across = {"generated": _pairwise(starts_params, spec),
                  "trained": _pairwise(as_tensor(store.params(near)), spec)}
    result = {"metric": gen.metric, "prompt_run": int(run_ids[0]), "num_generated": num_networks,
              "generated_metric": summary(gen_metric),
              "trained_metric": summary(store.metrics(trained_idx)[gen.metric]),
              "pairwise_distance": {k: summary(v) for k, v in dist.items()}}
    if across is not None:
        result["across_starts"] = {"num_generated": len(starts_params), "generated_metric": summary(starts_metric),
                                   "trained_metric": summary(store.metrics(near)[gen.metric]),
                                   "pairwise_distance": {k: summary(v) for k, v in across.items()}}
    elif getattr(gen, "uses_start", True):
        notes.append("diversity: one held-out run only; across_starts skipped")
    agree = {}
    if has_data(task):
        preds, _ = predictions(task, torch.cat([gen_params, trained]), "test", device=device)
        agree = {"generated": _agreement(preds[:num_networks]), "trained": _agreement(preds[num_networks:])}
        result["pairwise_agreement"] = {k: summary(v) for k, v in agree.items()}
    else:
        notes.append("diversity: task has no data split; prediction agreement skipped")
    return result, plots.diversity_figure(dist, agree)
