"""``gpt-params prompt``: generate networks for target metrics, save them, evaluate them, print a table."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from checkpoints_dataset.compress import prunable_names
from checkpoints_dataset.fileio import write_json_atomic
from checkpoints_dataset.params import state_dict_to_vector
from gpt_params.cli.common import (UsageError, add_part_options, add_sampling_options, add_task_options,
                                   check_sampling, parse_parts, prepare_out)
from gpt_params.core.compression import matrix_names, pack, project
from gpt_params.core.generator import Generator, load_state_dict, save_state_dict
from gpt_params.evaluation.compression import train_ticket


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpt-params prompt",
        description="Generate networks for target metrics from a trained generator, save each as a "
                    "safetensors state_dict, evaluate them (batched) and print target vs achieved.")
    p.add_argument("--ckpt", required=True, help="generator checkpoint (.ckpt from gpt-params train)")
    p.add_argument("--target", type=float, action="append", default=None,
                   help="target value of the conditioning metric; repeat for several (required unless the "
                        "generator is unconditional, which ignores it with a note)")
    p.add_argument("--num", type=int, default=8, help="networks per target (default 8)")
    p.add_argument("--out", required=True, help="output directory for the .safetensors files and results.json")
    p.add_argument("--start", default=None,
                   help="'random' (fresh inits of the task's model), a .safetensors state_dict, or 'none'; "
                        "default: random for generators trained with a start, none for start-free ones "
                        "(which refuse any other)")
    add_part_options(p)
    p.add_argument("--sparsity", type=float, default=None,
                   help="make the networks exactly this sparse: per layer the largest-magnitude Linear/Conv weights "
                        "are kept, the rest set to zero (also the generator's sparsity part, if it has one)")
    p.add_argument("--bits", type=int, default=None,
                   help="round every row of the Linear/Conv weights to a symmetric grid of this many bits, 2-8 "
                        "(also the generator's bits part, if it has one); results.json reports how far each "
                        "network was from the constraint before")
    p.add_argument("--project-from", type=float, default=0.5, metavar="F",
                   help="with --sparsity/--bits: project the sampler's predictions from this fraction of its steps on "
                        "(0.5, the default: the later half; 1.0: the result only), so the last steps denoise networks "
                        "that meet the constraint")
    p.add_argument("--ticket", type=int, default=None, metavar="EPOCHS",
                   help="ticket mode (with --sparsity): keep only the generated network's mask, put it on the start and "
                        "train that ticket EPOCHS epochs with Adam (lr 1e-3, mask fixed, quantization-aware at --bits); "
                        "writes the trained tickets (classification tasks)")
    p.add_argument("--format", choices=["dense", "packed"], default="dense",
                   help="dense: state_dicts that load with strict=True (the default); packed: int8 / two int4 per "
                        "byte, float16 row scales and bit-packed masks (gpt_params.core.compression.read_network "
                        "unpacks them; gpt-params prompt --start takes them)")
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace results already in --out: the previous results.json and the networks it lists "
                        "(or named like ours, targetNN_NNN/sample_NNN.safetensors) are removed; other files stay")
    add_task_options(p, "the checkpoint's")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.num < 1:
        raise UsageError(f"--num must be at least 1 (got {args.num})")
    check_sampling(args)
    gen = Generator.load(args.ckpt, device=args.device)
    # what is used, and recorded in results.json
    guidance = gen.guidance if args.guidance is None else args.guidance
    sampler = gen.sampler if args.sampler is None else args.sampler
    steps = gen.sampler_steps if args.steps is None else args.steps
    task = gen.make_task(args.task, data_dir=args.data_dir, evaluator=args.evaluator)
    start_arg, target_values = _check_mode_arguments(gen, args)
    parts = parse_parts(args.parts, "--label", gen.parts)
    constraint = _constraint(args, gen, parts)
    part_guidance = parse_parts(args.part_guidance, "--part-guidance", gen.parts)
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    bounds = task.metric_bounds.get(gen.metric) if task is not None else None
    if gen.conditional:
        for w in gen.check_target(target_values, bounds):
            print(f"warning: {w}", file=sys.stderr)

    g = torch.Generator().manual_seed(args.seed)
    n = len(target_values) * args.num
    start, start_metric = _start(gen, task, start_arg, n, g)                       # [n, P], [n] or None
    targets = torch.tensor([0.0 if t is None else t for t in target_values]).repeat_interleave(args.num)  # [n]
    projection = None
    if constraint["sparsity"] is not None or constraint["bits"] is not None:
        names = _prunable(gen, task)
        projection = gen.generate(start, start_metric, targets, sampler=sampler, steps=steps, guidance=guidance,
                                  generator=g, parts=parts, part_guidance=part_guidance, constrain_from=args.project_from,
                                  constraint=lambda p, scores: project(p.cpu(), gen.layer_shapes, names,
                                                                       constraint["sparsity"], constraint["bits"],
                                                                       scores=None if scores is None else scores.cpu()))
        params = projection.params.cpu()                                              # [n, P] exactly compressed
        if args.ticket is not None:   # the generated mask on the start, trained; rounded onto the same grid again
            if task is None or not hasattr(task, "split"):
                raise UsageError("--ticket trains the ticket on the task's data: it needs a classification task "
                                 "(give --task)")
            trained = train_ticket(task, start, params, names, epochs=args.ticket, bits=constraint["bits"] or 32,
                                   seed=args.seed, device=args.device)
            params = project(trained, gen.layer_shapes, names, constraint["sparsity"], constraint["bits"],
                             scores=(params != 0).float()).params   # exactly the generated mask kept
    else:
        params = gen.generate(start, start_metric, targets, sampler=sampler, steps=steps, guidance=guidance,
                              generator=g, parts=parts, part_guidance=part_guidance).cpu()   # [n, P]
    achieved = {k: v.cpu() for k, v in task.evaluate(params).items()} if task is not None else None
    if achieved is None:
        print("note: no task given, so the generated networks are not evaluated "
              "(pass --task pkg.module:Class to evaluate them)", file=sys.stderr)

    if args.overwrite:
        remove_previous_results(out)
    records = _write_networks(out, gen, task, params, [target_values[i // args.num] for i in range(n)], args.num,
                              achieved, packed=(_prunable(gen, task), constraint["bits"] or 32)
                              if args.format == "packed" else None)
    for i, rec in enumerate(records):
        rec["bytes"] = (out / rec["file"]).stat().st_size
        if projection is not None:   # how far the generator's own last prediction was from the constraint
            rec["projection"] = {"distance": float(projection.distance[i]),
                                 "pruned_mass": float(projection.pruned_mass[i])}
    write_json_atomic(out / "results.json", {"metric": gen.metric, "guidance": guidance, "sampler": sampler,
                                             "steps": steps, "parts": parts, "part_guidance": part_guidance,
                                             "format": args.format, **constraint, "project_from": args.project_from,
                                             "ticket_epochs": args.ticket,
                                             "records": records})
    _print_table(gen.metric, records, args.num)
    print(f"\n{n} networks written to {out} (results.json lists them)")
    return 0


_GENERATED = re.compile(r"^(target\d+_\d+|sample_\d+)\.safetensors$")   # the names main() gives


def remove_previous_results(out: Path) -> list[Path]:
    """Remove what an earlier ``prompt`` wrote in ``out``: its results.json first (so no results.json ever lists
    files that are gone), then the .safetensors files it lists and those named like ours (``target00_000``,
    ``sample_000``). Listed names must be plain file names in ``out``; nothing else is touched. Returns the
    removed files."""
    listed: set[str] = set()
    try:
        records = json.loads((out / "results.json").read_text()).get("records", [])
        listed = {r["file"] for r in records if isinstance(r, dict) and isinstance(r.get("file"), str)}
    except (OSError, ValueError, AttributeError):   # no results.json, or not ours: only our names go
        pass
    names = {name for name in listed if Path(name).name == name and name.endswith(".safetensors")}
    names |= {p.name for p in out.iterdir() if _GENERATED.match(p.name)}
    removed = []
    for path in [out / "results.json"] + [out / name for name in sorted(names)]:
        if path.is_symlink() or path.is_file():   # a link goes, never what it points to
            path.unlink()
            removed.append(path)
    return removed


def _start(gen: Generator, task, start_arg: str, n: int, g: torch.Generator):
    """The ``n`` start networks [n, P] and their metric [n] for --start (none, random or a file)."""
    if start_arg == "none":
        return None, None
    if start_arg == "random":
        if task is None:
            raise UsageError("--start random needs the task's model: give --task pkg.module:Class, "
                             "or --start PATH to a .safetensors state_dict")
        start = task.init_params(n, generator=g)                                   # [n, P]
    else:
        try:
            vec = state_dict_to_vector(load_state_dict(start_arg), gen.layer_shapes)   # [P]
        except (KeyError, ValueError) as err:
            raise UsageError(f"--start {start_arg} does not hold the generator's network ({err}); give a state_dict "
                             f"with its {len(gen.layer_shapes)} entries {list(gen.layer_shapes)[:4]}...") from None
        start = vec.float().unsqueeze(0).expand(n, -1).clone()                     # [n, P]
    if task is not None:
        return start, task.evaluate(start)[gen.metric]
    print(f"note: no task to evaluate the start; its {gen.metric} is taken as the data's median "
          f"at init ({gen.init_metric:.4g})", file=sys.stderr)
    return start, torch.full((n,), gen.init_metric)


def _constraint(args, gen: Generator, parts: dict) -> dict:
    """--sparsity / --bits, checked; they also prompt the generator's own sparsity and bits parts (unless
    --part gives them)."""
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise UsageError(f"--sparsity must lie in [0, 1) (the fraction of Linear/Conv weights set to zero), got "
                         f"{args.sparsity}")
    if args.bits is not None and not 2 <= args.bits <= 8:
        raise UsageError(f"--bits must be 2 to 8 (leave it out for float weights), got {args.bits}")
    if args.ticket is not None and (args.ticket < 1 or args.sparsity is None):
        raise UsageError(f"--ticket EPOCHS needs EPOCHS >= 1 and --sparsity (the mask to train), got --ticket "
                         f"{args.ticket} and --sparsity {args.sparsity}")
    if not 0.0 <= args.project_from <= 1.0:
        raise UsageError(f"--project-from must lie in [0, 1] (a fraction of the sampler's steps), got {args.project_from}")
    known = {q.name for q in gen.parts}
    for name in ("sparsity", "bits"):
        value = getattr(args, name)
        if value is not None and name in known and name not in parts:
            parts[name] = float(value)
    return {"sparsity": args.sparsity, "bits": args.bits}


def _prunable(gen: Generator, task) -> list[str]:
    """The Linear/Conv weights of the task's network (without a task: every entry of two or more dims)."""
    if task is not None:
        return [k for k in prunable_names(task.build_model()) if k in gen.layer_shapes]
    return matrix_names(gen.layer_shapes)


