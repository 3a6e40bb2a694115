"""Benchmark: few-step samplers vs G.pt's 1000-step DDPM on one trained generator.

For each sampler setting (1000-step DDPM, 50- and 10-step DDIM and DPM-Solver++) it measures the network
evaluations (NFE: denoiser forward passes per network), the wall time and the prompt alignment reached
(``gpt_params.evaluation.prompt_alignment`` on the first ``--runs`` held-out runs, ``--prompts`` targets
each, fp32). The best few-step setting is the one with the fewest steps whose median alignment is within
``--tolerance`` of DDPM's (else the best-aligned few-step one). At that setting it then measures networks
generated AND evaluated per second from fresh random inits (``task.evaluate``: every split and metric),
fp32 and, on CUDA, under bf16 autocast (goal on one GPU: >= 10,000 digits networks/s).

Without ``--ckpt`` a small generator is trained first with the very code path of ``gpt-params train``
(``gpt_params.cli.main``, the dispatcher) on a small store in a temporary directory. The LAST two lines are
"evaluations ratio" (DDPM NFE / best few-step NFE) and "alignment difference" (best few-step median
alignment - DDPM's).

    python bench/sampling.py                                   # CPU: trains a small generator, 4 runs
    python bench/sampling.py --device cuda --ckpt runs/.../last.ckpt --runs 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from checkpoints_dataset import open_store
from gpt_params.cli import main as cli_main
from gpt_params.evaluation import prompt_alignment
from gpt_params.core.generator import Generator
from train_throughput import bench_store, sync

SETTINGS = [("ddpm", 1000), ("ddim", 50), ("dpm++", 50), ("ddim", 10), ("dpm++", 10)]
EMA_CONFIG = """trainer:
  callbacks:
    - class_path: gpt_params.training.callbacks.GeneratorEMA
      init_args: {decay: 0.995, start_fraction: null, update_starting_at_step: %d}
"""


def train_small(steps: int, workdir: Path) -> Path:
    """A small generator trained by ``gpt-params train`` itself (EMA from a third of the run)."""
    store = bench_store(None, runs=64, epochs=6)
    config = workdir / "ema.yaml"
    config.write_text(EMA_CONFIG % (steps // 3))
    argv = ["train", "--config", str(config), "--data.root", str(store), "--trainer.default_root_dir",
            str(workdir / "run"), "--trainer.max_steps", str(steps), "--data.batch_size", "32",
            "--model.dit.hidden_size", "128", "--model.dit.depth", "2", "--model.dit.num_heads", "4",
            "--model.optim.warmup_steps", "50", "--model.optim.lr", "1e-3", "--final_eval_runs", "0",
            "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "50",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns about this script's own arguments
    try:
        code = cli_main(argv)
    finally:
        sys.argv = saved
    if code != 0:
        raise SystemExit("training the small generator failed")
    return next((workdir / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))


def throughput(gen: Generator, task, sampler: str, steps: int, n: int, precision: str, repeats: int = 2) -> float:
    """Networks generated from fresh inits and evaluated (all metrics) per second, best of ``repeats``."""
    device = gen.device
    start = task.init_params(n, torch.Generator().manual_seed(1)).to(device)  # [n, P]
    start_metric = task.evaluate(start, device=device)[gen.metric]  # [n]
    lo, hi = gen.data_range
    target = torch.linspace(lo, hi, n, device=device)  # [n]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    best = 0.0
    for _ in range(repeats + 1):  # the first round warms up
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            params = gen.generate(start, start_metric, target, sampler=sampler, steps=steps, batch_size=n)
        metrics = task.evaluate(params.float(), device=device)
        sync(device)
        assert torch.isfinite(metrics[gen.metric]).all()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a generator checkpoint (default: train a small one here)")
    p.add_argument("--task", default=None, help="the task of a --ckpt trained on your own task (pkg.module:Class; "
                   "a path saved in the checkpoint is imported only when given here); default: its built-in task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=None, help="held-out runs prompted (CPU: 4, CUDA: 32)")
    p.add_argument("--prompts", type=int, default=None, help="targets per run (CPU: 5, CUDA: 20)")
    p.add_argument("--train-steps", type=int, default=300, help="steps of the in-script generator")
    p.add_argument("--networks", type=int, default=None, help="networks per throughput batch (CPU: 256, CUDA: 32768)")
    p.add_argument("--tolerance", type=float, default=0.02, help="alignment a few-step setting may lose to DDPM")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    runs, prompts = args.runs or (32 if cuda else 4), args.prompts or (20 if cuda else 5)
    networks = args.networks or (32768 if cuda else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_sampling_") as tmp:
        t0 = time.perf_counter()
        ckpt = Path(args.ckpt) if args.ckpt else train_small(args.train_steps, Path(tmp))
        if not args.ckpt:
            print(f"trained a small generator with `gpt-params train` in {time.perf_counter() - t0:.0f} s")
        gen = Generator.load(ckpt, device=device)
        store = open_store(gen.store_root)
        task = gen.make_task(args.task)
        n_params = sum(p.numel() for p in gen.model.parameters())
        print(f"generator {ckpt.name}: {n_params / 1e6:.2f}M params, task {task.name}, metric {gen.metric}, "
              f"device {device}; {runs} held-out runs x {prompts} prompts")
        rows = []
        for sampler, steps in SETTINGS:
            sync(device)
            t0 = time.perf_counter()
            result, fig = prompt_alignment(gen, task, store, runs=runs, num_prompts=prompts, sampler=sampler,
                                           steps=steps, device=device)
            sync(device)
            fig.clf()
            rows.append(dict(sampler=sampler, steps=steps, nfe=steps, seconds=time.perf_counter() - t0,
                             median=result["median"], mean=result["mean"]))
            r = rows[-1]
            print(f"{sampler:>6} {steps:>5} steps: NFE {r['nfe']:>5}, {r['seconds']:7.2f} s, "
                  f"alignment R^2 median {r['median']:.3f} mean {r['mean']:.3f}", flush=True)
        ddpm, few = rows[0], rows[1:]
        good = [r for r in few if r["median"] >= ddpm["median"] - args.tolerance]
        best = min(good, key=lambda r: (r["nfe"], -r["median"])) if good else max(few, key=lambda r: r["median"])
        print(f"best few-step setting: {best['sampler']} {best['steps']} steps "
              f"({'within' if good else 'NOT within'} {args.tolerance} of DDPM's median alignment)")
        for precision in (["fp32", "bf16"] if cuda else ["fp32"]):
            rate = throughput(gen, task, best["sampler"], best["steps"], networks, precision)
            print(f"{precision}: {rate:,.0f} networks generated + evaluated per second "
                  f"({best['sampler']} {best['steps']} steps, batch {networks})", flush=True)
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                result, _ = prompt_alignment(gen, task, store, runs=runs, num_prompts=prompts,
                                             sampler=best["sampler"], steps=best["steps"], device=device)
            print(f"bf16 alignment at that setting: median {result['median']:.3f}")
        print(f"wall time ratio DDPM / best: {ddpm['seconds'] / best['seconds']:.1f}x")
        print(f"evaluations ratio: {ddpm['nfe'] / best['nfe']:.0f}x")
        print(f"alignment difference: {best['median'] - ddpm['median']:+.3f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
