"""Parameter vectors, tasks (digits, Fashion-MNIST reader and download helper), get_task errors."""
from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoints_dataset import float_layer_shapes, get_task, state_dict_to_vector, vector_to_state_dict
from checkpoints_dataset.params import check_params, count_params
from checkpoints_dataset.tasks import ClassificationTask, Task
from checkpoints_dataset.tasks.fashion import FashionTask, download_fashion_mnist, read_idx
from tests.helpers import fake_fashion



def _bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_vector_round_trip_with_batchnorm_loads_strictly():
    model = _bn_cnn()
    with torch.no_grad():  # non-default running stats, so they must travel through the vector
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    shapes = float_layer_shapes(model)
    assert "1.num_batches_tracked" not in shapes and "1.running_var" in shapes
    vec = state_dict_to_vector(model.state_dict(), shapes)
    assert vec.shape == (count_params(shapes),)
    other = _bn_cnn()
    other.load_state_dict(vector_to_state_dict(vec, other), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(model.eval()(x), other.eval()(x))


def test_vector_errors_name_the_problem():
    model = _bn_cnn()
    with pytest.raises(ValueError, match=r"\[K, 52\]"):
        check_params(torch.zeros(3, 50), 52)
    with pytest.raises(ValueError, match="floating-point"):
        check_params(torch.zeros(52, dtype=torch.int64), 52)
    with pytest.raises(KeyError, match="missing"):
        state_dict_to_vector({"0.weight": torch.zeros(4, 1, 3, 3)}, float_layer_shapes(model))


def _plain_metrics(task: ClassificationTask, vec: torch.Tensor, split: str) -> tuple[float, float]:
    model = task.build_model()
    model.load_state_dict(task.to_state_dict(vec), strict=True)
    x, y = task.split(split)
    with torch.no_grad():
        logits = model.eval()(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) != y).float().mean().item()


def test_digits_splits_and_metrics_match_a_plain_model():
    task = get_task("digits_mlp")
    sizes = {s: len(task.split(s)[1]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["train"] == 1078
    x, y = task.split("val")
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1] == 64 and x.max() <= 1
    assert torch.equal(get_task("digits_mlp").split("test")[0], task.split("test")[0])  # deterministic
    params = task.init_params(3, torch.Generator().manual_seed(0))
    params[2] *= 4  # a non-trivial network
    scores = task.evaluate(params)
    assert list(scores) == list(task.metric_names) and all(v.shape == (3,) for v in scores.values())
    for k in range(3):
        for split in ("val", "test"):
            loss, err = _plain_metrics(task, params[k], split)
            assert scores[f"{split}_error"][k].item() == pytest.approx(err, abs=1e-7)
            assert scores[f"{split}_loss"][k].item() == pytest.approx(loss, rel=1e-5)
        assert scores["train_loss"][k].item() == pytest.approx(_plain_metrics(task, params[k], "train")[0], rel=1e-5)
    with pytest.raises(ValueError, match="2410"):
        task.evaluate(torch.zeros(2, 100))


def test_init_schemes_are_seeded():
    task = get_task("digits_mlp")
    a = task.init_params(2, torch.Generator().manual_seed(1))
    assert torch.equal(a, task.init_params(2, torch.Generator().manual_seed(1)))
    assert not torch.equal(a[0], a[1])
    ortho = task.init_params(1, torch.Generator().manual_seed(1), scheme="orthogonal")
    w = task.to_state_dict(ortho[0])["0.weight"]  # [32, 64]: orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
    with pytest.raises(ValueError, match="init scheme"):
        task.init_params(1, scheme="lecun")


class _TinyTask(Task):
    name = "tiny"

    def build_model(self):
        return nn.Linear(2, 2)


def test_get_task_errors_and_import_paths():
    with pytest.raises(ValueError, match="digits_mlp.*fashion_cnn"):
        get_task("mnist_mlp")
    with pytest.raises(ValueError, match="cannot import"):
        get_task("no_such_pkg.mod:Task")
    with pytest.raises(ValueError, match="no attribute"):
        get_task("tests.test_tasks:Missing")
    with pytest.raises(ValueError, match="not a checkpoints_dataset.Task"):
        get_task("collections:OrderedDict")
    assert get_task("tests.test_tasks:_TinyTask").num_params == 6


def test_fashion_idx_reader_and_tasks_on_small_files(tmp_path):
    files = fake_fashion(tmp_path)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), files["t10k-images-idx3-ubyte.gz"])
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad.gz")
    for arch in ("mlp", "cnn", "cnn_bn"):
        task = get_task(f"fashion_{arch}", data_dir=tmp_path, val_size=10, eval_size=8)
        x, y = task.split("train")
        assert len(y) == 30 and x.shape[1:] == ((784,) if arch == "mlp" else (1, 28, 28)) and x.max() <= 1
        assert len(task.split("val")[1]) == 8 and len(task.split("test")[1]) == 8
        scores = task.evaluate(task.init_params(2, torch.Generator().manual_seed(0)))
        assert all(v.shape == (2,) and torch.isfinite(v).all() for v in scores.values())
    assert get_task("fashion_cnn", data_dir=tmp_path).num_params == 16 * 9 + 32 * 16 * 9 + 330


def test_fashion_data_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    fake_fashion(tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert FashionTask("mlp", val_size=10).data_dir == tmp_path
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="set FASHION_MNIST_DIR=DIR"):
        FashionTask("mlp")


def test_fashion_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*download_fashion_mnist"):
        FashionTask("mlp", data_dir=tmp_path)


def test_download_helper_checks_checksums(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    fake_fashion(src)
    sums = {p.name: hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest() for p in src.iterdir()}
    download_fashion_mnist(dest, base_url=src.as_uri(), checksums=sums)
    assert len(get_task("fashion_mlp", data_dir=dest, val_size=10).split("train")[1]) == 30
    wrong = dict(sums, **{"t10k-labels-idx1-ubyte.gz": "0" * 64})
    (dest / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="checksum mismatch for t10k-labels"):
        download_fashion_mnist(dest, base_url=src.as_uri(), checksums=wrong)
    assert not (dest / "t10k-labels-idx1-ubyte.gz").exists() and not list(dest.glob(".*"))


def test_digits_hidden_takes_a_width_or_a_list_of_widths():
    one, two = get_task("digits_mlp"), get_task("digits_mlp", hidden=[32, 16])
    assert list(one.layer_shapes) == ["0.weight", "0.bias", "2.weight", "2.bias"] and one.build_options() == {}
    assert dict(two.layer_shapes)["2.weight"] == (16, 32) and two.build_options() == {"hidden": [32, 16]}
    assert [g.size for g in two.permutation_spec.groups] == [32, 16]
    assert get_task("digits_mlp", hidden=[32]).build_options() == {}     # [32] is the default width
    with pytest.raises(ValueError, match="hidden must be"):
        get_task("digits_mlp", hidden=[])
