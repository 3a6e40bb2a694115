"""Exactly sparse and quantized networks from a generator's output: the projection and the packed format.

``project`` puts parameter vectors onto the requested constraint: per layer, the ``round((1 - s) n)`` prunable
weights with the largest scores (their magnitudes unless mask logits are given) are kept and the rest set to
zero; then every row of a prunable weight is rounded to its symmetric ``b``-bit grid (``checkpoints_dataset.
compress``), with the row scale rounded to float16 so the packed file holds exactly the same network. It also
reports how far each network was from the constraint before (``Projection``): a generator that learned the
constraint needs only a small move.

The packed format (``pack`` / ``unpack``; ``read_network`` reads a dense or packed safetensors file):
safetensors has no sparse tensors, so a prunable weight ``W`` of shape ``[rows, ...]`` is stored as
- ``W.mask``: uint8, the mask of its nonzero entries (row-major) bit-packed, most significant bit first
  (``numpy.packbits``);
- ``W.values``: the nonzero entries in row-major order: grid indices ``k`` (``|k| <= 2^(b-1) - 1``) as int8 for
  5-8 bits, or two per byte for 2-4 bits (the earlier entry in the low nibble, two's complement); float32 for
  float networks;
- ``W.scale``: float16 ``[rows]``, the grid step of each row (quantized networks only),
and every other tensor (biases, normalization) as it is. The file's metadata holds ``format:
gpt-params-packed``, its ``version``, and per packed tensor its shape and bit width (JSON). ``unpack`` gives back
the dense ``state_dict`` (zeros and ``k * scale``), equal to the dense file of the same network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from checkpoints_dataset.compress import FLOAT_BITS, magnitude_mask

PACKED_FORMAT, PACKED_VERSION = "gpt-params-packed", "1"

__all__ = ["PACKED_FORMAT", "Projection", "matrix_names", "pack", "project", "read_network", "unpack"]


@dataclass
class Projection:
    """Projected parameter vectors and how far the generator's output was from the constraint."""

    params: Tensor          # [N, P] exactly sparse and on the grid
    distance: Tensor        # [N] ||x - project(x)|| / ||x|| over the prunable weights
    pruned_mass: Tensor     # [N] the fraction of the prunable weights' squared norm that the mask removed


