"""Bad input, swept: every case exits with 2 and one line that names the problem and the fix, with no
traceback, and nothing that existed before is changed (checksums of every file in the workspace). Input that
is still usable (a recorded store with non-finite checkpoints) gets a warning counting what was dropped, and
the command goes on. (Two builds of one store at once: tests/test_concurrent_build.py.)"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoints_dataset import create_store, finalize_store, get_task, open_store, write_shard
from conftest import train_args
from gpt_params.cli import main


@dataclass
class Workspace:
    root: Path
    store: Path
    ckpt: Path
    other_store: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    def shard(self) -> Path:
        return next((self.store / "shards").glob("*.params.npy"))


def _prompt(ws: Workspace, *extra: str) -> list[str]:
    return ["prompt", "--ckpt", str(ws.ckpt), "--target", "0.3", "--num", "1", "--steps", "1", "--out", str(ws.out),
            *extra]


def _evaluate(ws: Workspace, *extra: str) -> list[str]:
    return ["evaluate", "--ckpt", str(ws.ckpt), "--store", str(ws.store), "--runs", "1", "--steps", "1",
            "--out", str(ws.out), *extra]


def _build(ws: Workspace, *extra: str) -> list[str]:
    return ["build-dataset", "--task", "digits_mlp", "--runs", "4", "--epochs", "1", "--group-size", "4",
            "--checkpoints", "2", "--no-progress", "--out", str(ws.root / "new_store"), *extra]


def _train(ws: Workspace, *extra: str) -> list[str]:
    return train_args(ws.store, ws.root / "run", steps=2, extra=list(extra))


def _truncate(ws):
    path = ws.shard()
    path.write_bytes(path.read_bytes()[:-100])


def _flip(ws):
    data = bytearray(ws.shard().read_bytes())
    data[len(data) // 2] ^= 0x10
    ws.shard().write_bytes(bytes(data))


def _manifest(ws, **changes):
    manifest = json.loads((ws.store / "manifest.json").read_text())
    manifest.update(changes)
    (ws.store / "manifest.json").write_text(json.dumps(manifest))


def _write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _other_arch_start(ws) -> str:
    model = get_task("cartpole").build_model()
    return str(save_file(model.state_dict(), str(ws.root / "policy.safetensors")) or ws.root / "policy.safetensors")


def _full_disk(monkeypatch):
    """A full disk as the kernel reports it: the data is accepted, then fsync fails with ENOSPC."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("checkpoints_dataset.fileio.os.fsync", no_space)


