"""Population trainers of the ``cartpole`` task: vectorized REINFORCE (the default) and evolution strategies.

Both train the R runs of a group at once (weights stacked ``[R, P]``) in one loop, ``train_population``:
the run's init, its settings drawn log-uniformly with its own seed and written into its ``hparams`` (so the
manifest records them), one Adam ``optim.optimizer_step`` per update with the trainer's gradient (beta1 =
the run's ``momentum``, its ``weight_decay`` and ``init_scale``), checkpoints on ``checkpoint_schedule``,
scored on the task's ``eval_seeds`` at the end. One epoch is ``task.generations_per_epoch`` updates; the
config's lr range, optimizers and batch size do not apply. A run's result depends on its own seed and
hparams only: every draw comes from its generator and every reduction is per run (bit for bit as long as
the BLAS kernels do not change their summation order with the group's size, as on this CPU).

**REINFORCE** (``trainer="reinforce"``, default). Why not evolution strategies: ES with a few antithetic
directions in 1,282 dimensions takes steps that are mostly noise, so a run's checkpoints follow a near random
walk and the later one is not predictable from the earlier one (what a generator must learn: with an ES
store it does not learn to follow a prompt, see bench/NOTES.md). A policy gradient from many episode steps
points along the return's gradient, so runs move smoothly, as the PPO runs G.pt learned from.
Each update:

1. Each run plays ``G`` stochastic episodes with its current policy: action 1 with probability
   ``softmax(logits)[1]``, drawn as ``u < p`` from uniforms of the run's own ``torch.Generator``; starts
   uniform(-0.05, 0.05) from the same generator; ``cartpole_step`` dynamics, truncation at 500 steps.
   Episodes are recorded as ``[R, T, G]`` arrays of fixed ``T = 500`` (steps after the end are masked).
2. Advantages: the discounted return-to-go ``sum_k gamma^k r_{t+k}`` minus a per-timestep baseline (the
   mean return-to-go at step t over the run's episodes still alive at t); no normalization by the std,
   so Adam's second moment sees the true scale and steps shrink as a run's episodes agree.
3. The surrogate ``-sum_{t,g} A_t log pi(a_t | s_t) / G`` summed over runs, one autograd pass through a
   ``baddbmm`` forward over the stacked weights: run r's gradient is its own term's.

No entropy bonus: the stochastic policy explores enough here, and a bonus would only add a knob. The run's
lr is drawn from ``pg_lr`` (the spread gives the store slow and fast learners); the shapes (``T = 500``,
``G``) do not depend on the group.

**Evolution strategies** (``trainer="es"``, OpenAI-style): each generation, run r perturbs its policy with
``es_population`` antithetic Gaussian directions of scale ``sigma_r``, scores each on ``es_episodes``
random starts (shared within the run), turns returns into centered ranks, and steps along the rank-weighted
directions. lr and sigma are drawn from ``es_lr`` and ``es_sigma``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...optim import GroupResult, checkpoint_schedule, init_optimizer_state, optimizer_step, run_generators
from ...params import vector_to_tensors
from .env import MAX_EPISODE_STEPS, cartpole_step
from .evaluator import batched_returns

__all__ = ["advantages", "es_gradient", "play_episodes", "policy_gradient", "reinforce_gradient", "stacked_policy",
           "train_population"]


def _log_uniform(bounds: tuple[float, float], u: float) -> float:
    return math.exp(math.log(bounds[0]) + u * (math.log(bounds[1]) - math.log(bounds[0])))


# --------------------------------------------------------------------------- REINFORCE

def stacked_policy(model: nn.Sequential, theta: Tensor, layer_shapes) -> Callable[[Tensor], Tensor]:
    """``f(obs [R, N, 4]) -> logits [R, N, 2]`` of R policies with flat weights ``theta [R, P]``;
    differentiable in ``theta`` (each Linear is one ``baddbmm`` over the runs)."""
    p = vector_to_tensors(theta, layer_shapes)  # name -> [R, *shape] views of theta
    layers = [(p[f"{name}.weight"].transpose(1, 2), p[f"{name}.bias"][:, None, :])  # [R, in, out], [R, 1, out]
              if isinstance(m, nn.Linear) else m for name, m in model.named_children()]

    def forward(obs: Tensor) -> Tensor:
        h = obs
        for layer in layers:
            h = torch.baddbmm(layer[1], h, layer[0]) if isinstance(layer, tuple) else layer(h)
        return h
    return forward


def play_episodes(model: nn.Sequential, theta: Tensor, layer_shapes, gens: list[torch.Generator],
                  episodes: int, max_steps: int = MAX_EPISODE_STEPS) -> tuple[Tensor, Tensor, Tensor]:
    """G = ``episodes`` stochastic episodes of each of R policies ``theta [R, P]``, run r's randomness from
    ``gens[r]`` -> ``obs [R, T, G, 4]`` float32 (zero after an episode's end), ``actions [R, T, G]`` long,
    ``lengths [R, G]`` long (= the undiscounted returns), with T = ``max_steps``."""
    R, G, T, device = theta.shape[0], episodes, max_steps, theta.device
    # each run draws its starts, then one uniform per (step, episode), whatever happens in the episodes
    starts = torch.stack([torch.rand(G, 4, generator=g, dtype=torch.float64) for g in gens]) * 0.1 - 0.05  # [R, G, 4]
    uniforms = torch.stack([torch.rand(T, G, generator=g) for g in gens]).to(device)  # [R, T, G]
    columns = tuple(starts.to(device).view(R * G, 4).T.contiguous())  # x, x_dot, theta, theta_dot, each [R*G]
    obs = torch.zeros(R, T, G, 4, device=device)
    actions = torch.zeros(R, T, G, dtype=torch.long, device=device)
    lengths = torch.full((R * G,), T, dtype=torch.long, device=device)  # truncated unless they end
    alive = torch.ones(R * G, dtype=torch.bool, device=device)
    policy = stacked_policy(model, theta.detach(), layer_shapes)
    with torch.no_grad():
        for t in range(T):
            o = torch.stack(columns, dim=1).float().view(R, G, 4)  # the float32 observation gymnasium gives
            obs[:, t] = o
            p1 = torch.softmax(policy(o), dim=-1)[..., 1]  # [R, G] probability of pushing right
            a = (uniforms[:, t] < p1).long()  # [R, G]
            actions[:, t] = a
            columns, terminated = cartpole_step(columns, a.view(-1))  # finished episodes step on, ignored
            ended = terminated & alive
            lengths[ended] = t + 1  # reward 1 per step, the terminating one included
            alive &= ~terminated
            if not bool(alive.any()):
                break
    lengths = lengths.view(R, G)
    mask = torch.arange(T, device=device)[None, :, None] < lengths[:, None, :]  # [R, T, G] steps played
    obs.mul_(mask[..., None])  # steps after the end: zeros (their stepped states are meaningless)
    return obs, actions * mask, lengths


def advantages(lengths: Tensor, max_steps: int, gamma: float) -> Tensor:
    """``[R, T, G]`` advantages of episodes of ``lengths [R, G]`` (reward 1 per step): the discounted
    return-to-go minus its mean at the same step over the run's episodes alive then; 0 after the end."""
    t = torch.arange(max_steps, device=lengths.device, dtype=torch.float64)[None, :, None]  # [1, T, 1]
    left = (lengths[:, None, :].double() - t).clamp(min=0)  # [R, T, G] steps still to come, this one included
    rtg = left if gamma == 1.0 else (1 - gamma ** left) / (1 - gamma)  # sum_{k < left} gamma^k
    alive = left > 0
    baseline = rtg.sum(2, keepdim=True) / alive.sum(2, keepdim=True).clamp(min=1)  # [R, T, 1]
    return ((rtg - baseline) * alive).float()


def policy_gradient(model: nn.Sequential, theta: Tensor, layer_shapes, obs: Tensor, actions: Tensor,
                    adv: Tensor) -> Tensor:
    """``[R, P]`` gradient (a descent direction) of each run's surrogate ``-sum_{t,g} adv log pi(a|s) / G``
    on its recorded steps ``obs [R, T, G, 4]``, ``actions`` and ``adv [R, T, G]``."""
    R, T, G = actions.shape
    theta = theta.detach().requires_grad_(True)
    logits = stacked_policy(model, theta, layer_shapes)(obs.view(R, T * G, 4))  # [R, T*G, 2]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, actions.view(R, T * G, 1))[..., 0]  # [R, T*G]
    loss = -(logp * adv.view(R, T * G)).sum() / G  # runs do not interact: d loss / d theta_r is run r's own
    return torch.autograd.grad(loss, theta)[0]


def reinforce_gradient(task, theta: Tensor, gens: list[torch.Generator]) -> Tensor:
    """``[R, P]`` REINFORCE descent direction of runs ``theta [R, P]`` from ``task.pg_episodes`` fresh episodes each."""
    model, shapes = task._model, task.layer_shapes
    obs, actions, lengths = play_episodes(model, theta, shapes, gens, task.pg_episodes)  # [R, T, G, 4], [R, T, G], [R, G]
    return policy_gradient(model, theta, shapes, obs, actions, advantages(lengths, MAX_EPISODE_STEPS, task.pg_gamma))


# --------------------------------------------------------------------------- evolution strategies

def _centered_ranks(fitness: Tensor) -> Tensor:
    """Centered ranks in [-0.5, 0.5] within each row of ``fitness [R, n]``; ties share their mean rank
    (so a population of equal returns gives a zero update)."""
    less = (fitness[:, None, :] < fitness[:, :, None]).sum(-1)  # [R, n] entries below each
    equal = (fitness[:, None, :] == fitness[:, :, None]).sum(-1)  # [R, n] including itself
    n = fitness.shape[1]
    return (less + 0.5 * (equal - 1)) / max(n - 1, 1) - 0.5


def es_gradient(task, theta: Tensor, sigma: Tensor, gens: list[torch.Generator]) -> Tensor:
    """``[R, P]`` ES descent direction of runs ``theta [R, P]`` with perturbation scales ``sigma [R]``."""
    R, n, E, device = theta.shape[0], task.es_population, task.es_episodes, theta.device
    noise = torch.stack([torch.randn(n // 2, task.num_params, generator=g) for g in gens]).to(device)  # [R, n/2, P]
    starts = torch.stack([torch.rand(E, 4, generator=g, dtype=torch.float64) for g in gens])  # [R, E, 4]
    starts = (starts * 0.1 - 0.05).to(device)
    eps = torch.cat([noise, -noise], dim=1)  # [R, n, P] antithetic
    cand = theta[:, None] + sigma[:, None, None] * eps  # [R, n, P]
    fitness = batched_returns(task._model, cand.reshape(R * n, -1), task.layer_shapes,
                              starts.repeat_interleave(n, dim=0)).mean(1).view(R, n)  # [R, n]
    ranks = _centered_ranks(fitness).to(eps.dtype)  # [R, n]
    return -torch.einsum("rn,rnp->rp", ranks, eps) / (n * sigma[:, None])  # [R, P] ascent -> descent


# --------------------------------------------------------------------------- the shared loop

def train_population(task, hparams: list[dict], config, device, progress: Callable[[float], None] | None = None
                     ) -> GroupResult:
    """Train the runs of ``hparams`` together with ``task.trainer`` -> ``GroupResult`` with ``steps`` = updates
    and ``epochs`` = updates / ``task.generations_per_epoch``."""
    device = torch.device(device)
    R, total = len(hparams), config.epochs * task.generations_per_epoch
    schedule = checkpoint_schedule(total, config.num_checkpoints)
    init_gens, gens = run_generators(hparams)    # one generator each unless runs share an init (runs_per_init)
    init = torch.cat([task.init_params(1, g, h.get("init_scheme", "default")) for g, h in zip(init_gens, hparams)])
    # the run's settings, drawn with its generator and recorded in its hparams (and the manifest)
    if task.trainer == "reinforce":
        for h, g in zip(hparams, gens):
            u = float(torch.rand(1, generator=g, dtype=torch.float64))
            h.update(trainer="reinforce", optimizer="adam", lr=_log_uniform(task.pg_lr, u),
                     pg_episodes=task.pg_episodes, pg_gamma=task.pg_gamma)
        gradient = functools.partial(reinforce_gradient, task, gens=gens)
    else:
        for h, g in zip(hparams, gens):
            u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
            h.update(trainer="es", optimizer="adam", lr=_log_uniform(task.es_lr, u[0]),
                     sigma=_log_uniform(task.es_sigma, u[1]), es_population=task.es_population,
                     es_episodes=task.es_episodes)
        sigma = torch.tensor([h["sigma"] for h in hparams], device=device)  # [R]
        gradient = functools.partial(es_gradient, task, sigma=sigma, gens=gens)
    hp = {k: torch.tensor([float(h[k]) for h in hparams], device=device)
          for k in ("lr", "weight_decay", "momentum", "init_scale")}  # name -> [R]
    is_adam = torch.ones(R, dtype=torch.bool, device=device)
    theta = init.to(device) * hp["init_scale"][:, None]  # [R, P]
    state = init_optimizer_state(theta)
    snapshots = []
    for step in range(total + 1):
        if step in schedule:
            snapshots.append(theta.to("cpu", torch.float32, copy=True))  # theta is updated in place
        if step == total:
            break
        theta = optimizer_step(theta, gradient(theta), state, is_adam, hp["lr"], hp["weight_decay"], hp["momentum"])
        if progress is not None:
            progress(0.5 / total)
    vectors = torch.stack(snapshots, dim=1)  # [R, C, P]
    C = vectors.shape[1]
    metrics = task.evaluate(vectors.reshape(R * C, -1), device=device)  # name -> [R*C]
    if progress is not None:
        progress(0.5)
    return GroupResult(params=vectors, steps=torch.tensor(schedule, dtype=torch.int64),
                       epochs=torch.tensor(schedule, dtype=torch.float64) / task.generations_per_epoch,
                       metrics={k: v.view(R, C) for k, v in metrics.items()})
