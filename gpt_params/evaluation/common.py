"""Shared machinery of the evaluation suite (``gpt_params.evaluation``).

Everything here works on whole populations at once: networks are evaluated with the task's batched
``evaluate`` in chunks, generated with one ``generate`` call per chunk, and run through the model with
``torch.func.functional_call`` under ``vmap``. The only per-network Python loop is the Hungarian weight
matching of ``aligned_to``, which scipy cannot batch.

The generator is duck-typed: any object with ``generate(start [N, P], start_metric [N], target [N], *,
sampler, steps, guidance, generator) -> [N, P]`` (guidance None: the generator's default scale), ``metric``,
``lower_is_better`` and ``data_range``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from checkpoints_dataset.params import LayerShapes, vector_to_tensors
from checkpoints_dataset.permute import apply_permutations, weight_matching
from gpt_params.core.compression import Projection


def to_json(x):
    """Numpy / torch values -> plain JSON types; non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return to_json(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    return x


def summary(values) -> dict:
    """mean / median / min / max of the finite entries (None when there are none)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "median": None, "min": None, "max": None, "count": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
            "max": float(v.max()), "count": int(v.size)}


def capped_summary(values, cap: float) -> dict:
    """Steps (or seconds) each network needed, NaN for those that did not get there within ``cap``: those
    count as above the cap, not dropped. ``median`` over all networks (None when it lies above the cap,
    with ``median_above_cap`` True), ``above_cap`` how many; mean / min / max of those that got there."""
    v = np.asarray(values, dtype=np.float64).ravel()
    missing = ~np.isfinite(v)
    out = summary(v)
    median = float(np.median(np.where(missing, np.inf, v))) if v.size else float("nan")
    out.update(median=median if np.isfinite(median) else None, median_above_cap=bool(v.size and np.isinf(median)),
               above_cap=int(missing.sum()), cap=cap, count=int(v.size))
    return out


def best_value(gen) -> float:
    """The best value of the conditioning metric in the generator's training data."""
    lo, hi = (float(v) for v in gen.data_range)
    return lo if gen.lower_is_better else hi


def at_least_as_good(values: np.ndarray, level, lower_is_better: bool) -> np.ndarray:
    """Elementwise: is ``values`` at least as good as ``level`` (<= when lower is better, >= otherwise)."""
    return values <= level if lower_is_better else values >= level


def has_data(task) -> bool:
    """Whether the task has "train" and "test" data splits (classification tasks do; cartpole's ``split``
    raises)."""
    try:
        task.split("train"), task.split("test")
    except (AttributeError, NotImplementedError, ValueError, KeyError):
        return False
    return True


def as_tensor(params) -> Tensor:
    """``[K, P]`` numpy or torch -> float32 CPU tensor."""
    return torch.as_tensor(np.asarray(params) if not isinstance(params, Tensor) else params).float().cpu()


def evaluate_metrics(task, params, *, device=None, chunk: int = 256) -> dict[str, np.ndarray]:
    """All of the task's metrics for ``params [K, P]``, in batched ``task.evaluate`` calls of ``chunk``."""
    params = as_tensor(params)  # [K, P]
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, params.shape[0], chunk):
        out = task.evaluate(params[i:i + chunk], device=device)
        for name, values in out.items():
            parts.setdefault(name, []).append(torch.as_tensor(values).detach().double().cpu().numpy())
    return {name: np.concatenate(v) for name, v in parts.items()}


def metric_of(task, params, metric: str, *, device=None, chunk: int = 256) -> np.ndarray:
    """One metric ``[K]`` of ``params [K, P]``; ValueError when the task does not report it."""
    out = evaluate_metrics(task, params, device=device, chunk=chunk)
    if metric not in out:
        raise ValueError(f"task {getattr(task, 'name', task)!r} reports the metrics {sorted(out)}, not "
                         f"{metric!r}: pass the task the generator was trained for")
    return out[metric]


