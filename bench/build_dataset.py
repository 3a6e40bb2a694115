"""Benchmark: building a checkpoint dataset vectorized vs one network at a time.

Vectorized: ``task.train_population`` trains all ``--runs`` runs at once (torch.func vmap), checkpoint
evaluation included. Loop: the same runs (same init, hyperparameters, batch order and checkpoint schedule)
trained one after another as a plain ``nn.Module`` with ``torch.optim`` and scored with the plain model at
each checkpoint; only the first ``--loop-runs`` runs are timed, to keep the benchmark short. Both report
model-steps per second (optimizer steps summed over runs; by default only the init and last
checkpoints are scored, see --checkpoints); ``--rounds`` rounds each time the loop side just before and just
after the vectorized build; each round prints its ratio, and the LAST line printed is their median
(``statistics.median``: the mean of the two middle rounds for an even count) alone, e.g. ``17.3x``.

    python bench/build_dataset.py [--task digits_mlp] [--runs 256] [--epochs 20] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from checkpoints_dataset import PopulationConfig, get_task
from checkpoints_dataset.optim import checkpoint_schedule
from checkpoints_dataset.population import draw_hparams


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
    p.add_argument("--loop-runs", type=int, default=8, help="runs timed on the loop side per round (half before, "
                   "half after the vectorized build)")
    p.add_argument("--rounds", type=int, default=3, help="measurement rounds; the last line is the median ratio")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads for both sides (default: torch's default, all cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = get_task(args.task)
    config = PopulationConfig(runs=args.runs, epochs=args.epochs, group_size=args.runs, num_checkpoints=args.checkpoints)
    hparams = [draw_hparams(config, r) for r in range(args.runs)]

    task.train_population(hparams[:2], PopulationConfig(runs=2, epochs=1, num_checkpoints=2), device)  # warm-up
    plain_run(task, hparams[0], PopulationConfig(runs=1, epochs=1, num_checkpoints=2), device)

    def timed(fn):  # -> seconds
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    print(f"machine: {platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
          f"device={device}, torch {torch.__version__}")
    print(f"task {task.name}: {args.runs} runs x {args.epochs} epochs, {args.checkpoints} checkpoints/run scored on "
          f"both sides; loop side: {args.loop_runs} of the same runs per round, half before and half after")
    half = max(1, args.loop_runs // 2)
    ratios = []
    for i in range(args.rounds):  # the loop side brackets the vectorized build: load drift hits both sides
        loop_runs = hparams[(i * args.loop_runs) % args.runs:][:args.loop_runs] or hparams[:args.loop_runs]
        before = timed(lambda: sum(plain_run(task, h, config, device) for h in loop_runs[:half]))
        result, vec_time = timed(lambda: task.train_population(hparams, config, device))
        after = timed(lambda: sum(plain_run(task, h, config, device) for h in loop_runs[half:]))
        vec_rate = args.runs * int(result.steps[-1]) / vec_time
        loop_rate = (before[0] + after[0]) / (before[1] + after[1])
        ratios.append(vec_rate / loop_rate)
        print(f"round {i + 1}: vectorized {args.runs} runs in {vec_time:.1f} s = {vec_rate:,.0f} model-steps/s; "
              f"loop {len(loop_runs)} runs in {before[1] + after[1]:.1f} s = {loop_rate:,.0f} model-steps/s; "
              f"{ratios[-1]:.1f}x")
    print(f"median of {len(ratios)} rounds ({', '.join(f'{r:.2f}x' for r in ratios)}):")
    print(f"{statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
