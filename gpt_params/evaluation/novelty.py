"""Novelty, section 4 of the evaluation suite: are generated networks new solutions or near-copies?

Hidden units can be reordered without changing a network, so every distance here (and in ``diversity``
and ``landscape``) is measured after aligning one network to the other by weight matching
(``checkpoints_dataset.permute.weight_matching``, Hungarian assignment): a generated network that is a
permuted copy of a training checkpoint is at distance ~0 from it.

Novelty verdict (documented rule): two references are measured the same way as the generated networks,
their aligned distance to the nearest training checkpoint: (a) held-out trained checkpoints of similar
metric (new solutions by construction) and (b) training checkpoints plus small Gaussian noise
(``noise_scale`` times each layer's std in the store; copies by construction). The copy threshold is the
geometric mean of the two medians; a generated network below it counts as a near-copy. Quality comes first:
``progress`` is how far the generated networks' median metric gets from the held-out runs' initial median to
their final median (1: as good as trained, 0: no better than an init). The verdict is "not working" when
progress is below 0.5 (networks at chance are not new solutions), else "near-copies" when more than half of
the generated networks are near-copies, else "new solutions".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from checkpoints_dataset.params import LayerShapes
from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (as_tensor, checkpoints_near, generate_best, has_data, held_out_runs,
                                          metric_of, nearest_aligned, predictions, run_endpoints, summary,
                                          trained_checkpoints, wrong_iou)


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
        gen_params, gen_metric = generate_best(gen, task, store, run_ids, num_networks, sampler=sampler,
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
    quality = _progress(store, gen.metric, gen_metric, notes)
    result = {"metric": gen.metric, "num_generated": G, "pool_size": int(pool.size), "noise_scale": noise_scale,
              "generated_metric": summary(gen_metric),
              "distance": {"generated": summary(d_gen), "held_out_trained": summary(d_held),
                           "training_plus_noise": summary(d_copy)},
              "relative_distance_generated": summary(d_gen / gen_params.norm(dim=1).clamp_min(1e-12).numpy()),
              "per_network_distance": d_gen, "per_network_nearest": nearest[:G], "copy_threshold": threshold,
              "near_copy_fraction": fraction, "quality": quality,
              "verdict": ("not working" if quality["progress"] is not None and quality["progress"] < 0.5
                          else "near-copies" if fraction > 0.5 else "new solutions"),
              "rule": "not working: the generated median metric gets less than half way from the held-out runs' "
                      "initial median to their final median; else near-copies when more than half of the "
                      "generated networks lie below sqrt(median noisy-copy distance x median held-out distance)"}
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


def _progress(store, metric: str, gen_metric: np.ndarray, notes: list[str]) -> dict:
    """How far the generated networks get from an init to a trained network, on the held-out runs' metric."""
    first, last = run_endpoints(store, store.test_runs)
    values = store.metrics(np.concatenate([first, last]))[metric]
    init, final = float(np.nanmedian(values[:len(first)])), float(np.nanmedian(values[len(first):]))
    generated = float(np.nanmedian(gen_metric)) if len(gen_metric) else float("nan")
    progress = (init - generated) / (init - final) if np.isfinite([init, final, generated]).all() and init != final \
        else None
    if progress is None:
        notes.append("novelty: the held-out runs' initial or final metric is missing; quality not judged")
    return {"init_median": init, "trained_final_median": final, "generated_median": generated, "progress": progress}
