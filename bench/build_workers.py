"""Benchmark: building a store with one process against several (``build_population(..., workers=N)``).

Each round builds the same store twice into fresh directories, alternating which goes first: once with one
process on all ``--threads`` threads, once with ``--workers`` processes that split them. Prints each round,
the medians and the ratio, and checks that the two stores hold the same parameters.

    python bench/build_workers.py --task digits_mlp --runs 512 --epochs 20 --rounds 3
    python bench/build_workers.py --task fashion_cnn --runs 16 --epochs 1 --group-size 4 --checkpoints 16 --rounds 2
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from checkpoints_dataset import PopulationConfig, get_task
from checkpoints_dataset.population import build_population


def timed_build(task, out: Path, config: PopulationConfig, workers: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    store = build_population(task, out, config, progress=False, workers=workers)
    seconds = time.perf_counter() - start
    order = np.lexsort((store.steps, store.run_ids))
    return seconds, np.asarray(store.params(order))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits_mlp")
    p.add_argument("--runs", type=int, default=512)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--group-size", type=int, default=PopulationConfig.group_size)
    p.add_argument("--checkpoints", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="processes of the multi-process build")
    p.add_argument("--threads", type=int, default=None, help="torch threads in all (default: torch's)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    config = PopulationConfig(runs=args.runs, epochs=args.epochs, group_size=args.group_size,
                              num_checkpoints=args.checkpoints)
    print(f"{args.task}: {args.runs} runs x {args.epochs} epochs, groups of {args.group_size}, "
          f"{torch.get_num_threads()} threads: 1 process vs {args.workers}")
    times: dict[int, list[float]] = {1: [], args.workers: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = (1, args.workers) if r % 2 == 0 else (args.workers, 1)
            params = {}
            for workers in order:
                out = Path(tmp) / f"r{r}_w{workers}"
                seconds, params[workers] = timed_build(task, out, config, workers)
                times[workers].append(seconds)
                shutil.rmtree(out)
            same = np.array_equal(params[1], params[args.workers])
            print(f"round {r}: 1 process {times[1][-1]:.1f} s, {args.workers} processes "
                  f"{times[args.workers][-1]:.1f} s, same store: {same}", flush=True)
            if not same:
                raise SystemExit("the two builds made different stores")
    one, many = statistics.median(times[1]), statistics.median(times[args.workers])
    print(f"median over {args.rounds} rounds: 1 process {one:.1f} s, {args.workers} processes {many:.1f} s: "
          f"{one / many:.2f}x")


if __name__ == "__main__":
    main()
