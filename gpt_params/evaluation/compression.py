"""Compressed networks, section 8 of the evaluation suite (report key ``compression``).

For each requested (sparsity, bits), from the same held-out default inits, the test error of:
- ``generated``: the generator prompted with the sparsity and bits parts, its x0 predictions projected exactly
  onto them from ``constrain_from`` of the sampler's steps on and at the end (reported beside: the error of
  the same prompts generated without any projection, of those projected at the end only, and the distance
  the projection moved the model's last own prediction: a generator that learned the constraint barely moves), and G.pt's prompt alignment R^2 at that constraint (``alignment_prompts`` prompts
  from the best final metric of the generator's training runs at it, the prompt of every row, to each init's);
- ``dense_then_compressed``: the same generator prompted dense (sparsity 0, 32 bits), then pruned and
  quantized afterwards, and after a short masked, quantization-aware fine-tune (``finetune_steps`` of Adam);
- ``sparse_from_start``: the store's own test runs built with that sparsity and bit width (gradual pruning
  and QAT), and the Adam steps that training needs from the same inits to match the generated networks;
- ``ticket_mode``: only the generated network's mask, applied to the init and trained once;
- ``lottery_tickets``: iterative magnitude pruning over ``ticket_rounds`` trainings, rewound to the init, then
  a final training (cost: ``ticket_rounds + 1`` trainings);
- ``random_masks``: a random mask of the same sparsity, trained.
Trainings use Adam (lr 1e-3) for the store's epochs through ``supervised.train_supervised``. Needs a
``ClassificationTask`` with the metrics ``sparsity`` and ``bits`` (the task option ``compression=True``);
generators without the parts sparsity and bits get the dense-then-compressed rows only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure

from checkpoints_dataset.compress import FLOAT_BITS, magnitude_mask, prunable_names
from checkpoints_dataset.optim import PopulationConfig
from checkpoints_dataset.tasks.supervised import train_supervised
from gpt_params.core.compression import project
from gpt_params.evaluation.alignment import alignment_r2
from gpt_params.evaluation.common import best_value, generate, summary

ADAM = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "init_scale": 1.0}


def _train(task, inits, seeds, *, epochs: int, bits: int, masks=None, sparsity: float = 0.0, device=None,
           checkpoints: int = 2, compress_start: float = 0.0):
    """Adam from ``inits [K, P]`` with fixed ``masks`` (or gradual pruning to ``sparsity``) and QAT at ``bits``."""
    k = inits.shape[0]
    config = PopulationConfig(runs=k, group_size=k, epochs=epochs, num_checkpoints=checkpoints,
                              sparsity=(float(sparsity),), bits=(int(bits),), compress_start=compress_start,
                              compress_end=max(compress_start, 0.75) if sparsity else 1.0)
    hparams = [{"run_id": i, "seed": int(s), "sparsity": float(sparsity), "bits": int(bits), **ADAM}
               for i, s in enumerate(seeds)]
    return train_supervised(task, hparams, config, device or "cpu", init=inits, masks=masks)


def _masks_of(task, params, names):
    split = task.layer_shapes.split(params)
    return {n: split[n] != 0 for n in names}


def train_ticket(task, start, generated, names: list[str], *, epochs: int, bits: int = FLOAT_BITS, seed: int = 0,
                 device=None):
    """The ticket mode: ``generated [K, P]``'s mask (its nonzero prunable weights) on ``start [K, P]``, trained
    ``epochs`` epochs with Adam (lr 1e-3), the mask fixed and quantization-aware at ``bits`` -> ``[K, P]``."""
    seeds = [seed * 1000 + i for i in range(start.shape[0])]
    return _train(task, start, seeds, epochs=epochs, bits=bits, masks=_masks_of(task, generated, names),
                  device=device).params[:, -1]


def _store_runs(store, runs, sparsity: float, bits: int, metric: str):
    """Final ``metric`` of the held-out ``runs`` built with this sparsity and bit width."""
    out = []
    for r in runs:
        h = store.run_hparams(int(r))
        if math.isclose(h.get("sparsity", 0.0), sparsity) and int(h.get("bits", FLOAT_BITS)) == bits:
            out.append(float(store.metrics([store.run_checkpoints(int(r))[-1]])[metric][0]))
    return np.asarray(out)


def compression(gen, task, store, runs, *, targets=((0.8, 32), (0.9, 32), (0.0, 3), (0.0, 2), (0.9, 4)),
                num_inits: int = 8, finetune_steps: int = 200, ticket_rounds: int = 5, epochs: int | None = None,
                alignment_prompts: int = 10, constrain_from: float = 0.5,
                report_metric: str = "test_error", sampler=None, steps=None, guidance=None, seed: int = 0,
                device=None, notes: list[str] | None = None) -> tuple[dict, Figure]:
    notes = [] if notes is None else notes
    if not {"sparsity", "bits"} <= set(task.metric_names) or not hasattr(task, "split"):
        notes.append("compression: skipped (needs a classification task with the metrics sparsity and bits: "
                     "--task-option compression=True)")
        return {"skipped": True}, Figure()
    names = prunable_names(task.build_model())
    parts = {p.name for p in gen.parts}
    built = store.manifest.get("build_config") or {}
    epochs = int(epochs or built.get("epochs", 20))
    g = torch.Generator().manual_seed(seed)
    inits = task.init_params(num_inits, g)                                                  # [K, P]
    seeds = [seed * 1000 + i for i in range(num_inits)]
    init_metric = task.evaluate(inits)[gen.metric]
    n_train = len(task.split("train")[1])
    per_epoch = max(1, n_train // 64)
    training = [r for r in store.train_runs if int(r) not in set(gen.info.val_runs)]
    rows = {}
    for sparsity, bits in targets:
        key = f"sparsity{sparsity:g}_bits{bits}"
        row: dict = {"sparsity": sparsity, "bits": bits}
        own = _store_runs(store, training, sparsity, bits, gen.metric)   # the generator's data at this constraint
        prompt = float(np.min(own) if gen.lower_is_better else np.max(own)) if len(own) else best_value(gen)
        row["prompt"] = prompt

        def score(params):
            m = task.evaluate(params)
            return {report_metric: summary(m[report_metric].numpy()), gen.metric: summary(m[gen.metric].numpy()),
                    "sparsity": summary(m["sparsity"].numpy()), "bits": summary(m["bits"].numpy())}

        def compressed(params, scores=None):   # scores: a mask channel's, what to keep by
            return project(params, task.layer_shapes, names, sparsity, None if bits >= FLOAT_BITS else bits,
                           scores=scores)

        if {"sparsity", "bits"} <= parts:
            given = {"sparsity": sparsity, "bits": bits}
            raw = generate(gen, inits, init_metric, np.full(num_inits, prompt), sampler=sampler, steps=steps,
                           guidance=guidance, seed=seed, parts=given)
            proj = generate(gen, inits, init_metric, np.full(num_inits, prompt), sampler=sampler, steps=steps,
                            guidance=guidance, seed=seed, parts=given, constraint=compressed,
                            constrain_from=constrain_from)
            row["generated"] = {**score(proj.params), "before_projection": score(raw)[report_metric],
                                "distance": summary(proj.distance.numpy()),
                                "projected_at_end_only": score(compressed(raw).params)[report_metric]}
            generated_metric = task.evaluate(proj.params)[gen.metric].numpy()
            # G.pt's prompt alignment at this constraint: prompts from the data's best there to each init's
            prompted = np.linspace(np.full(num_inits, prompt), init_metric.numpy(), alignment_prompts, axis=1)  # [K, M]
            many = generate(gen, inits.repeat_interleave(alignment_prompts, 0),
                            init_metric.numpy().repeat(alignment_prompts), prompted.ravel(), sampler=sampler,
                            steps=steps, guidance=guidance, seed=seed, parts=given, constraint=compressed,
                            constrain_from=constrain_from)
            achieved = task.evaluate(many.params)[gen.metric].numpy().reshape(prompted.shape)
            r2 = alignment_r2(prompted, achieved)
            row["alignment"] = {"median": float(np.nanmedian(r2)), "mean": float(np.nanmean(r2)),
                                "num_prompts": alignment_prompts}
            # ticket mode: only the generated mask, on the init, trained once
            ticket = train_ticket(task, inits, proj.params, names, epochs=epochs, bits=bits, seed=seed, device=device)
            row["ticket_mode"] = {**score(ticket), "trainings": 1}
        else:
            generated_metric = None
            notes.append("compression: the generator has no sparsity and bits parts; only its dense output is "
                         "compressed afterwards")
        dense = generate(gen, inits, init_metric, np.full(num_inits, prompt), sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                         parts={k: v for k, v in (("sparsity", 0.0), ("bits", FLOAT_BITS)) if k in parts}).cpu()
        after = compressed(dense).params
        tuned = _train(task, after, seeds, epochs=max(1, math.ceil(finetune_steps / per_epoch)), bits=bits,
                       masks=_masks_of(task, after, names), device=device)
        row["dense_then_compressed"] = {"one_shot": score(after), "finetuned": score(tuned.params[:, -1]),
                                        "finetune_steps": int(tuned.steps[-1])}
        scratch = _train(task, inits, seeds, epochs=epochs, bits=bits, sparsity=sparsity, device=device,
                         checkpoints=40, compress_start=0.25)
        row["sparse_from_start"] = {"store_runs": summary(_store_runs(store, runs, sparsity, bits, report_metric)),
                                    "adam": score(scratch.params[:, -1]), "total_steps": int(scratch.steps[-1])}
        if generated_metric is not None:
            row["sparse_from_start"]["steps_to_match"] = _steps_to_match(scratch, gen.metric, generated_metric,
                                                                         sparsity, bits, gen.lower_is_better)
        row["lottery_tickets"] = _tickets(task, inits, seeds, names, sparsity, bits, epochs, ticket_rounds, device,
                                          score)
        rand = torch.Generator().manual_seed(seed + 1)
        random_masks = {n: magnitude_mask(torch.rand(num_inits, *task.layer_shapes[n], generator=rand),
                                          torch.full((num_inits,), float(sparsity))) for n in names}
        row["random_masks"] = score(_train(task, inits, seeds, epochs=epochs, bits=bits, masks=random_masks,
                                           device=device).params[:, -1])
        rows[key] = row
    return {"metric": report_metric, "num_inits": num_inits, "epochs": epochs, "rows": rows}, _figure(rows, report_metric)


def _steps_to_match(result, metric: str, generated: np.ndarray, sparsity: float, bits: int,
                    lower_is_better: bool = True) -> dict:
    """The first checkpoint step at which each sparse-from-the-start run is at the constraint and at least as
    good as the generated network from its init (runs that never are count as above the last step)."""
    values = result.metrics[metric].numpy()                                # [K, E]
    on = (result.metrics["sparsity"].numpy() >= sparsity - 0.002) & (result.metrics["bits"].numpy() <= bits)
    steps = result.steps.numpy()
    out = []
    for k in range(values.shape[0]):
        good = values[k] <= generated[k] if lower_is_better else values[k] >= generated[k]
        hit = np.nonzero(on[k] & good)[0]
        out.append(float(steps[hit[0]]) if len(hit) else math.inf)
    finite = [v for v in out if math.isfinite(v)]
    return {"median": float(np.median(out)) if finite else None, "above_cap": len(out) - len(finite),
            "cap": int(steps[-1])}


def _tickets(task, inits, seeds, names, sparsity, bits, epochs, rounds, device, score) -> dict:
    """Iterative magnitude pruning with rewinding to the init: ``rounds`` trainings, each pruning to the next
    of ``1 - (1 - s)^(k / rounds)``, then the final training of the ticket (QAT at ``bits`` there)."""
    k = inits.shape[0]
    masks = {n: torch.ones(k, *task.layer_shapes[n], dtype=torch.bool) for n in names}
    for r in range(1, rounds + 1):
        trained = _train(task, inits, seeds, epochs=epochs, bits=FLOAT_BITS, masks=masks, device=device).params[:, -1]
        level = 1 - (1 - sparsity) ** (r / rounds)
        split = task.layer_shapes.split(trained)
        masks = {n: masks[n] & magnitude_mask(split[n] * masks[n], torch.full((k,), level)) for n in names}
    final = _train(task, inits, seeds, epochs=epochs, bits=bits, masks=masks, device=device).params[:, -1]
    return {**score(final), "trainings": rounds + 1}


def _figure(rows: dict, metric: str) -> Figure:
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    methods = [("generated", lambda r: r.get("generated", {}).get(metric, {}).get("median")),
               ("dense, compressed", lambda r: r["dense_then_compressed"]["one_shot"][metric]["median"]),
               ("+ fine-tune", lambda r: r["dense_then_compressed"]["finetuned"][metric]["median"]),
               ("sparse from start", lambda r: r["sparse_from_start"]["adam"][metric]["median"]),
               ("ticket mode", lambda r: r.get("ticket_mode", {}).get(metric, {}).get("median")),
               ("tickets", lambda r: r["lottery_tickets"][metric]["median"]),
               ("random masks", lambda r: r["random_masks"][metric]["median"])]
    keys = list(rows)
    width = 0.8 / len(methods)
    for j, (label, get) in enumerate(methods):
        vals = [get(rows[k]) for k in keys]
        ax.bar(np.arange(len(keys)) + j * width, [np.nan if v is None else v for v in vals], width, label=label)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [k.replace("_", "\n") for k in keys], fontsize=7)
    ax.set_ylabel(f"{metric} (median)")
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("compressed networks from the same inits")
    return fig
