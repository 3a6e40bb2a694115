"""``gpt-params denoise``: watch networks emerge from noise, step by step (issue 18).

Writes into ``--out``: ``denoise.gif`` (one frame per sampler step, the samples side by side, captioned with
the step and the metric of the predicted networks), ``denoise.png`` (rows: samples; columns: log-spaced
steps, the final network and, for tasks that know one, the nearest training item with its score),
``trajectory.json`` (the metric of every step's prediction), and the generated networks with
``results.json`` as ``gpt-params prompt`` writes them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoints_dataset.fileio import savefig_atomic, write_bytes_atomic, write_json_atomic
from gpt_params.cli.common import (UsageError, add_part_options, add_sampling_options, add_task_options,
                                   check_sampling, parse_parts, prepare_out)
from gpt_params.cli.prompt import _check_mode_arguments, _print_table, _start, _write_networks, remove_previous_results
from gpt_params.core.generator import Generator
from gpt_params.evaluation.denoise import gif_bytes, log_spaced, render_networks, side_by_side, strip_figure, trajectory


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpt-params denoise",
        description="Generate networks and show every sampler step's prediction: an animated denoise.gif, a "
                    "denoise.png strip of log-spaced steps with the nearest training item, trajectory.json "
                    "(the metric at every step), and the networks with results.json as `prompt` writes them.")
    p.add_argument("--ckpt", required=True, help="generator checkpoint (.ckpt from gpt-params train)")
    p.add_argument("--target", type=float, action="append", default=None,
                   help="target value of the conditioning metric (one; required unless the generator is "
                        "unconditional)")
    p.add_argument("--num", type=int, default=8, help="networks, side by side (default 8)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--start", default=None, help="as for `gpt-params prompt` (default: random, or none for "
                                                 "start-free generators)")
    add_part_options(p)
    add_sampling_options(p, steps=50)
    p.add_argument("--size", type=int, default=56, help="pixels per network drawing (default 56)")
    p.add_argument("--columns", type=int, default=6, help="log-spaced steps shown in denoise.png (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    add_task_options(p, "the checkpoint's")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    for name in ("num", "size", "columns"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    check_sampling(args)
    gen = Generator.load(args.ckpt, device=args.device)
    guidance = gen.guidance if args.guidance is None else args.guidance
    sampler = gen.sampler if args.sampler is None else args.sampler
    task = gen.make_task(args.task, data_dir=args.data_dir, evaluator=args.evaluator)
    start_arg, targets = _check_mode_arguments(gen, args)
    parts = parse_parts(args.parts, "--label", gen.parts)
    part_guidance = parse_parts(args.part_guidance, "--part-guidance", gen.parts)
    if len(targets) != 1:
        raise UsageError(f"denoise shows one prompt at a time: give one --target (got {len(targets)})")
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    if gen.conditional:
        for w in gen.check_target(targets, task.metric_bounds.get(gen.metric) if task is not None else None):
            print(f"warning: {w}", file=sys.stderr)

    g = torch.Generator().manual_seed(args.seed)
    start, start_metric = _start(gen, task, start_arg, args.num, g)
    target = torch.full((args.num,), 0.0 if targets[0] is None else float(targets[0]))
    traj = trajectory(gen, task, start, start_metric, target, sampler=sampler, steps=args.steps,
                      guidance=guidance, generator=g, parts=parts, part_guidance=part_guidance)
    s, n, p = traj.steps.shape
    rendered = render_networks(task, gen.layer_shapes, traj.steps.reshape(s * n, p), args.size)
    rendered = rendered.view(s, n, args.size, args.size, 3)                     # [S, N, H, W, 3]
    captions = [f"step {i + 1}/{s}  t={t}  {gen.metric} {np.nanmean(traj.values[i]):.3g}"
                for i, t in enumerate(traj.timesteps)]
    nearest = task.nearest(traj.params, args.size) if task is not None and hasattr(task, "nearest") else None

    if args.overwrite:
        remove_previous_results(out)
    achieved = {k: v.cpu() for k, v in task.evaluate(traj.params).items()} if task is not None else None
    records = _write_networks(out, gen, task, traj.params, targets * n, n, achieved)
    write_json_atomic(out / "trajectory.json", {
        "metric": gen.metric, "target": targets[0], "parts": parts, "part_guidance": part_guidance, "sampler": sampler, "steps": s, "guidance": guidance,
        "timesteps": traj.timesteps, "values": traj.values.tolist(),
        "mean": [float(np.nanmean(v)) if np.isfinite(v).any() else None for v in traj.values]})
    write_bytes_atomic(out / "denoise.gif", gif_bytes(np.stack([side_by_side(r) for r in rendered]), captions))
    savefig_atomic(strip_figure(rendered, traj, log_spaced(s, args.columns), nearest), out / "denoise.png", dpi=100)
    write_json_atomic(out / "results.json", {"metric": gen.metric, "guidance": guidance, "sampler": sampler,
                                             "steps": s, "parts": parts, "part_guidance": part_guidance,
                                             "records": records})
    _print_table(gen.metric, records, n)
    print(f"\n{n} networks, {s} steps: {out / 'denoise.gif'}, {out / 'denoise.png'}, trajectory.json, results.json")
    return 0
