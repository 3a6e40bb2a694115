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

The structure comes from ``spec``, a ``checkpoints_dataset.permute.PermutationSpec`` (or its JSON dict):
its groups of ``(name, size, axes)`` with axes ``(param, axis, block)`` are the hidden units. Without one,
``spec_from_layer_shapes`` infers it from names and shapes of MLPs and plain CNNs (consecutive
``X.weight [out, in, ...]`` layers whose ``out`` matches the next layer's ``in``, or divides it for a conv
followed by a flattening Linear). Anything it cannot place falls back to chunk tokens; it never raises for
an unusual architecture.

Normalization: with ``stats = {name: (mean, std)}`` every entry of a layer is mapped to
``(x - mean) / std`` on the way in and back on the way out (a layer with std 0 is only centred).

Mask channel (``mask_channel="nonzero"``, for sparse networks, in the spirit of Analog Bits): tokens are
``[T, 2C]``, the normalized values in ``[:, :C]`` and beside them, slot for slot, ``+1`` where the entry is
nonzero and ``-1`` where it is exactly zero (0 at padding). ``detokenize`` keeps an entry where its mask
channel is positive and sets it to zero elsewhere; ``mask_scores`` gives the channel itself (what an exact
projection ranks entries by), and ``loss_weights`` weighs a value only where the target's entry is nonzero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from einops import rearrange, repeat
from torch import Tensor

from checkpoints_dataset.params import LayerShapes, check_params, float_layer_shapes, state_dict_to_vector
from checkpoints_dataset.permute import PermutationSpec, as_spec, spec_from_layer_shapes

Layout = Literal["neuron", "chunk"]
MaskChannel = Literal["none", "nonzero"]


def _spec_for(spec: PermutationSpec | Mapping | None, layer_shapes: LayerShapes) -> PermutationSpec | None:
    """``spec`` (a PermutationSpec, its JSON dict or None) as a PermutationSpec over ``layer_shapes``: its
    groups must fit these layers (ValueError naming the layer otherwise). A JSON dict without
    ``layer_shapes`` (configs of older versions could hold just the groups) gets the tokenizer's."""
    if spec is None:
        return None
    if not isinstance(spec, (PermutationSpec, Mapping)):
        raise TypeError(f"spec must be a PermutationSpec or its JSON dict, got {type(spec).__name__}")
    if isinstance(spec, Mapping) and "layer_shapes" not in spec:
        spec = {"groups": [], **spec, "layer_shapes": layer_shapes.to_json()}
    spec = as_spec(spec)
    return spec if spec.layer_shapes == layer_shapes else PermutationSpec(layer_shapes, spec.groups)


# -------------------------------------------------------------------------------------------- tokenizer

def _unit_rows(spec: PermutationSpec | None, layer_shapes: LayerShapes,
               positions: dict[str, Tensor]) -> list[tuple[str, Tensor, list[str]]]:
    """One row per hidden unit of each permutation group: (kind, positions [size, L], the layers placed).
    A layer belongs to the group of its lowest permuted axis; a unit's row holds its entries of every such
    layer, in state_dict order."""
    structure = spec if spec is not None else spec_from_layer_shapes(layer_shapes)
    owner: dict[str, tuple[int, int]] = {}  # param -> (group idx, axis), lowest axis wins
    for gi, group in enumerate(structure.groups):
        for param, axis, _ in group.axes:
            if param not in owner or axis < owner[param][1]:
                owner[param] = (gi, axis)
    rows = []
    for gi, group in enumerate(structure.groups):
        parts, names = [], []
        for name, shape in layer_shapes.items():  # state_dict order inside a token
            if name in owner and owner[name][0] == gi:
                pos = positions[name].reshape(shape).movedim(owner[name][1], 0)  # [size * block, ...]
                parts.append(rearrange(pos, "(u b) ... -> u (b ...)", u=group.size))  # [size, n / size]
                names.append(name)
        if parts:
            rows.append((f"unit:{group.name}", torch.cat(parts, dim=1), names))  # [size, L]
    return rows


