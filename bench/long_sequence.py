"""Benchmark: the DiT's time and memory against the number of tokens (issue 17, long sequences).

A ``ParameterDiT`` (the CPU default of the configs: width 128, 4 heads, 2 blocks unless ``--depth``) over T
synthetic tokens of width ``--token-dim`` (8 layer ids), batch ``--batch``: one training step
(``Diffusion.training_loss`` + backward + AdamW) and one denoiser call without gradients (a sampler step).
Each T runs in a fresh process, so that each has its own peak memory (VmHWM minus the resident size after
``import torch``; CUDA: max allocated). Attention is timm's, i.e. ``scaled_dot_product_attention``, whose
CPU kernel is a flash-style one that never holds the ``[T, T]`` matrix; the table says how time grows
with T, and the ratio of each step to the previous T's (4x tokens: 4x for the per-token work, 16x for
attention). ``--attention both`` (the default) measures full attention and window attention
(``--window`` tokens per window plus one summary per window; ``gpt_params/core/window.py``) side by side and
prints full / window.

    python bench/long_sequence.py --threads 1                     # T = 1024, 4096, 16384, full and window
    python bench/long_sequence.py --tokens 1024 4096 --rounds 5 --attention full
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpt_params.core.diffusion import Diffusion
from gpt_params.core.dit import ParameterDiT


def resident_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    baseline = resident_mb("VmRSS")
    T, C, N = args.one, args.token_dim, args.batch
    ids = torch.arange(T) * 8 // T                                                   # [T] 8 layer ids
    model = ParameterDiT(T, C, token_layer_ids=ids, hidden_size=args.width, depth=args.depth,
                         num_heads=args.heads, attention=args.attention, window=args.window).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = Diffusion()
    g = torch.Generator().manual_seed(0)
    start, target = (torch.randn(N, T, C, generator=g).to(device) for _ in range(2))  # [N, T, C]
    metric = torch.rand(N, generator=g).to(device)                                   # [N]

    def seconds(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def train_step() -> None:
        diffusion.training_loss(model, start, target, metric, metric).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def denoiser_call() -> None:
        model(target, torch.full((N,), 500, device=device), start, metric, metric)

    train = [seconds(train_step) for _ in range(args.rounds)]
    call = [seconds(denoiser_call) for _ in range(args.rounds)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else resident_mb("VmHWM") - baseline
    return dict(tokens=T, train_s=train, call_s=call, peak_mb=peak, threads=torch.get_num_threads(),
                dit_params=sum(p.numel() for p in model.parameters()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="sequence lengths T")
    p.add_argument("--token-dim", type=int, default=64, help="C, values per token (default 64)")
    p.add_argument("--batch", type=int, default=2, help="N (default 2)")
    p.add_argument("--width", type=int, default=128, help="D (default 128, the configs' CPU width)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="steps per T; the table gives medians (default 3)")
    p.add_argument("--attention", choices=["full", "window", "both"], default="both",
                   help="full attention, window attention, or both side by side (default)")
    p.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # the child process: one T
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(measure(args)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = ["full", "window"] if args.attention == "both" else [args.attention]
    print(f"DiT width {args.width}, {args.heads} heads, {args.depth} blocks; batch {args.batch}, token width "
          f"{args.token_dim}; window {args.window}; device {args.device}; medians of {args.rounds} rounds")
    print(f"{'tokens':>7} {'attention':>9} {'train step s':>13} {'denoiser call s':>16} {'peak MB':>9} "
          f"{'step / previous T':>18}")
    previous: dict[str, float] = {}
    for T in args.tokens:
        steps = {}
        for kind in kinds:
            done = subprocess.run([sys.executable, __file__, *argv, "--attention", kind, "--one", str(T)],
                                  capture_output=True, text=True)
            if done.returncode:
                err = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
                print(f"{T:>7} {kind:>9} failed: {err}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            step = steps[kind] = statistics.median(r["train_s"])
            ratio = f"{step / previous[kind]:.1f}x" if kind in previous else "-"
            print(f"{T:>7} {kind:>9} {step:>13.2f} {statistics.median(r['call_s']):>16.2f} {r['peak_mb']:>9,.0f} "
                  f"{ratio:>18}", flush=True)
        if len(steps) == 2:
            print(f"{T:>7} full / window: {steps['full'] / steps['window']:.1f}x per training step", flush=True)
        previous.update(steps)


if __name__ == "__main__":
    main()
