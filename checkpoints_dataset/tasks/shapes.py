"""``shapes_occupancy``: 3-D occupancy fields of procedural shapes (issue 18), the NeRF-like case.

Each run fits one shape of a pool with a small MLP, ``(x, y, z) in [-1, 1]^3 -> logit of "inside"``:
NeRF-style positional encoding (sin and cos of ``2^k pi x``, fixed, not parameters) feeding a ReLU MLP
of 32-unit hidden layers (1,985 parameters), trained with BCE on points near the surface and uniformly
in the cube (as occupancy networks and HyperDiffusion do).

- The pool: ``per_type`` shapes of each type (sphere, box, torus, capsule, cylinder, cone), each with a
  random scale, aspect (per-axis stretch) and rotation drawn from ``pool_seed``. Run ``r`` fits a shape of
  type ``r % 6`` drawn by its seed (recorded with the run as ``shape`` and ``type``).
- Metrics from the parameters alone, on a 32^3 grid: ``iou`` with the nearest pool shape and ``type``, that
  shape's type (a run that fits its shape well has its own shape nearest).
- ``render``: shaded views by ray marching (four orthographic views tiled 2 x 2; nearer is brighter).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..optim import GroupResult, PopulationConfig, adam_first
from ..params import check_params
from .base import Task
from .fields import Init, fit_full_batch

TYPES = ("sphere", "box", "torus", "capsule", "cylinder", "cone")


class PositionalEncoding(nn.Module):
    """``[B, 3]`` -> ``[B, 3 + 6L]``: the point and ``sin``/``cos`` of ``2^k pi x``, k < L (NeRF's encoding)."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(levels, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        proj = (x[..., None] * self.freqs).flatten(-2)  # [B, 3L]
        return torch.cat([x, torch.sin(proj), torch.cos(proj)], dim=-1)


def inside(kind: str, p: Tensor) -> Tensor:
    """Occupancy of the unit-sized shape ``kind`` at local points ``p [..., 3]`` (bool)."""
    x, y, z = p.unbind(-1)
    radial = torch.sqrt(x ** 2 + z ** 2)
    if kind == "sphere":
        return p.norm(dim=-1) < 1.0
    if kind == "box":
        return (p.abs() < 0.8).all(-1)
    if kind == "torus":
        return (radial - 0.7) ** 2 + y ** 2 < 0.3 ** 2
    if kind == "capsule":
        return torch.sqrt(radial ** 2 + (y - y.clamp(-0.6, 0.6)) ** 2) < 0.4
    if kind == "cylinder":
        return (radial < 0.6) & (y.abs() < 0.8)
    if kind == "cone":
        return (y.abs() < 0.8) & (radial < 0.7 * (0.8 - y) / 1.6)
    raise ValueError(f"unknown shape type {kind!r}; use one of {TYPES}")


def random_rotation(rng: np.random.Generator) -> Tensor:
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q, dtype=torch.float32)


