"""The gpt-params command line end to end on a tiny real store: train, resume, prompt, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoints_dataset import get_task
from gpt_params.cli import CONFIG_DIR, main
from gpt_params.core.generator import Generator

from conftest import refused, train_args as _train_args


@pytest.fixture(scope="module")
def trained(tiny_generator_ckpt):
    return tiny_generator_ckpt


def test_train_writes_last_ckpt_config_and_reports_alignment(trained, tiny_digits_store):
    version_dir = trained.parent.parent
    assert (version_dir / "config.yaml").exists()          # the resolved config is saved with the run
    assert (version_dir / "alignment.png").exists()
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
    info = ckpt["hyper_parameters"]["data_info"]
    assert info["metric"] == "val_error" and info["task"] == "digits_mlp"
    assert set(info["stats"]) == set(info["layer_shapes"])
    # the printed alignment is prompt_alignment of the saved generator with its own sampler (--final_eval_runs 2)
    import re

    from checkpoints_dataset import open_store
    from gpt_params.evaluation import prompt_alignment

    printed = (trained.parents[3] / "stdout.txt").read_text()
    found = re.search(r"Prompt alignment on (\d+) held-out runs \((\w+)\): R\^2 median (\S+), mean (\S+) ", printed)
    assert found, printed[-2000:]
    store = open_store(tiny_digits_store)
    result, _ = prompt_alignment(Generator.load(trained), get_task("digits_mlp"), store, runs=store.test_runs[:2])
    assert (int(found[1]), found[2]) == (2, "val_error") and len(result["per_network"]) == 2
    assert float(found[3]) == pytest.approx(result["median"], abs=1e-3)
    assert float(found[4]) == pytest.approx(result["mean"], abs=1e-3)


def test_resume_from_last_ckpt_continues_the_step_count(trained, tiny_digits_store, tmp_path):
    assert main(_train_args(tiny_digits_store, tmp_path, steps=16,
                            extra=["--ckpt_path", str(trained), "--final_eval_runs", "0"])) == 0
    new = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    assert torch.load(new, map_location="cpu", weights_only=True)["global_step"] == 16


def test_resuming_a_checkpoint_written_with_other_denoiser_options_names_them(trained, tiny_digits_store, tmp_path,
                                                                              capsys):
    """A checkpoint from before an option existed reads as that option's old value (here the tanh GELU):
    resuming it with today's defaults is refused with the flag to pass, and with the flag it resumes."""
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    del ckpt["gpt_params"]["generator"]["dit"]["activation"]
    older = tmp_path / "older.ckpt"
    torch.save(ckpt, older)
    rc = main(_train_args(tiny_digits_store, tmp_path / "a", steps=16, extra=["--ckpt_path", str(older)]))
    assert rc == 2 and "--model.dit.activation gelu_tanh" in capsys.readouterr().err
    assert main(_train_args(tiny_digits_store, tmp_path / "b", steps=16, extra=[
        "--ckpt_path", str(older), "--final_eval_runs", "0", "--model.dit.activation", "gelu_tanh"])) == 0


