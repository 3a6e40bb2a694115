"""ParameterDiT: a diffusion transformer over parameter tokens, in the style of DiT (Peebles & Xie 2023).

Differences from an image DiT:
- Input: per token the noisy target tokens and the start tokens, concatenated along channels
  ``[x_t, start]`` (width 2C); G.pt concatenates them along the sequence instead, which doubles T and
  quadruples attention cost for the same information.
- Per-token linear projections in and out, indexed by the token's layer id (``token_layer_ids`` from the
  tokenizer): ``projection="layer"`` shares one projection among all tokens of a layer id (in the
  ``neuron`` layout all units of a hidden layer: the model is then equivariant to permutations of
  hidden units, as there is no other position embedding); ``projection="position"`` gives every token
  position its own projection (G.pt). With the ``chunk`` layout each token has its own layer id, so the
  two coincide. Weights are ``[L, 2C, D]`` / ``[L, D, C]`` tensors used via einsum.
- Start-free and unconditional variants: ``start_input="none"`` drops the start tokens from the input
  projection (width C instead of 2C) and the start-metric embedding (the ``start`` argument of
  ``forward`` is then ignored and may be None); ``condition="none"`` drops the target-metric embedding
  and the null embedding (p-diff's unconditional model; ``target_metric``/``drop_target`` are ignored).
- Conditioning: one vector = timestep embedding + target-metric embedding + start-metric embedding.
  Metrics are normalized with ``metric_range=(lo, hi)`` to [0, 1], scaled to [0, 1000] (the timestep
  range) and embedded with sinusoidal frequencies + an MLP. A learned null embedding replaces the
  target-metric embedding where ``drop_target`` is True (classifier-free guidance).
- Blocks: timm ``Attention`` (fused scaled-dot-product attention) and ``Mlp`` with adaLN-Zero; a final
  adaLN layer; the output projection and every adaLN modulation are zero-initialized.
- Long sequences: ``attention="window"`` (``window_attention``) lets a token attend to its window of
  consecutive tokens and to one mean summary per window instead of to every token. Which units share a
  window depends on their order, so the model is then no longer exactly equivariant to unit permutations
  (the data module's permutation augmentation teaches it the symmetry instead).
- ``prediction`` says what the output means ("x0", "epsilon", "v"); ``residual=True`` (x0 only) returns
  ``start + update`` with a zero-initialized update, so the untrained model returns the start tokens.
- Relations (``relations``, from ``relations.find_relations``): the weights between two hidden layers sit
  in a unit's token indexed by the units of the layer before, whose order means nothing across networks.
  They are hidden from the per-token projections and handled as edges between unit tokens instead: an
  ``EdgeEncoder`` message into both units, an attention bias per block and head from the edge's values,
  and an ``EdgeDecoder`` prediction from both units' final embeddings. The model is then equivariant to the
  unit permutations of every hidden layer (tests/test_relations.py); without it, generated networks with
  two hidden layers were at chance (bench/NOTES.md, issue 16).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from einops import rearrange
from timm.layers import Attention, Mlp
from torch import Tensor, nn

from gpt_params.core.parts import PartEmbedders, parts_from_json
from gpt_params.core.relations import EdgeDecoder, EdgeEncoder, add_to_units, attention_bias, gather_edges, relations_from_json
from gpt_params.core.window import window_attention

Prediction = Literal["x0", "epsilon", "v"]
Activation = Literal["gelu", "gelu_tanh"]
AttentionKind = Literal["full", "window"]

PRESETS: dict[str, dict[str, int]] = {  # DiT's S/B/L plus a small CPU model
    "XS": dict(hidden_size=256, depth=4, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x [N, T, D] * (1 + scale [N, D]) + shift [N, D]``, the same for every token."""
    return x * (1 + rearrange(scale, "n d -> n 1 d")) + rearrange(shift, "n d -> n 1 d")


