"""Permutation symmetries of parameter vectors: specs, random augmentation and weight matching.

Reordering the hidden units of a layer (rows of its weight and bias, BatchNorm entries of those channels,
and the matching input columns of the next layer) leaves the network's function unchanged. A
``PermutationSpec`` lists these symmetries as independent *groups*: each group has a size (units or
channels) and the ``(param name, axis, block)`` places its permutation acts on. ``block`` > 1 is for the
Linear that follows ``Flatten`` of a ``C x H x W`` map: its input axis holds ``C`` blocks of ``H*W``
entries and whole blocks move together.

Semantics everywhere: a permutation ``perm`` of a group maps ``new[..., i, ...] = old[..., perm[i], ...]``
on each of its axes. Input and output units are never permuted (the output layer belongs to no group).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .params import LayerShapes, check_params, float_layer_shapes

Axis = tuple[str, int, int]  # (param name, axis, block)


@dataclass
class PermGroup:
    """One independent permutation of ``size`` units, acting on ``axes`` = [(name, axis[, block]), ...]."""
    name: str
    size: int
    axes: list[tuple] = field(default_factory=list)

    def __post_init__(self):
        self.axes = [(str(a[0]), int(a[1]), int(a[2]) if len(a) > 2 else 1) for a in self.axes]


@dataclass
class PermutationSpec:
    """The neuron-permutation symmetries of a parameter vector with layout ``layer_shapes``."""
    layer_shapes: LayerShapes
    groups: list[PermGroup]

    def __post_init__(self):
        self.layer_shapes = LayerShapes(self.layer_shapes)
        for g in self.groups:
            for name, axis, block in g.axes:
                if name not in self.layer_shapes:
                    raise ValueError(f"permutation group {g.name!r} names {name!r}, which is not a layer "
                                     f"of the parameter vector ({list(self.layer_shapes)})")
                shape = self.layer_shapes[name]
                if not 0 <= axis < len(shape) or shape[axis] != g.size * block:
                    raise ValueError(f"permutation group {g.name!r} of size {g.size} (block {block}) does not "
                                     f"fit axis {axis} of {name!r} with shape {list(shape)}")

    @property
    def num_params(self) -> int:
        return self.layer_shapes.num_params

    def to_json(self) -> dict:
        """A JSON-able dict: ``{"layer_shapes": [[name, shape], ...], "groups": [{name, size, axes}]}``."""
        return {"layer_shapes": self.layer_shapes.to_json(),
                "groups": [{"name": g.name, "size": g.size, "axes": [list(a) for a in g.axes]}
                           for g in self.groups]}

    @classmethod
    def from_json(cls, d: Mapping) -> "PermutationSpec":
        groups = [PermGroup(g["name"], int(g["size"]), [tuple(a) for a in g["axes"]]) for g in d["groups"]]
        return cls(LayerShapes.from_json(d["layer_shapes"]), groups)


def as_spec(spec: PermutationSpec | Mapping) -> PermutationSpec:
    """Accept a spec or its JSON dict."""
    return spec if isinstance(spec, PermutationSpec) else PermutationSpec.from_json(spec)


# ----------------------------------------------------------------------------- inference from a module
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Identity,
                nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _find_sequential(module: nn.Module) -> tuple[str, nn.Sequential]:
    """The nn.Sequential (the module itself or one submodule) that holds every float state_dict entry."""
    if isinstance(module, nn.Sequential):
        return "", module
    names = set(float_layer_shapes(module))
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.Sequential) and names == {f"{prefix}.{k}" for k in float_layer_shapes(sub)}:
            return prefix + ".", sub
    raise ValueError(f"cannot infer a permutation spec for {type(module).__name__}: it is not an nn.Sequential "
                     "and has no nn.Sequential submodule holding all its parameters; declare the spec "
                     "(PermutationSpec) in the task instead")


def _leaves(seq: nn.Sequential, prefix: str):
    for name, m in seq.named_children():
        if isinstance(m, nn.Sequential):
            yield from _leaves(m, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", m


def infer_permutation_spec(module: nn.Module) -> PermutationSpec:
    """The spec of an MLP or plain CNN written as an nn.Sequential (possibly nested, or held by the module).

    Supported layers: Linear, Conv2d (groups=1), BatchNorm1d/2d and LayerNorm over features (their weight,
    bias and running statistics move with the channel), element-wise activations, Dropout, pooling, global
    average pooling and Flatten, and before the first layer any parameter-free module (an input encoding such
    as Fourier features: it changes inputs, which are never permuted). The Linear after ``Flatten`` of a
    ``C x H x W`` map gets ``block = in_features // C``. Anything else raises a ValueError asking to declare the spec.
    """
    shapes = float_layer_shapes(module)
    prefix, seq = _find_sequential(module)
    groups: list[PermGroup] = []
    open_group: PermGroup | None = None   # the group whose units are the current activations
    flattened = False
    for name, m in _leaves(seq, prefix):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"layer {name!r}: grouped convolutions are not supported; declare the spec")
            if open_group is not None:
                fan_in = m.weight.shape[1]
                block = fan_in // open_group.size if flattened else 1
                if block * open_group.size != fan_in:
                    raise ValueError(f"layer {name!r} takes {fan_in} inputs, which does not split into "
                                     f"{open_group.size} channels; declare the spec")
                open_group.axes.append((f"{name}.weight", 1, block))
                groups.append(open_group)
            open_group = PermGroup(name, m.weight.shape[0], [(f"{name}.weight", 0, 1)])
            if m.bias is not None:
                open_group.axes.append((f"{name}.bias", 0, 1))
            flattened = False
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
                raise ValueError(f"layer {name!r}: LayerNorm over several dims is not supported; declare the spec")
            if open_group is not None:
                open_group.axes += [(f"{name}.{k}", 0, 1) for k in ("weight", "bias", "running_mean", "running_var")
                                    if f"{name}.{k}" in shapes]
        elif isinstance(m, nn.Flatten):
            flattened = True
        elif open_group is None and not any(True for _ in m.parameters()) and not any(
                k.startswith(f"{name}.") for k in shapes):
            pass   # a parameter-free input encoding (Fourier features) before the first layer: inputs, not units
        elif not isinstance(m, _ELEMENTWISE + _POOL):
            raise ValueError(f"cannot infer a permutation spec through layer {name!r} ({type(m).__name__}); "
                             "declare the spec (PermutationSpec) in the task instead")
    return PermutationSpec(shapes, groups)  # the last open group is the output layer: never permuted


def spec_from_layer_shapes(layer_shapes: Mapping[str, Sequence[int]]) -> PermutationSpec:
    """The spec of an MLP / plain CNN inferred from state_dict names and shapes alone (best effort; never
    raises), for when there is no module to hand to ``infer_permutation_spec``.

    Modules are name prefixes (``"0"`` of ``"0.weight"``). A weight module has a ``weight`` of rank >= 2
    (Linear, Conv); a norm module has only rank-1 entries. Consecutive weight modules whose output size
    matches the next one's input (or divides it: flattened conv channels, ``block = in // out``) form a
    chain; every module of the chain but the last defines a group over its output units (its entries whose
    first dim is that size), with the norm modules between. Anything else breaks the chain; layers in no
    group are never permuted. For ``nn.Sequential`` MLPs and CNNs it agrees with ``infer_permutation_spec``.
    """
    modules: dict[str, list[str]] = {}
    for name in layer_shapes:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    shapes = LayerShapes(layer_shapes)
    groups: list[PermGroup] = []
    prev: tuple[str, list, int] | None = None  # (module, axes so far, out units)
    for mod, names in modules.items():
        weight = f"{mod}.weight" if mod else "weight"
        if weight in shapes and len(shapes[weight]) >= 2:
            out, inp = shapes[weight][0], shapes[weight][1]
            if prev is not None and inp % prev[2] == 0:
                groups.append(PermGroup(prev[0], prev[2], prev[1] + [(weight, 1, inp // prev[2])]))
            prev = (mod, [(n, 0, 1) for n in names if shapes[n] and shapes[n][0] == out], out)
        elif prev is not None and all(len(shapes[n]) == 1 and shapes[n][0] == prev[2] for n in names):
            prev[1].extend((n, 0, 1) for n in names)  # norm between two weight layers
        else:
            prev = None  # something unknown breaks the chain
    return PermutationSpec(layer_shapes, groups)


# ----------------------------------------------------------------------------- applying permutations
def random_permutations(K: int, spec: PermutationSpec | Mapping, generator: torch.Generator | None = None
                        ) -> list[Tensor]:
    """One random permutation per row and group: a list (one per group) of LongTensor [K, size]."""
    spec = as_spec(spec)
    return [torch.rand(K, g.size, generator=generator).argsort(dim=1) for g in spec.groups]  # [K, size]


def _layer_axes(spec: PermutationSpec, perms: Sequence[Tensor], K: int, device) -> dict[str, list]:
    """layer name -> [(axis, block, perm [K, size])] for every place a group's permutation acts."""
    if len(perms) != len(spec.groups):
        raise ValueError(f"got {len(perms)} permutations for {len(spec.groups)} groups")
    by_layer: dict[str, list[tuple[int, int, Tensor]]] = {}
    for g, perm in zip(spec.groups, perms):
        perm = perm.to(device)
        perm = perm.expand(K, -1) if perm.dim() == 1 else perm  # [K, size]
        if perm.shape != (K, g.size):
            raise ValueError(f"permutation of group {g.name!r} has shape {list(perm.shape)}, expected [{K}, {g.size}]")
        for name, axis, block in g.axes:
            by_layer.setdefault(name, []).append((axis, block, perm))
    return by_layer


