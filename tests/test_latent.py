"""Latent parameter diffusion (p-diff mode) and start-free generation, on the tiny real digits store."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoints_dataset import get_task, open_store
from conftest import refused
from gpt_params.core.autoencoder import ParameterAutoencoder, reconstruction_quality
from gpt_params.cli import main
from gpt_params.core.dit import ParameterDiT
from gpt_params.core.generator import Generator
from gpt_params.core.tokenizer import ParameterTokenizer

TINY = ["--model.dit.size", "XS", "--model.dit.depth", "1", "--model.dit.hidden_size", "32", "--model.dit.num_heads", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.batch_size", "16", "--final_eval_runs", "2"]
TINY_AE = ["--model.space", "latent", "--model.autoencoder.latent_dim", "8", "--model.autoencoder.hidden_size", "16",
           "--model.autoencoder.num_heads", "2"]




def _train(store, root, steps: int, extra: list[str]):
    assert main(["train", "--data.root", str(store), "--trainer.default_root_dir", str(root),
                 "--trainer.max_steps", str(steps), *TINY, *extra]) == 0
    return next(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))


@pytest.fixture(scope="module")
def pdiff_ckpt(tiny_digits_store, tmp_path_factory):
    """Latent space, start-free, unconditional (p-diff): 10 autoencoder steps, then 10 DiT steps."""
    return _train(tiny_digits_store, tmp_path_factory.mktemp("pdiff"), 20,
                  [*TINY_AE, "--model.autoencoder.steps", "10", "--model.start", "none", "--model.condition", "none"])


@pytest.fixture(scope="module")
def start_free_ckpt(tiny_digits_store, tmp_path_factory):
    """Parameter space, start-free, conditioned on the target metric."""
    return _train(tiny_digits_store, tmp_path_factory.mktemp("free"), 8, ["--model.start", "none"])


def test_dit_variants_ignore_what_they_do_not_condition_on():
    torch.manual_seed(0)
    x, t = torch.randn(3, 5, 4), torch.tensor([10, 500, 900])
    free = ParameterDiT(5, 4, hidden_size=16, depth=1, num_heads=2, start_input="none", condition="none")
    for block in free.blocks:  # non-zero adaLN so that every input could matter
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5)
    torch.nn.init.normal_(free.final_layer.linear.weight)
    out = free(x, t, None, None, None)
    assert torch.equal(out, free(x, t, torch.randn(3, 5, 4), torch.rand(3), torch.rand(3)))
    assert not torch.allclose(out, free(x, t.flip(0), None, None, None))
    assert not hasattr(free, "start_embedder") and not hasattr(free, "target_embedder")
    assert free.x_embedder.weight.shape[1] == 4                       # no start channels in the projection
    assert ParameterDiT(**free.config()).config() == free.config()
    with pytest.raises(ValueError, match="needs a start"):
        ParameterDiT(5, 4, hidden_size=16, depth=1, num_heads=2, start_input="none", residual=True)


@pytest.mark.slow
def test_autoencoder_round_trip_keeps_the_task_metric(tiny_digits_store):
    """p-diff's autoencoder (with its noise augmentation) on the tiny store's training runs: after 200 CPU
    steps the reconstructed trained checkpoints score within 0.02 val_error of the originals on average
    (a run measured ~0.01); the untrained autoencoder does not come close."""
    torch.manual_seed(0)
    store, task = open_store(tiny_digits_store), get_task("digits_mlp")
    tok = ParameterTokenizer(store.layer_shapes, stats=store.stats, spec=store.manifest.get("permutation_spec"))
    idx = np.nonzero(np.isin(store.run_ids, store.train_runs))[0]
    tokens = tok.tokenize(torch.as_tensor(store.params(idx)))          # [K, T, C]
    ae = ParameterAutoencoder(tok.num_tokens, tok.token_dim, tok.token_layer_ids, latent_dim=96, hidden_size=96,
                              depth=1, num_heads=4, token_mask=tok.mask)
    trained = torch.as_tensor(store.params(idx[store.steps[idx] > 0]))
    before = reconstruction_quality(ae, tok, task, trained, ["val_error"])
    opt = torch.optim.AdamW(ae.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=200, pct_start=0.1)
    for _ in range(200):
        loss = ae.reconstruction_loss(tokens[torch.randint(0, len(tokens), (64,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    after = reconstruction_quality(ae, tok, task, trained, ["val_error"])
    assert after["metrics"]["val_error"]["abs_diff_mean"] < 0.02
    assert after["relative_l2"] < 0.15 < before["relative_l2"]
    z = ae.eval().encode(tokens[:8])
    assert z.shape == (8, tok.num_tokens, 96) and torch.equal(z, ae.encode(tokens[:8]))   # eval: deterministic


def test_latent_pdiff_trains_and_prompts_without_start_or_target(pdiff_ckpt, tmp_path, capsys):
    gen = Generator.load(pdiff_ckpt)
    assert (gen.space, gen.uses_start, gen.conditional) == ("latent", False, False)
    assert gen.model.token_dim == 8 and gen.autoencoder is not None
    params = gen.generate(None, None, torch.zeros(3), steps=2, generator=torch.Generator().manual_seed(0))
    assert params.shape == (3, get_task("digits_mlp").num_params) and torch.isfinite(params).all()
    out = tmp_path / "p"
    assert main(["prompt", "--ckpt", str(pdiff_ckpt), "--num", "3", "--out", str(out), "--steps", "2"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 3 and all(r["target"] is None and "val_error" in r["achieved"] for r in records)
    model = get_task("digits_mlp").build_model()
    model.load_state_dict(load_file(str(out / records[0]["file"])), strict=True)
    # an unconditional generator ignores --target with a note
    assert main(["prompt", "--ckpt", str(pdiff_ckpt), "--num", "1", "--target", "0.1", "--out",
                 str(tmp_path / "q"), "--steps", "1"]) == 0
    assert "unconditional" in capsys.readouterr().err


@pytest.mark.parametrize("start", ["random", "some.safetensors"])
def test_start_free_model_refuses_a_start(start, start_free_ckpt, tmp_path, capsys):
    assert "start-free" in refused(["prompt", "--ckpt", str(start_free_ckpt), "--target", "0.3", "--start", start,
                                     "--out", str(tmp_path / "o"), "--steps", "1"], capsys)
    assert not (tmp_path / "o" / "results.json").exists()


def test_start_free_conditional_model_prompts_and_needs_a_target(start_free_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prompt", "--ckpt", str(start_free_ckpt), "--target", "0.3", "--num", "2", "--out", str(out),
                 "--steps", "2"]) == 0
    assert [r["target"] for r in json.loads((out / "results.json").read_text())["records"]] == [0.3, 0.3]
    assert "--target is required" in refused(["prompt", "--ckpt", str(start_free_ckpt), "--out", str(tmp_path / "x"),
                                               "--steps", "1"], capsys)


def test_compare_modes_writes_one_table(pdiff_ckpt, start_free_ckpt, tiny_digits_store, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["evaluate", "--compare", f"pdiff={pdiff_ckpt}", f"free={start_free_ckpt}", "--out", str(out),
                 "--runs", "2", "--steps", "1"]) == 0
    report = json.loads((out / "modes.json").read_text())
    assert [r["mode"] for r in report["rows"]] == ["pdiff", "free"]
    assert [(r["space"], r["start"], r["condition"]) for r in report["rows"]] == [
        ("latent", "none", "none"), ("params", "none", "target")]
    task = get_task("digits_mlp")
    for row, ckpt in zip(report["rows"], (pdiff_ckpt, start_free_ckpt)):
        # start-free: one step is 8 networks generated for the data's best metric (seed 0, the generator's
        # own sampler, --steps 1)
        gen = Generator.load(ckpt)
        made = gen.generate(None, None, torch.full((8,), gen.data_range[0]), sampler=gen.sampler, steps=1,
                            generator=torch.Generator().manual_seed(0))
        assert row["one_step_target"] == pytest.approx(gen.data_range[0])
        assert row["one_step_median"] == pytest.approx(statistics.median(task.evaluate(made)["val_error"].tolist()))
        assert row["pairwise_distance_trained"] > 0
    table = (out / "modes.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3   # header + one row per mode
    assert "pdiff" in table and "unconditional" in table                   # the notes say what was ignored
    assert "pdiff" in capsys.readouterr().out


def test_the_averaged_autoencoder_is_the_frozen_one(pdiff_ckpt):
    """The EMA starts before the switch (step 2 of 20, the switch at 10); from the switch on, the averaged
    autoencoder is the frozen one, bit for bit, while the averaged DiT is an average."""
    ckpt = torch.load(pdiff_ckpt, map_location="cpu", weights_only=True)
    averaged, live = ckpt["state_dict"], ckpt["current_model_state"]
    ae = [k for k in averaged if k.startswith("generator.autoencoder.")]
    assert ae and all(torch.equal(averaged[k], live[k]) for k in ae)
    dit = [k for k in averaged if k.startswith("generator.model.") and averaged[k].is_floating_point()]
    assert any(not torch.equal(averaged[k], live[k]) for k in dit)
