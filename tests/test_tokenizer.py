"""ParameterTokenizer: exact round trips, layouts, permutation structure, normalization, errors, config."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from checkpoints_dataset.params import float_layer_shapes, state_dict_to_vector
from checkpoints_dataset.permute import apply_permutations, infer_permutation_spec, spec_from_layer_shapes
from conftest import builtin_task
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


# ------------------------------------------------------------------- tokens recorded before the spec rewrite
# Recorded from the tokenizer that inferred the hidden units itself (_infer_groups, before it took a
# PermutationSpec): T, C, number of layer ids, a digest of index / mask / token_layer_ids / token_kinds, and
# the last token kind. Every case must give the same with the task's spec, its JSON dict and spec=None.

def _digest(tok) -> str:
    h = hashlib.sha256()
    for t in (tok.index, tok.mask, tok.token_layer_ids):
        h.update(t.contiguous().numpy().tobytes())
    h.update("|".join(tok.token_kinds).encode())
    return h.hexdigest()[:16]


TASK_SHAPES = {
    "digits_mlp": {"0.weight": (32, 64), "0.bias": (32,), "2.weight": (10, 32), "2.bias": (10,)},
    "fashion_mlp": {"1.weight": (32, 784), "1.bias": (32,), "3.weight": (10, 32), "3.bias": (10,)},
    "fashion_cnn": {"0.weight": (16, 1, 3, 3), "2.weight": (32, 16, 3, 3), "6.weight": (10, 32), "6.bias": (10,)},
    "fashion_cnn_bn": {"0.weight": (16, 1, 3, 3), "1.weight": (16,), "1.bias": (16,), "1.running_mean": (16,),
                       "1.running_var": (16,), "3.weight": (32, 16, 3, 3), "4.weight": (32,), "4.bias": (32,),
                       "4.running_mean": (32,), "4.running_var": (32,), "8.weight": (10, 32), "8.bias": (10,)},
    "cartpole": {"0.weight": (32, 4), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,), "4.weight": (2, 32),
                 "4.bias": (2,)},
}
RECORDED_TASKS = {  # (task, layout, chunk_size) -> (T, C, layer ids, digest, last kind)
    ("digits_mlp", "neuron", 1024): (33, 75, 2, "13ad01d3faefcdd7", "chunk:2.bias/0"),
    ("digits_mlp", "neuron", 64): (65, 64, 3, "99e84e4a8939f069", "chunk:2.bias/0"),
    ("digits_mlp", "chunk", 1024): (5, 1024, 5, "23006cd6b99ce1e1", "chunk:2.bias/0"),
    ("digits_mlp", "chunk", 64): (39, 64, 39, "e49dbfb694689e83", "chunk:2.bias/0"),
    ("fashion_mlp", "neuron", 1024): (33, 795, 2, "9e873bf9665166c7", "chunk:3.bias/0"),
    ("fashion_mlp", "neuron", 64): (417, 64, 14, "b3a1352388e1741b", "chunk:3.bias/0"),
    ("fashion_mlp", "chunk", 1024): (28, 1024, 28, "2813cec8d4e01916", "chunk:3.bias/0"),
    ("fashion_mlp", "chunk", 64): (399, 64, 399, "afcfcfc1d03814cf", "chunk:3.bias/0"),
    ("fashion_cnn", "neuron", 1024): (49, 154, 3, "44ff729c9482e643", "chunk:6.bias/0"),
    ("fashion_cnn", "neuron", 64): (113, 64, 5, "025c090add1a1454", "chunk:6.bias/0"),
    ("fashion_cnn", "chunk", 1024): (8, 1024, 8, "8a9c5965d49ce094", "chunk:6.bias/0"),
    ("fashion_cnn", "chunk", 64): (81, 64, 81, "82d072c4ea07a83a", "chunk:6.bias/0"),
    ("fashion_cnn_bn", "neuron", 1024): (49, 158, 3, "8f4d4d20d9b167bd", "chunk:8.bias/0"),
    ("fashion_cnn_bn", "neuron", 64): (113, 64, 5, "e6f7b30ef5588e83", "chunk:8.bias/0"),
    ("fashion_cnn_bn", "chunk", 1024): (16, 1024, 16, "b825d04e6eadfd4a", "chunk:8.bias/0"),
    ("fashion_cnn_bn", "chunk", 64): (89, 64, 89, "6b07af61cdc0da26", "chunk:8.bias/0"),
    ("cartpole", "neuron", 1024): (65, 35, 3, "c81d6c5febe0b7a2", "chunk:4.bias/0"),
    ("cartpole", "neuron", 64): (65, 35, 3, "c81d6c5febe0b7a2", "chunk:4.bias/0"),
    ("cartpole", "chunk", 1024): (6, 1024, 6, "e208559266baea7f", "chunk:4.bias/0"),
    ("cartpole", "chunk", 64): (22, 64, 22, "fc0ac946d079d7a4", "chunk:4.bias/0"),
}


def _recorded(tok) -> tuple:
    return tok.num_tokens, tok.token_dim, tok.num_layer_ids, _digest(tok), tok.token_kinds[-1]


@pytest.mark.parametrize("name", list(TASK_SHAPES))
def test_tokens_of_builtin_tasks_match_the_recorded_ones(name):
    task = builtin_task(name)
    assert dict(task.layer_shapes) == TASK_SHAPES[name]
    spec = task.permutation_spec
    assert spec_from_layer_shapes(task.layer_shapes) == spec  # shapes alone give the module's spec
    for layout in ("neuron", "chunk"):
        for chunk_size in (1024, 64):
            expected = RECORDED_TASKS[(name, layout, chunk_size)]
            for s in (spec, json.loads(json.dumps(spec.to_json())), None):
                tok = ParameterTokenizer(TASK_SHAPES[name], layout=layout, chunk_size=chunk_size, spec=s)
                assert _recorded(tok) == expected, (layout, chunk_size, s is None)
                assert tok.index[0, :4].tolist() == [0, 1, 2, 3]


RECORDED_INFERRED = {  # name -> (layer shapes, {chunk_size: (T, C, layer ids, digest)}, token kinds at 1024)
    "unplaceable": ({"log_std": (1,), "body.weight": (4, 3), "body.bias": (4,), "odd": (2, 2, 2),
                     "head.weight": (2, 4)}, {8: (6, 8, 3, "cd5247b587924fb4"), 1024: (6, 8, 3, "cd5247b587924fb4")},
                    ["unit:body/piece0", "chunk:log_std/0", "chunk:odd/0"]),
    "mlp_bn": ({"0.weight": (4, 6), "0.bias": (4,), "1.weight": (4,), "1.bias": (4,), "1.running_mean": (4,),
                "1.running_var": (4,), "3.weight": (4, 4), "3.bias": (4,), "4.weight": (4,), "4.bias": (4,),
                "4.running_mean": (4,), "4.running_var": (4,), "6.weight": (2, 4), "6.bias": (2,)},
               {8: (17, 8, 5, "ad71f17c48b863d3"), 1024: (9, 11, 3, "17d3b34a19639747")},
               ["unit:0/piece0", "unit:3/piece0", "chunk:6.bias/0"]),
    "cnn_flatten": ({"0.weight": (6, 3, 3, 3), "1.weight": (6,), "1.bias": (6,), "1.running_mean": (6,),
                     "1.running_var": (6,), "3.weight": (8, 6, 3, 3), "3.bias": (8,), "6.weight": (5, 72),
                     "6.bias": (5,)}, {8: (129, 8, 18, "2e109b7862951cea"), 1024: (15, 100, 3, "7976273a96e7ff76")},
                    ["unit:0/piece0", "unit:3/piece0", "chunk:6.bias/0"]),
    "top_level": ({"weight": (3, 2), "bias": (3,), "out.weight": (2, 3)},
                  {8: (3, 5, 1, "0b661b7505074a63"), 1024: (3, 5, 1, "0b661b7505074a63")}, ["unit:/piece0"]),
    "scalar": ({"scale": (), "0.weight": (5, 3), "0.bias": (5,), "1.weight": (2, 5)},
               {8: (6, 6, 2, "1c1e8d22bc040377"), 1024: (6, 6, 2, "1c1e8d22bc040377")},
               ["unit:0/piece0", "chunk:scale/0"]),
}


@pytest.mark.parametrize("name", list(RECORDED_INFERRED))
def test_inferred_structure_matches_the_recorded_tokens(name):
    shapes, by_chunk, kinds = RECORDED_INFERRED[name]
    for chunk_size, expected in by_chunk.items():
        tok = ParameterTokenizer(shapes, layout="neuron", chunk_size=chunk_size)  # spec=None: inferred
        assert (tok.num_tokens, tok.token_dim, tok.num_layer_ids, _digest(tok)) == expected
        params = random_vectors(shapes)
        assert torch.equal(tok.detokenize(tok.tokenize(params)), params)
    assert tok.token_kinds == kinds


def test_legacy_checkpoint_tokenizer_inputs_give_the_recorded_tokens():
    """The tokenizer inputs a pre-redesign checkpoint saved (data_info: the store's JSON spec and stats)."""
    ckpt = torch.load(Path(__file__).parent / "data" / "legacy_params.ckpt", map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    info = hp["data_info"]
    tok = ParameterTokenizer(info["layer_shapes"], layout=hp["layout"], chunk_size=hp["chunk_size"],
                             stats=info["stats"], spec=info["permutation_spec"])
    assert (tok.num_tokens, tok.token_dim, tok.num_layer_ids, _digest(tok)) == (33, 75, 2, "13ad01d3faefcdd7")
    tokens = tok.tokenize(torch.linspace(-1, 1, tok.num_params)[None])
    assert float(tokens.double().sum()) == pytest.approx(-1045.5408072260907, rel=1e-9)
    assert float(tokens.double().abs().sum()) == pytest.approx(14121.353446350782, rel=1e-9)
    assert tok.config()["spec"] == info["permutation_spec"]  # saved again as the store wrote it
    again = ParameterTokenizer.from_config(json.loads(json.dumps(tok.config())))
    assert torch.equal(again.index, tok.index) and torch.equal(again.tokenize(tokens.new_ones(1, tok.num_params)),
                                                               tok.tokenize(tokens.new_ones(1, tok.num_params)))


def test_spec_forms_and_inference_from_shapes():
    model = cnn()
    shapes = float_layer_shapes(model)
    spec = infer_permutation_spec(model)
    assert spec_from_layer_shapes(shapes) == spec
    groups_only = {"groups": spec.to_json()["groups"]}  # a groups-only dict (older configs allowed it)
    tok = ParameterTokenizer(shapes, chunk_size=64, spec=groups_only)
    assert tok.spec == spec and torch.equal(tok.index, ParameterTokenizer(shapes, chunk_size=64).index)
    assert ParameterTokenizer(shapes, chunk_size=64).spec is None  # inferred, not saved
    with pytest.raises(TypeError, match="PermutationSpec"):
        ParameterTokenizer(shapes, spec=[("0.weight", 0)])
