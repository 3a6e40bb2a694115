"""Relations (weights between hidden layers as edges): where they are found, and a DiT that uses them
is equivariant to every hidden layer's unit permutations, which the per-token projections alone are not."""

import pytest
import torch
from torch import nn

from checkpoints_dataset.params import float_layer_shapes
from checkpoints_dataset.permute import apply_permutations, infer_permutation_spec, random_permutations
from gpt_params import ParameterDiT
from gpt_params.core.relations import Relation, find_relations
from gpt_params.core.tokenizer import ParameterTokenizer


def mlp(*widths):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, 3))


def tokenizer_of(model, chunk_size=256):
    return ParameterTokenizer(float_layer_shapes(model), spec=infer_permutation_spec(model), chunk_size=chunk_size)


def test_found_between_hidden_layers_only():
    assert find_relations(tokenizer_of(mlp(8, 6, 3))) == []                 # one hidden layer: none
    assert find_relations(ParameterTokenizer(float_layer_shapes(mlp(8, 6, 5, 3)), layout="chunk")) == []
    (rel,) = find_relations(tokenizer_of(mlp(8, 6, 5, 3)))                  # W2 [5, 6] between the two
    assert rel.name == "2.weight" and rel.index.shape == (5, 6, 1)
    assert rel.rows.shape == (5, 1) and rel.cols.shape == (6, 1)
    convs = find_relations(tokenizer_of(cnn()))
    assert [(r.name, tuple(r.index.shape)) for r in convs] == [("2.weight", (6, 4, 9)), ("5.weight", (5, 6, 4))]


@pytest.mark.parametrize("model", [mlp(8, 6, 5, 3), cnn()], ids=["mlp", "cnn"])
def test_relations_hold_exactly_their_entries(model):
    """Each relation's index reads the parameter's entries from the tokens, edge by edge."""
    tok = tokenizer_of(model, chunk_size=16)   # rows longer than 16 are cut into pieces
    params = torch.randn(2, tok.num_params)
    flat = tok.tokenize(params).flatten(1)    # [N, T*C]
    for rel in find_relations(tok):
        w = tok.layer_shapes.split(params)[rel.name]   # [N, A, B * block, *kernel]
        assert torch.equal(flat[:, rel.index], w.reshape(2, *rel.index.shape[:2], -1))   # [N, A, B, F]
        again = Relation.from_json(rel.to_json())
        assert all(torch.equal(getattr(again, k), getattr(rel, k)) for k in ("rows", "cols", "index"))


def dit_for(tok, relations, seed=0, **kw):
    torch.manual_seed(seed)
    model = ParameterDiT(tok.num_tokens, tok.token_dim, tok.token_layer_ids, hidden_size=32, depth=2, num_heads=4,
                         token_mask=tok.mask, relations=relations, edge_size=8, **kw)
    with torch.no_grad():   # random values in the zero-initialized layers, so outputs depend on inputs
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("chunk_size", [256, 4], ids=["whole-rows", "pieces"])
@pytest.mark.parametrize("model", [mlp(8, 6, 5, 3), cnn()], ids=["mlp", "cnn"])
def test_edges_make_the_dit_equivariant(model, chunk_size):
    tok, spec = tokenizer_of(model, chunk_size), infer_permutation_spec(model)
    g = torch.Generator().manual_seed(0)
    x, start = torch.randn(3, tok.num_params, generator=g), torch.randn(3, tok.num_params, generator=g)
    perms = random_permutations(3, spec, generator=g)
    t, metrics = torch.tensor([10, 500, 900]), torch.rand(3, generator=g)

    def run(dit, x, start):
        return tok.detokenize(dit(tok.tokenize(x), t, tok.tokenize(start), metrics, metrics))

    def error(dit):
        moved = run(dit, apply_permutations(x, spec, perms), apply_permutations(start, spec, perms))
        return (moved - apply_permutations(run(dit, x, start), spec, perms)).abs().max().item()

    relations = [r.to_json() for r in find_relations(tok)]
    assert error(dit_for(tok, relations)) < 1e-5
    assert error(dit_for(tok, None)) > 1e-3   # a linear map over a row of layer-1 units is not


def test_config_rebuilds_and_untrained_edges_predict_zero():
    tok = tokenizer_of(mlp(8, 6, 5, 3))
    relations = [r.to_json() for r in find_relations(tok)]
    model = ParameterDiT(tok.num_tokens, tok.token_dim, tok.token_layer_ids, hidden_size=32, depth=2, num_heads=4,
                         token_mask=tok.mask, relations=relations, edge_size=8)
    again = ParameterDiT(**model.config())
    again.load_state_dict(model.state_dict())
    x = torch.randn(2, tok.num_tokens, tok.token_dim) * tok.mask
    args = (x, torch.tensor([3, 700]), x, torch.rand(2), torch.rand(2))
    assert torch.equal(model(*args), again(*args)) and (model(*args) == 0).all()
    bad = [{**relations[0], "index": [[[10 ** 6]]]}]
    with pytest.raises(ValueError, match="outside"):
        ParameterDiT(tok.num_tokens, tok.token_dim, tok.token_layer_ids, hidden_size=32, depth=2, num_heads=4,
                     relations=bad)


def test_the_edges_carry_the_hidden_entries_into_the_model():
    """The per-token projections do not see the relations' entries, so they must reach the output as edges:
    changing only those entries of x_t changes the prediction."""
    tok = tokenizer_of(mlp(8, 6, 5, 3))
    (rel,) = find_relations(tok)
    model = dit_for(tok, [rel.to_json()])
    g = torch.Generator().manual_seed(0)
    x, start = (torch.randn(2, tok.num_tokens, tok.token_dim, generator=g) * tok.mask for _ in range(2))
    moved = x.flatten(1).clone()
    moved[:, rel.index.flatten()] += 1.0
    args = (torch.tensor([5, 500]), start, torch.rand(2, generator=g), torch.rand(2, generator=g))
    assert not torch.allclose(model(x, *args), model(moved.view_as(x), *args))
