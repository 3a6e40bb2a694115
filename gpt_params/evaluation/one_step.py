"""One generated step, section 2 of the evaluation suite.

Prompt the data's best metric from random inits (the task's scheme and the out-of-distribution Xavier,
Kaiming, orthogonal); Adam and SGD from the same inits (``task.train_population``, data tasks only), and
the steps they need to reach each network's one-step metric. Start-free generators make "generate for the
best metric" of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from checkpoints_dataset.population import PopulationConfig
from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (OOD_SCHEMES, InitScheme, at_least_as_good, best_value, capped_summary,
                                          final_median, generate, has_data, metric_of, mode_notes, random_inits,
                                          summary)

# Optimizers compared with one generated step: hyperparameters of checkpoints_dataset.optim.optimizer_step.
DEFAULT_OPTIMIZERS = {"adam": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
                      "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}}


def _optimizer_curves(task, inits, seeds, labels, metric: str, hp: dict, *, max_steps: int, batch_size: int,
                      num_evals: int, device, notes: list[str], name: str) -> dict:
    """Train every init with one optimizer through ``task.train_population`` (vectorized over networks)
    and return its metric at ``num_evals`` geometrically spaced steps."""
    n_train = len(task.split("train")[1])
    steps_per_epoch = max(1, n_train // min(batch_size, n_train))
    config = PopulationConfig(runs=len(seeds), group_size=len(seeds), epochs=max(1, math.ceil(max_steps / steps_per_epoch)),
                              batch_size=batch_size, num_checkpoints=num_evals)
    hparams = [{"run_id": i, "seed": int(s), "optimizer": name, "init_scheme": scheme, "init_scale": 1.0,
                "lr": float(hp["lr"]), "momentum": float(hp.get("momentum", 0.9)),
                "weight_decay": float(hp.get("weight_decay", 0.0))} for i, (s, scheme) in enumerate(zip(seeds, labels))]
    t0 = time.perf_counter()
    res = task.train_population(hparams, config, device or "cpu", progress=None)
    wall = time.perf_counter() - t0
    if not torch.allclose(res.params[:, 0], inits, atol=1e-6):
        notes.append(f"{name}: train_population started from inits that differ from the generator's")
    steps = res.steps.numpy()
    return {"steps": steps, "values": res.metrics[metric].double().numpy().T,  # [E], [E, K]
            "seconds_per_step": wall / max(int(steps[-1]), 1), "max_steps": int(steps[-1]), **hp}


def one_step(gen, task, store=None, *, num_inits: int = 8,
             schemes: Sequence[InitScheme] = ("default", *OOD_SCHEMES), optimizers: dict | None = None,
             max_steps: int = 2000, batch_size: int = 64, num_evals: int = 40, sampler: str | None = None,
             steps: int | None = None, guidance: float | None = None, seed: int = 0, device=None,
             notes: list[str] | None = None) -> tuple[dict, Figure]:
    """One generated step, prompting the data's best metric, from ``num_inits`` random inits per scheme;
    then Adam / SGD (``optimizers``: name -> lr, momentum, weight_decay) from the same inits up to
    ``max_steps`` steps: the steps and wall time each network needs to reach its own one-step metric.
    Networks not matched within the cap count as above it (``capped_summary``: the median includes them,
    ``above_cap`` says how many). ``wall_ratio``: the optimizer's median wall time to match over the
    generation's wall time for the same networks (above 1: generating is faster)."""
    notes = [] if notes is None else notes
    mode_notes(gen, "one_step", notes)
    optimizers = DEFAULT_OPTIMIZERS if optimizers is None else optimizers
    lower, best = gen.lower_is_better, best_value(gen)
    inits, seeds, labels = random_inits(task, schemes, num_inits, seed)
    init_metric = metric_of(task, inits, gen.metric, device=device)  # [K]
    t0 = time.perf_counter()
    out = generate(gen, inits, init_metric, np.full(len(inits), best), sampler=sampler, steps=steps,
                   guidance=guidance, seed=seed)
    gen_time = time.perf_counter() - t0
    achieved = metric_of(task, out, gen.metric, device=device)  # [K]
    lab = np.array(labels)
    per_scheme = {s: {"init": summary(init_metric[lab == s]), "one_step": summary(achieved[lab == s]),
                      "per_network": achieved[lab == s]} for s in schemes}
    median_final = final_median(gen, store)
    result = {"metric": gen.metric, "target": best, "data_best": best, "median_final_training": median_final,
              "generate_seconds": gen_time, "schemes": per_scheme, "optimizers": {}}
    curves = {}
    if not has_data(task):
        note = f"one_step: task {getattr(task, 'name', '?')!r} has no data split; optimizer comparison skipped"
        notes.append(note)
        result["optimizers"] = {"skipped": note}
    for name, hp in optimizers.items() if has_data(task) else ():
        c = _optimizer_curves(task, inits, seeds, labels, gen.metric, hp, max_steps=max_steps,
                              batch_size=batch_size, num_evals=num_evals, device=device, notes=notes, name=name)
        reached = at_least_as_good(c["values"], achieved[None, :], lower)  # [E, K]
        first = np.where(reached.any(0), reached.argmax(0), -1)
        needed = np.where(first >= 0, c["steps"][np.maximum(first, 0)], np.nan).astype(np.float64)  # [K]
        wall = capped_summary(needed * c["seconds_per_step"], c["max_steps"] * c["seconds_per_step"])  # seconds
        result["optimizers"][name] = {
            "hparams": hp, "max_steps": c["max_steps"], "reached_fraction": float((first >= 0).mean()),
            "steps_to_match": capped_summary(needed, c["max_steps"]), "per_network_steps": needed,
            "wall_seconds_to_match": wall, "seconds_per_step": c["seconds_per_step"],
            "wall_note": "amortized: the vectorized trainer's time per step for all networks together",
            # how many times longer the optimizer takes than the generation, on the same networks and machine
            "wall_ratio": None if wall["median"] is None or gen_time <= 0 else wall["median"] / gen_time,
            "by_scheme": {s: capped_summary(needed[lab == s], c["max_steps"]) for s in schemes}}
        curves[name] = {**c, "level": float(np.median(achieved))}
    fig = plots.one_step_figure(per_scheme, curves, best, median_final, gen.metric)
    return result, fig
