"""The cartpole task's REINFORCE population trainer (checkpoints_dataset/tasks/cartpole/trainer.py), the default."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

from checkpoints_dataset.params import tensors_to_vector, vector_to_tensors
from checkpoints_dataset.population import PopulationConfig, draw_hparams
from checkpoints_dataset.tasks import get_task
from checkpoints_dataset.tasks.cartpole.env import MAX_EPISODE_STEPS, cartpole_step
from checkpoints_dataset.tasks.cartpole.trainer import advantages, play_episodes, policy_gradient

CONFIG = PopulationConfig(runs=6, epochs=6, num_checkpoints=6, seed=3)  # 30 updates per run


@pytest.fixture(scope="module")
def task():
    return get_task("cartpole", trainer="reinforce")


def train(task, run_ids):
    hparams = [draw_hparams(CONFIG, r) for r in run_ids]
    return task.train_population(hparams, CONFIG, "cpu"), hparams


@pytest.fixture(scope="module")
def trained(task):
    return train(task, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def episodes(task):
    """3 policies (random inits of growing scale) x 5 recorded episodes, with their generators' seeds."""
    seeds = [11, 12, 13]
    theta = task.init_params(3, torch.Generator().manual_seed(0)) * torch.tensor([[0.5], [1.0], [3.0]])
    obs, actions, lengths = play_episodes(task._model, theta, task.layer_shapes,
                                          [torch.Generator().manual_seed(s) for s in seeds], 5)
    return seeds, theta, obs, actions, lengths


def test_episodes_follow_the_dynamics(episodes):
    seeds, theta, obs, actions, lengths = episodes
    R, T, G = actions.shape
    assert obs.shape == (R, T, G, 4) and T == MAX_EPISODE_STEPS and lengths.shape == (R, G)
    assert lengths.min() >= 1 and lengths.float().std() > 0  # episodes of different lengths
    for r, s in enumerate(seeds):  # replay the recorded actions from the run's own starts
        starts = torch.rand(G, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64) * 0.1 - 0.05
        for g in range(G):
            state, n = tuple(starts[g:g + 1].T.contiguous()), int(lengths[r, g])
            for t in range(n):
                assert torch.equal(obs[r, t, g], torch.stack(state, 1)[0].float())
                state, terminated = cartpole_step(state, actions[r, t, g:g + 1])
                assert bool(terminated) == (t == n - 1) or n == T  # it ends exactly at its length
            assert not obs[r, n:, g].any() and not actions[r, n:, g].any()  # masked after the end


def test_advantages_equal_a_per_episode_reference():
    lengths = torch.tensor([[3, 5, 5], [500, 2, 500]])
    T, gamma = 8, 0.9
    adv = advantages(lengths, T, gamma)
    for r in range(2):
        rtg = [[sum(gamma ** k for k in range(int(n) - t)) if t < n else None for t in range(T)]
               for n in lengths[r].tolist()]  # [G][T], None after the end
        for t in range(T):
            alive = [x[t] for x in rtg if x[t] is not None]
            for g in range(3):
                want = 0.0 if rtg[g][t] is None else rtg[g][t] - sum(alive) / len(alive)
                assert adv[r, t, g].item() == pytest.approx(want, abs=1e-5)