def grid3(size: int) -> Tensor:
    """Voxel-centre coordinates of a ``size^3`` grid in [-1, 1]^3 -> ``[size^3, 3]``."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)


class ShapesOccupancy(Task):
    """Occupancy fields of procedural 3-D shapes (see the module docstring).

    Args:
        hidden: widths of the hidden layers.
        levels: positional-encoding frequencies per axis.
        per_type: pool shapes per type.
        pool_seed: seed of the pool (scales, aspects, rotations, training points).
        points: training points per shape (half near the surface, half uniform).
        steps_per_epoch: full-batch optimizer steps in one "epoch" of the population builder.
        resolution: the grid side of the metrics (32: 32^3 voxels).
        init: each run its own init ("per_run") or one init shared by all ("shared", for start-free generation).
    """

    name = "shapes_occupancy"
    metric_names = ("iou", "type")
    label_metrics = ("type",)
    default_metric = "iou"
    lower_is_better = {"iou": False, "type": False}
    metric_bounds = {"iou": (0.0, 1.0), "type": (0.0, len(TYPES) - 1.0)}
    DEFAULTS = dict(hidden=[32, 32], levels=4, per_type=20, pool_seed=0, points=4096, steps_per_epoch=100,
                    resolution=32, init="per_run")

    def __init__(self, hidden=(32, 32), levels: int = 4, per_type: int = 20, pool_seed: int = 0, points: int = 4096,
                 steps_per_epoch: int = 100, resolution: int = 32, init: Init = "per_run"):
        widths = list(hidden) if not isinstance(hidden, (int, np.integer)) else [hidden]
        for name, value in (("levels", levels), ("per_type", per_type), ("points", points),
                            ("steps_per_epoch", steps_per_epoch), ("resolution", resolution), *[("hidden", w) for w in widths]):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not widths:
            raise ValueError("hidden must list at least one width")
        if init not in ("per_run", "shared"):
            raise ValueError(f"init must be 'per_run' or 'shared', got {init!r}")
        self.init = init
        self.hidden, self.levels, self.per_type, self.pool_seed = [int(w) for w in widths], int(levels), int(per_type), int(pool_seed)
        self.points, self.steps_per_epoch, self.resolution = int(points), int(steps_per_epoch), int(resolution)
        self._pool = None

    def build_options(self) -> dict:
        return {k: getattr(self, k) for k, v in self.DEFAULTS.items() if getattr(self, k) != v}

    def build_model(self) -> nn.Module:
        widths = [3 + 6 * self.levels, *self.hidden]
        layers: list[nn.Module] = [PositionalEncoding(self.levels)]
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], 1))

    # ------------------------------------------------------------ the pool
    def occupancy(self, shape: int, p: Tensor) -> Tensor:
        """Whether points ``p [B, 3]`` lie inside pool shape ``shape`` (bool ``[B]``)."""
        kind, scale, rot = self.pool["shapes"][shape]
        return inside(kind, (p @ rot) / scale)   # world -> local: rotate back, unstretch

    @property
    def pool(self) -> dict:
        """``shapes``: (type, per-axis scale [3], rotation [3, 3]) per pool shape; ``types [M]``; ``grids [M, R^3]``
        occupancy on the metric grid; ``points [M, n, 3]`` and ``labels [M, n]`` the training points."""
        if self._pool is None:
            rng = np.random.default_rng(self.pool_seed)
            shapes, types = [], []
            for t, kind in enumerate(TYPES):
                for _ in range(self.per_type):
                    scale = torch.tensor(rng.uniform(0.45, 0.75) * rng.uniform(0.75, 1.25, 3), dtype=torch.float32)
                    shapes.append((kind, scale, random_rotation(rng)))
                    types.append(t)
            self._pool = {"shapes": shapes, "types": torch.tensor(types)}
            g = torch.Generator().manual_seed(self.pool_seed)
            self._pool["grids"] = torch.stack([self.occupancy(i, grid3(self.resolution)) for i in range(len(shapes))])
            pts = [self._training_points(i, g) for i in range(len(shapes))]
            self._pool["points"] = torch.stack([p for p, _ in pts])
            self._pool["labels"] = torch.stack([y for _, y in pts])
        return self._pool

    def _training_points(self, shape: int, g: Tensor) -> tuple[Tensor, Tensor]:
        """Half of the points near the surface (where a small jitter changes the occupancy), half uniform."""
        half = self.points // 2
        near = []
        while sum(len(n) for n in near) < half:
            p = torch.rand(8 * half, 3, generator=g) * 2 - 1
            q = p + 0.04 * torch.randn(p.shape, generator=g)
            near.append(p[self.occupancy(shape, p) != self.occupancy(shape, q)])
        p = torch.cat([torch.cat(near)[:half], torch.rand(self.points - half, 3, generator=g) * 2 - 1])
        return p, self.occupancy(shape, p).float()

    # ------------------------------------------------------------ scoring and drawing
    def logits(self, params: Tensor, points: Tensor, chunk: int = 64) -> Tensor:
        """The networks' logits ``[K, B]`` at ``points [B, 3]``."""
        params = check_params(params, self.num_params).float()
        with torch.no_grad():
            return torch.cat([self.network_outputs(params[i:i + chunk], points)[..., 0]
                              for i in range(0, params.shape[0], chunk)])

    def probe_inputs(self) -> Tensor:
        """Points of the metric grid (every 2nd voxel per axis): the function-space loss compares occupancies."""
        return grid3(self.resolution // 2)

    def evaluate(self, params: Tensor, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """``iou`` with the nearest pool shape on the ``resolution^3`` grid, and that shape's ``type``."""
        if device is not None:
            params = params.to(device)
        occ = (self.logits(params, grid3(self.resolution)) > 0).float()      # [K, V] on the parameters' device
        pool = self.pool["grids"].to(occ.device).float()                       # [M, V]
        inter = occ @ pool.T                                                   # [K, M]
        union = occ.sum(1, keepdim=True) + pool.sum(1)[None] - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
        best, idx = iou.max(dim=1)
        return {"iou": best.float().cpu(), "type": self.pool["types"][idx.cpu()].float()}

    def render(self, params: Tensor, size: int = 56, steps: int = 32) -> Tensor:
        """Four shaded orthographic views (front, side, top, oblique) tiled 2 x 2 -> ``uint8 [K, size, size, 3]``:
        rays march ``steps`` samples through the cube; the first inside sample gives the depth (nearer is
        brighter); white where a ray meets nothing."""
        half = size // 2
        c = (torch.arange(half, dtype=torch.float32) + 0.5) / half * 2 - 1
        v, u = torch.meshgrid(-c, c, indexing="ij")
        depth = torch.linspace(-1.2, 1.2, steps)
        cam = torch.stack([u[..., None].expand(-1, -1, steps), v[..., None].expand(-1, -1, steps),
                           depth.expand(half, half, steps)], -1).reshape(-1, 3)       # [h*h*S, 3] camera space
        views = [torch.eye(3), _rot(1, math.pi / 2), _rot(0, math.pi / 2), _rot(1, math.pi / 4) @ _rot(0, math.pi / 6)]
        tiles = []
        for rot in views:
            hit = self.logits(params, cam @ rot).view(-1, half, half, steps) > 0    # [K, h, h, S]
            first = torch.where(hit.any(-1), hit.float().argmax(-1), steps)  # [K, h, h] first inside sample
            shade = torch.where(first < steps, 0.95 - 0.75 * first.float() / steps, torch.ones_like(first, dtype=torch.float))
            tiles.append(shade.cpu())
        img = torch.ones(params.shape[0], size, size)
        for i, tile in enumerate(tiles):
            r, q = divmod(i, 2)
            img[:, r * half:(r + 1) * half, q * half:(q + 1) * half] = tile
        return (img * 255).round().to(torch.uint8)[..., None].expand(-1, -1, -1, 3).contiguous()

    # ------------------------------------------------------------ training
    def train_population(self, hparams: list[dict], config: PopulationConfig, device: torch.device,
                         progress: Callable[[float], None] | None = None) -> GroupResult:
        """Fit each run's shape (type ``run_id % 6``, one of that type drawn by the run's seed; recorded as
        ``shape`` and ``type``) with full-batch BCE on its training points, the run's optimizer and its own init
        (or the shared one, ``init="shared"``)."""
        device = torch.device(device)
        types = self.pool["types"]
        for h in hparams:
            members = torch.nonzero(types == int(h["run_id"]) % len(TYPES))[:, 0]
            h.update(shape=int(members[int(np.random.default_rng(int(h["seed"])).integers(len(members)))]),
                     type=int(h["run_id"]) % len(TYPES))
        order = adam_first(torch.tensor([h["optimizer"] == "adam" for h in hparams]))
        runs = [hparams[i] for i in order]
        shape_idx = torch.tensor([h["shape"] for h in runs])
        points, labels = self.pool["points"][shape_idx].to(device), self.pool["labels"][shape_idx].to(device)
        model = copy.deepcopy(self._eval_model).to(device)   # its encoding's frequencies on the device

        def loss_fn(p, x, y):
            return nn.functional.binary_cross_entropy_with_logits(functional_call(model, p, (x,))[:, 0], y)

        return fit_full_batch(self, runs, order, loss_fn, (points, labels), config, device, progress)


def _rot(axis: int, angle: float) -> Tensor:
    """Rotation by ``angle`` about ``axis`` (0: x, 1: y), as a row-vector map ``p @ R``."""
    c, s = math.cos(angle), math.sin(angle)
    if axis == 0:
        return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float32)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float32)
