"""Environment steps per second: the batched torch CartPole evaluator vs gymnasium's fastest numpy one.

Both evaluate the same K policies (``--policies``, default 4096) for ``--episodes`` episodes each from
the same initial states, with the same torch policy forward (``greedy_act_fn``, greedy actions; each side
feeds it one observation tensor updated in place, so its buffers are made once).
gymnasium's side is ``CartPoleVectorEnv`` (``gym.make_vec(..., vectorization_mode="vector_entry_point")``,
the numpy-vectorized CartPole), stepped until every first episode has ended; ours is
``batched_returns`` (finished episodes dropped). Steps counted are the episodes' own steps (the sum of
the returns, identical on both sides and checked), so steps/s is the rate of useful evaluation work.
Policies: half random inits scaled by U(0.5, 3), half a lean-following controller plus noise, so
returns spread from ~9 to 500 like a checkpoint dataset's. ``--rounds`` rounds time both sides one after
the other; the LAST printed line is the median speed ratio.

    python bench/cartpole.py --policies 4096
    python bench/cartpole.py --policies 4096 --store data/cartpole_reinforce   # a real checkpoint dataset's policies
"""

from __future__ import annotations

import argparse
import platform
import time

import gymnasium
import numpy as np
import torch

from checkpoints_dataset import open_store
from checkpoints_dataset.params import tensors_to_vector, vector_to_tensors
from checkpoints_dataset.tasks import get_task
from checkpoints_dataset.tasks.cartpole import batched_returns, greedy_act_fn, initial_states


def make_policies(task, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    params = task.init_params(K, g) * (0.5 + 2.5 * torch.rand(K, 1, generator=g))  # [K, P]
    t = {name: torch.zeros(K, *shape) for name, shape in task.layer_shapes.items()}
    t["0.weight"][:, 0, 2] = 5.0
    t["0.weight"][:, 0, 3] = 5.0 * torch.rand(K, generator=g)  # gain on the pole's angular velocity
    t["2.weight"][:, 0, 0] = 1.0
    t["4.weight"][:, 0, 0], t["4.weight"][:, 1, 0] = -1.0, 1.0
    controller = tensors_to_vector(t, task.layer_shapes) + 0.3 * params  # [K, P]
    return torch.where(torch.arange(K)[:, None] % 2 == 0, params, controller)


def gymnasium_vector_returns(task, params: torch.Tensor, starts: np.ndarray) -> tuple[np.ndarray, int]:
    """Returns ``[K, E]`` on CartPoleVectorEnv started from ``starts [K, E, 4]``, and the raw steps taken."""
    K, E, _ = starts.shape
    env = gymnasium.make_vec("CartPole-v1", num_envs=K * E, vectorization_mode="vector_entry_point")
    env.reset(seed=0)
    env.unwrapped.state = starts.reshape(K * E, 4).T.copy()  # [4, K*E] float64, as the env keeps it
    obs = env.unwrapped.state.T.astype(np.float32)
    act, ids = greedy_act_fn(task._model, vector_to_tensors(params, task.layer_shapes)), torch.arange(K)
    rows = torch.empty(4, K, E)  # feature-major observations, one tensor filled in place: the forward's
    # buffers and views are made once for it, as for ours
    done, total, raw = np.zeros(K * E, dtype=bool), np.zeros(K * E), 0
    while not done.all():
        np.copyto(rows.numpy().reshape(4, K * E), obs.T)
        action = act(rows, ids)  # [K, E]
        obs, reward, terminated, truncated, _ = env.step(action.reshape(-1).long().numpy())
        total += np.where(done, 0.0, reward)
        done |= terminated | truncated
        raw += K * E
    env.close()
    return total.reshape(K, E), raw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", type=int, default=4096)
    p.add_argument("--episodes", type=int, default=1, help="episodes per policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--rounds", type=int, default=3, help="measurement rounds; the last line is the median ratio")
    p.add_argument("--store", default=None,
                   help="take the policies from this cartpole store (K checkpoints drawn with --seed) instead "
                        "of the synthetic mix")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task("cartpole")
    K, E = args.policies, args.episodes
    if args.store:
        store = open_store(args.store)
        if store.task != "cartpole":
            raise SystemExit(f"--store {args.store} holds {store.task} networks, not cartpole policies")
        rows = np.sort(np.random.default_rng(args.seed).choice(store.num_checkpoints, K, replace=K > store.num_checkpoints))
        params = torch.from_numpy(np.asarray(store.params(rows), dtype=np.float32))  # [K, P] real checkpoints
    else:
        params = make_policies(task, K, args.seed)
    starts = initial_states(range(K * E)).reshape(K, E, 4)  # [K, E, 4] float64
    starts_t = torch.from_numpy(starts)

    batched_returns(task._model, params[:64], task.layer_shapes, starts_t[:64])  # warm-up
    gymnasium_vector_returns(task, params[:64], starts[:64])
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, gymnasium {gymnasium.__version__}")
    ratios = []
    for i in range(args.rounds):  # the two sides alternate within a round: load drift hits both
        t0 = time.perf_counter()
        ours = batched_returns(task._model, params, task.layer_shapes, starts_t).numpy()  # [K, E]
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs, raw = gymnasium_vector_returns(task, params, starts)
        t_gym = time.perf_counter() - t0
        if not np.array_equal(ours, theirs):
            raise SystemExit(f"returns differ on {(ours != theirs).sum()} of {ours.size} episodes")
        steps = int(ours.sum())
        if i == 0:
            print(f"{K} policies x {E} episodes, returns mean {ours.mean():.1f} (min {ours.min():.0f}, max "
                  f"{ours.max():.0f}), {steps} episode steps (identical on both sides), {raw} raw gymnasium env steps")
        ratios.append(t_gym / t_ours)
        print(f"round {i + 1}: batched torch {t_ours:.2f} s = {steps / t_ours:,.0f} steps/s; gymnasium vector "
              f"{t_gym:.2f} s = {steps / t_gym:,.0f} steps/s ({raw / t_gym:,.0f} raw env steps/s); {ratios[-1]:.1f}x")
    print(f"median of {len(ratios)} rounds:")
    print(f"{sorted(ratios)[len(ratios) // 2]:.1f}x")


if __name__ == "__main__":
    main()
