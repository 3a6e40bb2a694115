"""Novelty, section 4 of the evaluation suite: are generated networks new solutions or near-copies?

Hidden units can be reordered without changing a network, so every distance here (and in ``diversity``
and ``landscape``) is measured after aligning one network to the other by weight matching
(``checkpoints_dataset.permute.weight_matching``, Hungarian assignment): a generated network that is a
permuted copy of a training checkpoint is at distance ~0 from it.

Novelty verdict (documented rule): two references are measured the same way as the generated networks,
their aligned distance to the nearest training checkpoint: (a) held-out trained checkpoints of similar
metric (new solutions by construction) and (b) training checkpoints plus small Gaussian noise
(``noise_scale`` times each layer's std in the store; copies by construction). The copy threshold is the
geometric mean of the two medians; a generated network below it counts as a near-copy.

Two checks answer the critique of Zeng et al. 2025 ("Generative modeling of weights: generalization or
memorization?"):
- **Updates.** A memorized *update* added to a new start is still a copy. Each generated update (generated
  minus its start) is compared, the same way and with the same threshold rule, with the training runs'
  updates (final minus initial checkpoint); the references are the held-out runs' updates and noisy
  training updates.
- **Noise baseline.** Each generated network's nearest training checkpoint, moved by Gaussian noise (shaped
  by each layer's std) to the same aligned distance, is scored: a generator that does more than perturb a
  copy makes networks better than these at the same distance.

Quality comes first: ``progress`` is how far the generated networks' median metric gets from the held-out
runs' initial median to their final median (1: as good as trained, 0: no better than an init). The verdict
is "not working" when progress is below 0.5 (networks at chance are not new solutions), else "near-copies"
when more than half of the generated networks or of their updates are near-copies, else "no better than
noise" when their median metric is not better than the noise baseline's, else "new solutions".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from checkpoints_dataset.params import LayerShapes
from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (as_tensor, at_least_as_good, checkpoints_near, generate_best, has_data,
                                          held_out_runs, metric_of, nearest_aligned, predictions, run_endpoints,
                                          start_points, summary, trained_checkpoints, wrong_iou)


def _layer_noise(store, spec_shapes, scale: float, like: torch.Tensor, seed: int,
                 use_store_stats: bool = True) -> torch.Tensor:
    """Gaussian noise ``[K, P]`` with ``scale`` x each layer's std (the store's stats, else the rows' own)."""
    stats = (getattr(store, "stats", None) or {}) if use_store_stats else {}
    shapes = LayerShapes.of(spec_shapes)
    layers = shapes.split(like)  # name -> [K, *shape]
    sigma = [torch.full((n,), scale * (float(stats[name][1]) if name in stats else float(layers[name].std())))
             for name, n in shapes.sizes.items()]
    rng = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=rng) * torch.cat(sigma)  # [K, P]


