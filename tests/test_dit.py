"""ParameterDiT: zero-init behaviour, shapes/dtypes, conditioning paths, presets, bad options."""

import pytest
import torch

from gpt_params import PRESETS, ParameterDiT



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