# case -> (setup(ws, monkeypatch) or None, args(ws), what the error line must say)
CASES = {
    # stores
    "truncated_shard": (lambda ws, mp: _truncate(ws), _train, "is truncated or changed"),
    "bit_flipped_shard": (lambda ws, mp: _flip(ws), _train, "checksum mismatch"),
    "manifest_of_another_version": (lambda ws, mp: _manifest(ws, version=99), _train, "version"),
    "manifest_not_json": (lambda ws, mp: (ws.store / "manifest.json").write_text("{oops"), _train, "manifest"),
    "shard_file_missing": (lambda ws, mp: ws.shard().unlink(), _train, "params.npy"),
    "manifest_a_json_list": (lambda ws, mp: (ws.store / "manifest.json").write_text("[]"), _train,
                             "holds a JSON list, not a manifest"),
    "manifest_not_utf8": (lambda ws, mp: (ws.store / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}'),
                          _train, "is not valid JSON"),
    "no_store_and_no_task": (None, lambda ws: train_args(ws.root / "nothing", ws.root / "run", extra=[
        "--data.task", "null"]), "give --data.task NAME"),
    "unknown_task": (None, lambda ws: train_args(ws.root / "nothing", ws.root / "run", extra=[
        "--data.task", "mnist_mlp"]), "unknown task 'mnist_mlp'"),
    "unknown_metric": (None, lambda ws: _train(ws, "--data.metric", "accuracy"), "--data.metric 'accuracy'"),
    "task_options_of_other_networks": (None, lambda ws: _train(ws, "--data.task_options", "{hidden: 8}"),
                                       "other shapes"),
    # train's options
    "unknown_option_value": (None, lambda ws: _train(ws, "--model.dit.size", "XL"), "Got value: XL"),
    "flat_option_name": (None, lambda ws: _train(ws, "--model.lr", "0.1"), "is now --model.optim.lr"),
    "missing_config_file": (None, lambda ws: ["train", "--config", str(ws.root / "nope.yaml")], "does not exist"),
    "config_not_yaml": (lambda ws, mp: _write(ws.root / "bad.yaml", b"model: [dit\n  : :"),
                        lambda ws: ["train", "--config", str(ws.root / "bad.yaml")], "is not valid YAML"),
    "config_a_yaml_list": (lambda ws, mp: _write(ws.root / "list.yaml", b"- 1\n- 2\n"),
                           lambda ws: ["train", "--config", str(ws.root / "list.yaml")], "Unexpected config"),
    "resume_from_a_non_checkpoint": (lambda ws, mp: _write(ws.root / "junk.ckpt", b"\x00junk" * 100),
                                     lambda ws: _train(ws, "--ckpt_path", str(ws.root / "junk.ckpt")),
                                     "is not a checkpoint written by gpt-params train"),
    "resume_from_another_architecture": (None, lambda ws: train_args(ws.other_store, ws.root / "run", extra=[
        "--ckpt_path", str(ws.ckpt)]), "another architecture"),
    # prompt
    "num_zero": (None, lambda ws: _prompt(ws)[:5] + ["--num", "0"] + _prompt(ws)[7:], "--num must be at least 1"),
    "num_negative": (None, lambda ws: _prompt(ws)[:5] + ["--num", "-3"] + _prompt(ws)[7:], "--num must be at least 1"),
    "steps_zero": (None, lambda ws: _prompt(ws, "--steps", "0"), "--steps must be at least 1"),
    "unknown_sampler": (None, lambda ws: _prompt(ws, "--sampler", "euler"), "invalid choice: 'euler'"),
    "target_not_a_number": (None, lambda ws: _prompt(ws)[:3] + ["--target", "abc"] + _prompt(ws)[5:],
                            "invalid float value: 'abc'"),
    "target_outside_valid_range": (None, lambda ws: _prompt(ws)[:3] + ["--target", "1.5"] + _prompt(ws)[5:],
                                   "outside its valid range"),
    "target_nan": (None, lambda ws: _prompt(ws)[:3] + ["--target", "nan"] + _prompt(ws)[5:], "not a finite number"),
    "guidance_negative": (None, lambda ws: _prompt(ws, "--guidance", "-1"), "--guidance must be >= 0"),
    "out_holds_results": (lambda ws, mp: _write(ws.out / "results.json", b"{}"), _prompt, "pass --overwrite"),
    "out_unwritable": (lambda ws, mp: _write(ws.root / "a_file"), lambda ws: _prompt(ws)[:-1] + [
        str(ws.root / "a_file" / "sub")], "not writable"),
    "full_disk": (lambda ws, mp: _full_disk(mp), _prompt, "no space left on the device"),
    "ckpt_missing": (None, lambda ws: _prompt(ws)[:1] + ["--ckpt", str(ws.root / "none.ckpt")] + _prompt(ws)[3:],
                     "no checkpoint at"),
    "ckpt_not_a_checkpoint": (lambda ws, mp: _write(ws.root / "junk.ckpt", b"\x00junk" * 100),
                              lambda ws: _prompt(ws)[:1] + ["--ckpt", str(ws.root / "junk.ckpt")] + _prompt(ws)[3:],
                              "not a gpt-params checkpoint"),
    "ckpt_of_another_program": (lambda ws, mp: torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}},
                                                          ws.root / "other.ckpt"),
                                lambda ws: _prompt(ws)[:1] + ["--ckpt", str(ws.root / "other.ckpt")] + _prompt(ws)[3:],
                                "not a gpt-params checkpoint"),
    "start_is_a_pickle": (lambda ws, mp: _write(ws.root / "start.pt", b"x"),
                          lambda ws: _prompt(ws, "--start", str(ws.root / "start.pt")), "must be a .safetensors"),
    "start_is_a_damaged_safetensors": (lambda ws, mp: _write(ws.root / "bad.safetensors", b"\x10" * 64),
                                       lambda ws: _prompt(ws, "--start", str(ws.root / "bad.safetensors")),
                                       "not a readable safetensors"),
    "unknown_device": (None, lambda ws: _prompt(ws, "--device", "gpu7"), "is not a torch device"),
    "cuda_device_without_cuda": (None, lambda ws: _evaluate(ws, "--device", "cuda"), "CUDA is not available"),
    "build_unknown_device": (None, lambda ws: _build(ws) + ["--device", "tpu0"], "is not a torch device"),
    "start_of_another_architecture": (None, lambda ws: _prompt(ws, "--start", _other_arch_start(ws)),
                                      "does not hold the generator's network"),
    # evaluate
    "val_split_of_an_old_checkpoint": (lambda ws, mp: shutil.copy(Path(__file__).parent / "data" / "legacy_params.ckpt",
                                                                  ws.ckpt),
                                       lambda ws: _evaluate(ws, "--split", "val"), "does not record its validation"),
    "runs_zero": (None, lambda ws: _evaluate(ws)[:5] + ["--runs", "0"] + _evaluate(ws)[7:], "must be at least 1"),
    "neither_ckpt_nor_compare": (None, lambda ws: ["evaluate", "--out", str(ws.out)], "give either --ckpt"),
    "compare_without_a_name": (None, lambda ws: ["evaluate", "--compare", str(ws.ckpt), "--out", str(ws.out)],
                               "NAME=CKPT pairs"),
    "store_of_another_architecture": (None, lambda ws: _evaluate(ws)[:3] + ["--store", str(ws.other_store)] +
                                      _evaluate(ws)[5:], "another architecture"),
    "store_missing": (None, lambda ws: _evaluate(ws)[:3] + ["--store", str(ws.root / "gone")] + _evaluate(ws)[5:],
                      "is not there"),
    # build-dataset
    "build_runs_zero": (None, lambda ws: _build(ws)[:3] + _build(ws)[3:] + ["--runs", "0"], "runs must be at least 1"),
    "build_runs_negative": (None, lambda ws: _build(ws) + ["--runs", "-5"], "runs must be at least 1"),
    "build_epochs_zero": (None, lambda ws: _build(ws) + ["--epochs", "0"], "epochs must be at least 1"),
    "build_bad_shard": (None, lambda ws: _build(ws) + ["--shard", "2/2"], "--shard 2/2"),
    "build_bad_task_option": (None, lambda ws: _build(ws) + ["--task-option", "oops"], "NAME=VALUE"),
    "build_over_another_build": (None, lambda ws: _build(ws)[:-1] + [str(ws.store)], "build_config"),
}


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_store(tmp_path_factory):
    from checkpoints_dataset.population import PopulationConfig, build_population

    root = tmp_path_factory.mktemp("cartpole") / "store"
    build_population(get_task("cartpole"), root, PopulationConfig(runs=8, epochs=1, group_size=8, num_checkpoints=2),
                     progress=False)
    return root


