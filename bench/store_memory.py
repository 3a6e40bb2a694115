"""Benchmark: sampling pairs from a store takes memory independent of the store's size.

Builds a synthetic store of ``--gb`` GB (an MLP 64-128-128-10, 26K params per checkpoint, fp32) with
``write_shard``, then, in a fresh process, opens it and draws ``--batches`` batches of permuted pairs with
``PairDataset`` over the whole store, and prints the reader's peak resident memory (ru_maxrss) against
the store's size. Appends the figure to bench/NOTES.md with ``--notes``.

    python bench/store_memory.py --gb 3 --notes
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from torch import nn

from checkpoints_dataset import PairDataset, create_store, infer_permutation_spec, open_store, write_shard

CKPTS_PER_RUN = 100


def build(root: Path, gb: float, shard_mb: int = 256) -> None:
    spec = infer_permutation_spec(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                                nn.Linear(128, 10)))
    P = spec.num_params
    create_store(root, task=None, layer_shapes=spec.layer_shapes, metric_names=["loss"],
                 lower_is_better={"loss": True}, permutation_spec=spec.to_json())
    rows_total = int(gb * 2**30 / (4 * P)) // CKPTS_PER_RUN * CKPTS_PER_RUN
    rows_per_shard = max(shard_mb * 2**20 // (4 * P) // CKPTS_PER_RUN, 1) * CKPTS_PER_RUN
    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows_per_shard, P), dtype=np.float32)  # [n, P] reused, shifted per shard
    for i, lo in enumerate(range(0, rows_total, rows_per_shard)):
        n = min(rows_per_shard, rows_total - lo)
        run_ids = (lo + np.arange(n)) // CKPTS_PER_RUN
        steps = (lo + np.arange(n)) % CKPTS_PER_RUN
        write_shard(root, f"shard{i:04d}", params=base[:n] + np.float32(0.01 * i), run_ids=run_ids, steps=steps,
                    epochs=steps / 10.0, metrics={"loss": np.exp(-steps / 30.0)})


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (Linux, reset at exec, unlike ru_maxrss which a child
    inherits from its parent's peak at fork), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def read(root: Path, batches: int, batch_size: int) -> None:
    """Runs in a fresh process: its ru_maxrss is the reader's alone."""
    store = open_store(root)
    ds = PairDataset(store, metric="loss", seed=0)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for _ in range(batches):
        ds.__getitems__(rng.integers(0, len(ds), batch_size))
    seconds = time.perf_counter() - t0
    peak_mb = _peak_rss_mb()
    size_gb = sum(f.stat().st_size for f in (root / "shards").glob("*.params.npy")) / 2**30
    print(f"store {size_gb:.2f} GB, {store.num_checkpoints} checkpoints of {store.num_params} params; sampled "
          f"{batches} x {batch_size} permuted pairs in {seconds:.1f} s; reader peak RSS (VmHWM) {peak_mb:.0f} MB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=3.0, help="store size in GB")
    parser.add_argument("--dir", default=None, help="parent directory of the temporary store (default: /tmp)")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--notes", action="store_true", help="append the result to bench/NOTES.md")
    parser.add_argument("--read", default=None, help=argparse.SUPPRESS)  # internal: the reader process
    args = parser.parse_args(argv)
    if args.read:
        return read(Path(args.read), args.batches, args.batch_size)
    free_gb = shutil.disk_usage(args.dir or tempfile.gettempdir()).free / 2**30
    if free_gb < 2 * args.gb:
        sys.exit(f"only {free_gb:.1f} GB free; pass a smaller --gb or another --dir")
    root = Path(tempfile.mkdtemp(prefix="store_memory_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        build(root, args.gb)
        print(f"built in {time.perf_counter() - t0:.1f} s")
        out = subprocess.run([sys.executable, __file__, "--read", str(root), "--batches", str(args.batches),
                              "--batch-size", str(args.batch_size)], check=True, capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1]
        print(line)
        if args.notes:
            with open(Path(__file__).with_name("NOTES.md"), "a") as f:
                f.write(f"\n## store_memory ({time.strftime('%Y-%m-%d')}, 2-core CPU)\n{line}\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