def generate(gen, start, start_metric, target, *, sampler: str | None, steps: int | None, guidance: float | None,
             seed: int, chunk: int = 256, parts: dict | None = None, constraint=None, constrain_from: float = 0.5):
    """``gen.generate`` over ``start [N, P]`` in chunks, with one seeded ``torch.Generator`` -> ``[N, P]``
    (``sampler``, ``steps``, ``guidance`` None: the generator's own; ``parts``: condition parts by name); with a
    ``constraint`` (see ``Generator.generate``) a ``Projection`` of all N."""
    start = as_tensor(start)  # [N, P]
    start_metric = torch.as_tensor(np.asarray(start_metric, dtype=np.float32)).reshape(-1)  # [N]
    target = torch.as_tensor(np.asarray(target, dtype=np.float32)).reshape(-1)  # [N]
    if not (start.shape[0] == start_metric.shape[0] == target.shape[0]):
        raise ValueError(f"start [{start.shape[0]}], start_metric [{start_metric.shape[0]}] and target "
                         f"[{target.shape[0]}] must have the same length")
    rng = torch.Generator().manual_seed(seed)
    extra = {} if parts is None else {"parts": parts}
    if constraint is not None:
        extra.update(constraint=constraint, constrain_from=constrain_from)
    out = [gen.generate(start[i:i + chunk], start_metric[i:i + chunk], target[i:i + chunk],
                        sampler=sampler, steps=steps, guidance=guidance, generator=rng, **extra)
           for i in range(0, start.shape[0], chunk)]
    if constraint is not None:
        return Projection(*(torch.cat([getattr(o, f).detach().float().cpu() for o in out])
                            for f in ("params", "distance", "pruned_mass")))
    return torch.cat([o.detach().float().cpu() for o in out]) if out else start.clone()  # [N, P]


def run_endpoints(store, runs) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first (initial) and last checkpoint of each run in ``runs``, in that order."""
    runs = np.asarray(runs, dtype=np.int64)
    idx = np.nonzero(np.isin(store.run_ids, runs))[0]
    order = np.lexsort((np.asarray(store.steps)[idx], np.asarray(store.run_ids)[idx]))
    idx = idx[order]
    rid = np.asarray(store.run_ids)[idx]  # sorted by run, then step
    new = np.r_[True, rid[1:] != rid[:-1]]
    first = dict(zip(rid[new].tolist(), idx[new].tolist()))
    last = dict(zip(rid[np.r_[new[1:], True]].tolist(), idx[np.r_[new[1:], True]].tolist()))
    missing = [r for r in runs.tolist() if r not in first]
    if missing:
        raise ValueError(f"runs {missing[:5]} have no checkpoints in the store at {store.root}")
    return (np.array([first[r] for r in runs.tolist()], dtype=np.int64),
            np.array([last[r] for r in runs.tolist()], dtype=np.int64))


def held_out_runs(store, runs: int | Sequence[int], notes: list[str]) -> np.ndarray:
    """``runs`` held-out run ids: the first ``runs`` of ``store.test_runs`` (capped, with a note), or the
    given ids as they are."""
    test_runs = np.asarray(store.test_runs, dtype=np.int64)
    if not isinstance(runs, (int, np.integer)):
        return np.asarray(runs, dtype=np.int64)
    if test_runs.size == 0:
        raise ValueError(f"the store at {store.root} holds no held-out runs: rebuild it with a test split "
                         f"(finalize_store) or pass explicit run ids")
    if runs > test_runs.size:
        notes.append(f"runs={runs} capped at the {test_runs.size} held-out runs of the store")
    return test_runs[:max(1, min(int(runs), test_runs.size))]


def start_points(task, store, runs, metric: str, *, device=None) -> tuple[Tensor, np.ndarray]:
    """Initial checkpoints ``[R, P]`` of ``runs`` and their metric ``[R]``; metrics missing in the store
    (NaN, as the recorder may leave them for the initial checkpoint) are measured with the task."""
    first, _ = run_endpoints(store, runs)
    params = as_tensor(store.params(first))  # [R, P]
    values = np.asarray(store.metrics(first)[metric], dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        values[bad] = metric_of(task, params[torch.as_tensor(bad)], metric, device=device)
    return params, values


def trained_checkpoints(store, runs) -> np.ndarray:
    """Indices of every checkpoint of ``runs`` except each run's initial one (sorted)."""
    runs = np.unique(np.asarray(runs, dtype=np.int64))
    idx = np.nonzero(np.isin(store.run_ids, runs))[0]
    return np.setdiff1d(idx, run_endpoints(store, runs)[0]) if runs.size else idx