def test_prompt_writes_loadable_networks_and_results(trained, tmp_path, capsys):
    out = tmp_path / "prompted"
    assert main(["prompt", "--ckpt", str(trained), "--target", "0.2", "--target", "0.5", "--num", "2",
                 "--out", str(out), "--steps", "3", "--seed", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "val_error" and len(results["records"]) == 4
    assert [r["target"] for r in results["records"]] == [0.2, 0.2, 0.5, 0.5]
    task = get_task("digits_mlp")
    for rec in results["records"]:
        model = task.build_model()
        model.load_state_dict(load_file(str(out / rec["file"])), strict=True)
        assert set(rec["achieved"]) >= {"val_error", "test_error"}
    # the achieved metric printed is the real metric of the file's network
    vec = task.init_params(1)[0] * 0
    sd = load_file(str(out / results["records"][0]["file"]))
    from checkpoints_dataset import state_dict_to_vector
    vec = state_dict_to_vector(sd, task.layer_shapes)
    assert task.evaluate(vec[None])["val_error"].item() == pytest.approx(results["records"][0]["achieved"]["val_error"])
    assert "target" in capsys.readouterr().out


def test_the_default_guidance_is_the_one_set_at_training(trained, tmp_path):
    """--model.guidance is saved with the generator; prompt (and generate) use it when given no --guidance."""
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    ckpt["gpt_params"]["generator"]["guidance"] = 3.0  # what `gpt-params train --model.guidance 3` saves
    guided = tmp_path / "guided.ckpt"
    torch.save(ckpt, guided)
    gen, plain = Generator.load(guided), Generator.load(trained)
    assert gen.guidance == 3.0 and plain.guidance == 1.0
    start = get_task("digits_mlp").init_params(3, torch.Generator().manual_seed(0))  # [3, P]
    run = lambda g, **kw: g.generate(start, 0.9, 0.1, steps=3, generator=torch.Generator().manual_seed(1), **kw)  # noqa: E731
    assert torch.equal(run(gen), run(gen, guidance=3.0)) and not torch.equal(run(gen), run(gen, guidance=1.0))
    assert torch.equal(run(plain), run(plain, guidance=1.0))
    for ckpt_path, flags, want in ((guided, [], 3.0), (guided, ["--guidance", "1.5"], 1.5), (trained, [], 1.0)):
        out = tmp_path / f"prompted_{want}"
        assert main(["prompt", "--ckpt", str(ckpt_path), "--target", "0.3", "--num", "1", "--out", str(out),
                     "--steps", "2"] + flags) == 0
        assert json.loads((out / "results.json").read_text())["guidance"] == want


def test_the_default_sampler_is_the_one_set_at_training(trained, tmp_path):
    """--model.sampler / --model.sampler_steps are saved with the generator and used when no --sampler /
    --steps is given; checkpoints written before they existed keep DDIM with 50 steps."""
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    config = ckpt["gpt_params"]["generator"]
    assert (config["sampler"], config["sampler_steps"]) == ("dpm++", 3)   # the defaults of `gpt-params train`
    config.update(sampler="ddim", sampler_steps=4)
    torch.save(ckpt, tmp_path / "ddim4.ckpt")
    for key in ("sampler", "sampler_steps"):
        del config[key]
    del config["dit"]["activation"]
    torch.save(ckpt, tmp_path / "older.ckpt")
    gen, older = Generator.load(tmp_path / "ddim4.ckpt"), Generator.load(tmp_path / "older.ckpt")
    assert (gen.sampler, gen.sampler_steps, older.sampler, older.sampler_steps) == ("ddim", 4, "ddim", 50)
    assert (gen.config.dit.activation, older.config.dit.activation) == ("gelu", "gelu_tanh")
    start = get_task("digits_mlp").init_params(3, torch.Generator().manual_seed(0))  # [3, P]
    run = lambda g, **kw: g.generate(start, 0.9, 0.1, generator=torch.Generator().manual_seed(1), **kw)  # noqa: E731
    assert torch.equal(run(gen), run(gen, sampler="ddim", steps=4))
    assert not torch.equal(run(gen), run(gen, sampler="ddim", steps=2))
    for flags, want in (([], ("ddim", 4)), (["--sampler", "dpm++", "--steps", "2"], ("dpm++", 2))):
        out = tmp_path / f"prompted_{len(flags)}"
        assert main(["prompt", "--ckpt", str(tmp_path / "ddim4.ckpt"), "--target", "0.3", "--num", "1",
                     "--out", str(out)] + flags) == 0
        results = json.loads((out / "results.json").read_text())
        assert (results["sampler"], results["steps"]) == want


def test_prompt_is_deterministic_for_a_seed(trained, tmp_path):
    runs = []
    for name in ("a", "b"):
        main(["prompt", "--ckpt", str(trained), "--target", "0.3", "--num", "2", "--out", str(tmp_path / name),
              "--steps", "2", "--seed", "5"])
        runs.append(load_file(str(tmp_path / name / "target00_001.safetensors")))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("case", ["num0", "out_of_range", "existing_out", "not_gpt_params", "unwritable"])
def test_prompt_refuses_bad_input(case, trained, tmp_path, capsys):
    args = ["prompt", "--ckpt", str(trained), "--target", "0.3", "--num", "1", "--steps", "1",
            "--out", str(tmp_path / "out")]
    expect = {"num0": "--num", "out_of_range": "valid range", "existing_out": "--overwrite",
              "not_gpt_params": "not a gpt-params checkpoint", "unwritable": "not writable"}[case]
    if case == "num0":
        args[args.index("--num") + 1] = "0"
    elif case == "out_of_range":
        args[args.index("--target") + 1] = "1.5"
    elif case == "existing_out":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "results.json").write_text("{}")
    elif case == "not_gpt_params":
        other = tmp_path / "other.ckpt"
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, other)
        args[args.index("--ckpt") + 1] = str(other)
    elif case == "unwritable":
        if os.geteuid() == 0:
            blocker = tmp_path / "file"
            blocker.write_text("")
            args[-1] = str(blocker / "sub")           # a path under a file cannot be created, even by root
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            args[-1] = str(tmp_path / "ro" / "sub")
    assert expect in refused(args, capsys)
    if case == "existing_out":
        assert (tmp_path / "out" / "results.json").read_text() == "{}"   # nothing overwritten