def test_batched_gradient_equals_a_per_run_reference(task, episodes):
    _, theta, obs, actions, lengths = episodes
    R, T, G = actions.shape
    adv = advantages(lengths, T, 0.99)
    grad = policy_gradient(task._model, theta, task.layer_shapes, obs, actions, adv)  # [R, P]
    assert grad.shape == theta.shape and grad.abs().sum(1).min() > 0
    model = get_task("cartpole").build_model()  # a plain nn.Module, one run at a time
    for r in range(R):
        params = {k: v[0].clone().requires_grad_(True)
                  for k, v in vector_to_tensors(theta[r:r + 1], task.layer_shapes).items()}
        logp = torch.log_softmax(functional_call(model, params, (obs[r].reshape(-1, 4),)), -1)  # [T*G, 2]
        loss = -(logp[torch.arange(T * G), actions[r].reshape(-1)] * adv[r].reshape(-1)).sum() / G
        ref = tensors_to_vector({k: g[None] for k, g in zip(params, torch.autograd.grad(loss, list(params.values())))},
                                task.layer_shapes)[0]
        torch.testing.assert_close(grad[r], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_population_training_raises_the_greedy_return(task, trained):
    result, hparams = trained
    R, C = 4, CONFIG.num_checkpoints
    assert result.params.shape == (R, C, task.num_params) and result.steps[0] == 0
    assert result.steps[-1] == CONFIG.epochs * task.generations_per_epoch
    returns = result.metrics["return"]  # [R, C]
    assert torch.equal(task.evaluate(result.params[:, -1])["return"], returns[:, -1])  # stored = re-scored
    assert all(h["trainer"] == "reinforce" and h["pg_episodes"] == task.pg_episodes
               and task.pg_lr[0] <= h["lr"] <= task.pg_lr[1] for h in hparams)
    assert returns[:, -1].mean() > returns[:, 0].mean() + 80, returns


def test_runs_depend_on_their_own_seed_only(task, trained):
    result, _ = trained
    again, _ = train(task, [0, 1, 2, 3])
    assert torch.equal(again.params, result.params) and torch.equal(again.metrics["return"], result.metrics["return"])
    other, _ = train(task, [5, 2])  # run 2 in another group, at another position
    assert torch.equal(other.params[1], result.params[2])
    assert not torch.equal(other.params[0, -1], result.params[0, -1])


@pytest.mark.parametrize("kwargs, match", [
    ({"trainer": "ppo"}, "trainer must be 'reinforce' or 'es'"),
    ({"pg_episodes": 0}, "pg_episodes must be >= 1"),
    ({"pg_lr": (0.01, 0.001)}, "pg_lr must be a range"),
    ({"pg_lr": (0.0, 0.01)}, "pg_lr must be a range"),
    ({"pg_gamma": 0.0}, "pg_gamma must be in"),
    ({"pg_gamma": 1.5}, "pg_gamma must be in"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_task("cartpole", **kwargs)


def test_a_build_records_its_trainer_and_refuses_to_resume_with_another(tmp_path):
    from checkpoints_dataset import StoreError, build_population, open_store
    from gpt_params.training.data import ParameterDataModule

    config = PopulationConfig(runs=8, epochs=1, num_checkpoints=2, group_size=4)
    es = get_task("cartpole", trainer="es", es_population=4)
    assert build_population(es, tmp_path, config, shard=(0, 2), progress=False) is None  # one group of two
    assert open_store(tmp_path).manifest["build_config"]["task_options"]["trainer"] == "es"
    with pytest.raises(StoreError, match="build_config"):  # the default trainer would mix REINFORCE runs in
        build_population(get_task("cartpole"), tmp_path, config, shard=(1, 2), progress=False)
    with pytest.raises(ValueError, match=r"differ on \['trainer'\]"):  # finishing it with REINFORCE is refused
        ParameterDataModule.prepare_store(root=str(tmp_path), task="cartpole", task_options={"trainer": "reinforce"})
    with pytest.raises(ValueError, match="finish the build first"):   # the data module only opens complete stores
        ParameterDataModule(root=str(tmp_path), task="cartpole", val_runs=1)
    ParameterDataModule.prepare_store(root=str(tmp_path), task="cartpole")  # resumes with the store's options
    data = ParameterDataModule(root=str(tmp_path), task="cartpole", val_runs=1)
    assert data.store.num_runs == 8 and all(data.store.run_hparams(r)["trainer"] == "es" for r in data.store.runs)
    assert ParameterDataModule(root=str(tmp_path), val_runs=1, task_options={  # the same options, tuples or lists
        "trainer": "es", "es_sigma": (0.03, 0.2), "es_population": np.int64(4)}).store.num_runs == 8


def test_build_dataset_takes_task_options(tmp_path):
    """``--task-option NAME=VALUE`` reaches the task: an ES build of narrow cartpole policies from the command
    line. The store keeps the options that shape it, and the data module evaluates with them."""
    from checkpoints_dataset import open_store
    from checkpoints_dataset.__main__ import main
    from gpt_params.training.data import ParameterDataModule

    assert main(["--task", "cartpole", "--out", str(tmp_path), "--runs", "8", "--epochs", "1", "--checkpoints", "2",
                 "--group-size", "8", "--no-progress", "--task-option", "trainer=es", "--task-option", "hidden=8",
                 "--task-option", "es_population=2", "--task-option", "es_lr=(0.01, 0.02)"]) == 0
    store = open_store(tmp_path)
    options = store.manifest["build_config"]["task_options"]
    assert options["trainer"] == "es" and options["es_population"] == 2 and options["es_lr"] == [0.01, 0.02]
    assert options["hidden"] == 8 and store.num_params == 4 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    data = ParameterDataModule(root=str(tmp_path), val_runs=1)
    assert data.task.num_params == store.num_params and data.task_ref.options["hidden"] == 8  # scored as built
    with pytest.raises(ValueError, match=r"differ on \['hidden'\]"):
        ParameterDataModule(root=str(tmp_path), val_runs=1, task_options={"hidden": 32})
    with pytest.raises(ValueError, match="cannot be built with the options"):
        ParameterDataModule(root=str(tmp_path), val_runs=1, task_options={"bogus": 1})
