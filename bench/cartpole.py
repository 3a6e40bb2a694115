"""Environment steps per second: the batched torch CartPole evaluator vs gymnasium's fastest numpy one.

Both evaluate the same K policies (``--policies``, default 4096) for ``--episodes`` episodes each from
the same initial states, with the same torch policy forward (``greedy_act_fn``, greedy actions; each side
feeds it one observation tensor updated in place, so its buffers are made once), taking the policies in
the same chunks of at most 64K episodes (``policy_chunks``, as ``batched_returns`` does). ``--episodes
100`` is the task's own evaluation (100 episodes per policy).
gymnasium's side is ``CartPoleVectorEnv`` (``gym.make_vec(..., vectorization_mode="vector_entry_point")``,
the numpy-vectorized CartPole), stepped until every first episode has ended; ours is
``batched_returns`` (finished episodes dropped). Steps counted are the episodes' own steps (the sum of
the returns, identical on both sides and checked), so steps/s is the rate of useful evaluation work.
Policies (``--policy mlp``, the task's): half random inits scaled by U(0.5, 3), half a lean-following
controller plus noise, so returns spread from ~9 to 500 like a checkpoint dataset's. ``--policy linear``
instead gives each policy 4 weights (action = obs . w > 0; half random, half lean-following), so the
policy costs almost nothing and the environments' own speed is what is compared. ``--rounds`` rounds time
both sides one after the other and each prints its ratio; the LAST printed line is their median speed ratio
alone (``statistics.median``: the mean of the two middle rounds for an even count).

    python bench/cartpole.py --policies 4096
    python bench/cartpole.py --policies 4096 --store data/cartpole_reinforce   # a real checkpoint dataset's policies
    python bench/cartpole.py --policies 4096 --policy linear                    # the environments alone
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import gymnasium
import numpy as np
import torch

from checkpoints_dataset import open_store
from checkpoints_dataset.params import tensors_to_vector, vector_to_tensors
from checkpoints_dataset.tasks import get_task
from checkpoints_dataset.tasks.cartpole.env import initial_states
from checkpoints_dataset.tasks.cartpole.evaluator import chunked_returns, greedy_act_fn, policy_chunks


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


def linear_policies(K: int, seed: int) -> torch.Tensor:
    """``[K, 4]`` weights of linear policies (action = obs . w > 0): half random, half lean-following plus noise
    (mean return ~190, like the mlp mix's 195)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, 4, generator=g)
    controller = torch.stack([torch.zeros(K), torch.zeros(K), torch.ones(K), 0.6 * torch.rand(K, generator=g)], 1)
    return torch.where(torch.arange(K)[:, None] % 2 == 0, w, controller + 0.2 * torch.randn(K, 4, generator=g))


def linear_act_fn(w: torch.Tensor):
    """An ``ActFn`` of linear policies ``w [K, 4]``: the rows' weights gathered when the rows change."""
    cache = {"ids": None}

    def act(obs, ids):  # obs [4, K'', L] float32 -> [K'', L] bool
        if cache["ids"] is not ids:
            cache["ids"], cache["w"] = ids, w[ids].T.contiguous()[:, :, None]  # [4, K'', 1]
        return (obs * cache["w"]).sum(0) > 0
    return act


def gymnasium_vector_returns(act, K: int, starts: np.ndarray) -> tuple[np.ndarray, int]:
    """Returns ``[K, E]`` of ``act``'s K policies on CartPoleVectorEnv started from ``starts [K, E, 4]``, and
    the raw steps taken."""
    K, E, _ = starts.shape
    env = gymnasium.make_vec("CartPole-v1", num_envs=K * E, vectorization_mode="vector_entry_point")
    env.reset(seed=0)
    env.unwrapped.state = starts.reshape(K * E, 4).T.copy()  # [4, K*E] float64, as the env keeps it
    obs, ids = env.unwrapped.state.T.astype(np.float32), torch.arange(K)
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


def both_sides(make_act, starts: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, float, int]:
    """Ours (``chunked_returns``, what ``batched_returns`` runs) and gymnasium's returns ``[K, E]``, each side's
    seconds (the forward's setup included), and gymnasium's raw steps. gymnasium's side takes the policies in
    the same ``policy_chunks``; ``make_act(slice)`` gives a fresh ActFn of a chunk's policies for each side."""
    K, E, _ = starts.shape
    t0 = time.perf_counter()
    ours = chunked_returns(make_act, torch.from_numpy(starts)).numpy()
    t_ours = time.perf_counter() - t0
    theirs, raw = [], 0
    t0 = time.perf_counter()
    for part in policy_chunks(K, E):
        returns, steps = gymnasium_vector_returns(make_act(part), part.stop - part.start, starts[part])
        theirs.append(returns)
        raw += steps
    return ours, t_ours, np.concatenate(theirs), time.perf_counter() - t0, raw


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
    p.add_argument("--policy", choices=["mlp", "linear"], default="mlp",
                   help="mlp: the task's policy network (default); linear: 4 weights per policy, so the "
                        "environments alone are compared")
    args = p.parse_args(argv)
    if args.store and args.policy != "mlp":
        raise SystemExit("--store holds policy networks: use it with --policy mlp")
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
    elif args.policy == "mlp":
        params = make_policies(task, K, args.seed)
    else:
        params = linear_policies(K, args.seed)  # [K, 4]

    def make_act(part: slice):  # a fresh ActFn for these policies (each side gets its own)
        if args.policy == "linear":
            return linear_act_fn(params[part])
        return greedy_act_fn(task._model, vector_to_tensors(params[part], task.layer_shapes))

    starts = initial_states(range(K * E)).reshape(K, E, 4)  # [K, E, 4] float64
    both_sides(make_act, starts[:64])  # warm-up
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, gymnasium {gymnasium.__version__}")
    ratios = []
    for i in range(args.rounds):  # the two sides one after the other in each round: load drift hits both
        ours, t_ours, theirs, t_gym, raw = both_sides(make_act, starts)  # [K, E] each
        if not np.array_equal(ours, theirs):
            raise SystemExit(f"returns differ on {(ours != theirs).sum()} of {ours.size} episodes")
        steps = int(ours.sum())
        if i == 0:
            print(f"{K} {args.policy} policies x {E} episodes, returns mean {ours.mean():.1f} (min {ours.min():.0f}, max "
                  f"{ours.max():.0f}), {steps} episode steps (identical on both sides), {raw} raw gymnasium env steps")
        ratios.append(t_gym / t_ours)
        print(f"round {i + 1}: batched torch {t_ours:.2f} s = {steps / t_ours:,.0f} steps/s; gymnasium vector "
              f"{t_gym:.2f} s = {steps / t_gym:,.0f} steps/s ({raw / t_gym:,.0f} raw env steps/s); {ratios[-1]:.1f}x")
    print(f"median of {len(ratios)} rounds ({', '.join(f'{r:.2f}x' for r in ratios)}):")
    print(f"{statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
