"""PairDataset: pairs from one run, ordered targets, the same permutation on start and target, seeding."""
import numpy as np
import pytest
import torch
from torch import nn

from checkpoints_dataset.pairs import PairDataset
from checkpoints_dataset.permute import apply_permutations, infer_permutation_spec, weight_matching
from checkpoints_dataset.store import create_store, open_store, write_shard

RUNS, CKPTS = 12, 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Each checkpoint's params = its run's base network + step * run direction, so every checkpoint is
    recognisable after permutation (weight matching to the unpermuted one recovers it exactly)."""
    root = tmp_path_factory.mktemp("store")
    model = nn.Sequential(nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2))
    spec = infer_permutation_spec(model)
    create_store(root, task=None, layer_shapes=spec.layer_shapes, metric_names=["val_error"],
                 lower_is_better={"val_error": True}, permutation_spec=spec.to_json())
    g = torch.Generator().manual_seed(0)
    base = torch.randn(RUNS, 1, spec.num_params, generator=g)
    step = torch.arange(CKPTS, dtype=torch.float32)[None, :, None]  # [1, C, 1]
    params = (base + 0.1 * step * torch.randn(RUNS, 1, spec.num_params, generator=g)).reshape(-1, spec.num_params)
    steps = np.tile(np.arange(CKPTS) * 10, RUNS)
    order = np.random.default_rng(0).permutation(RUNS * CKPTS)  # rows stored out of order on purpose
    write_shard(root, "all", params=params[order], run_ids=np.repeat(np.arange(RUNS), CKPTS)[order],
                steps=steps[order], epochs=steps[order] / 10.0, metrics={"val_error": 1.0 - steps[order] / 100.0})
    return open_store(root)


def test_pairs_ordered_same_run_same_permutation(store):
    ds = PairDataset(store, init_prob=0.25, seed=1)
    assert len(ds) == len(store.train_runs) * CKPTS
    batch = PairDataset.collate(ds.__getitems__(list(range(len(ds)))))
    s, t = batch["start_step"], batch["target_step"]
    assert ((s < t) | (t == 0)).all() and (s == 0).float().mean() > 0.25  # earlier start; the init often
    assert torch.allclose(batch["start_metric"], 1.0 - s.float() / 100.0)
    spec = store.permutation_spec
    for i in range(0, len(ds), 7):
        start, target = batch["start"][i], batch["target"][i]
        rows = store.run_checkpoints(int(batch["run_id"][i]))
        raw_target = torch.from_numpy(store.params(rows[store.steps[rows] == int(t[i])]))[0]
        raw_start = torch.from_numpy(store.params(rows[store.steps[rows] == int(s[i])]))[0]
        perms = [p[None] for p in weight_matching(raw_target, target, spec, restarts=5)]  # undo the target's ...
        assert torch.equal(apply_permutations(target[None], spec, perms)[0], raw_target)
        assert torch.equal(apply_permutations(start[None], spec, perms)[0], raw_start)  # ... undoes the start's
        assert not torch.equal(target, raw_target) or i == 0  # ... which was not the identity


def test_unordered_seeding_and_metrics_only(store):
    ds = PairDataset(store, runs=store.test_runs, ordered=False, init_prob=0.0, seed=3)
    a = PairDataset.collate(ds.__getitems__(range(len(ds))))
    assert (a["start_step"] != a["target_step"]).all() and (a["start_step"] > a["target_step"]).any()
    b = PairDataset.collate(PairDataset(store, runs=store.test_runs, ordered=False, init_prob=0.0,
                                        seed=3).__getitems__(range(len(ds))))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same pairs and permutations
    ds.set_epoch(1)
    c = PairDataset.collate(ds.__getitems__(range(len(ds))))
    assert not torch.equal(a["start"], c["start"])
    quick = PairDataset(store, fields="metrics")[0]
    assert "start" not in quick and quick["target_metric"].dtype == torch.float32
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0)
    assert next(iter(loader))["start"].shape == (8, store.num_params)
    with pytest.raises(ValueError, match="metric"):
        PairDataset(store, metric="nope")
