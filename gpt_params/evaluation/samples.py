"""Section 7, samples: what a class-conditioned generator makes for each class (issue 18).

For every class of the task's label (a condition part of the generator, ``--data.parts '[label]'``),
``per_class`` networks are generated from the held-out runs' inits (ignored by start-free generators),
prompted for the data's best metric and that class. Measured on every task:

- ``label_accuracy``: the label the task gives the generated network (a field's nearest pool image's class,
  a shape's nearest pool shape's type) equals the requested one;
- ``metric_median`` and ``metric_80pct``: the level 80% of the samples reach or beat, so "IoU at least 0.8
  in 80% of samples" reads ``metric_80pct >= 0.8``.

Tasks with images (the 2-D fields) also get:

- ``copy_fraction``: at least ``copy_db`` dB (PSNR) to an image a training run fitted (memorized, not made);
- ``sharpness_ratio``: mean sharpness of the generated fields over that of the held-out runs' final fields
  (a blurry class mean scores a high nearest-image PSNR, but not a sharpness near 1);
- HyperDiffusion's (Erkoc et al. 2023) set measures against those held-out fields, with the pixel L2
  distance: ``one_nna`` (leave-one-out 1-nearest-neighbour accuracy of telling generated from real; 0.5 is
  ideal, 1 means the sets are apart), ``coverage`` (fraction of real fields that are some generated
  field's nearest) and ``mmd`` (mean over real fields of the distance to the nearest generated one).

Generators without a label part give ``{"skipped": reason}``.
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from gpt_params.evaluation.common import best_value, generate, run_endpoints, start_points


def one_nna(generated: Tensor, real: Tensor) -> float:
    """Leave-one-out 1-NN accuracy on ``generated [G, D]`` and ``real [R, D]`` (labels: which set)."""
    both = torch.cat([generated, real]).double()
    d = torch.cdist(both, both)
    d.fill_diagonal_(float("inf"))
    nearest = d.argmin(1)
    is_gen = torch.arange(len(both)) < len(generated)
    return float((is_gen[nearest] == is_gen).double().mean())


def coverage_mmd(generated: Tensor, real: Tensor) -> tuple[float, float]:
    """Coverage (real items that are some generated item's nearest real item) and MMD (mean over real items
    of the distance to their nearest generated item), as HyperDiffusion defines them."""
    d = torch.cdist(generated.double(), real.double())  # [G, R]
    covered = torch.unique(d.argmin(1)).numel() / real.shape[0]
    return float(covered), float(d.min(0).values.mean())


def level_reached(values, fraction: float, lower_is_better: bool) -> float:
    """The best level that at least ``fraction`` of ``values`` reach or beat (in the metric's direction)."""
    worse_first = np.sort(np.asarray(values, np.float64))
    worse_first = worse_first[::-1] if lower_is_better else worse_first
    return float(worse_first[int(np.floor(len(worse_first) * (1.0 - fraction) + 1e-9))])


def _empty_figure(text: str) -> Figure:
    fig = Figure(figsize=(4, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=8)
    return fig


def samples(gen, task, store, runs, *, per_class: int = 8, copy_db: float = 25.0, sampler=None, steps=None,
            guidance=None, seed: int = 0, device=None, notes: list[str] | None = None) -> tuple[dict, Figure]:
    """The section (see the module docstring); ``runs``: the held-out runs (their inits and final fields)."""
    label = next((p for p in getattr(gen, "parts", []) if p.kind == "label"), None)
    if label is None:
        reason = "the generator has no label condition part (train with --data.parts '[label]')"
        return {"skipped": reason}, _empty_figure(f"samples: skipped ({reason})")
    runs = np.asarray(runs, dtype=np.int64)
    start, start_metric = start_points(task, store, runs, gen.metric, device=device)   # [R, P], [R]
    classes = np.repeat(np.arange(label.classes), per_class)                           # [K]
    pick = np.arange(len(classes)) % len(runs)
    out = []
    for c in range(label.classes):   # one class per call: the label is one value per generate() call
        rows = pick[classes == c]
        out.append(generate(gen, start[rows], start_metric[rows], np.full(len(rows), best_value(gen)),
                            sampler=sampler, steps=steps, guidance=guidance, seed=seed + c,
                            parts={label.name: c}))
    params = torch.cat(out)                                                             # [K, P]
    scores = task.evaluate(params)
    metric = scores[gen.metric].numpy()
    result = {
        "label": label.name, "classes": label.classes, "per_class": per_class, "num_generated": len(params),
        "target": best_value(gen),
        "label_accuracy": float((scores[label.name].numpy() == classes).mean()),
        "label_accuracy_per_class": [float((scores[label.name].numpy()[classes == c] == c).mean())
                                     for c in range(label.classes)],
        "metric": gen.metric, "metric_median": float(np.median(metric)),
        "metric_80pct": level_reached(metric, 0.8, gen.lower_is_better)}
    if hasattr(task, "images"):
        result.update(_image_measures(task, store, runs, params, scores, copy_db))
    fig = Figure(figsize=(1.1 * per_class, 1.1 * label.classes))
    axes = fig.subplots(label.classes, per_class, squeeze=False)
    img = task.render(params, 56).numpy() if hasattr(task, "render") else None   # [K, H, W, 3] uint8
    for k, ax in enumerate(axes.flat):
        if img is not None:
            ax.imshow(img[k])
        ax.set_title(f"{classes[k]} -> {int(scores[label.name][k])}", fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    return result, fig


def _image_measures(task, store, runs, params: Tensor, scores: dict, copy_db: float) -> dict:
    """Copies, sharpness and the set measures of generated fields against the held-out runs' final fields."""
    _, last = run_endpoints(store, runs)
    real_params = torch.as_tensor(np.asarray(store.params(last), np.float32))          # [R, P]
    _, train_last = run_endpoints(store, store.train_runs)
    gen_img = task.images(params).flatten(1)                                            # [K, HW]
    real_img = task.images(real_params).flatten(1)                                      # [R, HW]
    train_img = task.images(torch.as_tensor(np.asarray(store.params(train_last), np.float32))).flatten(1)
    mse = torch.cdist(gen_img.double(), train_img.double()) ** 2 / gen_img.shape[1]    # [K, train]
    copies = (-10 * torch.log10(mse.min(1).values.clamp_min(1e-10)) >= copy_db).double().mean()
    real_sharp = float(task.evaluate(real_params)["sharpness"].mean())
    cov, mmd = coverage_mmd(gen_img, real_img)
    return {"num_real": len(real_params), "copy_fraction": float(copies), "copy_db": copy_db,
            "sharpness_ratio": float(scores["sharpness"].mean()) / real_sharp if real_sharp > 0 else None,
            "one_nna": one_nna(gen_img, real_img), "coverage": cov, "mmd": mmd}
