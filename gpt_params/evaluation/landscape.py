"""Loss landscape, section 6 of the evaluation suite: the task's metric on the plane of the two principal
directions of aligned (weight matching, see ``novelty``) trained and generated solutions, and the
low-loss basins the generated solutions fall in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import ndimage

from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (aligned_to, as_tensor, at_least_as_good, checkpoints_near, generate_best,
                                          held_out_runs, metric_of, run_endpoints, summary)


def landscape(gen, task, store, runs: int | Sequence[int] = 32, *, num_networks: int = 8, grid: int = 15,
              margin: float = 0.3, metric: str | None = None, sampler: str | None = None, steps: int | None = None,
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
    gen_params, gen_metric = generate_best(gen, task, store, run_ids, num_networks, sampler=sampler,
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
