"""Relations: the weights *between* two hidden layers, read and written as edges between unit tokens.

In the ``neuron`` layout a unit's token holds its incoming row. With one hidden layer that row is indexed
by input features, which mean the same in every network. With two or more hidden layers the row of a unit
of layer 2 is indexed by the units of layer 1, whose order is arbitrary: entry ``j`` of the row belongs to
unit ``j`` of layer 1, a token the per-token projection cannot tell from its neighbours. A linear map over
the row then learns one fixed meaning per column, which no column has across networks, and generated
networks fall to chance (bench/NOTES.md, issue 16).

A ``Relation`` names those entries: a parameter whose axes are permuted by two groups (``W [A, B, ...]``
between the ``A`` units that own it and the ``B`` units it reads from), and where its ``[A, B, F]`` values
sit in the token tensor. The DiT then

- hides them from the per-token projections (which stay equivariant to both groups' permutations),
- encodes them with ``EdgeEncoder``: the relation's matrix times the other side's unit embeddings gives
  each unit a message (a weight-space layer in the spirit of NFN and DWSNet: Zhou et al. 2023, Navon et
  al. 2023),
- biases attention between connected units by the edge's values (``attention_bias``: per block and head
  a linear map of the values, both directions), so every block can route along the weights,
- and predicts them with ``EdgeDecoder``: a bilinear form of both units' final embeddings plus a linear
  map of the edge's inputs (gradient updates of a weight matrix are sums of outer products).

Cost: batched matrix products of ``N * A * B * F * E`` multiply-adds per relation; only the attention bias
holds a tensor per edge (``[N, A, B, 2 * depth * heads]``). Bench/NOTES.md (issue 16) records an MLP per
edge instead (as good, 30% slower per training step) and the variants without attention bias.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from checkpoints_dataset.permute import spec_from_layer_shapes


@dataclasses.dataclass(frozen=True)
class Relation:
    """The entries of one parameter between two unit groups, as positions in a token tensor ``[T, C]``.

    ``rows`` ``[A, pieces]`` and ``cols`` ``[B, pieces]`` are the token positions of the owner units (whose
    tokens hold the entries) and of the units read from; ``index`` ``[A, B, F]`` the flat positions
    ``t * C + c`` of the entries (F values per edge: 1 for a Linear, kh*kw for a conv, the block of a
    Linear after Flatten).
    """

    name: str
    rows: Tensor
    cols: Tensor
    index: Tensor

    def to_json(self) -> dict:
        return {"name": self.name, "rows": self.rows.tolist(), "cols": self.cols.tolist(), "index": self.index.tolist()}

    @classmethod
    def from_json(cls, d: Mapping) -> Relation:
        return cls(str(d["name"]), *(torch.as_tensor(d[k], dtype=torch.long) for k in ("rows", "cols", "index")))


def find_relations(tokenizer) -> list[Relation]:
    """The relations of a ``ParameterTokenizer`` in the neuron layout (none for ``chunk``, or for networks
    with one hidden layer): every parameter permuted by two groups that both have unit tokens."""
    if tokenizer.layout != "neuron":
        return []
    shapes = tokenizer.layer_shapes
    spec = tokenizer.spec if tokenizer.spec is not None else spec_from_layer_shapes(shapes)
    units: dict[str, Tensor] = {}   # group name -> [size, pieces] token positions
    for group in spec.groups:
        ids = [i for i, kind in enumerate(tokenizer.token_kinds) if kind.startswith(f"unit:{group.name}/piece")]
        if ids:
            units[group.name] = torch.stack([torch.nonzero(tokenizer.token_layer_ids == i)[:, 0] for i in ids], 1)
    axes: dict[str, list[tuple[int, int, str]]] = {}   # param -> [(axis, block, group)]
    for group in spec.groups:
        for name, axis, block in group.axes:
            axes.setdefault(name, []).append((axis, block, group.name))
    relations = []
    for name, shape in shapes.items():
        touching = sorted(axes.get(name, []))
        if len(touching) != 2 or any(g not in units for _, _, g in touching):
            continue
        (a, ba, ga), (b, bb, gb) = touching   # the lowest axis owns the entries (the tokenizer's rule)
        pos = torch.arange(shapes.num_params)[shapes.slices[name]].reshape(shape).movedim((a, b), (0, 1))
        pos = rearrange(pos, "(A ba) (B bb) ... -> A B (ba bb ...)", ba=ba, bb=bb)  # [A, B, F]
        relations.append(Relation(name, units[ga], units[gb], tokenizer.inverse[pos]))
    return relations


def add_to_units(h: Tensor, positions: Tensor, message: Tensor) -> Tensor:
    """``h [N, T, D]`` with ``message [N, U, D]`` added to every piece of each unit."""
    pieces = positions.shape[1]
    return h.index_add(1, positions.flatten(), repeat(message, "n u d -> n (u p) d", p=pieces))


def gather_edges(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens [N, T, C]`` -> the relation's values ``[N, A, B, F]``."""
    return tokens.flatten(1)[:, index]