def test_unknown_config_key_is_refused(tiny_digits_store, tmp_path, capsys):
    err = refused(_train_args(tiny_digits_store, tmp_path) + ["--model.no_such_option", "1"], capsys)
    assert "no_such_option" in err and "see gpt-params train --help" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(CONFIG_DIR / config), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def test_help_explains_every_verb(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(v in usage for v in ("build-dataset", "train", "prompt", "evaluate"))
    for verb in ("prompt", "evaluate"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--ckpt" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_cpu_processes_see_different_pairs(tiny_digits_store, tmp_path):
    """Lightning DDP with 2 gloo processes for one epoch: the ranks train on disjoint (run, step) targets that
    together are the epoch, and one checkpoint results.

    Lightning wraps the training loader in a DistributedSampler (seed 0, shuffle, drop_last False): one shared
    permutation of the N training checkpoints, padded to 2 * ceil(N / 2), rank r taking every 2nd entry from r;
    each rank's DataLoader then drops its last partial batch. So an epoch is B = ceil(N / 2) // batch_size
    batches per rank, 2 * B * batch_size distinct checkpoints in all (no padded repeat is reached), and the
    N - 2 * B * batch_size left are the drop_last remainder. Ranks that both read the whole data (a sampler
    that ignores the rank) would train on the same checkpoints: their sets would be equal, not disjoint."""
    from checkpoints_dataset.pairs import PairDataset
    from gpt_params.training import ParameterDataModule

    batch_size, ranks = 16, 2
    data = ParameterDataModule(root=str(tiny_digits_store), batch_size=batch_size)  # the split train uses
    train = PairDataset(data.store, runs=data.train_run_ids, metric=data.metric, fields="metrics")
    every = train.get_batch(range(len(train)))
    epoch = set(zip(every["run_id"].tolist(), every["target_step"].tolist()))   # each training checkpoint once
    assert len(epoch) == len(train)
    per_rank = -(-len(train) // ranks) // batch_size                            # batches per rank and epoch
    assert per_rank >= 2
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RECORD_BATCHES_DIR": str(tmp_path)}
    args = _train_args(tiny_digits_store, tmp_path / "run", steps=per_rank, extra=[
        "--trainer.accelerator", "cpu", "--trainer.devices", str(ranks), "--trainer.strategy", "ddp",
        "--trainer.callbacks+=helpers.RecordBatches", "--final_eval_runs", "0"])
    assert args[args.index("--data.batch_size") + 1] == str(batch_size)
    proc = subprocess.run([sys.executable, "-m", "gpt_params", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batches = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    seen = []
    for rank_batches in batches:
        assert [len(b) for b in rank_batches] == [batch_size] * per_rank   # one whole epoch, full batches
        pairs = [(run, step) for b in rank_batches for e, run, step in b]
        assert {e for b in rank_batches for e, _, _ in b} == {0}
        assert len(set(pairs)) == len(pairs)                                 # no checkpoint twice on a rank
        seen.append(set(pairs))
    assert not seen[0] & seen[1]                                             # disjoint across ranks
    union = seen[0] | seen[1]
    assert union <= epoch                                                    # training runs only
    assert len(epoch - union) == len(train) - ranks * per_rank * batch_size  # all but the drop_last remainder
    assert len(list((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))) == 1


@pytest.mark.slow
def test_ctrl_c_leaves_a_last_ckpt_that_resumes(tiny_digits_store, tmp_path):
    import signal
    import time

    args = _train_args(tiny_digits_store, tmp_path / "run", steps=100000, extra=["--final_eval_runs", "0"])
    proc = subprocess.Popen([sys.executable, "-m", "gpt_params", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((tmp_path / "run").glob("lightning_logs/version_0/hparams.yaml")):
        time.sleep(0.5)
    time.sleep(5)                                            # let it take some steps
    try:
        out = None
        for _ in range(5):   # a KeyboardInterrupt raised inside a __del__ is swallowed by Python: press again
            proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=60)   # reads the pipe while it waits (no full-pipe stall)
                break
            except subprocess.TimeoutExpired:
                continue
        assert out is not None, "the training did not stop after 5 presses of Ctrl-C"
    finally:
        if proc.poll() is None:   # never leave a 100,000-step training behind
            proc.kill()
            proc.wait()
    last = list((tmp_path / "run").glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    assert last, out[-3000:]
    step = torch.load(last[0], map_location="cpu", weights_only=True)["global_step"]
    assert step > 0
    assert main(_train_args(tiny_digits_store, tmp_path / "resumed", steps=step + 2,
                            extra=["--ckpt_path", str(last[0]), "--final_eval_runs", "0"])) == 0


def test_resume_onto_a_store_of_another_architecture_is_refused(trained, tmp_path, capsys):
    from checkpoints_dataset import PopulationConfig, build_population

    other = tmp_path / "cartpole"
    build_population(get_task("cartpole"), other, PopulationConfig(runs=8, epochs=1, group_size=8,
                                                                   num_checkpoints=3), progress=False)
    rc = main(_train_args(other, tmp_path / "run", steps=14, extra=["--ckpt_path", str(trained)]))
    assert rc == 2 and "another architecture" in capsys.readouterr().err


def test_a_last_ckpt_in_the_working_directory_is_neither_resumed_nor_deleted(trained, tiny_digits_store, tmp_path,
                                                                             monkeypatch):
    """Lightning's OnExceptionCheckpoint turns fit(ckpt_path=None) into "last" (resuming from ./last.ckpt) and
    deletes its file at teardown; our exception checkpoint must do neither."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(trained, tmp_path / "last.ckpt")                # someone's file, a 12-step generator
    before = (tmp_path / "last.ckpt").read_bytes()
    assert main(_train_args(tiny_digits_store, tmp_path / "run", steps=3, extra=["--final_eval_runs", "0"])) == 0
    assert (tmp_path / "last.ckpt").read_bytes() == before
    new = next((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    assert torch.load(new, map_location="cpu", weights_only=True)["global_step"] == 3   # a fresh run, not resumed


@pytest.mark.parametrize("old, new", [("--model.hidden_size", "--model.dit.hidden_size"),
                                      ("--model.lr", "--model.optim.lr"),
                                      ("--model.autoencoder_steps", "--model.autoencoder.steps")])
def test_a_flat_model_option_names_its_new_name(old, new, tiny_digits_store, tmp_path, capsys):
    assert f"{old} is now {new}" in refused(_train_args(tiny_digits_store, tmp_path) + [old, "1"], capsys)


def test_a_config_with_flat_model_options_names_their_new_names(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  size: XS\n  lr: 1.0e-3\n  layout: neuron\n")
    err = refused(["train", "--config", str(config)], capsys)
    assert "['size', 'lr']" in err and "dit.size" in err and "optim.lr" in err


def test_evaluate_scores_the_validation_runs_the_generator_set_aside(trained, tiny_digits_store, tmp_path):
    """--split val prompts from the runs training held out for validation (recorded in the checkpoint), never
    from the store's test runs; report.json lists the run ids it used."""
    from checkpoints_dataset import open_store

    gen = Generator.load(trained)
    store = open_store(tiny_digits_store)
    assert gen.info.val_runs and not set(gen.info.val_runs) & set(store.test_runs.tolist())
    for split, want in (("val", list(gen.info.val_runs[:2])), ("test", store.test_runs[:2].tolist())):
        out = tmp_path / split
        assert main(["evaluate", "--ckpt", str(trained), "--split", split, "--runs", "2", "--steps", "1",
                     "--out", str(out)]) == 0
        assert json.loads((out / "report.json").read_text())["config"]["run_ids"] == want


def test_the_data_module_builds_the_checkpoints_per_run_and_dtype_it_is_given(tmp_path):
    from checkpoints_dataset import open_store
    from gpt_params.training.data import ParameterDataModule

    store = ParameterDataModule.prepare_store(root=str(tmp_path / "s"), task="digits_mlp", build_runs=4,
                                              build_epochs=1, build_checkpoints=3, build_dtype="float16",
                                              build_group_size=2)
    manifest = open_store(tmp_path / "s").manifest
    assert store.num_checkpoints == 4 * 3 and manifest["build_config"]["num_checkpoints"] == 3
    assert manifest["build_config"]["group_size"] == 2 and len(list((tmp_path / "s" / "shards").glob("*.params.npy"))) == 2
    shard = sorted((tmp_path / "s" / "shards").glob("*.params.npy"))[0]
    assert manifest["dtype"] == "float16" and np.load(shard, mmap_mode="r").dtype == np.float16
