"""Permutation specs: permuted networks compute the same function; weight matching undoes a permutation."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from checkpoints_dataset.params import state_dict_to_vector, vector_to_state_dict
from checkpoints_dataset.permute import (PermutationSpec, apply_permutations, infer_permutation_spec,
                                         permute_params, random_permutations, weight_matching)
from conftest import builtin_task


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and statistics (defaults would hide a BatchNorm that does not move)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _assert_function_preserved(model: nn.Module, x: torch.Tensor, spec=None, K: int = 3) -> None:
    spec = spec or infer_permutation_spec(model)
    spec = PermutationSpec.from_json(spec.to_json())  # JSON round trip on the way
    vec = state_dict_to_vector(model.state_dict())[None].repeat(K, 1)  # [K, P]
    permuted = permute_params(vec, spec, torch.Generator().manual_seed(1))  # [K, P]
    assert spec.groups and (permuted != vec).any(), "the permutation must not be the identity"
    with torch.no_grad():
        reference = model(x)
        for row in permuted:
            other = copy.deepcopy(model)
            other.load_state_dict(vector_to_state_dict(row, other), strict=True)
            assert (other.eval()(x) - reference).abs().max() < 1e-5


def _cnn(bn: bool, head: str):
    norm = (lambda c: [nn.BatchNorm2d(c)]) if bn else (lambda c: [])
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)] if head == "gap" else \
        [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 2 * 2, 3)]  # block = 4 spatial entries per channel
    return nn.Sequential(nn.Conv2d(2, 6, 3, stride=2), *norm(6), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(6, 5, 3, bias=False), *norm(5), nn.GELU()), *pool)


@pytest.mark.parametrize("model,x", [
    (nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)),
     torch.randn(4, 5)),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.SELU(), nn.Linear(6, 2)), torch.randn(4, 3, 4)),
    (_cnn(bn=False, head="gap"), torch.randn(2, 2, 13, 13)),
    (_cnn(bn=True, head="gap"), torch.randn(2, 2, 13, 13)),
    (_cnn(bn=True, head="flatten"), torch.randn(2, 2, 13, 13)),
], ids=["mlp", "mlp_bn1d", "cnn", "cnn_bn", "cnn_bn_flatten_block"])
def test_permutation_preserves_function(model, x):
    _assert_function_preserved(_randomize(model), x)


def _builtin_tasks():
    try:
        from checkpoints_dataset.tasks import BUILTIN_TASKS
    except ImportError:
        return []
    return sorted(BUILTIN_TASKS)


@pytest.mark.parametrize("name", _builtin_tasks())
def test_builtin_task_permutation_preserves_function(name):
    task = builtin_task(name)
    model = _randomize(task.build_model())
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if not isinstance(model[0], (nn.Linear, nn.Conv2d, nn.Flatten)):   # an input encoding first (fields)
        x = task.probe_inputs()[:4]
    elif isinstance(first, nn.Linear):
        x = torch.randn(4, first.in_features)
    else:
        x = torch.randn(4, first.in_channels, 28, 28)
    _assert_function_preserved(model, x, spec=task.permutation_spec)


@settings(max_examples=8, deadline=None)
@given(widths=st.lists(st.integers(4, 9), min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_random_mlp_shapes(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1], nn.Linear(widths[-1], 2))
    _assert_function_preserved(_randomize(model, seed), torch.randn(3, widths[0]))


def test_same_generator_state_same_permutation_and_bad_length():
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    spec = infer_permutation_spec(model)
    vec = torch.randn(4, spec.num_params)
    a = permute_params(vec, spec, torch.Generator().manual_seed(5))
    assert torch.equal(a, permute_params(vec, spec, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match=str(spec.num_params)):
        permute_params(torch.randn(2, spec.num_params + 1), spec)


def test_uninferable_module_raises():
    with pytest.raises(ValueError, match="declare the spec"):
        infer_permutation_spec(nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4)))


def test_weight_matching_recovers_known_permutation():
    model = _randomize(nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(8 * 9, 16), nn.ReLU(), nn.Linear(16, 3)))
    spec = infer_permutation_spec(model)
    assert [g.axes[-1][2] for g in spec.groups] == [9, 1]  # the Linear after Flatten moves 3x3 blocks
    vec = state_dict_to_vector(model.state_dict())
    perms = random_permutations(1, spec, torch.Generator().manual_seed(3))
    other = apply_permutations(vec[None], spec, perms)[0]
    found = weight_matching(vec, other, spec)
    aligned = apply_permutations(other[None], spec, [p[None] for p in found])[0]
    assert torch.equal(aligned, vec)
    for p, f in zip(perms, found):  # found = inverse of the applied permutation
        assert torch.equal(p[0][f], torch.arange(len(f)))
