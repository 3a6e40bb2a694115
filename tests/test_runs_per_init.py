"""Several runs from one init (``runs_per_init``): shared inits, whole init groups held out, and the
diversity section's comparison with the runs trained from the same start."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints_dataset import PopulationConfig, build_population, get_task, open_store
from checkpoints_dataset.__main__ import main
from checkpoints_dataset.population import draw_hparams
from checkpoints_dataset.store import split_last
from gpt_params.evaluation.common import run_endpoints, trained_checkpoints
from gpt_params.evaluation.diversity import _pairwise, diversity

K = 3   # runs per init


@pytest.fixture(scope="module")
def grouped_store(tmp_path_factory):
    """12 digits runs, 3 per init, built through the command line in groups of 4 (not a multiple of 3)."""
    root = tmp_path_factory.mktemp("grouped") / "store"
    assert main(["--task", "digits_mlp", "--runs", "12", "--epochs", "1", "--group-size", "4", "--checkpoints", "4",
                 "--runs-per-init", str(K), "--seed", "5", "--out", str(root), "--no-progress"]) == 0
    return open_store(root)


def test_runs_of_one_init_group_share_its_seed_and_scale():
    config = PopulationConfig(runs=6, runs_per_init=K, seed=2)
    h = [draw_hparams(config, r) for r in range(6)]
    assert [x["init_group"] for x in h] == [0, 0, 0, 1, 1, 1]
    for group in (h[:3], h[3:]):
        assert len({x["init_seed"] for x in group}) == 1 and len({x["init_scale"] for x in group}) == 1
        assert len({x["seed"] for x in group}) == 3   # data order and the other hyperparameters differ
    assert h[0]["init_seed"] != h[3]["init_seed"]
    one = draw_hparams(PopulationConfig(runs=6, seed=2), 4)
    assert "init_seed" not in one and "init_group" not in one   # one run per init: as every store before
    assert "runs_per_init" not in PopulationConfig().to_json() and config.to_json()["runs_per_init"] == K
    with pytest.raises(ValueError, match="runs_per_init"):
        PopulationConfig(runs_per_init=0)


def test_a_group_starts_from_one_init_and_trains_apart(grouped_store):
    s = grouped_store
    first, last = (np.asarray(s.params(i)) for i in run_endpoints(s, s.runs))
    for g in range(4):
        rows = slice(g * K, (g + 1) * K)
        assert np.array_equal(first[rows], np.repeat(first[rows][:1], K, axis=0))   # one init
        assert min(np.abs(last[g * K + i] - last[g * K + j]).max() for i in range(K) for j in range(i)) > 1e-3
        assert {s.init_group(r) for r in range(g * K, (g + 1) * K)} == {g}
    assert not np.array_equal(first[0], first[K])                                  # groups differ
    # held out: whole init groups (the last 4 runs widen to the last two groups), so no test init is trained on
    assert s.test_runs.tolist() == list(range(6, 12)) and s.train_runs.tolist() == list(range(6))


def test_grouping_and_shards_do_not_change_the_runs(grouped_store, tmp_path):
    config = PopulationConfig(runs=12, epochs=1, group_size=12, num_checkpoints=4, runs_per_init=K, seed=5)
    other = build_population(get_task("digits_mlp"), tmp_path / "one_group", config, progress=False)
    idx = np.arange(grouped_store.num_checkpoints)
    order = np.lexsort((grouped_store.steps, grouped_store.run_ids))
    order2 = np.lexsort((other.steps, other.run_ids))
    np.testing.assert_array_equal(np.asarray(grouped_store.params(idx[order])), np.asarray(other.params(order2)))


def test_split_last_widens_to_whole_groups_and_keeps_one():
    group = {r: r // 3 for r in range(9)}.get
    assert split_last(range(9), 2, group) == ([0, 1, 2, 3, 4, 5], [6, 7, 8])
    assert split_last(range(9), 4, group) == ([0, 1, 2], [3, 4, 5, 6, 7, 8])
    assert split_last(range(3), 2, group) == ([0, 1, 2], [])            # one group: it stays for training
    assert split_last(range(5), 2, lambda r: None) == ([0, 1, 2], [3, 4])   # no groups: the last runs
    assert split_last(range(5), 0, group) == ([0, 1, 2, 3, 4], [])


def test_validation_runs_are_whole_init_groups(grouped_store, tmp_path):
    from gpt_params.training.data import ParameterDataModule

    dm = ParameterDataModule(root=str(grouped_store.root), task="digits_mlp", val_runs=1)
    assert dm.val_run_ids.tolist() == [3, 4, 5] and dm.train_run_ids.tolist() == [0, 1, 2]
    assert dm.info.val_runs == (3, 4, 5)
    # a store whose training runs are one init group leaves no validation init: refused with the fix
    config = PopulationConfig(runs=6, epochs=1, group_size=6, num_checkpoints=2, runs_per_init=K)
    build_population(get_task("digits_mlp"), tmp_path / "two_groups", config, progress=False)
    with pytest.raises(ValueError, match="one init group.*build more runs"):
        ParameterDataModule(root=str(tmp_path / "two_groups"), task="digits_mlp")


def test_the_data_module_builds_runs_per_init(tmp_path):
    from gpt_params.training.data import ParameterDataModule

    built = ParameterDataModule.prepare_store(root=str(tmp_path / "s"), task="digits_mlp", build_runs=6,
                                              build_epochs=1, build_checkpoints=2, build_runs_per_init=3)
    assert built.manifest["build_config"]["runs_per_init"] == 3
    assert [built.init_group(r) for r in range(6)] == [0, 0, 0, 1, 1, 1] and built.test_runs.tolist() == [3, 4, 5]


class Identity:
    """Returns its start: every network from one start is that start."""
    metric, lower_is_better = "val_error", True

    def __init__(self, store):
        m = store.metrics(trained_checkpoints(store, store.train_runs))["val_error"]
        self.data_range = (float(m.min()), float(m.max()))

    def generate(self, start, start_metric, target, *, sampler, steps, guidance, generator):
        return start.clone()


def test_diversity_compares_one_start_with_the_runs_trained_from_it(grouped_store):
    task, s = get_task("digits_mlp"), grouped_store
    res, _ = diversity(Identity(s), task, s, runs=6, num_networks=4)
    same = res["same_init"]
    assert same["runs"] == [6, 7, 8] and same["pairwise_distance"]["generated"]["max"] < 1e-5
    _, finals = run_endpoints(s, [6, 7, 8])
    expected = _pairwise(torch.as_tensor(s.params(finals)), task.permutation_spec)
    assert same["pairwise_distance"]["trained"]["median"] == pytest.approx(float(np.median(expected)))
    assert same["pairwise_distance"]["trained"]["min"] > 1e-3   # trained apart from one init
    # across starts: one network per init (runs 6-8 are one start), so two starts here, not four copies of one
    assert res["across_starts"]["num_generated"] == 2
    assert res["across_starts"]["pairwise_distance"]["generated"]["min"] > 1.0
