"""Window attention for long token sequences (issue 17): a token attends to the consecutive tokens of its window
and to one summary per window, ``T * (window + T / window)`` scores per head instead of ``T^2``.

A million-parameter MLP has one token per hidden unit (1,281 for 784-1280-10); full attention over them costs
``T^2`` per head and block, and its share grows with T (bench/long_sequence.py). Windows keep local detail, the
summaries (each window's mean input, mapped by the same key and value projections) give every token a view of
the whole network, as global tokens do in Longformer and BigBird. The tokenizer orders tokens layer by
layer, so a window mostly lies within one layer.
"""
from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import Attention
from torch import Tensor, nn


def window_attention(attn: Attention, x: Tensor, window: int, bias: Tensor | None = None) -> Tensor:
    """timm ``Attention`` restricted to windows: token ``i`` attends to the ``window`` consecutive tokens of its
    window and to one summary per window (the mean of that window's inputs), so every token still sees a
    summary of all others at a cost of ``T * (window + T / window)`` scores instead of ``T^2``. A last, shorter
    window is its own call (no padding, no mask). ``bias`` ``[N, H, T, T]`` (the relations') applies within
    windows; summaries get none."""
    n, t, d = x.shape
    heads, w = attn.num_heads, window
    full = t // w * w  # tokens in whole windows
    starts = list(range(0, t, w))
    summary = torch.stack([x[:, i:i + w].mean(1) for i in starts], 1)  # [N, M, D]
    ks, vs = rearrange(attn.qkv(summary)[..., d:], "n m (two h e) -> two n h m e", two=2, h=heads)  # [N, H, M, hd]
    ks = attn.k_norm(ks)
    q, k, v = rearrange(attn.qkv(x), "n t (three h e) -> three n h t e", three=3, h=heads)  # [N, H, T, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    outs = []
    for lo, hi, size in ((0, full, w), (full, t, t - full)):  # whole windows, then the rest
        if hi <= lo:
            continue
        m = (hi - lo) // size  # windows in this part

        def split(z: Tensor) -> Tensor:  # [N, H, hi-lo, hd] -> [N, m, H, size, hd]
            return rearrange(z[:, :, lo:hi], "n h (m w) e -> n m h w e", m=m)
        keys = torch.cat([split(k), ks[:, None].expand(-1, m, -1, -1, -1)], 3)  # [N, m, H, size + M, hd]
        values = torch.cat([split(v), vs[:, None].expand(-1, m, -1, -1, -1)], 3)  # [N, m, H, size + M, hd]
        mask = None
        if bias is not None:  # the block diagonal of the bias, none towards summaries
            b = rearrange(bias[:, :, lo:hi, lo:hi], "n h (m w) (u v) -> n h m w u v", m=m, u=m)
            b = rearrange(torch.diagonal(b, dim1=2, dim2=4), "n h w v m -> n m h w v")  # [N, m, H, size, size]
            mask = nn.functional.pad(b, (0, len(starts)))  # [N, m, H, size, size + M]
        flat = lambda z: z.flatten(0, 1)  # noqa: E731  [N, m, ...] -> [N*m, ...]: 4-D, so SDPA's fused CPU kernel runs
        out = nn.functional.scaled_dot_product_attention(flat(split(q)), flat(keys), flat(values),
                                                         attn_mask=None if mask is None else flat(mask))  # [N*m, H, size, hd]
        outs.append(rearrange(out, "(n m) h w e -> n (m w) (h e)", n=n))  # [N, hi-lo, D]
    return attn.proj_drop(attn.proj(attn.norm(torch.cat(outs, 1))))  # [N, T, D]
