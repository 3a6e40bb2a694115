"""The batched CartPole against gymnasium's CartPole-v1, the cartpole task and its ES trainer."""

import gymnasium
import numpy as np
import pytest
import torch

from checkpoints_dataset.params import tensors_to_vector, vector_to_tensors
from checkpoints_dataset.population import PopulationConfig, draw_hparams
from checkpoints_dataset.tasks import get_task
from checkpoints_dataset.tasks.cartpole.env import MAX_EPISODE_STEPS, cartpole_step, initial_states, rollout
from checkpoints_dataset.tasks.cartpole.evaluator import batched_returns, greedy_act_fn, policy_chunks


@pytest.fixture(scope="module")
def task():
    return get_task("cartpole")


def gymnasium_episode(seed: int, policy):
    """States (float64, after reset and after every step) and return of one real episode;
    ``policy(obs [4] float32, t) -> action``."""
    env = gymnasium.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    states, total, t = [env.unwrapped.state.copy()], 0.0, 0
    while True:
        obs, reward, terminated, truncated, _ = env.step(int(policy(torch.from_numpy(obs), t)))
        states.append(env.unwrapped.state.copy())
        total, t = total + reward, t + 1
        if terminated or truncated:
            return np.stack(states), total


def heuristic_policy(task, gain: float) -> torch.Tensor:
    """A policy vector pushing towards the pole's lean (theta + gain * theta_dot): long episodes."""
    shapes = task.layer_shapes
    t = {name: torch.zeros(1, *shape) for name, shape in shapes.items()}
    t["0.weight"][0, 0, 2], t["0.weight"][0, 0, 3] = 5.0, 5.0 * gain
    t["2.weight"][0, 0, 0] = 1.0
    t["4.weight"][0, 0, 0], t["4.weight"][0, 1, 0] = -1.0, 1.0
    return tensors_to_vector(t, shapes)  # [1, P]


@pytest.mark.parametrize("kind", ["random", "fixed"])
def test_batched_steps_equal_gymnasium_bit_for_bit(kind):
    seeds = list(range(7, 37))
    table = torch.from_numpy(np.random.default_rng(0).integers(0, 2, size=(len(seeds), MAX_EPISODE_STEPS)))
    gains = torch.linspace(0.0, 0.6, len(seeds))  # fixed feedback policies: push towards the lean

    def policy(i, obs, t):  # obs [..., 4] float32 -> actions [...]
        if kind == "random":
            return table[i, t]
        return (obs[..., 2] + gains[i] * obs[..., 3] > 0).long()

    reference = [gymnasium_episode(s, lambda obs, t, i=i: policy(i, obs, t)) for i, s in enumerate(seeds)]
    starts = torch.from_numpy(initial_states(seeds))  # [E, 4]
    assert all(np.array_equal(starts[i].numpy(), states[0]) for i, (states, _) in enumerate(reference))
    step = [0]

    def act(obs, ids):  # one episode per "policy": rows of length 1; obs feature-major [4, K'', 1]
        assert obs.dtype == torch.float32 and obs.shape == (4, len(ids), 1)
        step[0] += 1
        return policy(ids[:, None], obs.permute(1, 2, 0), step[0] - 1)  # [K'', 1]

    trace = []
    returns = rollout(act, torch.arange(len(seeds)), starts, trace=trace)
    assert returns.tolist() == [total for _, total in reference]
    if kind == "fixed":
        assert MAX_EPISODE_STEPS in returns.tolist()
    for i, (states, _) in enumerate(reference):
        got = torch.stack([trace[t][i] for t in range(len(states) - 1)]).numpy()  # [steps, 4]
        assert got.dtype == np.float64 and np.array_equal(got, states[1:])


def test_cartpole_step_equals_gymnasium_bit_for_bit():
    """The stateless step (the trainers' dynamics) on the columns of many episodes at once."""
    seeds = list(range(50, 80))
    actions = np.random.default_rng(1).integers(0, 2, size=(len(seeds), MAX_EPISODE_STEPS))
    reference = [gymnasium_episode(s, lambda obs, t, i=i: actions[i, t]) for i, s in enumerate(seeds)]
    state = tuple(torch.from_numpy(initial_states(seeds)).T.contiguous())  # 4 x [E] float64
    lengths = [len(states) - 1 for states, _ in reference]
    assert min(lengths) < max(lengths) < 100  # random actions end every episode within a few dozen steps
    for t in range(max(lengths)):  # finished episodes step on, unchecked
        state, terminated = cartpole_step(state, torch.from_numpy(actions[:, t]))
        for i, (states, _) in enumerate(reference):
            if t + 1 < len(states):
                assert np.array_equal(torch.stack(state, 1)[i].numpy(), states[t + 1])
                assert bool(terminated[i]) == (t + 2 == len(states))


