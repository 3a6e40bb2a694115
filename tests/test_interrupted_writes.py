"""Interrupted writes: atomic report files, leftovers of killed writers removed (ours only), merged shards,
paths in a store's index confined to the store, and prompt --overwrite removing exactly the files it replaces."""
import errno
import fcntl
import json
import os
import uuid

import numpy as np
import pytest

from checkpoints_dataset.fileio import (atomic_write, atomic_write_locked, is_temp_name, remove_stale_temps,
                                        savefig_atomic, write_json_atomic, write_text_atomic)
from checkpoints_dataset.shards import merge_shards
from checkpoints_dataset.store import StoreError, create_store, finalize_store, open_store, write_shard

KW = dict(task=None, layer_shapes={"w": (2, 2)}, metric_names=["loss"], lower_is_better={"loss": True},
          permutation_spec=None)


def _shard(root, name, run, steps, seed=0):
    params = np.random.default_rng(seed).normal(size=(len(steps), 4)).astype(np.float32)
    write_shard(root, name, params=params, run_ids=[run] * len(steps), steps=steps, epochs=np.zeros(len(steps)),
                metrics={"loss": np.arange(len(steps), dtype=float)})
    return params


def _temp(directory, name):
    """A temporary file as a killed atomic write leaves it (our naming pattern, no writer)."""
    path = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    path.write_bytes(b"partial")
    return path


# ----------------------------------------------------------------------------- atomic writes
class _FailingFigure:
    """A figure whose savefig writes part of a PNG, then fails (a full disk, a bug in a plot)."""

    def savefig(self, f, **kwargs):
        f.write(b"\x89PNG\r\n\x1a\n half a picture")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    png = tmp_path / "alignment.png"
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    savefig_atomic(fig, png, dpi=50)
    good = png.read_bytes()
    assert good.startswith(b"\x89PNG")
    with pytest.raises(OSError, match="No space"):
        savefig_atomic(_FailingFigure(), png, dpi=50)
    broken = Figure()
    broken.add_subplot().plot([0, 1], [float("nan"), 1]).pop().draw = lambda renderer: 1 / 0   # fails mid-render
    with pytest.raises(ZeroDivisionError):
        savefig_atomic(broken, png)
    assert png.read_bytes() == good and os.listdir(tmp_path) == ["alignment.png"]

    report = tmp_path / "report.json"
    write_json_atomic(report, {"r2": 0.9})
    with pytest.raises(ValueError):            # NaN refused before the file is touched
        write_json_atomic(report, {"r2": float("nan")}, allow_nan=False)
    write_text_atomic(tmp_path / "modes.md", "| a |\n")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "modes.md", lambda f: (f.write(b"| half"), (_ for _ in ()).throw(RuntimeError())))
    assert json.loads(report.read_text()) == {"r2": 0.9} and (tmp_path / "modes.md").read_text() == "| a |\n"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_report_writers_go_through_the_atomic_helpers():
    """gpt_params writes no file with a bare call (write_text, savefig, json.dump, save_file ...): its reports
    go through checkpoints_dataset.fileio."""
    import ast
    from pathlib import Path

    import gpt_params

    bare = {"write_text", "write_bytes", "savefig", "dump", "save_file", "save", "tofile"}
    offenders = []
    root = Path(gpt_params.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None) if isinstance(node, ast.Call) else None
            name = getattr(func, "attr", getattr(func, "id", None))
            if name in bare:
                offenders.append(f"{path.relative_to(root.parent).as_posix()}:{node.lineno} {name}")
    allowed = {"gpt_params/cli/common.py": {"write_bytes"},        # prepare_out's empty write probe
               "gpt_params/training/checkpoint_io.py": {"save"},     # torch.save into its own atomic temp file
               "gpt_params/evaluation/denoise.py": {"save"}}         # PIL's GIF into memory (write_bytes_atomic)
    assert [o for o in offenders if o.split()[1] not in allowed.get(o.split(":")[0], ())] == []


