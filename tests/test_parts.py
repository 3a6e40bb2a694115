"""Condition parts (issue 18): named labels and scalars besides the target metric, each dropped on its own in
training and guided on its own at sampling; checkpoints without parts keep loading."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints_dataset import open_store
from checkpoints_dataset.pairs import PairDataset
from gpt_params import Diffusion, Generator, ParameterDiT
from gpt_params.cli import main
from gpt_params.core.parts import PartSpec
from tests.conftest import refused, train_args

DATA = Path(__file__).parent / "data"
PARTS = [dict(name="label", kind="label", classes=4), dict(name="sparsity", kind="scalar", range=[0.0, 1.0])]
T, C = 5, 3


def model_with_parts():
    torch.manual_seed(0)
    model = ParameterDiT(T, C, hidden_size=32, depth=1, num_heads=2, parts=PARTS)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.copy_(0.1 * torch.randn(p.shape))
    return model.eval()


class Spy(torch.nn.Module):
    """The real model, recording the part arguments of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.prediction = model.prediction

    def forward(self, *args, **kwargs):
        self.calls.append({k: v.clone() for k, v in kwargs.items() if v is not None})
        return self.model(*args, **kwargs)


def test_each_part_changes_the_output_and_its_null_replaces_it():
    model = model_with_parts()
    x = torch.randn(2, T, C)
    args = (x, torch.tensor([500, 500]), x, torch.tensor([0.3, 0.3]), torch.tensor([0.9, 0.9]))
    base = model(*args, parts=torch.tensor([[1.0, 0.5], [1.0, 0.5]]))
    assert not torch.allclose(base, model(*args, parts=torch.tensor([[2.0, 0.5], [2.0, 0.5]])))
    assert not torch.allclose(base, model(*args, parts=torch.tensor([[1.0, 0.9], [1.0, 0.9]])))
    drop_label = torch.tensor([[True, False], [True, False]])
    a = model(*args, parts=torch.tensor([[1.0, 0.5], [1.0, 0.5]]), drop_parts=drop_label)
    b = model(*args, parts=torch.tensor([[3.0, 0.5], [3.0, 0.5]]), drop_parts=drop_label)
    assert torch.allclose(a, b)                                      # a dropped label no longer matters
    assert torch.allclose(model(*args), model(*args, parts=torch.zeros(2, 2), drop_parts=torch.ones(2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="classes"):
        PartSpec("label", "label").check(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not one of its classes"):
        PartSpec("label", "label", classes=4).check(torch.tensor([4.0]))


def test_training_drops_each_part_on_its_own():
    spy = Spy(model_with_parts())
    parts = torch.tensor([[1.0, 0.5]]).repeat(64, 1)
    Diffusion().training_terms(spy, torch.randn(64, T, C), torch.randn(64, T, C), torch.rand(64), torch.rand(64),
                               cond_drop_prob=0.5, parts=parts, generator=torch.Generator().manual_seed(0))
    drop = spy.calls[0]["drop_parts"]
    assert drop.shape == (64, 2) and 0 < drop.float().mean() < 1
    assert not torch.equal(drop[:, 0], drop[:, 1]) and not torch.equal(drop[:, 0], spy.calls[0]["drop_target"])


def test_guidance_on_one_part_leaves_the_others_alone():
    """One DDIM step from noise returns the guided x0 prediction: cond + (s - 1) (cond - uncond_label), where
    uncond_label drops the label only (the target and the other part stay)."""
    model = model_with_parts()
    spy = Spy(model)
    start = torch.randn(2, T, C)
    parts = torch.tensor([[1.0, 0.5], [3.0, 0.2]])
    out = Diffusion().sample_tokens(spy, start, 0.9, 0.3, sampler="ddim", steps=1, generator=torch.Generator().manual_seed(0),
                                    parts=parts, part_guidance=[2.5, 1.0])
    (call,) = spy.calls
    assert call["drop_parts"].tolist() == [[False, False]] * 2 + [[True, False]] * 2   # cond, then no label
    assert call["drop_target"].tolist() == [False] * 4
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 999])
    cond = model(x, t, start, torch.tensor([0.3, 0.3]), torch.tensor([0.9, 0.9]), parts=parts)
    uncond = model(x, t, start, torch.tensor([0.3, 0.3]), torch.tensor([0.9, 0.9]), parts=parts,
                   drop_parts=torch.tensor([[True, False]] * 2))
    assert torch.allclose(out, cond + 1.5 * (cond - uncond), atol=1e-5)
    spy.calls.clear()   # no guidance anywhere: one forward of N
    Diffusion().sample_tokens(spy, start, 0.9, 0.3, sampler="ddim", steps=1, parts=parts, parts_given=torch.tensor(
        [[True, False], [True, False]]))
    assert len(spy.calls) == 1 and spy.calls[0]["drop_parts"].tolist() == [[False, True]] * 2   # not given: null


def test_a_checkpoint_without_parts_still_loads_and_refuses_them():
    gen = Generator.load(DATA / "legacy_params.ckpt")
    assert gen.parts == [] and gen.model.part_embedders is None
    with pytest.raises(ValueError, match="no parts"):
        gen.generate(torch.zeros(1, gen.tokenizer.num_params), 0.9, 0.1, parts={"label": 1})


@pytest.fixture(scope="module")
def labelled(tiny_field_store, tmp_path_factory):
    """The tiny digits_field store and a generator conditioned on psnr and the label."""
    root = tmp_path_factory.mktemp("parts")
    assert main(train_args(tiny_field_store, root / "run", steps=3,
                           extra=["--data.batch_size", "4", "--data.parts", "[label]"])) == 0
    return tiny_field_store, next((root / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt"))


def test_the_data_carries_the_parts_and_the_checkpoint_records_them(labelled):
    store_path, ckpt = labelled
    store = open_store(store_path)
    ds = PairDataset(store, runs=store.train_runs[:3], metric="psnr", parts=["label", "sharpness"], permute=False)
    batch = ds.get_batch(np.arange(4))
    labels = np.asarray(store.metrics(np.arange(store.num_checkpoints))["label"])
    assert batch["target_parts"].shape == (4, 2)
    assert batch["target_parts"][:, 0].tolist() == labels[ds._order[:4]].tolist()
    gen = Generator.load(ckpt)
    assert [(p.name, p.kind, p.classes) for p in gen.parts] == [("label", "label", 10)]
    with pytest.raises(ValueError, match="not metrics of the store"):
        PairDataset(store, parts=["colour"], permute=False)


def test_prompt_and_denoise_take_labels(labelled, tmp_path, capsys):
    _, ckpt = labelled
    out = tmp_path / "p"
    assert main(["prompt", "--ckpt", str(ckpt), "--target", "30", "--label", "label=7", "--part-guidance", "label=2",
                 "--num", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["parts"] == {"label": 7.0} and results["part_guidance"] == {"label": 2.0}
    assert main(["denoise", "--ckpt", str(ckpt), "--target", "30", "--label", "label=2", "--num", "2", "--steps", "2",
                 "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "trajectory.json").read_text())["parts"] == {"label": 2.0}
    assert "not one of its classes" in refused(["prompt", "--ckpt", str(ckpt), "--target", "30", "--label",
                                                "label=12", "--out", str(tmp_path / "x")], capsys)
    assert "conditioned on ['label']" in refused(["prompt", "--ckpt", str(ckpt), "--target", "30", "--label",
                                                  "colour=1", "--out", str(tmp_path / "y")], capsys)
    assert "NAME=VALUE" in refused(["prompt", "--ckpt", str(ckpt), "--target", "30", "--label", "7",
                                    "--out", str(tmp_path / "z")], capsys)


def test_set_measures_of_known_sets():
    from gpt_params.evaluation.samples import coverage_mmd, one_nna

    real = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert one_nna(real.clone(), real) == 0.0                  # every item's nearest is its twin in the other set
    assert one_nna(real + 100.0, real) == 1.0                  # far apart: told apart perfectly
    assert coverage_mmd(real.clone(), real) == (1.0, 0.0)
    cov, mmd = coverage_mmd(real[:1].clone(), real)            # one generated item covers one real item
    assert cov == pytest.approx(1 / 6) and mmd > 0


def test_the_level_most_samples_reach():
    from gpt_params.evaluation.samples import level_reached

    for n in (5, 6, 10, 20, 48):
        values = np.random.default_rng(n).permutation(n).astype(float)
        high, low = level_reached(values, 0.8, False), level_reached(values, 0.8, True)
        assert (values >= high).mean() >= 0.8 and (values >= high + 1).mean() < 0.8   # the best such level
        assert (values <= low).mean() >= 0.8 and (values <= low - 1).mean() < 0.8
    assert level_reached([0.3, 0.9, 0.5, 0.7, 0.8], 0.8, False) == 0.5               # IoU: 4 of 5 reach 0.5


def test_the_samples_section_per_class(labelled, tiny_generator_ckpt, tiny_digits_store):
    from checkpoints_dataset import get_task
    from gpt_params.evaluation.samples import samples

    store_path, ckpt = labelled
    store, gen = open_store(store_path), Generator.load(ckpt)
    result, fig = samples(gen, gen.make_task(), store, store.test_runs, per_class=2)
    assert result["num_generated"] == 20 and len(result["label_accuracy_per_class"]) == 10
    for key in ("label_accuracy", "copy_fraction", "one_nna", "coverage"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["mmd"] > 0 and result["sharpness_ratio"] > 0 and len(fig.axes) == 20
    assert result["metric"] == "psnr" and result["metric_80pct"] <= result["metric_median"]   # psnr: higher is better
    other = Generator.load(tiny_generator_ckpt)               # digits_mlp: no label part, no images
    skipped, _ = samples(other, get_task("digits_mlp"), open_store(tiny_digits_store), [0])
    assert "label condition part" in skipped["skipped"]


def test_guidance_needs_the_part_it_guides(labelled):
    gen = Generator.load(labelled[1])
    start = torch.zeros(2, gen.tokenizer.num_params)
    with pytest.raises(ValueError, match="needs its value"):
        gen.generate(start, 9.0, 30.0, part_guidance={"label": 2.0})
    with pytest.raises(ValueError, match="one per prompt"):
        gen.generate(start, 9.0, 30.0, parts={"label": [1, 2, 3]})
    assert gen.model.part_embedders.nulls is None    # labels only: their nulls are rows of the table
