"""Shared fixtures: one tiny digits_mlp store built once per test session (real runs, seconds)."""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    # one thread: small ops gain nothing from more and thrash on a busy 2-core machine
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_digits_store(tmp_path_factory):
    """A real digits_mlp store: 24 runs x 2 epochs, 8 checkpoints each (built vectorized in seconds)."""
    from checkpoints_dataset import get_task
    from checkpoints_dataset.population import PopulationConfig, build_population

    root = tmp_path_factory.mktemp("stores") / "digits_tiny"
    config = PopulationConfig(runs=24, epochs=2, seed=0, group_size=24, num_checkpoints=8)
    build_population(get_task("digits_mlp"), root, config, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_field_store(tmp_path_factory):
    """A real digits_field store: 12 runs x 200 Adam steps, 3 checkpoints each (fields of 8x8 digits)."""
    from gpt_params.cli import main

    root = tmp_path_factory.mktemp("stores") / "digits_field_tiny"
    assert main(["build-dataset", "--task", "digits_field", "--out", str(root), "--runs", "12", "--epochs", "2",
                 "--checkpoints", "3", "--no-progress", "--optimizers", "adam"]) == 0
    return root


TINY_MODEL = ["--model.dit.size", "XS", "--model.dit.depth", "1", "--model.dit.hidden_size", "32",
              "--model.dit.num_heads", "2"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def train_args(store, root, steps=12, extra=()):
    """`gpt-params train` arguments for a tiny model on a tiny store."""
    return ["train", "--data.root", str(store), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--data.batch_size", "16", "--final_eval_runs", "2",
            *TINY_MODEL, *QUIET, *extra]


@pytest.fixture(scope="session")
def tiny_generator_ckpt(tiny_digits_store, tmp_path_factory):
    """A generator trained for 12 steps on the tiny store through `gpt-params train` (its last.ckpt); what the
    command printed is in ``stdout.txt`` of the run's root (``ckpt.parents[3]``)."""
    import contextlib
    import io

    from gpt_params.cli import main

    root = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(train_args(tiny_digits_store, root))
    (root / "stdout.txt").write_text(printed.getvalue())
    assert rc == 0, printed.getvalue()[-3000:]
    ckpts = sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    assert len(ckpts) == 1
    return ckpts[0]


def builtin_task(name: str, **options):
    """``get_task(name)``, or skip the test when the task's data files are missing here (Fashion-MNIST on a fresh
    machine: the reason names the Debian package and ``download_fashion_mnist``)."""
    from checkpoints_dataset import get_task

    try:
        return get_task(name, **options)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))


def refused(args: list[str], capsys) -> str:
    """Run a gpt-params command that must be refused: it returns 2 (bad input); its message (stderr)."""
    from gpt_params.cli import main

    assert main(args) == 2
    return capsys.readouterr().err
