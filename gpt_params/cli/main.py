"""`gpt-params`: build-dataset | train | prompt | evaluate.

``train`` is a LightningCLI (every trainer, model and data option on the command line or in YAML under
configs/); the other verbs are plain argparse programs. With no arguments at all, ``gpt-params train``
runs the embedded default: configs/digits_mlp.yaml (the store is built when missing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from gpt_params.training.data import ParameterDataModule
from gpt_params.training.module import GeneratorModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"   # a link to the repository's configs/, a folder in wheels
DEFAULT_CONFIG = CONFIG_DIR / "digits_mlp.yaml"
VERBS = ("build-dataset", "train", "prompt", "evaluate")


# ---------------------------------------------------------------------------------------------- train
class LastOnException(Callback):
    """On an exception (Ctrl-C included) save ``last.ckpt`` next to the run's other checkpoints, so that every
    run, however it stops, leaves a last.ckpt to resume from. (Not Lightning's OnExceptionCheckpoint: with one
    in the trainer, ``fit(ckpt_path=None)`` resumes from whatever ``last.ckpt`` it finds, and its teardown
    deletes the file at its path, ./last.ckpt before any exception.)"""

    def on_exception(self, trainer, pl_module, exception) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath:
            trainer.save_checkpoint(os.path.join(checkpoint.dirpath, "last.ckpt"))


class GeneratorCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        """bf16 autocast on GPUs that support it, unless --trainer.precision says otherwise."""
        trainer = self.config.trainer
        if (trainer.precision is None and str(trainer.accelerator) in ("auto", "gpu", "cuda")
                and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            trainer.precision = "bf16-mixed"

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.data_info", compute_fn=lambda data: data.info,
                              apply_on="instantiate")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="resume training from this checkpoint (e.g. a run's last.ckpt)")
        parser.add_argument("--final_eval_runs", type=int, default=32,
                            help="held-out runs for the prompt alignment printed at the end (0: skip)")


def train(argv: list[str]) -> int:
    """Train a generator; prints the checkpoint, the TensorBoard command and the prompt alignment."""
    parser_kwargs = {"default_config_files": [str(DEFAULT_CONFIG)]} if DEFAULT_CONFIG.exists() else {}
    parser_kwargs["description"] = "Train a gpt-params generator (LightningCLI; see configs/)."
    with warnings.catch_warnings():   # our argv comes from the dispatcher, not LightningCLI's sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = GeneratorCLI(
            GeneratorModule, ParameterDataModule, run=False, args=argv,
            parser_kwargs=parser_kwargs, save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [ModelCheckpoint(save_last=True), LastOnException()]},
        )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    ckpt_path = cli.config.get("ckpt_path")
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)   # a collective call: every rank makes it
    if not trainer.is_global_zero:
        return 0
    ckpt_dir = Path(trainer.checkpoint_callback.dirpath)
    last = ckpt_dir / "last.ckpt"
    if not last.exists():   # a stop between checkpoint events: save the state it ended in
        trainer.save_checkpoint(last)
    print(f"\nCheckpoint: {last}")
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    n_runs = cli.config.get("final_eval_runs", 32)
    if n_runs > 0 and data.task_name is not None:
        from checkpoints_dataset.tasks import get_task
        from gpt_params.evaluation import prompt_alignment
        from gpt_params.core.generator import Generator

        task = get_task(data.task_name, **data._task_kwargs())
        gen = Generator(model)
        t0 = time.perf_counter()
        result, fig = prompt_alignment(gen, task, data.store, runs=data.store.test_runs[:n_runs],
                                       sampler="ddim", steps=20)
        fig.savefig(log_dir / "alignment.png", dpi=100)
        print(f"Prompt alignment on {len(result['per_network'])} held-out runs ({gen.metric}): "
              f"R^2 median {result['median']:.3f}, mean {result['mean']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------- prompt
def _add_task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="where the task's data files are (Fashion-MNIST; default: as at training)")
    p.add_argument("--evaluator", choices=["batched", "gymnasium"], default=None,
                   help="cartpole: score policies with the batched torch CartPole (default) or gymnasium's")


def _prompt_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1.0: off; default: the generator's, set at training by "
                        "--model.guidance)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=None, help="task to build and evaluate the networks (default: the "
                   "checkpoint's); 'pkg.module:Class' for a store recorded by another project")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    _add_task_options(p)
    return p


def prompt(argv: list[str]) -> int:
    from gpt_params.core.generator import run_prompt
    args = _prompt_parser().parse_args(argv)
    return run_prompt(args)


# ------------------------------------------------------------------------------------------- evaluate
def _evaluate_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--store", default=None, help="checkpoint store (default: the checkpoint's)")
    p.add_argument("--task", default=None, help="task (default: the store's); 'pkg.module:Class' for others")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1.0: off; default: the generator's, set at training by "
                        "--model.guidance)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--tensorboard", default=None, help="also log the figures to this TensorBoard log dir")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    _add_task_options(p)
    return p


def _store_and_task(gen, args):
    """The store to evaluate on (--store, else the generator's) and its task, both checked against the
    generator's architecture."""
    from checkpoints_dataset.store import open_store

    store_root = args.store or gen.store_root
    if store_root is None or not Path(store_root).exists():
        raise SystemExit(f"the checkpoint's store {store_root} is not there; pass --store DIR")
    store = open_store(store_root)
    if dict(store.layer_shapes) != gen.layer_shapes:
        raise SystemExit(f"the store at {store_root} holds another architecture than the generator's; "
                         "pass the --store it was trained on")
    task = gen.make_task(args.task or store.task, data_dir=args.data_dir, evaluator=args.evaluator)
    if task is None:
        raise SystemExit("this store has no task (recorded by another project): pass --task pkg.module:Class")
    return store, task


def evaluate(argv: list[str]) -> int:
    from gpt_params.evaluation import evaluate_all
    from gpt_params.core.generator import Generator, _prepare_report_dir

    args = _evaluate_parser().parse_args(argv)
    if args.runs < 1 or args.steps < 1:
        raise SystemExit("--runs and --steps must be at least 1")
    if args.guidance is not None and args.guidance < 0:
        raise SystemExit(f"--guidance must be >= 0 (1.0: off; got {args.guidance})")
    if (args.ckpt is None) == (args.compare is None):
        raise SystemExit("give either --ckpt CKPT (one generator) or --compare NAME=CKPT ... (several)")
    if args.compare is not None:
        return _evaluate_compare(args)
    gen = Generator.load(args.ckpt, device=args.device)
    store, task = _store_and_task(gen, args)
    out = Path(args.out)
    _prepare_report_dir(out, args.overwrite)
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.tensorboard)
    report = evaluate_all(gen, out, task=task, store=store, runs=args.runs, sampler=args.sampler,
                          steps=args.steps, guidance=args.guidance, device=args.device, tb_logger=writer)
    if writer is not None:
        writer.close()
    for line in report.get("summary", []):
        print(line)
    print(f"\nReport: {out / 'report.json'}")
    return 0


