"""Weight-space sections of the evaluation suite: novelty, diversity and the loss landscape.

Hidden units can be reordered without changing a network, so every distance here is measured after
aligning one network to the other by weight matching (``checkpoints_dataset.permute.weight_matching``,
Hungarian assignment): a generated network that is a permuted copy of a training checkpoint is at
distance ~0 from it.

Novelty verdict (documented rule): two references are measured the same way as the generated networks,
their aligned distance to the nearest training checkpoint: (a) held-out trained checkpoints of similar
metric (new solutions by construction) and (b) training checkpoints plus small Gaussian noise
(``noise_scale`` times each layer's std in the store; copies by construction). The copy threshold is the
geometric mean of the two medians; a generated network below it counts as a near-copy, and the verdict is
"near-copies" when more than half of the generated networks are, else "new solutions".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import ndimage

from checkpoints_dataset.params import LayerShapes
from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (aligned_to, as_tensor, at_least_as_good, best_value, checkpoints_near,
                                        generate, has_data, held_out_runs, metric_of, nearest_aligned,
                                        predictions, run_endpoints, start_points, summary, trained_checkpoints,
                                        wrong_iou)


def _generate_best(gen, task, store, run_ids, count: int, *, sampler, steps, guidance, seed, device):
    """Networks prompted to the data's best metric from the first ``count`` runs' initial checkpoints
    -> (params [G, P], achieved metric [G])."""
    start, start_metric = start_points(task, store, run_ids[:count], gen.metric, device=device)
    out = generate(gen, start, start_metric, np.full(len(start), best_value(gen)), sampler=sampler, steps=steps,
                   guidance=guidance, seed=seed)  # [G, P]
    return out, metric_of(task, out, gen.metric, device=device)


def _layer_noise(store, spec_shapes, scale: float, like: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise ``[K, P]`` with ``scale`` x each layer's std (the store's stats, else the rows' own)."""
    stats = getattr(store, "stats", None) or {}
    shapes = LayerShapes.of(spec_shapes)
    layers = shapes.split(like)  # name -> [K, *shape]
    sigma = [torch.full((n,), scale * (float(stats[name][1]) if name in stats else float(layers[name].std())))
             for name, n in shapes.sizes.items()]
    rng = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=rng) * torch.cat(sigma)  # [K, P]


def novelty(gen, task, store, runs: int | Sequence[int] = 32, *, num_networks: int = 16, candidates: int = 8,
            max_pool: int = 20000, noise_scale: float = 0.05, sampler: str = "ddim", steps: int = 50,
            guidance: float | None = None, seed: int = 0, device=None, notes: list[str] | None = None,
            generated: torch.Tensor | None = None) -> tuple[dict, Figure]:
    """Aligned distance of generated networks to their nearest training checkpoint, against held-out
    trained checkpoints and noisy training copies (see the module doc for the verdict rule); on data
    tasks also p-diff's wrong-prediction IoU with that nearest checkpoint on the test split. Networks
    come from prompting the best metric at held-out inits, or are given as ``generated [G, P]``."""
    notes = [] if notes is None else notes
    spec = task.permutation_spec
    if generated is None:
        run_ids = held_out_runs(store, runs, notes)
        gen_params, gen_metric = _generate_best(gen, task, store, run_ids, num_networks, sampler=sampler,
                                                steps=steps, guidance=guidance, seed=seed, device=device)
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
    result = {"metric": gen.metric, "num_generated": G, "pool_size": int(pool.size), "noise_scale": noise_scale,
              "generated_metric": summary(gen_metric),
              "distance": {"generated": summary(d_gen), "held_out_trained": summary(d_held),
                           "training_plus_noise": summary(d_copy)},
              "relative_distance_generated": summary(d_gen / gen_params.norm(dim=1).clamp_min(1e-12).numpy()),
              "per_network_distance": d_gen, "per_network_nearest": nearest[:G], "copy_threshold": threshold,
              "near_copy_fraction": fraction,
              "verdict": "near-copies" if fraction > 0.5 else "new solutions",
              "rule": "near-copy: aligned distance below sqrt(median noisy-copy distance x median held-out "
                      "distance); verdict near-copies when more than half of the generated networks are"}
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


def _pairwise(params: torch.Tensor, spec) -> np.ndarray:
    """Aligned L2 distance of every pair i < j of ``params [K, P]`` -> ``[K(K-1)/2]``."""
    out = [float((aligned_to(params[i], params[j:j + 1], spec)[0] - params[i]).norm())
           for i in range(len(params)) for j in range(i + 1, len(params))]
    return np.array(out)


def _agreement(preds: np.ndarray) -> np.ndarray:
    """Fraction of identical predictions of every pair i < j of ``preds [K, n]``."""
    i, j = np.triu_indices(len(preds), k=1)
    return (preds[i] == preds[j]).mean(axis=1)


