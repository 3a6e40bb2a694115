"""Benchmark: denoiser training throughput, fp32 eager (G.pt's setting) vs bf16 autocast (+ torch.compile).

One training step is exactly what ``gpt-params train`` does per batch: ``Generator.denoising_loss`` of the
``GeneratorModule``'s generator (its tokenizer, ``ParameterDiT`` and ``Diffusion.training_loss``), backward and
an AdamW step (the module's parameter groups).
Batches are real pairs from a digits_mlp store, drawn beforehand (``PairDataset(device=...)``) so that the
data pipeline is not measured here (bench/data_pipeline.py measures it). Variants, side by side in one run
on the same model size, batch and pairs:

- ``fp32``: fp32 eager (G.pt's setting);
- ``bf16``: bf16 autocast (CUDA; on CPU, CPU autocast: usually no faster there, reported as measured);
- ``bf16+compile``: the same with the module's ``compile=True`` (torch.compile of the denoiser).

Model FLOPs per step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward,
matmuls and attention); model FLOP utilization (MFU) = FLOPs/s / peak. The peak is ``--peak-tflops``
(default 989: the H200's dense bf16 spec figure, the usual MFU convention); the MFU against the ~790
TFLOP/s an 8192^3 bf16 matmul measured on the lent H200 (/work/.library/device/KINDS.md) is printed
beside it. On CPU the MFU is printed only when ``--peak-tflops`` is given. The LAST lines are the ratios
against fp32 eager.

    python bench/train_throughput.py                                   # CPU: XS, batch 32, a few steps
    python bench/train_throughput.py --device cuda --size L --store data/digits_mlp_gpu
"""
from __future__ import annotations

import argparse
import atexit
import platform
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from checkpoints_dataset import get_task
from checkpoints_dataset.info import DataInfo
from checkpoints_dataset.pairs import PairDataset
from checkpoints_dataset.population import PopulationConfig, build_population
from gpt_params.core.config import DiTOptions
from gpt_params.training.data import ParameterDataModule
from gpt_params.training.module import GeneratorModule

VARIANTS = ("fp32", "bf16", "bf16+compile")
MEASURED_PEAK_TFLOPS = 790.0  # 8192^3 bf16 matmul on the lent H200 (KINDS.md)


def bench_store(path: str | None, runs: int = 48, epochs: int = 3) -> Path:
    """The store at ``path``, or a small digits_mlp store built in a temporary directory (seconds)."""
    if path is not None:
        if not (Path(path) / "manifest.json").exists():
            raise SystemExit(f"no checkpoint store at {path}: build one with "
                             f"`gpt-params build-dataset --task digits_mlp --out {path}` or omit --store")
        return Path(path)
    tmp = tempfile.mkdtemp(prefix="bench_store_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # removed when the benchmark exits
    root = Path(tmp) / "digits_mlp"
    config = PopulationConfig(runs=runs, epochs=epochs, group_size=runs, num_checkpoints=8)
    build_population(get_task("digits_mlp"), root, config, progress=False)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_module(info: DataInfo, size: str, compile: bool, device: torch.device) -> GeneratorModule:
    torch.manual_seed(0)
    return GeneratorModule(data_info=info, dit=DiTOptions(size=size), compile=compile).to(device).train()


def make_step(module: GeneratorModule, precision: str, device: torch.device):
    """One training step (loss, backward, AdamW) as the Lightning loop runs it, under ``precision``."""
    gen = module.generator
    params = [p for p in gen.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-4)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    denoiser = module._denoiser  # the DiT, or its torch.compile wrapper with compile=True (as the training step)

    def step(batch: dict) -> torch.Tensor:
        with autocast:  # tokenize start and target, noise, denoise, masked MSE
            loss = gen.denoising_loss(batch, cond_drop_prob=0.1, denoiser=denoiser)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def count_flops(module: GeneratorModule, batch: dict) -> int:
    """Model FLOPs of one forward + backward of the denoiser on ``batch`` (fp32 eager; the count does not
    depend on precision)."""
    step = make_step(module, "fp32", batch["start"].device)
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def run_variant(name: str, info: DataInfo, args, batches: list[dict], device: torch.device) -> dict:
    precision, compile = ("fp32", False) if name == "fp32" else ("bf16", name.endswith("compile"))
    module = make_module(info, args.size, compile, device)
    step = make_step(module, precision, device)
    t0 = time.perf_counter()
    for i in range(args.warmup):  # compile (if any) and allocator warm-up
        step(batches[i % len(batches)])
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(batches[i % len(batches)])
    sync(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: the loss is not finite ({float(loss)})")
    del module, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"steps_per_s": args.steps / seconds, "warmup_s": warm, "loss": loss.item()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=["XS", "S", "B", "L"], default=None, help="DiT preset (CPU: XS, CUDA: B)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (CPU: 32, CUDA: 1024)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (CPU: 4, CUDA: 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU: 2, CUDA: 5)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--store", default=None, help="a digits_mlp store (default: build a small one in /tmp)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default on CUDA: 989, the H200's dense bf16 spec)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.size = args.size or ("B" if cuda else "XS")
    args.batch_size = args.batch_size or (1024 if cuda else 32)
    args.steps = args.steps or (30 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    peak = args.peak_tflops or (989.0 if cuda else None)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"unknown --variants {bad}; choose from {VARIANTS}")
    if args.threads:
        torch.set_num_threads(args.threads)

    data = ParameterDataModule(root=str(bench_store(args.store)))
    pairs = PairDataset(data.store, runs=data.train_run_ids, metric=data.metric, seed=0, device=device)
    g = torch.Generator().manual_seed(0)
    batches = [pairs.get_batch(torch.randint(0, len(pairs), (args.batch_size,), generator=g).numpy())
               for _ in range(4)]
    probe = make_module(data.info, args.size, False, device)
    n_params = sum(p.numel() for p in probe.generator.model.parameters())
    tokens, width = probe.generator.tokenizer.num_tokens, probe.generator.tokenizer.token_dim
    flops = count_flops(probe, batches[0])
    del probe
    name = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()} CPU"
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"preset {args.size}: {n_params / 1e6:.1f}M params, {tokens} tokens x {width} values per sample, "
          f"batch {args.batch_size}, {flops / 1e9:.1f} GFLOP per step (fwd+bwd, counted)")

    results = {}
    for v in variants:
        try:
            r = run_variant(v, data.info, args, batches, device)
        except Exception as err:  # e.g. torch.compile without a working compiler: say so, go on
            print(f"{v:>13}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
            continue
        results[v] = r
        sps = r["steps_per_s"] * args.batch_size
        line = (f"{v:>13}: {sps:10,.0f} samples/s {sps * tokens:12,.0f} tokens/s "
                f"(warm-up {r['warmup_s']:.1f} s, loss {r['loss']:.3f})")
        if peak:
            mfu = flops * r["steps_per_s"] / (peak * 1e12)
            line += f"  MFU {100 * mfu:.1f}% of {peak:g} TFLOP/s"
            if cuda and args.peak_tflops is None:
                line += f" ({100 * flops * r['steps_per_s'] / (MEASURED_PEAK_TFLOPS * 1e12):.1f}% of measured 790)"
        print(line, flush=True)
    if device.type == "cpu" and "bf16" in results:
        print("note: on CPU 'bf16' is CPU autocast (bf16 matmuls on a CPU without AMX are emulated: slower)")
    base = results.get("fp32")
    for v, r in results.items():
        if v != "fp32" and base:
            print(f"{v} / fp32 eager: {r['steps_per_s'] / base['steps_per_s']:.2f}x")


if __name__ == "__main__":
    main()