def _evaluate_compare(args) -> int:
    """`gpt-params evaluate --compare NAME=CKPT ...`: one table over the modes (gpt_params.evaluation.modes)."""
    from gpt_params.evaluation.modes import compare_modes
    from gpt_params.core.generator import Generator, _prepare_out

    ckpts = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--compare takes NAME=CKPT pairs, got {item!r}")
        if name in ckpts:
            raise SystemExit(f"--compare names {name!r} twice; give each generator its own name")
        ckpts[name] = path
    out = Path(args.out)
    _prepare_out(out, args.overwrite, marker="modes.json")
    store, task = _store_and_task(Generator.load(next(iter(ckpts.values()))), args)
    report = compare_modes(ckpts, task, store, out, runs=args.runs, sampler=args.sampler,
                           steps=args.steps, guidance=args.guidance, device=args.device)
    print(report["markdown"])
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"\nTable: {out / 'modes.md'} (and modes.json)")
    return 0


# ---------------------------------------------------------------------------------------- dispatcher
def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``gpt-params`` console script and ``python -m gpt_params``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gpt-params {build-dataset,train,prompt,evaluate} [options]\n\n"
              "  build-dataset  train many small networks at once into a checkpoint store\n"
              "  train          train the generator (LightningCLI; default config: configs/digits_mlp.yaml)\n"
              "  prompt         generate networks for target metrics and evaluate them\n"
              "  evaluate       prompt alignment, one step, recursive, novelty, diversity, landscape\n\n"
              "`gpt-params VERB --help` explains each verb.")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"gpt-params: unknown command {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        if verb == "train":
            return train(rest)
        if verb == "prompt":
            return prompt(rest)
        if verb == "evaluate":
            return evaluate(rest)
        from checkpoints_dataset.__main__ import main as build_main
        return build_main(rest, prog="gpt-params build-dataset") or 0
    except SystemExit as exit_:                # argparse and our checks: a message means bad input
        if not isinstance(exit_.code, str):
            raise
        print(f"gpt-params {verb}: error: {exit_.code}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError) as err:   # bad input: one clear line, no traceback
        if os.environ.get("GPT_PARAMS_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gpt-params {verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
