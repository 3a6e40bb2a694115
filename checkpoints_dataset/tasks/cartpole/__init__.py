"""The ``cartpole`` task (CartPole-v1 policies), in four modules whose imports point one way:

- ``env``: the batched CartPole-v1 (gymnasium's dynamics bit for bit on CPU), ``initial_states``,
  ``cartpole_step``, ``rollout``;
- ``evaluator`` (imports ``env``): the lean greedy forward of stacked policies and their returns
  (``greedy_act_fn``, ``policy_chunks``, ``chunked_returns``, ``batched_returns``, ``gymnasium_returns``);
- ``trainer`` (imports ``env``, ``evaluator``): the population trainers, REINFORCE and evolution strategies;
- ``task`` (imports all three): ``CartpoleTask``, its policy network ``CartPolePolicy`` and ``EVAL_SEEDS``.

Every public name of the four is re-exported here.
"""

from .env import (FORCE_MAG, GRAVITY, LENGTH, MASSCART, MASSPOLE, MAX_EPISODE_STEPS, POLEMASS_LENGTH, TAU,
                  THETA_THRESHOLD, TOTAL_MASS, X_THRESHOLD, ActFn, cartpole_step, initial_states, rollout)
from .evaluator import batched_returns, chunked_returns, greedy_act_fn, gymnasium_returns, policy_chunks
from .task import EVAL_SEEDS, CartPolePolicy, CartpoleTask
from .trainer import (advantages, es_gradient, play_episodes, policy_gradient, reinforce_gradient, stacked_policy,
                      train_population)

__all__ = [
    # env
    "FORCE_MAG", "GRAVITY", "LENGTH", "MASSCART", "MASSPOLE", "MAX_EPISODE_STEPS", "POLEMASS_LENGTH", "TAU",
    "THETA_THRESHOLD", "TOTAL_MASS", "X_THRESHOLD", "ActFn", "cartpole_step", "initial_states", "rollout",
    # evaluator
    "batched_returns", "chunked_returns", "greedy_act_fn", "gymnasium_returns", "policy_chunks",
    # trainer
    "advantages", "es_gradient", "play_episodes", "policy_gradient", "reinforce_gradient", "stacked_policy",
    "train_population",
    # task
    "EVAL_SEEDS", "CartPolePolicy", "CartpoleTask",
]
