"""Command line: ``python -m checkpoints_dataset build --task digits_mlp --runs 256 --epochs 20 --out DIR``.

``main(argv)`` also accepts the arguments without the leading ``build`` word, which is how
``gpt-params build-dataset ARGS`` delegates here (``main(ARGS)``).
"""

from __future__ import annotations

import argparse
import ast
import sys

import torch

from .population import PopulationConfig, build_population
from .store import StoreError
from .tasks import BUILTIN_TASKS, get_task


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need N >= 1 and 0 <= I < N (I counts from 0)")
    return i, n


def _task_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--task-option must look like NAME=VALUE (e.g. trainer=es), got {text!r}")
    try:
        return key, ast.literal_eval(value)  # numbers, lists, True/False
    except (ValueError, SyntaxError):
        return key, value  # a plain string


def build_parser(prog: str = "python -m checkpoints_dataset build") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Train many runs of a task at once and save their checkpoints "
                                            "into a store (resumable; shardable with --shard I/N).")
    p.add_argument("--task", default="digits_mlp",
                   help=f"built-in task ({', '.join(BUILTIN_TASKS)}) or 'pkg.module:TaskClass'")
    p.add_argument("--out", required=True, help="store directory (created; an existing build resumes)")
    p.add_argument("--runs", type=int, default=256, help="training runs, each with its own seed and "
                   "hyperparameters (default 256)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole build: the same seed gives the same "
                   "runs, interrupted or not (default 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="build part I of N (groups g with g %% N == I)")
    p.add_argument("--workers", type=int, default=1, help="processes building at once, the torch threads split "
                   "between them (a small network trains faster on one thread per process; default 1)")
    p.add_argument("--group-size", type=int, default=PopulationConfig.group_size, help="runs trained together")
    p.add_argument("--checkpoints", type=int, default=PopulationConfig.num_checkpoints, help="per run")
    p.add_argument("--batch-size", type=int, default=PopulationConfig.batch_size)
    p.add_argument("--optimizers", default="adam,sgd", help="comma-separated subset of adam,sgd")
    p.add_argument("--sparsity", default="0", metavar="S[,S...]",
                   help="compressed runs: comma-separated final sparsities each run draws one of (e.g. 0,0.8,0.9); "
                        "pruned gradually by weight magnitude after a dense start (default 0: dense runs)")
    p.add_argument("--bits", default="32", metavar="B[,B...]",
                   help="compressed runs: comma-separated bit widths each run draws one of (e.g. 32,4,2; 32 = "
                        "float), trained quantization-aware after the dense start (default 32)")
    p.add_argument("--compress-start", type=float, default=PopulationConfig.compress_start,
                   help="fraction of a run's steps trained dense before pruning and quantization start (default "
                        f"{PopulationConfig.compress_start})")
    p.add_argument("--compress-end", type=float, default=PopulationConfig.compress_end,
                   help="fraction of a run's steps at which pruning reaches the run's sparsity (default "
                        f"{PopulationConfig.compress_end})")
    p.add_argument("--runs-per-init", type=int, default=1, metavar="K",
                   help="runs that share one init (default 1): runs k*K ... k*K+K-1 start from the same init and "
                        "differ in data order and hyperparameters; held-out runs are whole init groups")
    p.add_argument("--data-dir", default=None, help="data directory of the task (Fashion-MNIST IDX files)")
    p.add_argument("--task-option", type=_task_option, action="append", default=[], metavar="NAME=VALUE",
                   help="a keyword option of the task, repeatable; values are Python literals or plain strings "
                        "(e.g. --task-option trainer=es --task-option 'es_lr=(0.01, 0.05)' for cartpole)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage dtype of the parameters (float16 halves disk and memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        argv = argv[1:]
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    kwargs = dict(args.task_option)
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    try:
        task = get_task(args.task, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    except TypeError as e:
        parser.error(f"task {args.task!r} does not take these options ({e})")
    try:
        sparsity = tuple(float(v) for v in args.sparsity.split(","))
        bits = tuple(int(v) for v in args.bits.split(","))
    except ValueError:
        parser.error(f"--sparsity takes numbers and --bits integers, comma-separated (e.g. --sparsity 0,0.8 "
                     f"--bits 32,4), got {args.sparsity!r} and {args.bits!r}")
    try:
        config = PopulationConfig(runs=args.runs, epochs=args.epochs, seed=args.seed, group_size=args.group_size,
                                  num_checkpoints=args.checkpoints, batch_size=args.batch_size,
                                  optimizers=tuple(o.strip() for o in args.optimizers.split(",")),
                                  sparsity=sparsity, bits=bits, compress_start=args.compress_start,
                                  compress_end=args.compress_end, runs_per_init=args.runs_per_init)
    except ValueError as e:
        parser.error(str(e))

    try:
        store = build_population(task, args.out, config, device=args.device, shard=args.shard,
                                 progress=not args.no_progress, dtype=args.dtype,
                                 workers=args.workers)
    except (StoreError, ValueError) as e:
        parser.error(str(e))
    if store is None:
        print(f"shard {args.shard[0]}/{args.shard[1]} done; the store is finalized when every shard is built")
    else:
        print(f"{args.out}: {store.num_runs} runs, {store.num_checkpoints} checkpoints, "
              f"{task.num_params} params each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