def _pack(rows: list[tuple[str, Tensor]], leftovers: list[tuple[str, Tensor]], chunk_size: int,
          pad: int) -> tuple[Tensor, Tensor, list[str]]:
    """Cut unit rows and leftover layers into tokens of width C = min(chunk_size, longest row), padded with
    ``pad``: (index [T, C], layer ids [T], one kind per layer id). Unit tokens come unit-major, a unit's
    pieces adjacent; each leftover layer's chunks get a layer id each."""
    C = min(chunk_size, max([r.shape[1] for _, r in rows] + [p.numel() for _, p in leftovers]))
    index, ids, kinds = [], [], []
    for kind, r in rows:  # unit rows: [size, L] -> [size * pieces, C], unit-major
        pieces = -(-r.shape[1] // C)
        r = torch.nn.functional.pad(r, (0, pieces * C - r.shape[1]), value=pad)  # [size, pieces*C]
        index.append(rearrange(r, "u (p c) -> (u p) c", c=C))  # [size * pieces, C]
        ids.append(repeat(torch.arange(pieces) + len(kinds), "p -> (u p)", u=r.shape[0]))  # [size * pieces]
        kinds += [f"{kind}/piece{k}" for k in range(pieces)]
    for kind, pos in leftovers:  # chunk tokens, one layer id each
        pieces = -(-pos.numel() // C)
        pos = torch.nn.functional.pad(pos, (0, pieces * C - pos.numel()), value=pad)  # [pieces * C]
        index.append(rearrange(pos, "(p c) -> p c", c=C))  # [pieces, C]
        ids.append(torch.arange(pieces) + len(kinds))
        kinds += [f"{kind}/{k}" for k in range(pieces)]
    return torch.cat(index), torch.cat(ids), kinds


def _checked_stats(stats: Mapping[str, Sequence[float]], layer_shapes: LayerShapes) -> dict[str, tuple[float, float]]:
    """(mean, std) for exactly the layers, finite, std >= 0; a constant layer (std 0, e.g. frozen) is only centred."""
    unknown = sorted(set(stats) - set(layer_shapes))
    missing = [n for n in layer_shapes if n not in stats]
    if unknown or missing:
        raise ValueError(f"stats must have (mean, std) for exactly the layers; missing {missing}, unknown {unknown}")
    checked = {}
    for n in layer_shapes:
        m, s = float(stats[n][0]), float(stats[n][1])
        if not (math.isfinite(m) and math.isfinite(s) and s >= 0):
            raise ValueError(f"stats of layer {n!r} must be finite with std >= 0, got ({m}, {s})")
        checked[n] = (m, s if s > 0 else 1.0)
    return checked


class ParameterTokenizer:
    """Cuts parameter vectors ``[N, P]`` into tokens ``[N, T, C]`` and back (see the module docstring).

    Args:
        layer_shapes: ordered ``name -> shape`` of the floating state_dict entries (a store's
            ``layer_shapes``, or ``float_layer_shapes(model)``).
        layout: ``"neuron"`` (one token per hidden unit) or ``"chunk"`` (G.pt's layer chunks).
        chunk_size: the most values per token; longer rows / layers are cut.
        stats: ``{name: (mean, std)}`` for every layer, or None (no normalization).
        spec: ``PermutationSpec`` (or its JSON dict) giving the hidden units for ``neuron``; None infers
            them from names and shapes (``spec_from_layer_shapes``). Kept as ``self.spec`` (None if not
            given) and saved by ``config()``.
        mask_channel: "nonzero" adds the mask channel (see the module docstring); "none" (the default) not.

    Attributes: ``num_tokens`` T, ``token_dim`` C (2C with the mask channel), ``value_dim`` the values per
    token, ``num_params`` P, ``token_layer_ids`` [T] long, ``num_layer_ids``, ``mask`` [T, C] bool (real slots),
    ``index`` [T, C] long (position in the parameter vector; P for padding), ``token_kinds`` (description of
    each layer id).
    """

    def __init__(self, layer_shapes: Mapping[str, Sequence[int]], layout: Layout = "neuron",
                 chunk_size: int = 1024, stats: Mapping[str, Sequence[float]] | None = None,
                 spec: PermutationSpec | Mapping | None = None, mask_channel: MaskChannel = "none"):
        if layout not in ("neuron", "chunk"):
            raise ValueError(f"layout must be 'neuron' or 'chunk', got {layout!r}")
        if mask_channel not in ("none", "nonzero"):
            raise ValueError(f"mask_channel must be 'none' or 'nonzero', got {mask_channel!r}")
        self.mask_channel = mask_channel
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.layer_shapes = LayerShapes(layer_shapes)
        if not self.layer_shapes:
            raise ValueError("layer_shapes is empty: pass the floating state_dict entries of a network")
        self.layout, self.chunk_size = layout, int(chunk_size)
        self.num_params = self.layer_shapes.num_params
        self.spec = _spec_for(spec, self.layer_shapes)
        vector = torch.arange(self.num_params)  # [P] positions in the parameter vector
        positions = {name: vector[sl] for name, sl in self.layer_shapes.slices.items()}  # name -> [n]
        rows = _unit_rows(self.spec, self.layer_shapes, positions) if layout == "neuron" else []
        placed = {name for _, _, names in rows for name in names}
        leftovers = [(f"chunk:{n}", positions[n]) for n in self.layer_shapes if n not in placed]
        pad = self.num_params  # index of the zero appended to every vector
        self.index, self.token_layer_ids, self.token_kinds = _pack(
            [(kind, r) for kind, r, _ in rows], leftovers, self.chunk_size, pad)  # [T, C], [T], list
        self.num_tokens, self.value_dim = self.index.shape
        self.num_layer_ids = len(self.token_kinds)
        real = self.index < pad  # [T, C] value slots
        inverse = torch.nonzero(real.flatten())[:, 0][torch.argsort(self.index[real])]  # [P] in [T * C]
        assert torch.equal(self.index.flatten()[inverse], torch.arange(pad)), "every entry exactly once"
        width = 2 if mask_channel == "nonzero" else 1
        self.token_dim = width * self.value_dim
        # positions in the flattened [T, token_dim] tokens: values first in each token, the mask channel after
        self.inverse = inverse // self.value_dim * self.token_dim + inverse % self.value_dim  # [P]
        self.mask_inverse = self.inverse + self.value_dim if width == 2 else None           # [P]
        self.index = self.index.repeat(1, width)  # [T, token_dim] both halves read the same entry
        self.mask = self.index < pad  # [T, token_dim]

        # per-entry normalization constants
        self.stats = None if stats is None else _checked_stats(stats, self.layer_shapes)
        mean, std = torch.zeros(pad + 1), torch.ones(pad + 1)  # [P + 1] (last: padding)
        for n, (m, s) in (self.stats or {}).items():
            sl = self.layer_shapes.slices[n]
            mean[sl], std[sl] = m, s
        self._mean_tc, self._std_tc = mean[self.index], std[self.index]  # [T, C]
        if self.mask_channel == "nonzero":   # the mask channel is not normalized
            self._mean_tc[:, self.value_dim:], self._std_tc[:, self.value_dim:] = 0.0, 1.0
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
                f"C={self.token_dim}, layer_ids={self.num_layer_ids}, normalized={self.stats is not None}, "
                f"mask_channel={self.mask_channel!r})")

    # -------------------------------------------------------------------------------------- conversions
    def tokenize(self, params: Tensor) -> Tensor:
        """``params [N, P]`` (or ``[P]``) -> ``tokens [N, T, C]`` (normalized if stats; padding zero)."""
        params = check_params(params, self.num_params)  # [N, P]
        index, _, mean_tc, std_tc, _, _ = self._on(params.device)
        padded = torch.cat([params, params.new_zeros(params.shape[0], 1)], dim=1)  # [N, P + 1]
        tokens = padded[:, index]  # [N, T, C]
        if self.stats is not None:
            tokens = (tokens - mean_tc.to(tokens.dtype)) / std_tc.to(tokens.dtype)  # [N, T, C]
        if self.mask_channel == "nonzero":
            raw = padded[:, index[:, self.value_dim:]]  # [N, T, C/2]
            real = self.mask[:, self.value_dim:].to(raw.device)
            channel = torch.where(raw != 0, 1.0, -1.0).to(tokens.dtype) * real  # [N, T, C/2] +-1, 0 at padding
            tokens = torch.cat([tokens[..., :self.value_dim], channel], dim=-1)  # [N, T, C]
        return tokens

    def detokenize(self, tokens: Tensor, apply_mask: bool = True) -> Tensor:
        """``tokens [N, T, C]`` (or ``[T, C]``) -> ``params [N, P]``; padding values are ignored. With the mask
        channel, entries it marks zero are zero unless ``apply_mask`` is False (then every value as predicted)."""
        if not isinstance(tokens, Tensor) or not torch.is_floating_point(tokens):
            raise ValueError(f"tokens must be a floating-point tensor [N, {self.num_tokens}, {self.token_dim}], "
                             f"got {getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() == 2:
            tokens = tokens[None]  # [1, T, C]
        if tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"tokens must have shape [N, {self.num_tokens}, {self.token_dim}], got "
                             f"{list(tokens.shape)}: were they made by this tokenizer?")
        _, inverse, _, _, mean_p, std_p = self._on(tokens.device)
        flat = rearrange(tokens, "n t c -> n (t c)")
        params = flat[:, inverse]  # [N, P]
        if self.stats is not None:
            params = torch.addcmul(mean_p.to(params.dtype), params, std_p.to(params.dtype))  # [N, P]
        if self.mask_channel == "nonzero" and apply_mask:
            params = params * (self.mask_scores(tokens) > 0)  # [N, P] zero where the channel says so
        return params

    def mask_scores(self, tokens: Tensor) -> Tensor | None:
        """The mask channel of ``tokens [N, T, C]`` per parameter ``[N, P]`` (positive: nonzero); None without one."""
        if self.mask_channel != "nonzero":
            return None
        if tokens.dim() == 2:
            tokens = tokens[None]  # [1, T, C]
        return rearrange(tokens, "n t c -> n (t c)")[:, self.mask_inverse.to(tokens.device)]

    def loss_weights(self, target_tokens: Tensor) -> Tensor:
        """Per-slot loss weights ``[N, T, C]`` for ``target_tokens``: real slots, except that with the mask
        channel a value counts only where the target's entry is nonzero (its channel always counts)."""
        real = self.mask.to(target_tokens.device, target_tokens.dtype)  # [T, C]
        if self.mask_channel != "nonzero":
            return real.expand_as(target_tokens)
        keep = (target_tokens[..., self.value_dim:] > 0).to(target_tokens.dtype)  # [N, T, C/2]
        return torch.cat([keep, torch.ones_like(keep)], dim=-1) * real  # [N, T, C]

    def to_state_dicts(self, params: Tensor) -> list[dict[str, Tensor]]:
        """``params [N, P]`` -> N dicts ``name -> tensor`` (independent copies, safetensors-ready)."""
        params = check_params(params, self.num_params)  # [N, P]
        tensors = self.layer_shapes.split(params)  # name -> [N, *shape] views
        return [{name: t[i].clone() for name, t in tensors.items()} for i in range(params.shape[0])]

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
                "spec": None if self.spec is None else self.spec.to_json(),
                **({"mask_channel": self.mask_channel} if self.mask_channel != "none" else {})}

    @classmethod
    def from_config(cls, config: Mapping) -> "ParameterTokenizer":
        """Rebuild from ``config()`` (also those older versions saved: their spec is the same JSON dict)."""
        return cls(**config)
