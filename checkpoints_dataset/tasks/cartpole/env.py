"""The batched CartPole-v1 of the ``cartpole`` task: gymnasium's dynamics for many episodes at once
(``cartpole_step``) and ``rollout``, which runs the episodes of many policies to their end.

The dynamics reproduce gymnasium's ``CartPole-v1`` bit for bit on CPU: the same constants, the same
explicit-Euler update written in the same operation order, the state kept in float64, the policy shown
float32 observations, reward 1 per step including the terminating one, truncation at 500 steps. Initial
states are drawn with numpy exactly as ``env.reset(seed=s)`` does. On CPU the arithmetic runs in numpy:
its per-operation overhead on a few thousand values is about half of torch's, and its cos/sin are glibc's,
as gymnasium's (torch's vectorized kernels differ by one ulp in ~0.2% of inputs, which would break bit
equality). On CUDA it runs in torch, where ``cos``/``sin`` and division can differ from glibc by one ulp,
which very rarely changes an episode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from gymnasium.utils import seeding
from torch import Tensor

__all__ = ["FORCE_MAG", "GRAVITY", "LENGTH", "MASSCART", "MASSPOLE", "MAX_EPISODE_STEPS", "POLEMASS_LENGTH", "TAU",
           "THETA_THRESHOLD", "TOTAL_MASS", "X_THRESHOLD", "ActFn", "cartpole_step", "initial_states", "rollout"]

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

# act(obs [4, K'', L] float32, feature-major; policy_ids [K''] (may repeat)) -> actions [K'', L] (0/1 or bool)
ActFn = Callable[[Tensor, Tensor], Tensor]


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


# --------------------------------------------------------------------------- dynamics

def cartpole_step(state: tuple[Tensor, Tensor, Tensor, Tensor], action: Tensor
                  ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """One CartPole-v1 step for a batch: ``state = (x, x_dot, theta, theta_dot)``, each ``[M]`` float64, and
    ``action [M]`` in {0, 1} (or bool) -> ``(next state, terminated [M] bool)``, operation for operation as
    gymnasium's ``step`` (numpy on CPU, torch elsewhere)."""
    if state[0].device.type != "cpu":
        return _torch_step(state, action)
    st = np.stack([c.numpy() for c in state])                     # [4, M] float64, a copy stepped in place
    terminated = _numpy_step(st, action.numpy(), _numpy_buffers(st.shape[1]))
    return tuple(torch.from_numpy(c) for c in st), torch.from_numpy(terminated)  # buffers of this call alone


def _numpy_buffers(S: int) -> dict[str, np.ndarray]:
    """Work arrays of ``_numpy_step`` for S slots, made once and reused."""
    buf = {name: np.empty(S) for name in ("cos", "sin", "temp", "tmp", "force")}
    buf.update(deriv=np.empty((4, S)), abs=np.empty((2, S)), past=np.empty((2, S), dtype=bool),
               terminated=np.empty(S, dtype=bool), limits=np.array([[X_THRESHOLD], [THETA_THRESHOLD]]))
    return buf


