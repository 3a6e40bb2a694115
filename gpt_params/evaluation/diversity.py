"""Diversity, section 5 of the evaluation suite: networks generated for one prompt (only the sampling noise
differs) against trained networks of similar metric: pairwise aligned distances (weight matching, see
``novelty``) and, on data tasks, pairwise agreement of their test-split predictions.

Trained networks of similar metric come from different inits, and a generator conditioned on a start
checkpoint learns from one trajectory per init: from one start it should vary little (the data's
target given a start is nearly one network). Two comparisons are like with like: ``across_starts``, one
network from each of several held-out inits, for the same prompt, against the same kind of trained
networks; and, in a store built with several runs per init (``runs_per_init``), ``same_init``: the
networks generated from one start against the final checkpoints of the held-out runs trained from it."""

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


def _one_per_init(store, run_ids: np.ndarray) -> np.ndarray:
    """The first run of each init group in ``run_ids`` (runs sharing an init are one start)."""
    seen, out = set(), []
    for r in run_ids.tolist():
        group = store.init_group(r)
        key = ("run", r) if group is None else ("group", group)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return np.asarray(out, dtype=np.int64)


def diversity(gen, task, store, runs: int | Sequence[int] = 32, *, num_networks: int = 8, sampler: str | None = None,
              steps: int | None = None, guidance: float | None = None, seed: int = 0, device=None,
              notes: list[str] | None = None) -> tuple[dict, Figure]:
    """Networks generated for one prompt (the first held-out run's init, the data's best metric; only the
    sampling noise differs) against the final checkpoints of training runs closest in metric: pairwise
    aligned distances and, on data tasks, pairwise agreement of test-split predictions. ``across_starts``:
    the same distances for one network from each of the first ``num_networks`` held-out inits (fewer when
    there are fewer runs; one run per init group), against the training runs' final checkpoints closest to
    their metric. ``same_init`` (when the prompt run shares its init with other runs): the generated networks'
    distances against those of the final checkpoints of every run trained from that init."""
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
    elif len(starts := _one_per_init(store, run_ids)) > 1:
        starts_params, starts_metric = generate_best(gen, task, store, starts, num_networks, sampler=sampler,
                                                     steps=steps, guidance=guidance, seed=seed, device=device)
        near = checkpoints_near(store, finals, [np.median(starts_metric)], num_networks, metric=gen.metric)
        across = {"generated": _pairwise(starts_params, spec),
                  "trained": _pairwise(as_tensor(store.params(near)), spec)}
    result = {"metric": gen.metric, "prompt_run": int(run_ids[0]), "num_generated": num_networks,
              "generated_metric": summary(gen_metric),
              "trained_metric": summary(store.metrics(trained_idx)[gen.metric]),
              "pairwise_distance": {k: summary(v) for k, v in dist.items()}}
    group = store.init_group(int(run_ids[0]))
    siblings = [] if group is None else [r for r in store.runs.tolist() if store.init_group(r) == group]
    if len(siblings) > 1:
        _, sibling_finals = run_endpoints(store, siblings)
        result["same_init"] = {"runs": siblings, "trained_metric": summary(store.metrics(sibling_finals)[gen.metric]),
                               "pairwise_distance": {"generated": summary(dist["generated"]), "trained": summary(
                                   _pairwise(as_tensor(store.params(sibling_finals)), spec))}}
    if across is not None:
        result["across_starts"] = {"num_generated": len(starts_params), "generated_metric": summary(starts_metric),
                                   "trained_metric": summary(store.metrics(near)[gen.metric]),
                                   "pairwise_distance": {k: summary(v) for k, v in across.items()}}
    elif getattr(gen, "uses_start", True):
        notes.append("diversity: one held-out init only; across_starts skipped")
    agree = {}
    if has_data(task):
        preds, _ = predictions(task, torch.cat([gen_params, trained]), "test", device=device)
        agree = {"generated": _agreement(preds[:num_networks]), "trained": _agreement(preds[num_networks:])}
        result["pairwise_agreement"] = {k: summary(v) for k, v in agree.items()}
    else:
        notes.append("diversity: task has no data split; prediction agreement skipped")
    return result, plots.diversity_figure(dist, agree)
