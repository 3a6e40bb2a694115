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


def test_a_build_with_two_processes_makes_the_store_of_one(tmp_path, capsys):
    """`--workers 2`: a spawned helper and this process take the groups nobody holds; the store is the same,
    bit for bit, and finalized once."""
    from checkpoints_dataset.__main__ import main

    assert main([*ARGS, "--workers", "2", "--out", str(tmp_path / "two")]) == 0
    assert "8 runs" in capsys.readouterr().out
    one = build_population(get_task("digits_mlp"), tmp_path / "one",
                           PopulationConfig(runs=8, epochs=1, group_size=4, num_checkpoints=3), progress=False)
    two = open_store(tmp_path / "two", verify="full")
    assert two.num_runs == 8 and list(two.test_runs) == list(one.test_runs)
    for s in (one, two):
        s.order = np.lexsort((s.steps, s.run_ids))
    assert np.array_equal(one.params(one.order), two.params(two.order))
    assert all(np.array_equal(one._metrics[k][one.order], two._metrics[k][two.order]) for k in one.metric_names)


def test_several_processes_need_a_task_that_pickles(tmp_path):
    import pytest

    task = get_task("digits_mlp")
    task.hook = lambda: None   # e.g. a task holding a callback: it cannot be sent to another process
    config = PopulationConfig(runs=4, epochs=1, group_size=2, num_checkpoints=2)
    with pytest.raises(ValueError, match="cannot be pickled.*workers=1"):
        build_population(task, tmp_path / "s", config, progress=False, workers=2)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        build_population(task, tmp_path / "s", config, progress=False, workers=0)


def test_a_helper_skips_the_groups_another_process_holds(tmp_path):
    """What each process of a `--workers` build does: the groups nobody holds, without waiting for the rest."""
    import torch

    from checkpoints_dataset import store
    from checkpoints_dataset.population import _group_lock, _helper

    task, out = get_task("digits_mlp"), tmp_path / "store"
    config = PopulationConfig(runs=8, epochs=1, group_size=4, num_checkpoints=3)
    assert build_population(task, out, config, progress=False, shard=(1, 2)) is None   # group 1 only: not final
    threads = torch.get_num_threads()
    with _group_lock(out, 0):
        _helper(task, out, config, torch.device("cpu"), [0, 1], threads)   # group 0 is held, group 1 is done
    assert not store.shard_exists(out, "group_00000") and store.shard_exists(out, "group_00001")
    _helper(task, out, config, torch.device("cpu"), [0, 1], threads)
    assert store.shard_exists(out, "group_00000")


def test_a_multi_process_build_waits_for_a_held_group_and_builds_what_is_left(tmp_path):
    """With helpers nobody waits while training, but before finalizing the parent takes every group once
    more, waiting for its holder: a group another builder held (or a failed helper left) is built then."""
    import threading

    from checkpoints_dataset.population import _group_lock

    out = tmp_path / "store"
    out.mkdir()
    config = PopulationConfig(runs=8, epochs=1, group_size=4, num_checkpoints=3)
    result = {}
    with _group_lock(out, 0):
        worker = threading.Thread(target=lambda: result.setdefault(
            "store", build_population(get_task("digits_mlp"), out, config, progress=False, workers=2)))
        worker.start()
        worker.join(timeout=20)
        assert worker.is_alive() and "store" not in result   # group 1 built, group 0 awaited
    worker.join(timeout=300)
    assert result["store"].num_runs == 8
