"""The Fashion tasks through the whole pipeline: a task's architecture options survive the round trip store ->
checkpoint -> prompt -> evaluate (issue 17), and configs/fashion_cnn.yaml runs end to end (issue 16).

Fashion-MNIST-shaped random files written by the test stand in for the real data, so this runs everywhere;
the stores are real builds (``fashion_mlp`` at a non-default width, ``fashion_cnn``) at reduced size."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_dataset import get_task, open_store
from gpt_params import Generator
from gpt_params.cli import main
from tests.conftest import train_args
from tests.helpers import config_args, fake_fashion

OPTIONS = {"hidden": 8, "val_size": 40, "eval_size": 30}   # 784-8-10: 6,370 parameters, not the default 25,450


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    data = tmp_path_factory.mktemp("fashion")
    fake_fashion(data, n_train=200, n_test=30)
    store = tmp_path_factory.mktemp("stores") / "fashion_mlp_8"
    rc = main(["build-dataset", "--task", "fashion_mlp", "--data-dir", str(data), "--out", str(store),
               "--runs", "12", "--epochs", "2", "--checkpoints", "4", "--group-size", "12", "--no-progress",
               *[f"--task-option={k}={v}" for k, v in OPTIONS.items()]])
    assert rc == 0
    return store, data


def test_fashion_records_its_options_and_only_those_that_differ(tmp_path):
    fake_fashion(tmp_path)
    assert get_task("fashion_mlp", data_dir=tmp_path).build_options() == {}
    assert get_task("fashion_mlp", data_dir=tmp_path, hidden=1280, eval_size=None).build_options() == {
        "hidden": 1280, "eval_size": None}
    for arch, hidden in (("fashion_cnn", 64), ("fashion_mlp", [32, 32]), ("fashion_mlp", 0)):
        with pytest.raises(ValueError, match="fashion_mlp only"):
            get_task(arch, data_dir=tmp_path, hidden=hidden)


def test_a_non_default_width_survives_store_checkpoint_prompt_and_evaluate(wide_store, tmp_path):
    store, data = wide_store
    manifest = open_store(store).manifest
    assert manifest["build_config"]["task_options"] == OPTIONS
    width = get_task("fashion_mlp", data_dir=data, **OPTIONS).num_params
    assert manifest["build_config"]["num_params"] == width == 784 * 8 + 8 + 8 * 10 + 10

    # train names neither the task nor its options: both come from the store (the final alignment scores them)
    assert main(train_args(store, tmp_path / "run", steps=4, extra=["--data.data_dir", str(data), "--data.batch_size", "4"])) == 0
    ckpt = next((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    gen = Generator.load(ckpt)
    assert gen.info.task == "fashion_mlp" and gen.info.task_kwargs["hidden"] == 8
    assert gen.make_task().num_params == width

    assert main(["prompt", "--ckpt", str(ckpt), "--target", "0.9", "--num", "2", "--out", str(tmp_path / "p")]) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    net = load_file(str(tmp_path / "p" / results["records"][0]["file"]))
    assert tuple(net["1.weight"].shape) == (8, 784) and tuple(net["3.weight"].shape) == (10, 8)
    assert 0 <= results["records"][0]["achieved"]["val_error"] <= 1      # scored by the 784-8-10 network

    assert main(["evaluate", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--runs", "2"]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["prompt_alignment"]["num_networks"] > 0


def test_the_fashion_cnn_config_runs_end_to_end_at_reduced_size(tmp_path):
    """configs/fashion_cnn.yaml as shipped (store built by `train`, function loss on 32 probes, edges between the
    conv channels), at reduced size: 12 runs on the test's own small files, a tiny DiT, 3 steps."""
    store = tmp_path / "store"
    args = config_args(tmp_path, "fashion_cnn", fashion=True) + [
        "--data.build_runs", "12", "--data.build_checkpoints", "4",
        "--data.task_options", "{val_size: 40, eval_size: 30}", "--data.batch_size", "4"]
    args += train_args(store, tmp_path / "run", steps=3)[1:]     # tiny model, 3 steps, quiet
    assert main(args) == 0
    manifest = open_store(store).manifest
    assert manifest["task"] == "fashion_cnn" and manifest["build_config"]["epochs"] == 1
    assert manifest["build_config"]["num_checkpoints"] == 4
    ckpt = next((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    gen = Generator.load(ckpt)
    assert gen.model.num_relations == 1          # conv2's 3x3 kernels, between its 32 and conv1's 16 channels
    task = gen.make_task()
    out = gen.generate(task.init_params(2, torch.Generator().manual_seed(0)), 0.9, 0.5)
    assert out.shape == (2, task.num_params)


def test_the_million_parameter_fashion_mlp_tokenizes_exactly(tmp_path):
    """fashion_mlp with hidden=1280 (784-1280-10, issue 17's million-parameter target): one token per hidden
    unit (its 784 inputs, its bias and its 10 outgoing weights) and one for the output bias, every value
    placed once, and the round trip exact."""
    from gpt_params.core.tokenizer import ParameterTokenizer

    fake_fashion(tmp_path)
    task = get_task("fashion_mlp", data_dir=tmp_path, hidden=1280)
    assert task.num_params == 784 * 1280 + 1280 + 1280 * 10 + 10 == 1_017_610
    tok = ParameterTokenizer(task.layer_shapes, layout="neuron", chunk_size=2048, spec=task.permutation_spec)
    assert tok.num_tokens == 1280 + 1 and tok.token_dim == 784 + 1 + 10
    params = task.init_params(2, torch.Generator().manual_seed(0))     # [2, 1,017,610]
    tokens = tok.tokenize(params)                                       # [2, 1281, 795]
    assert tokens.shape == (2, 1281, 795) and int(tok.mask.sum()) == task.num_params
    assert torch.equal(tok.detokenize(tokens), params)


def test_the_million_parameter_config_runs_end_to_end_at_reduced_size(tmp_path):
    """configs/fashion_mlp_1m.yaml as shipped, the 784-1280-10 network included (float16 store built by `train` in
    groups, residual DiT with window attention over its 1,281 tokens), at reduced size: 8 runs on the test's
    own small files, a tiny DiT, 2 steps; then `prompt` writes loadable 1M-parameter networks."""
    import numpy as np

    store = tmp_path / "store"
    args = config_args(tmp_path, "fashion_mlp_1m", fashion=True) + [
        "--data.build_runs", "8", "--data.build_checkpoints", "3", "--data.build_group_size", "4",
        "--data.task_options", "{hidden: 1280, val_size: 40, eval_size: 30}", "--data.batch_size", "2"]
    args += train_args(store, tmp_path / "run", steps=2)[1:]
    args += ["--model.dit.hidden_size", "32", "--model.dit.num_heads", "2"]   # the config's own are wider
    assert main(args) == 0
    manifest = open_store(store).manifest
    assert manifest["dtype"] == "float16" and manifest["build_config"]["group_size"] == 4
    assert manifest["build_config"]["num_params"] == 1_017_610
    assert len(list((store / "shards").glob("*.params.npy"))) == 2
    assert np.load(next((store / "shards").glob("*.params.npy")), mmap_mode="r").dtype == np.float16
    ckpt = next((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    gen = Generator.load(ckpt)
    assert gen.config.dit.attention == "window" and gen.config.dit.residual and gen.config.chunk_size == 1024
    assert gen.tokenizer.num_tokens == 1281

    assert main(["prompt", "--ckpt", str(ckpt), "--target", "0.5", "--num", "2", "--out", str(tmp_path / "p")]) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    net = load_file(str(tmp_path / "p" / results["records"][0]["file"]))
    assert tuple(net["1.weight"].shape) == (1280, 784) and tuple(net["3.weight"].shape) == (10, 1280)
    assert sum(v.numel() for v in net.values()) == 1_017_610
