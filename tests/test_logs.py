"""Logs that stay readable: with output redirected to a file (CI, nohup, SLURM), progress comes as a few plain
lines, not a carriage-return redraw per step; a terminal keeps Lightning's tqdm bars."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from gpt_params.training import LogProgressBar

from conftest import train_args


def _run_to_file(args, log) -> str:
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "gpt_params", *args], stdout=out, stderr=subprocess.STDOUT,
                              timeout=600)
    text = log.read_bytes().decode(errors="replace")   # not read_text: it turns "\r" into "\n"
    assert done.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
def test_train_redirected_to_a_file_prints_plain_progress_lines(tiny_digits_store, tmp_path):
    """40 steps with the progress bar on: Lightning's tqdm bar wrote ~400 bytes and 2-3 carriage returns per
    step (16 kB here); the log is now a few kB, none of it redraws, whatever the speed of the machine."""
    steps = 40
    log = _run_to_file(train_args(tiny_digits_store, tmp_path / "run", steps=steps,
                                  extra=["--trainer.enable_progress_bar", "true", "--final_eval_runs", "0"]),
                       tmp_path / "train.log")
    assert log.count("\r") == 0, log[-2000:]
    assert len(log.encode()) < 4000 + 25 * steps, log       # the summary and warnings; ~130 bytes per 10 s
    lines = [line for line in log.splitlines() if line.startswith("Epoch ")]
    assert lines and f"| step {steps}/{steps} |" in lines[-1], log   # the last one, at the end of training
    assert "it/s" in lines[-1] and "val/loss=" in lines[-1]


@pytest.mark.slow
def test_build_dataset_redirected_to_a_file_redraws_its_bar_rarely(tmp_path):
    """12 groups: the bar was redrawn at each group's end and every 0.1 s (37 carriage returns); now at its start,
    every 10 s and at its end."""
    log = _run_to_file(["build-dataset", "--task", "digits_mlp", "--runs", "24", "--group-size", "2",
                        "--epochs", "1", "--out", str(tmp_path / "store")], tmp_path / "build.log")
    assert log.count("\r") <= 4, log
    assert "12.00/12 groups" in log and "TqdmWarning" not in log, log   # the total is reached, never passed


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s):
        return len(s)

    def flush(self):
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_a_terminal_keeps_the_tqdm_bars(tty, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Stream(tty))
    bar = LogProgressBar()
    bar.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert bar.is_enabled is tty                 # the tqdm bars draw only on a terminal
    assert bar._printing() is not tty           # plain lines otherwise
    assert LogProgressBar(plain=True).is_enabled is False and LogProgressBar(plain=False).is_enabled is True