def _numpy_step(st: np.ndarray, action: np.ndarray, buf: dict[str, np.ndarray]) -> np.ndarray:
    """gymnasium's CartPoleEnv.step on ``st [4, S]`` (x, x_dot, theta, theta_dot) float64 in place, for
    ``action [S]`` (0/1 or bool) -> ``terminated [S]`` (a buffer of ``buf``). Every operation writes into a
    buffer: a fresh array per operation would cost an allocation (and page faults past a few hundred KB)
    on each of ~25 operations per step. The operations and their order are gymnasium's."""
    cos, sin, temp, tmp, force, deriv = (buf[k] for k in ("cos", "sin", "temp", "tmp", "force", "deriv"))
    np.cos(st[2], out=cos)
    np.sin(st[2], out=sin)
    np.multiply(action, 2 * FORCE_MAG, out=force)                 # 1 -> +FORCE_MAG, 0 -> -FORCE_MAG, exactly
    np.subtract(force, FORCE_MAG, out=force)
    np.multiply(st[3], st[3], out=temp)                           # temp = (force + PL * td^2 * sin) / M
    np.multiply(POLEMASS_LENGTH, temp, out=temp)
    np.multiply(temp, sin, out=temp)
    np.add(force, temp, out=temp)
    np.divide(temp, TOTAL_MASS, out=temp)
    acc = deriv[3]                                                # thetaacc = (g sin - cos temp) /
    np.multiply(GRAVITY, sin, out=acc)                            #   (LENGTH (4/3 - MP cos^2 / M))
    np.multiply(cos, temp, out=tmp)
    np.subtract(acc, tmp, out=acc)
    np.multiply(cos, cos, out=tmp)
    np.multiply(MASSPOLE, tmp, out=tmp)
    np.divide(tmp, TOTAL_MASS, out=tmp)
    np.subtract(4.0 / 3.0, tmp, out=tmp)
    np.multiply(LENGTH, tmp, out=tmp)
    np.divide(acc, tmp, out=acc)
    np.multiply(POLEMASS_LENGTH, acc, out=tmp)                    # xacc = temp - PL * thetaacc * cos / M
    np.multiply(tmp, cos, out=tmp)
    np.divide(tmp, TOTAL_MASS, out=tmp)
    np.subtract(temp, tmp, out=deriv[1])
    deriv[0::2] = st[1::2]                                        # x_dot, theta_dot before the update
    np.multiply(TAU, deriv, out=deriv)                            # explicit Euler: s + TAU * ds/dt
    np.add(st, deriv, out=st)
    np.abs(st[0::2], out=buf["abs"])                              # |x|, |theta| past their limits
    np.greater(buf["abs"], buf["limits"], out=buf["past"])
    return np.logical_or(buf["past"][0], buf["past"][1], out=buf["terminated"])


