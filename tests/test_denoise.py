"""`gpt-params denoise` (issue 18): every step's prediction drawn into a GIF and a strip, end to end at tiny size."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from checkpoints_dataset import get_task
from gpt_params.cli import main
from gpt_params.evaluation.denoise import log_spaced, weight_tiles
from tests.conftest import refused, train_args


@pytest.fixture(scope="module")
def field_ckpt(tiny_field_store, tmp_path_factory):
    """A generator trained for 4 steps on the tiny digits_field store."""
    root = tmp_path_factory.mktemp("field")
    assert main(train_args(tiny_field_store, root / "run", steps=4, extra=["--data.batch_size", "4"])) == 0
    return next((root / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))


def test_denoise_writes_the_animation_the_strip_and_the_trajectory(field_ckpt, tmp_path):
    out = tmp_path / "d"
    assert main(["denoise", "--ckpt", str(field_ckpt), "--target", "30", "--num", "3", "--steps", "5",
                 "--sampler", "ddim", "--size", "24", "--out", str(out)]) == 0
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["metric"] == "psnr" and traj["steps"] == 5 and len(traj["values"]) == 5
    assert all(len(v) == 3 for v in traj["values"]) and traj["timesteps"][0] == 999
    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 3 and all((out / r["file"]).exists() for r in results["records"])
    # the last step's prediction is the generated network: its metric is the one results.json reports
    assert traj["values"][-1] == pytest.approx([r["achieved"]["psnr"] for r in results["records"]], abs=1e-3)
    with Image.open(out / "denoise.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (3 * 24 + 2 * 2, 24 + 14)
    with Image.open(out / "denoise.png") as png:
        assert png.size[0] > 100 and png.size[1] > 100


def test_denoise_refuses_several_targets_and_existing_results(field_ckpt, tmp_path, capsys):
    err = refused(["denoise", "--ckpt", str(field_ckpt), "--target", "20", "--target", "30", "--out",
                   str(tmp_path / "a")], capsys)
    assert "one --target" in err
    out = tmp_path / "b"
    assert main(["denoise", "--ckpt", str(field_ckpt), "--target", "30", "--num", "1", "--steps", "2",
                 "--out", str(out)]) == 0
    assert "--overwrite" in refused(["denoise", "--ckpt", str(field_ckpt), "--target", "30", "--out", str(out)], capsys)


def test_a_task_without_a_renderer_is_drawn_as_its_first_layer(tiny_generator_ckpt, tmp_path):
    out = tmp_path / "mlp"
    assert main(["denoise", "--ckpt", str(tiny_generator_ckpt), "--target", "0.3", "--num", "2", "--steps", "3",
                 "--columns", "2", "--out", str(out)]) == 0
    with Image.open(out / "denoise.gif") as gif:
        assert gif.n_frames == 3
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["metric"] == "val_error" and len(traj["values"]) == 3


def test_weight_tiles_and_log_spaced_steps():
    task = get_task("digits_mlp")
    img = weight_tiles(task.layer_shapes, task.init_params(2, torch.Generator().manual_seed(0)), size=48)
    assert img.shape == (2, 48, 48, 3) and img.dtype == torch.uint8 and img.float().std() > 0
    assert log_spaced(50, 6)[0] == 0 and log_spaced(50, 6)[-1] == 49 and len(log_spaced(50, 6)) <= 7
    assert log_spaced(3, 6) == [0, 1, 2]
