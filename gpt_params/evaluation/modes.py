"""Mode comparison: G.pt-style (params space, start checkpoint) vs latent (p-diff-style) generators.

``compare_modes({"params+start": ckpt_a, "pdiff": ckpt_b, ...}, task, store)`` loads each generator, runs
the same four sections of the evaluation suite (``suite.run_sections``: prompt alignment, one step, novelty,
diversity) on the same held-out runs and seeds and writes one table: ``out_dir/modes.md`` (markdown) and
``out_dir/modes.json`` (the table's rows plus each mode's full section results), each written atomically.
One step here is the generated networks' metric only (no Adam/SGD curves: ``gpt-params evaluate --ckpt``
measures those).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping

from checkpoints_dataset.fileio import remove_stale_temps, write_json_atomic, write_text_atomic
from gpt_params.core.generator import Generator
from gpt_params.evaluation.common import held_out_runs, to_json
from gpt_params.evaluation.suite import run_sections

COLUMNS = ("mode", "space", "start", "condition", "alignment R2 (median)", "one step (median)",
           "novel (1 - near-copy fraction)", "aligned dist. to nearest train (gen / held-out)",
           "pairwise dist. (gen / trained)", "pairwise agreement (gen / trained)")


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def _row(name: str, gen, res: dict) -> dict:
    """One table row from a mode's section results (JSON-able)."""
    pa, os_, nov, div = res["prompt_alignment"], res["one_step"], res["novelty"], res["diversity"]
    first_scheme = next(iter(os_["schemes"].values()))
    agree = div.get("pairwise_agreement", {})
    return {
        "mode": name, "space": gen.space, "start": "checkpoint" if gen.uses_start else "none",
        "condition": "target" if gen.conditional else "none",
        "alignment_median": pa["median"], "alignment_mean": pa["mean"],
        "one_step_median": first_scheme["one_step"]["median"], "one_step_target": os_["target"],
        "novel_fraction": 1.0 - nov["near_copy_fraction"], "novelty_verdict": nov["verdict"],
        "nearest_distance_generated": nov["distance"]["generated"]["median"],
        "nearest_distance_held_out": nov["distance"]["held_out_trained"]["median"],
        "pairwise_distance_generated": div["pairwise_distance"]["generated"]["median"],
        "pairwise_distance_trained": div["pairwise_distance"]["trained"]["median"],
        "pairwise_agreement_generated": agree.get("generated", {}).get("median"),
        "pairwise_agreement_trained": agree.get("trained", {}).get("median"),
    }


def markdown_table(rows: list[dict], metric: str) -> str:
    """The comparison as a markdown table (one line per mode)."""
    head = [c.replace("one step", f"one step {metric}") for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["mode"], r["space"], r["start"], r["condition"], _fmt(r["alignment_median"]),
                 _fmt(r["one_step_median"]), _fmt(r["novel_fraction"], 2),
                 f"{_fmt(r['nearest_distance_generated'])} / {_fmt(r['nearest_distance_held_out'])}",
                 f"{_fmt(r['pairwise_distance_generated'])} / {_fmt(r['pairwise_distance_trained'])}",
                 f"{_fmt(r['pairwise_agreement_generated'])} / {_fmt(r['pairwise_agreement_trained'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_modes(ckpts: Mapping[str, str | Path], task, store, out_dir: str | Path | None = None, *,
                  runs: int = 16, num_prompts: int = 10, num_inits: int = 8, num_networks: int = 8,
                  sampler: str | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                  device=None) -> dict:
    """Evaluate each generator ``ckpts[name]`` on the same held-out runs and seeds; write
    ``out_dir/modes.md`` and ``out_dir/modes.json`` when ``out_dir`` is given; return
    ``{"rows": [...], "markdown": str, "results": {name: sections}, "notes": [...], "config": {...}}``.

    ``runs``: held-out runs for prompt alignment (``num_prompts`` each); ``num_inits``: default-scheme
    inits for one step; ``num_networks``: generated networks for novelty and for diversity.
    """
    if not ckpts:
        raise ValueError("compare_modes needs at least one NAME=CKPT generator")
    notes: list[str] = []
    run_ids = held_out_runs(store, runs, notes)
    common = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, device=device)
    sections = ("prompt_alignment", "one_step", "novelty", "diversity")
    options = {"prompt_alignment": {"num_prompts": num_prompts},
               "one_step": {"num_inits": num_inits, "schemes": ("default",), "optimizers": {}},
               "novelty": {"num_networks": num_networks}, "diversity": {"num_networks": num_networks}}
    rows, results, seconds, metric, scales, sampling = [], {}, {}, None, {}, {}
    for name, path in ckpts.items():
        gen = Generator.load(path, device=device)
        if not store.layer_shapes.same_layout(gen.layer_shapes):
            raise ValueError(f"mode {name!r}: {path} generates another architecture than the store's networks")
        if metric is not None and gen.metric != metric:
            raise ValueError(f"mode {name!r} is conditioned on {gen.metric!r}, the others on {metric!r}: "
                             "compare generators of one conditioning metric")
        metric = gen.metric
        scales[name] = gen.guidance if guidance is None else guidance  # None: each generator's own default
        sampling[name] = {"sampler": gen.sampler if sampler is None else sampler,
                          "steps": gen.sampler_steps if steps is None else steps}
        mode_notes: list[str] = []
        t0 = time.perf_counter()
        res = run_sections(gen, task, store, sections, runs=run_ids, options=options, notes=mode_notes, **common)
        seconds[name] = time.perf_counter() - t0
        notes += [f"{name}: {n}" for n in dict.fromkeys(mode_notes)]
        results[name] = res
        rows.append(_row(name, gen, res))
    if len({(v["sampler"], v["steps"]) for v in sampling.values()}) > 1:
        notes.append(f"the generators sample differently (each with its own default): {sampling}; pass "
                     "--sampler and --steps to compare them with the same sampler")
    table = markdown_table(rows, metric)
    report = {"rows": rows, "markdown": table, "results": results, "notes": notes, "seconds": seconds,
              "config": {"task": task.name, "store": str(store.root), "metric": metric,
                         "runs": len(run_ids), "num_prompts": num_prompts, "num_inits": num_inits,
                         "num_networks": num_networks, "ckpts": {k: str(v) for k, v in ckpts.items()}, **common,
                         "guidance": scales, "sampler": None, "steps": None, "sampling": sampling, "device": None if device is None else str(device)}}
    report = to_json(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        write_json_atomic(out / "modes.json", report, allow_nan=False)   # atomic: a kill keeps the old files
        write_text_atomic(out / "modes.md", table + "\n\n" + "\n".join(f"- note: {n}" for n in notes) + "\n")
    return report
