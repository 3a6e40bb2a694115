"""A task name read from a file is data: a store or checkpoint naming an import path is refused (exit 2, the
option that would allow it named, nothing imported or run) unless the user gives the same path; a user task
given by path works end to end."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from checkpoints_dataset import open_store
from conftest import QUIET, TINY_MODEL, train_args
from gpt_params.cli import main

EVIL = '''
import os, pathlib
pathlib.Path(os.environ["EVIL_MARKER"]).write_text("imported")
from checkpoints_dataset.tasks import Task

class Evil(Task):
    def __init__(self, **options):
        pathlib.Path(os.environ["EVIL_MARKER"]).write_text("constructed")
'''


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported or when its task is built."""
    name = f"evil_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    yield f"{name}:Evil", marker
    assert name not in sys.modules, "the module named by the file was imported"


def _store_naming(src, dst, task: str, options: dict | None = None):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["task"] = task
    if options is not None:
        manifest.setdefault("build_config", {})["task_options"] = options
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _ckpt_naming(src, dst, task: str):
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["gpt_params"]["generator"]["data"]["task"] = task
    ckpt["hyper_parameters"]["data_info"]["task"] = task
    torch.save(ckpt, dst)
    return dst


def _refused(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_train_refuses_a_store_that_names_an_import_path(evil, tiny_digits_store, tmp_path, capsys):
    task, marker = evil
    store = _store_naming(tiny_digits_store, tmp_path / "store", task)
    err = _refused(train_args(store, tmp_path / "run"), capsys)
    assert f"pass --data.task {task} to import" in err and not marker.exists()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


def test_the_issue_s_manifest_runs_no_command(tiny_digits_store, tmp_path, capsys):
    """The manifest of the report: subprocess:run with {"args": ["touch", FILE]} used to create FILE."""
    touched = tmp_path / "touched"
    store = _store_naming(tiny_digits_store, tmp_path / "store", "subprocess:run", {"args": ["touch", str(touched)]})
    err = _refused(train_args(store, tmp_path / "run"), capsys)
    assert "pass --data.task subprocess:run" in err and not touched.exists()


def test_prompt_and_evaluate_refuse_a_checkpoint_that_names_an_import_path(evil, tiny_generator_ckpt,
                                                                           tiny_digits_store, tmp_path, capsys):
    task, marker = evil
    ckpt = _ckpt_naming(tiny_generator_ckpt, tmp_path / "evil.ckpt", task)
    err = _refused(["prompt", "--ckpt", str(ckpt), "--target", "0.3", "--num", "1", "--steps", "1",
                    "--out", str(tmp_path / "out")], capsys)
    assert f"pass --task {task} to import" in err
    err = _refused(["evaluate", "--ckpt", str(ckpt), "--store", str(tiny_digits_store), "--runs", "1", "--steps", "1",
                    "--out", str(tmp_path / "report")], capsys)
    assert f"pass --task {task} to import" in err
    assert not marker.exists() and not (tmp_path / "out" / "results.json").exists()


def test_evaluate_refuses_a_store_that_names_an_import_path(evil, tiny_generator_ckpt, tiny_digits_store, tmp_path,
                                                            capsys):
    """A generator without a task (trained on a recorded store) falls back on the store's task: a name from a file."""
    task, marker = evil
    ckpt = torch.load(tiny_generator_ckpt, map_location="cpu", weights_only=True)
    ckpt["gpt_params"]["generator"]["data"]["task"] = None
    torch.save(ckpt, tmp_path / "taskless.ckpt")
    store = _store_naming(tiny_digits_store, tmp_path / "store", task)
    err = _refused(["evaluate", "--ckpt", str(tmp_path / "taskless.ckpt"), "--store", str(store), "--runs", "1",
                    "--steps", "1", "--out", str(tmp_path / "report")], capsys)
    assert f"pass --task {task} to import" in err and not marker.exists()


@pytest.mark.slow
def test_a_user_task_given_by_path_works_end_to_end(tmp_path, capsys):
    path = "tests.user_task:SmallDigits"
    store = tmp_path / "store"
    assert main(["build-dataset", "--task", path, "--runs", "12", "--epochs", "1", "--group-size", "12",
                 "--checkpoints", "4", "--out", str(store), "--no-progress"]) == 0
    assert open_store(store).task == path                      # the import path, not Task.name
    capsys.readouterr()
    monitor = ["--trainer.callbacks+=gpt_params.training.AlignmentMonitor",
               "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.runs=2"]
    args = ["train", "--data.root", str(store), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.max_steps", "6", "--data.batch_size", "8", "--final_eval_runs", "2", *TINY_MODEL, *QUIET]
    assert f"pass --data.task {path}" in _refused(args, capsys)   # the store names it; the user has not
    assert main(args + ["--data.task", path, *monitor]) == 0
    assert "Prompt alignment on 2 held-out runs" in capsys.readouterr().out
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    prompt = ["prompt", "--ckpt", str(ckpt), "--target", "0.3", "--num", "2", "--steps", "2"]
    assert f"pass --task {path}" in _refused(prompt + ["--out", str(tmp_path / "p0")], capsys)
    assert main(prompt + ["--out", str(tmp_path / "p1"), "--task", path]) == 0
    records = json.loads((tmp_path / "p1" / "results.json").read_text())["records"]
    assert len(records) == 2
    from safetensors.torch import load_file

    from checkpoints_dataset import state_dict_to_vector
    from tests.user_task import SmallDigits
    task = SmallDigits()
    for rec in records:   # the achieved metric is the user task's evaluation of the written network
        vec = state_dict_to_vector(load_file(str(tmp_path / "p1" / rec["file"])), task.layer_shapes)
        assert rec["achieved"]["val_error"] == pytest.approx(task.evaluate(vec[None])["val_error"].item())
    err = _refused(["evaluate", "--ckpt", str(ckpt), "--task", path, "--compare", f"a={ckpt}", "--runs", "2",
                    "--steps", "2", "--out", str(tmp_path / "modes")], capsys)
    assert "give either --ckpt CKPT (one generator) or --compare NAME=CKPT" in err   # one or the other
    assert main(["evaluate", "--compare", f"a={ckpt}", "--task", path, "--runs", "2", "--steps", "2",
                 "--out", str(tmp_path / "modes")]) == 0
    assert (tmp_path / "modes" / "modes.json").exists()


def test_a_store_that_names_a_user_task_by_its_name_opens_with_its_path(tmp_path):
    """Stores built before import paths were recorded name a user task by Task.name: giving its path opens them."""
    from checkpoints_dataset.tasks import TaskRef

    with pytest.raises(ValueError, match="neither built in .* nor an import path; pass --task"):
        TaskRef.from_file("small_digits", source="the store")
    ref = TaskRef.from_file("small_digits", given="tests.user_task:SmallDigits", source="the store")
    assert ref.name == "tests.user_task:SmallDigits" and ref.task.num_params == 64 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(ValueError, match="neither built in"):   # another task's path does not open it
        TaskRef.from_file("small_digits", given="tests.test_tasks:_TinyTask", source="the store")


@pytest.mark.parametrize("hidden, params", [("8", 64 * 8 + 8 + 8 * 10 + 10),
                                            ("[8, 8]", 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10)])
def test_a_digits_store_of_another_width_or_depth_records_it_and_trains(hidden, params, tmp_path, capsys):
    store = tmp_path / "wide"
    assert main(["build-dataset", "--task", "digits_mlp", "--task-option", f"hidden={hidden}", "--runs", "12",
                 "--epochs", "1", "--group-size", "12", "--checkpoints", "3", "--no-progress", "--out", str(store)]) == 0
    built = open_store(store)
    assert built.manifest["build_config"]["task_options"] == {"hidden": json.loads(hidden)}
    assert built.num_params == params
    args = ["train", "--data.root", str(store), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.max_steps", "2", "--data.batch_size", "8", "--final_eval_runs", "2", *TINY_MODEL, *QUIET]
    assert main(args) == 0 and "Prompt alignment on 2 held-out runs" in capsys.readouterr().out
