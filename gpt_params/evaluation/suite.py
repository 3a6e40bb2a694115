"""The evaluation suite: what the networks a generator makes actually do.

Sections (each a function returning a JSON-able dict and a matplotlib Figure; ``evaluate_all`` runs them
and writes ``report.json`` plus one PNG per section):

1. ``prompt_alignment`` — G.pt's definition: from each held-out run's initial checkpoint, prompts
   ``linspace(best metric in the data, that checkpoint's metric)``; per network ``R^2 = 1 - SSE/SST`` of
   achieved vs prompted (``alignment_r2``), mean and median over networks.
2. ``one_step`` — prompt the data's best metric from random inits (the task's scheme and the
   out-of-distribution Xavier, Kaiming, orthogonal); Adam and SGD from the same inits, and the steps they
   need to reach each network's one-step metric.
3. ``recursive`` — k successive prompts from the out-of-distribution inits.
4.-6. ``novelty``, ``diversity``, ``landscape`` (weight-space sections, in ``evaluate_space``).

The generator is duck-typed (see ``evaluate_common``); higher-is-better metrics (cartpole return) work
throughout. Start-free generators (``gen.uses_start`` False) ignore the starts they are given: prompt
alignment then conditions on the prompts only (the held-out inits still set each network's prompt range)
and one step is "generate for the best metric"; unconditional ones (``gen.conditional`` False) ignore the
prompts (their alignment measures the absence of control). Both are noted in the report. Every generated network is scored in batched ``task.evaluate`` calls, never one by one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from checkpoints_dataset.store import write_json_atomic
from gpt_params.evaluation import plots
from gpt_params.evaluation.common import (at_least_as_good, best_value, generate, has_data, held_out_runs,
                                        metric_of, run_endpoints, start_points, summary, to_json)
from gpt_params.evaluation.space import diversity, landscape, novelty

Section = Literal["prompt_alignment", "one_step", "recursive", "novelty", "diversity", "landscape"]
SECTIONS: tuple[Section, ...] = ("prompt_alignment", "one_step", "recursive", "novelty", "diversity", "landscape")
InitScheme = Literal["default", "xavier", "kaiming", "orthogonal"]
OOD_SCHEMES: tuple[InitScheme, ...] = ("xavier", "kaiming", "orthogonal")
# Optimizers compared with one generated step: hyperparameters of population.optimizer_step.
DEFAULT_OPTIMIZERS = {"adam": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
                      "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}}


def alignment_r2(prompted: np.ndarray, achieved: np.ndarray) -> np.ndarray:
    """G.pt's prompt alignment per network: ``R^2 = 1 - SSE / SST`` of ``achieved [R, M]`` against
    ``prompted [R, M]`` (rows: networks, columns: prompts) -> ``[R]``. 1 is perfect; a constant output
    scores <= 0; unbounded below. Rows whose prompts are all equal (SST = 0) give NaN."""
    prompted = np.asarray(prompted, dtype=np.float64)
    achieved = np.asarray(achieved, dtype=np.float64)
    if prompted.ndim != 2 or prompted.shape != achieved.shape:
        raise ValueError(f"prompted and achieved must both be [networks, prompts], got "
                         f"{list(prompted.shape)} and {list(achieved.shape)}")
    sse = ((achieved - prompted) ** 2).sum(axis=1)
    sst = ((prompted - prompted.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)


def _mode_notes(gen, section: str, notes: list[str]) -> None:
    """Say when the generator ignores the start (start-free) or the target (unconditional)."""
    if not getattr(gen, "uses_start", True):
        notes.append(f"{section}: start-free generator: the starts are ignored (conditioned on the prompts only)")
    if not getattr(gen, "conditional", True):
        notes.append(f"{section}: unconditional generator: the prompts are ignored")


def prompt_alignment(gen, task, store, runs: int | Sequence[int] = 32, num_prompts: int = 20, *,
                     sampler: str = "ddim", steps: int = 50, guidance: float | None = None, seed: int = 0,
                     device=None, notes: list[str] | None = None) -> tuple[dict, Figure]:
    """G.pt's prompt alignment over ``runs`` held-out runs (an int: the first of ``store.test_runs``)."""
    notes = [] if notes is None else notes
    _mode_notes(gen, "prompt_alignment", notes)
    run_ids = held_out_runs(store, runs, notes)
    start, start_metric = start_points(task, store, run_ids, gen.metric, device=device)  # [R, P], [R]
    best = best_value(gen)
    prompted = np.linspace(np.full(len(run_ids), best), start_metric, num_prompts, axis=1)  # [R, M]
    R, M = prompted.shape
    starts = start.repeat_interleave(M, dim=0)  # [R*M, P]
    out = generate(gen, starts, np.repeat(start_metric, M), prompted.ravel(), sampler=sampler, steps=steps,
                   guidance=guidance, seed=seed)  # [R*M, P]
    achieved = metric_of(task, out, gen.metric, device=device).reshape(R, M)  # one batched scoring
    r2 = alignment_r2(prompted, achieved)
    finite = r2[np.isfinite(r2)]
    result = {"metric": gen.metric, "num_networks": R, "num_prompts": M, "best_in_data": best,
              "mean": float(finite.mean()) if finite.size else math.nan,
              "median": float(np.median(finite)) if finite.size else math.nan,
              "per_network": r2, "run_ids": run_ids, "start_metric": start_metric,
              "prompted": prompted, "achieved": achieved}
    return result, plots.alignment_figure(prompted, achieved, gen.data_range, gen.metric)


