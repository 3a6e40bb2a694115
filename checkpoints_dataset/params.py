"""Parameter vectors: a network as one flat float vector.

A *parameter vector* is every floating-point entry of a module's ``state_dict()`` (weights, biases and
BatchNorm running statistics), flattened and concatenated in ``state_dict()`` order. Integer buffers such
as ``num_batches_tracked`` are left out; turning a vector back into a state_dict fills them from the
model, so ``model.load_state_dict(vector_to_state_dict(vec, model), strict=True)`` works.

``LayerShapes`` lists, in order, the name and shape of each entry of the vector, and is the one place that
knows where each entry lies in it (``offsets``, ``split``, ``join``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LayerShapes", "check_params", "count_params", "float_layer_shapes", "state_dict_to_vector",
           "tensors_to_vector", "vector_to_state_dict", "vector_to_tensors"]


class LayerShapes(dict):
    """The layout of a parameter vector: an ordered, read-only mapping ``name -> shape`` (tuples of ints).

    Built from a mapping or from ``[name, dims]`` pairs (the manifest's JSON form); lists become tuples, so
    it equals a plain ``dict`` of tuples with the same items in any order (dict equality). Entry ``name``
    occupies ``vec[..., offsets[name]:offsets[name] + sizes[name]]`` of a vector of ``num_params`` entries.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]] | Iterable[Sequence] = ()):
        items = shapes.items() if isinstance(shapes, Mapping) else shapes
        normalized = {}
        for item in items:
            name, shape = item
            if isinstance(shape, int):
                raise TypeError(f"the shape of {name!r} must be a sequence of ints, got {shape!r}")
            normalized[str(name)] = tuple(int(d) for d in shape)
        super().__init__(normalized)

    # read-only: offsets are computed once, and a layout shared by a task and its store must not drift
    def _read_only(self, *args, **kwargs):
        raise TypeError("LayerShapes is read-only; build a new one (LayerShapes({**shapes, name: shape}))")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _read_only

    def __reduce__(self):  # pickle/copy through the constructor (dict's default would call __setitem__)
        return type(self), (list(self.items()),)

    def __repr__(self) -> str:
        return f"LayerShapes({dict.__repr__(self)})"

    @functools.cached_property
    def sizes(self) -> dict[str, int]:
        """``name -> number of entries``."""
        return {name: math.prod(shape) for name, shape in self.items()}

    @functools.cached_property
    def offsets(self) -> dict[str, int]:
        """``name -> index of its first entry`` in the vector."""
        out, offset = {}, 0
        for name, n in self.sizes.items():
            out[name] = offset
            offset += n
        return out

    @functools.cached_property
    def num_params(self) -> int:
        """Length P of the vector."""
        return sum(self.sizes.values())

    @property
    def slices(self) -> dict[str, slice]:
        """``name -> slice`` of its entries in the vector."""
        return {name: slice(self.offsets[name], self.offsets[name] + n) for name, n in self.sizes.items()}

    def split(self, params: Tensor) -> dict[str, Tensor]:
        """``params [K, P]`` (or ``[P]``, taken as K = 1) -> ``name -> [K, *shape]`` views, in layer order."""
        params = check_params(params, self.num_params)  # [K, P]
        K = params.shape[0]
        return {name: params[:, self.offsets[name]:self.offsets[name] + self.sizes[name]].reshape(K, *shape)
                for name, shape in self.items()}  # name -> [K, *shape]

    def join(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``name -> [K, *shape]`` tensors (every layer; extra keys ignored) -> ``[K, P]`` in layer order."""
        missing = [name for name in self if name not in tensors]
        if missing:
            raise KeyError(f"tensors lack the layers {missing}; expected exactly {list(self)}")
        flat = []
        for name, shape in self.items():
            t = tensors[name]
            if tuple(t.shape[1:]) != shape:
                raise ValueError(f"layer {name!r} has shape {list(t.shape[1:])} per network, expected {list(shape)}")
            flat.append(t.reshape(t.shape[0], -1))  # [K, n]
        return torch.cat(flat, dim=1)  # [K, P]

    def same_layout(self, other: Mapping[str, Sequence[int]]) -> bool:
        """The same entries with the same shapes in the same order: vectors of one split into the other's
        layers at the right offsets (``==`` ignores the order, as a dict's does)."""
        return list(self.items()) == list(LayerShapes(other).items())

    def to_json(self) -> list[list]:
        """``[[name, [dims...]], ...]`` in order (the store manifest's form)."""
        return [[name, list(shape)] for name, shape in self.items()]

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[int]] | Iterable[Sequence]) -> "LayerShapes":
        """From ``to_json()``'s pair list or from a ``name -> dims`` mapping."""
        return cls(data)

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]] | Iterable[Sequence]) -> "LayerShapes":
        """``shapes`` itself when it is a LayerShapes already, else ``LayerShapes(shapes)``."""
        return shapes if isinstance(shapes, cls) else cls(shapes)