# ----------------------------------------------------------------------------- leftovers of killed writers
def test_stale_temporaries_go_ours_only_and_never_one_in_use(tmp_path):
    dead = _temp(tmp_path, "report.json")
    live = _temp(tmp_path, "modes.md")
    user = [tmp_path / n for n in ("notes.tmp", ".hidden", f".x.{uuid.uuid4().hex}.tmp.bak", "report.json",
                                   f"x.{uuid.uuid4().hex}.tmp", f".x.{uuid.uuid4().hex[:31]}.tmp")]
    for p in user:
        p.write_text("mine")
    os.symlink("/nonexistent", tmp_path / f".link.{uuid.uuid4().hex}.tmp")
    with open(live, "rb") as writer:           # a live writer holds its temporary's lock
        fcntl.flock(writer, fcntl.LOCK_EX)
        assert remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and all(p.exists() for p in user) and (tmp_path / user[0].name).read_text() == "mine"
    assert remove_stale_temps(tmp_path) == [live]   # its writer is gone now
    assert is_temp_name(dead.name) and not any(is_temp_name(p.name) for p in user)


def test_store_open_removes_temporaries_and_uncommitted_shards_of_dead_writers(tmp_path):
    create_store(tmp_path, **KW)
    kept = _shard(tmp_path, "a", 0, [0, 1])
    temps = [_temp(tmp_path, "manifest.json"), _temp(tmp_path / "shards", "b.params.npy"),
             _temp(tmp_path / "shards", "b.index.npz")]
    orphan = tmp_path / "shards" / "c.params.npy"    # killed between its params file and its index
    np.save(orphan, np.zeros((1, 4), np.float32))
    in_use = atomic_write_locked(tmp_path / "shards" / "d.params.npy", lambda f: np.save(f, np.zeros((1, 4))))
    user = [tmp_path / "README.txt", tmp_path / "shards" / "notes.txt"]
    for p in user:
        p.write_text("mine")
    with in_use:                                 # a writer that has not committed d yet
        store = open_store(tmp_path)
        assert (tmp_path / "shards" / "d.params.npy").exists()
    assert store.num_checkpoints == 2 and np.array_equal(store.params([0, 1]), kept)
    assert not any(p.exists() for p in temps) and not orphan.exists() and all(p.exists() for p in user)
    finalize_store(tmp_path)                    # its writer died: now it goes too
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["a.index.npz", "a.params.npy", "notes.txt"]

    for fn in (lambda: create_store(tmp_path, **KW), lambda: finalize_store(tmp_path)):
        t = _temp(tmp_path / "shards", "e.index.npz")
        fn()
        assert not t.exists()


def test_output_directories_are_cleaned_when_written(tmp_path):
    from gpt_params.cli.common import prepare_out

    t = _temp(tmp_path, "results.json")
    prepare_out(tmp_path, overwrite=False)
    assert not t.exists() and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- merged shards
def test_a_merge_is_committed_by_one_rename_and_the_replaced_shards_go_after_finalize(tmp_path):
    create_store(tmp_path, **KW)
    parts = [_shard(tmp_path, f"s{i}", 0, [i], seed=i) for i in range(3)]
    _shard(tmp_path, "other", 1, [0, 5], seed=9)
    finalize_store(tmp_path)                      # the manifest lists s0..s2
    before = open_store(tmp_path)
    merge_shards(tmp_path, ["s0", "s1", "s2"], "merged")   # a kill here: merged committed, s* still there
    store = open_store(tmp_path, verify="full")
    assert [s["name"] for s in store.manifest["shards"]] == ["merged", "other"]
    assert store.num_checkpoints == 5 and store.steps[store.run_checkpoints(0)].tolist() == [0, 1, 2]
    assert np.array_equal(store.params(store.run_checkpoints(0)), np.concatenate(parts))
    assert store.stats == pytest.approx(before.stats) and store.manifest["dropped"] == before.manifest["dropped"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "merged.index.npz", "merged.params.npy", "other.index.npz", "other.params.npy"]
    assert np.load(tmp_path / "shards" / "merged.params.npy").shape == (3, 4)   # a plain .npy


# ----------------------------------------------------------------------------- paths in the index
def _rewrite_meta(root, name, **changes):
    path = root / "shards" / f"{name}.index.npz"
    with np.load(path) as z:
        cols = {k: z[k] for k in z.files}
    meta = json.loads(str(cols.pop("meta")))
    meta.update(changes)
    np.savez(path, meta=np.array(json.dumps(meta)), **cols)


