"""LayerShapes: the layout of a parameter vector (offsets, split/join, JSON)."""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

from checkpoints_dataset.params import (LayerShapes, count_params, float_layer_shapes, tensors_to_vector,
                                        vector_to_tensors)

PAIRS = [["0.weight", [4, 3]], ["0.bias", [4]], ["1.running_mean", [4]], ["2.weight", [2, 4]], ["scalar", []]]


def test_offsets_sizes_and_slices():
    shapes = LayerShapes(PAIRS)
    assert list(shapes) == [name for name, _ in PAIRS]
    assert shapes.sizes == {"0.weight": 12, "0.bias": 4, "1.running_mean": 4, "2.weight": 8, "scalar": 1}
    assert shapes.offsets == {"0.weight": 0, "0.bias": 12, "1.running_mean": 16, "2.weight": 20, "scalar": 28}
    assert shapes.num_params == 29 == count_params(shapes) == count_params(dict(shapes))
    assert shapes.slices["2.weight"] == slice(20, 28)


def test_lists_become_tuples_and_it_equals_a_plain_dict():
    shapes = LayerShapes({"a": [2, 3], "b": (3,)})
    assert shapes["a"] == (2, 3) and isinstance(shapes["a"], tuple)
    assert shapes == {"a": (2, 3), "b": (3,)}
    assert {"a": (2, 3), "b": (3,)} == shapes
    assert shapes != {"a": [2, 3], "b": [3]}          # a plain dict of lists is another value
    assert LayerShapes({"a": torch.Size([2, 3])})["a"] == (2, 3)
    assert LayerShapes.of(shapes) is shapes
    with pytest.raises(TypeError):
        shapes["c"] = (1,)
    with pytest.raises(TypeError):
        LayerShapes({"a": 3})


def test_split_join_round_trip():
    shapes = LayerShapes(PAIRS)
    vec = torch.randn(5, shapes.num_params)
    parts = shapes.split(vec)
    assert list(parts) == list(shapes)
    assert parts["0.weight"].shape == (5, 4, 3) and parts["scalar"].shape == (5,)
    assert torch.equal(parts["2.weight"].reshape(5, -1), vec[:, shapes.slices["2.weight"]])
    assert parts["0.bias"].data_ptr() == vec[:, 12:].data_ptr()   # views
    assert torch.equal(shapes.join(parts), vec)
    assert torch.equal(shapes.join(dict(reversed(parts.items()))), vec)   # order comes from the shapes
    assert torch.equal(tensors_to_vector(vector_to_tensors(vec, dict(shapes)), dict(shapes)), vec)
    assert shapes.split(vec[0])["0.weight"].shape == (1, 4, 3)   # one vector [P]
    with pytest.raises(ValueError, match="29"):
        shapes.split(torch.randn(2, 28))
    with pytest.raises(KeyError, match="0.bias"):
        shapes.join({k: v for k, v in parts.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="expected"):
        shapes.join({**parts, "0.bias": torch.zeros(5, 3)})


def test_json_round_trip():
    shapes = LayerShapes(PAIRS)
    data = shapes.to_json()
    assert data == PAIRS
    assert LayerShapes.from_json(json.loads(json.dumps(data))) == shapes
    assert LayerShapes.from_json({name: dims for name, dims in PAIRS}) == shapes
    assert json.loads(json.dumps(shapes)) == {name: dims for name, dims in PAIRS}   # still a dict for json


def test_pickle_copy_and_float_layer_shapes():
    shapes = LayerShapes(PAIRS)
    for other in (pickle.loads(pickle.dumps(shapes)), copy.deepcopy(shapes), copy.copy(shapes)):
        assert type(other) is LayerShapes and other == shapes and other.offsets == shapes.offsets
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    got = float_layer_shapes(model)
    assert isinstance(got, LayerShapes)
    assert got == {"0.weight": (4, 3), "0.bias": (4,), "1.weight": (4,), "1.bias": (4,), "1.running_mean": (4,),
                   "1.running_var": (4,), "2.weight": (2, 4), "2.bias": (2,)}
    assert got.num_params == sum(p.numel() for p in model.parameters()) + 8


def test_same_layout_sees_the_order_that_equality_ignores():
    a = LayerShapes({"fc1.weight": (4, 2), "fc2.weight": (1, 4)})
    b = LayerShapes({"fc2.weight": (1, 4), "fc1.weight": (4, 2)})
    assert a == b and not a.same_layout(b) and a.same_layout({"fc1.weight": [4, 2], "fc2.weight": [1, 4]})