def _write_networks(out: Path, gen: Generator, task, params: torch.Tensor, targets: list[Optional[float]],
                    num: int, achieved: Optional[dict], packed: Optional[tuple[list[str], int]] = None) -> list[dict]:
    """Each network [P] as a safetensors state_dict (atomically; ``packed``: (prunable names, bits) for the
    packed format) -> the records of results.json."""
    records = []
    for i, target in enumerate(targets):
        name = (f"target{i // num:02d}_{i % num:03d}.safetensors" if target is not None
                else f"sample_{i:03d}.safetensors")
        if task is not None:
            sd = task.to_state_dict(params[i])
        else:
            sd = {k: v[0] for k, v in gen.layer_shapes.split(params[i:i + 1]).items()}
        meta = {"target": target, "metric": gen.metric}
        if packed is not None:
            sd, packed_meta = pack(sd, *packed)
            meta.update(packed_meta)
        save_state_dict(out / name, sd, meta)
        rec = {"target": None if target is None else float(target), "file": name}
        if achieved is not None:
            rec["achieved"] = {k: float(v[i]) for k, v in achieved.items()}
        records.append(rec)
    return records


def _check_mode_arguments(gen: Generator, args) -> tuple[str, list[Optional[float]]]:
    """--start and --target against the generator's mode -> (start: "none" | "random" | PATH, targets).

    Start-free generators take no start (``--start`` defaults to none for them, a given one is refused);
    generators with a start default to random inits and refuse ``--start none``. Conditional generators
    need ``--target``; unconditional ones ignore it with a note (each value then only names a group of
    ``--num`` networks; without any, ``--num`` networks are made with target None)."""
    start = args.start
    if not gen.uses_start:
        if start not in (None, "none"):
            raise UsageError(f"this generator is start-free (trained with --model.start none): it takes no start "
                             f"checkpoint; drop --start {start} (or pass --start none)")
        start = "none"
    elif start == "none":
        raise UsageError("this generator was trained with start checkpoints (--model.start checkpoint): give "
                         "--start random (fresh inits, the default) or --start PATH to a .safetensors state_dict")
    else:
        start = start or "random"
    targets = list(args.target or [])
    if gen.conditional and not targets:
        raise UsageError(f"--target is required: this generator is conditioned on {gen.metric} "
                         "(e.g. --target 0.05; repeat for several)")
    if not gen.conditional:
        if targets:
            print(f"note: this generator is unconditional (trained with --model.condition none): --target "
                  f"{' '.join(map(str, targets))} is ignored; each value only names a group of --num networks",
                  file=sys.stderr)
        else:
            targets = [None]
    return start, targets


def _print_table(metric: str, records: list[dict], num: int) -> None:
    if "achieved" not in records[0]:
        return
    names = [metric] + [k for k in records[0]["achieved"] if k != metric and ("val" in k or "test" in k)]
    print(f"\n{'target':>10} | " + " | ".join(f"{k:>18}" for k in names))
    print("-" * (13 + 21 * len(names)))
    for i in range(0, len(records), num):
        group = records[i:i + num]
        cells = []
        for k in names:
            vals = torch.tensor([r["achieved"][k] for r in group])
            cells.append(f"{vals.mean():>9.4f} ± {vals.std(unbiased=False):<6.4f}")
        label = "-" if group[0]["target"] is None else f"{group[0]['target']:.4f}"
        print(f"{label:>10} | " + " | ".join(cells))
