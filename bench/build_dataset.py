"""Benchmark: building a checkpoint dataset vectorized vs one network at a time.

Vectorized: ``task.train_population`` trains all ``--runs`` runs at once (torch.func vmap), checkpoint
evaluation included. Loop: the same runs (same init, hyperparameters, batch order and checkpoint schedule)
trained one after another as a plain ``nn.Module`` with ``torch.optim`` and scored with the plain model at
each checkpoint; only the first ``--loop-runs`` runs are timed, to keep the benchmark short. Both report
model-steps per second (optimizer steps summed over runs; by default only the init and last
checkpoints are scored, see --checkpoints); the LAST line printed is the ratio, e.g. ``17.3x``.

    python bench/build_dataset.py [--task digits_mlp] [--runs 256] [--epochs 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from checkpoints_dataset import PopulationConfig, get_task
from checkpoints_dataset.population import checkpoint_schedule, draw_hparams


def plain_run(task, h: dict, config: PopulationConfig, device) -> int:
    """Train one run the ordinary way; returns the number of optimizer steps done."""
    gen = torch.Generator().manual_seed(h["seed"])
    model = task.build_model()
    model.load_state_dict(task.to_state_dict(task.init_params(1, gen, h["init_scheme"])[0]))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(h["init_scale"])
    model.to(device)
    opt = (torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=(h["momentum"], 0.999), weight_decay=h["weight_decay"])
           if h["optimizer"] == "adam" else
           torch.optim.SGD(model.parameters(), lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"]))
    x, y = (t.to(device) for t in task.split("train"))
    batch = min(config.batch_size, len(y))
    per_epoch = len(y) // batch
    total = per_epoch * config.epochs
    checkpoints = set(checkpoint_schedule(total, config.num_checkpoints))
    evals = {s: tuple(t.to(device) for t in task.eval_split(s)) for s in ("train", "val", "test")}
    for step in range(total + 1):
        if step in checkpoints:
            model.eval()
            with torch.no_grad():
                for xs, ys in evals.values():
                    logits = model(xs)
                    F.cross_entropy(logits, ys).item(), (logits.argmax(1) != ys).float().mean().item()
            model.train()
        if step == total:
            return total
        if step % per_epoch == 0:
            order = torch.randperm(len(y), generator=gen).to(device)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits_mlp")
    p.add_argument("--runs", type=int, default=256)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoints", type=int, default=2,
                   help="checkpoints per run, each scored on every split on both sides (default 2: init and last, "
                        "so the ratio measures training; scoring costs the same FLOPs either way)")
    p.add_argument("--loop-runs", type=int, default=6, help="runs timed on the loop side (half before, half after)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = get_task(args.task)
    config = PopulationConfig(runs=args.runs, epochs=args.epochs, group_size=args.runs, num_checkpoints=args.checkpoints)
    hparams = [draw_hparams(config, r) for r in range(args.runs)]

    task.train_population(hparams[:2], PopulationConfig(runs=2, epochs=1, num_checkpoints=2), device)  # warm-up
    plain_run(task, hparams[0], PopulationConfig(runs=1, epochs=1, num_checkpoints=2), device)

    def time_loop(runs):  # -> (steps, seconds)
        t0 = time.perf_counter()
        steps = sum(plain_run(task, h, config, device) for h in runs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps, time.perf_counter() - t0

    half = max(1, args.loop_runs // 2)  # loop runs timed before and after the vectorized build (load drift)
    before = time_loop(hparams[:half])
    t0 = time.perf_counter()
    result = task.train_population(hparams, config, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    vec_time = time.perf_counter() - t0
    vec_rate = args.runs * int(result.steps[-1]) / vec_time
    after = time_loop(hparams[half:args.loop_runs]) if args.loop_runs > half else (0, 0.0)
    loop_steps, loop_time = before[0] + after[0], before[1] + after[1]
    loop_rate = loop_steps / loop_time

    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={torch.get_num_threads()} threads, "
          f"device={device}, torch {torch.__version__}")
    print(f"task {task.name}: {args.runs} runs x {args.epochs} epochs = {int(result.steps[-1])} steps/run, "
          f"{len(result.steps)} checkpoints/run (evaluation included on both sides)")
    print(f"vectorized: {args.runs} runs in {vec_time:.1f} s = {vec_rate:,.0f} model-steps/s")
    print(f"loop      : {max(args.loop_runs, half)} runs in {loop_time:.1f} s = {loop_rate:,.0f} model-steps/s")
    print(f"{vec_rate / loop_rate:.1f}x")


if __name__ == "__main__":
    main()
