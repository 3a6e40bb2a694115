"""``gpt-params evaluate``: the evaluation suite on one generator, or a table comparing several."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from checkpoints_dataset.store import open_store
from checkpoints_dataset.tasks import TaskRef
from gpt_params.cli.common import UsageError, add_sampling_options, add_task_options, check_sampling, prepare_out
from gpt_params.core.generator import Generator
from gpt_params.evaluation import compare_modes, evaluate_all
from gpt_params.evaluation.suite import SECTIONS, check_sections


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpt-params evaluate",
        description="Evaluate a generator: prompt alignment, one step vs Adam/SGD, recursive prompting, "
                    "symmetry-aware novelty, diversity and the loss landscape. Writes DIR/report.json and "
                    "one PNG per section. With --compare NAME=CKPT ..., compares generators of several modes "
                    "(alignment, one step, novelty, diversity) in one table: DIR/modes.md and DIR/modes.json.")
    p.add_argument("--ckpt", default=None, help="generator checkpoint (.ckpt from gpt-params train)")
    p.add_argument("--compare", nargs="+", default=None, metavar="NAME=CKPT",
                   help="compare these generators (e.g. params=a.ckpt pdiff=b.ckpt) instead of one --ckpt")
    p.add_argument("--out", required=True, help="output directory for report.json and the plots")
    p.add_argument("--runs", type=int, default=32, help="held-out runs to prompt from (capped, with a note)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="which held-out runs: the store's test runs (default; report figures on them) or the "
                        "validation runs the generator's training set aside (choose settings on them); "
                        "report.json lists the run ids used")
    p.add_argument("--store", default=None, help="checkpoint store (default: the checkpoint's)")
    p.add_argument("--sections", default=None, metavar="NAME[,NAME...]",
                   help=f"only these sections, comma-separated (default: all of {', '.join(SECTIONS)}; those that do "
                        "not apply to the task skip themselves with a note)")
    p.add_argument("--options", default=None, metavar="JSON",
                   help="keyword arguments of single sections as JSON, e.g. '{\"one_step\": {\"max_steps\": 500}}' "
                        "or '{\"compression\": {\"targets\": [[0.9, 4]]}}'")
    add_sampling_options(p)
    p.add_argument("--tensorboard", default=None, help="also log the figures to this TensorBoard log dir")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    add_task_options(p, "the checkpoint's, else the store's")
    return p


def store_and_task(gen: Generator, args):
    """The store to evaluate on (--store, else the generator's) and its task (--task, else the generator's,
    else the store's), both checked against the generator's architecture. A task name read from the
    checkpoint or the store is imported only when --task gives the same path."""
    store_root = args.store or gen.store_root
    if store_root is None:
        raise UsageError("the checkpoint names no store: pass --store DIR")
    if not Path(store_root).exists():
        raise UsageError(f"the store {store_root} is not there; pass --store DIR")
    store = open_store(store_root, verify="full")
    if not store.layer_shapes.same_layout(gen.layer_shapes):
        raise UsageError(f"the store at {store_root} holds another architecture than the generator's; "
                         "pass the --store it was trained on")
    options = dict(data_dir=args.data_dir, evaluator=args.evaluator)
    if args.task is not None or gen.task_name is not None:
        task = gen.make_task(args.task, **options)
    elif store.task is not None:
        built = (store.manifest.get("build_config") or {}).get("task_options", {})
        ref = TaskRef.from_file(store.task, built, option="--task", source=f"the store at {store_root}")
        task = ref.with_options(**options).check_shapes(gen.layer_shapes, "the generator's")
    else:
        raise UsageError("this store has no task (recorded by another project): pass --task pkg.module:Class")
    return store, task


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.runs < 1:
        raise UsageError(f"--runs must be at least 1 (got {args.runs})")
    check_sampling(args)
    if (args.ckpt is None) == (args.compare is None):
        raise UsageError("give either --ckpt CKPT (one generator) or --compare NAME=CKPT ... (several)")
    if args.compare is not None:
        return _compare(args)
    sections, options = _sections(args)
    gen = Generator.load(args.ckpt, device=args.device)
    store, task = store_and_task(gen, args)
    out = Path(args.out)
    prepare_out(out, args.overwrite, marker="report.json")
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter   # optional: only with --tensorboard
        writer = SummaryWriter(args.tensorboard)
    report = evaluate_all(gen, out, task=task, store=store, runs=_runs(gen, args), sampler=args.sampler,
                          steps=args.steps, guidance=args.guidance, device=args.device, tb_logger=writer,
                          sections=sections, options=options)
    if writer is not None:
        writer.close()
    for line in report.get("summary", []):
        print(line)
    print(f"\nReport: {out / 'report.json'}")
    return 0


def _sections(args) -> tuple[tuple[str, ...], dict]:
    """--sections and --options, checked."""
    sections = SECTIONS if args.sections is None else tuple(s.strip() for s in args.sections.split(",") if s.strip())
    try:
        options = {} if args.options is None else json.loads(args.options)
    except json.JSONDecodeError as err:
        raise UsageError(f"--options must be a JSON object of section -> keyword arguments ({err})") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise UsageError("--options must be a JSON object of section -> keyword arguments, e.g. "
                         "'{\"one_step\": {\"max_steps\": 500}}'")
    try:
        check_sections([*sections, *options])
    except ValueError as err:
        raise UsageError(f"--sections/--options: {err}") from None
    return sections, options


def _runs(gen: Generator, args) -> int | list[int]:
    """--runs of --split: a count of the store's test runs, or the first validation runs of the generator."""
    if args.split == "test":
        return args.runs
    if not gen.info.val_runs:
        raise UsageError("this checkpoint does not record its validation runs (written before they were): use "
                         "--split test, or retrain it")
    return list(gen.info.val_runs[:args.runs])


def _compare(args) -> int:
    """`gpt-params evaluate --compare NAME=CKPT ...`: one table over the modes."""
    ckpts = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--compare takes NAME=CKPT pairs, got {item!r}")
        if name in ckpts:
            raise UsageError(f"--compare names {name!r} twice; give each generator its own name")
        ckpts[name] = path
    out = Path(args.out)
    prepare_out(out, args.overwrite, marker="modes.json")
    first = Generator.load(next(iter(ckpts.values())))
    store, task = store_and_task(first, args)
    report = compare_modes(ckpts, task, store, out, runs=_runs(first, args), sampler=args.sampler,
                           steps=args.steps, guidance=args.guidance, device=args.device)
    print(report["markdown"])
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\nTable: {out / 'modes.md'} (and modes.json)")
    return 0
