"""The vectorized population builder: optimizers, equivalence with lone runs, store, resume, shards."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints_dataset import PopulationConfig, build_population, get_task, open_store
from checkpoints_dataset.__main__ import main
from checkpoints_dataset.optim import adam_first, checkpoint_schedule, init_optimizer_state, optimizer_step
from checkpoints_dataset.population import draw_hparams

TINY = dict(runs=6, epochs=1, seed=3, group_size=2, num_checkpoints=5)



@pytest.fixture(scope="module")
def digits():
    return get_task("digits_mlp")


def test_population_still_exports_what_moved_to_optim():
    from checkpoints_dataset import optim, population

    for name in ("GroupResult", "checkpoint_schedule", "optimizer_step", "init_optimizer_state", "adam_first"):
        assert getattr(population, name) is getattr(optim, name) and name in population.__all__
    assert not hasattr(population, "main")  # the command line is checkpoints_dataset.__main__.main


def test_schedule_is_dense_early_and_exact():
    s = checkpoint_schedule(320, 32)
    assert len(s) == 32 and s[0] == 0 and s[-1] == 320 and all(a < b for a, b in zip(s, s[1:]))
    assert s[10] < 320 / 10  # geometric: a third of the checkpoints in the first tenth
    assert checkpoint_schedule(5, 32) == [0, 1, 2, 3, 4, 5]


def test_hparams_depend_on_seed_and_run_only():
    config = PopulationConfig(lr=(1e-3, 1e-2), optimizers=("sgd",))
    h = draw_hparams(config, 7)
    assert h == draw_hparams(PopulationConfig(lr=(1e-3, 1e-2), optimizers=("sgd",), runs=9, group_size=3), 7)
    assert h != draw_hparams(config, 8) and h != draw_hparams(PopulationConfig(seed=1, lr=(1e-3, 1e-2)), 7)
    assert 1e-2 <= h["lr"] <= 1e-1 and h["optimizer"] == "sgd"  # sgd_lr_scale 10


def test_vectorized_optimizers_match_torch_optim():
    torch.manual_seed(0)
    R, P = 3, 7
    p0, grads = torch.randn(R, P), torch.randn(4, R, P)
    lr, wd, mom = torch.tensor([1e-2, 3e-2, 5e-2]), torch.tensor([0.0, 1e-2, 1e-1]), torch.tensor([0.9, 0.8, 0.85])
    is_adam = torch.tensor([True, False, True])
    state, p = init_optimizer_state(p0), p0.clone()
    for g in grads:
        p = optimizer_step(p, g.clone(), state, is_adam, lr, wd, mom)   # grads are scratch
    for r in range(R):
        w = torch.nn.Parameter(p0[r].clone())
        opt = (torch.optim.AdamW([w], lr=lr[r].item(), betas=(mom[r].item(), 0.999), weight_decay=wd[r].item())
               if is_adam[r] else torch.optim.SGD([w], lr=lr[r].item(), momentum=mom[r].item(), weight_decay=wd[r].item()))
        for g in grads:
            w.grad = g[r].clone()
            opt.step()
        torch.testing.assert_close(p[r], w.detach(), rtol=1e-5, atol=1e-6)
    # the same runs ordered Adam-first (contiguous blocks, no gather) take the same steps
    order = adam_first(is_adam)
    assert order.tolist() == [0, 2, 1]
    state, q = init_optimizer_state(p0[order]), p0[order].clone()
    for g in grads:
        q = optimizer_step(q, g[order].clone(), state, is_adam[order], lr[order], wd[order], mom[order])
    torch.testing.assert_close(q, p[order], rtol=1e-6, atol=1e-7)
    # float64 parameters with float32 hyperparameters work; a zero learning rate is refused
    d = optimizer_step(p0.double(), grads[0].double(), init_optimizer_state(p0.double()), is_adam, lr, wd, mom)
    assert d.dtype == torch.float64 and torch.isfinite(d).all()
    with pytest.raises(ValueError, match="learning rate"):
        optimizer_step(p0.clone(), grads[0].clone(), init_optimizer_state(p0), is_adam, lr * 0, wd, mom)


def test_vectorized_runs_equal_runs_trained_alone(digits):
    config = PopulationConfig(**TINY)
    hparams = [draw_hparams(config, r) for r in range(4)]
    assert {h["optimizer"] for h in hparams} == {"adam", "sgd"}
    together = digits.train_population(hparams, config, "cpu")
    assert together.params.shape == (4, len(together.steps), digits.num_params)
    assert together.steps[0] == 0 and together.epochs[-1] == config.epochs
    for r in (0, 1, 3):
        alone = digits.train_population([hparams[r]], config, "cpu")
        torch.testing.assert_close(together.params[r], alone.params[0], rtol=1e-4, atol=1e-5)
        for m in digits.metric_names:
            torch.testing.assert_close(together.metrics[m][r], alone.metrics[m][0], rtol=1e-4, atol=1e-5)
    # a plain nn.Module + torch.optim loop with the run's init and batch order reaches the same weights
    h = hparams[0]
    gen = torch.Generator().manual_seed(h["seed"])
    model = digits.build_model()
    model.load_state_dict(digits.to_state_dict(digits.init_params(1, gen)[0] * h["init_scale"]))
    opt = (torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=(h["momentum"], 0.999), weight_decay=h["weight_decay"])
           if h["optimizer"] == "adam" else
           torch.optim.SGD(model.parameters(), lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"]))
    x, y = digits.split("train")
    order = torch.randperm(len(y), generator=gen)
    for s in range(together.steps[-1]):
        idx = order[s * config.batch_size:(s + 1) * config.batch_size]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    plain = torch.cat([v.flatten() for v in model.state_dict().values()])
    torch.testing.assert_close(together.params[0, -1], plain, rtol=1e-4, atol=1e-5)


def _shard_bytes(root):
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*")) if not p.name.startswith(".")}


def test_build_resume_and_shards_give_the_same_store(digits, tmp_path):
    config = PopulationConfig(**TINY)
    store = build_population(digits, tmp_path / "full", config, progress=False)
    assert store.num_runs == 6 and store.num_checkpoints == 6 * 5 and store.task == "digits_mlp"
    first = store.run_checkpoints(4)
    assert store.steps[first].tolist() == checkpoint_schedule(16, 5)
    assert store.metrics(first)["val_error"][-1] < store.metrics(first)["val_error"][0]
    assert store.run_hparams(4) == draw_hparams(config, 4)
    reference = _shard_bytes(tmp_path / "full")
    assert len([n for n in reference if n.endswith(".index.npz")]) == 3

    # interrupted after one group, then resumed: finished groups untouched, the result bit for bit equal
    calls = {"n": 0}
    task = get_task("digits_mlp")
    original = task.train_population

    def dies_on_second_group(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    task.train_population = dies_on_second_group
    with pytest.raises(KeyboardInterrupt):
        build_population(task, tmp_path / "resumed", config, progress=False)
    partial = _shard_bytes(tmp_path / "resumed")
    assert len(partial) == 2
    build_population(get_task("digits_mlp"), tmp_path / "resumed", config, progress=False)
    resumed = _shard_bytes(tmp_path / "resumed")
    assert resumed == reference and all(resumed[k] == v for k, v in partial.items())

    # --shard i/N through the CLI: disjoint parts that open as one store equal to the full build
    args = ["--task", "digits_mlp", "--runs", "6", "--epochs", "1", "--seed", "3", "--group-size", "2",
            "--checkpoints", "5", "--out", str(tmp_path / "sharded"), "--no-progress"]
    main(["build", *args, "--shard", "1/2"])
    assert len(_shard_bytes(tmp_path / "sharded")) == 2  # group 1 only
    main([*args, "--shard", "0/2"])
    assert _shard_bytes(tmp_path / "sharded") == reference
    sharded = open_store(tmp_path / "sharded")
    assert np.array_equal(sharded.params(np.arange(30)), store.params(np.arange(30)))


def test_cli_rejects_bad_input(tmp_path, capsys):
    out = ["--out", str(tmp_path / "s")]
    for argv, message in [(["--task", "nope", *out], "unknown task 'nope'"),
                          (["--shard", "2/2", *out], "0 <= I < N"),
                          (["--task", "fashion_mlp", "--data-dir", str(tmp_path), *out], "apt-get install"),
                          (["--task-option", "trainer", *out], "must look like NAME=VALUE"),
                          (["--task-option", "trainer=es", *out], "does not take these options"),
                          (["--task", "cartpole", "--task-option", "trainer=ppo", *out], "trainer must be"),
                          (["--task", "cartpole", "--task-option", "pg_lr=(0.1, 0.01)", *out], "pg_lr must be a range")]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    main(["--runs", "2", "--epochs", "1", "--group-size", "2", "--checkpoints", "2", "--no-progress", *out])
    with pytest.raises(SystemExit) as exit_:  # same directory, another build
        main(["--runs", "2", "--epochs", "2", "--group-size", "2", "--checkpoints", "2", "--no-progress", *out])
    assert exit_.value.code == 2 and "different dataset" in capsys.readouterr().err


def test_non_finite_checkpoints_are_dropped_and_counted(digits, tmp_path):
    config = PopulationConfig(runs=2, epochs=1, group_size=2, num_checkpoints=6, lr=(1e6, 1e6), optimizers=("sgd",))
    store = build_population(digits, tmp_path / "nan", config, progress=False)
    dropped = sum(store.manifest["dropped"].values())
    assert dropped > 0 and store.num_checkpoints == 2 * 6 - dropped
    assert 0 in store.steps  # the finite initial checkpoints stay
    assert np.isfinite(store.params(np.arange(store.num_checkpoints))).all()


def test_batchnorm_statistics_recomputed_at_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    for name, arr in {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (48, 28, 28)),
                      "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 48),
                      "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (8, 28, 28)),
                      "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 8)}.items():
        header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
        (tmp_path / name).write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))
    task = get_task("fashion_cnn_bn", data_dir=tmp_path, val_size=8)
    config = PopulationConfig(runs=2, epochs=2, group_size=2, num_checkpoints=3, batch_size=8)
    result = task.train_population([draw_hparams(config, r) for r in range(2)], config, "cpu")
    vec = result.params[1, -1]
    model = task.build_model()
    model.load_state_dict(task.to_state_dict(vec))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its exact statistics
    with torch.no_grad():
        model.train()(task.split("train")[0][:task.bn_stats_size])
    expected = torch.cat([v.flatten().float() for v in model.state_dict().values() if v.is_floating_point()])
    torch.testing.assert_close(vec, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(task.to_state_dict(vec)["1.running_var"], torch.ones(16))


def test_float16_store_through_the_cli(tmp_path):
    assert main(["--task", "digits_mlp", "--runs", "6", "--epochs", "1", "--checkpoints", "3", "--group-size", "6",
                 "--dtype", "float16", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    store = open_store(tmp_path / "s")
    assert store.manifest["dtype"] == "float16" and store.params([0, 1]).dtype == np.float32