def _grid(rows: Tensor, bits: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows ``[r, n]`` -> grid indices ``k [r, n]`` (float) and float16-exact scales ``[r]`` of ``bits``. Entries
    of ``keep`` that would round to zero get the smallest level of their sign instead, so the mask stays exact."""
    q = 2 ** (bits - 1) - 1
    # what the packed file stores; a nonzero row keeps a nonzero step (float16 underflows below ~6e-8)
    step = rows.abs().amax(1) / q                                            # [r]
    scale = torch.where(step > 0, step.clamp(min=torch.finfo(torch.float16).tiny), step).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    k = torch.round(rows / safe[:, None]).clamp(-q, q) * (scale > 0)[:, None]
    if keep is not None:
        k = torch.where(keep & (k == 0), torch.where(rows < 0, -1.0, 1.0), k)
    return k, scale


def project(params: Tensor, layer_shapes, names: list[str], sparsity: Tensor | float | None = None,
            bits: Tensor | int | None = None, scores: Tensor | None = None) -> Projection:
    """``params [N, P]`` onto per-network ``sparsity [N]`` (None or 0: dense) and ``bits [N]`` (None or 32:
    float) over the prunable weights ``names``; ``scores [N, P]`` rank the entries to keep (default |params|):
    a mask channel's output, whose network is then ``params`` where the score is positive and zero elsewhere,
    which ``distance`` and ``pruned_mass`` are measured from. With a sparsity exactly ``round((1 - s) n)``
    entries per layer are kept, and a kept nonzero entry that would round to zero keeps the smallest level of
    its sign (so a network with no exact zeros among them comes out exactly that sparse); with bits alone
    rounding may add zeros, as quantization-aware training does."""
    x = params.float().clone()
    n = x.shape[0]
    sparsity = torch.zeros(n, dtype=torch.float64) if sparsity is None else (
        torch.as_tensor(sparsity, dtype=torch.float64).reshape(-1).expand(n))   # float64: round((1 - s) n) as trained
    bits = torch.full((n,), FLOAT_BITS) if bits is None else torch.as_tensor(bits).reshape(-1).expand(n)
    if ((sparsity < 0) | (sparsity >= 1)).any() or ((bits < 2) | (bits > FLOAT_BITS)).any():
        raise ValueError(f"sparsity must lie in [0, 1) and bits in 2..32, got {sparsity.tolist()} and {bits.tolist()}")
    order = x.abs() if scores is None else scores.float() - scores.float().amin(1, keepdim=True)  # >= 0, same order
    view, rank = layer_shapes.split(x), layer_shapes.split(order)
    if scores is not None:   # the network the mask channel meant: its zeros stay zero, whatever is kept
        meant = layer_shapes.split(scores.float())
        for k in names:
            view[k].mul_(meant[k] > 0)
    before = {k: view[k].clone() for k in names}
    pruned_sq, total_sq = torch.zeros(n), torch.zeros(n)
    for k in names:
        w = view[k]                                                           # [N, rows, ...] a view of x
        mask = magnitude_mask(rank[k].to(w.device), sparsity.to(w.device))
        total_sq += before[k].reshape(n, -1).square().sum(1).cpu()
        w.mul_(mask)
        pruned_sq += (before[k] * ~mask).reshape(n, -1).square().sum(1).cpu()
        for i in range(n):
            if int(bits[i]) < FLOAT_BITS:
                rows = w[i].reshape(w.shape[1], -1)                           # [rows, n]
                # with a sparsity, kept nonzero entries stay nonzero (the count is exact); without one,
                # rounding to zero is allowed, as in quantization-aware training
                keep = (mask[i].reshape(rows.shape) & (rows != 0)) if float(sparsity[i]) > 0 else None
                k_idx, scale = _grid(rows, int(bits[i]), keep=keep)
                w[i].copy_((k_idx * scale[:, None]).reshape(w[i].shape))
    moved = sum((view[k] - before[k]).reshape(n, -1).square().sum(1).cpu() for k in names)
    norm = total_sq.clamp(min=1e-30)
    return Projection(params=x, distance=(moved / norm).sqrt(), pruned_mass=pruned_sq / norm)


def matrix_names(layer_shapes) -> list[str]:
    """The entries of two or more dimensions (Linear and Conv weights in the usual networks): what a generator
    without its task's model projects."""
    return [k for k, shape in layer_shapes.items() if len(shape) >= 2]


def pack(state_dict: dict[str, Tensor], names: list[str], bits: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A projected network's ``state_dict`` -> the packed tensors and metadata (see the module docstring)."""
    if not 2 <= bits <= FLOAT_BITS:
        raise ValueError(f"bits must be 2..32 (32: float values), got {bits}")
    tensors, layout = {}, {}
    for key, value in state_dict.items():
        if key not in names:
            tensors[key] = value.contiguous()
            continue
        w = value.float().reshape(value.shape[0], -1)                        # [rows, n]
        mask = w != 0
        tensors[f"{key}.mask"] = torch.from_numpy(np.packbits(mask.flatten().cpu().numpy()))
        if bits >= FLOAT_BITS:
            tensors[f"{key}.values"] = w[mask].contiguous()
        else:
            k_idx, scale = _grid(w, bits)
            if not torch.equal(k_idx * scale[:, None], w):
                raise ValueError(f"{key} is not on the {bits}-bit grid with float16 row scales: project() it first")
            k = k_idx[mask].to(torch.int8)
            if bits <= 4:
                nib = (k.to(torch.int16) & 0xF).to(torch.uint8)
                nib = torch.cat([nib, nib.new_zeros(len(nib) % 2)])
                k = nib[0::2] | (nib[1::2] << 4)
            tensors[f"{key}.values"] = k.contiguous()
            tensors[f"{key}.scale"] = scale.half()
        layout[key] = {"shape": list(value.shape), "bits": int(bits), "nonzero": int(mask.sum())}
    meta = {"format": PACKED_FORMAT, "version": PACKED_VERSION, "layout": json.dumps(layout)}
    return tensors, meta


def unpack(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, Tensor]:
    """Packed tensors and their metadata -> the dense ``state_dict`` (what ``load_state_dict`` takes)."""
    if metadata.get("format") != PACKED_FORMAT or metadata.get("version") != PACKED_VERSION:
        raise ValueError(f"not a {PACKED_FORMAT} v{PACKED_VERSION} file (metadata {metadata.get('format')!r} "
                         f"v{metadata.get('version')!r}); a dense file loads with safetensors.torch.load_file")
    layout = json.loads(metadata["layout"])
    packed = {f"{k}.{part}" for k in layout for part in ("mask", "values", "scale")}
    out = {k: v for k, v in tensors.items() if k not in packed}
    for key, info in layout.items():
        shape, bits, count = info["shape"], int(info["bits"]), int(info["nonzero"])
        numel = int(np.prod(shape))
        mask = torch.from_numpy(np.unpackbits(tensors[f"{key}.mask"].numpy(), count=numel).astype(bool))
        values = tensors[f"{key}.values"]
        if bits < FLOAT_BITS:
            if bits <= 4:
                nib = torch.stack([values & 0xF, values >> 4], 1).reshape(-1)[:count].to(torch.int16)
                values = torch.where(nib >= 8, nib - 16, nib)
            rows = shape[0]
            row_of = torch.arange(numel).div(numel // rows, rounding_mode="floor")[mask]
            values = values.float() * tensors[f"{key}.scale"].float()[row_of]
        dense = torch.zeros(numel)
        dense[mask] = values.float()
        out[key] = dense.reshape(shape)
    return out


def read_network(path: str | Path) -> dict[str, Tensor]:
    """A safetensors file -> its dense ``state_dict``: a packed file unpacked, any other as it is."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unpack(tensors, metadata) if metadata.get("format") == PACKED_FORMAT else tensors
