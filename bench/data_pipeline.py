"""Benchmark: pairs/s the training DataLoader delivers vs pairs/s a training step consumes (headroom).

Both sides use the same store, batch size and model, side by side in one run:

- loader, memory-mapped (``--data.pair_device cpu``, the default): ``ParameterDataModule.train_dataloader()``
  with ``--num-workers`` processes, permutation augmentation included, each batch copied to the training
  device (what Lightning does next) before the clock stops;
- loader, device-resident (``--data.pair_device DEVICE``): the training runs' parameters live on the
  training device and whole batches are sampled and permuted there (on CPU this is "cpu:0": in RAM);
- training step: loss + backward + AdamW of ``GeneratorModule`` (bench/train_throughput.py's step) at
  ``--precision``.

The LAST two lines are the headroom ratios (loader pairs/s / training pairs/s); the goal is >= 5x, so that
data never stalls the accelerator.

    python bench/data_pipeline.py                                      # CPU: XS, batch 32
    python bench/data_pipeline.py --device cuda --size B --store data/digits_mlp_gpu
"""
from __future__ import annotations

import argparse
import time

import torch

from gpt_params.training.data import ParameterDataModule
from train_throughput import bench_store, make_module, make_step, sync


def loader_rate(dm: ParameterDataModule, device: torch.device, batches: int, warmup: int) -> float:
    """Pairs/s delivered by the DataModule's train loader, batches moved to ``device`` (clock after warm-up)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    if len(loader) < 1:
        raise SystemExit("the store gives no full training batch; lower --batch-size or use a bigger store")
    it, n, t0 = iter(loader), 0, None
    for i in range(warmup + batches):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:  # a new pass (epoch) over the training pairs
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        n += len(batch["start"]) if i >= warmup else 0
    sync(device)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=["XS", "S", "B", "L"], default=None, help="DiT preset (CPU: XS, CUDA: B)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (CPU: 32, CUDA: 1024)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="training step (CPU: fp32, CUDA: bf16)")
    p.add_argument("--num-workers", type=int, default=None, help="memory-mapped loader workers (CPU: 0, CUDA: 4)")
    p.add_argument("--batches", type=int, default=None, help="timed loader batches (CPU: 10, CUDA: 50)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (CPU: 4, CUDA: 20)")
    p.add_argument("--store", default=None, help="a digits_mlp store (default: build a small one in /tmp)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size, batch_size = args.size or ("B" if cuda else "XS"), args.batch_size or (1024 if cuda else 32)
    precision = args.precision or ("bf16" if cuda else "fp32")
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    batches, steps = args.batches or (50 if cuda else 10), args.steps or (20 if cuda else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = str(bench_store(args.store))
    resident_device = str(device) if cuda else "cpu:0"

    mapped = ParameterDataModule(root=root, batch_size=batch_size, num_workers=workers)
    resident = ParameterDataModule(root=root, batch_size=batch_size, pair_device=resident_device)
    mapped_rate = loader_rate(mapped, device, batches, warmup=2 + workers)
    resident_rate = loader_rate(resident, device, batches, warmup=2)

    module = make_module(mapped.info, size, False, device)
    step = make_step(module, precision, device)
    resident.train_set.set_epoch(1)
    data = [resident.train_set.get_batch(torch.randint(0, len(resident.train_set), (batch_size,)).numpy())
            for _ in range(2)]
    for i in range(2):
        step(data[i % 2])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[i % 2])
    sync(device)
    train_rate = steps * batch_size / (time.perf_counter() - t0)

    print(f"device {device}, preset {size}, batch {batch_size}, {precision} step, "
          f"{len(mapped.train_set)} training pairs of {mapped.store.num_params} params, "
          f"threads {torch.get_num_threads()}")
    print(f"loader, memory-mapped ({workers} workers): {mapped_rate:10,.0f} pairs/s")
    print(f"loader, resident on {resident_device:>5}:        {resident_rate:10,.0f} pairs/s")
    print(f"training step consumes:             {train_rate:10,.0f} pairs/s")
    print(f"headroom memory-mapped: {mapped_rate / train_rate:.1f}x")
    print(f"headroom resident: {resident_rate / train_rate:.1f}x")


if __name__ == "__main__":
    main()