class ScalarEmbedder(nn.Module):
    """A batch of scalars ``[N]`` -> ``[N, D]``: sinusoidal frequencies of ``value * scale``, then an MLP."""

    def __init__(self, hidden_size: int, scale: float = 1.0, frequency_size: int = 256):
        super().__init__()
        self.scale, self.frequency_size = scale, frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, values: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device) / half)  # [F/2]
        args = values.float()[:, None] * self.scale * freqs[None]  # [N, F/2]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, F]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # [N, D]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: shift/scale/gate for attention and MLP from ``c``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, activation: Activation = "gelu",
                 window: int | None = None):
        super().__init__()
        self.window = window  # None: full attention; else ``window_attention`` with this window
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"activation must be 'gelu' or 'gelu_tanh', got {activation!r}")
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate=approximate))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [N, D]
        y = modulate(self.norm1(x), shift1, scale1)  # [N, T, D]
        if self.window is None or self.window >= x.shape[1]:
            attn = self.attn(y, attn_mask=attn_bias)  # [N, T, D]
        else:
            attn = window_attention(self.attn, y, self.window, attn_bias)  # [N, T, D]
        x = x + rearrange(gate1, "n d -> n 1 d") * attn  # [N, T, D]
        x = x + rearrange(gate2, "n d -> n 1 d") * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [N, T, D]
        return x


