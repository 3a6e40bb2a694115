"""The ``cartpole`` task: CartPole-v1 policies (``CartPolePolicy``) scored by their greedy return.

The metric ``return`` is the mean undiscounted return of the greedy policy (argmax of the logits) over
the 100 reset seeds ``EVAL_SEEDS``; ``return_std`` is its standard deviation over those episodes. The
environment is in ``env``, the scoring in ``evaluator``, the population trainers in ``trainer``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ...optim import GroupResult, PopulationConfig
from ...params import check_params
from ..base import Task
from .env import MAX_EPISODE_STEPS, initial_states
from .evaluator import batched_returns, gymnasium_returns
from .trainer import train_population

__all__ = ["EVAL_SEEDS", "CartPolePolicy", "CartpoleTask"]

EVAL_SEEDS: tuple[int, ...] = tuple(range(100_000, 100_100))  # reset seeds of the 100 evaluation episodes


class CartPolePolicy(nn.Sequential):
    """The policy MLP 4 -> 32 -> 32 -> 2 with Tanh (bounded, smooth units).
    ``forward(obs [N, 4] float32) -> logits [N, 2]``; the greedy action is ``logits.argmax(-1)``."""

    def __init__(self, hidden: int = 32):
        super().__init__(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 2))


# --------------------------------------------------------------------------- task

class CartpoleTask(Task):
    """CartPole-v1 policies (``CartPolePolicy``, 1,282 parameters) scored by their greedy return.

    Metrics: ``return`` (mean over the episodes of ``eval_seeds``, higher is better, bounds (0, 500)) and
    ``return_std`` (its standard deviation over those episodes). ``evaluator`` picks the batched torch
    environment ("batched", default) or the real gymnasium one ("gymnasium", slow; a reference).

    Population training (``train_population``, in the ``trainer`` module) trains the runs of a group together
    with ``trainer``: vectorized REINFORCE ("reinforce", default: ``pg_episodes`` stochastic episodes per
    update, return-to-go discounted by ``pg_gamma`` with a per-timestep baseline, lr drawn from ``pg_lr``)
    or evolution strategies ("es": ``es_population`` antithetic directions scored on ``es_episodes``
    starts, lr and sigma drawn from ``es_lr`` and ``es_sigma``). Each update is one Adam step; an epoch is
    ``generations_per_epoch`` updates. REINFORCE runs move smoothly, so a generator can learn from them;
    ES runs are close to random walks (bench/NOTES.md).
    """

    name = "cartpole"
    metric_names = ("return", "return_std")
    lower_is_better = {"return": False, "return_std": True}
    metric_bounds = {"return": (0.0, float(MAX_EPISODE_STEPS)), "return_std": (0.0, MAX_EPISODE_STEPS / 2)}
    default_metric = "return"

    def __init__(self, evaluator: Literal["batched", "gymnasium"] = "batched",
                 eval_seeds: Sequence[int] = EVAL_SEEDS, hidden: int = 32, es_population: int = 16,
                 es_episodes: int = 1, es_sigma: tuple[float, float] = (0.03, 0.2),
                 es_lr: tuple[float, float] = (0.005, 0.08), generations_per_epoch: int = 5,
                 trainer: Literal["reinforce", "es"] = "reinforce", pg_episodes: int = 16,
                 pg_lr: tuple[float, float] = (0.001, 0.01), pg_gamma: float = 0.99):
        if trainer not in ("reinforce", "es"):
            raise ValueError(f"trainer must be 'reinforce' or 'es', got {trainer!r}")
        if pg_episodes < 1:
            raise ValueError(f"pg_episodes must be >= 1 (stochastic episodes per update), got {pg_episodes}")
        if len(pg_lr) != 2 or not 0 < pg_lr[0] <= pg_lr[1]:
            raise ValueError(f"pg_lr must be a range (low, high) with 0 < low <= high, got {pg_lr}")
        if not 0 < pg_gamma <= 1:
            raise ValueError(f"pg_gamma must be in (0, 1], got {pg_gamma}")
        self.trainer, self.pg_episodes, self.pg_lr, self.pg_gamma = trainer, pg_episodes, tuple(pg_lr), pg_gamma
        if evaluator not in ("batched", "gymnasium"):
            raise ValueError(f"evaluator must be 'batched' or 'gymnasium', got {evaluator!r}")
        if len(eval_seeds) < 1:
            raise ValueError("eval_seeds must hold at least one reset seed")
        if es_population < 2 or es_population % 2:
            raise ValueError(f"es_population must be an even number >= 2 (antithetic pairs), got {es_population}")
        if es_episodes < 1 or generations_per_epoch < 1:
            raise ValueError("es_episodes and generations_per_epoch must be >= 1")
        if not (0 < es_sigma[0] <= es_sigma[1] and 0 < es_lr[0] <= es_lr[1]):
            raise ValueError(f"es_sigma and es_lr must be ranges 0 < low <= high, got {es_sigma} and {es_lr}")
        self.evaluator = evaluator
        self.eval_seeds = tuple(int(s) for s in eval_seeds)
        self.hidden = hidden
        self.es_population, self.es_episodes = es_population, es_episodes
        self.es_sigma, self.es_lr, self.generations_per_epoch = tuple(es_sigma), tuple(es_lr), generations_per_epoch
        self._eval_starts = torch.from_numpy(initial_states(self.eval_seeds))  # [E, 4] float64

    def build_model(self) -> nn.Module:
        return CartPolePolicy(self.hidden)

    def build_options(self) -> dict:
        """The trainer and its settings (a store's runs all come from one trainer), and ``hidden`` when it is
        not the default 32 (it shapes the networks)."""
        shape = {"hidden": self.hidden} if self.hidden != 32 else {}
        if self.trainer == "reinforce":
            return {"trainer": "reinforce", "pg_episodes": self.pg_episodes, "pg_lr": list(self.pg_lr),
                    "pg_gamma": self.pg_gamma, "generations_per_epoch": self.generations_per_epoch, **shape}
        return {"trainer": "es", "es_population": self.es_population, "es_episodes": self.es_episodes,
                "es_sigma": list(self.es_sigma), "es_lr": list(self.es_lr),
                "generations_per_epoch": self.generations_per_epoch, **shape}

    @functools.cached_property
    def _model(self) -> nn.Module:
        return self.build_model().eval()

    probe_size = 256     # states of the function-space loss (probe_inputs)

    def probe_inputs(self) -> Tensor:
        """``probe_size`` fixed states inside the episode bounds (cart position within 2.4, pole angle within 12
        degrees, both velocities within 2) on which policies are compared (see ``Task.probe_inputs``)."""
        g = torch.Generator().manual_seed(0)
        high = torch.tensor([2.4, 2.0, 0.2094, 2.0])
        return (2 * torch.rand(self.probe_size, 4, generator=g) - 1) * high   # [B, 4]

    def split(self, name: str):
        raise ValueError(f"cartpole is not a data task: it has no {name!r} split (policies are scored by "
                         f"running episodes, see CartpoleTask.evaluate)")

    def returns(self, params: Tensor, device: str | torch.device | None = None) -> Tensor:
        """Per-episode returns ``[K, E]`` (float64, CPU) on ``eval_seeds`` with the chosen evaluator."""
        params = check_params(params, self.num_params, what="policy params")
        device = torch.device(device) if device is not None else params.device
        params = params.detach().to(device=device, dtype=torch.float32)
        if self.evaluator == "gymnasium":
            return gymnasium_returns(self._model, params, self.layer_shapes, self.eval_seeds).cpu()
        return batched_returns(self._model, params, self.layer_shapes, self._eval_starts.to(device)).cpu()

    def evaluate(self, params: Tensor, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """``{"return": [K], "return_std": [K]}`` (float32, CPU) of policies ``params [K, P]``."""
        r = self.returns(params, device)  # [K, E]
        return {"return": r.mean(1).float(), "return_std": r.std(1, unbiased=False).float()}

    def train_population(self, hparams: list[dict], config: PopulationConfig, device: torch.device,
                         progress: Callable[[float], None] | None = None) -> GroupResult:
        """The runs of ``hparams`` trained together by ``trainer`` (see ``trainer.train_population``) ->
        ``GroupResult`` with ``steps`` = updates and ``epochs`` = updates / ``generations_per_epoch``."""
        return train_population(self, hparams, config, device, progress)