def diversity(gen, task, store, runs: int | Sequence[int] = 32, *, num_networks: int = 8, sampler: str = "ddim",
              steps: int = 50, guidance: float | None = None, seed: int = 0, device=None,
              notes: list[str] | None = None) -> tuple[dict, Figure]:
    """Networks generated for one prompt (the first held-out run's init, the data's best metric; only the
    sampling noise differs) against the final checkpoints of training runs closest in metric: pairwise
    aligned distances and, on data tasks, pairwise agreement of test-split predictions."""
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
    result = {"metric": gen.metric, "prompt_run": int(run_ids[0]), "num_generated": num_networks,
              "generated_metric": summary(gen_metric),
              "trained_metric": summary(store.metrics(trained_idx)[gen.metric]),
              "pairwise_distance": {k: summary(v) for k, v in dist.items()}}
    agree = {}
    if has_data(task):
        preds, _ = predictions(task, torch.cat([gen_params, trained]), "test", device=device)
        agree = {"generated": _agreement(preds[:num_networks]), "trained": _agreement(preds[num_networks:])}
        result["pairwise_agreement"] = {k: summary(v) for k, v in agree.items()}
    else:
        notes.append("diversity: task has no data split; prediction agreement skipped")
    return result, plots.diversity_figure(dist, agree)


def landscape(gen, task, store, runs: int | Sequence[int] = 32, *, num_networks: int = 8, grid: int = 15,
              margin: float = 0.3, metric: str | None = None, sampler: str = "ddim", steps: int = 50,
              guidance: float | None = None, seed: int = 0, device=None,
              notes: list[str] | None = None) -> tuple[dict, Figure]:
    """The plane of the two principal directions of aligned trained and generated solutions; the task's
    ``metric`` (default: the loss matching the conditioning metric, e.g. val_error -> val_loss) over a
    ``grid x grid`` lattice on it, scored in batched calls. Low-loss region: grid points at least as good
    as the worst trained solution shown; its connected components holding generated points are the
    "basins" the generated solutions fall in."""
    notes = [] if notes is None else notes
    if metric is None:
        loss_name = gen.metric.replace("error", "loss")
        metric = loss_name if loss_name in task.metric_names else gen.metric
    lower = bool(task.lower_is_better[metric])
    run_ids = held_out_runs(store, runs, notes)
    gen_params, gen_metric = _generate_best(gen, task, store, run_ids, num_networks, sampler=sampler,
                                            steps=steps, guidance=guidance, seed=seed, device=device)
    _, finals = run_endpoints(store, store.train_runs)
    trained = as_tensor(store.params(checkpoints_near(store, finals, gen_metric, num_networks, metric=gen.metric)))
    sols = torch.cat([trained, gen_params]).double()  # [S, P]
    sols = torch.cat([sols[:1], aligned_to(sols[0], sols[1:], task.permutation_spec)])  # aligned to trained[0]
    center = sols.mean(0)  # [P]
    _, sv, vh = torch.linalg.svd(sols - center, full_matrices=False)
    dirs = vh[:2]  # [2, P]
    xy = ((sols - center) @ dirs.T).numpy()  # [S, 2]
    span = np.maximum(xy.max(0) - xy.min(0), 1e-6)
    a, b = (np.linspace(xy[:, i].min() - margin * span[i], xy[:, i].max() + margin * span[i], grid) for i in range(2))
    coef = torch.as_tensor(np.stack(np.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2))  # [G*G, 2]
    points = center + coef @ dirs  # [G*G, P]
    values = metric_of(task, points.float(), metric, device=device).reshape(grid, grid)  # [G(a), G(b)]
    actual = metric_of(task, sols.float(), metric, device=device)  # [S]
    T = len(trained)
    worst_trained = float(actual[:T].max() if lower else actual[:T].min())
    low = at_least_as_good(values, worst_trained, lower)
    labels, num_regions = ndimage.label(low)
    cell = np.stack([np.abs(a[:, None] - xy[None, T:, 0]).argmin(0), np.abs(b[:, None] - xy[None, T:, 1]).argmin(0)], 1)
    gen_labels = labels[cell[:, 0], cell[:, 1]]  # [G]
    result = {"metric": metric, "grid": grid, "num_trained": T, "num_generated": len(gen_params),
              "explained_variance_2d": float((sv[:2] ** 2).sum() / (sv ** 2).sum().clamp_min(1e-30)),
              "actual": {"trained": summary(actual[:T]), "generated": summary(actual[T:])},
              "low_threshold": worst_trained, "low_regions": int(num_regions),
              "generated_in_low_fraction": float((gen_labels > 0).mean()),
              "generated_basins": int(np.unique(gen_labels[gen_labels > 0]).size),
              "plane_a": a, "plane_b": b, "values": values, "trained_xy": xy[:T], "generated_xy": xy[T:]}
    return result, plots.landscape_figure(a, b, values, xy[:T], xy[T:], metric)
