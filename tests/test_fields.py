"""Neural-field tasks (issue 18): the population fits its images, metrics match known cases, renders, stores."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from checkpoints_dataset import get_task, open_store
from checkpoints_dataset.population import PopulationConfig, build_population, draw_hparams
from checkpoints_dataset.tasks.fields import FourierFeatures, grid, psnr, sharpness
from tests.helpers import fake_fashion


@pytest.fixture(scope="module")
def field():
    return get_task("digits_field")


def constant_field(task, value: float) -> torch.Tensor:
    """The parameters of a network whose field is ``value`` everywhere (only the output bias is set)."""
    params = torch.zeros(task.num_params)
    shapes = task.layer_shapes
    last_bias = list(shapes)[-1]
    params[shapes.slices[last_bias]] = value
    return params


def test_the_network_is_about_2k_parameters_and_the_fourier_features_are_not_among_them(field):
    assert 2000 <= field.num_params <= 2500
    assert not any("freqs" in name for name in field.layer_shapes)
    model = field.build_model()
    assert isinstance(model[0], FourierFeatures) and "0.freqs" not in model.state_dict()
    assert torch.equal(model[0].freqs, field.build_model()[0].freqs)   # the same in every network
    spec = field.permutation_spec                                      # inferred through the encoding
    assert [g.size for g in spec.groups] == [32, 32]


def test_metrics_of_known_fields(field):
    pool, labels = field.pool
    assert pool.shape == (200, 8, 8) and torch.equal(torch.bincount(labels), torch.full((10,), 20))
    half = constant_field(field, 0.5)
    out = field.evaluate(torch.stack([half, constant_field(field, 2.0)]))
    mse = ((pool.flatten(1) - 0.5) ** 2).mean(1)                       # [M]
    assert out["psnr"][0] == pytest.approx(float(-10 * torch.log10(mse.min())), abs=1e-4)
    assert out["label"][0] == labels[mse.argmin()]
    assert out["sharpness"].tolist() == [0.0, 0.0]                     # flat fields
    white = ((pool.flatten(1) - 1.0) ** 2).mean(1)                     # 2.0 is clamped to white
    assert out["psnr"][1] == pytest.approx(float(-10 * torch.log10(white.min())), abs=1e-4)
    assert float(psnr(torch.tensor(0.01))) == pytest.approx(20.0)
    ramp = torch.linspace(0, 1, 5)[None, None].expand(1, 5, 5)         # +0.25 per pixel along x
    assert float(sharpness(ramp)) == pytest.approx(0.25)


def test_the_population_fits_its_images_and_records_them(field, tmp_path):
    config = PopulationConfig(runs=10, epochs=3, num_checkpoints=4, group_size=10, optimizers=("adam",),
                              lr=(3e-3, 1e-2))
    store = build_population(field, tmp_path / "store", config, progress=False)
    final = store.metrics(store.run_checkpoints(0)[-1:])
    psnrs = np.array([store.metrics(store.run_checkpoints(r))["psnr"][-1] for r in range(10)])
    inits = np.array([store.metrics(store.run_checkpoints(r))["psnr"][0] for r in range(10)])
    assert np.median(psnrs) > 30 and np.all(psnrs > inits + 10), (inits, psnrs)
    for r in range(10):
        h = store.run_hparams(r)
        assert h["label"] == r % 10 and int(field.pool[1][h["image"]]) == h["label"]
        fitted = store.params(store.run_checkpoints(r)[-1:])
        assert int(field.evaluate(torch.as_tensor(np.asarray(fitted, np.float32)))["label"][0]) == h["label"]
    assert set(final) == {"psnr", "label", "sharpness"}


def test_a_shared_init_starts_every_run_from_the_same_network():
    task = get_task("digits_field", init="shared")
    assert task.build_options() == {"init": "shared"}
    config = PopulationConfig(runs=3, epochs=1, num_checkpoints=2)
    hparams = [draw_hparams(config, r) for r in range(3)]
    result = task.train_population(hparams, config, torch.device("cpu"))
    assert torch.equal(result.params[0, 0], result.params[1, 0]) and torch.equal(result.params[0, 0], result.params[2, 0])
    assert not torch.equal(result.params[0, -1], result.params[1, -1])


def test_renders_are_fine_grids_of_uint8(field):
    img = field.render(torch.stack([constant_field(field, 0.5), constant_field(field, -1.0)]), size=56)
    assert img.shape == (2, 56, 56, 3) and img.dtype == torch.uint8
    assert (img[0] == 128).all() and (img[1] == 0).all()
    assert grid(4).shape == (16, 2) and grid(4).abs().max() < 1


def test_fashion_field_on_fashion_shaped_files(tmp_path):
    fake_fashion(tmp_path, n_train=200, n_test=30)
    task = get_task("fashion_field", data_dir=tmp_path, pool_per_class=5, hidden=[32, 32, 32])
    assert task.pool[0].shape == (50, 28, 28) and task.size == 28
    assert task.build_options() == {"hidden": [32, 32, 32], "pool_per_class": 5}
    out = task.evaluate(task.init_params(2, torch.Generator().manual_seed(0)))
    assert out["psnr"].shape == (2,) and torch.isfinite(out["psnr"]).all()


@pytest.mark.parametrize("bad", [dict(hidden=[]), dict(hidden=[0]), dict(init="zeros"), dict(features=0),
                                 dict(pool_per_class=1000)])
def test_bad_options_name_the_problem(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "pool" not in next(iter(bad)) else "pool_per_class"):
        get_task("digits_field", **bad).pool


def test_a_missing_fashion_directory_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        get_task("fashion_field", data_dir=tmp_path / "none")
    assert math.isfinite(float(psnr(torch.tensor(0.0))))


# ------------------------------------------------------------------ 3-D: shapes_occupancy

@pytest.fixture(scope="module")
def shapes():
    return get_task("shapes_occupancy", per_type=4, points=1024)


def test_shape_occupancy_of_known_points():
    from checkpoints_dataset.tasks.shapes import TYPES, inside

    origin, corner = torch.zeros(1, 3), torch.ones(1, 3)
    for kind in TYPES:
        assert not inside(kind, corner).item()
        assert inside(kind, origin).item() == (kind != "torus")   # the torus has a hole in the middle
    assert inside("torus", torch.tensor([[0.7, 0.0, 0.0]])).item()
    with pytest.raises(ValueError, match="unknown shape type"):
        inside("pyramid", origin)


def test_shapes_metrics_of_a_full_cube_and_renders(shapes):
    pool = shapes.pool
    assert pool["grids"].shape == (24, 32 ** 3) and pool["types"].tolist() == sum(([t] * 4 for t in range(6)), [])
    assert pool["points"].shape == (24, 1024, 3) and 0.2 < float(pool["labels"].mean()) < 0.5   # near + uniform
    full = constant_field(shapes, 10.0)                                  # logit 10 everywhere: all inside
    out = shapes.evaluate(full[None])
    fractions = pool["grids"].float().mean(1)                            # IoU with the full cube = volume
    assert out["iou"].item() == pytest.approx(float(fractions.max()), abs=1e-5)
    assert out["type"].item() == pool["types"][fractions.argmax()].item()
    img = shapes.render(torch.stack([full, constant_field(shapes, -10.0)]), size=32)
    assert img.shape == (2, 32, 32, 3) and img.dtype == torch.uint8
    assert (img[1] == 255).all() and (img[0] < 255).all()                # empty: white; full: shaded everywhere


def test_the_shapes_population_fits_its_shapes(shapes):
    config = PopulationConfig(runs=6, epochs=3, num_checkpoints=3, optimizers=("adam",), lr=(5e-3, 1e-2))
    hparams = [draw_hparams(config, r) for r in range(6)]
    result = shapes.train_population(hparams, config, torch.device("cpu"))
    assert [h["type"] for h in hparams] == list(range(6))
    assert all(int(shapes.pool["types"][h["shape"]]) == h["type"] for h in hparams)
    iou = result.metrics["iou"]
    assert float(iou[:, -1].median()) > 0.7 and (iou[:, -1] > iou[:, 0]).all(), iou
    assert (result.metrics["type"][:, -1] == torch.arange(6).float()).float().mean() >= 5 / 6


@pytest.mark.parametrize("config", ["fashion_field.yaml", "fashion_field_class.yaml"])
def test_the_field_configs_run_end_to_end_at_reduced_size(config, tmp_path):
    """configs/fashion_field*.yaml as shipped (Adam-only store built by `train`; the class config start-free with
    the label as a condition part and a shared init), at reduced size on Fashion-shaped files the test writes."""
    from pathlib import Path

    from gpt_params import Generator
    from gpt_params.cli import main
    from tests.conftest import train_args

    (tmp_path / "fashion").mkdir()
    fake_fashion(tmp_path / "fashion", n_train=600, n_test=30)   # at least 20 images of every class
    path = Path(__file__).resolve().parents[1] / "configs" / config
    store = tmp_path / "store"
    args = ["train", "--config", str(path), "--data.root", str(store), "--data.data_dir", str(tmp_path / "fashion"),
            "--data.build_runs", "10", "--data.build_epochs", "1", "--data.build_checkpoints", "3",
            "--data.batch_size", "4"]
    assert main(args + train_args(store, tmp_path / "run", steps=2)[1:]) == 0
    manifest = open_store(store).manifest
    assert manifest["build_config"]["optimizers"] == ["adam"] and manifest["build_config"]["lr"] == [0.001, 0.01]
    gen = Generator.load(next((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt")))
    assert gen.metric == "psnr"
    if config == "fashion_field_class.yaml":
        assert not gen.uses_start and [p.name for p in gen.parts] == ["label"]
        assert manifest["build_config"]["task_options"] == {"init": "shared"}
        out = gen.generate(None, None, torch.tensor([40.0, 40.0]), parts={"label": 3})
        assert out.shape == (2, gen.tokenizer.num_params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["digits_field", "shapes_occupancy"])
def test_fields_train_score_and_render_on_cuda(name):
    """The encodings' fixed frequencies (non-persistent buffers) follow the parameters to the device."""
    task = get_task(name, **({"per_type": 2, "points": 256} if name == "shapes_occupancy" else {}))
    config = PopulationConfig(runs=2, epochs=1, num_checkpoints=2, optimizers=("adam",))
    hparams = [draw_hparams(config, r) for r in range(2)]
    result = task.train_population(hparams, config, torch.device("cuda"))
    on_gpu = result.params[:, -1].cuda()
    cpu, gpu = task.evaluate(result.params[:, -1]), task.evaluate(on_gpu, device="cuda")
    assert all(torch.allclose(cpu[k], gpu[k], atol=1e-3) for k in cpu)
    assert task.render(on_gpu, size=16).shape == (2, 16, 16, 3)


