"""ParameterTokenizer: parameter vectors <-> token sequences, with per-layer normalization.

A parameter vector ``[P]`` holds every floating state_dict entry of a network, flattened in state_dict
order (see ``checkpoints_dataset.params``). The tokenizer cuts it into ``T`` tokens of width ``C``;
every parameter entry lives in exactly one token slot, unused slots are zero padding (``mask`` marks the
real ones). Both directions are one precomputed gather, so there are no Python loops per batch.

Layouts
-------
``chunk`` (G.pt's): each layer is flattened and cut into tokens of ``C = min(chunk_size, largest layer)``
values; the remainder of a layer is its own, shorter token, zero-padded at its end. Every token gets its
own layer id (so every position can have its own embedding/projection, as in G.pt).

``neuron``: one token per hidden unit (channel). A hidden unit's token holds, in state_dict order of the
entries: its incoming weight row and bias, its normalization parameters/statistics (BatchNorm, LayerNorm)
and, for the *last* hidden layer only, its outgoing column in the output layer. Canonical copies: every
entry belongs to exactly one unit. An entry that several permutation groups touch (a weight between two
hidden layers is the outgoing column of one unit and the incoming row of another) is stored with the
group that permutes its lowest axis, i.e. as the *incoming row of the unit it feeds*; its outgoing
copy is not stored, so detokenize stays exact and needs no reconciliation. With one hidden layer a
permutation of hidden units therefore permutes whole tokens; with deeper networks it permutes the tokens
of that layer and the entries inside the next layer's rows. A unit row longer than ``chunk_size`` is cut
into consecutive tokens (pieces) of the same unit. Tokens of one (group, piece) share a layer id.
Entries that belong to no hidden unit (output bias, layers the structure cannot place, e.g. ``log_std``
or layers after the last hidden group) go to ``chunk`` tokens of width ``C`` at the *end* of the
sequence, one layer id per token.

The structure comes from ``spec`` (a ``PermutationSpec`` or its JSON dict: groups of ``(name, size,
axes)`` with axes ``(param, axis[, block])``) or, without one, is inferred from names and shapes of MLPs
and plain CNNs (consecutive ``X.weight [out, in, ...]`` layers whose ``out`` matches the next layer's
``in``, or divides it for a conv followed by a flattening Linear). Anything it cannot place falls back to
chunk tokens; it never raises for an unusual architecture.

Normalization: with ``stats = {name: (mean, std)}`` every entry of a layer is mapped to
``(x - mean) / std`` on the way in and back on the way out (a layer with std 0 is only centred).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from checkpoints_dataset.params import check_params, count_params, float_layer_shapes, state_dict_to_vector

Layout = Literal["neuron", "chunk"]


# ----------------------------------------------------------------------------------------------- helpers

def _spec_to_json(spec: Any) -> dict | None:
    """A PermutationSpec (object with ``to_json``/``groups``) or its JSON dict -> a JSON-able dict."""
    if spec is None or isinstance(spec, Mapping):
        return None if spec is None else dict(spec)
    if hasattr(spec, "to_json"):
        return spec.to_json()
    if hasattr(spec, "groups"):
        return {"groups": [{"name": g.name, "size": g.size, "axes": [list(a) for a in g.axes]} for g in spec.groups]}
    raise TypeError(f"spec must be a PermutationSpec or its JSON dict, got {type(spec).__name__}")


def _parse_axis(axis: Any) -> tuple[str, int, int]:
    """``(param, axis)``, ``(param, axis, block)`` or a dict with those keys -> ``(param, axis, block)``."""
    if isinstance(axis, Mapping):
        name = axis.get("param", axis.get("name"))
        return str(name), int(axis["axis"]), int(axis.get("block", 1))
    axis = list(axis)
    return str(axis[0]), int(axis[1]), int(axis[2]) if len(axis) > 2 else 1


def _groups_from_spec(spec_json: dict, layer_shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, int, list]]:
    """Parse and check the groups of a spec: ``[(group name, size, [(param, axis, block), ...])]``."""
    groups = []
    for g in spec_json.get("groups", []):
        name, size = str(g["name"]), int(g["size"])
        axes = [_parse_axis(a) for a in g["axes"]]
        for param, axis, block in axes:
            if param not in layer_shapes:
                raise ValueError(f"permutation spec group {name!r} names {param!r}, which is not a layer of "
                                 f"this tokenizer ({list(layer_shapes)}); pass the spec of the same network")
            shape = layer_shapes[param]
            if axis >= len(shape) or shape[axis] != size * block:
                raise ValueError(f"permutation spec group {name!r}: {param!r} has shape {list(shape)}, axis "
                                 f"{axis} should have {size}x{block} entries; pass the spec of the same network")
        groups.append((name, size, axes))
    return groups


def _infer_groups(layer_shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, int, list]]:
    """Hidden-unit groups of an MLP / plain CNN inferred from names and shapes (best effort).

    Modules are name prefixes (``"0"`` of ``"0.weight"``). A weight module has a ``weight`` of rank >= 2
    (Linear, Conv); a norm module has only rank-1 entries. Consecutive weight modules whose output size
    matches the next one's input (or divides it: flattened conv channels) form a chain; every module of
    the chain but the last defines a group over its output units, with the norm modules between.
    """
    modules: dict[str, list[str]] = {}
    for name in layer_shapes:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    groups: list[tuple[str, int, list]] = []
    prev: tuple[str, list, int] | None = None  # (module, axes so far, out units)
    for mod, names in modules.items():
        shapes = [layer_shapes[n] for n in names]
        weight = f"{mod}.weight" if mod else "weight"
        if weight in layer_shapes and len(layer_shapes[weight]) >= 2:
            out, inp = layer_shapes[weight][0], layer_shapes[weight][1]
            if prev is not None and inp % prev[2] == 0:
                block = inp // prev[2]
                groups.append((prev[0], prev[2], prev[1] + [(weight, 1, block)]))
            prev = (mod, [(n, 0, 1) for n in names if layer_shapes[n] and layer_shapes[n][0] == out], out)
        elif prev is not None and all(len(s) == 1 and s[0] == prev[2] for s in shapes):
            prev[1].extend((n, 0, 1) for n in names)  # norm between two weight layers
        else:
            prev = None  # something unknown breaks the chain
    return groups


# -------------------------------------------------------------------------------------------- tokenizer

class ParameterTokenizer:
    """Cuts parameter vectors ``[N, P]`` into tokens ``[N, T, C]`` and back (see the module docstring).

    Args:
        layer_shapes: ordered ``name -> shape`` of the floating state_dict entries (a store's
            ``layer_shapes``, or ``float_layer_shapes(model)``).
        layout: ``"neuron"`` (one token per hidden unit) or ``"chunk"`` (G.pt's layer chunks).
        chunk_size: the most values per token; longer rows / layers are cut.
        stats: ``{name: (mean, std)}`` for every layer, or None (no normalization).
        spec: permutation spec (``PermutationSpec`` or its JSON dict) giving the hidden units for
            ``neuron``; None infers it from names and shapes.

    Attributes: ``num_tokens`` T, ``token_dim`` C, ``num_params`` P, ``token_layer_ids`` [T] long,
    ``num_layer_ids``, ``mask`` [T, C] bool (real entries), ``index`` [T, C] long (position in the
    parameter vector; P for padding), ``token_kinds`` (description of each layer id).
    """

    def __init__(self, layer_shapes: Mapping[str, Sequence[int]], layout: Layout = "neuron",
                 chunk_size: int = 1024, stats: Mapping[str, Sequence[float]] | None = None,
                 spec: Any = None):
        if layout not in ("neuron", "chunk"):
            raise ValueError(f"layout must be 'neuron' or 'chunk', got {layout!r}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.layer_shapes = {str(k): tuple(int(d) for d in v) for k, v in layer_shapes.items()}
        if not self.layer_shapes:
            raise ValueError("layer_shapes is empty: pass the floating state_dict entries of a network")
        self.layout, self.chunk_size = layout, int(chunk_size)
        self.num_params = count_params(self.layer_shapes)
        self.spec = _spec_to_json(spec)
        offsets, off = {}, 0
        for name, shape in self.layer_shapes.items():
            offsets[name] = off
            off += math.prod(shape)

        # rows: list of (kind, LongTensor [units, L]) of parameter positions; each row becomes >= 1 token
        rows: list[tuple[str, Tensor]] = []
        placed: set[str] = set()
        if layout == "neuron":
            groups = (_groups_from_spec(self.spec, self.layer_shapes) if self.spec is not None
                      else _infer_groups(self.layer_shapes))
            owner: dict[str, tuple[int, int, int]] = {}  # param -> (group idx, axis, block), lowest axis wins
            for gi, (_, _, axes) in enumerate(groups):
                for param, axis, block in axes:
                    if param not in owner or axis < owner[param][1]:
                        owner[param] = (gi, axis, block)
            for gi, (gname, size, _) in enumerate(groups):
                parts = []
                for name, shape in self.layer_shapes.items():  # state_dict order inside a token
                    if name in owner and owner[name][0] == gi:
                        _, axis, _ = owner[name]
                        pos = torch.arange(math.prod(shape)).reshape(shape) + offsets[name]
                        parts.append(pos.movedim(axis, 0).reshape(size, -1))  # [size, n / size]
                        placed.add(name)
                if parts:
                    rows.append((f"unit:{gname}", torch.cat(parts, dim=1)))  # [size, L]
        leftovers = [(f"chunk:{n}", torch.arange(math.prod(s)) + offsets[n])
                     for n, s in self.layer_shapes.items() if n not in placed]

        longest = max([r.shape[1] for _, r in rows] + [p.numel() for _, p in leftovers])
        C = min(self.chunk_size, longest)
        pad = self.num_params  # index of the zero appended to every vector
        index, ids, kinds = [], [], []
        for kind, r in rows:  # unit rows: [size, L] -> [size * pieces, C], unit-major
            pieces = -(-r.shape[1] // C)
            r = torch.nn.functional.pad(r, (0, pieces * C - r.shape[1]), value=pad)  # [size, pieces*C]
            index.append(r.reshape(-1, C))  # [size * pieces, C]
            piece_ids = torch.arange(pieces) + len(kinds)
            ids.append(piece_ids.repeat(r.shape[0]))  # [size * pieces]
            kinds += [f"{kind}/piece{k}" for k in range(pieces)]
        for kind, p in leftovers:  # chunk tokens, one layer id each
            pieces = -(-p.numel() // C)
            index.append(torch.nn.functional.pad(p, (0, pieces * C - p.numel()), value=pad).reshape(-1, C))
            ids.append(torch.arange(pieces) + len(kinds))
            kinds += [f"{kind}/{k}" for k in range(pieces)]
        self.index = torch.cat(index)  # [T, C]
        self.token_layer_ids = torch.cat(ids)  # [T]
        self.token_kinds = kinds
        self.num_tokens, self.token_dim = self.index.shape
        self.num_layer_ids = len(kinds)
        self.mask = self.index < pad  # [T, C]
        self.inverse = torch.nonzero(self.mask.flatten())[:, 0][torch.argsort(self.index[self.mask])]  # [P]
        assert torch.equal(self.index.flatten()[self.inverse], torch.arange(pad)), "every entry exactly once"

        # per-entry normalization constants
        self.stats = None
        mean, std = torch.zeros(pad + 1), torch.ones(pad + 1)  # [P + 1] (last: padding)
        if stats is not None:
            unknown = sorted(set(stats) - set(self.layer_shapes))
            missing = [n for n in self.layer_shapes if n not in stats]
            if unknown or missing:
                raise ValueError(f"stats must have (mean, std) for exactly the layers; missing {missing}, "
                                 f"unknown {unknown}")
            self.stats = {n: (float(stats[n][0]), float(stats[n][1])) for n in self.layer_shapes}
            for n, (m, s) in self.stats.items():
                if not (math.isfinite(m) and math.isfinite(s) and s >= 0):
                    raise ValueError(f"stats of layer {n!r} must be finite with std >= 0, got ({m}, {s})")
                if s == 0:  # a constant layer (e.g. frozen): only centred
                    self.stats[n] = (m, 1.0)
                    s = 1.0
                k = math.prod(self.layer_shapes[n])
                mean[offsets[n]:offsets[n] + k], std[offsets[n]:offsets[n] + k] = m, s
        self._mean_tc, self._std_tc = mean[self.index], std[self.index]  # [T, C]
        self._mean_p, self._std_p = mean[:pad], std[:pad]  # [P]
        self._cache: dict[torch.device, tuple[Tensor, ...]] = {}

    # ------------------------------------------------------------------------------------------ helpers
    def _on(self, device: torch.device) -> tuple[Tensor, ...]:
        """Index and normalization tensors on ``device`` (cached)."""
        if device not in self._cache:
            self._cache[device] = tuple(t.to(device) for t in (
                self.index, self.inverse, self._mean_tc, self._std_tc, self._mean_p, self._std_p))
        return self._cache[device]

    def __repr__(self) -> str:
        return (f"ParameterTokenizer(layout={self.layout!r}, P={self.num_params}, T={self.num_tokens}, "
                f"C={self.token_dim}, layer_ids={self.num_layer_ids}, normalized={self.stats is not None})")

    # -------------------------------------------------------------------------------------- conversions
    def tokenize(self, params: Tensor) -> Tensor:
        """``params [N, P]`` (or ``[P]``) -> ``tokens [N, T, C]`` (normalized if stats; padding zero)."""
        params = check_params(params, self.num_params)  # [N, P]
        index, _, mean_tc, std_tc, _, _ = self._on(params.device)
        padded = torch.cat([params, params.new_zeros(params.shape[0], 1)], dim=1)  # [N, P + 1]
        tokens = padded[:, index]  # [N, T, C]
        if self.stats is not None:
            tokens = (tokens - mean_tc.to(tokens.dtype)) / std_tc.to(tokens.dtype)  # [N, T, C]
        return tokens

    def detokenize(self, tokens: Tensor) -> Tensor:
        """``tokens [N, T, C]`` (or ``[T, C]``) -> ``params [N, P]``; padding values are ignored."""
        if not isinstance(tokens, Tensor) or not torch.is_floating_point(tokens):
            raise ValueError(f"tokens must be a floating-point tensor [N, {self.num_tokens}, {self.token_dim}], "
                             f"got {getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() == 2:
            tokens = tokens[None]  # [1, T, C]
        if tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"tokens must have shape [N, {self.num_tokens}, {self.token_dim}], got "
                             f"{list(tokens.shape)}: were they made by this tokenizer?")
        _, inverse, _, _, mean_p, std_p = self._on(tokens.device)
        params = tokens.reshape(tokens.shape[0], -1)[:, inverse]  # [N, P]
        if self.stats is not None:
            params = torch.addcmul(mean_p.to(params.dtype), params, std_p.to(params.dtype))  # [N, P]
        return params

    def to_state_dicts(self, params: Tensor) -> list[dict[str, Tensor]]:
        """``params [N, P]`` -> N dicts ``name -> tensor`` (independent copies, safetensors-ready)."""
        params = check_params(params, self.num_params)  # [N, P]
        out = []
        for row in params:
            sd, off = {}, 0
            for name, shape in self.layer_shapes.items():
                k = math.prod(shape)
                sd[name] = row[off:off + k].reshape(shape).clone()
                off += k
            out.append(sd)
        return out

    def from_state_dicts(self, state_dicts: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor]) -> Tensor:
        """N state_dicts (floating entries must match ``layer_shapes``; integer buffers ignored) -> ``[N, P]``."""
        if isinstance(state_dicts, Mapping):
            state_dicts = [state_dicts]
        vecs = []
        for i, sd in enumerate(state_dicts):
            got = float_layer_shapes(sd)
            missing = [n for n in self.layer_shapes if n not in got]
            extra = [n for n in got if n not in self.layer_shapes]
            if missing or extra:
                raise KeyError(f"state_dict {i} does not match the tokenizer: missing {missing}, unexpected "
                               f"{extra}; it must hold the floating entries {list(self.layer_shapes)}")
            wrong = {n: list(got[n]) for n in self.layer_shapes if got[n] != self.layer_shapes[n]}
            if wrong:
                raise ValueError(f"state_dict {i} has wrong shapes {wrong}; expected "
                                 f"{ {n: list(self.layer_shapes[n]) for n in wrong} }")
            vecs.append(state_dict_to_vector({n: sd[n] for n in self.layer_shapes}, self.layer_shapes))
        if not vecs:
            raise ValueError("from_state_dicts needs at least one state_dict")
        return torch.stack(vecs)  # [N, P]

    # ------------------------------------------------------------------------------------------- config
    def config(self) -> dict:
        """JSON-able constructor arguments (stats and spec included): ``from_config(config())`` rebuilds."""
        return {"layer_shapes": {n: list(s) for n, s in self.layer_shapes.items()}, "layout": self.layout,
                "chunk_size": self.chunk_size,
                "stats": None if self.stats is None else {n: list(v) for n, v in self.stats.items()},
                "spec": self.spec}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ParameterTokenizer":
        return cls(**config)
