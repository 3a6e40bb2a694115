"""The evaluation suite: what the networks a generator makes actually do.

Sections, one module each, every one a function ``(gen, task, store, ...) -> (JSON-able dict, matplotlib
Figure)``:

1. ``prompt_alignment`` (``alignment``) — G.pt's R^2 of achieved vs prompted metric from held-out inits.
2. ``one_step`` — prompt the data's best metric from random inits; Adam / SGD steps to match it.
3. ``recursive`` — k successive prompts from the out-of-distribution inits.
4.-6. ``novelty``, ``diversity``, ``landscape`` — weight space, after weight matching.
7. ``samples`` — per class of a label condition part: label accuracy and the metric's spread; on image
   fields also copies, sharpness, 1-NNA, coverage, MMD (skipped for generators without a label part).
8. ``compression`` — sparse and quantized networks from the same inits: generated, compressed afterwards,
   sparse from the start, lottery tickets, random masks (tasks with the metrics sparsity and bits only).

``run_sections`` is the section loop (the same held-out runs, common settings and notes for every
section); ``evaluate_all`` runs it and writes ``report.json`` plus one PNG per section, and
``modes.compare_modes`` runs it once per generator. The generator is duck-typed (see ``common``);
higher-is-better metrics (cartpole return) work throughout. Start-free generators (``gen.uses_start``
False) ignore the starts they are given, unconditional ones (``gen.conditional`` False) the prompts;
both are noted in the report. Every generated network is scored in batched ``task.evaluate`` calls,
never one by one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from checkpoints_dataset.fileio import is_terminal, remove_stale_temps, savefig_atomic, write_json_atomic
from checkpoints_dataset.store import open_store
from gpt_params.evaluation.alignment import prompt_alignment
from gpt_params.evaluation.common import held_out_runs, to_json
from gpt_params.evaluation.compression import compression
from gpt_params.evaluation.diversity import diversity
from gpt_params.evaluation.landscape import landscape
from gpt_params.evaluation.novelty import novelty
from gpt_params.evaluation.one_step import one_step
from gpt_params.evaluation.recursive import recursive
from gpt_params.evaluation.samples import samples

Section = Literal["prompt_alignment", "one_step", "recursive", "novelty", "diversity", "landscape", "samples",
                  "compression"]
SECTIONS: tuple[Section, ...] = ("prompt_alignment", "one_step", "recursive", "novelty", "diversity", "landscape",
                                 "samples", "compression")

# section name -> its function; the ones that take the held-out runs get them as their 4th argument
SECTION_FUNCTIONS: dict[Section, Callable[..., tuple[dict, Figure]]] = {
    "prompt_alignment": prompt_alignment, "one_step": one_step, "recursive": recursive, "novelty": novelty,
    "diversity": diversity, "landscape": landscape, "samples": samples, "compression": compression}
TAKES_RUNS = ("prompt_alignment", "novelty", "diversity", "landscape", "samples", "compression")


def check_sections(names) -> None:
    """ValueError naming the unknown section names (``sections`` or ``options`` keys)."""
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")


def run_sections(gen, task, store, sections: Sequence[Section] = SECTIONS, *, runs: int | Sequence[int] = 32,
                 sampler: str | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 device=None, options: dict[str, dict] | None = None, notes: list[str] | None = None,
                 on_figure: Callable[[str, Figure], None] | None = None, seconds: dict[str, float] | None = None,
                 progress: bool = False) -> dict[str, dict]:
    """Run ``sections`` (in ``SECTIONS`` order) with the same held-out ``runs`` (an int: the first of
    ``store.test_runs``; or run ids) and common settings; ``options`` adds (or overrides) keyword arguments
    of single sections, e.g. ``{"one_step": {"max_steps": 500}}``. Returns ``{section: JSON-able result}``.
    Notes are appended to ``notes``, each section's wall time goes to ``seconds[section]`` and its figure
    to ``on_figure(section, fig)`` when given (else it is dropped)."""
    options = dict(options or {})
    check_sections([*sections, *options])
    notes = [] if notes is None else notes
    run_ids = held_out_runs(store, runs, notes)
    common = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, device=device, notes=notes)
    results: dict[str, dict] = {}
    terminal = is_terminal(sys.stderr)   # in a log file, few redraws
    bar = tqdm([name for name in SECTIONS if name in sections], desc="evaluate", unit="section",
               disable=not progress, mininterval=0.1 if terminal else 10)
    for name in bar:
        bar.set_postfix_str(name, refresh=terminal)
        t0 = time.perf_counter()
        args = (gen, task, store, run_ids) if name in TAKES_RUNS else (gen, task, store)
        result, fig = SECTION_FUNCTIONS[name](*args, **{**common, **options.get(name, {})})
        results[name] = to_json(result)
        if on_figure is not None:
            on_figure(name, fig)
        if seconds is not None:
            seconds[name] = time.perf_counter() - t0
    return results


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
                st, ratio = o["steps_to_match"], o.get("wall_ratio")
                median = f"more than {o['max_steps']}" if st.get("median_above_cap") else fmt(st["median"])
                speed = "" if ratio is None else f"; {fmt(ratio)}x the generation's wall time"
                lines.append(f"  {name}: reaches the one-step level in {median} steps (median, {st.get('above_cap', 0)} "
                             f"of {st.get('count')} networks not within {o['max_steps']} counted above it{speed})")
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
        up, nb = nov.get("updates"), nov.get("noise_baseline")
        if up:
            lines.append(f"  updates (generated - start): {100 * up['near_copy_fraction']:.0f}% below their copy "
                         f"threshold; median aligned distance to the nearest training update "
                         f"{fmt(up['distance']['generated']['median'])}, held-out updates "
                         f"{fmt(up['distance']['held_out_trained']['median'])}")
        if nb:
            lines.append(f"  noise baseline: generated {m} median {fmt(nb['generated']['median'])} vs the nearest "
                         f"training checkpoints moved by noise to the same distance {fmt(nb['noisy_nearest']['median'])}")
    div = report.get("diversity", {})
    if "pairwise_distance" in div:
        d = div["pairwise_distance"]
        lines.append(f"Diversity: pairwise aligned distance generated {fmt(d['generated']['median'])} vs trained "
                     f"{fmt(d['trained']['median'])} (median; generated from one start)")
        if "across_starts" in div:
            a = div["across_starts"]["pairwise_distance"]
            lines.append(f"  from {div['across_starts']['num_generated']} different starts: generated "
                         f"{fmt(a['generated']['median'])} vs trained {fmt(a['trained']['median'])}")
    land = report.get("landscape", {})
    if "generated_basins" in land:
        lines.append(f"Landscape ({land['metric']}): {100 * land['generated_in_low_fraction']:.0f}% of generated "
                     f"solutions in the low region, {land['generated_basins']} basin(s)")
    smp = report.get("samples", {})
    if "label_accuracy" in smp:
        line = (f"Samples ({smp['num_generated']} per {smp['label']}): label accuracy "
                f"{100 * smp['label_accuracy']:.0f}%, {smp['metric']} median {fmt(smp['metric_median'])} (80% reach "
                f"{fmt(smp['metric_80pct'])})")
        if "copy_fraction" in smp:
            line += (f", copies {100 * smp['copy_fraction']:.0f}%, sharpness {fmt(smp['sharpness_ratio'])}x real, "
                     f"1-NNA {fmt(smp['one_nna'])}, coverage {fmt(smp['coverage'])}, MMD {fmt(smp['mmd'])}")
        lines.append(line)
    for key, row in report.get("compression", {}).get("rows", {}).items():
        med = lambda d: fmt(d[report["compression"]["metric"]]["median"])
        gen_ = row.get("generated")
        lines.append(f"Compression {key} ({report['compression']['metric']} median): generated "
                     f"{med(gen_) if gen_ else 'n/a'}, dense then compressed {med(row['dense_then_compressed']['one_shot'])}"
                     f" ({med(row['dense_then_compressed']['finetuned'])} fine-tuned), sparse from the start "
                     f"{med(row['sparse_from_start']['adam'])}, ticket mode "
                     f"{med(row['ticket_mode']) if 'ticket_mode' in row else 'n/a'}, tickets {med(row['lottery_tickets'])}, random masks "
                     f"{med(row['random_masks'])}")
    return lines + [f"Note: {n}" for n in report.get("notes", [])]


def evaluate_all(gen, out_dir, task=None, store=None, runs: int = 32, sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, device=None, tb_logger=None, sections: Sequence[Section] = SECTIONS,
                 seed: int = 0, global_step: int = 0, options: dict[str, dict] | None = None,
                 progress: bool = True) -> dict:
    """Run the chosen sections (``run_sections``) and write ``out_dir/report.json`` (atomically; keys: every
    section, plus ``config``, ``notes``, ``seconds``, ``summary``) and ``out_dir/<section>.png``; figures
    also go to TensorBoard when ``tb_logger`` is a SummaryWriter (or a Lightning logger with
    ``.experiment``). ``task`` defaults to the generator's own (``gen.make_task()``), ``store`` to its
    ``store_root``; ``store`` may be a path. ``options`` passes keyword arguments to single sections, e.g.
    ``{"one_step": {"max_steps": 500}}``. Returns the report."""
    options = dict(options or {})
    check_sections([*sections, *options])
    if task is None:
        task = gen.make_task() if hasattr(gen, "make_task") else None
        if task is None:
            raise ValueError("the generator names no task: pass task=get_task(name)")
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
    remove_stale_temps(out_dir)   # what interrupted writes of an earlier report left
    notes: list[str] = []
    run_ids = held_out_runs(store, runs, notes)
    writer = getattr(tb_logger, "experiment", tb_logger)

    def save_figure(name: str, fig: Figure) -> None:
        savefig_atomic(fig, out_dir / f"{name}.png", dpi=100)
        if writer is not None:
            writer.add_figure(f"evaluate/{name}", fig, global_step=global_step, close=False)

    report = {"config": {"task": task.name, "store": str(store.root), "metric": gen.metric,
                         "lower_is_better": bool(gen.lower_is_better), "data_range": list(gen.data_range),
                         "runs": len(run_ids), "run_ids": [int(r) for r in run_ids],
                         "sampler": getattr(gen, "sampler", None) if sampler is None else sampler,
                         "steps": getattr(gen, "sampler_steps", None) if steps is None else steps,
                         "guidance": getattr(gen, "guidance", 1.0) if guidance is None else guidance,
                         "seed": seed, "sections": list(sections), "options": options},
              "notes": notes, "seconds": {}}
    report.update({name: {"skipped": "not requested"} for name in SECTIONS if name not in sections})
    report.update(run_sections(gen, task, store, sections, runs=run_ids, sampler=sampler, steps=steps,
                               guidance=guidance, seed=seed, device=device, options=options, notes=notes,
                               on_figure=save_figure, seconds=report["seconds"], progress=progress))
    report["notes"] = list(notes)
    report = to_json(report)
    report["summary"] = summary_lines(report)
    write_json_atomic(out_dir / "report.json", report, allow_nan=False)
    return report
