"""Reward conditioning end to end: a tiny CartPole store, a few training steps, prompting for a return."""
from __future__ import annotations

import json

import pytest

from gpt_params.cli import main
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


def test_prompt_for_a_return_prints_and_records_achieved(cartpole_ckpt, tmp_path, capsys):
    out = tmp_path / "policies"
    assert main(["prompt", "--ckpt", str(cartpole_ckpt), "--target", "400", "--num", "2", "--out", str(out),
                 "--steps", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "return"
    for rec in results["records"]:
        assert rec["target"] == 400 and 0 <= rec["achieved"]["return"] <= 500
    assert "return" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["600", "-5"])
def test_return_outside_0_500_is_refused(cartpole_ckpt, tmp_path, target, capsys):
    rc = main(["prompt", "--ckpt", str(cartpole_ckpt), f"--target={target}", "--num", "1",
               "--out", str(tmp_path / "p"), "--steps", "1"])
    assert rc == 2 and "valid range [0" in capsys.readouterr().err
    assert not (tmp_path / "p" / "results.json").exists()
