"""Sparse and quantized networks: masks, fake quantization, their schedule and their metrics (issue 19).

Below the tasks (torch only), so the population trainers, the tasks' metrics and the generator's exact
projection all use the same definitions:

- **Prunable tensors** are the weights of Linear and Conv layers; biases and normalization parameters stay dense.
- **Magnitude masks** keep, per layer and per run, the ``round((1 - s) n)`` entries of largest magnitude
  (exactly; ties by position).
- **Gradual magnitude pruning** (Zhu & Gupta 2017): dense until ``start``, then the sparsity follows
  ``s (1 - (1 - u)^3)`` for ``u`` going 0 -> 1 until ``end``, then the mask is fixed.
- **Quantization** is per row (a Linear layer's output unit, a Conv layer's output channel) and symmetric:
  ``b`` bits give the ``2^b - 1`` levels ``k * scale`` for ``|k| <= 2^(b-1) - 1``, ``scale = max|row| /
  (2^(b-1) - 1)``. Zero stays zero, so a pruned entry survives quantization. ``b >= 32`` means float.
  ``fake_quantize`` passes gradients straight through (STE); the bit width may be a per-run tensor under
  ``vmap``.
- **Metrics** from the parameters alone: ``sparsity`` (exact zeros among prunable weights) and ``bits`` (the
  smallest width whose per-row grid holds every row's values; 32 for float rows).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FLOAT_BITS = 32          # a bit width of 32 or more means "not quantized"

__all__ = ["FLOAT_BITS", "bits_metric", "fake_quantize", "gmp_sparsity", "magnitude_mask", "prunable_names",
           "quantize_rows", "sparsity_metric"]


def prunable_names(model: nn.Module) -> list[str]:
    """The ``state_dict`` names of the weights of ``model``'s Linear and Conv layers, in order."""
    prefix = {m: name for name, m in model.named_modules()}
    return [f"{prefix[m]}.weight" if prefix[m] else "weight" for m in model.modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def gmp_sparsity(step: int, start: int, end: int, final: Tensor) -> Tensor:
    """The sparsity of gradual magnitude pruning at ``step`` (dense until step ``start``, a cubic ramp to
    ``final [R]`` at step ``end``) -> ``[R]``."""
    u = 1.0 if step >= end else max(0.0, (step - start) / max(end - start, 1))
    return final * (1.0 - (1.0 - u) ** 3)


def magnitude_mask(w: Tensor, sparsity: Tensor) -> Tensor:
    """Per run, the mask keeping the largest-magnitude entries of one layer: ``w [R, *shape]``, ``sparsity
    [R]`` -> bool ``[R, *shape]`` with exactly ``round((1 - s) n)`` True entries per run (ties by position)."""
    flat = w.reshape(w.shape[0], -1)                                          # [R, n]
    n = flat.shape[1]
    keep = torch.round((1.0 - sparsity.to(torch.float64).clamp(0, 1)) * n).to(torch.int64)  # [R]
    order = torch.argsort(flat.abs(), dim=1, descending=True, stable=True)    # [R, n] largest first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=w.device).expand_as(order))
    return (rank < keep.to(w.device)[:, None]).reshape(w.shape)


def _levels(bits: Tensor) -> Tensor:
    """``2^(b-1) - 1``, the largest grid index of ``b`` bits (float)."""
    return torch.exp2(bits.to(torch.float32) - 1.0) - 1.0


def quantize_rows(w: Tensor, bits: Tensor | int) -> Tensor:
    """``w [rows, ...]`` rounded to the symmetric per-row grid of ``bits`` (a scalar, or a 0-d tensor under
    ``vmap``); ``bits >= 32`` returns ``w`` unchanged. No gradient path (see ``fake_quantize``)."""
    bits = torch.as_tensor(bits, device=w.device)
    q = _levels(bits.clamp(min=1.0, max=FLOAT_BITS))                          # 0-d
    rows = w.reshape(w.shape[0], -1)                                          # [rows, n]
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / q.clamp(min=1.0)  # [rows, 1]
    grid = torch.round(rows / scale).clamp(-q, q) * scale
    return torch.where(bits >= FLOAT_BITS, rows, grid).reshape(w.shape)


def fake_quantize(w: Tensor, bits: Tensor | int) -> Tensor:
    """``quantize_rows`` in the forward pass, the identity in the backward pass (straight-through)."""
    return w + (quantize_rows(w.detach(), bits) - w.detach())


def _layers(params: Tensor, layer_shapes, names: list[str]):
    split = layer_shapes.split(params)
    return [split[n] for n in names]


def sparsity_metric(params: Tensor, layer_shapes, names: list[str]) -> Tensor:
    """The fraction of exact zeros among the prunable weights ``names`` of ``params [K, P]`` -> ``[K]``."""
    layers = _layers(params, layer_shapes, names)
    zeros = sum((w.reshape(w.shape[0], -1) == 0).sum(1) for w in layers)
    total = sum(w[0].numel() for w in layers)
    return (zeros / max(total, 1)).float().cpu()


def bits_metric(params: Tensor, layer_shapes, names: list[str], tolerance: float = 0.1) -> Tensor:
    """The bit width of the prunable weights of ``params [K, P]`` -> ``[K]``: for each row the smallest ``b``
    in 2..16 whose symmetric grid (``scale = max|row| / (2^(b-1) - 1)``) holds every value of the row to within
    ``tolerance`` of a grid step (float16 storage rounds them), the largest over rows; 32 when a row fits none.

    Counting a row's distinct values instead would confuse bits with sparsity: a 90%-sparse row of 64 has at
    most 7 distinct values whatever its grid."""
    worst = torch.full((params.shape[0],), 2, dtype=torch.int64, device=params.device)
    for w in _layers(params, layer_shapes, names):
        rows = w.reshape(w.shape[0], w.shape[1], -1).double()                # [K, rows, n]
        peak = rows.abs().amax(-1, keepdim=True).clamp(min=1e-30)              # [K, rows, 1]
        need = torch.full(rows.shape[:2], FLOAT_BITS, dtype=torch.int64, device=params.device)  # [K, rows]
        for b in range(16, 1, -1):   # descending: the smallest fitting width is written last
            r = rows / peak * (2 ** (b - 1) - 1)
            fits = ((r - r.round()).abs() <= tolerance).all(-1)                  # [K, rows]
            need = torch.where(fits, torch.full_like(need, b), need)
        worst = torch.maximum(worst, need.amax(-1))
    return worst.float().cpu()