class TokenLinear(nn.Module):
    """Linear map per token group: ``x [N, T, I] -> [N, T, O]`` with weight ``[L, I, O]`` chosen by ``ids [T]``."""

    def __init__(self, ids: Tensor, in_features: int, out_features: int):
        super().__init__()
        ids = ids.long().cpu()
        self.register_buffer("ids", ids.clone(), persistent=False)
        num = int(ids.max()) + 1
        self.identity = torch.equal(ids, torch.arange(len(ids)))  # per-position: one batched matmul
        # shared ids: one matmul per id over its tokens, never a gathered [T, I, O] weight copy (a
        # 1M-parameter target would need gigabytes for it)
        self.groups = [int(i) for i in torch.unique(ids)]
        for i in self.groups:
            self.register_buffer(f"_pos{i}", torch.nonzero(ids == i).flatten(), persistent=False)
        self.weight = nn.Parameter(torch.empty(num, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num, out_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.identity:
            return torch.einsum("nti,tio->nto", x, self.weight) + self.bias  # [N, T, O]
        if len(self.groups) == 1:
            return x @ self.weight[self.groups[0]] + self.bias[self.groups[0]]  # [N, T, O]
        out = x.new_empty(*x.shape[:2], self.weight.shape[2])  # [N, T, O]
        for i in self.groups:
            pos = getattr(self, f"_pos{i}")
            out[:, pos] = x[:, pos] @ self.weight[i] + self.bias[i]  # [N, t_i, O]
        return out


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + per-token projection back to token width."""

    def __init__(self, hidden_size: int, ids: Tensor, token_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = TokenLinear(ids, hidden_size, token_dim)

    def features(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x [N, D]
        return modulate(self.norm(x), shift, scale)  # [N, T, D]

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(self.features(x, c))  # [N, T, C]


class ParameterDiT(nn.Module):
    """Denoiser over parameter tokens conditioned on the start tokens, timestep and two metrics.

    Args:
        num_tokens, token_dim: T and C of the tokenizer.
        token_layer_ids: ``[T]`` layer id per token (tokenizer.token_layer_ids); None = one per position.
        hidden_size, depth, num_heads, mlp_ratio: transformer size (see ``PRESETS``).
        prediction: meaning of the output ("x0" clean target, "epsilon" noise, "v" velocity).
        residual: output ``start + update`` (x0 only); the untrained model returns the start.
        metric_range: ``(lo, hi)`` mapped to [0, 1] before embedding (raw metric values go in).
        projection: "layer" (projections shared by a layer id) or "position" (one per token).
        token_mask: ``[T, C]`` bool (tokenizer.mask); outputs at padding are zero when given.
        start_input: "checkpoint" (start tokens and start metric are inputs) or "none" (start-free).
        condition: "target" (conditioned on the target metric) or "none" (unconditional).
        relations: the weights between hidden layers (``relations.find_relations(tokenizer)``, as JSON
            dicts): hidden from the per-token projections, encoded and predicted as edges between unit
            tokens (see ``gpt_params.core.relations``). None or empty: every entry goes through the
            per-token projections.
        edge_size: width E of the edge encoder and decoder.
        activation: the MLPs' GELU, exact ("gelu") or DiT's tanh approximation ("gelu_tanh", the only one
            before issue 16); the two compute nearly the same (speed: bench/activation.py).
        attention: "full" (every token attends to every token) or "window" (``window_attention``: within
            windows of ``window`` consecutive tokens plus one summary per window; the tokenizer orders
            tokens layer by layer, so a window mostly lies within one layer). Window attention costs
            ``T * (window + T / window)`` scores per head instead of ``T^2`` (issue 17; quality on digits and
            speed: bench/NOTES.md).
        window: tokens per window (``attention="window"`` only; a sequence no longer than it gets full
            attention).
        parts: condition parts besides the target metric (``parts.PartSpec`` JSON dicts: named scalars and
            labels), each embedded and added to the conditioning vector, each with its own null embedding.
    """

    def __init__(self, num_tokens: int, token_dim: int, token_layer_ids: Tensor | None = None, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, prediction: Prediction = "x0",
                 residual: bool = False, metric_range: tuple[float, float] = (0.0, 1.0),
                 projection: Literal["layer", "position"] = "layer", token_mask: Tensor | None = None,
                 start_input: Literal["checkpoint", "none"] = "checkpoint",
                 condition: Literal["target", "none"] = "target", relations: list[dict] | None = None,
                 edge_size: int = 64, activation: Activation = "gelu", attention: AttentionKind = "full",
                 window: int = 128, parts: list[dict] | None = None):
        super().__init__()
        if prediction not in ("x0", "epsilon", "v"):
            raise ValueError(f"prediction must be 'x0', 'epsilon' or 'v', got {prediction!r}")
        if residual and prediction != "x0":
            raise ValueError("residual=True (output = start + update) only makes sense with prediction='x0'")
        if projection not in ("layer", "position"):
            raise ValueError(f"projection must be 'layer' or 'position', got {projection!r}")
        if start_input not in ("checkpoint", "none"):
            raise ValueError(f"start_input must be 'checkpoint' or 'none', got {start_input!r}")
        if condition not in ("target", "none"):
            raise ValueError(f"condition must be 'target' or 'none', got {condition!r}")
        if residual and start_input == "none":
            raise ValueError("residual=True (output = start + update) needs a start: use start_input='checkpoint'")
        lo, hi = float(metric_range[0]), float(metric_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"metric_range must be finite (lo, hi) with hi > lo, got {metric_range}")
        if attention not in ("full", "window"):
            raise ValueError(f"attention must be 'full' or 'window', got {attention!r}")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a whole number >= 1, got {window}")
        if attention == "window" and relations:   # their bias links layers far apart in token order
            raise ValueError("window attention keeps the relations' attention bias only within windows, which drops "
                             "nearly every edge between layers: use relations='none' (--model.dit.relations none) "
                             "with attention='window', or full attention")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        ids = torch.arange(num_tokens) if token_layer_ids is None else torch.as_tensor(token_layer_ids).long()
        if ids.shape != (num_tokens,) or int(ids.min()) < 0:
            raise ValueError(f"token_layer_ids must be [{num_tokens}] non-negative ids, got {list(ids.shape)}")
        self.num_tokens, self.token_dim, self.prediction, self.residual = num_tokens, token_dim, prediction, residual
        self.metric_range = (lo, hi)
        self.start_input, self.condition = start_input, condition
        self._config = dict(num_tokens=num_tokens, token_dim=token_dim, token_layer_ids=ids.tolist(),
                            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                            prediction=prediction, residual=residual, metric_range=[lo, hi], projection=projection,
                            token_mask=None if token_mask is None else torch.as_tensor(token_mask).bool().tolist(),
                            start_input=start_input, condition=condition,
                            relations=[dict(r) for r in relations or []], edge_size=edge_size,
                            activation=activation, attention=attention, window=int(window),
                            parts=[q.to_json() for q in parts_from_json(parts)])
        proj_ids = ids if projection == "layer" else torch.arange(num_tokens)
        uses_start = start_input == "checkpoint"
        self.x_embedder = TokenLinear(proj_ids, (2 if uses_start else 1) * token_dim, hidden_size)
        self.t_embedder = ScalarEmbedder(hidden_size)
        if condition == "target":
            self.target_embedder = ScalarEmbedder(hidden_size, scale=1000.0)
            self.null_target = nn.Parameter(torch.zeros(hidden_size))
        if uses_start:
            self.start_embedder = ScalarEmbedder(hidden_size, scale=1000.0)
        specs = parts_from_json(parts)
        self.part_embedders = PartEmbedders(specs, hidden_size, ScalarEmbedder) if specs else None
        block_window = int(window) if attention == "window" else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, activation, block_window)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, proj_ids, token_dim)
        mask = torch.ones(num_tokens, token_dim, dtype=torch.bool) if token_mask is None else torch.as_tensor(token_mask)
        if mask.shape != (num_tokens, token_dim):
            raise ValueError(f"token_mask must be [{num_tokens}, {token_dim}], got {list(mask.shape)}")
        self.register_buffer("token_mask", mask.bool(), persistent=False)
        self._add_relations(relations_from_json(relations), hidden_size, edge_size, 2 if uses_start else 1,
                            depth * 2 * num_heads)
        self.initialize_weights()

    def _add_relations(self, relations, hidden_size: int, edge_size: int, inputs: int, biases: int) -> None:
        """Buffers of each relation's positions; its encoder, attention-bias map (``biases`` = depth x 2 x heads
        scores per edge) and decoder; ``free_mask`` [T, C]: 0 at the relations' entries, which the per-token
        projections do not see."""
        self.num_relations = len(relations)
        free = torch.ones(self.num_tokens * self.token_dim)
        self.edge_encoders, self.edge_biases, self.edge_decoders = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, rel in enumerate(relations):
            if int(rel.index.max()) >= free.numel() or int(max(rel.rows.max(), rel.cols.max())) >= self.num_tokens:
                raise ValueError(f"relation {rel.name!r} points outside the [{self.num_tokens}, {self.token_dim}] tokens")
            free[rel.index.flatten()] = 0.0
            for key in ("rows", "cols", "index"):
                self.register_buffer(f"_rel{i}_{key}", getattr(rel, key).clone(), persistent=False)
            features = rel.index.shape[2]
            self.edge_encoders.append(EdgeEncoder(inputs * features, hidden_size, edge_size))
            self.edge_biases.append(nn.Linear(inputs * features, biases))
            self.edge_decoders.append(EdgeDecoder(inputs * features, hidden_size, edge_size, features))
        self.register_buffer("free_mask", free.view(self.num_tokens, self.token_dim), persistent=False)

    def _relation(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return getattr(self, f"_rel{i}_rows"), getattr(self, f"_rel{i}_cols"), getattr(self, f"_rel{i}_index")

    @classmethod
    def from_preset(cls, name: str, num_tokens: int, token_dim: int, **kwargs) -> "ParameterDiT":
        """``ParameterDiT.from_preset("S", T, C, token_layer_ids=..., ...)``; kwargs override the preset."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        return cls(num_tokens, token_dim, **{**PRESETS[name], **kwargs})

    def config(self) -> dict:
        """JSON-able constructor arguments: ``ParameterDiT(**model.config())`` rebuilds the architecture."""
        return dict(self._config)

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, N(0, 0.02) embedding MLPs, zero adaLN modulations and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight  # [L, 2C or C, D]: xavier over one token's projection
        bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
        nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.x_embedder.bias)
        for name in ("t_embedder", "target_embedder", "start_embedder"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).mlp[0].weight, std=0.02)
                nn.init.normal_(getattr(self, name).mlp[2].weight, std=0.02)
        if self.condition == "target":
            nn.init.normal_(self.null_target, std=0.02)
        if self.part_embedders is not None:
            for embed in self.part_embedders.embedders:
                for w in ([embed.weight] if isinstance(embed, nn.Embedding) else [embed.mlp[0].weight, embed.mlp[2].weight]):
                    nn.init.normal_(w, std=0.02)
            if self.part_embedders.nulls is not None:
                nn.init.normal_(self.part_embedders.nulls, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for layer in self.edge_biases:  # no bias at first: attention starts as without relations
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for decoder in self.edge_decoders:  # like the output projection: the untrained model predicts zero
            nn.init.zeros_(decoder.out.weight)
            nn.init.zeros_(decoder.out.bias)
            nn.init.zeros_(decoder.row.weight)   # the bilinear term starts at zero, with gradients
            nn.init.zeros_(decoder.row.bias)

    def normalize_metric(self, metric: Tensor) -> Tensor:
        """Raw metric values ``[N]`` -> ``(m - lo) / (hi - lo)`` (not clipped)."""
        lo, hi = self.metric_range
        return (metric.float() - lo) / (hi - lo)

    def forward(self, x_t: Tensor, timesteps: Tensor, start: Tensor | None, target_metric: Tensor | None,
                start_metric: Tensor | None, drop_target: Tensor | None = None, parts: Tensor | None = None,
                drop_parts: Tensor | None = None) -> Tensor:
        """Predict ``[N, T, C]`` (x0, epsilon or v per ``prediction``) from noisy tokens ``x_t [N, T, C]``,
        ``timesteps [N]``, ``start [N, T, C]``, raw ``target_metric [N]`` and ``start_metric [N]``;
        ``drop_target [N]`` bool swaps the target-metric embedding for the learned null embedding.
        A model with condition parts takes their raw values ``parts [N, E]`` (None: all dropped) and
        ``drop_parts [N, E]`` bool (each part's null embedding where True).
        A start-free model ignores ``start``/``start_metric``, an unconditional one ``target_metric``."""
        uses_start = self.start_input == "checkpoint"
        if x_t.shape[1:] != (self.num_tokens, self.token_dim) or (uses_start and (start is None or start.shape != x_t.shape)):
            got = None if start is None else list(start.shape)
            raise ValueError(f"x_t and start must both be [N, {self.num_tokens}, {self.token_dim}], got "
                             f"{list(x_t.shape)} and {got}")
        n = x_t.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x_t.device).expand(n)  # [N]
        inputs = [x_t, start] if uses_start else [x_t]
        tokens = torch.cat(inputs, dim=-1)  # [N, T, 2C or C]
        if self.num_relations:  # the relations' entries reach the model only as edges
            tokens = tokens * self.free_mask.to(x_t.dtype).repeat(1, len(inputs))  # [N, T, 2C or C]
        h = self.x_embedder(tokens)  # [N, T, D]
        edges = [torch.cat([gather_edges(x, self._relation(i)[2]) for x in inputs], dim=-1)
                 for i in range(self.num_relations)]  # each [N, A, B, inputs * F]
        h0, bias = h, None
        for i, encoder in enumerate(self.edge_encoders):  # messages from the input embeddings, added together
            rows, cols, _ = self._relation(i)
            to_rows, to_cols = encoder(edges[i], h0[:, rows].mean(2), h0[:, cols].mean(2))  # [N, A, D], [N, B, D]
            h = add_to_units(add_to_units(h, rows, to_rows), cols, to_cols)  # [N, T, D]
            b = attention_bias(self.edge_biases[i](edges[i]), rows, cols, self.num_tokens)  # [N, depth * H, T, T]
            bias = b if bias is None else bias + b
        biases = [None] * len(self.blocks) if bias is None else bias.to(h.dtype).chunk(len(self.blocks), dim=1)
        c = self.t_embedder(timesteps)  # [N, D]
        if self.condition == "target":
            target = self.target_embedder(self.normalize_metric(target_metric.expand(n)))  # [N, D]
            if drop_target is not None:
                drop = rearrange(drop_target, "n -> n 1")  # [N, 1]
                target = torch.where(drop, self.null_target.to(target.dtype), target)  # [N, D]
            c = c + target
        if uses_start:
            c = c + self.start_embedder(self.normalize_metric(start_metric.expand(n)))  # [N, D]
        if self.part_embedders is not None:
            c = c + self.part_embedders(parts, drop_parts, n, x_t.device)  # [N, D]
        for block, b in zip(self.blocks, biases):
            h = block(h, c, b)  # [N, T, D]
        features = self.final_layer.features(h, c)  # [N, T, D]
        out = self.final_layer.linear(features)  # [N, T, C]
        if self.num_relations:
            flat = out.flatten(1)  # [N, T * C]
            for i, decoder in enumerate(self.edge_decoders):
                rows, cols, index = self._relation(i)
                pred = decoder(edges[i], features[:, rows].mean(2), features[:, cols].mean(2))  # [N, A, B, F]
                flat = flat.index_copy(1, index.flatten(), pred.flatten(1))
            out = flat.view_as(out)  # [N, T, C]
        if self.residual:
            out = start + out  # [N, T, C]
        return out * self.token_mask  # [N, T, C]