def test_torch_dynamics_follow_the_numpy_ones():
    """rollout's torch dynamics (the CUDA path), run on CPU, against its bit-exact numpy dynamics."""
    seeds = list(range(200, 264))
    starts = torch.from_numpy(initial_states(seeds))  # [E, 4]
    gains = torch.linspace(0.0, 0.6, len(seeds))  # [E] lean-following feedback: long episodes

    def act(obs, ids):  # [4, K'', 1] -> [K'', 1]
        return obs[2] + gains[ids][:, None] * obs[3] > 0

    traces = {d: [] for d in ("numpy", "torch")}
    returns = {d: rollout(act, torch.arange(len(seeds)), starts, trace=traces[d], dynamics=d) for d in traces}
    assert returns["numpy"].max() == MAX_EPISODE_STEPS and returns["numpy"].min() < 100
    assert (returns["numpy"] == returns["torch"]).float().mean() >= 0.9  # one ulp apart, rarely a step
    early = min(len(traces["numpy"]), len(traces["torch"]), 20)
    assert all(torch.allclose(traces["numpy"][t], traces["torch"][t], rtol=0, atol=1e-12) for t in range(early))
    with pytest.raises(ValueError, match="dynamics must be"):
        rollout(act, torch.arange(len(seeds)), starts, dynamics="jax")


def test_rollout_of_nothing():
    act = lambda obs, ids: obs[0] > 0  # noqa: E731
    starts = torch.from_numpy(initial_states([1, 2]))
    assert rollout(act, torch.arange(2), starts, max_steps=0).tolist() == [0.0, 0.0]
    assert rollout(act, torch.arange(0), starts[:0]).shape == (0,)
    assert rollout(act, torch.arange(2), starts, max_steps=3).tolist() == [3.0, 3.0]  # truncated


@pytest.mark.parametrize("L", [1, 5])  # the first layer as addcmuls (rows of 1-3 episodes) or as a matmul
def test_greedy_act_fn_equals_the_module_argmax(task, L):
    """The lean inference forward (first layer as addcmuls or a matmul, logit difference) picks the module's
    argmax."""
    g = torch.Generator().manual_seed(0)
    params = task.init_params(64, g) * 3.0  # [K, P]
    obs = torch.randn(64, L, 4, generator=g)  # [K, L, 4]
    model = task.build_model()
    logits = torch.stack([torch.func.functional_call(model, {k: v[i] for k, v in
                                                             vector_to_tensors(params, task.layer_shapes).items()}, obs[i])
                          for i in range(64)])  # [K, L, 2]
    ids = torch.arange(64).flip(0)  # rows in another order than the policies
    got = greedy_act_fn(model, vector_to_tensors(params, task.layer_shapes))(obs[ids].permute(2, 0, 1), ids)
    want = logits[ids].argmax(-1)  # [K, L]
    clear = (logits[ids, :, 1] - logits[ids, :, 0]).abs() > 1e-5  # not a near-tie
    assert clear.float().mean() > 0.99 and torch.equal(got.long()[clear], want[clear])
    assert 0.2 < want.float().mean() < 0.8  # both actions occur


def test_greedy_act_fn_reads_its_observations_afresh(task):
    """The forward keeps buffers and views per observation tensor: an update in place, another tensor of the
    same shape and other rows all give what a fresh forward gives."""
    g = torch.Generator().manual_seed(1)
    tensors = vector_to_tensors(task.init_params(16, g) * 3.0, task.layer_shapes)
    act = greedy_act_fn(task._model, tensors)
    fresh = lambda obs, ids: greedy_act_fn(task._model, tensors)(obs, ids).clone()  # noqa: E731
    obs, ids = torch.randn(4, 16, 3, generator=g), torch.arange(16)
    first = act(obs, ids).clone()
    assert torch.equal(first, fresh(obs, ids))
    obs.copy_(torch.randn(4, 16, 3, generator=g))  # the same tensor, new values
    assert torch.equal(act(obs, ids), fresh(obs, ids)) and not torch.equal(act(obs, ids), first)
    other = torch.randn(4, 16, 3, generator=g)
    assert torch.equal(act(other, ids), fresh(other, ids))
    rows = torch.tensor([3, 3, 0, 9])
    assert torch.equal(act(other[:, :4], rows), fresh(other[:, :4], rows))


