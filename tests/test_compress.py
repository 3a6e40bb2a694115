"""Compressed runs (issue 19): masks, quantization, metrics, and the pruning / QAT trainer against plain torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from checkpoints_dataset import PopulationConfig, build_population, get_task, open_store
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
