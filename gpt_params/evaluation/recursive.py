"""Recursive prompting, section 3 of the evaluation suite: starting at out-of-distribution inits (Xavier,
Kaiming, orthogonal), k successive prompts of the data's best metric, each from the previous output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (OOD_SCHEMES, InitScheme, at_least_as_good, best_value, final_median,
                                          generate, metric_of, random_inits)


def recursive(gen, task, store=None, *, k: int = 5, num_inits: int = 8,
              schemes: Sequence[InitScheme] = OOD_SCHEMES, sampler: str | None = None, steps: int | None = None,
              guidance: float | None = None, seed: int = 0, device=None,
              notes: list[str] | None = None) -> tuple[dict, Figure]:
    """``k`` successive prompts of the data's best metric, each starting from the previous output, from
    ``num_inits`` inits per out-of-distribution scheme; the metric after each prompt."""
    best = best_value(gen)
    params, _, labels = random_inits(task, schemes, num_inits, seed + 1)  # [K, P]
    values = [metric_of(task, params, gen.metric, device=device)]  # [K] per round
    for i in range(k):
        params = generate(gen, params, values[-1], np.full(len(params), best), sampler=sampler, steps=steps,
                          guidance=guidance, seed=seed + 100 + i)
        values.append(metric_of(task, params, gen.metric, device=device))
    v, lab = np.stack(values), np.array(labels)  # [k+1, K]
    median_final = final_median(gen, store)
    per_scheme = {}
    for s in schemes:
        med = np.median(v[:, lab == s], axis=1)  # [k+1]
        hit = (np.nonzero(at_least_as_good(med, median_final, gen.lower_is_better))[0]
               if median_final is not None else np.array([]))
        per_scheme[s] = {"median_after_each": med, "per_network": v[:, lab == s],
                         "prompts_to_median_final": int(hit[0]) if hit.size else None}
    result = {"metric": gen.metric, "k": k, "target": best, "median_final_training": median_final,
              "schemes": per_scheme}
    return result, plots.recursive_figure({s: v[:, lab == s] for s in schemes}, best, gen.metric)
