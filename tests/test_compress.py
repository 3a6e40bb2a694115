"""Compressed runs (issue 19): masks, quantization, metrics, and the pruning / QAT trainer against plain torch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from checkpoints_dataset import PopulationConfig, get_task, open_store
from checkpoints_dataset.__main__ import main
from checkpoints_dataset.compress import (bits_metric, fake_quantize, gmp_sparsity, magnitude_mask, prunable_names,
                                          quantize_rows, sparsity_metric)
from checkpoints_dataset.params import LayerShapes
from checkpoints_dataset.population import draw_hparams


@pytest.fixture(scope="module")
def digits():
    return get_task("digits_mlp", compression=True)


def test_quantize_rows_gives_the_symmetric_grid_and_a_straight_through_gradient():
    w = torch.tensor([[1.0, -0.6, 0.26, 0.0], [0.1, 0.2, -0.4, 0.05]])
    q = quantize_rows(w, 2)                       # 2 bits: levels {-1, 0, 1} * max|row|
    assert torch.equal(q, torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, -0.4, 0.0]]))
    q3 = quantize_rows(w, 3)                      # 3 bits: k * max/3, |k| <= 3
    assert torch.allclose(q3[0], torch.tensor([1.0, -2 / 3, 1 / 3, 0.0]))
    assert torch.equal(quantize_rows(w, 32), w)
    x = w.clone().requires_grad_()
    (fake_quantize(x, 2) * torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(4.0).expand(2, 4))   # the identity's gradient


def test_metrics_on_known_tensors():
    shapes = LayerShapes({"0.weight": (4, 6), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)})
    names = ["0.weight", "2.weight"]
    g = torch.Generator().manual_seed(0)
    w0, w1 = torch.randn(4, 6, generator=g), torch.randn(2, 4, generator=g)
    w0[:, :3] = 0.0                                   # 12 of 32 prunable entries are zero
    vec = torch.cat([w0.flatten(), torch.zeros(4), w1.flatten(), torch.zeros(2)])[None]   # zero biases do not count
    assert sparsity_metric(vec, shapes, names).item() == pytest.approx(12 / 32)
    assert bits_metric(vec, shapes, names).item() == 32                        # float rows
    for b in (2, 3, 4, 8):
        q = torch.cat([quantize_rows(w0, b).flatten(), torch.randn(4), quantize_rows(w1, b).flatten(), torch.ones(2)])
        assert bits_metric(q[None], shapes, names).item() == b                 # biases are never quantized
        assert bits_metric(q[None].half().float(), shapes, names).item() == b  # float16 storage keeps the grid
    mixed = torch.cat([quantize_rows(w0, 2).flatten(), torch.zeros(4), quantize_rows(w1, 4).flatten(), torch.zeros(2)])
    assert bits_metric(mixed[None], shapes, names).item() == 4                 # the widest row


def test_masks_and_schedule_are_exact():
    w = torch.randn(3, 10, 7)
    for s in (0.0, 0.5, 0.8, 0.9):
        m = magnitude_mask(w, torch.full((3,), s))
        assert m.reshape(3, -1).sum(1).tolist() == [round((1 - s) * 70)] * 3
        for r in range(3):   # per run: every kept entry is at least as large as every dropped one
            kept, dropped = w[r].abs()[m[r]], w[r].abs()[~m[r]]
            assert len(dropped) == 0 or kept.min() >= dropped.max()
    final = torch.tensor([0.0, 0.9])
    assert gmp_sparsity(10, 10, 50, final).tolist() == [0.0, 0.0]
    assert torch.allclose(gmp_sparsity(30, 10, 50, final), torch.tensor([0.0, 0.9 * (1 - 0.5 ** 3)]))
    assert torch.allclose(gmp_sparsity(60, 10, 50, final), final)
    assert prunable_names(get_task("digits_mlp").build_model()) == ["0.weight", "2.weight"]


def test_dense_configs_and_hparams_are_unchanged_by_the_new_options():
    dense = PopulationConfig(runs=4)
    assert "sparsity" not in dense.to_json() and not dense.compressed     # old stores keep matching their record
    comp = PopulationConfig(runs=4, sparsity=(0.0, 0.9), bits=(32, 4))
    assert comp.to_json()["sparsity"] == [0.0, 0.9] and comp.compressed
    for r in range(4):
        a, b = draw_hparams(dense, r), draw_hparams(comp, r)
        assert "sparsity" not in a and {**a, "sparsity": b["sparsity"], "bits": b["bits"]} == b
    for bad in (dict(sparsity=(1.0,)), dict(bits=(1,)), dict(bits=(4.5,)), dict(compress_start=0.8, compress_end=0.5)):
        with pytest.raises(ValueError):
            PopulationConfig(**bad)


def _reference(task, h, config, total):
    """One run in plain torch: nn.Module, torch.optim.AdamW, per-row fake quantization written out, and
    gradual magnitude pruning with torch.topk."""
    gen = torch.Generator().manual_seed(h["seed"])
    model = task.build_model()
    model.load_state_dict(task.to_state_dict(task.init_params(1, gen)[0] * h["init_scale"]))
    opt = torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=(h["momentum"], 0.999), weight_decay=h["weight_decay"])
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in weights.items()}
    start, end = round(config.compress_start * total), round(config.compress_end * total)
    redraw = max(1, round((end - start) / 100))
    qmax = 2 ** (h["bits"] - 1) - 1

    def quant(w):
        scale = w.abs().amax(1, keepdim=True) / qmax
        return (w / scale).round().clamp(-qmax, qmax) * scale

    x, y = task.split("train")
    steps_per_epoch = len(y) // config.batch_size
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(y), generator=gen)
        s = step % steps_per_epoch
        idx = order[s * config.batch_size:(s + 1) * config.batch_size]
        quantized = step >= start and h["bits"] < 32
        params = {n: (p + (quant(p.detach()) - p.detach()) if quantized and n in weights else p)
                  for n, p in model.named_parameters()}
        opt.zero_grad()
        F.cross_entropy(functional_call(model, params, (x[idx],)), y[idx]).backward()
        opt.step()
        done = step + 1
        if done >= start:
            if done == end or (done < end and (done - start) % redraw == 0):
                u = min(1.0, (done - start) / max(end - start, 1))
                target = h["sparsity"] * (1 - (1 - u) ** 3)
                with torch.no_grad():
                    for n, p in weights.items():
                        keep = round((1 - target) * p.numel())
                        top = torch.topk((p * masks[n]).abs().flatten(), keep).indices
                        new = torch.zeros(p.numel(), dtype=torch.bool)
                        new[top] = True
                        masks[n] &= new.view_as(p)
            with torch.no_grad():
                for n, p in weights.items():
                    p.mul_(masks[n])
    with torch.no_grad():
        for n, p in weights.items():
            if h["bits"] < 32:
                p.copy_(quant(p))
    return torch.cat([v.flatten() for v in model.state_dict().values()])


@pytest.mark.parametrize("sparsity,bits", [(0.75, 32), (0.0, 4), (0.6, 3)])
def test_compressed_trainer_matches_a_plain_torch_run(digits, sparsity, bits):
    config = PopulationConfig(runs=1, epochs=2, seed=1, num_checkpoints=6, sparsity=(sparsity,), bits=(bits,),
                              optimizers=("adam",))
    h = draw_hparams(config, 0)
    result = digits.train_population([h], config, "cpu")
    total = int(result.steps[-1])
    measured = result.metrics["sparsity"][0, -1].item()   # quantization rounds small weights to zero too
    assert measured == pytest.approx(sparsity, abs=0.002) if bits == 32 else measured >= sparsity - 0.002
    assert result.metrics["bits"][0, -1].item() == bits
    assert result.metrics["sparsity"][0, 0] == 0 and result.metrics["bits"][0, 0] == 32   # the dense twin
    plain = _reference(digits, h, config, total)
    ours = result.params[0, -1]
    assert torch.equal(ours == 0, plain == 0)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


def test_compressed_store_through_the_cli(tmp_path, capsys):
    out = tmp_path / "store"
    rc = main(["--task", "digits_mlp", "--task-option", "compression=True", "--runs", "4", "--epochs", "1",
               "--checkpoints", "6", "--group-size", "4", "--sparsity", "0.5,0.9", "--bits", "32,4", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    store = open_store(out)
    assert {"sparsity", "bits"} <= set(store.metric_names)
    assert store.manifest["build_config"]["task_options"] == {"compression": True}
    for r in np.unique(store.run_ids):
        last = store.metrics([store.run_checkpoints(r)[-1]])
        h = store.run_hparams(r)
        assert h["sparsity"] in (0.5, 0.9) and h["bits"] in (32, 4)
        assert last["sparsity"][0] >= h["sparsity"] - 0.002 and last["bits"][0] == h["bits"]
    with pytest.raises(SystemExit):   # a task without the metrics is refused with the fix named
        main(["--task", "digits_mlp", "--runs", "2", "--sparsity", "0.5", "--out", str(tmp_path / "x")])
    assert "compression=True" in capsys.readouterr().err


def test_projection_is_exact_and_reports_its_distance(digits):
    from gpt_params.core.compression import project
    names = prunable_names(digits.build_model())
    x = digits.init_params(4, torch.Generator().manual_seed(0))
    pr = project(x, digits.layer_shapes, names, sparsity=torch.tensor([0.9, 0.8, 0.5, 0.0]), bits=torch.tensor([4, 3, 2, 32]))
    for k in names:   # exactly round((1 - s) n) nonzeros per layer, even where 2-bit rounding would zero a weight
        w = digits.layer_shapes.split(pr.params)[k].reshape(4, -1)
        assert (w != 0).sum(1).tolist() == [round((1 - s) * w.shape[1]) for s in (0.9, 0.8, 0.5, 0.0)]
    assert bits_metric(pr.params, digits.layer_shapes, names).tolist() == [4, 3, 2, 32]
    assert pr.distance[3] == 0 and (pr.distance[:3] > 0).all() and (pr.pruned_mass[:3] > 0).all()
    again = project(pr.params, digits.layer_shapes, names, sparsity=torch.tensor([0.9, 0.8, 0.5, 0.0]),
                    bits=torch.tensor([4, 3, 2, 32]))
    assert torch.equal(again.params, pr.params) and (again.distance == 0).all()   # already on the constraint
    with pytest.raises(ValueError, match="sparsity must lie"):
        project(x, digits.layer_shapes, names, sparsity=1.0)


@pytest.mark.parametrize("bits", [2, 4, 8, 32])
def test_packed_format_round_trips(digits, bits):
    from gpt_params.core.compression import pack, project, unpack
    names = prunable_names(digits.build_model())
    x = project(digits.init_params(1, torch.Generator().manual_seed(1)), digits.layer_shapes, names, 0.9,
                None if bits == 32 else bits).params[0]
    sd = digits.to_state_dict(x)
    tensors, meta = pack(sd, names, bits)
    back = unpack(tensors, meta)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    dense_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    packed_bytes = sum(v.numel() * v.element_size() for v in tensors.values())
    assert packed_bytes < dense_bytes / (8 if bits <= 4 else 4 if bits <= 8 else 1.5)
    if bits < 32:
        with pytest.raises(ValueError, match="project"):   # weights off the grid are refused, not silently rounded
            pack(digits.to_state_dict(digits.init_params(1)[0]), names, bits)


def _train_compressed(root, sparsity="[0.0, 0.8]", bits="[32, 4]", parts="[sparsity, bits]", runs=16, extra=()):
    """A tiny compressed digits store built by `gpt-params train`, which trains 4 steps on it -> last.ckpt."""
    from gpt_params.cli import main as gpt_main
    from tests.conftest import train_args

    build = ["--data.task", "digits_mlp", "--data.task_options", "{compression: true}", "--data.build_runs", str(runs),
             "--data.build_epochs", "2", "--data.build_checkpoints", "6", "--data.build_sparsity", sparsity,
             "--data.build_bits", bits, "--data.val_runs", "2", "--data.parts", parts, *extra]
    assert gpt_main(train_args(root / "store", root / "run", steps=4, extra=build)) == 0
    return next((root / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))


@pytest.fixture(scope="module")
def compressed_ckpt(tmp_path_factory):
    return _train_compressed(tmp_path_factory.mktemp("compressed"))


def test_compressed_store_trains_and_prompts_exact_packed_networks(compressed_ckpt, tmp_path):
    """`gpt-params train` builds a compressed store and conditions on sparsity and bits; `prompt --sparsity
    --bits --format packed` writes exactly compressed networks that load (strict) after unpacking."""
    from gpt_params.cli import main as gpt_main
    from gpt_params.core.compression import read_network

    ckpt, out = compressed_ckpt, tmp_path / "gen"
    assert gpt_main(["prompt", "--ckpt", str(ckpt), "--target", "0.2", "--num", "3", "--sparsity", "0.8", "--bits", "4",
                     "--format", "packed", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["sparsity"] == 0.8 and results["bits"] == 4 and results["format"] == "packed"
    task = get_task("digits_mlp", compression=True)
    for rec in results["records"]:
        assert rec["achieved"]["sparsity"] == pytest.approx(0.8, abs=0.001) and rec["achieved"]["bits"] == 4
        assert rec["projection"]["distance"] > 0 and rec["bytes"] == (out / rec["file"]).stat().st_size
        model = task.build_model()
        model.load_state_dict(read_network(out / rec["file"]), strict=True)
    dense = tmp_path / "dense"
    assert gpt_main(["prompt", "--ckpt", str(ckpt), "--target", "0.2", "--num", "3", "--sparsity", "0.8", "--bits",
                     "4", "--out", str(dense)]) == 0
    dense_rec = json.loads((dense / "results.json").read_text())["records"]
    for a, b in zip(results["records"], dense_rec):   # the same networks, smaller files
        assert a["achieved"] == b["achieved"] and a["bytes"] < b["bytes"]
        assert all(torch.equal(read_network(out / a["file"])[k], v) for k, v in read_network(dense / b["file"]).items())


def test_prompt_ticket_mode_trains_the_generated_mask(compressed_ckpt, tmp_path, capsys):
    from gpt_params.cli import main as gpt_main
    from gpt_params.core.compression import read_network

    out = tmp_path / "tickets"
    assert gpt_main(["prompt", "--ckpt", str(compressed_ckpt), "--target", "0.2", "--num", "2", "--sparsity", "0.8",
                     "--bits", "4", "--ticket", "1", "--format", "packed", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["ticket_epochs"] == 1
    task = get_task("digits_mlp", compression=True)
    for rec in results["records"]:   # the ticket's training may round kept weights to zero: at least as sparse
        assert rec["achieved"]["sparsity"] >= 0.8 - 0.001 and rec["achieved"]["bits"] == 4
        task.build_model().load_state_dict(read_network(out / rec["file"]), strict=True)
    assert gpt_main(["prompt", "--ckpt", str(compressed_ckpt), "--target", "0.2", "--ticket", "1",
                     "--out", str(tmp_path / "x")]) == 2
    assert "--sparsity" in capsys.readouterr().err


def test_evaluate_compression_section_compares_every_method(compressed_ckpt, tmp_path):
    """The evaluation's compression section on a tiny compressed generator: every method is scored from the
    same inits, the generated networks are exactly on the constraint, and the report and figure are written."""
    from gpt_params.cli import main as gpt_main

    ckpt = compressed_ckpt
    out = tmp_path / "eval"
    assert gpt_main(["evaluate", "--ckpt", str(ckpt), "--out", str(out), "--sections", "compression", "--runs", "4",
                     "--options", '{"compression": {"num_inits": 3, "finetune_steps": 20, "ticket_rounds": 2, '
                     '"epochs": 1, "targets": [[0.8, 4], [0.0, 2]]}}']) == 0
    report = json.loads((out / "report.json").read_text())["compression"]
    assert set(report["rows"]) == {"sparsity0.8_bits4", "sparsity0_bits2"}
    row = report["rows"]["sparsity0.8_bits4"]
    assert row["generated"]["sparsity"]["min"] == pytest.approx(0.8, abs=0.001) and row["generated"]["bits"]["max"] == 4
    for method in (row["dense_then_compressed"]["one_shot"], row["dense_then_compressed"]["finetuned"],
                   row["lottery_tickets"], row["random_masks"]):
        assert method["sparsity"]["min"] >= 0.8 - 0.002 and method["bits"]["max"] <= 4
        assert 0 <= method["test_error"]["median"] <= 1
    assert row["ticket_mode"]["sparsity"]["min"] >= 0.798 and row["lottery_tickets"]["trainings"] == 3 and row["sparse_from_start"]["adam"]["sparsity"]["min"] >= 0.798
    assert (out / "compression.png").exists() and "median" in row["alignment"]


def test_mask_channel_tokens_round_trip_and_weigh_only_nonzero_values(digits):
    from gpt_params.core.compression import project
    from gpt_params.core.tokenizer import ParameterTokenizer
    names = prunable_names(digits.build_model())
    x = project(digits.init_params(3, torch.Generator().manual_seed(2)), digits.layer_shapes, names, 0.8).params
    plain = ParameterTokenizer(digits.layer_shapes, stats={k: (0.01, 0.2) for k in digits.layer_shapes})
    tok = ParameterTokenizer(digits.layer_shapes, stats={k: (0.01, 0.2) for k in digits.layer_shapes},
                             mask_channel="nonzero")
    assert tok.token_dim == 2 * plain.token_dim and tok.num_tokens == plain.num_tokens
    tokens = tok.tokenize(x)
    assert torch.equal(tokens[..., :tok.value_dim], plain.tokenize(x))                       # values as before
    assert torch.equal(tok.mask_scores(tokens), torch.where(x != 0, 1.0, -1.0))             # +-1 per entry
    back = tok.detokenize(tokens)
    assert torch.equal(back == 0, x == 0) and torch.allclose(back, x, atol=1e-6)
    flipped = tokens.clone()
    flipped[..., tok.value_dim:] *= -1                                                       # the channel decides
    assert (tok.detokenize(flipped)[x != 0] == 0).all()
    weights = tok.loss_weights(tokens)
    assert weights[..., :tok.value_dim].sum() == (x != 0).sum() and weights[..., tok.value_dim:].sum() == x.numel()
    assert ParameterTokenizer.from_config(tok.config()).mask_channel == "nonzero"


def test_projection_keeps_by_the_scores_it_is_given(digits):
    from gpt_params.core.compression import project
    names = prunable_names(digits.build_model())
    x = digits.init_params(1, torch.Generator().manual_seed(4))
    scores = 1 / (x.abs() + 1e-3)                       # positive everywhere, preferring the smallest weights
    pr = project(x, digits.layer_shapes, names, 0.5, scores=scores)
    for k in names:
        kept = digits.layer_shapes.split(pr.params)[k] != 0
        w = digits.layer_shapes.split(x)[k].abs()
        assert kept.sum() == round(0.5 * kept.numel()) and w[kept].max() <= w[~kept].min()
    nothing = project(x, digits.layer_shapes, names, 0.5, scores=-scores)   # a channel that keeps nothing
    assert all((digits.layer_shapes.split(nothing.params)[k] == 0).all() for k in names)


def test_projection_without_sparsity_is_idempotent_on_quantized_networks(digits):
    """Bits alone: rounding may add zeros (as QAT does), so a network the trainer quantized is left as it is;
    with scores from a mask channel, its zeros stay zero even when nothing is to be pruned."""
    from gpt_params.core.compression import project
    names = prunable_names(digits.build_model())
    x = digits.init_params(1, torch.Generator().manual_seed(5))
    q = project(x, digits.layer_shapes, names, None, 2).params
    assert (q == 0).float().mean() > 0.2
    again = project(q, digits.layer_shapes, names, 0.0, 2)
    assert torch.equal(again.params, q) and again.distance.item() == 0
    scores = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(6)) < 0.5, 1.0, -1.0)
    kept = project(x, digits.layer_shapes, names, 0.0, 4, scores=scores).params
    for k in names:
        assert not digits.layer_shapes.split(kept)[k][digits.layer_shapes.split(scores)[k] < 0].any()


def test_projection_counts_like_the_trainer_and_keeps_tiny_rows_on_their_grid():
    """The kept count is the trainer's ``round((1 - s) n)`` in float64 (float32 0.85 would keep 1 of 10, not 2),
    and a row of tiny weights keeps a nonzero float16 step, so pruning to an exact count survives 4 bits."""
    from gpt_params.core.compression import pack, project, unpack
    shapes = LayerShapes({"w": (1, 10), "b": (1,)})
    x = torch.linspace(1, 2, 11)[None]                                        # [1, P]
    assert (shapes.split(project(x, shapes, ["w"], 0.85).params)["w"] != 0).sum() == 2
    assert (magnitude_mask(shapes.split(x)["w"], torch.tensor([0.85], dtype=torch.float64))).sum() == 2
    tiny = project(x * 1e-9, shapes, ["w"], 0.5, 4).params
    w = shapes.split(tiny)["w"]
    assert (w != 0).sum() == 5 and torch.equal(w, w.half().float())
    packed = pack({k: v[0] for k, v in shapes.split(tiny).items()}, ["w"], 4)
    assert torch.equal(unpack(*packed)["w"], w[0])


def test_compressed_schedules_always_reach_the_last_step():
    from checkpoints_dataset.tasks.supervised import compressed_schedule
    for total, count, start in ((100, 2, 25), (320, 32, 80), (5, 32, 1), (10, 8, 0)):
        steps = compressed_schedule(total, count, start)
        assert steps[0] == 0 and steps[-1] == total and steps == sorted(set(steps))


def test_matrix_names_are_the_prunable_weights_of_an_mlp(digits):
    from gpt_params.core.compression import matrix_names
    assert matrix_names(digits.layer_shapes) == prunable_names(digits.build_model())


def test_a_mask_channel_generator_trains_and_prompts(tmp_path):
    from gpt_params.cli import main as gpt_main
    from gpt_params.core.generator import Generator

    ckpt, out = _train_compressed(tmp_path, "[0.8, 0.9]", "[32]", "[sparsity]", 12,
                                  ["--model.mask_channel", "nonzero"]), tmp_path / "gen"
    gen = Generator.load(ckpt)
    assert gen.tokenizer.mask_channel == "nonzero" and gen.info.nonzero_stats is not None
    assert gen.tokenizer.stats == gen.info.nonzero_stats != gen.info.stats
    assert gpt_main(["prompt", "--ckpt", str(ckpt), "--target", "0.2", "--num", "2", "--sparsity", "0.9",
                     "--out", str(out)]) == 0
    for rec in json.loads((out / "results.json").read_text())["records"]:
        assert rec["achieved"]["sparsity"] == pytest.approx(0.9, abs=0.001)


@pytest.mark.parametrize("config", ["digits_mlp_compressed", "fashion_mlp_compressed"])
def test_the_compressed_configs_run_end_to_end_at_reduced_size(config, tmp_path):
    """configs/<task>_compressed.yaml as shipped (its store built by `train`: compressed runs with the metrics,
    the parts sparsity and bits), at reduced size; then a packed prompt. Fashion on the test's own small files."""
    from gpt_params.cli import main as gpt_main
    from tests.conftest import train_args
    from tests.helpers import config_args

    store, fashion = tmp_path / "store", config.startswith("fashion")
    args = config_args(tmp_path, config, fashion) + [
        "--data.build_runs", "16", "--data.build_epochs", "1", "--data.build_checkpoints", "6", "--data.val_runs", "2"]
    if fashion:
        args += ["--data.task_options", "{compression: true, val_size: 40, eval_size: 30}"]
    assert gpt_main(args + train_args(store, tmp_path / "run", steps=3)[1:]) == 0
    manifest = open_store(store).manifest
    assert {"sparsity", "bits"} <= set(manifest["metric_names"]) and manifest["build_config"]["bits"] == [32, 4, 3, 2]
    ckpt = next((tmp_path / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    assert gpt_main(["prompt", "--ckpt", str(ckpt), "--target", "0.3", "--num", "2", "--sparsity", "0.9", "--bits",
                     "4", "--format", "packed", "--out", str(tmp_path / "gen")]) == 0
    for rec in json.loads((tmp_path / "gen" / "results.json").read_text())["records"]:
        assert rec["achieved"]["sparsity"] >= 0.899 and rec["achieved"]["bits"] == 4
