"""CartPole-v1 policies: a batched torch CartPole, the policy MLP and the ``cartpole`` task (its population
trainers, REINFORCE and evolution strategies, are in ``cartpole_train``).

The batched environment reproduces gymnasium's ``CartPole-v1`` bit for bit on CPU: the same constants,
the same explicit-Euler update written in the same operation order, the state kept in float64, the
policy shown float32 observations, reward 1 per step including the terminating one, truncation at 500
steps. Initial states are drawn with numpy exactly as ``env.reset(seed=s)`` does. Finished episodes are
dropped from the batch at its next re-packing (``rollout``), so little work is spent on them. (On CUDA, ``cos``/``sin`` and division can
differ from glibc by one ulp, which very rarely changes an episode; CPU results are exact.)

The metric ``return`` is the mean undiscounted return of the greedy policy (argmax of the logits) over
the 100 reset seeds ``EVAL_SEEDS``; ``return_std`` is its standard deviation over those episodes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from gymnasium.utils import seeding
from torch import Tensor, nn

from ..params import check_params, vector_to_tensors
from .base import Task

# gymnasium/envs/classic_control/cartpole.py, CartPoleEnv.__init__ (CartPole-v1)
GRAVITY = 9.8
MASSCART = 1.0
MASSPOLE = 0.1
TOTAL_MASS = MASSPOLE + MASSCART
LENGTH = 0.5  # half the pole's length
POLEMASS_LENGTH = MASSPOLE * LENGTH
FORCE_MAG = 10.0
TAU = 0.02
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
MAX_EPISODE_STEPS = 500

EVAL_SEEDS: tuple[int, ...] = tuple(range(100_000, 100_100))  # reset seeds of the 100 evaluation episodes

# act(obs [4, K'', L] float32, feature-major; policy_ids [K''] (may repeat)) -> actions [K'', L] (0/1 or bool)
ActFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- environment

def initial_states(seeds: Sequence[int]) -> np.ndarray:
    """``[E, 4]`` float64 initial states, row e equal to ``gymnasium.make("CartPole-v1").reset(seed=seeds[e])``'s
    state: uniform(-0.05, 0.05, size=4) drawn from the env's ``np_random`` seeded by the reset seed."""
    rows = []
    for s in seeds:
        if not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"reset seeds must be non-negative integers, got {s!r}")
        rng, _ = seeding.np_random(int(s))
        rows.append(rng.uniform(low=-0.05, high=0.05, size=(4,)))
    return np.stack(rows) if rows else np.zeros((0, 4))  # [E, 4]