@pytest.mark.parametrize("field,value", [("params_file", "../../../../../../etc/passwd"),
                                         ("params_file", "/etc/passwd"), ("params_file", "../manifest.json"),
                                         ("replaces", ["../../victim"]), ("replaces", ["/etc/passwd"])])
def test_paths_in_an_index_must_lie_inside_the_store(tmp_path, field, value):
    create_store(tmp_path, **KW)
    _shard(tmp_path, "a", 0, [0, 1])
    _rewrite_meta(tmp_path, "a", **{field: value})
    with pytest.raises(StoreError, match=rf"a\.index\.npz: {field} .* does not name a file inside the store.*"
                                         "delete that shard's index file and rebuild"):
        open_store(tmp_path)


def test_a_symlinked_params_file_and_a_manifest_path_out_of_the_store_are_refused(tmp_path):
    create_store(tmp_path / "s", **KW)
    _shard(tmp_path / "s", "a", 0, [0, 1])
    outside = tmp_path / "secret.npy"
    np.save(outside, np.zeros((2, 4), np.float32))
    params = tmp_path / "s" / "shards" / "a.params.npy"
    size = params.stat().st_size
    params.unlink()
    params.symlink_to(outside)
    assert outside.stat().st_size == size      # same size: only the location check can refuse it
    with pytest.raises(StoreError, match="params_file 'a.params.npy -> .*secret.npy' does not name a file inside"):
        open_store(tmp_path / "s")

    create_store(tmp_path / "t", **KW)
    _shard(tmp_path / "t", "a", 0, [0, 1])
    finalize_store(tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../../etc/passwd"
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"manifest\.json: shard name '\.\./\.\./\.\./etc/passwd' does not name.*"
                                         r"finalize_store"):
        open_store(tmp_path / "t")
    finalize_store(tmp_path / "t")              # the fix the message names
    assert open_store(tmp_path / "t").num_checkpoints == 2


# ----------------------------------------------------------------------------- prompt --overwrite
def test_prompt_overwrite_removes_the_replaced_networks_and_nothing_else(tiny_generator_ckpt, tmp_path):
    from gpt_params.cli import main

    out = tmp_path / "prompts"
    base = ["prompt", "--ckpt", str(tiny_generator_ckpt), "--out", str(out), "--steps", "2"]
    assert main([*base, "--target", "0.2", "--target", "0.5", "--num", "2"]) == 0
    first = sorted(p.name for p in out.iterdir())
    assert first == ["results.json", "target00_000.safetensors", "target00_001.safetensors",
                     "target01_000.safetensors", "target01_001.safetensors"]
    results = json.loads((out / "results.json").read_text())
    results["records"].append({"file": "../outside.safetensors"})      # a listed path out of --out: kept
    (out / "results.json").write_text(json.dumps(results))
    mine = ["my_net.safetensors", "target_final.safetensors", "notes.txt", "target02_x.safetensors"]
    for name in mine + ["target07_003.safetensors"]:                  # the last one: our pattern, a stale run
        (out / name).write_text("user")
    (tmp_path / "outside.safetensors").write_text("user")
    _temp(out, "target00_000.safetensors")                             # a write a kill interrupted

    assert main([*base, "--target", "0.3", "--num", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", "target00_000.safetensors", *mine])
    assert [r["file"] for r in json.loads((out / "results.json").read_text())["records"]] == ["target00_000.safetensors"]
    assert (tmp_path / "outside.safetensors").exists() and all((out / n).read_text() == "user" for n in mine)


def test_opening_a_directory_that_is_no_store_cleans_nothing(tmp_path):
    """evaluate opens the store a checkpoint names: a path read from a file, which may be any directory."""
    from checkpoints_dataset import StoreError, finalize_store, open_store

    bystander = tmp_path / (".notes." + "a" * 32 + ".tmp")
    bystander.write_text("not ours")
    for call in (open_store, finalize_store):
        with pytest.raises(StoreError, match="not a checkpoint store"):
            call(tmp_path)
    assert bystander.read_text() == "not ours"