def float_layer_shapes(obj: nn.Module | Mapping[str, Tensor]) -> LayerShapes:
    """The ordered ``name -> shape`` of every floating-point entry of a module's state_dict (or of a
    state_dict itself)."""
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    return LayerShapes({name: t.shape for name, t in sd.items() if torch.is_floating_point(t)})


def count_params(layer_shapes: Mapping[str, Sequence[int]]) -> int:
    """Length of the parameter vector described by ``layer_shapes``."""
    return LayerShapes.of(layer_shapes).num_params


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


def vector_to_tensors(params: Tensor, layer_shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Split ``params [K, P]`` into ``name -> [K, *shape]`` views, in layer order (``LayerShapes.split``)."""
    return LayerShapes.of(layer_shapes).split(params)


def tensors_to_vector(tensors: Mapping[str, Tensor], layer_shapes: Mapping[str, Sequence[int]]) -> Tensor:
    """Concatenate ``name -> [K, *shape]`` tensors into ``[K, P]`` in the order of ``layer_shapes``
    (``LayerShapes.join``)."""
    return LayerShapes.of(layer_shapes).join(tensors)


def state_dict_to_vector(sd: Mapping[str, Tensor], layer_shapes: Mapping[str, Sequence[int]] | None = None) -> Tensor:
    """One network's state_dict -> its parameter vector ``[P]`` (float32).

    With ``layer_shapes`` the state_dict must hold exactly those float entries with those shapes, in
    any order (files such as safetensors sort their keys; KeyError / ValueError otherwise); without,
    the float entries of ``sd`` are taken in order.
    """
    got = float_layer_shapes(sd)
    shapes = got if layer_shapes is None else LayerShapes.of(layer_shapes)
    if set(got) != set(shapes):
        extra, missing = sorted(set(got) - set(shapes)), sorted(set(shapes) - set(got))
        raise KeyError(f"state_dict does not match the layer shapes: missing {missing}, unexpected {extra}")
    tensors = {name: sd[name].detach().float()[None] for name in shapes}  # name -> [1, *shape]
    return shapes.join(tensors)[0]  # [P]


def vector_to_state_dict(vec: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """A parameter vector ``[P]`` -> a full state_dict that loads with ``strict=True`` into ``model``.

    Float entries come from ``vec`` (cast to each entry's dtype); integer buffers are the model's own.
    """
    sd = model.state_dict()
    shapes = float_layer_shapes(sd)
    vec = check_params(vec, shapes.num_params, what="vec")
    if vec.shape[0] != 1:
        raise ValueError(f"vector_to_state_dict takes one vector [P], got {vec.shape[0]} vectors")
    tensors = shapes.split(vec)
    return {name: (tensors[name][0].to(t.dtype).clone() if name in tensors else t.clone())
            for name, t in sd.items()}
