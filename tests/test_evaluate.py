"""Known answers for the evaluation suite (gpt_params.evaluation*).

Generators here are duck-typed stand-ins with known behaviour: a perfect one on a synthetic task whose
metric is a single parameter, a do-nothing one (returns its start), and copiers that return permuted
training (or held-out) checkpoints of the real tiny digits store.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from checkpoints_dataset.params import check_params
from checkpoints_dataset.permute import apply_permutations, permute_params, random_permutations
from checkpoints_dataset.store import create_store, finalize_store, open_store, write_shard
from checkpoints_dataset.tasks import Task, get_task
from gpt_params.evaluation import SECTIONS, alignment_r2, evaluate_all, prompt_alignment, run_sections
from gpt_params.evaluation.common import (aligned_to, nearest_aligned, run_endpoints, sorted_features, to_json,
                                          trained_checkpoints)
from gpt_params.evaluation.diversity import _pairwise, diversity
from gpt_params.evaluation.novelty import novelty


# ------------------------------------------------------------------ synthetic task: metric = output bias
class BiasTask(Task):
    """A tiny MLP whose only metric, "score", is its output bias (the last entry of the vector)."""
    name = "bias_task"
    metric_names = ("score",)
    default_metric = "score"

    def __init__(self, lower: bool = True):
        self.lower_is_better = {"score": lower}
        self.metric_bounds = {"score": (-np.inf, np.inf)}

    def build_model(self):
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))

    def evaluate(self, params, device=None):
        return {"score": check_params(params, self.num_params)[:, -1].clone()}


class SetBias:
    """Perfect generator for BiasTask (sets the output bias to the target), or with ``perfect=False`` a
    do-nothing one that returns its start."""
    metric = "score"

    def __init__(self, store, lower: bool, perfect: bool = True):
        m = store.metrics(np.arange(store.num_checkpoints))["score"]
        self.lower_is_better, self.perfect = lower, perfect
        self.data_range = (float(m.min()), float(m.max()))

    def generate(self, start, start_metric, target, *, sampler, steps, guidance, generator):
        out = start.clone()
        if self.perfect:
            out[:, -1] = target
        return out


def _bias_store(root, task: BiasTask, missing_first: bool = False):
    """8 runs of 3 checkpoints; ``missing_first``: no metric at each run's first checkpoint (as a recorder
    writes it: the run starts before any validation)."""
    runs, per_run = 8, 3
    first = np.arange(runs * per_run) % per_run == 0
    params = torch.randn(runs * per_run, task.num_params, generator=torch.Generator().manual_seed(0))
    create_store(root, task=None, layer_shapes=task.layer_shapes, metric_names=["score"],
                 lower_is_better=task.lower_is_better, permutation_spec=task.permutation_spec.to_json())
    write_shard(root, "s0", params=params.numpy(), run_ids=np.repeat(np.arange(runs), per_run),
                steps=np.tile(np.arange(per_run), runs), epochs=np.tile(np.arange(per_run), runs).astype(float),
                metrics={"score": np.where(first & missing_first, np.nan, params[:, -1].numpy())},
                nan_metrics_ok=first & missing_first)
    finalize_store(root)
    return open_store(root)


def test_alignment_r2_known_answers():
    prompted = np.linspace([0.1, 1.0], [0.9, 3.0], 20, axis=1)  # [2, 20]
    np.testing.assert_allclose(alignment_r2(prompted, prompted), [1.0, 1.0])
    constant = np.full_like(prompted, 0.5)
    assert (alignment_r2(prompted, constant) <= 0).all()
    assert np.isnan(alignment_r2(np.ones((1, 5)), np.ones((1, 5))))[0]  # SST = 0: undefined
    with pytest.raises(ValueError, match="networks, prompts"):
        alignment_r2(prompted, prompted[:, :5])


@pytest.mark.parametrize("lower", [True, False])
def test_prompt_alignment_perfect_and_do_nothing(tmp_path, lower):
    task = BiasTask(lower)
    store = _bias_store(tmp_path / "store", task)
    perfect, fig = prompt_alignment(SetBias(store, lower), task, store, runs=32, num_prompts=20)
    assert perfect["num_networks"] == len(store.test_runs) and perfect["num_prompts"] == 20
    assert perfect["mean"] == pytest.approx(1.0, abs=1e-5) and fig is not None
    best = perfect["prompted"][:, 0]  # prompts run from the data's best towards the start metric
    assert np.allclose(best, max(store.metrics(range(24))["score"]) if not lower else min(store.metrics(range(24))["score"]))
    stuck, _ = prompt_alignment(SetBias(store, lower, perfect=False), task, store, runs=32)
    assert max(stuck["per_network"]) <= 0


def test_higher_is_better_task_without_data_runs_every_section(tmp_path):
    task = BiasTask(lower=False)
    store = _bias_store(tmp_path / "store", task)
    gen = SetBias(store, lower=False)
    report = evaluate_all(gen, tmp_path / "out", task=task, store=store, runs=4,
                          options={"one_step": {"num_inits": 2}, "recursive": {"k": 2, "num_inits": 2},
                                   "landscape": {"grid": 5, "num_networks": 3}})
    best = gen.data_range[1]
    assert report["prompt_alignment"]["mean"] == pytest.approx(1.0, abs=1e-5)
    for scheme in report["one_step"]["schemes"].values():  # one step lands on the data's best (the max)
        assert scheme["one_step"]["median"] == pytest.approx(best, abs=1e-5)
    assert "skipped" in report["one_step"]["optimizers"]
    after = report["recursive"]["schemes"]["orthogonal"]["median_after_each"]
    assert len(after) == 3 and after[1] == pytest.approx(best, abs=1e-5)
    assert "wrong_iou" not in report["novelty"] and any("no data split" in n for n in report["notes"])
    assert report["summary"] and (tmp_path / "out" / "landscape.png").exists()


def test_run_sections_is_the_section_loop_and_evaluate_all_asks_the_generator_for_its_task(tmp_path):
    task = BiasTask(lower=True)
    store = _bias_store(tmp_path / "store", task)
    gen = SetBias(store, lower=True)
    seconds, figures = {}, []
    res = run_sections(gen, task, store, ("novelty", "prompt_alignment"), runs=4, seconds=seconds,
                       on_figure=lambda name, fig: figures.append(name),
                       options={"prompt_alignment": {"num_prompts": 5}, "novelty": {"num_networks": 2}})
    assert list(res) == figures == ["prompt_alignment", "novelty"] and set(seconds) == set(res)  # SECTIONS order
    direct, _ = prompt_alignment(gen, task, store, 4, num_prompts=5)
    assert res["prompt_alignment"] == to_json(direct)
    with pytest.raises(ValueError, match="unknown sections"):
        run_sections(gen, task, store, ("nope",))
    with pytest.raises(ValueError, match="names no task"):  # no task given and none from the generator
        evaluate_all(gen, tmp_path / "out", store=store, sections=("prompt_alignment",))
    gen.make_task, gen.store_root = (lambda: task), str(store.root)  # like Generator.make_task / store_root
    report = evaluate_all(gen, tmp_path / "out", runs=4, sections=("prompt_alignment",), progress=False,
                          options={"prompt_alignment": {"num_prompts": 5}})
    assert report["prompt_alignment"] == res["prompt_alignment"] and report["one_step"] == {"skipped": "not requested"}
    assert report["config"]["task"] == task.name and report["config"]["store"] == str(store.root)

def test_weight_matching_recovers_a_known_permutation():
    task = get_task("digits_mlp")
    spec = task.permutation_spec
    ref = task.init_params(3, torch.Generator().manual_seed(1))  # [3, P]
    perms = random_permutations(3, spec, torch.Generator().manual_seed(2))
    permuted = apply_permutations(ref, spec, perms)  # [3, P]
    assert (permuted - ref).norm(dim=1).min() > 1.0  # the permutation really moved things
    torch.testing.assert_close(sorted_features(permuted, task.layer_shapes), sorted_features(ref, task.layer_shapes))
    for k in range(3):
        back = aligned_to(ref[k], permuted[k:k + 1], spec)[0]
        assert (back - ref[k]).norm() < 1e-5


class Copier:
    """Returns a random permutation of the stored checkpoint of ``indices`` closest to the target metric."""
    metric, lower_is_better = "val_error", True

    def __init__(self, store, indices):
        self.idx = indices
        self.m = store.metrics(indices)["val_error"]
        self.p = torch.as_tensor(store.params(indices))
        self.data_range = (float(self.m.min()), float(self.m.max()))
        self.spec = get_task("digits_mlp").permutation_spec

    def generate(self, start, start_metric, target, *, sampler, steps, guidance, generator):
        j = np.abs(self.m[None] - target.numpy()[:, None]).argmin(1)
        return permute_params(self.p[j], self.spec, generator)


@pytest.fixture(scope="module")
def digits(tiny_digits_store):
    return get_task("digits_mlp"), open_store(tiny_digits_store)


def test_novelty_flags_a_copier_and_passes_new_solutions(digits):
    task, store = digits
    copier = Copier(store, trained_checkpoints(store, store.train_runs))
    res, _ = novelty(copier, task, store, runs=4, num_networks=4)
    assert res["verdict"] == "near-copies" and res["near_copy_fraction"] == 1.0
    assert res["distance"]["generated"]["max"] < 1e-4  # permuted copies align back exactly
    assert res["wrong_iou"]["generated"]["min"] == 1.0
    # networks handed in from held-out runs are new by construction, whatever their metric
    held = torch.as_tensor(store.params(trained_checkpoints(store, store.test_runs)[-4:]))
    res, _ = novelty(copier, task, store, generated=held)
    assert res["verdict"] == "new solutions" and res["near_copy_fraction"] < 0.5
    # nearest search directly: a permuted training checkpoint finds its original
    pool = trained_checkpoints(store, store.train_runs)
    query = permute_params(torch.as_tensor(store.params(pool[[5]])), task.permutation_spec)
    d, i = nearest_aligned(query, store, pool, task.permutation_spec)
    assert i[0] == pool[5] and d[0] < 1e-4


def test_novelty_checks_updates_and_a_noise_baseline(digits):
    """A generator that adds a training run's update to its (new) start is far from every checkpoint but its
    updates are copies; held-out trained networks beat their nearest checkpoints moved by noise."""
    task, store = digits
    first, last = (torch.as_tensor(store.params(i)) for i in run_endpoints(store, store.train_runs))

    class UpdateCopier(Copier):
        def generate(self, start, start_metric, target, *, sampler, steps, guidance, generator):
            return start + (last - first)[:len(start)]

    res, _ = novelty(UpdateCopier(store, trained_checkpoints(store, store.train_runs)), task, store, runs=4,
                     num_networks=4)
    assert res["updates"]["near_copy_fraction"] == 1.0 and res["updates"]["distance"]["generated"]["max"] < 1e-4
    assert res["updates"]["distance"]["held_out_trained"]["median"] > 100 * res["updates"]["distance"]["generated"]["max"]
    held = torch.as_tensor(store.params(trained_checkpoints(store, store.test_runs)[-4:]))
    res, _ = novelty(Copier(store, held), task, store, generated=held)
    assert res["updates"] is None   # networks handed in have no starts
    nb = res["noise_baseline"]
    assert set(nb) == {"generated", "noisy_nearest", "better_fraction", "better"} and 0 <= nb["better_fraction"] <= 1
    assert nb["generated"]["median"] == pytest.approx(float(np.median(task.evaluate(held)["val_error"])))


def test_diversity_from_one_start_and_across_starts(digits):
    """A generator that returns its start: from one start every network is the same (distance 0), from
    different starts they are as far apart as the inits; one held-out run leaves no across-starts part."""
    task, store = digits

    class Identity(Copier):
        def generate(self, start, start_metric, target, *, sampler, steps, guidance, generator):
            return start.clone()

    gen = Identity(store, trained_checkpoints(store, store.train_runs))
    res, _ = diversity(gen, task, store, runs=4, num_networks=3)
    assert res["pairwise_distance"]["generated"]["max"] < 1e-5
    across = res["across_starts"]
    inits, _ = run_endpoints(store, store.test_runs[:3])
    init_params = torch.as_tensor(store.params(inits))
    assert across["num_generated"] == 3 and across["pairwise_distance"]["generated"]["min"] > 1.0
    assert across["pairwise_distance"]["generated"]["median"] == pytest.approx(
        float(np.median(_pairwise(init_params, task.permutation_spec))))   # the inits' own aligned distances
    assert across["generated_metric"]["median"] == pytest.approx(
        float(np.median(task.evaluate(init_params)["val_error"])), abs=1e-6)
    notes: list[str] = []
    res, _ = diversity(gen, task, store, runs=[int(store.test_runs[0])], num_networks=3, notes=notes)
    assert "across_starts" not in res and any("across_starts skipped" in n for n in notes)


def test_novelty_scores_initial_checkpoints_the_store_has_no_metric_for(tmp_path):
    """The quality half of the verdict needs the held-out runs' initial metric: where the store has none,
    the task scores those checkpoints."""
    from gpt_params.evaluation.novelty import _progress

    task = BiasTask()
    store = _bias_store(tmp_path / "store", task, missing_first=True)
    first, last = run_endpoints(store, store.test_runs)
    assert np.isnan(store.metrics(first)["score"]).all()
    notes: list[str] = []
    quality = _progress(task, store, "score", np.array([0.0]), notes)
    assert quality["init_median"] == pytest.approx(float(np.median(np.asarray(store.params(first))[:, -1])), abs=1e-6)
    assert quality["progress"] is not None and not notes


def test_evaluate_all_writes_report_pngs_and_tensorboard(digits, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    task, store = digits
    copier = Copier(store, trained_checkpoints(store, store.train_runs))
    writer = SummaryWriter(tmp_path / "tb")
    small = {"one_step": {"num_inits": 1, "max_steps": 16, "num_evals": 4},
             "recursive": {"k": 2, "num_inits": 2}, "landscape": {"grid": 6, "num_networks": 3},
             "novelty": {"num_networks": 3}, "diversity": {"num_networks": 3},
             "prompt_alignment": {"num_prompts": 5}}
    report = evaluate_all(copier, tmp_path / "out", task=task, store=store, runs=100, tb_logger=writer,
                          options=small)
    writer.close()
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(SECTIONS) | {"config", "notes"} <= set(on_disk) and on_disk == report
    assert any("capped" in n for n in on_disk["notes"])
    assert on_disk["config"]["runs"] == len(store.test_runs)
    assert all((tmp_path / "out" / f"{s}.png").stat().st_size > 1000 for s in SECTIONS)
    assert on_disk["prompt_alignment"]["mean"] > 0.5  # the copier hits its prompts up to checkpoint spacing
    assert on_disk["novelty"]["verdict"] == "near-copies"
    assert set(on_disk["one_step"]["optimizers"]) == {"adam", "sgd"}
    for o in on_disk["one_step"]["optimizers"].values():   # every network counted, matched within the cap or not
        assert o["steps_to_match"]["count"] == 4 and o["steps_to_match"]["cap"] == 16
        assert o["wall_seconds_to_match"]["cap"] == pytest.approx(16 * o["seconds_per_step"])   # in seconds
        assert o["wall_ratio"] is None or o["wall_ratio"] > 0
    assert len(on_disk["recursive"]["schemes"]["xavier"]["median_after_each"]) == 3
    assert np.asarray(on_disk["landscape"]["values"]).shape == (6, 6)
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


def test_capped_summary_counts_networks_above_the_cap():
    from gpt_params.evaluation.common import capped_summary

    out = capped_summary([10, 20, np.nan, np.nan, np.nan], cap=100)
    assert out["median_above_cap"] and out["median"] is None and out["above_cap"] == 3 and out["count"] == 5
    assert (out["min"], out["max"]) == (10, 20)
    out = capped_summary([10, 20, 30, np.nan], cap=100)   # the unmatched one sits above the cap, not dropped
    assert out["median"] == 25 and out["above_cap"] == 1 and not out["median_above_cap"]
    assert capped_summary([], cap=5)["median"] is None


def test_novelty_calls_networks_at_chance_not_working(digits):
    """Initial checkpoints are far from every trained one (new, by distance) but no better than an init: the
    verdict weighs quality first."""
    task, store = digits
    first = store.params(np.array([store.run_checkpoints(r)[0] for r in store.test_runs[:4]]))

    class Copier:   # only its metric is read when networks are given
        metric = "val_error"

    res, _ = novelty(Copier(), task, store, generated=torch.as_tensor(first))
    assert res["quality"]["progress"] < 0.5 and res["verdict"] == "not working"
