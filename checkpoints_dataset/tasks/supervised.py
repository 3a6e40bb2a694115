"""The generic supervised population trainer (``ClassificationTask.train_population``), dense or compressed.

R runs train together: one ``vmap(grad(loss))`` gives every run's gradient on its own minibatch, and
``optimizer_step`` applies each run's AdamW or SGD-momentum. A run whose hparams carry ``sparsity`` > 0 or
``bits`` < 32 (``PopulationConfig.sparsity`` / ``.bits``) trains dense for the first ``compress_start`` of its
steps and compressed after: gradual magnitude pruning of its Linear/Conv weights (the mask re-drawn up to 100
times along the cubic ramp, fixed after ``compress_end``), and quantization-aware training (per-row fake
quantization with a straight-through gradient, the bit width a per-run input under ``vmap``). So each run
holds its own dense "twin" (its early checkpoints) and its compressed network; checkpoints store the masked,
dequantized weights, which is what the metrics score.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from ..compress import FLOAT_BITS, fake_quantize, gmp_sparsity, magnitude_mask, prunable_names, quantize_rows
from ..optim import (GroupResult, PopulationConfig, adam_first, checkpoint_schedule, init_optimizer_state, optimizer_step,
                     run_generators)
from ..params import LayerShapes

MASK_UPDATES = 100       # mask redraws along the pruning ramp (Zhu & Gupta prune every dT steps, not every step)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy ``[N]`` of ``logits [N, classes]``; faster than F.cross_entropy under vmap."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None])[:, 0]


def compressed_schedule(total: int, num_checkpoints: int, start: int) -> list[int]:
    """Checkpoint steps of a compressed build: half of them geometric over the dense start (as
    ``checkpoint_schedule``), the rest evenly spaced over the compression and after it, to the last step."""
    dense = checkpoint_schedule(start, max(2, num_checkpoints // 2)) if start >= 1 else [0]
    rest = torch.linspace(start, total, num_checkpoints - len(dense) + 1).round().long().tolist()[1:]
    return sorted(set(dense) | set(rest) | {total})


def train_supervised(task, hparams: list[dict], config: PopulationConfig, device: torch.device,
                     progress: Callable[[float], None] | None = None, *, init: Tensor | None = None,
                     masks: dict[str, Tensor] | None = None) -> GroupResult:
    """Train the runs of ``hparams`` on ``task.split("train")`` (see ``ClassificationTask.train_population``).

    For baselines and fine-tuning (the evaluation's compression section): ``init [R, P]`` replaces the runs'
    own inits (``init_scale`` still applies), and ``masks`` (prunable weight name -> bool ``[R, *shape]``)
    fixes every run's mask from the first step on instead of pruning gradually."""
    device = torch.device(device)
    order = adam_first(torch.tensor([h["optimizer"] == "adam" for h in hparams]))  # trained in this order
    hparams = [hparams[i] for i in order]
    R = len(hparams)
    x_train, y_train = (t.to(device) for t in task.split("train"))
    batch = min(config.batch_size, len(y_train))
    steps_per_epoch = len(y_train) // batch
    total = steps_per_epoch * config.epochs
    start = round(config.compress_start * total)                        # compressed runs: dense until here
    end = max(start, min(total, round(config.compress_end * total)))   # the last redraw: final sparsity
    schedule = (compressed_schedule(total, config.num_checkpoints, start) if config.compressed
                else checkpoint_schedule(total, config.num_checkpoints))

    init_gens, gens = run_generators(hparams)                                # init, then data order
    drawn = torch.cat([task.init_params(1, g, h.get("init_scheme", "default")) for g, h in zip(init_gens, hparams)])
    init = drawn if init is None else init.float().cpu()[order]           # the generators advance either way
    model = copy.deepcopy(task._eval_model).train()
    replace_all_batch_norm_modules_(model)              # batch statistics only, no in-place buffers
    trainable = LayerShapes({k: v.shape for k, v in model.named_parameters()})  # no float buffers
    init_t = task.layer_shapes.split(init.to(device))                    # name -> [R, *shape]
    hp = {k: torch.tensor([float(h[k]) for h in hparams], device=device)
          for k in ("lr", "weight_decay", "momentum", "init_scale")}     # name -> [R]
    is_adam = torch.tensor([h["optimizer"] == "adam" for h in hparams], device=device)
    flat = trainable.join(init_t) * hp["init_scale"][:, None]          # [R, P'] trainable only
    fixed = {k: v for k, v in init_t.items() if k not in trainable}    # float buffers (BN stats)

    sparsity = torch.tensor([float(h.get("sparsity", 0.0)) for h in hparams], device=device)  # [R] final
    bits = torch.tensor([float(h.get("bits", FLOAT_BITS)) for h in hparams], device=device)    # [R]
    prunable = [n for n in prunable_names(model) if n in trainable]
    fixed_masks = masks is not None
    masks = ({n: masks[n].to(device=device, dtype=torch.bool)[order.to(device)] for n in prunable} if fixed_masks
             else {n: torch.ones(R, *trainable[n], dtype=torch.bool, device=device) for n in prunable})
    redraw = max(1, round((end - start) / MASK_UPDATES))
    final_drawn = False

    def compressed(p: dict, b: Tensor) -> dict:
        """One run's tensors as its forward sees them: prunable weights fake-quantized to ``b`` bits."""
        return {k: fake_quantize(v, b) if k in masks else v for k, v in p.items()}

    compress = bool(fixed_masks or (sparsity > 0).any() or (bits < FLOAT_BITS).any())
    if fixed_masks:
        views = trainable.split(flat)
        for n in prunable:
            views[n].mul_(masks[n])                                      # masked from the first step

    def loss_fn(p, x, y, b):   # dense groups skip the quantizer (it would be the identity)
        return cross_entropy(functional_call(model, compressed(p, b) if compress else p, (x,)), y).mean()

    grad_fn = vmap(grad(loss_fn))                                        # per run: own params, batch, bits
    bn_names = [n for n, m in task._eval_model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bn_x = x_train[:task.bn_stats_size]

    def bn_stats(p, x):
        stats = {}

        def hook(name):
            def f(_, inp):
                a = inp[0]
                dims = [0, *range(2, a.dim())]                           # all but channels
                stats[f"{name}.running_mean"] = a.mean(dims)
                stats[f"{name}.running_var"] = a.var(dims, unbiased=True)
            return f

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in bn_names]
        try:
            functional_call(model, p, (x,))
        finally:
            for h in handles:
                h.remove()
        return stats

    def snapshot(flat: Tensor, b: Tensor) -> Tensor:
        p = trainable.split(flat)
        if compress:   # what the run computes with
            p = {k: vmap(quantize_rows)(v, b) if k in masks else v for k, v in p.items()}
        tensors = dict(fixed)
        if bn_names:
            with torch.no_grad():
                tensors.update(vmap(bn_stats, in_dims=(0, None))(p, bn_x))
        return task.layer_shapes.join({**tensors, **p}).float()          # [R, P]

    state = init_optimizer_state(flat)
    vectors, metrics = [], []
    step, next_ck = 0, 0
    perms = None
    while True:
        b_now = torch.where(torch.tensor(step >= start, device=device) & (bits < FLOAT_BITS), bits,
                            torch.full_like(bits, FLOAT_BITS)) if compress else bits   # [R] dense before start
        if step == schedule[next_ck]:
            vec = snapshot(flat, b_now)                                  # [R, P]
            vectors.append(vec.cpu())
            metrics.append(task.evaluate(vec, device=device))
            next_ck += 1
            if next_ck == len(schedule):
                break
        if step % steps_per_epoch == 0:
            perms = torch.stack([torch.randperm(len(y_train), generator=g) for g in gens]).to(device)  # [R, n]
            if progress is not None and step:
                progress(steps_per_epoch / total)
        s = step % steps_per_epoch
        idx = perms[:, s * batch:(s + 1) * batch].reshape(-1)            # [R*B]
        xb = x_train.index_select(0, idx).view(R, batch, *x_train.shape[1:])  # [R, B, ...]
        yb = y_train.index_select(0, idx).view(R, batch)                # [R, B]
        grads = grad_fn(trainable.split(flat), xb, yb, b_now)            # name -> [R, *shape]
        flat = optimizer_step(flat, trainable.join(grads), state, is_adam,
                              hp["lr"], hp["weight_decay"], hp["momentum"])   # [R, P']
        step += 1
        if compress and step >= start:
            views = trainable.split(flat)                                # name -> [R, *shape] views of flat
            if not fixed_masks and not final_drawn and (step >= end or (step - start) % redraw == 0):
                final_drawn = step >= end
                target = gmp_sparsity(step, start, end, sparsity)  # [R]
                for n in prunable:   # masks only shrink: a pruned entry never comes back
                    masks[n] &= magnitude_mask(views[n] * masks[n], target)
            for n in prunable:
                views[n].mul_(masks[n])                                  # pruned entries stay exactly zero
    if progress is not None:
        progress(steps_per_epoch / total)
    back = torch.argsort(order)                                          # the caller's run order
    return GroupResult(
        params=torch.stack(vectors, dim=1)[back],                        # [R, C, P]
        steps=torch.tensor(schedule, dtype=torch.int64),                 # [C]
        epochs=torch.tensor(schedule, dtype=torch.float64) / steps_per_epoch,
        metrics={m: torch.stack([c[m] for c in metrics], dim=1)[back] for m in task.metric_names})  # [R, C]