def cartpole_step(state: tuple[Tensor, Tensor, Tensor, Tensor], action: Tensor
                  ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """One CartPole-v1 step for a batch: ``state = (x, x_dot, theta, theta_dot)``, each ``[M]`` float64, and
    ``action [M]`` in {0, 1} (or bool) -> ``(next state, terminated [M] bool)``, operation for operation as
    gymnasium's ``step``. (Four contiguous columns: elementwise ops on them are faster than on ``[M, 4]``'s.)
    On CPU the arithmetic runs in numpy on the tensors' memory: its per-operation overhead on a few thousand
    values is about half of torch's, and its cos/sin are glibc's, as gymnasium's (torch's vectorized kernels
    differ by one ulp in ~0.2% of inputs, which would break bit equality)."""
    if state[0].device.type == "cpu":
        force = np.where(action.numpy() == 1, FORCE_MAG, -FORCE_MAG)  # [M] float64
        new, terminated = _euler_step(*(c.numpy() for c in state), force, TOTAL_MASS, np.cos, np.sin)
        return tuple(torch.from_numpy(c) for c in new), torch.from_numpy(terminated)
    total_mass = torch.full((), TOTAL_MASS, dtype=state[0].dtype, device=state[0].device)  # divisor as a
    # tensor: CUDA turns division by a Python scalar into multiplication by its reciprocal
    force = torch.where(action == 1, FORCE_MAG, -FORCE_MAG).to(state[0].dtype)  # [M]
    return _euler_step(*state, force, total_mass, torch.cos, torch.sin)


def _euler_step(x, x_dot, theta, theta_dot, force, total_mass, cos, sin):
    """gymnasium's CartPoleEnv.step arithmetic, on numpy arrays or torch tensors alike."""
    costheta, sintheta = cos(theta), sin(theta)
    temp = (force + POLEMASS_LENGTH * (theta_dot * theta_dot) * sintheta) / total_mass
    thetaacc = (GRAVITY * sintheta - costheta * temp) / (
        LENGTH * (4.0 / 3.0 - MASSPOLE * (costheta * costheta) / total_mass))
    xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / total_mass
    x = x + TAU * x_dot
    x_dot = x_dot + TAU * xacc
    theta = theta + TAU * theta_dot
    theta_dot = theta_dot + TAU * thetaacc
    terminated = (abs(x) > X_THRESHOLD) | (abs(theta) > THETA_THRESHOLD)  # same as x < -T or x > T
    return (x, x_dot, theta, theta_dot), terminated


def rollout(act: ActFn, owner: Tensor, init_states: Tensor, max_steps: int = MAX_EPISODE_STEPS,
            trace: list[Tensor] | None = None, min_fill: float = 0.8) -> Tensor:
    """Run B episodes to their end and return their undiscounted returns ``[B]`` float64.

    ``owner [B]`` (non-decreasing) is the policy of each episode, ``init_states [B, 4]`` float64 their
    starts. Episodes live in a *packing*: rows of L slots, each row holding episodes of one policy (L
    chosen by ``_packing``), so ``act(obs [4, K'', L], row_policy [K''])`` returns the actions ``[K'', L]``
    with one weight read per row. The dynamics step
    every slot; a finished episode's slot keeps stepping, ignored, until fewer than ``min_fill`` of the
    episodes packed last are unfinished, and then the unfinished ones are re-packed (and the policy's
    weights re-gathered). Between re-packings a step costs no gather or scatter at all.
    With ``trace`` a list, the full ``[B, 4]`` state after every step is appended (finished rows frozen).
    """
    if owner.dim() != 1 or init_states.shape != (owner.shape[0], 4):
        raise ValueError(f"owner must be [B] and init_states [B, 4], got {list(owner.shape)} and "
                         f"{list(init_states.shape)}")
    if owner.numel() > 1 and bool((owner[1:] < owner[:-1]).any()):
        raise ValueError("owner must be sorted (non-decreasing): episodes of one policy must be contiguous")
    device = init_states.device
    returns = torch.full((owner.shape[0],), float(max_steps), dtype=torch.float64, device=device)  # [B]
    full = init_states.to(torch.float64).clone() if trace is not None else None  # [B, 4]
    episode = torch.arange(owner.shape[0], device=device)        # [S] the episode in each slot, ascending
    alive = torch.ones(owner.shape[0], dtype=torch.bool, device=device)  # [S] slots of unfinished episodes
    columns = init_states.to(torch.float64).unbind(1)            # x, x_dot, theta, theta_dot of each slot
    alive_count, packed = owner.shape[0], 0                      # packed: unfinished episodes at the last packing
    for t in range(max_steps):
        if alive_count == 0:
            break
        if alive_count < min_fill * packed or packed == 0:        # (re-)pack the unfinished episodes
            keep = alive.nonzero()[:, 0]                          # [M] slots of unfinished episodes
            live, columns = episode[keep], [c[keep] for c in columns]
            slot, row_policy, L = _packing(owner[live])           # [M], [K''], row length
            slots, packed = row_policy.shape[0] * L, alive_count
            columns = [torch.zeros(slots, dtype=torch.float64, device=device).index_copy_(0, slot, c)
                       for c in columns]                          # 4 x [S]; empty slots hold zeros
            episode = torch.zeros(slots, dtype=torch.long, device=device).index_copy_(0, slot, live)  # [S]
            alive = torch.zeros(slots, dtype=torch.bool, device=device).index_fill_(0, slot, True)  # [S]
        obs = torch.stack(columns).float().view(4, -1, L)         # [4, K'', L] float32 as gymnasium's, feature-major
        columns, terminated = cartpole_step(columns, act(obs, row_policy).view(-1))  # [S]
        if full is not None:
            full.index_put_((episode[alive],), torch.stack(columns, dim=1)[alive])
            trace.append(full.clone())
        ended = terminated & alive                                # [S] episodes that end on this step
        n = int(ended.sum())
        if n:                                                     # reward 1 per step, the last one included
            returns[episode[ended]] = float(t + 1)
            alive &= ~ended
            alive_count -= n
    return returns


def _packing(owner: Tensor, row_cost: float = 4.0) -> tuple[Tensor, Tensor, int]:
    """Rows of L slots for M episodes with non-decreasing ``owner [M]``: each episode's flat slot ``[M]``,
    each row's policy ``[K'']`` and L. L is the power of two below the largest count, or that count, that minimizes
    ``slots + row_cost * rows``: padding slots are stepped for nothing, and each row reads its policy's
    weights once (worth about ``row_cost`` slots of work)."""
    M = owner.shape[0]
    pids, counts = torch.unique_consecutive(owner, return_counts=True)  # [K'], [K']
    top = int(counts.max())
    L = min([2 ** i for i in range(top.bit_length()) if 2 ** i < top] + [top],
            key=lambda n: int(((counts + n - 1) // n).sum()) * (n + row_cost))
    nrows = (counts + L - 1) // L                                 # [K'] rows of each policy
    grp = torch.repeat_interleave(torch.arange(pids.shape[0], device=owner.device), counts)  # [M]
    rank = torch.arange(M, device=owner.device) - (torch.cumsum(counts, 0) - counts)[grp]  # [M]
    row = (torch.cumsum(nrows, 0) - nrows)[grp] + torch.div(rank, L, rounding_mode="floor")  # [M]
    return row * L + rank % L, torch.repeat_interleave(pids, nrows), L


# --------------------------------------------------------------------------- policy

class CartPolePolicy(nn.Sequential):
    """The policy MLP 4 -> 32 -> 32 -> 2 with Tanh (bounded, smooth units).
    ``forward(obs [N, 4] float32) -> logits [N, 2]``; the greedy action is ``logits.argmax(-1)``."""

    def __init__(self, hidden: int = 32):
        super().__init__(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 2))


def greedy_act_fn(model: nn.Sequential, params: dict[str, Tensor]) -> ActFn:
    """An ``ActFn`` for ``rollout``: the greedy actions of K stacked policies (``params``: name -> ``[K, *shape]``;
    the MLP's first Linear takes the 4 observations, its last gives 2 logits), for feature-major ``obs``.

    The weights are laid out once for a lean inference forward, and the rows' weights are gathered only
    when the packing changes. The first Linear is 4 ``addcmul``s over its inputs (MKL's batched matmul costs
    ~0.2 us per matrix, 5x the arithmetic of a [1, 4] x [4, 32] product); hidden Linears are ``baddbmm``s;
    the output layer is the difference of its two rows, so the action is ``z > 0``: argmax of the two logits
    (ties -> action 0, as argmax) with one dot product instead of two. Rounding differs from the module's
    forward only in the last bits, so an action can differ only where the two logits tie to ~1e-7.
    """
    names = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    if (len(names) < 2 or not isinstance(model[0], nn.Linear) or params[f"{names[0]}.weight"].shape[2] != 4
            or params[f"{names[-1]}.weight"].shape[1] != 2):
        raise ValueError("greedy_act_fn needs a Sequential MLP that starts with a Linear of 4 inputs and has at "
                         "least two Linears, the last with 2 outputs")
    stacked = []  # (kind, weight, bias) per Linear, other modules as they are
    for name, m in model.named_children():
        if not isinstance(m, nn.Linear):
            stacked.append(m)
            continue
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]  # [K, out, in], [K, out]
        if name == names[0]:
            stacked.append(("inputs", w.permute(2, 0, 1).contiguous(), b[:, None, :]))  # [in, K, out], [K, 1, out]
        elif name == names[-1]:
            stacked.append(("diff", (w[:, 1] - w[:, 0])[:, :, None].contiguous(),  # [K, in, 1]
                            (b[:, 1] - b[:, 0])[:, None, None]))                    # [K, 1, 1]
        else:
            stacked.append(("matmul", w.transpose(1, 2).contiguous(), b[:, None, :]))  # [K, in, out], [K, 1, out]
    cache: dict[str, object] = {"ids": None, "layers": None}

    def act(obs: Tensor, policy_ids: Tensor) -> Tensor:  # obs [4, K'', L] float32 -> [K'', L] bool
        if cache["ids"] is not policy_ids and (cache["ids"] is None or cache["ids"].shape != policy_ids.shape
                                                or not torch.equal(cache["ids"], policy_ids)):
            cache["ids"] = policy_ids
            cache["layers"] = [(layer[0], layer[1].index_select(1 if layer[0] == "inputs" else 0, policy_ids),
                                layer[2].index_select(0, policy_ids)) if isinstance(layer, tuple) else layer
                               for layer in stacked]
        with torch.no_grad():
            h = obs
            for layer in cache["layers"]:
                if not isinstance(layer, tuple):
                    h = h.tanh_() if isinstance(layer, nn.Tanh) else layer(h)  # in place: no allocation
                elif layer[0] == "inputs":  # sum_i obs_i * W[i]: [K'', L, 1] x [K'', 1, out] -> [K'', L, out]
                    h = torch.addcmul(layer[2], obs[0][:, :, None], layer[1][0][:, None, :])
                    for i in range(1, obs.shape[0]):
                        h.addcmul_(obs[i][:, :, None], layer[1][i][:, None, :])
                else:
                    h = torch.baddbmm(layer[2], h, layer[1])  # [K'', L, out]
            return h[:, :, 0] > 0  # [K'', L]: logit 1 - logit 0 > 0
    return act


def batched_returns(model: nn.Module, params: Tensor, layer_shapes, init_states: Tensor) -> Tensor:
    """Returns ``[K, E]`` (float64) of K policies (``params [K, P]``) from starts ``init_states``: ``[E, 4]``
    shared by every policy or ``[K, E, 4]`` per policy; one ``rollout`` of all K*E episodes."""
    K = params.shape[0]
    starts = init_states.expand(K, -1, -1) if init_states.dim() == 2 else init_states  # [K, E, 4]
    E = starts.shape[1]
    owner = torch.arange(K, device=params.device).repeat_interleave(E)  # [K*E]
    act = greedy_act_fn(model, vector_to_tensors(params, layer_shapes))
    return rollout(act, owner, starts.reshape(K * E, 4).to(params.device, torch.float64)).view(K, E)


def gymnasium_returns(model: nn.Module, params: Tensor, layer_shapes, seeds: Sequence[int],
                      max_envs: int = 2048) -> Tensor:
    """Returns ``[K, E]`` of K policies on the real ``gymnasium.make("CartPole-v1")`` reset with ``seeds``,
    stepped in a ``gymnasium.vector.SyncVectorEnv`` (the reference for ``batched_returns``). Policies are
    taken ``max_envs // E`` at a time; finished episodes are masked until the slowest one ends."""
    import gymnasium

    K, E = params.shape[0], len(seeds)
    per = max(1, min(K, max_envs // max(E, 1)))  # policies per chunk
    envs = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1")] * (per * E))
    out = torch.zeros(K, E, dtype=torch.float64)
    try:
        for k0 in range(0, K, per):
            chunk = params[k0:k0 + per]
            n = chunk.shape[0]
            chunk = torch.cat([chunk, chunk[-1:].expand(per - n, -1)])  # [per, P] padded with copies
            act = greedy_act_fn(model, vector_to_tensors(chunk, layer_shapes))
            ids = torch.arange(per, device=params.device)
            obs, _ = envs.reset(seed=[int(s) for s in seeds] * per)
            done = np.zeros(per * E, dtype=bool)
            total = np.zeros(per * E)
            while not done.all():
                o = torch.from_numpy(obs).to(params.device).T.reshape(4, per, E)  # float32 as gymnasium gives
                action = act(o, ids).reshape(-1).long().cpu().numpy()
                obs, reward, terminated, truncated, _ = envs.step(action)
                total += np.where(done, 0.0, reward)
                done |= terminated | truncated
            out[k0:k0 + n] = torch.from_numpy(total).view(per, E)[:n]
    finally:
        envs.close()
    return out


# --------------------------------------------------------------------------- task

class CartpoleTask(Task):
    """CartPole-v1 policies (``CartPolePolicy``, 1,282 parameters) scored by their greedy return.

    Metrics: ``return`` (mean over the episodes of ``eval_seeds``, higher is better, bounds (0, 500)) and
    ``return_std`` (its standard deviation over those episodes). ``evaluator`` picks the batched torch
    environment ("batched", default) or the real gymnasium one ("gymnasium", slow; a reference).

    Population training (``train_population``, in ``cartpole_train``) trains the runs of a group together
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
        """The trainer and its settings: a store's runs all come from one trainer."""
        if self.trainer == "reinforce":
            return {"trainer": "reinforce", "pg_episodes": self.pg_episodes, "pg_lr": list(self.pg_lr),
                    "pg_gamma": self.pg_gamma, "generations_per_epoch": self.generations_per_epoch}
        return {"trainer": "es", "es_population": self.es_population, "es_episodes": self.es_episodes,
                "es_sigma": list(self.es_sigma), "es_lr": list(self.es_lr),
                "generations_per_epoch": self.generations_per_epoch}

    @functools.cached_property
    def _model(self) -> nn.Module:
        return self.build_model().eval()

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

    def train_population(self, hparams: list[dict], config, device, progress: Callable[[float], None] | None = None):
        """The runs of ``hparams`` trained together by ``trainer`` (see ``cartpole_train``) -> ``GroupResult``
        with ``steps`` = updates and ``epochs`` = updates / ``generations_per_epoch``."""
        from .cartpole_train import train_population

        return train_population(self, hparams, config, device, progress)
