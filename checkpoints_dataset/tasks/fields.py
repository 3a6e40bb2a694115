"""Neural fields (issue 18): every run fits one image with a small MLP, ``(x, y) in [-1, 1]^2 -> intensity``.

A field *is* its object, so a generated field can be looked at. The network: fixed Gaussian Fourier features
(Tancik et al. 2020; a non-persistent buffer, so not part of the parameter vector) feeding a ReLU MLP of
hidden layers of 32 units, about 2K parameters. ReLU and not SIREN: SIREN's first-layer frequency of 30
multiplies any error in a generated weight.

- Runs fit images drawn class-balanced from a pool (run ``r`` fits an image of class ``r % classes``, chosen
  by its seed); the image's pool index and label are recorded with the run's hyperparameters.
- Training: full-image MSE, every run of a group at once (``torch.func``), with the run's optimizer.
- Metrics from the parameters alone: ``psnr`` to the nearest pool image, ``label`` (that image's class) and
  ``sharpness`` (mean gradient magnitude of the render: a blurry class mean also scores a high nearest PSNR).
- Initialization: each run its own init (``init="per_run"``, G.pt's setting) or one shared by all runs
  (``init="shared"``, HyperDiffusion's, for start-free generation).

``digits_field`` uses sklearn's 8x8 digits (no data file); ``fashion_field`` Fashion-MNIST's 28x28 images.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..optim import (GroupResult, PopulationConfig, adam_first, checkpoint_schedule, init_optimizer_state, optimizer_step,
                     run_generators)
from ..params import check_params
from .base import Task
from .fashion import FILES, default_data_dir, load_fashion_mnist, missing_files_message

Init = Literal["per_run", "shared"]


def population_inits(task: Task, runs: list[dict], init: Init, shared_seed: int) -> Tensor:
    """The runs' initial parameters ``[R, P]``: each its own (``init_params`` from its seed, times its
    ``init_scale``), or (``init="shared"``) all the one init of ``shared_seed``, unscaled."""
    if init == "shared":
        return task.init_params(1, torch.Generator().manual_seed(shared_seed)).expand(len(runs), -1).clone()
    return torch.cat([task.init_params(1, g, h.get("init_scheme", "default")) * float(h["init_scale"])
                      for g, h in zip(run_generators(runs)[0], runs)])


def fit_full_batch(task, runs: list[dict], order: Tensor, loss_fn, data: tuple[Tensor, ...], config: PopulationConfig,
                   device: torch.device, progress: Callable[[float], None] | None) -> GroupResult:
    """The field tasks' population loop: ``config.epochs * task.steps_per_epoch`` full-batch steps of each run's
    optimizer on ``loss_fn(params, *data_r)`` (``data``: one row per run, in ``runs``' order, which ``order``
    maps back to the caller's), from ``population_inits(task, runs, task.init, task.pool_seed)``, with a
    checkpoint and ``task.evaluate`` at each step of ``checkpoint_schedule``."""
    total = task.steps_per_epoch * config.epochs
    schedule = checkpoint_schedule(total, config.num_checkpoints)
    flat = population_inits(task, runs, task.init, task.pool_seed).to(device)             # [R, P]
    hp = {k: torch.tensor([float(h[k]) for h in runs], device=device) for k in ("lr", "weight_decay", "momentum")}
    is_adam = torch.tensor([h["optimizer"] == "adam" for h in runs], device=device)
    grad_fn = vmap(grad(loss_fn))
    state = init_optimizer_state(flat)
    vectors, metrics = [], []
    for step in range(total + 1):
        if step in schedule:
            vectors.append(flat.detach().float().cpu().clone())   # optimizer_step works in place
            metrics.append(task.evaluate(flat, device=device))
        if step == total:
            break
        grads = grad_fn(task.layer_shapes.split(flat), *data)                              # name -> [R, *shape]
        flat = optimizer_step(flat, task.layer_shapes.join(grads), state, is_adam, hp["lr"], hp["weight_decay"],
                              hp["momentum"])
        if progress is not None and (step + 1) % task.steps_per_epoch == 0:
            progress(1.0 / config.epochs)
    back = torch.argsort(order)
    return GroupResult(params=torch.stack(vectors, dim=1)[back], steps=torch.tensor(schedule, dtype=torch.int64),
                       epochs=torch.tensor(schedule, dtype=torch.float64) / task.steps_per_epoch,
                       metrics={m: torch.stack([c[m] for c in metrics], dim=1)[back] for m in task.metric_names})


class FourierFeatures(nn.Module):
    """``[B, d]`` coordinates -> ``[B, 2F]``: ``sin`` and ``cos`` of ``2 pi x B`` for a fixed Gaussian ``B [d, F]``
    of standard deviation ``scale`` drawn from ``seed`` (a non-persistent buffer: the same in every network)."""

    def __init__(self, in_dim: int = 2, features: int = 16, scale: float = 2.0, seed: int = 0):
        super().__init__()
        freqs = torch.randn(in_dim, features, generator=torch.Generator().manual_seed(seed)) * scale
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        proj = 2 * math.pi * x @ self.freqs  # [B, F]
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)  # [B, 2F]


def grid(size: int) -> Tensor:
    """Pixel-centre coordinates of a ``size x size`` image in [-1, 1]^2, row-major ``[size^2, 2]`` as (x, y)."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1] from their mean squared error (capped at 100 dB)."""
    return (-10 * torch.log10(mse.clamp_min(1e-10))).clamp(max=100.0)


def sharpness(images: Tensor) -> Tensor:
    """Mean gradient magnitude of ``images [K, H, W]`` (forward differences) -> ``[K]``."""
    gx = images[:, :-1, 1:] - images[:, :-1, :-1]
    gy = images[:, 1:, :-1] - images[:, :-1, :-1]
    return (gx ** 2 + gy ** 2).sqrt().mean(dim=(1, 2))


class ImageFieldTask(Task):
    """One image per run, fitted by a Fourier-feature ReLU MLP. Subclasses give ``name`` and ``load_images()
    -> (images float32 [M, H, W] in [0, 1], labels int64 [M])``, from which the pool is drawn.

    Args:
        hidden: widths of the hidden layers (two or three of about 32 units).
        features: Fourier features (F; the first layer sees 2F inputs).
        scale: standard deviation of the Fourier frequencies (cycles across the image).
        pool_per_class: pool images per class (drawn by ``pool_seed``); runs fit pool images.
        init: each run its own init ("per_run") or one init shared by all ("shared").
        steps_per_epoch: full-image optimizer steps in one "epoch" of the population builder.
    """

    metric_names = ("psnr", "label", "sharpness")
    label_metrics = ("label",)
    default_metric = "psnr"
    lower_is_better = {"psnr": False, "label": False, "sharpness": False}
    metric_bounds = {"psnr": (0.0, 100.0), "label": (0.0, math.inf), "sharpness": (0.0, math.inf)}
    eval_networks_chunk = 256

    def __init__(self, hidden: tuple[int, ...] | list[int] = (32, 32), features: int = 16, scale: float = 2.0,
                 pool_per_class: int = 20, pool_seed: int = 0, init: Init = "per_run", steps_per_epoch: int = 100):
        widths = [hidden] if isinstance(hidden, (int, np.integer)) else list(hidden)
        if not widths or any(not isinstance(w, (int, np.integer)) or w < 1 for w in widths):
            raise ValueError(f"hidden must be a list of widths >= 1, got {hidden!r}")
        if init not in ("per_run", "shared"):
            raise ValueError(f"init must be 'per_run' or 'shared', got {init!r}")
        for name, value in (("features", features), ("pool_per_class", pool_per_class),
                            ("steps_per_epoch", steps_per_epoch)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        self.hidden, self.features, self.scale = [int(w) for w in widths], int(features), float(scale)
        self.pool_per_class, self.pool_seed, self.init = int(pool_per_class), int(pool_seed), init
        self.steps_per_epoch = int(steps_per_epoch)
        self._pool: tuple[Tensor, Tensor] | None = None

    DEFAULTS = dict(hidden=[32, 32], features=16, scale=2.0, pool_per_class=20, pool_seed=0, init="per_run",
                    steps_per_epoch=100)

    def build_options(self) -> dict:
        """The options that change what a build produces, when they differ from the defaults."""
        return {k: getattr(self, k) for k, v in self.DEFAULTS.items() if getattr(self, k) != v}

    def load_images(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define load_images()")

    # ------------------------------------------------------------ the pool and the network
    @property
    def pool(self) -> tuple[Tensor, Tensor]:
        """``pool_per_class`` images of every class ``[M, H, W]`` and their labels ``[M]``, class by class."""
        if self._pool is None:
            images, labels = self.load_images()
            rng = np.random.default_rng(self.pool_seed)
            picks = []
            for c in sorted(set(labels.tolist())):
                idx = np.flatnonzero(labels.numpy() == c)
                if len(idx) < self.pool_per_class:
                    raise ValueError(f"class {c} has {len(idx)} images, fewer than pool_per_class={self.pool_per_class}")
                picks.append(np.sort(rng.choice(idx, self.pool_per_class, replace=False)))
            pick = torch.from_numpy(np.concatenate(picks))
            self._pool = images[pick].float(), labels[pick].long()
        return self._pool

    @property
    def size(self) -> int:
        return int(self.pool[0].shape[-1])

    @property
    def num_classes(self) -> int:
        return int(self.pool[1].max()) + 1

    def build_model(self) -> nn.Module:
        widths = [2 * self.features, *self.hidden]
        layers: list[nn.Module] = [FourierFeatures(2, self.features, self.scale)]
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], 1))

    def probe_inputs(self) -> Tensor:
        """The image's pixel coordinates: the function-space loss compares generated and target images."""
        return grid(self.size)

    def images(self, params: Tensor, size: int | None = None) -> Tensor:
        """The fields of ``params [K, P]`` on a ``size x size`` grid (default: the images'), clamped to [0, 1]
        -> ``[K, size, size]``."""
        size = self.size if size is None else int(size)
        out = torch.cat([self.network_outputs(params[i:i + self.eval_networks_chunk].float(), grid(size))
                         for i in range(0, params.shape[0], self.eval_networks_chunk)])  # [K, size^2, 1]
        return out.view(-1, size, size).clamp(0, 1)

    def render(self, params: Tensor, size: int = 56) -> Tensor:
        """The fields as ``uint8 [K, size, size, 3]`` grey images on a fine grid (they are continuous)."""
        with torch.no_grad():
            img = self.images(check_params(params, self.num_params), size)  # [K, s, s]
        return (img * 255).round().to(torch.uint8)[..., None].expand(-1, -1, -1, 3).contiguous()

    def nearest(self, params: Tensor, size: int = 56) -> tuple[Tensor, Tensor]:
        """The pool image nearest to each field, ``uint8 [K, size, size, 3]`` (pixels enlarged), and its PSNR."""
        pool = self.pool[0]
        with torch.no_grad():
            img = self.images(check_params(params, self.num_params)).flatten(1).cpu()  # [K, HW]
            best, idx = (torch.cdist(img, pool.flatten(1)) ** 2 / pool[0].numel()).min(dim=1)
        img = nn.functional.interpolate(pool[idx][:, None], size=(size, size), mode="nearest")[:, 0]
        return (img * 255).round().to(torch.uint8)[..., None].expand(-1, -1, -1, 3).contiguous(), psnr(best)

    def evaluate(self, params: Tensor, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """``psnr`` to the nearest pool image, that image's ``label``, and the render's ``sharpness``."""
        params = check_params(params, self.num_params)
        device = torch.device(device) if device is not None else params.device
        pool, labels = self.pool
        flat_pool = pool.flatten(1).to(device)  # [M, HW]
        with torch.no_grad():
            img = self.images(params.to(device))  # [K, H, W]
            mse = torch.cdist(img.flatten(1), flat_pool) ** 2 / flat_pool.shape[1]  # [K, M]
            best, nearest = mse.min(dim=1)
            return {"psnr": psnr(best).float().cpu(), "label": labels[nearest.cpu()].float(),
                    "sharpness": sharpness(img).float().cpu()}

    # ------------------------------------------------------------ training
    def assign_images(self, hparams: list[dict]) -> None:
        """Each run's image, written into its hyperparameters: class ``run_id % classes``, a pool image of that
        class drawn by the run's seed (``image``: its pool index)."""
        labels = self.pool[1]
        for h in hparams:
            label = int(h["run_id"]) % self.num_classes
            members = torch.nonzero(labels == label)[:, 0]
            pick = int(np.random.default_rng(int(h["seed"])).integers(len(members)))
            h.update(image=int(members[pick]), label=label)

    def train_population(self, hparams: list[dict], config: PopulationConfig, device: torch.device,
                         progress: Callable[[float], None] | None = None) -> GroupResult:
        """Fit each run's image (``assign_images``) with full-image MSE, ``config.epochs * steps_per_epoch``
        steps of the run's optimizer. Runs start from their own init scaled by ``init_scale``, or (``init=
        "shared"``) all from the init of seed ``pool_seed``, unscaled. The run's image index and label are
        added to its hyperparameters."""
        device = torch.device(device)
        self.assign_images(hparams)                    # recorded in the manifest with the run
        order = adam_first(torch.tensor([h["optimizer"] == "adam" for h in hparams]))
        runs = [hparams[i] for i in order]
        pool = self.pool[0].flatten(1).to(device)      # [M, HW]
        targets = pool[torch.tensor([h["image"] for h in runs], device=device)]  # [R, HW]
        coords = grid(self.size).to(device)            # [HW, 2]
        model = copy.deepcopy(self._eval_model).to(device)   # its Fourier features on the device

        def loss_fn(p, y):
            return ((functional_call(model, p, (coords,))[:, 0] - y) ** 2).mean()

        return fit_full_batch(self, runs, order, loss_fn, (targets,), config, device, progress)


class DigitsField(ImageFieldTask):
    """sklearn's 8x8 digits as fields (embedded data, for tests and quick studies)."""

    name = "digits_field"

    def load_images(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        data = load_digits()
        return torch.tensor(data.images / 16.0, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64)


class FashionField(ImageFieldTask):
    """Fashion-MNIST's 28x28 training images as fields (``data_dir``: the IDX files, see ``fashion``)."""

    name = "fashion_field"

    def __init__(self, data_dir: str | Path | None = None, **kwargs):
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        if not all((self.data_dir / f).exists() for f in FILES.values()):  # fail early, before any work
            raise FileNotFoundError(missing_files_message(self.data_dir))

    def load_images(self) -> tuple[Tensor, Tensor]:
        raw = load_fashion_mnist(self.data_dir)
        return (torch.from_numpy(raw["train_images"].astype(np.float32) / 255.0),
                torch.from_numpy(raw["train_labels"].astype(np.int64)))
