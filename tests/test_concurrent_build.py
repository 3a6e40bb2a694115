"""Two builds of one store at once: the second waits for the first, then finds its groups done; the store is
the one a single build makes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from checkpoints_dataset import get_task, open_store
from checkpoints_dataset.population import PopulationConfig, build_population

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--task", "digits_mlp", "--runs", "8", "--epochs", "1", "--group-size", "4", "--checkpoints", "3",
        "--no-progress"]


def test_two_builds_of_one_store_at_once_make_the_store_of_one(tmp_path):
    out = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "checkpoints_dataset", "build", *ARGS, "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    single = tmp_path / "single"
    build_population(get_task("digits_mlp"), single, PopulationConfig(runs=8, epochs=1, group_size=4,
                                                                      num_checkpoints=3), progress=False)
    a, b = open_store(out, verify="full"), open_store(single)
    assert a.num_checkpoints == b.num_checkpoints == 8 * 3
    rows = np.arange(a.num_checkpoints)
    order_a = np.lexsort((a.steps, a.run_ids))
    order_b = np.lexsort((b.steps, b.run_ids))
    assert np.array_equal(a.params(rows[order_a]), b.params(rows[order_b]))


def test_a_sharded_build_and_a_whole_build_at_once_make_the_store_of_one(tmp_path):
    """`build-dataset --shard 0/2` beside a build of the whole store (what `gpt-params train` runs): both finish
    and the store is whole (that a shared group waits for its lock: the next test)."""
    out = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "checkpoints_dataset", "build", *ARGS, "--out", str(out), *extra],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in (["--shard", "0/2"], [])]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert open_store(out, verify="full").num_runs == 8


def test_a_build_waits_while_another_holds_a_group(tmp_path):
    """While another builder holds the locks of the store's groups, a build trains none of them; once they are
    released it builds them."""
    from checkpoints_dataset.population import _group_lock

    out = tmp_path / "store"
    out.mkdir()
    with _group_lock(out, 0), _group_lock(out, 1):
        proc = subprocess.Popen([sys.executable, "-m", "checkpoints_dataset", "build", *ARGS, "--out", str(out)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass
        assert proc.returncode is None and not list(out.glob("shards/*.index.npz"))   # waiting, no group written
    assert proc.wait(timeout=300) == 0 and open_store(out).num_runs == 8
