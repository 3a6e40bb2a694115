"""Parameter vectors: a network as one flat float vector.

A *parameter vector* is every floating-point entry of a module's ``state_dict()`` (weights, biases and
BatchNorm running statistics), flattened and concatenated in ``state_dict()`` order. Integer buffers such
as ``num_batches_tracked`` are left out; turning a vector back into a state_dict fills them from the
model, so ``model.load_state_dict(vector_to_state_dict(vec, model), strict=True)`` works.

A *layer shapes* mapping (``LayerShapes``) lists, in order, the name and shape of each entry of the vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

LayerShapes = dict[str, tuple[int, ...]]


def float_layer_shapes(obj: nn.Module | Mapping[str, Tensor]) -> LayerShapes:
    """The ordered ``name -> shape`` of every floating-point entry of a module's state_dict (or of a
    state_dict itself)."""
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    return {name: tuple(t.shape) for name, t in sd.items() if torch.is_floating_point(t)}


def count_params(layer_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Length of the parameter vector described by ``layer_shapes``."""
    return sum(math.prod(shape) for shape in layer_shapes.values())


def check_params(params: Tensor, num_params: int, *, what: str = "params") -> Tensor:
    """Validate a ``[P]`` or ``[K, P]`` float tensor of parameter vectors and return it as ``[K, P]``.

    Raises a ValueError naming the expected and actual length, rank or dtype.
    """
    if not isinstance(params, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape [K, {num_params}], got {type(params).__name__}")
    if not torch.is_floating_point(params):
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {params.dtype}; "
                         f"convert with .float()")
    if params.dim() == 1:
        params = params[None]  # [1, P]
    if params.dim() != 2 or params.shape[1] != num_params:
        raise ValueError(f"{what} must have shape [K, {num_params}] (or [{num_params}]), got "
                         f"{list(params.shape)}: parameter vectors of this task have {num_params} entries")
    return params


def vector_to_tensors(params: Tensor, layer_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Split ``params [K, P]`` into ``name -> [K, *shape]`` views, in layer order."""
    params = check_params(params, count_params(layer_shapes))
    out, offset = {}, 0
    for name, shape in layer_shapes.items():
        n = math.prod(shape)
        out[name] = params[:, offset:offset + n].reshape(params.shape[0], *shape)  # [K, *shape]
        offset += n
    return out


def tensors_to_vector(tensors: Mapping[str, Tensor], layer_shapes: Mapping[str, tuple[int, ...]]) -> Tensor:
    """Concatenate ``name -> [K, *shape]`` tensors into ``[K, P]`` in the order of ``layer_shapes``."""
    missing = [name for name in layer_shapes if name not in tensors]
    if missing:
        raise KeyError(f"tensors lack the layers {missing}; expected exactly {list(layer_shapes)}")
    flat = []
    for name, shape in layer_shapes.items():
        t = tensors[name]
        if tuple(t.shape[1:]) != tuple(shape):
            raise ValueError(f"layer {name!r} has shape {list(t.shape[1:])} per network, expected {list(shape)}")
        flat.append(t.reshape(t.shape[0], -1))  # [K, n]
    return torch.cat(flat, dim=1)  # [K, P]


def state_dict_to_vector(sd: Mapping[str, Tensor], layer_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Tensor:
    """One network's state_dict -> its parameter vector ``[P]`` (float32).

    With ``layer_shapes`` the state_dict must hold exactly those float entries with those shapes, in
    any order (files such as safetensors sort their keys; KeyError / ValueError otherwise); without,
    the float entries of ``sd`` are taken in order.
    """
    shapes = float_layer_shapes(sd) if layer_shapes is None else layer_shapes
    got = float_layer_shapes(sd)
    if set(got) != set(shapes):
        extra, missing = sorted(set(got) - set(shapes)), sorted(set(shapes) - set(got))
        raise KeyError(f"state_dict does not match the layer shapes: missing {missing}, unexpected {extra}")
    tensors = {name: sd[name].detach().float()[None] for name in shapes}  # name -> [1, *shape]
    return tensors_to_vector(tensors, shapes)[0]  # [P]


def vector_to_state_dict(vec: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """A parameter vector ``[P]`` -> a full state_dict that loads with ``strict=True`` into ``model``.

    Float entries come from ``vec`` (cast to each entry's dtype); integer buffers are the model's own.
    """
    sd = model.state_dict()
    shapes = float_layer_shapes(sd)
    vec = check_params(vec, count_params(shapes), what="vec")
    if vec.shape[0] != 1:
        raise ValueError(f"vector_to_state_dict takes one vector [P], got {vec.shape[0]} vectors")
    tensors = vector_to_tensors(vec, shapes)
    return {name: (tensors[name][0].to(t.dtype).clone() if name in tensors else t.clone())
            for name, t in sd.items()}
