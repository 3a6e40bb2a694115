"""The checkpoint store: round trip, split and stats, atomic writes, and every bad-store error."""
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from checkpoints_dataset.store import (StoreError, create_store, finalize_store, open_store, shard_exists,
                                       write_shard)

SHAPES = {"0.weight": (3, 2), "0.bias": (3,), "2.weight": (1, 3)}
P = 12
KW = dict(task="toy", layer_shapes=SHAPES, metric_names=["loss", "acc"], lower_is_better={"loss": True, "acc": False},
          permutation_spec=None, build_config={"epochs": 3})


def _write(root, name, runs, ckpts=3, seed=0, **extra):
    rng = np.random.default_rng(seed)
    n = len(runs) * ckpts
    data = dict(params=rng.normal(size=(n, P)).astype(np.float32), run_ids=np.repeat(runs, ckpts),
                steps=np.tile(np.arange(ckpts) * 10, len(runs)), epochs=np.tile(np.arange(ckpts, dtype=float), len(runs)),
                metrics={"loss": rng.random(n), "acc": rng.random(n)})
    data.update(extra)
    dropped = write_shard(root, name, **data)
    return data, dropped


def test_round_trip_split_stats_and_drops(tmp_path):
    create_store(tmp_path, **KW)
    a, _ = _write(tmp_path, "a", runs=np.arange(0, 20), seed=1, run_hparams={0: {"lr": 0.1}})
    b, _ = _write(tmp_path, "b", runs=np.arange(20, 40), seed=2)
    bad = dict(b)
    bad["params"] = b["params"][:6].copy()
    bad["params"][0, 0] = np.inf
    bad.update(run_ids=[40] * 6, steps=range(6), epochs=range(6),
               metrics={"loss": [0, 1, np.nan, 1, 1, 1], "acc": [0] * 6})
    assert write_shard(tmp_path, "c", **bad) == 2
    finalize_store(tmp_path)
    store = open_store(tmp_path)
    assert (store.num_runs, store.num_checkpoints, store.num_params) == (41, 124, P)
    assert isinstance(store._arrays[0], np.memmap)  # parameters stay on disk
    np.testing.assert_array_equal(store.params(np.arange(60)), a["params"])
    np.testing.assert_array_equal(store.params([61, 0, 60]), np.stack([b["params"][1], a["params"][0], b["params"][0]]))
    np.testing.assert_allclose(store.metrics(np.arange(60, 120))["acc"], b["metrics"]["acc"])
    assert store.steps[store.run_checkpoints(21)].tolist() == [0, 10, 20]
    assert store.run_hparams(0) == {"lr": 0.1} and store.run_hparams(5) == {}
    assert store.manifest["dropped"] == {"nonfinite_params": 1, "nonfinite_metrics": 1}
    assert store.test_runs.tolist() == list(range(36, 41))  # ceil(10% of 41) = 5 last runs held out
    assert len(store.train_runs) + len(store.test_runs) == 41
    train_rows = np.isin(store.run_ids, store.train_runs)
    w = store.params(np.nonzero(train_rows)[0])[:, :6]
    assert store.stats["0.weight"] == pytest.approx((w.mean(), w.std()), rel=1e-6)


def test_float16_and_few_runs_hold_out_at_least_four(tmp_path):
    create_store(tmp_path, **{**KW, "dtype": "float16"})
    data, _ = _write(tmp_path, "a", runs=np.arange(9))
    store = open_store(tmp_path)  # finalized lazily on open
    assert store.params([0]).dtype == np.float32 and store._arrays[0].dtype == np.float16
    np.testing.assert_allclose(store.params([0])[0], data["params"][0], atol=2e-3)
    assert store.test_runs.tolist() == [5, 6, 7, 8]


def test_uncommitted_truncated_and_missing_shards(tmp_path):
    create_store(tmp_path, **KW)
    _write(tmp_path, "a", runs=[0, 1])
    _write(tmp_path, "b", runs=[2, 3])
    (tmp_path / "shards" / "b.index.npz").unlink()  # crash before the index was written: not committed
    assert shard_exists(tmp_path, "a") and not shard_exists(tmp_path, "b")
    assert open_store(tmp_path).num_runs == 2
    params = tmp_path / "shards" / "a.params.npy"
    with open(params, "r+b") as f:
        f.truncate(params.stat().st_size - 8)  # a truncated params file is detected
    assert not shard_exists(tmp_path, "a")
    with pytest.raises(StoreError, match="truncated"):
        open_store(tmp_path)
    params.unlink()
    with pytest.raises(StoreError, match="missing"):
        open_store(tmp_path)
    _write(tmp_path, "a", runs=[0, 1])  # rebuilding the shard repairs the store
    assert open_store(tmp_path).num_checkpoints == 6


def test_bad_stores_are_refused(tmp_path):
    with pytest.raises(StoreError, match="not a checkpoint store"):
        open_store(tmp_path)
    create_store(tmp_path / "s", **KW)
    with ThreadPoolExecutor(4) as pool:  # concurrent identical creates are fine
        list(pool.map(lambda _: create_store(tmp_path / "s", **KW), range(4)))
    for change in ({"task": "other"}, {"layer_shapes": {**SHAPES, "2.bias": (1,)}}, {"build_config": {"epochs": 4}},
                   {"metric_names": ["loss"], "lower_is_better": {"loss": True}}):
        with pytest.raises(StoreError, match="different dataset"):
            create_store(tmp_path / "s", **{**KW, **change})
    # a shard of another architecture copied in: the manifest does not match its shards
    create_store(tmp_path / "o", **{**KW, "layer_shapes": {"w": (5,)}})
    write_shard(tmp_path / "o", "x", params=np.zeros((1, 5)), run_ids=[0], steps=[0], epochs=[0],
                metrics={"loss": [1.0], "acc": [0.0]})
    for f in (tmp_path / "o" / "shards").iterdir():
        shutil.copy(f, tmp_path / "s" / "shards" / f.name)
    with pytest.raises(StoreError, match="does not match"):
        open_store(tmp_path / "s")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    (tmp_path / "o" / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(StoreError, match="format version 99"):
        open_store(tmp_path / "o")
    with pytest.raises(StoreError, match=r"\[n, 12\]"):
        write_shard(tmp_path / "s", "y", params=np.zeros((1, 5)), run_ids=[0], steps=[0], epochs=[0],
                    metrics={"loss": [1.0], "acc": [0.0]})