def checkpoints_near(store, indices, values, count: int, *, metric: str) -> np.ndarray:
    """Up to ``count`` distinct checkpoints among ``indices`` whose stored metric is closest to ``values``
    (round robin over ``values``, so each value gets its own nearest ones first)."""
    idx = np.asarray(indices, dtype=np.int64)
    m = np.asarray(store.metrics(idx)[metric], dtype=np.float64)
    idx, m = idx[np.isfinite(m)], m[np.isfinite(m)]
    order = np.argsort(np.abs(m[None, :] - np.asarray(values, dtype=np.float64).reshape(-1, 1)), axis=1)
    chosen: dict[int, None] = {}
    for rank in range(order.shape[1]):
        for row in order[:, rank]:
            chosen.setdefault(int(idx[row]))
            if len(chosen) >= count:
                return np.array(list(chosen), dtype=np.int64)
    return np.array(list(chosen), dtype=np.int64)


def logits(task, params, x: Tensor, *, device=None, chunk: int = 64) -> Tensor:
    """Outputs ``[K, B, C]`` of the task's model for ``params [K, P]`` on inputs ``x [B, ...]``, vectorized
    over networks with ``functional_call`` under ``vmap`` (eval mode)."""
    model = task.build_model().to(device).eval()
    x = x.to(device)
    params = as_tensor(params).to(device)  # [K, P]

    def forward(tensors, inputs):
        return functional_call(model, tensors, (inputs,))

    outs = []
    with torch.no_grad():
        for i in range(0, params.shape[0], chunk):
            tensors = vector_to_tensors(params[i:i + chunk], task.layer_shapes)  # name -> [k, *shape]
            outs.append(torch.func.vmap(forward, in_dims=(0, None))(tensors, x).cpu())  # [k, B, C]
    return torch.cat(outs)  # [K, B, C]