class EdgeEncoder(nn.Module):
    """Edge values ``[N, A, B, F]`` and unit embeddings -> one message per unit of each side ``[N, A|B, D]``,
    as weight-space products (never an ``[N, A, B, E]`` tensor): a row unit gets the mean over b of
    ``values[a, b] . P(h_b)``, the relation's matrix times the column units' maps, as in NFN's layers; a
    column unit the mean over a of ``values[a, b] . Q(h_a)``."""

    def __init__(self, features: int, hidden_size: int, edge_size: int):
        super().__init__()
        self.features = features
        self.col = nn.Linear(hidden_size, features * edge_size, bias=False)
        self.row = nn.Linear(hidden_size, features * edge_size, bias=False)
        self.to_row = nn.Linear(edge_size, hidden_size)
        self.to_col = nn.Linear(edge_size, hidden_size)

    def forward(self, values: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        n, a, b, f = values.shape
        from_cols = rearrange(self.col(cols), "n b (f e) -> n (b f) e", f=f)  # [N, B*F, E]
        from_rows = rearrange(self.row(rows), "n a (f e) -> n (a f) e", f=f)  # [N, A*F, E]
        to_rows = torch.bmm(values.reshape(n, a, b * f), from_cols) / b  # [N, A, E]
        to_cols = torch.bmm(rearrange(values, "n a b f -> n b (a f)"), from_rows) / a  # [N, B, E]
        return self.to_row(to_rows), self.to_col(to_cols)  # [N, A, D], [N, B, D]


class EdgeDecoder(nn.Module):
    """The edge's prediction ``[N, A, B, F]``: a rank-E bilinear form of both units' final embeddings per output
    feature plus a linear map of the edge's own inputs, ``pred[a, b, f] = <R_f h_a, C_f h_b> / sqrt(E) +
    values[a, b] . V_f`` (batched products). Gradient updates of a weight matrix are sums of outer products
    of unit signals (``delta W = g a^T``), which this form writes directly."""

    def __init__(self, features_in: int, hidden_size: int, edge_size: int, features_out: int):
        super().__init__()
        self.features_out, self.edge_size = features_out, edge_size
        self.row = nn.Linear(hidden_size, features_out * edge_size)
        self.col = nn.Linear(hidden_size, features_out * edge_size)
        self.out = nn.Linear(features_in, features_out)

    def forward(self, values: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        f = self.features_out
        r = rearrange(self.row(rows), "n a (f e) -> (n f) a e", f=f)  # [N*F, A, E]
        c = rearrange(self.col(cols), "n b (f e) -> (n f) e b", f=f)  # [N*F, E, B]
        pred = rearrange(torch.bmm(r, c), "(n f) a b -> n a b f", f=f) / self.edge_size ** 0.5  # [N, A, B, F]
        return pred + self.out(values)  # [N, A, B, F]


def attention_bias(edges: Tensor, rows: Tensor, cols: Tensor, num_tokens: int) -> Tensor:
    """Per-edge scores ``[N, A, B, 2H]`` -> an additive attention bias ``[N, H, T, T]``: row units attend to
    column units with the first H scores, column units to row units with the last H; zero elsewhere."""
    n, heads = edges.shape[0], edges.shape[-1] // 2
    p, q = rows.shape[1], cols.shape[1]
    r = repeat(rows, "a p -> (a p) b q", b=cols.shape[0], q=q)  # [A*p, B, q]
    c = repeat(cols, "b q -> (a p) b q", a=rows.shape[0], p=p)
    scores = repeat(edges, "n a b h -> n h (a p) b q", p=p, q=q).flatten(2)  # [N, 2H, A*p*B*q]
    forward, backward = (r * num_tokens + c).flatten(), (c * num_tokens + r).flatten()
    bias = edges.new_zeros(n, heads, num_tokens * num_tokens)
    bias = bias.index_add(2, forward, scores[:, :heads]).index_add(2, backward, scores[:, heads:])
    return bias.view(n, heads, num_tokens, num_tokens)


def relations_from_json(relations: Sequence[Mapping] | None) -> list[Relation]:
    return [Relation.from_json(r) for r in relations or []]
