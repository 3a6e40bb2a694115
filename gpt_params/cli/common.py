"""Shared by the verbs: output directories, task options, and the error that means "bad input"."""
from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import torch

from checkpoints_dataset.fileio import remove_stale_temps


class UsageError(ValueError):
    """Bad command-line input: the dispatcher prints its message as one line and exits with 2."""


def prepare_out(out: Path, overwrite: bool, marker: str = "results.json") -> None:
    """Refuse an --out that is a file, already holds results (unless overwrite) or is not writable; remove the
    temporary files that interrupted writes left there (``.<name>.<hex>.tmp``, nothing else)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and ((out / marker).exists() or any(out.glob("*.safetensors"))) and not overwrite:
        raise UsageError(f"--out {out} already holds results; pass --overwrite to replace them "
                         "or choose another directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{uuid.uuid4().hex}.tmp"   # our temporary pattern: a kill leaves nothing for good
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out} is not writable ({err.strerror}); choose a directory you can write") from None
    remove_stale_temps(out)


def add_sampling_options(p: argparse.ArgumentParser, steps: int | None = None) -> None:
    """--sampler, --steps (default ``steps``; None: the generator's), --guidance and --device."""
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default=None,
                   help="sampler (default: the generator's, set at training by --model.sampler; dpm++ unless "
                        "the checkpoint predates it, then ddim)")
    p.add_argument("--steps", type=int, default=steps,
                   help=f"sampler steps, one denoiser call each (default {steps})" if steps is not None else
                   "sampler steps, one denoiser call each (default: the generator's, set at training by "
                   "--model.sampler_steps; 3 unless the checkpoint predates it, then 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1.0: off; default: the generator's, set at training by "
                        "--model.guidance)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_task_options(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--task", default=None,
                   help=f"task that builds and scores the networks (default: {default_help}, when built in); "
                        "'pkg.module:Class' imports that task: a checkpoint or store naming one is only opened "
                        "when you give the same path here")
    p.add_argument("--data-dir", default=None,
                   help="where the task's data files are (Fashion-MNIST; default: as at training)")
    p.add_argument("--evaluator", choices=["batched", "gymnasium"], default=None,
                   help="cartpole: score policies with the batched torch CartPole (default) or gymnasium's")


def check_device(name: str) -> None:
    """Refuse a --device torch does not know, or a CUDA device on a machine without one."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")


def check_sampling(args) -> None:
    check_device(args.device)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {args.steps})")
    if args.guidance is not None and args.guidance < 0:
        raise UsageError(f"--guidance must be >= 0 (1.0: off; got {args.guidance})")


def add_part_options(p: argparse.ArgumentParser) -> None:
    """--label/--part NAME=VALUE and --part-guidance NAME=SCALE: the condition parts besides the target."""
    p.add_argument("--label", "--part", dest="parts", action="append", default=None, metavar="NAME=VALUE",
                   help="a condition part besides --target, e.g. --label label=7 (a class index) or --part "
                        "sparsity=0.9; repeat for several; parts not given are left out (their null embedding)")
    p.add_argument("--part-guidance", dest="part_guidance", action="append", default=None, metavar="NAME=SCALE",
                   help="classifier-free guidance on one part alone (1.0: off), e.g. --part-guidance label=2")


def parse_parts(items: list[str] | None, option: str, parts: list) -> dict[str, float]:
    """``["NAME=VALUE", ...]`` -> ``{NAME: float}``, names checked against the generator's ``parts``."""
    out: dict[str, float] = {}
    known = [q.name for q in parts]
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{option} {item!r}: write NAME=VALUE, e.g. {option} label=3")
        if name not in known:
            raise UsageError(f"{option} {name}: this generator is conditioned on "
                             f"{known or 'no parts'} besides its target (train with --data.parts '[{name}]')")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"{option} {item!r}: {value!r} is not a number") from None
    return out
