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
