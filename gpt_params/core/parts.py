"""Condition parts: named scalar metrics and categorical labels a generator is conditioned on besides its target
metric (issue 18: "a field of a shoe"; issue 19: a sparsity and a bit width next to the metric).

Each part is embedded on its own and the embeddings are summed into the DiT's adaLN vector, with the
timestep and the target and start metrics. Each part has a null embedding that replaces it where it is
dropped: in training each part is dropped on its own (probability ``cond_drop_prob``), so classifier-free
guidance works per part at sampling (``Diffusion.sample_tokens(part_guidance=...)``).

A part is described by plain values (``PartSpec``; JSON in checkpoints): a scalar's ``range`` (lo, hi) maps
it to [0, 1] like the target metric; a label's ``classes`` K are the integers 0..K-1 (index K is its null).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

PartKind = Literal["scalar", "label"]


@dataclasses.dataclass(frozen=True)
class PartSpec:
    """One condition part: its metric ``name``, ``kind``, and a scalar's ``range`` or a label's ``classes``."""

    name: str
    kind: PartKind
    range: tuple[float, float] = (0.0, 1.0)
    classes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("scalar", "label"):
            raise ValueError(f"condition part {self.name!r}: kind must be 'scalar' or 'label', got {self.kind!r}")
        lo, hi = float(self.range[0]), float(self.range[1])
        object.__setattr__(self, "range", (lo, hi))
        if self.kind == "scalar" and not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"condition part {self.name!r}: range must be finite (lo, hi) with hi > lo, got "
                             f"{self.range}")
        if self.kind == "label" and int(self.classes) < 1:
            raise ValueError(f"condition part {self.name!r}: a label needs classes >= 1, got {self.classes}")

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "range": list(self.range), "classes": int(self.classes)}

    @classmethod
    def from_json(cls, d: Mapping) -> PartSpec:
        return cls(str(d["name"]), d["kind"], tuple(d.get("range", (0.0, 1.0))), int(d.get("classes", 0)))

    def check(self, values: Tensor) -> None:
        """Refuse values a part cannot take: non-finite ones, and labels that are not one of its classes."""
        if not torch.isfinite(values).all():
            raise ValueError(f"condition {self.name} has NaN or inf values; pass finite numbers")
        if self.kind == "label":
            bad = (values != values.round()) | (values < 0) | (values >= self.classes)
            if bad.any():
                raise ValueError(f"label {self.name}={values[bad][0].item():g} is not one of its classes "
                                 f"0..{self.classes - 1}")


def parts_from_json(parts: Sequence[Mapping] | None) -> list[PartSpec]:
    return [p if isinstance(p, PartSpec) else PartSpec.from_json(p) for p in parts or []]


class PartEmbedders(nn.Module):
    """The parts' embeddings, summed: ``values [N, E]`` (raw; labels as integers) and ``drop [N, E]`` bool ->
    ``[N, D]``. A dropped part, or every part when ``values`` is None, gives its null embedding."""

    def __init__(self, parts: Sequence[PartSpec], hidden_size: int, scalar_embedder: type[nn.Module]):
        super().__init__()
        self.parts = list(parts)
        self.embedders = nn.ModuleList()
        for part in self.parts:
            if part.kind == "scalar":
                self.embedders.append(scalar_embedder(hidden_size, scale=1000.0))
            else:
                self.embedders.append(nn.Embedding(part.classes + 1, hidden_size))   # index K: the null
        self.scalar_index = {i: j for j, i in enumerate(i for i, p in enumerate(self.parts) if p.kind == "scalar")}
        # the scalars' null embeddings (labels have theirs in the table): none without scalars, so every
        # parameter gets a gradient (DDP refuses unused ones)
        self.nulls = nn.Parameter(torch.zeros(len(self.scalar_index), hidden_size)) if self.scalar_index else None

    def forward(self, values: Tensor | None, drop: Tensor | None, n: int, device) -> Tensor:
        out = None
        if values is not None and values.shape != (n, len(self.parts)):
            raise ValueError(f"condition parts must be [N, {len(self.parts)}] values ({[p.name for p in self.parts]}), "
                             f"got {list(values.shape)}")
        for i, (part, embed) in enumerate(zip(self.parts, self.embedders)):
            dropped = torch.ones(n, dtype=torch.bool, device=device) if values is None else (
                torch.zeros(n, dtype=torch.bool, device=device) if drop is None else drop[:, i])  # [N]
            if part.kind == "label":
                idx = torch.full((n,), part.classes, dtype=torch.long, device=device) if values is None else \
                    torch.where(dropped, part.classes, values[:, i].round().long().clamp(0, part.classes))
                emb = embed(idx)  # [N, D]
            else:
                lo, hi = part.range
                raw = torch.zeros(n, device=device) if values is None else (values[:, i].float() - lo) / (hi - lo)
                emb = embed(raw)  # [N, D]
                emb = torch.where(dropped[:, None], self.nulls[self.scalar_index[i]].to(emb.dtype), emb)
            out = emb if out is None else out + emb
        return out
