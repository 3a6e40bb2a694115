"""Reward conditioning end to end: a tiny CartPole store, a few training steps, prompting for a return."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_dataset import get_task, open_store, state_dict_to_vector
from gpt_params.cli import main
from gpt_params.core.generator import Generator
from conftest import QUIET, TINY_MODEL


@pytest.fixture(scope="module")
def cartpole_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cartpole")
    assert main(["build-dataset", "--task", "cartpole", "--runs", "8", "--epochs", "2", "--out",
                 str(root / "store")]) == 0
    assert main(["train", "--config", "configs/cartpole.yaml", "--data.root", str(root / "store"),
                 "--trainer.default_root_dir", str(root / "run"), "--trainer.max_steps", "6",
                 "--data.batch_size", "8", "--final_eval_runs", "2", "--trainer.callbacks", "[]",
                 *TINY_MODEL, *QUIET]) == 0
    return next(root.glob("run/lightning_logs/version_*/checkpoints/last.ckpt"))


def _store(cartpole_ckpt):
    return cartpole_ckpt.parents[4] / "store"          # root/run/lightning_logs/version_0/checkpoints/last.ckpt


def test_prompt_for_a_return_prints_and_records_achieved(cartpole_ckpt, tmp_path, capsys):
    out = tmp_path / "policies"
    assert main(["prompt", "--ckpt", str(cartpole_ckpt), "--target", "400", "--num", "2", "--out", str(out),
                 "--steps", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "return"
    task = get_task("cartpole")
    for rec in results["records"]:
        # the recorded return is the evaluation of the policy in the written file
        vec = state_dict_to_vector(load_file(str(out / rec["file"])), task.layer_shapes)
        assert rec["target"] == 400
        assert rec["achieved"]["return"] == pytest.approx(task.evaluate(vec[None])["return"].item(), rel=1e-6)
    assert "return" in capsys.readouterr().out


def test_a_copied_checkpoint_gets_its_recorded_return(cartpole_ckpt, tmp_path, monkeypatch):
    """With a generator that returns its start unchanged, prompting from a store checkpoint writes that
    checkpoint, and the return prompt reports is the one the store recorded for it when it was built."""
    store = open_store(_store(cartpole_ckpt))
    returns = store.metrics(np.arange(store.num_checkpoints))["return"]
    best = int(np.argmax(returns))                     # the store's best policy (a return far from 0 and 500)
    assert 20 < returns[best] < 500
    task = get_task("cartpole")
    start = tmp_path / "best.safetensors"
    save_file(task.to_state_dict(torch.from_numpy(store.params([best])[0])), str(start))
    monkeypatch.setattr(Generator, "generate", lambda self, start, *args, **kwargs: start.clone())
    out = tmp_path / "copies"
    assert main(["prompt", "--ckpt", str(cartpole_ckpt), "--target", "400", "--num", "2", "--start", str(start),
                 "--out", str(out), "--steps", "1"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["achieved"]["return"] for r in records] == pytest.approx([float(returns[best])] * 2, rel=1e-6)


@pytest.mark.parametrize("target", ["600", "-5"])
def test_return_outside_0_500_is_refused(cartpole_ckpt, tmp_path, target, capsys):
    rc = main(["prompt", "--ckpt", str(cartpole_ckpt), f"--target={target}", "--num", "1",
               "--out", str(tmp_path / "p"), "--steps", "1"])
    assert rc == 2 and "valid range [0" in capsys.readouterr().err
    assert not (tmp_path / "p" / "results.json").exists()