def _random_inits(task, schemes: Sequence[str], num_inits: int, seed: int):
    """``num_inits`` inits per scheme ``[S*n, P]``, their per-network seeds and scheme labels. Network i is
    ``task.init_params(1, Generator(seed_i), scheme)``, which ``train_population`` rebuilds from the seed."""
    seeds = np.random.default_rng(seed).integers(2**62, size=(len(schemes), num_inits))
    labels = [s for s in schemes for _ in range(num_inits)]
    inits = torch.cat([task.init_params(1, torch.Generator().manual_seed(int(s)), scheme)
                       for scheme, row in zip(schemes, seeds) for s in row])  # [S*n, P]
    return inits, seeds.ravel().tolist(), labels


def _median_final(gen, store) -> float | None:
    """Median final metric of the training runs (None without a store)."""
    if store is None or len(store.train_runs) == 0:
        return None
    _, last = run_endpoints(store, store.train_runs)
    return summary(store.metrics(last)[gen.metric])["median"]


def _optimizer_curves(task, inits, seeds, labels, metric: str, hp: dict, *, max_steps: int, batch_size: int,
                      num_evals: int, device, notes: list[str], name: str) -> dict:
    """Train every init with one optimizer through ``task.train_population`` (vectorized over networks)
    and return its metric at ``num_evals`` geometrically spaced steps."""
    from checkpoints_dataset.population import PopulationConfig

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
             max_steps: int = 2000, batch_size: int = 64, num_evals: int = 40, sampler: str = "ddim",
             steps: int = 50, guidance: float | None = None, seed: int = 0, device=None,
             notes: list[str] | None = None) -> tuple[dict, Figure]:
    """One generated step, prompting the data's best metric, from ``num_inits`` random inits per scheme;
    then Adam / SGD (``optimizers``: name -> lr, momentum, weight_decay) from the same inits up to
    ``max_steps`` steps: the steps and wall time each network needs to reach its own one-step metric
    ("not reached" within the cap is reported as None, with the reached fraction)."""
    notes = [] if notes is None else notes
    _mode_notes(gen, "one_step", notes)
    optimizers = DEFAULT_OPTIMIZERS if optimizers is None else optimizers
    lower, best = gen.lower_is_better, best_value(gen)
    inits, seeds, labels = _random_inits(task, schemes, num_inits, seed)
    init_metric = metric_of(task, inits, gen.metric, device=device)  # [K]
    t0 = time.perf_counter()
    out = generate(gen, inits, init_metric, np.full(len(inits), best), sampler=sampler, steps=steps,
                   guidance=guidance, seed=seed)
    gen_time = time.perf_counter() - t0
    achieved = metric_of(task, out, gen.metric, device=device)  # [K]
    lab = np.array(labels)
    per_scheme = {s: {"init": summary(init_metric[lab == s]), "one_step": summary(achieved[lab == s]),
                      "per_network": achieved[lab == s]} for s in schemes}
    median_final = _median_final(gen, store)
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
        result["optimizers"][name] = {
            "hparams": hp, "max_steps": c["max_steps"], "reached_fraction": float((first >= 0).mean()),
            "steps_to_match": summary(needed), "per_network_steps": needed,
            "wall_seconds_to_match": summary(needed * c["seconds_per_step"]),
            "wall_note": "amortized: the vectorized trainer's time per step for all networks together",
            "by_scheme": {s: summary(needed[lab == s]) for s in schemes}}
        curves[name] = {**c, "level": float(np.median(achieved))}
    fig = plots.one_step_figure(per_scheme, curves, best, median_final, gen.metric)
    return result, fig


