"""Below both the tasks and the builder: what a population trainer uses and returns.

``PopulationConfig`` (what a build trains: runs, epochs, hyperparameter ranges), the vectorized optimizers
(``optimizer_step`` over a stack of runs ``[R, P]`` with per-run hyperparameters,
Adam and SGD-momentum runs side by side), the checkpoint schedule, and ``GroupResult``, the checkpoints of
one group of runs that ``Task.train_population`` returns and ``population.build_population`` stores.
Imports only torch and numpy, so ``tasks`` and ``population`` can both import it at module level.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

OptimizerName = Literal["adam", "sgd"]
InitScheme = Literal["default", "xavier", "kaiming", "orthogonal"]


@dataclass
class PopulationConfig:
    """What to build. Ranges are ``(low, high)``; a run draws each value independently."""

    runs: int = 256
    epochs: int = 20
    seed: int = 0
    group_size: int = 64                 # runs trained together and written as one shard
    num_checkpoints: int = 32            # per run, the init and the last step included
    batch_size: int = 64
    lr: tuple[float, float] = (1e-4, 3e-2)            # log-uniform (Adam scale)
    sgd_lr_scale: float = 10.0                        # SGD runs use lr * sgd_lr_scale
    weight_decay: tuple[float, float] = (0.0, 1e-3)   # uniform; decoupled for Adam, L2 for SGD
    init_scale: tuple[float, float] = (0.5, 1.5)      # uniform; multiplies every trainable init entry
    momentum: tuple[float, float] = (0.8, 0.95)       # uniform; Adam beta1 / SGD momentum
    optimizers: tuple[OptimizerName, ...] = ("adam", "sgd")
    init_scheme: InitScheme = "default"
    # compressed runs (issue 19): each run draws a final sparsity and a bit width from these choices; runs
    # train dense until compress_start (a fraction of their steps), then prune (cubic ramp to compress_end)
    # and train quantization-aware. (0.0,) and (32,) build dense runs, as before.
    sparsity: tuple[float, ...] = (0.0,)
    bits: tuple[int, ...] = (32,)
    compress_start: float = 0.25
    compress_end: float = 0.75
    # runs in consecutive blocks of this many (an "init group": runs k*K ... k*K + K - 1) start from one init
    # (its seed and init_scale) and differ in data order and the other hyperparameters, so the data holds
    # several trajectories from one start; the held-out split then keeps whole init groups
    runs_per_init: int = 1

    def __post_init__(self):
        for name in ("runs", "epochs", "group_size", "batch_size", "runs_per_init"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_checkpoints < 2:
            raise ValueError(f"num_checkpoints must be >= 2 (the init and the last step), got {self.num_checkpoints}")
        bad = [o for o in self.optimizers if o not in ("adam", "sgd")]
        if bad or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty subset of ('adam', 'sgd'), got {self.optimizers}")
        if not 0 < self.lr[0] <= self.lr[1]:
            raise ValueError(f"lr range must satisfy 0 < low <= high, got {self.lr}")
        if not self.sparsity or any(not 0.0 <= s < 1.0 for s in self.sparsity):
            raise ValueError(f"sparsity choices must lie in [0, 1), got {self.sparsity}")
        if not self.bits or any(int(b) != b or not 2 <= b <= 32 for b in self.bits):
            raise ValueError(f"bit-width choices must be integers from 2 to 32 (32: float), got {self.bits}")
        if not 0.0 <= self.compress_start <= self.compress_end <= 1.0:
            raise ValueError("need 0 <= compress_start <= compress_end <= 1 (fractions of a run's steps), got "
                             f"{self.compress_start} and {self.compress_end}")

    @property
    def compressed(self) -> bool:
        """Whether runs draw a sparsity or a bit width (otherwise they train dense)."""
        return tuple(self.sparsity) != (0.0,) or tuple(self.bits) != (32,)

    def to_json(self) -> dict:
        """The config as JSON; the compression fields only for compressed builds, so a dense build's record
        is what it was before they existed (its store keeps resuming)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.compressed:
            for k in ("sparsity", "bits", "compress_start", "compress_end"):
                del out[k]
        if self.runs_per_init == 1:   # likewise: one run per init, as every store built before it existed
            del out["runs_per_init"]
        return out


__all__ = ["GroupResult", "adam_first", "checkpoint_schedule", "init_optimizer_state", "optimizer_step",
           "run_generators"]


def run_generators(hparams: list[dict]) -> tuple[list[torch.Generator], list[torch.Generator]]:
    """Each run's (init generator, data generator). One generator serves both (the init drawn first, then the
    data order) unless the run shares its init with others (``init_seed`` in its hparams, from
    ``runs_per_init`` > 1): then the init comes from the group's seed and the data order from the run's."""
    data = [torch.Generator().manual_seed(int(h["seed"])) for h in hparams]
    init = [torch.Generator().manual_seed(int(h["init_seed"])) if "init_seed" in h else g
            for h, g in zip(hparams, data)]
    return init, data


@dataclass
class GroupResult:
    """The checkpoints of one group of R runs with C checkpoints each: what ``Task.train_population`` returns
    and ``population.build_population`` writes as one store shard (row ``r * C + c`` = run r, checkpoint c)."""

    params: Tensor                 # [R, C, P] float32, CPU (full parameter vectors, BatchNorm stats included)
    steps: Tensor                  # [C] int64, optimizer steps done (0 = init); the same for every run
    epochs: Tensor                 # [C] float64, steps / steps per epoch (cartpole: updates / generations_per_epoch)
    metrics: dict[str, Tensor]     # name -> [R, C] float32