def test_policies_are_rolled_out_in_chunks(task):
    assert policy_chunks(10, 3, max_episodes=7) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    assert policy_chunks(3, 100, max_episodes=50) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # one policy at least
    assert policy_chunks(0, 5) == [] and policy_chunks(4, 5) == [slice(0, 4)]
    params = torch.cat([heuristic_policy(task, 0.3), task.init_params(4, torch.Generator().manual_seed(5)) * 2.0])
    starts = torch.from_numpy(initial_states(range(6)))  # [E, 4]
    whole = batched_returns(task._model, params, task.layer_shapes, starts)  # [5, 6]
    assert torch.equal(batched_returns(task._model, params, task.layer_shapes, starts, max_episodes=12), whole)
    assert whole[0].min() == MAX_EPISODE_STEPS and whole.min() < 100


def test_evaluate_equals_gymnasium_evaluator(task):
    params = torch.cat([heuristic_policy(task, 0.5), heuristic_policy(task, 0.05),
                        task.init_params(2, torch.Generator().manual_seed(3)) * 2.0])  # [4, P]
    seeds = task.eval_seeds[:40]  # a part of the documented seeds keeps the real env quick
    batched = get_task("cartpole", eval_seeds=seeds).evaluate(params)
    real = get_task("cartpole", eval_seeds=seeds, evaluator="gymnasium").evaluate(params)
    assert len(task.eval_seeds) >= 100 and len(set(task.eval_seeds)) == len(task.eval_seeds)
    assert torch.equal(batched["return"], real["return"]) and torch.equal(batched["return_std"], real["return_std"])
    assert batched["return"][0] == MAX_EPISODE_STEPS and batched["return"].min() < 100  # a real spread


def test_evolution_strategies_improve_returns():
    task = get_task("cartpole", trainer="es")
    config = PopulationConfig(runs=4, epochs=5, num_checkpoints=5, seed=1)
    hparams = [draw_hparams(config, r) for r in range(config.runs)]
    result = task.train_population(hparams, config, "cpu")
    R, C = 4, 5
    assert result.params.shape == (R, C, task.num_params) and result.steps.tolist()[0] == 0
    assert result.steps[-1] == config.epochs * task.generations_per_epoch
    returns = result.metrics["return"]  # [R, C]
    assert set(result.metrics) == set(task.metric_names) and returns.shape == (R, C)
    assert ((returns >= 0) & (returns <= MAX_EPISODE_STEPS)).all()
    assert all({"lr", "sigma", "es_population"} <= set(h) and h["trainer"] == "es" for h in hparams)
    assert torch.equal(task.evaluate(result.params[:, -1])["return"], returns[:, -1])  # stored = re-scored
    assert (returns[:, -1] > returns[:, 0]).all() and returns[:, -1].mean() > returns[:, 0].mean() + 30


def test_bad_input_is_refused(task):
    with pytest.raises(ValueError, match=f"{task.num_params}"):
        task.evaluate(torch.zeros(2, task.num_params - 1))
    with pytest.raises(ValueError, match="not a data task"):
        task.split("train")
    with pytest.raises(ValueError, match="evaluator"):
        get_task("cartpole", evaluator="numpy")


def test_probe_states_lie_inside_the_episode_bounds_and_give_the_policies_logits(task):
    """The function-space loss compares policies on these states (Task.probe_inputs)."""
    states = task.probe_inputs()
    assert states.shape == (task.probe_size, 4) and torch.equal(states, task.probe_inputs())   # fixed
    assert (states[:, 0].abs() < 2.4).all() and (states[:, 2].abs() < 0.2095).all()
    params = task.init_params(3, torch.Generator().manual_seed(0))
    out = task.network_outputs(params, states)   # [K, B, 2]
    policy = task.build_model()
    policy.load_state_dict(task.to_state_dict(params[1]))
    assert out.shape == (3, task.probe_size, 2) and torch.allclose(out[1], policy(states), atol=1e-5)