def recursive(gen, task, store=None, *, k: int = 5, num_inits: int = 8,
              schemes: Sequence[InitScheme] = OOD_SCHEMES, sampler: str = "ddim", steps: int = 50,
              guidance: float | None = None, seed: int = 0, device=None,
              notes: list[str] | None = None) -> tuple[dict, Figure]:
    """``k`` successive prompts of the data's best metric, each starting from the previous output, from
    ``num_inits`` inits per out-of-distribution scheme; the metric after each prompt."""
    best = best_value(gen)
    params, _, labels = _random_inits(task, schemes, num_inits, seed + 1)  # [K, P]
    values = [metric_of(task, params, gen.metric, device=device)]  # [K] per round
    for i in range(k):
        params = generate(gen, params, values[-1], np.full(len(params), best), sampler=sampler, steps=steps,
                          guidance=guidance, seed=seed + 100 + i)
        values.append(metric_of(task, params, gen.metric, device=device))
    v, lab = np.stack(values), np.array(labels)  # [k+1, K]
    median_final = _median_final(gen, store)
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


def summary_lines(report: dict) -> list[str]:
    """A few human-readable lines of a report (what ``gpt-params evaluate`` prints)."""
    lines, m = [], report["config"]["metric"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
    pa = report.get("prompt_alignment", {})
    if "mean" in pa:
        lines.append(f"Prompt alignment ({m}, {pa['num_networks']} networks x {pa['num_prompts']} prompts): "
                     f"R^2 mean {fmt(pa['mean'])}, median {fmt(pa['median'])}")
    os_ = report.get("one_step", {})
    if "schemes" in os_:
        per = ", ".join(f"{s} {fmt(v['one_step']['median'])}" for s, v in os_["schemes"].items())
        lines.append(f"One step to {m}={fmt(os_['target'])} (median; training runs end at "
                     f"{fmt(os_['median_final_training'])}): {per}")
        for name, o in os_.get("optimizers", {}).items():
            if isinstance(o, dict):
                lines.append(f"  {name}: reaches the one-step level in {fmt(o['steps_to_match']['median'])} steps "
                             f"(median; {100 * o['reached_fraction']:.0f}% within {o['max_steps']})")
    rec = report.get("recursive", {})
    if "schemes" in rec:
        per = ", ".join(f"{s} {' > '.join(fmt(x) for x in v['median_after_each'])}" for s, v in rec["schemes"].items())
        lines.append(f"Recursive prompting ({m}, median after each prompt): {per}")
    nov = report.get("novelty", {})
    if "verdict" in nov:
        d = nov["distance"]
        lines.append(f"Novelty: {nov['verdict']} ({100 * nov['near_copy_fraction']:.0f}% below the copy threshold; "
                     f"median aligned distance generated {fmt(d['generated']['median'])}, held-out "
                     f"{fmt(d['held_out_trained']['median'])}, noisy copies {fmt(d['training_plus_noise']['median'])})")
    div = report.get("diversity", {})
    if "pairwise_distance" in div:
        d = div["pairwise_distance"]
        lines.append(f"Diversity: pairwise aligned distance generated {fmt(d['generated']['median'])} vs trained "
                     f"{fmt(d['trained']['median'])} (median)")
    land = report.get("landscape", {})
    if "generated_basins" in land:
        lines.append(f"Landscape ({land['metric']}): {100 * land['generated_in_low_fraction']:.0f}% of generated "
                     f"solutions in the low region, {land['generated_basins']} basin(s)")
    return lines + [f"Note: {n}" for n in report.get("notes", [])]


def evaluate_all(gen, out_dir, task=None, store=None, runs: int = 32, sampler: str = "ddim", steps: int = 50,
                 guidance: float | None = None, device=None, tb_logger=None, sections: Sequence[Section] = SECTIONS,
                 seed: int = 0, global_step: int = 0, options: dict[str, dict] | None = None,
                 progress: bool = True) -> dict:
    """Run the chosen sections and write ``out_dir/report.json`` (atomically; keys: every section, plus
    ``config``, ``notes``, ``seconds``) and ``out_dir/<section>.png``; figures also go to TensorBoard when
    ``tb_logger`` is a SummaryWriter (or a Lightning logger with ``.experiment``). ``task`` / ``store``
    default to the generator's ``task_name`` / ``store_root``; ``store`` may be a path. ``options`` passes
    keyword arguments to single sections, e.g. ``{"one_step": {"max_steps": 500}}``. Returns the report."""
    from checkpoints_dataset.store import open_store
    from checkpoints_dataset.tasks import get_task

    options = dict(options or {})
    unknown = [s for s in [*sections, *options] if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if task is None:
        if not getattr(gen, "task_name", None):
            raise ValueError("the generator names no task: pass task=get_task(name)")
        task = gen.make_task() if hasattr(gen, "make_task") else get_task(gen.task_name)
    if store is None or isinstance(store, (str, os.PathLike)):
        root = store if store is not None else getattr(gen, "store_root", None)
        if not root:
            raise ValueError("the generator names no checkpoint store: pass store=<store dir>")
        store = open_store(root)
    if gen.metric not in task.metric_names:
        raise ValueError(f"the generator is conditioned on {gen.metric!r}, which task {task.name!r} does not "
                         f"report ({list(task.metric_names)}): pass the task it was trained for")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    run_ids = held_out_runs(store, runs, notes)
    common = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, device=device, notes=notes)
    kw = {name: {**common, **options.get(name, {})} for name in SECTIONS}
    calls = {"prompt_alignment": lambda: prompt_alignment(gen, task, store, run_ids, **kw["prompt_alignment"]),
             "one_step": lambda: one_step(gen, task, store, **kw["one_step"]),
             "recursive": lambda: recursive(gen, task, store, **kw["recursive"]),
             "novelty": lambda: novelty(gen, task, store, run_ids, **kw["novelty"]),
             "diversity": lambda: diversity(gen, task, store, run_ids, **kw["diversity"]),
             "landscape": lambda: landscape(gen, task, store, run_ids, **kw["landscape"])}
    writer = getattr(tb_logger, "experiment", tb_logger)
    report = {"config": {"task": task.name, "store": str(store.root), "metric": gen.metric,
                         "lower_is_better": bool(gen.lower_is_better), "data_range": list(gen.data_range),
                         "runs": len(run_ids), "sampler": sampler, "steps": steps,
                         "guidance": getattr(gen, "guidance", 1.0) if guidance is None else guidance,
                         "seed": seed, "sections": list(sections), "options": options},
              "notes": notes, "seconds": {}}
    todo = [name for name in SECTIONS if name in sections]
    bar = tqdm(todo, desc="evaluate", unit="section", disable=not progress)
    for name in SECTIONS:
        if name not in sections:
            report[name] = {"skipped": "not requested"}
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        result, fig = calls[name]()
        report[name] = to_json(result)
        fig.savefig(out_dir / f"{name}.png", dpi=100)
        if writer is not None:
            writer.add_figure(f"evaluate/{name}", fig, global_step=global_step, close=False)
        report["seconds"][name] = time.perf_counter() - t0
    report["notes"] = list(notes)
    report = to_json(report)
    report["summary"] = summary_lines(report)
    write_json_atomic(out_dir / "report.json", report, allow_nan=False)
    return report