def novelty(gen, task, store, runs: int | Sequence[int] = 32, *, num_networks: int = 16, candidates: int = 8,
            max_pool: int = 20000, noise_scale: float = 0.05, sampler: str | None = None, steps: int | None = None,
            guidance: float | None = None, seed: int = 0, device=None, notes: list[str] | None = None,
            generated: torch.Tensor | None = None) -> tuple[dict, Figure]:
    """Aligned distance of generated networks to their nearest training checkpoint, against held-out
    trained checkpoints and noisy training copies (see the module doc for the verdict rule); on data
    tasks also p-diff's wrong-prediction IoU with that nearest checkpoint on the test split. Networks
    come from prompting the best metric at held-out inits, or are given as ``generated [G, P]``."""
    notes = [] if notes is None else notes
    spec = task.permutation_spec
    starts = None
    if generated is None:
        run_ids = held_out_runs(store, runs, notes)
        gen_params, gen_metric = generate_best(gen, task, store, run_ids, num_networks, sampler=sampler,
                                                steps=steps, guidance=guidance, seed=seed, device=device)
        if getattr(gen, "uses_start", True):
            starts = start_points(task, store, run_ids[:len(gen_params)], gen.metric, device=device)[0]  # [G, P]
    else:
        gen_params = as_tensor(generated)
        gen_metric = metric_of(task, gen_params, gen.metric, device=device)
    G = len(gen_params)
    pool = trained_checkpoints(store, store.train_runs)
    if pool.size > max_pool:
        notes.append(f"novelty: nearest-checkpoint search over a random {max_pool} of {pool.size} training checkpoints")
        pool = np.sort(np.random.default_rng(seed).choice(pool, max_pool, replace=False))
    held = checkpoints_near(store, trained_checkpoints(store, store.test_runs), gen_metric, G, metric=gen.metric)
    copied = checkpoints_near(store, pool, gen_metric, G, metric=gen.metric)
    held_params = as_tensor(store.params(held))  # [H, P]
    noisy = as_tensor(store.params(copied))
    noisy = noisy + _layer_noise(store, store.layer_shapes, noise_scale, noisy, seed)  # [C, P]
    queries = torch.cat([gen_params, held_params, noisy])
    dist, nearest = nearest_aligned(queries, store, pool, spec, candidates=candidates)
    d_gen, d_held, d_copy = np.split(dist, [G, G + len(held)])
    threshold = float(np.sqrt(np.median(d_copy) * np.median(d_held))) if len(held) else float(np.median(d_copy) * 10)
    if not len(held):
        notes.append("novelty: no held-out trained checkpoints; copy threshold = 10 x the noisy copies' median")
    is_copy = d_gen < threshold
    fraction = float(is_copy.mean()) if G else 0.0
    quality = _progress(task, store, gen.metric, gen_metric, notes, device)
    updates = _update_novelty(gen_params, starts, store, spec, noise_scale, seed, notes)
    noise = _noise_baseline(task, store, gen.metric, bool(store.lower_is_better.get(gen.metric, True)), gen_params,
                            gen_metric, d_gen, nearest[:G], seed, device)
    copies = max(fraction, updates["near_copy_fraction"] if updates else 0.0)
    result = {"metric": gen.metric, "num_generated": G, "pool_size": int(pool.size), "noise_scale": noise_scale,
              "generated_metric": summary(gen_metric),
              "distance": {"generated": summary(d_gen), "held_out_trained": summary(d_held),
                           "training_plus_noise": summary(d_copy)},
              "relative_distance_generated": summary(d_gen / gen_params.norm(dim=1).clamp_min(1e-12).numpy()),
              "per_network_distance": d_gen, "per_network_nearest": nearest[:G], "copy_threshold": threshold,
              "near_copy_fraction": fraction, "quality": quality, "updates": updates, "noise_baseline": noise,
              "verdict": ("not working" if quality["progress"] is not None and quality["progress"] < 0.5
                          else "near-copies" if copies > 0.5
                          else "no better than noise" if not noise["better"] else "new solutions"),
              "rule": "not working: the generated median metric gets less than half way from the held-out runs' "
                      "initial median to their final median; else near-copies when more than half of the "
                      "generated networks (or of their updates) lie below sqrt(median noisy-copy distance x "
                      "median held-out distance); else no better than noise when their median metric is not "
                      "better than that of their nearest training checkpoints moved by noise to the same distance"}
    if has_data(task):
        preds, labels = predictions(task, torch.cat([queries, as_tensor(store.params(nearest))]), "test",
                                    device=device)  # [2Q, n]
        iou = wrong_iou(preds[:len(queries)], preds[len(queries):], labels)  # [Q]
        i_gen, i_held, i_copy = np.split(iou, [G, G + len(held)])
        result["wrong_iou"] = {"generated": summary(i_gen), "held_out_trained": summary(i_held),
                               "training_plus_noise": summary(i_copy), "per_network": i_gen}
    else:
        notes.append("novelty: task has no data split; wrong-prediction IoU skipped")
    fig = plots.novelty_figure({"generated": d_gen, "held-out trained": d_held, "training + noise": d_copy},
                               threshold)
    return result, fig


