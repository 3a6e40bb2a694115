"""Design choices of the generator measured side by side at one training budget: token layout (neuron vs
G.pt's chunks), the global residual, and per-layer vs per-position projections.

Each variant trains through `gpt-params train` (the digits_mlp default config, overrides below) for the
same number of steps on the same store, then its prompt alignment is measured on the same held-out runs.
Usage: python bench/layouts.py --store data/digits_mlp --steps 400 [--runs 16] [--variants neuron chunk64 ...]
The last line prints the alignment of each variant relative to the default (neuron).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "neuron": [],
    "chunk64": ["--model.layout", "chunk", "--model.chunk_size", "64"],
    "chunk128": ["--model.layout", "chunk", "--model.chunk_size", "128"],
    "residual": ["--model.dit.residual", "true"],
    "position": ["--model.dit.projection", "position"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a digits_mlp store (built if missing)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--runs", type=int, default=16, help="held-out runs for the alignment")
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=["neuron", "chunk64", "residual"], choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--task", default=None, help="a store of your own task: its import path pkg.module:Class (also "
                   "give --extra --data.task pkg.module:Class); default: the store's built-in task")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more `gpt-params train` options for every variant (e.g. --model.dit.hidden_size 128)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from checkpoints_dataset import open_store
    from gpt_params.cli import main as cli
    from gpt_params.evaluation import prompt_alignment
    from gpt_params.core.generator import Generator

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            root = Path(tmp) / name
            t0 = time.perf_counter()
            cli(["train", "--data.root", args.store, "--trainer.default_root_dir", str(root),
                 "--trainer.max_steps", str(args.steps), "--trainer.max_time", "00:01:00:00",
                 "--final_eval_runs", "0", "--trainer.enable_progress_bar", "false", *args.extra,
                 *VARIANTS[name]])
            train_s = time.perf_counter() - t0
            gen = Generator.load(next(root.glob("lightning_logs/version_*/checkpoints/last.ckpt")))
            store = open_store(args.store)
            result, _ = prompt_alignment(gen, gen.make_task(args.task), store, runs=args.runs,
                                         sampler="ddim", steps=args.sampler_steps)
            rows[name] = {"median": float(result["median"]), "mean": float(result["mean"]), "train_s": train_s,
                          "params": sum(p.numel() for p in gen.model.parameters())}
            print(json.dumps({name: rows[name]}), flush=True)
    print(f"\n{'variant':>10} | {'R^2 median':>10} | {'R^2 mean':>9} | {'train s':>8} | params")
    for name, r in rows.items():
        print(f"{name:>10} | {r['median']:>10.3f} | {r['mean']:>9.3f} | {r['train_s']:>8.0f} | {r['params'] / 1e6:.2f}M")
    base = rows.get("neuron")
    if base:
        print("median R^2 vs neuron: " + ", ".join(f"{n} {r['median'] - base['median']:+.3f}" for n, r in rows.items()))


if __name__ == "__main__":
    main()
