"""Two hidden layers end to end: a real two-layer digits store, `gpt-params train` with the weights between
the hidden layers as edges and the function-space loss, then a generator loaded from its checkpoint."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

from checkpoints_dataset import get_task
from checkpoints_dataset.population import PopulationConfig, build_population
from gpt_params.cli import main
from gpt_params.core import Generator
from gpt_params.training.module import FunctionLoss, GeneratorModule
from tests.conftest import train_args


@pytest.fixture(scope="module")
def two_layer_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores") / "digits_2layer"
    config = PopulationConfig(runs=16, epochs=2, seed=0, group_size=16, num_checkpoints=6)
    build_population(get_task("digits_mlp", hidden=[16, 12]), root, config, progress=False)
    return root


def test_network_outputs_are_the_networks_outputs():
    task = get_task("digits_mlp", hidden=[16, 12])
    params = task.init_params(3, torch.Generator().manual_seed(0))
    x = task.probe_inputs()
    assert x.shape == (task.probe_size, 64)
    out = task.network_outputs(params, x)                                  # [K, B, 10]
    for k in range(3):
        model = task.build_model()
        model.load_state_dict(task.to_state_dict(params[k]))
        assert torch.allclose(out[k], model(x), atol=1e-5)


def test_function_loss_is_zero_on_the_target_and_has_gradients():
    task = get_task("digits_mlp", hidden=[16, 12])
    g = torch.Generator().manual_seed(0)
    target = task.init_params(4, g)
    loss = FunctionLoss(task, weight=2.0)
    assert loss(target, target).item() == 0.0
    predicted = (target + 0.1 * torch.randn(target.shape, generator=g)).requires_grad_()
    value = loss(predicted, target)
    value.backward()
    assert value.item() > 0 and predicted.grad.abs().sum() > 0
    assert FunctionLoss(task, 1.0)(predicted, target).item() == pytest.approx(value.item() / 2, rel=1e-5)
    # fewer probe inputs: 8 of them drawn once at random (seed 0, whatever torch's global state), every call
    few = FunctionLoss(task, 1.0, probes=8)
    drawn = task.probe_inputs()[torch.randperm(task.probe_size, generator=torch.Generator().manual_seed(0))[:8]]
    want = task.network_outputs(target, drawn)
    got = task.network_outputs(predicted.detach(), drawn)
    expected = ((got - want) ** 2 / want.var(dim=(1, 2), keepdim=True)).mean()
    for seed in (3, 4):
        torch.manual_seed(seed)
        assert few(predicted.detach(), target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(few.probe_batch(target.device), drawn) and not torch.equal(drawn, task.probe_inputs()[:8])


def test_function_loss_needs_clean_predictions_in_parameter_space(tiny_digits_store):
    from gpt_params.training.data import ParameterDataModule

    info = ParameterDataModule(root=str(tiny_digits_store)).info
    with pytest.raises(ValueError, match="prediction x0 or v"):
        GeneratorModule(info, prediction="epsilon", function_loss=1.0)
    GeneratorModule(info, prediction="v", function_loss=1.0)   # v gives clean predictions too
    with pytest.raises(ValueError, match=">= 0"):
        GeneratorModule(info, function_loss=-1.0)
    with pytest.raises(ValueError, match="function_probes must be at least 1"):
        GeneratorModule(info, function_probes=0)


def test_train_with_edges_and_function_loss(two_layer_store, tmp_path):
    printed = io.StringIO()
    args = train_args(two_layer_store, tmp_path, steps=6, extra=["--model.dit.relations", "edges",
                                                               "--model.function_loss", "1.0",
                                                               "--model.function_probes", "16"])
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0, printed.getvalue()[-3000:]
    (ckpt,) = tmp_path.glob("**/last.ckpt")
    gen = Generator.load(ckpt)
    assert gen.config.dit.relations == "edges" and gen.model.num_relations == 1   # the 16 x 12 weights
    task = get_task("digits_mlp", hidden=[16, 12])
    starts = task.init_params(2, torch.Generator().manual_seed(1))
    out = gen.generate(starts, 0.9, 0.1, steps=2)
    assert out.shape == starts.shape and torch.isfinite(out).all()

