"""Watching parameters emerge while denoising (issue 18): every sampler step's predicted networks, scored and
drawn, as an animated GIF and a strip of log-spaced steps.

A task that can draw its networks defines ``render(params, size) -> uint8 [K, size, size, 3]`` (the field
tasks draw their images); any other task's networks are drawn as their first layer's weights, one tile per
unit (``weight_tiles``). A task that can name the nearest training item defines ``nearest(params, size) ->
(uint8 [K, size, size, 3], scores [K])`` (fields: the nearest pool image and its PSNR).
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from checkpoints_dataset.params import LayerShapes


def weight_tiles(layer_shapes: LayerShapes, params: Tensor, size: int = 56) -> Tensor:
    """The first weight matrix of each network ``params [K, P]`` as ``uint8 [K, size, size, 3]``: each unit's
    incoming weights as a square tile when their count is a square (an image's pixels), else the matrix
    itself; scaled per network to its own largest magnitude (mid-grey is zero)."""
    name = next(n for n, shape in layer_shapes.items() if len(shape) >= 2)
    w = layer_shapes.split(params.float())[name].flatten(2)  # [K, units, fan_in]
    k, units, fan_in = w.shape
    side = math.isqrt(fan_in)
    if side * side == fan_in and side > 1:
        cols = math.ceil(math.sqrt(units))
        rows = math.ceil(units / cols)
        tiles = torch.zeros(k, rows * cols, side, side)
        tiles[:, :units] = w.view(k, units, side, side)
        img = tiles.view(k, rows, cols, side, side).permute(0, 1, 3, 2, 4).reshape(k, rows * side, cols * side)
    else:
        img = w
    img = img / img.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]  # [-1, 1]
    img = torch.nn.functional.interpolate(((img + 1) / 2)[:, None], size=(size, size), mode="nearest")[:, 0]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)[..., None].expand(-1, -1, -1, 3).contiguous()


def render_networks(task, layer_shapes: LayerShapes, params: Tensor, size: int = 56) -> Tensor:
    """``uint8 [K, size, size, 3]``: the task's own ``render`` when it has one, else ``weight_tiles``."""
    if task is not None and callable(getattr(task, "render", None)):
        return task.render(params, size)
    return weight_tiles(layer_shapes, params, size)


def log_spaced(num_steps: int, columns: int) -> list[int]:
    """Up to ``columns`` distinct step indices in ``[0, num_steps)``, log-spaced (dense early, where the
    prediction changes most), always the first and the last."""
    if num_steps <= columns:
        return list(range(num_steps))
    raw = np.geomspace(1, num_steps, columns) - 1
    picks = sorted({int(round(x)) for x in raw} | {0, num_steps - 1})
    return picks


@dataclasses.dataclass
class Trajectory:
    """What ``trajectory`` returns: the final networks, every step's predicted networks and their metric."""

    params: Tensor            # [N, P] the generated networks
    steps: Tensor             # [S, N, P] each step's predicted clean networks (the last is ``params``)
    timesteps: list[int]      # [S] the diffusion timestep of each step
    metric: str
    values: np.ndarray        # [S, N] the metric of each step's prediction (NaN without a task)


def trajectory(gen, task, start, start_metric, target, *, sampler, steps: int, guidance, generator,
               parts=None, part_guidance=None) -> Trajectory:
    """Generate with ``gen`` and keep every step's predicted networks, scored by ``task`` (None: unscored);
    ``parts``/``part_guidance``: the condition parts by name, as for ``Generator.generate``."""
    timesteps = [int(t) for t in gen.diffusion.make_scheduler(sampler or gen.sampler, steps).timesteps]
    extra = {} if not parts and not part_guidance else dict(parts=parts, part_guidance=part_guidance)
    params, path = gen.generate(start, start_metric, target, sampler=sampler, steps=steps, guidance=guidance,
                                generator=generator, trajectory=True, **extra)
    params, path = params.cpu(), path.cpu()
    s, n, p = path.shape
    if task is not None:
        values = task.evaluate(path.reshape(s * n, p))[gen.metric].numpy().reshape(s, n)
    else:
        values = np.full((s, n), np.nan)
    return Trajectory(params, path, timesteps, gen.metric, values)


def gif_bytes(frames: np.ndarray, captions: list[str], duration_ms: int = 120) -> bytes:
    """An animated GIF of ``frames uint8 [F, H, W, 3]``, each with its caption above it; loops forever, and
    holds the last frame a second."""
    from PIL import Image, ImageDraw

    bar = 14
    images = []
    for frame, caption in zip(frames, captions):
        canvas = Image.new("RGB", (frame.shape[1], frame.shape[0] + bar), "white")
        canvas.paste(Image.fromarray(frame), (0, bar))
        ImageDraw.Draw(canvas).text((3, 1), caption, fill="black")
        images.append(canvas.quantize(colors=256, dither=Image.Dither.NONE))
    out = io.BytesIO()
    durations = [duration_ms] * (len(images) - 1) + [1000]
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return out.getvalue()


def side_by_side(images: Tensor, gap: int = 2) -> np.ndarray:
    """``uint8 [K, H, W, 3]`` -> one ``[H, K*W + (K-1)*gap, 3]`` row on a white background."""
    k, h, w, _ = images.shape
    row = np.full((h, k * w + (k - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(k):
        row[:, i * (w + gap):i * (w + gap) + w] = images[i].numpy()
    return row


def strip_figure(rendered: Tensor, traj: Trajectory, columns: list[int], nearest=None) -> Figure:
    """Rows: samples; columns: the steps ``columns`` (with their timestep and the sample's metric), the final
    network, and (``nearest = (uint8 [N, H, W, 3], scores [N])``) the nearest training item with its score."""
    s, n = rendered.shape[:2]
    ncols = len(columns) + 1 + (nearest is not None)
    fig = Figure(figsize=(1.3 * ncols, 1.4 * n + 0.3))
    axes = fig.subplots(n, ncols, squeeze=False)
    for row in range(n):
        cells = [(rendered[c, row], f"t={traj.timesteps[c]}\n{traj.values[c, row]:.3g}") for c in columns]
        cells.append((rendered[-1, row], f"final\n{traj.metric} {traj.values[-1, row]:.3g}"))
        if nearest is not None:
            cells.append((nearest[0][row], f"nearest\n{float(nearest[1][row]):.3g}"))
        for ax, (img, title) in zip(axes[row], cells):
            ax.imshow(img.numpy())
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return fig