def apply_permutations(params: Tensor, spec: PermutationSpec | Mapping, perms: Sequence[Tensor]) -> Tensor:
    """Apply given permutations (one LongTensor [K, size] or [size] per group) to ``params [K, P]``.

    Vectorized over K: per permuted layer and axis one ``torch.gather`` with the [K, size] index expanded
    (a view) over the other dims; no loop over rows. Untouched layers are copied as they are.
    """
    spec = as_spec(spec)
    params = check_params(params, spec.num_params)  # [K, P]
    K = params.shape[0]
    by_layer = _layer_axes(spec, perms, K, params.device)
    layers = spec.layer_shapes.split(params)  # name -> [K, *shape] views
    for name, moves in by_layer.items():
        shape, n, t = spec.layer_shapes[name], spec.layer_shapes.sizes[name], layers[name]
        for axis, block, perm in moves:
            pre, size = math.prod(shape[:axis]), perm.shape[1]
            t = t.reshape(K, pre, size, n // (pre * size))  # [K, pre, size, block * post]
            t = torch.gather(t, 2, perm[:, None, :, None].expand(t.shape))
        layers[name] = t.reshape(K, *shape)
    return spec.layer_shapes.join(layers)  # [K, P]


def permute_params(params: Tensor, spec: PermutationSpec | Mapping, generator: torch.Generator | None = None
                   ) -> Tensor:
    """One random function-preserving permutation per row of ``params [K, P]`` (same generator state,
    same permutations). Raises ValueError if rows do not have the spec's length."""
    spec = as_spec(spec)
    params = check_params(params, spec.num_params)  # [K, P]
    return apply_permutations(params, spec, random_permutations(params.shape[0], spec, generator))


# ----------------------------------------------------------------------------- weight matching
def _unit_rows(t: Tensor, axis: int, block: int, size: int) -> Tensor:
    """Move ``axis`` (size*block entries) to the front as ``[size, rest]``."""
    t = t.movedim(axis, 0)
    return t.reshape(size, block, *t.shape[1:]).reshape(size, -1)


def weight_matching(reference: Tensor, other: Tensor, spec: PermutationSpec | Mapping, max_iter: int = 100,
                    generator: torch.Generator | None = None, restarts: int = 1) -> list[Tensor]:
    """Permutations (one LongTensor [size] per group) that align ``other [P]`` to ``reference [P]``.

    Git Re-Basin weight matching: coordinate descent over groups, each step a linear assignment
    (``scipy.optimize.linear_sum_assignment``) maximizing the inner product of the matched units' weights,
    repeated in random group order until no group improves. Coordinate descent can stop in a local optimum
    (mostly for narrow layers): ``restarts`` > 1 adds runs from random permutations and keeps the best
    match. Use the result with ``apply_permutations(other[None], spec, [p[None] for p in perms])``.
    """
    spec = as_spec(spec)
    ref = check_params(reference, spec.num_params, what="reference")[0].double()
    oth = check_params(other, spec.num_params, what="other")[0].double()
    ref_t = {name: t[0] for name, t in spec.layer_shapes.split(ref).items()}  # name -> [*shape]
    oth_t = {name: t[0] for name, t in spec.layer_shapes.split(oth).items()}
    touching: dict[str, list[tuple[int, int, int]]] = {}  # layer -> (group index, axis, block)
    for gi, g in enumerate(spec.groups):
        for name, axis, block in g.axes:
            touching.setdefault(name, []).append((gi, axis, block))
    best, best_score = None, -math.inf
    for r in range(restarts):
        init = [torch.arange(g.size) if r == 0 else torch.randperm(g.size, generator=generator) for g in spec.groups]
        perms = _coordinate_descent(spec, ref_t, oth_t, touching, init, max_iter, generator)
        score = float(apply_permutations(oth[None], spec, [p[None] for p in perms])[0] @ ref)
        if score > best_score:
            best, best_score = perms, score
    return best


def _coordinate_descent(spec, ref_t, oth_t, touching, perms, max_iter, generator) -> list[Tensor]:
    """Git Re-Basin's loop: each group in turn solves its linear assignment given the others' permutations."""
    for _ in range(max_iter):
        improved = False
        for gi in torch.randperm(len(spec.groups), generator=generator).tolist():
            g = spec.groups[gi]
            cost = torch.zeros(g.size, g.size, dtype=torch.float64)  # [size, size]
            for name, axis, block in g.axes:
                w = oth_t[name]
                for gj, ax_j, bl_j in touching[name]:   # apply the other groups' current permutations
                    if (gj, ax_j) != (gi, axis):
                        idx = (perms[gj][:, None] * bl_j + torch.arange(bl_j)).reshape(-1)
                        w = w.index_select(ax_j, idx)
                cost += _unit_rows(ref_t[name], axis, block, g.size) @ _unit_rows(w, axis, block, g.size).T
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
            old_score = cost[torch.arange(g.size), perms[gi]].sum()
            new_score = cost[torch.arange(g.size), new].sum()
            if new_score > old_score + 1e-12 * max(1.0, abs(float(old_score))):
                perms[gi], improved = new, True
        if not improved:
            break
    return perms
