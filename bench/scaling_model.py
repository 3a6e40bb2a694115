"""The DiT's cost per target size, as arithmetic checked against this machine (issue 17, docs/SCALING.md).

Model (one training step = forward + backward ~ 3x the forward; multiply-adds count 2 FLOPs):

    forward FLOPs  = 2 N T (2C) D  +  2 N T D C                 token projections in (x_t and start) and out
                   + depth * (24 N T D^2 + 4 N T^2 D)           per block: qkv + proj + MLP(4x), attention
    memory (fp32)  = 16 * params                                weights, grads, AdamW's two moments
                   + depth * a * N T D * 4 bytes                activations kept for backward (a fitted)
                   + [relations] depth * H * N T^2 * 4 bytes    the edges' dense attention bias (relations.py)

with N the batch, T tokens of width C, D the DiT width. ``--measure`` first times training steps of the real
``ParameterDiT`` at a few small sizes (bench/long_sequence.py, each size in a fresh process) and prints the model's FLOPs, the implied GFLOP/s and the fitted activation factor, so the model
is checked where it can be measured. Then it projects 10M / 100M / 1B-parameter targets: tokens at one per
unit row cut to ``--chunk`` values (T ~ P / (0.8 C)), for full attention and for attention within windows of
``--window`` tokens (the option that would scale), with the time at the measured CPU rate and at an assumed
GPU rate (``--gpu-tflops``, an assumption until bench/gpu.sh has measured one; say so wherever it is used).

    python bench/scaling_model.py --measure --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PRESET_S = dict(width=384, depth=12, heads=6)


def forward_flops(N: int, T: int, C: int, D: int, depth: int, window: int | None = None) -> float:
    span = T if window is None else min(window, T)            # keys each query attends to
    return 2 * N * T * 2 * C * D + 2 * N * T * D * C + depth * (24 * N * T * D * D + 4 * N * T * span * D)


def dit_params(T_ids: int, C: int, D: int, depth: int) -> float:
    """Per-layer-id projections (in 2C->D, out D->C) for ``T_ids`` ids plus ``depth`` blocks of ~12 D^2 + adaLN 6 D^2."""
    return T_ids * (3 * C * D) + depth * 18 * D * D


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="time the real DiT at small sizes first")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk", type=int, default=1024, help="C, values per token of the projected targets")
    p.add_argument("--window", type=int, default=1024, help="tokens per attention window (the scalable option)")
    p.add_argument("--batch", type=int, default=64, help="N of the projected training (default 64)")
    p.add_argument("--steps", type=int, default=50_000, help="training steps of the projection (default 50,000)")
    p.add_argument("--gpu-tflops", type=float, default=300.0,
                   help="ASSUMED sustained GPU rate for the projection (default 300: ~30%% of an H200's bf16 spec)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_rate, act = None, 20.0
    if args.measure:
        script = Path(__file__).with_name("long_sequence.py")

        print("measured: ParameterDiT width 128, 4 heads, 2 blocks, batch 2, token width 64 (medians of 3)")
        print(f"{'tokens':>7} {'GFLOP / step':>13} {'step s':>8} {'GFLOP/s':>8} {'peak MB':>9} {'a (fitted)':>11}")
        rates, acts = [], []
        for T in (256, 1024, 4096):
            cmd = [sys.executable, str(script), "--one", str(T), "--rounds", "3",
                   *(["--threads", str(args.threads)] if args.threads else [])]   # a fresh process: its own peak
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            flops = 3 * forward_flops(2, T, 64, 128, 2)
            step = statistics.median(r["train_s"])
            params_mb = 16 * r["dit_params"] / 2**20
            a = max(r["peak_mb"] - params_mb, 0) * 2**20 / (2 * 2 * T * 128 * 4)
            rates.append(flops / step / 1e9)
            acts.append(a)
            print(f"{T:>7} {flops / 1e9:>13.2f} {step:>8.3f} {rates[-1]:>8.1f} {r['peak_mb']:>9,.0f} {a:>11.1f}")
        cpu_rate, act = statistics.median(rates) * 1e9, statistics.median(acts)
        print(f"CPU rate (median) {cpu_rate / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} thread(s); "
              f"activation factor a = {act:.0f} floats per token and width per block")
    D, depth, H, N, C = PRESET_S["width"], PRESET_S["depth"], PRESET_S["heads"], args.batch, args.chunk
    print(f"\nprojection: DiT-S (width {D}, {depth} blocks, {H} heads), batch {N}, tokens of {C} values, "
          f"{args.steps:,} steps; GPU rate {args.gpu_tflops:.0f} TFLOP/s ASSUMED (unmeasured)")
    print(f"{'target':>7} {'tokens':>9} {'attention':>10} {'TFLOP/step':>11} {'act. GB':>8} {'edge bias GB':>13} "
          f"{'CPU s/step':>11} {'GPU h (all steps)':>18}")
    for P in (1e7, 1e8, 1e9):
        T = int(P / (0.8 * C))
        for window in (None, args.window):
            flops = 3 * forward_flops(N, T, C, D, depth, window)
            act_gb = depth * act * N * T * D * 4 / 1e9
            bias_gb = depth * H * N * T * (T if window is None else min(window, T)) * 4 / 1e9
            cpu = f"{flops / cpu_rate:,.0f}" if cpu_rate else "-"
            gpu_h = flops * args.steps / (args.gpu_tflops * 1e12) / 3600
            print(f"{P / 1e6:>6.0f}M {T:>9,} {'full' if window is None else f'window {window}':>10} "
                  f"{flops / 1e12:>11,.1f} {act_gb:>8,.0f} {bias_gb:>13,.0f} {cpu:>11} {gpu_h:>18,.0f}")


if __name__ == "__main__":
    main()
