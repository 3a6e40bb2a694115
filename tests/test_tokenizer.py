"""ParameterTokenizer: exact round trips, layouts, permutation structure, normalization, errors, config."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from checkpoints_dataset.params import float_layer_shapes, state_dict_to_vector
from checkpoints_dataset.permute import apply_permutations, infer_permutation_spec
from gpt_params import ParameterTokenizer



def mlp(sizes, batchnorm=False):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b)] if batchnorm else []
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))  # 11x11 inputs


def random_vectors(shapes, n=3, seed=0):
    return torch.randn(n, sum(torch.Size(s).numel() for s in shapes.values()), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=2, max_size=5), batchnorm=st.booleans(),
       layout=st.sampled_from(["neuron", "chunk"]), chunk_size=st.integers(1, 40))
def test_round_trip_random_mlps(sizes, batchnorm, layout, chunk_size):
    shapes = float_layer_shapes(mlp(sizes, batchnorm))
    tok = ParameterTokenizer(shapes, layout=layout, chunk_size=chunk_size)
    params = random_vectors(shapes)
    tokens = tok.tokenize(params)
    assert tokens.shape == (3, tok.num_tokens, tok.token_dim) and tok.token_dim <= chunk_size
    assert torch.equal(tok.detokenize(tokens), params)  # bit-equal
    assert int(tok.mask.sum()) == tok.num_params  # every entry exactly once
    assert (tokens[:, ~tok.mask] == 0).all()  # padding is zero
    assert tok.token_layer_ids.shape == (tok.num_tokens,) and int(tok.token_layer_ids.max()) < tok.num_layer_ids


def test_cnn_with_batchnorm_round_trip_and_state_dicts():
    model = cnn()
    model(torch.randn(4, 3, 11, 11))  # non-trivial running stats
    shapes = float_layer_shapes(model)
    tok = ParameterTokenizer(shapes, chunk_size=64)
    # inference from names/shapes agrees with the module-based permutation spec
    assert torch.equal(tok.index, ParameterTokenizer(shapes, chunk_size=64, spec=infer_permutation_spec(model)).index)
    vec = tok.from_state_dicts([model.state_dict()])  # [1, P]
    assert torch.equal(vec[0], state_dict_to_vector(model.state_dict(), shapes))
    params = torch.cat([vec, random_vectors(shapes, n=2)])
    assert torch.equal(tok.detokenize(tok.tokenize(params)), params)
    sds = tok.to_state_dicts(params)
    fresh = cnn()
    fresh.load_state_dict(sds[0], strict=False)  # integer buffers are not parameters
    for name in tok.layer_shapes:
        assert torch.equal(fresh.state_dict()[name], model.state_dict()[name])
    assert torch.equal(tok.from_state_dicts(sds), params)


@pytest.mark.slow  # importing timm.models takes ~15 s on the shared cores
def test_timm_subset_with_stats_within_tolerance():
    timm = pytest.importorskip("timm")
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    subset = {k: v for k, v in sd.items() if k.startswith("layer4.1.") and torch.is_floating_point(v)}
    shapes = float_layer_shapes(subset)
    gen = torch.Generator().manual_seed(0)
    stats = {n: (float(torch.randn(1, generator=gen)), float(torch.rand(1, generator=gen)) + 0.01) for n in shapes}
    base = random_vectors(shapes, n=2)
    for layout in ("neuron", "chunk"):
        plain = ParameterTokenizer(shapes, layout=layout, chunk_size=1024)
        assert torch.equal(plain.detokenize(plain.tokenize(base)), base)
        tok = ParameterTokenizer(shapes, layout=layout, chunk_size=1024, stats=stats)
        mean = torch.cat([torch.full((torch.Size(s).numel(),), stats[n][0]) for n, s in shapes.items()])  # [P]
        std = torch.cat([torch.full((torch.Size(s).numel(),), stats[n][1]) for n, s in shapes.items()])  # [P]
        params = mean + std * base  # [2, P] values as distributed as the stats say
        tokens = tok.tokenize(params)
        assert tokens[:, tok.mask].std() == pytest.approx(1.0, rel=0.05)  # normalized
        err = (tok.detokenize(tokens) - params).abs()
        assert (err <= 1e-6 * (mean.abs() + std)).all()
    assert tok.from_state_dicts(subset).shape == (1, tok.num_params)


def test_neuron_tokens_permute_whole_with_hidden_units():
    model = mlp([7, 5, 3])
    spec = infer_permutation_spec(model)
    tok = ParameterTokenizer(float_layer_shapes(model), layout="neuron", chunk_size=100, spec=spec)
    assert tok.num_tokens == 5 + 1  # one token per hidden unit + one for the output bias
    params = random_vectors(tok.layer_shapes, n=1)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    permuted = apply_permutations(params, spec, [perm[None]])
    a, b = tok.tokenize(params)[0], tok.tokenize(permuted)[0]  # [T, C]
    assert torch.equal(b[:5], a[:5][perm]) and torch.equal(b[5:], a[5:])


def test_deep_mlp_canonical_copies_and_long_rows_are_cut():
    shapes = float_layer_shapes(mlp([30, 8, 6, 2]))
    tok = ParameterTokenizer(shapes, layout="neuron", chunk_size=16)
    # unit rows: layer 0: 30 + 1 = 31 -> 2 pieces; layer 2: 8 + 1 + 2 (outgoing) = 11 -> 1 piece; output bias
    assert tok.token_kinds == ["unit:0/piece0", "unit:0/piece1", "unit:2/piece0", "chunk:4.bias/0"]
    assert tok.num_tokens == 8 * 2 + 6 + 1 and tok.token_dim == 16
    assert tok.token_layer_ids.tolist() == [0, 1] * 8 + [2] * 6 + [3]


def test_unplaceable_layers_fall_back_to_chunks():
    shapes = {"log_std": (1,), "body.weight": (4, 3), "body.bias": (4,), "odd": (2, 2, 2), "head.weight": (2, 4)}
    tok = ParameterTokenizer(shapes, layout="neuron", chunk_size=8)
    params = random_vectors(shapes)
    assert torch.equal(tok.detokenize(tok.tokenize(params)), params)
    assert any(k.startswith("chunk:log_std") for k in tok.token_kinds)


def test_spec_as_json_dict_and_config_round_trip():
    model = mlp([6, 4, 4, 2], batchnorm=True)
    spec = infer_permutation_spec(model)
    shapes = float_layer_shapes(model)
    stats = {n: (0.1, 2.0) for n in shapes}
    tok = ParameterTokenizer(shapes, chunk_size=8, stats=stats, spec=json.loads(json.dumps(spec.to_json())))
    assert torch.equal(tok.index, ParameterTokenizer(shapes, chunk_size=8, spec=spec).index)
    again = ParameterTokenizer.from_config(json.loads(json.dumps(tok.config())))
    params = random_vectors(shapes)
    assert torch.equal(again.tokenize(params), tok.tokenize(params))
    assert again.stats == tok.stats and again.spec == tok.spec


def test_bad_input_raises_clear_errors():
    model = mlp([4, 3, 2])
    shapes = float_layer_shapes(model)
    tok = ParameterTokenizer(shapes)
    with pytest.raises(ValueError, match="shape"):
        tok.tokenize(torch.randn(2, tok.num_params + 1))
    with pytest.raises(ValueError, match="floating-point"):
        tok.tokenize(torch.zeros(2, tok.num_params, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        tok.detokenize(torch.zeros(2, tok.num_tokens + 1, tok.token_dim))
    sd = dict(model.state_dict())
    with pytest.raises(KeyError, match="missing"):
        tok.from_state_dicts([{k: v for k, v in sd.items() if k != "2.bias"}])
    with pytest.raises(ValueError, match="wrong shapes"):
        tok.from_state_dicts([{**sd, "2.bias": torch.zeros(3)}])
    with pytest.raises(ValueError, match="missing"):
        ParameterTokenizer(shapes, stats={"0.weight": (0.0, 1.0)})
    with pytest.raises(ValueError, match="layout"):
        ParameterTokenizer(shapes, layout="rows")
    with pytest.raises(ValueError, match="not a layer"):
        ParameterTokenizer(shapes, spec={"groups": [{"name": "x", "size": 3, "axes": [["nope.weight", 0]]}]})
