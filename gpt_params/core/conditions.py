"""``Conditions``: what a generator is conditioned on, and the range its prompts make sense in.

Today a generator has at most two named conditions: the start checkpoint with its metric
(``uses_start``) and the target value of one scalar metric (``conditional``). Each has its own null
embedding in the DiT; classifier-free guidance scales the target's.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Conditions:
    """The conditioning of a generator.

    Attributes:
        metric: the target metric's name, e.g. "val_error".
        lower_is_better: whether lower values of ``metric`` are better.
        data_range: (min, max) of the metric in the training data; prompts outside it extrapolate.
        best: the best value in the training data.
        init_metric: the median metric of the training runs' initial checkpoints (the start metric to
            assume when a start cannot be scored).
        uses_start: conditioned on a start checkpoint and its metric (G.pt); False: start-free.
        conditional: conditioned on the target metric; False: unconditional.
    """

    metric: str
    lower_is_better: bool
    data_range: tuple[float, float]
    best: float
    init_metric: float
    uses_start: bool = True
    conditional: bool = True

    def check_target(self, targets: Sequence[float], bounds: Optional[tuple[float, float]] = None) -> list[str]:
        """Refuse targets that are not finite or lie outside the metric's valid ``bounds`` (ValueError); return
        warnings for those outside the range seen in the data (the generator extrapolates there)."""
        warnings = []
        lo, hi = self.data_range
        for t in targets:
            if not math.isfinite(t):
                raise ValueError(f"target {t} is not a finite number")
            if bounds is not None and not (bounds[0] <= t <= bounds[1]):
                raise ValueError(f"target {self.metric}={t} is outside its valid range "
                                 f"[{bounds[0]}, {bounds[1]}]; choose a target inside it")
            if not (lo <= t <= hi):
                warnings.append(f"target {self.metric}={t} is outside the range seen in the data "
                                f"[{lo:.4g}, {hi:.4g}]: the generator extrapolates there")
        return warnings