def _torch_step(state: tuple[Tensor, Tensor, Tensor, Tensor], action: Tensor
                ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """gymnasium's CartPoleEnv.step arithmetic in torch (any device), as ``cartpole_step``."""
    x, x_dot, theta, theta_dot = state
    total_mass = torch.full((), TOTAL_MASS, dtype=x.dtype, device=x.device)  # divisor as a tensor: CUDA
    # turns division by a Python scalar into multiplication by its reciprocal
    force = torch.where(action == 1, FORCE_MAG, -FORCE_MAG).to(x.dtype)  # [M]
    costheta, sintheta = torch.cos(theta), torch.sin(theta)
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


# --------------------------------------------------------------------------- rollout

def rollout(act: ActFn, owner: Tensor, init_states: Tensor, max_steps: int = MAX_EPISODE_STEPS,
            trace: list[Tensor] | None = None, min_fill: float = 0.8,
            dynamics: Literal["numpy", "torch"] | None = None) -> Tensor:
    """Run B episodes to their end and return their undiscounted returns ``[B]`` float64.

    ``owner [B]`` (non-decreasing) is the policy of each episode, ``init_states [B, 4]`` float64 their
    starts. Episodes live in a *packing*: rows of L slots, each row holding episodes of one policy (L
    chosen by ``_packing``), so ``act(obs [4, K'', L], row_policy [K''])`` returns the actions ``[K'', L]``
    with one weight read per row (``obs`` is the same tensor, updated in place, until the next packing).
    The dynamics step every slot; a finished episode's slot keeps stepping, ignored, until fewer than
    ``min_fill`` of the episodes packed last are unfinished, and then the unfinished ones are re-packed
    (and the policy's weights re-gathered). Between re-packings a step costs no gather or scatter, and on CPU
    no allocation.
    With ``trace`` a list, the full ``[B, 4]`` state after every step is appended (finished rows frozen).
    ``dynamics``: "numpy" (CPU only; bit for bit gymnasium's) or "torch" (any device); by default numpy on
    CPU and torch elsewhere.
    """
    if owner.dim() != 1 or init_states.shape != (owner.shape[0], 4):
        raise ValueError(f"owner must be [B] and init_states [B, 4], got {list(owner.shape)} and "
                         f"{list(init_states.shape)}")
    if owner.numel() > 1 and bool((owner[1:] < owner[:-1]).any()):
        raise ValueError("owner must be sorted (non-decreasing): episodes of one policy must be contiguous")
    device, B = init_states.device, owner.shape[0]
    dynamics = dynamics or ("numpy" if device.type == "cpu" else "torch")
    if dynamics not in ("numpy", "torch") or (dynamics == "numpy" and device.type != "cpu"):
        raise ValueError(f"dynamics must be 'numpy' (CPU tensors only) or 'torch', got {dynamics!r} on {device}")
    returns = torch.zeros(B, dtype=torch.float64, device=device)  # [B]
    full = init_states.to(torch.float64).clone() if trace is not None else None  # [B, 4]
    live, slot, env = torch.arange(B, device=device), None, None  # [M] episodes packed, [M] their slots
    alive_count, packed = B, 0                                    # packed: unfinished episodes at the last packing
    for t in range(max_steps):
        if alive_count == 0:
            break
        if alive_count < min_fill * packed or packed == 0:        # (re-)pack the unfinished episodes
            if env is None:
                state, length = init_states.to(torch.float64).T, torch.zeros(B, dtype=torch.float64, device=device)
            else:
                returns[live] = env.length[slot]                  # lengths so far; final for the ended ones
                keep = slot[env.alive[slot]]                      # [M] slots of unfinished episodes
                live, state, length = env.episode[keep], env.state[:, keep], env.length[keep]
            slot, row_policy, L = _packing(owner[live])           # [M], [K''], row length
            env = _Slots(state, length, live, slot, row_policy.shape[0] * L, L, dynamics)
            packed = alive_count
        stepped = env.alive.clone() if full is not None else None  # [S] unfinished before this step
        alive_count = env.step(act(env.obs, row_policy).view(-1))
        if full is not None:
            full.index_put_((env.episode[stepped],), env.state.T[stepped])
            trace.append(full.clone())
    if env is not None:
        returns[live] = env.length[slot]
    return returns


class _Slots:
    """S slots of a packing: the CartPole ``state [4, S]`` float64 of each slot's episode ``episode [S]``,
    its steps so far ``length [S]`` (float64, the return: reward 1 per step, the terminating one included),
    ``alive [S]`` and the float32 observations ``obs [4, K'', L]``, all updated in place by ``step``.
    Empty slots (padding of a row) hold zeros and are not alive. ``dynamics``: as ``rollout``'s.
    """

    def __init__(self, state: Tensor, length: Tensor, episode: Tensor, slot: Tensor, S: int, L: int,
                 dynamics: Literal["numpy", "torch"]):
        device = state.device
        self.state = torch.zeros(4, S, dtype=torch.float64, device=device).index_copy_(1, slot, state)  # [4, S]
        self.length = torch.zeros(S, dtype=torch.float64, device=device).index_copy_(0, slot, length)  # [S]
        self.episode = torch.zeros(S, dtype=torch.long, device=device).index_copy_(0, slot, episode)  # [S]
        self.alive = torch.zeros(S, dtype=torch.bool, device=device).index_fill_(0, slot, True)  # [S]
        self._obs = self.state.float()                            # [4, S] float32, as gymnasium gives them
        self.obs = self._obs.view(4, -1, L)                       # [4, K'', L] feature-major rows
        if dynamics == "numpy":                                   # numpy views of the tensors, and buffers
            self._np = {name: getattr(self, name).numpy() for name in ("state", "length", "alive", "_obs")}
            self._buf = _numpy_buffers(S)
        self.dynamics = dynamics

    def step(self, action: Tensor) -> int:
        """Apply ``action [S]`` (0/1 or bool) to every slot -> the number of episodes still alive."""
        if self.dynamics == "torch":
            new, terminated = _torch_step(tuple(self.state), action)
            self.state = torch.stack(new)
            self.length += self.alive                             # a step for each unfinished episode
            self.alive &= ~terminated
            self._obs.copy_(self.state)
            return int(self.alive.sum())
        st, alive, length = self._np["state"], self._np["alive"], self._np["length"]
        terminated = _numpy_step(st, action.numpy(), self._buf)
        np.add(length, alive, out=length)                         # a step for each unfinished episode
        np.greater(alive, terminated, out=alive)                  # alive and not terminated
        np.copyto(self._np["_obs"], st, casting="same_kind")      # next observations, float32
        return int(np.count_nonzero(alive))


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