def predictions(task, params, split: str = "test", *, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels ``[K, n]`` of ``params [K, P]`` on a split, and the split's labels ``[n]``."""
    x, y = task.split(split)
    return logits(task, params, x, device=device).argmax(-1).numpy(), np.asarray(y)


def wrong_iou(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p-diff's similarity: IoU of the sets of wrongly predicted examples, ``[K]`` from ``[K, n]`` pairs
    (1 when neither network makes a mistake)."""
    wa, wb = pred_a != labels, pred_b != labels  # [K, n]
    union = (wa | wb).sum(-1)
    return np.where(union > 0, (wa & wb).sum(-1) / np.maximum(union, 1), 1.0)


def aligned_to(reference: Tensor, others: Tensor, spec, max_iter: int = 100) -> Tensor:
    """``others [K, P]`` with hidden units permuted by weight matching to best match ``reference [P]``."""
    if spec is None or not spec.groups:
        return others.clone()
    out = []
    for row in others:  # [P]; Hungarian matching has no batched form
        perms = weight_matching(reference, row, spec, max_iter=max_iter)
        out.append(apply_permutations(row[None], spec, [p[None] for p in perms]))  # [1, P]
    return torch.cat(out) if out else others.clone()  # [K, P]


def sorted_features(params: Tensor, layer_shapes) -> Tensor:
    """Each layer's entries sorted: ``[K, P]`` features invariant to every hidden-unit permutation. Their
    distance is a lower bound of the aligned distance (rearrangement inequality), a cheap prefilter."""
    layers = LayerShapes.of(layer_shapes).split(params)  # name -> [K, *shape]
    return torch.cat([t.reshape(t.shape[0], -1).sort(dim=1).values for t in layers.values()], dim=1)  # [K, P]


def nearest_aligned(queries: Tensor, store, pool: np.ndarray, spec, *, candidates: int = 8, chunk: int = 4096,
                    pool_params: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``queries [Q, P]``, the aligned L2 distance to its nearest checkpoint among the store
    indices ``pool``, and that checkpoint's index. Candidates: the ``candidates`` nearest by sorted-feature
    distance plus the 2 nearest by raw distance, both found exactly over the whole pool (scanned in
    chunks); then weight matching against each candidate. ``pool_params [len(pool), P]`` gives the pool's
    vectors instead of reading the store (e.g. updates; ``pool`` then only labels them)."""
    layer_shapes = store.layer_shapes

    def fetch(rows: np.ndarray) -> Tensor:
        return as_tensor(store.params(pool[rows])) if pool_params is None else pool_params[torch.as_tensor(rows)]

    qf = sorted_features(queries, layer_shapes)  # [Q, P]
    k_sorted, k_raw = min(candidates, pool.size), min(2, pool.size)
    best = {"sorted": (torch.full((len(queries), 0), math.inf), torch.zeros(len(queries), 0, dtype=torch.long)),
            "raw": (torch.full((len(queries), 0), math.inf), torch.zeros(len(queries), 0, dtype=torch.long))}
    for i in range(0, pool.size, chunk):
        block = fetch(np.arange(i, min(i + chunk, pool.size)))  # [c, P]
        ids = torch.arange(i, i + block.shape[0])
        for name, d, k in (("sorted", torch.cdist(qf, sorted_features(block, layer_shapes)), k_sorted),
                           ("raw", torch.cdist(queries, block), k_raw)):
            dist = torch.cat([best[name][0], d], dim=1)  # [Q, k + c]
            cand = torch.cat([best[name][1], ids.expand(len(queries), -1)], dim=1)
            top = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
            best[name] = (top.values, cand.gather(1, top.indices))
    nearest_d, nearest_i = np.full(len(queries), np.inf), np.zeros(len(queries), dtype=np.int64)
    for q in range(len(queries)):
        cand = np.unique(torch.cat([best["sorted"][1][q], best["raw"][1][q]]).numpy())
        dist = (aligned_to(queries[q], fetch(cand), spec) - queries[q]).norm(dim=1)  # [c]
        j = int(dist.argmin())
        nearest_d[q], nearest_i[q] = float(dist[j]), int(pool[cand[j]])
    return nearest_d, nearest_i


# ------------------------------------------------------------------ helpers shared by the sections
InitScheme = Literal["default", "xavier", "kaiming", "orthogonal"]
OOD_SCHEMES: tuple[InitScheme, ...] = ("xavier", "kaiming", "orthogonal")


def mode_notes(gen, section: str, notes: list[str]) -> None:
    """Say when the generator ignores the start (start-free) or the target (unconditional)."""
    if not getattr(gen, "uses_start", True):
        notes.append(f"{section}: start-free generator: the starts are ignored (conditioned on the prompts only)")
    if not getattr(gen, "conditional", True):
        notes.append(f"{section}: unconditional generator: the prompts are ignored")


def random_inits(task, schemes: Sequence[str], num_inits: int, seed: int):
    """``num_inits`` inits per scheme ``[S*n, P]``, their per-network seeds and scheme labels. Network i is
    ``task.init_params(1, Generator(seed_i), scheme)``, which ``train_population`` rebuilds from the seed."""
    seeds = np.random.default_rng(seed).integers(2**62, size=(len(schemes), num_inits))
    labels = [s for s in schemes for _ in range(num_inits)]
    inits = torch.cat([task.init_params(1, torch.Generator().manual_seed(int(s)), scheme)
                       for scheme, row in zip(schemes, seeds) for s in row])  # [S*n, P]
    return inits, seeds.ravel().tolist(), labels


def final_median(gen, store) -> float | None:
    """Median final metric of the training runs (None without a store)."""
    if store is None or len(store.train_runs) == 0:
        return None
    _, last = run_endpoints(store, store.train_runs)
    return summary(store.metrics(last)[gen.metric])["median"]


def generate_best(gen, task, store, run_ids, count: int, *, sampler, steps, guidance, seed, device):
    """Networks prompted to the data's best metric from the first ``count`` runs' initial checkpoints
    -> (params [G, P], achieved metric [G])."""
    start, start_metric = start_points(task, store, run_ids[:count], gen.metric, device=device)
    out = generate(gen, start, start_metric, np.full(len(start), best_value(gen)), sampler=sampler, steps=steps,
                   guidance=guidance, seed=seed)  # [G, P]
    return out, metric_of(task, out, gen.metric, device=device)