def test_the_shapes_config_runs_end_to_end_at_reduced_size(tmp_path):
    """configs/shapes_occupancy.yaml as shipped (start-free, shared init, the shape type as a condition part),
    at reduced size: 8 runs of 100 steps, a tiny DiT, 2 steps; then `denoise` draws the shapes."""
    import json
    from pathlib import Path

    from gpt_params import Generator
    from gpt_params.cli import main
    from tests.conftest import train_args

    path = Path(__file__).resolve().parents[1] / "configs" / "shapes_occupancy.yaml"
    store = tmp_path / "store"
    args = ["train", "--config", str(path), "--data.root", str(store), "--data.build_runs", "8",
            "--data.build_epochs", "1", "--data.build_checkpoints", "3", "--data.batch_size", "4",
            "--data.task_options", "{init: shared, per_type: 2, points: 512}"]
    assert main(args + train_args(store, tmp_path / "run", steps=2)[1:]) == 0
    ckpt = next((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    gen = Generator.load(ckpt)
    assert gen.metric == "iou" and not gen.uses_start and [(p.name, p.classes) for p in gen.parts] == [("type", 6)]
    out = tmp_path / "d"
    assert main(["denoise", "--ckpt", str(ckpt), "--target", "0.9", "--label", "type=2", "--num", "2",
                 "--steps", "2", "--size", "32", "--out", str(out)]) == 0
    assert json.loads((out / "trajectory.json").read_text())["parts"] == {"type": 2.0}
    from gpt_params.evaluation.samples import samples

    opened = open_store(store)
    result, fig = samples(gen, gen.make_task(), opened, opened.test_runs, per_class=1)
    assert result["num_generated"] == 6 and 0.0 <= result["label_accuracy"] <= 1.0 and result["metric"] == "iou"
    assert 0.0 <= result["metric_80pct"] <= result["metric_median"] <= 1.0   # IoU: higher is better
    assert "copy_fraction" not in result and len(fig.axes) == 6              # no images: no pixel measures
