"""ParameterDiT: zero-init behaviour, shapes/dtypes, conditioning paths, presets, bad options."""

import pytest
import torch
from timm.layers import Attention

from gpt_params import PRESETS, ParameterDiT
from gpt_params.core.config import DiTOptions
from gpt_params.core.window import window_attention



T, C = 6, 5
IDS = torch.tensor([0, 0, 0, 1, 1, 2])  # two hidden layers' units and an extra token
MASK = torch.ones(T, C, dtype=torch.bool)
MASK[5, 2:] = False  # a short last token


def tiny(**kw):
    return ParameterDiT(T, C, IDS, hidden_size=32, depth=2, num_heads=4, token_mask=MASK, **kw)


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(n, T, C, generator=g) * MASK
    return (torch.randn(n, T, C, generator=g) * MASK, torch.randint(0, 1000, (n,), generator=g), start,
            torch.rand(n, generator=g), torch.rand(n, generator=g))


def perturb_output_layer(model, seed=1):
    """Give the zero-initialized layers random values so the output depends on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_untrained_output_is_zero_and_residual_returns_start():
    x_t, t, start, tm, sm = inputs()
    out = tiny()(x_t, t, start, tm, sm)
    assert out.shape == (3, T, C) and out.dtype == torch.float32
    assert (out == 0).all()  # adaLN-Zero + zero output layer
    assert torch.equal(tiny(residual=True)(x_t, t, start, tm, sm), start)


def test_outputs_depend_on_conditions_and_padding_stays_zero():
    model = tiny()
    perturb_output_layer(model)
    x_t, t, start, tm, sm = inputs()
    out = model(x_t, t, start, tm, sm)  # [N, T, C]
    assert (out[:, ~MASK] == 0).all() and out[:, MASK].abs().sum() > 0
    assert not torch.allclose(out, model(x_t, t, start, tm + 0.5, sm))  # target metric matters
    assert not torch.allclose(out, model(x_t, t, start, tm, sm + 0.5))  # start metric matters
    assert not torch.allclose(out, model(x_t, t + 100, start, tm, sm))  # timestep matters
    drop = torch.tensor([True, False, True])
    dropped = model(x_t, t, start, tm, sm, drop_target=drop)
    assert torch.allclose(dropped[1], out[1], atol=1e-6)  # rows not dropped are unchanged
    assert not torch.allclose(dropped[0], out[0])
    # with the target dropped, the target metric no longer matters
    assert torch.allclose(dropped[0], model(x_t, t, start, tm + 0.5, sm, drop_target=drop)[0], atol=1e-6)


def test_layer_projection_is_equivariant_to_unit_permutation():
    model = tiny()
    perturb_output_layer(model)
    x_t, t, start, tm, sm = inputs()
    perm = torch.tensor([2, 0, 1, 4, 3, 5])  # permute units within each layer id
    out = model(x_t, t, start, tm, sm)
    out_p = model(x_t[:, perm], t, start[:, perm], tm, sm)
    assert torch.allclose(out_p, out[:, perm], atol=1e-5)


def test_presets_and_config():
    xs = ParameterDiT.from_preset("XS", T, C, token_layer_ids=IDS)
    n = sum(p.numel() for p in xs.parameters())
    assert 3e6 < n < 8e6
    assert set(PRESETS) >= {"XS", "S", "B", "L"}
    again = ParameterDiT(**tiny(prediction="v").config())
    assert again.prediction == "v" and torch.equal(again.token_mask, MASK)
    with pytest.raises(ValueError, match="preset"):
        ParameterDiT.from_preset("XXL", T, C)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="residual"):
        tiny(residual=True, prediction="epsilon")
    with pytest.raises(ValueError, match="prediction"):
        tiny(prediction="score")
    with pytest.raises(ValueError, match="metric_range"):
        tiny(metric_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="x_t and start"):
        tiny()(torch.zeros(1, T, C + 1), torch.zeros(1), torch.zeros(1, T, C + 1), torch.zeros(1), torch.zeros(1))


def _window_reference(attn, x, w, bias=None):
    """Window attention written out token by token: keys are the token's window and every window's mean."""
    n, t, d = x.shape
    h, e = attn.num_heads, d // attn.num_heads
    starts = range(0, t, w)
    summary = torch.stack([x[:, i:i + w].mean(1) for i in starts], 1)  # [N, M, D]
    qkv, qkv_s = attn.qkv(x).view(n, t, 3, h, e), attn.qkv(summary).view(n, len(starts), 3, h, e)
    out = torch.zeros(n, t, h, e)
    for i in range(t):
        idx = list(range(i // w * w, min(i // w * w + w, t)))
        k = torch.cat([qkv[:, idx, 1], qkv_s[:, :, 1]], 1)  # [N, K, H, E]
        v = torch.cat([qkv[:, idx, 2], qkv_s[:, :, 2]], 1)
        scores = torch.einsum("nhe,nkhe->nhk", qkv[:, i, 0], k) / e ** 0.5
        if bias is not None:
            scores = scores + torch.cat([bias[:, :, i, idx], torch.zeros(n, h, len(starts))], -1)
        out[:, i] = torch.einsum("nhk,nkhe->nhe", scores.softmax(-1), v)
    return attn.proj(out.reshape(n, t, d))


@pytest.mark.parametrize("window", [3, 4, 5, 11])
def test_window_attention_matches_its_definition(window):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x, bias = torch.randn(2, 11, 32), torch.randn(2, 4, 11, 11)
    assert torch.allclose(window_attention(attn, x, window), _window_reference(attn, x, window), atol=1e-5)
    assert torch.allclose(window_attention(attn, x, window, bias), _window_reference(attn, x, window, bias), atol=1e-5)


def test_window_attention_model_rebuilds_and_trains():
    model = tiny(attention="window", window=2)
    perturb_output_layer(model)
    again = ParameterDiT(**model.config())
    again.load_state_dict(model.state_dict())
    x_t, t, start, tm, sm = inputs()
    out = model(x_t, t, start, tm, sm)
    assert torch.equal(out, again(x_t, t, start, tm, sm)) and again.config()["attention"] == "window"
    full = tiny()
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(out, full(x_t, t, start, tm, sm), atol=1e-4)  # the windows change the output
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.blocks.parameters() if p.requires_grad)
    # a window as long as the sequence is full attention
    whole = tiny(attention="window", window=T)
    whole.load_state_dict(full.state_dict())
    assert torch.allclose(full(x_t, t, start, tm, sm), whole(x_t, t, start, tm, sm), atol=1e-6)


def test_bad_attention_options_raise():
    with pytest.raises(ValueError, match="attention"):
        tiny(attention="local")
    with pytest.raises(ValueError, match="window"):
        tiny(attention="window", window=0)
    with pytest.raises(ValueError, match="dit.attention"):
        DiTOptions(attention="sparse")
    with pytest.raises(ValueError, match="dit.window"):
        DiTOptions(window=1.5)


def test_window_attention_refuses_relations():
    relation = {"name": "w", "rows": [[0], [1]], "cols": [[3], [4]], "index": [[[0], [1]], [[5], [6]]]}
    with pytest.raises(ValueError, match="relations='none'"):
        tiny(attention="window", window=2, relations=[relation])
    tiny(relations=[relation])   # full attention takes them