@pytest.fixture
def workspace(tmp_path, tiny_digits_store, tiny_generator_ckpt, other_store):
    shutil.copytree(tiny_digits_store, tmp_path / "store")
    shutil.copytree(other_store, tmp_path / "other_store")
    shutil.copy(tiny_generator_ckpt, tmp_path / "gen.ckpt")
    return Workspace(tmp_path, tmp_path / "store", tmp_path / "gen.ckpt", tmp_path / "other_store")


def test_the_sweep_has_25_cases_or_more():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, workspace, monkeypatch, capsys):
    setup, make_args, expect = CASES[case]
    if case == "cuda_device_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if setup is not None:
        setup(workspace, monkeypatch)
    args = make_args(workspace)
    before = _checksums(workspace.root)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exit_:   # never expected: the dispatcher returns 2
        rc = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert expect in errors[0], errors[0]
    after = _checksums(workspace.root)
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"
    assert not set(after) - set(before), f"files written: {sorted(set(after) - set(before))}"


def test_a_recorded_store_with_non_finite_checkpoints_warns_and_trains(tmp_path, capsys):
    """A recorded run whose NaN/inf checkpoints were dropped: train counts them in a warning and goes on."""
    task, root = get_task("digits_mlp"), tmp_path / "recorded"
    create_store(root, task=None, layer_shapes=task.layer_shapes, metric_names=["val_loss"],
                 lower_is_better={"val_loss": True}, permutation_spec=task.permutation_spec.to_json())
    for run in range(10):
        params = task.init_params(4, torch.Generator().manual_seed(run)).numpy()     # [4, P]
        params[1, 0] = np.nan if run % 2 else np.inf                                 # one bad checkpoint per run
        write_shard(root, f"run_{run:03d}", params=params, run_ids=np.full(4, run), steps=np.arange(4),
                    epochs=np.arange(4, dtype=float), metrics={"val_loss": np.linspace(2.0, 1.0, 4)})
    finalize_store(root)
    before = _checksums(root)
    assert open_store(root).num_checkpoints == 30
    assert main(train_args(root, tmp_path / "run", steps=2, extra=["--final_eval_runs", "0"])) == 0
    err = capsys.readouterr().err
    assert "left out 10 checkpoints with non-finite parameters" in err
    assert _checksums(root) == before
