"""Device-resident pair sampling: same pairs as the memory-mapped path, whole batches, the DataModule option."""
import numpy as np
import pytest
import torch

from checkpoints_dataset import open_store
from checkpoints_dataset.pairs import PairBatches, PairDataset
from checkpoints_dataset.permute import apply_permutations, weight_matching


def _check_contract(store, batch):
    """Start earlier than target (or both the init) in the same run; one permutation on both."""
    s, t = batch["start_step"].cpu(), batch["target_step"].cpu()
    assert ((s < t) | (t == 0)).all()
    spec = store.permutation_spec
    for i in range(0, len(s), 5):
        rows = store.run_checkpoints(int(batch["run_id"][i]))
        raw_t = torch.from_numpy(store.params(rows[store.steps[rows] == int(t[i])]))[0]
        raw_s = torch.from_numpy(store.params(rows[store.steps[rows] == int(s[i])]))[0]
        target, start = batch["target"][i].cpu(), batch["start"][i].cpu()
        perms = [p[None] for p in weight_matching(raw_t, target, spec, restarts=3)]
        assert torch.allclose(apply_permutations(target[None], spec, perms)[0], raw_t)
        assert torch.allclose(apply_permutations(start[None], spec, perms)[0], raw_s)


def test_resident_path_gives_the_same_pairs_as_the_memmap_path(tiny_digits_store):
    store = open_store(tiny_digits_store)
    mapped = PairDataset(store, seed=4)
    resident = PairDataset(store, seed=4, device="cpu")
    assert resident._resident.shape == (len(resident), store.num_params)
    idx = np.random.default_rng(0).integers(0, len(mapped), 48)
    a, b = mapped.get_batch(idx), resident.get_batch(idx)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _check_contract(store, b)
    items = resident.__getitems__(idx[:3])  # the per-item view still works (DataLoader automatic batching)
    assert len(items) == 3 and items[0]["start"].shape == (store.num_params,)


def test_pair_batches_cover_each_target_once_per_pass(tiny_digits_store):
    store = open_store(tiny_digits_store)
    ds = PairDataset(store, seed=0, device="cpu")
    batches = PairBatches(ds, batch_size=16, num_replicas=2)
    assert len(batches) == len(ds) // 32
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    seen = [(int(r), int(t)) for b in loader for r, t in zip(b["run_id"], b["target_step"])]
    assert len(seen) == len(batches) * 16 and len(set(seen)) == len(seen)  # distinct targets in one pass
    first = next(iter(loader))
    assert first["start"].shape == (16, store.num_params) and first["target_metric"].shape == (16,)
    with pytest.raises(ValueError, match="no full batch"):
        PairBatches(ds, batch_size=len(ds) + 1)


def test_pair_batches_of_two_ranks_are_disjoint_and_cover_the_pass(tiny_digits_store):
    """Two DDP ranks, each with its own dataset seed (its own starts and permutations), share the order of
    targets and take alternate positions: disjoint targets that together cover the pass."""
    store = open_store(tiny_digits_store)
    seen = []
    for rank in range(2):
        ds = PairDataset(store, seed=rank, device="cpu")
        batches = PairBatches(ds, batch_size=8, num_replicas=2, rank=rank, seed=3)
        seen.append({(int(r), int(t)) for b in batches for r, t in zip(b["run_id"], b["target_step"])})
    per_rank = len(batches) * 8
    assert len(seen[0]) == len(seen[1]) == per_rank and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 2 * per_rank > len(ds) - 16     # all but the dropped remainder
    with pytest.raises(ValueError, match="rank must be"):
        PairBatches(ds, batch_size=8, num_replicas=2, rank=2)


def test_datamodule_pair_device(tiny_digits_store):
    from gpt_params.training.data import ParameterDataModule

    dm = ParameterDataModule(root=str(tiny_digits_store), batch_size=8, pair_device="cpu:0")
    dm.setup("fit")
    assert dm.train_set.device == torch.device("cpu:0")
    batch = next(iter(dm.train_dataloader()))
    assert batch["start"].shape == (8, dm.store.num_params) and batch["start_metric"].shape == (8,)
    default = ParameterDataModule(root=str(tiny_digits_store), batch_size=8)
    default.setup("fit")
    assert default.train_set.device is None and default.train_dataloader().batch_size == 8
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pair_device"):
            ParameterDataModule(root=str(tiny_digits_store), pair_device="cuda").setup("fit")


@pytest.mark.parametrize("pair_device", ["cpu", "cpu:0"])   # DataLoader's sampler, and PairBatches
def test_best_boost_draws_the_best_targets_more_often(tiny_digits_store, pair_device):
    """--data.best_boost B: targets among the best 10% (lowest val_error) come 1 + B times as often."""
    from gpt_params.training.data import ParameterDataModule

    dm = ParameterDataModule(root=str(tiny_digits_store), batch_size=8, pair_device=pair_device, best_boost=9.0)
    dm.setup("fit")
    ds = dm.train_set
    weights = ds.target_weights(0.1, 9.0)                                   # [N]
    best = weights > 1
    metric = ds._metric[ds._order]
    assert 0.05 < best.mean() <= 0.2 and metric[best].max() <= metric[~best].min()
    loader = dm.train_dataloader()                                          # 20 passes, each a fresh draw
    drawn = np.concatenate([b["target_metric"].cpu().numpy() for _ in range(20) for b in loader])
    share = (drawn <= metric[best].max()).mean()                            # expected 10 b / (10 b + (1 - b))
    expected = 10 * best.mean() / (10 * best.mean() + 1 - best.mean())
    assert abs(share - expected) < 0.08 and share > 2 * best.mean()
    assert ds.target_weights(1.0, 2.0).min() == 3.0                        # the whole set is "the best"
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="best_boost"):
            ParameterDataModule(root=str(tiny_digits_store), best_boost=bad)
    with pytest.raises(ValueError, match="best_fraction"):
        ParameterDataModule(root=str(tiny_digits_store), best_fraction=0.0)


def test_weighted_pair_batches_split_one_draw_between_ranks(tiny_digits_store):
    store = open_store(tiny_digits_store)
    ds = PairDataset(store, seed=0, device="cpu")
    weights = ds.target_weights(0.1, 9.0)
    order = np.random.default_rng([3, 0]).choice(len(ds), len(ds), p=weights / weights.sum())   # the shared draw
    for rank in range(2):
        batches = PairBatches(ds, batch_size=8, num_replicas=2, rank=rank, seed=3, weights=weights)
        first = next(iter(batches))
        expect = ds._order[order[rank::2][:8]]                                # store checkpoints of the slice
        assert first["target_step"].tolist() == store.steps[expect].tolist()
        assert first["run_id"].tolist() == store.run_ids[expect].tolist()
    with pytest.raises(ValueError, match="one value per position"):
        PairBatches(ds, batch_size=8, weights=weights[:-1])


def test_best_targets_of_a_higher_is_better_metric(tiny_field_store):
    ds = PairDataset(open_store(tiny_field_store), metric="psnr", permute=False)
    psnr, best = ds._metric[ds._order], ds.target_weights(0.1, 1.0) == 2.0
    assert best.any() and psnr[best].min() >= psnr[~best].max()             # the highest PSNR


@pytest.mark.gpu
def test_cuda_resident_pairs(tiny_digits_store):
    store = open_store(tiny_digits_store)
    ds = PairDataset(store, seed=1, device="cuda")
    batch = next(iter(PairBatches(ds, batch_size=32)))
    assert all(v.is_cuda for v in batch.values())
    _check_contract(store, batch)