def _update_novelty(gen_params, starts, store, spec, noise_scale: float, seed: int, notes: list[str]) -> dict | None:
    """Generated updates (generated - start) against the training runs' updates (final - initial), with the
    held-out runs' updates and noisy training updates as references (the module doc's rule)."""
    if starts is None:
        notes.append("novelty: no start checkpoints (start-free generator or given networks); update check skipped")
        return None
    train_first, train_last = run_endpoints(store, store.train_runs)
    pool = as_tensor(store.params(train_last)) - as_tensor(store.params(train_first))  # [R, P]
    test_first, test_last = run_endpoints(store, store.test_runs[:len(gen_params)])
    held = as_tensor(store.params(test_last)) - as_tensor(store.params(test_first))  # [H, P]
    picked = np.random.default_rng(seed).choice(len(pool), min(len(gen_params), len(pool)), replace=False)
    noisy = pool[torch.as_tensor(picked)]
    noisy = noisy + _layer_noise(store, store.layer_shapes, noise_scale, noisy, seed, use_store_stats=False)
    queries = torch.cat([gen_params - starts, held, noisy])
    dist, _ = nearest_aligned(queries, store, train_last, spec, candidates=16, pool_params=pool)
    d_gen, d_held, d_copy = np.split(dist, [len(gen_params), len(gen_params) + len(held)])
    threshold = float(np.sqrt(np.median(d_copy) * np.median(d_held)))
    return {"pool_size": len(pool), "distance": {"generated": summary(d_gen), "held_out_trained": summary(d_held),
                                                 "training_plus_noise": summary(d_copy)},
            "copy_threshold": threshold, "near_copy_fraction": float((d_gen < threshold).mean()),
            "per_network_distance": d_gen}


def _noise_baseline(task, store, metric: str, lower: bool, gen_params, gen_metric, d_gen, nearest, seed: int,
                    device) -> dict:
    """Each generated network's nearest training checkpoint moved by Gaussian noise (each layer's std shaping
    it) to the same aligned distance, scored: are the generated networks better than such copies?"""
    base = as_tensor(store.params(nearest))  # [G, P]
    direction = _layer_noise(store, store.layer_shapes, 1.0, base, seed + 1)
    noisy = base + direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12) * torch.as_tensor(
        d_gen, dtype=base.dtype)[:, None]  # [G, P] at the generated networks' distances
    noisy_metric = metric_of(task, noisy, metric, device=device)
    better = at_least_as_good(np.asarray(gen_metric), noisy_metric, lower) & (np.asarray(gen_metric) != noisy_metric)
    gen_median, noisy_median = float(np.nanmedian(gen_metric)), float(np.nanmedian(noisy_metric))
    return {"generated": summary(gen_metric), "noisy_nearest": summary(noisy_metric),
            "better_fraction": float(better.mean()) if len(better) else 0.0,
            "better": bool(gen_median < noisy_median if lower else gen_median > noisy_median)}


def _progress(task, store, metric: str, gen_metric: np.ndarray, notes: list[str], device=None) -> dict:
    """How far the generated networks get from an init to a trained network, on the held-out runs' metric
    (scored by the task where the store has none: a recorded run's first checkpoint comes before any
    validation)."""
    first, last = run_endpoints(store, store.test_runs)
    idx = np.concatenate([first, last])
    values = np.array(store.metrics(idx)[metric], dtype=np.float64)
    missing = ~np.isfinite(values)
    if missing.any():
        values[missing] = metric_of(task, as_tensor(store.params(idx[missing])), metric, device=device)
    init, final = float(np.nanmedian(values[:len(first)])), float(np.nanmedian(values[len(first):]))
    generated = float(np.nanmedian(gen_metric)) if len(gen_metric) else float("nan")
    progress = (init - generated) / (init - final) if np.isfinite([init, final, generated]).all() and init != final \
        else None
    if progress is None:
        notes.append("novelty: the held-out runs' initial or final metric is missing; quality not judged")
    return {"init_median": init, "trained_final_median": final, "generated_median": generated, "progress": progress}