def checkpoint_schedule(total_steps: int, num_checkpoints: int) -> list[int]:
    """Checkpoint steps: 0, then geometric spacing (dense early) up to ``total_steps``, distinct.

    Gives ``min(num_checkpoints, total_steps + 1)`` steps.
    """
    if total_steps < 1:
        raise ValueError(f"a run needs at least one training step, got total_steps={total_steps}")
    k = min(num_checkpoints, total_steps + 1) - 1               # checkpoints after the init
    steps = np.rint(np.geomspace(1, total_steps, k)).astype(np.int64) if k > 1 else np.array([total_steps])
    for i in range(1, k):                                       # make them strictly increasing ...
        steps[i] = max(steps[i], steps[i - 1] + 1)
    steps[-1] = total_steps
    for i in range(k - 2, -1, -1):                              # ... and end exactly at total_steps
        steps[i] = min(steps[i], steps[i + 1] - 1)
    return [0] + steps.tolist()


# ---------------------------------------------------------------- vectorized optimizers

def _per_run(x: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-run ``[R]`` tensor against ``like [R, ...]``."""
    return x.reshape(-1, *([1] * (like.dim() - 1)))


def init_optimizer_state(params: Tensor) -> dict:
    """Zeroed first/second moments for flat stacked parameters ``[R, P]`` and a step counter."""
    return {"step": 0, "m": torch.zeros_like(params), "v": torch.zeros_like(params)}


def adam_first(is_adam: Tensor) -> Tensor:
    """A stable order of the runs with the Adam runs first: ``optimizer_step`` on runs in this order works on
    two contiguous blocks (views) instead of gathering and scattering rows."""
    return torch.argsort((~is_adam.to(torch.bool)).to(torch.uint8), stable=True)


def optimizer_step(params: Tensor, grads: Tensor, state: dict, is_adam: Tensor, lr: Tensor,
                   weight_decay: Tensor, momentum: Tensor, beta2: float = 0.999, eps: float = 1e-8) -> Tensor:
    """One optimizer step for a stack of runs ``params [R, P]``, ``grads [R, P]``; every hyperparameter is a
    per-run ``[R]`` tensor.

    Runs with ``is_adam`` follow ``torch.optim.AdamW(lr, betas=(momentum, beta2), eps, weight_decay)``;
    the others ``torch.optim.SGD(lr, momentum, weight_decay)`` (L2 added to the gradient, no dampening).
    ``is_adam`` is read (and ``lr > 0`` checked) at the first step of a ``state`` only.
    ``params`` and ``state`` (from ``init_optimizer_state``) are updated in place, and ``grads`` is used as
    scratch; returns ``params``. Runs ordered by ``adam_first`` are updated as two contiguous blocks; any
    other order costs a gather and a scatter of the rows.
    """
    if "blocks" not in state:                               # the runs' optimizers are fixed: checked, split once
        if bool((lr <= 0).any()):
            raise ValueError(f"every run's learning rate must be > 0, got min {float(lr.min())}")
        a = is_adam.to(torch.bool)
        n = int(a.sum())
        state["blocks"] = ([(slice(0, n), True), (slice(n, None), False)] if bool(a[:n].all())  # views
                           else [(a.nonzero()[:, 0], True), ((~a).nonzero()[:, 0], False)])
    state["step"] += 1
    for rows, adam in state["blocks"]:
        p, g, m, v = (x[rows] for x in (params, grads, state["m"], state["v"]))  # views, or copies of rows
        if p.shape[0] == 0:
            continue
        h = [x[rows][:, None].to(p.dtype) for x in (lr, weight_decay, momentum)]         # [r, 1] each
        (_adamw_ if adam else _sgd_)(p, g, m, v, *h, state["step"], beta2, eps)
        if not isinstance(rows, slice):
            for full, part in ((params, p), (state["m"], m), (state["v"], v)):
                full[rows] = part
    return params


# Each pass below reads and writes whole [r, P] blocks in place: the update is memory-bound, so the number
# of passes (and of fresh allocations, which page-fault) is what costs.

def _adamw_(p, g, m, v, lr, wd, beta1, t: int, beta2: float, eps: float) -> None:
    """torch.optim.AdamW's update, in place, with per-run ``lr, wd, beta1 [r, 1]``."""
    p.mul_(1 - lr * wd)                                     # decoupled weight decay first, as AdamW
    m.lerp_(g, 1 - beta1)                                   # m = beta1 m + (1 - beta1) g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step = lr / (1 - beta1 ** t)                            # [r, 1] bias-corrected step size
    bc2 = (1 - beta2 ** t) ** 0.5
    # p -= step * m / (sqrt(v) / bc2 + eps)  ==  p -= m / (sqrt(v) * (1 / (step bc2)) + eps / step)
    denom = torch.sqrt(v, out=g)                            # g is no longer needed: reuse its memory
    torch.addcmul(eps / step, denom, 1 / (step * bc2), out=denom)
    p.addcdiv_(m, denom, value=-1.0)


def _sgd_(p, g, m, v, lr, wd, momentum, t: int, beta2: float, eps: float) -> None:
    """torch.optim.SGD's update (L2 in the gradient, momentum without dampening), in place."""
    g.addcmul_(p, wd)
    m.mul_(momentum).add_(g)                                # the first step gives m = g, as torch's buffer
    p.addcmul_(m, -lr)
