"""Callbacks: GeneratorEMA (the weights prompting uses), AlignmentMonitor (prompt alignment in TensorBoard
while training) and ParameterPrompter (a trained generator as a learned optimizer inside another project's
training)."""
from __future__ import annotations

import itertools
from typing import Callable, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, WeightAveraging
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch.optim.swa_utils import get_ema_avg_fn

from checkpoints_dataset.params import float_layer_shapes, state_dict_to_vector, vector_to_tensors
from gpt_params.core.generator import Generator
from gpt_params.evaluation import prompt_alignment
from gpt_params.evaluation.common import best_value, start_points
from gpt_params.evaluation.denoise import log_spaced, render_networks, strip_figure, trajectory


class GeneratorEMA(WeightAveraging):
    """The exponential moving average of a generator's weights (Lightning's ``WeightAveraging`` with an EMA
    ``avg_fn``, as ``EMAWeightAveraging``), which prompting uses: the checkpoint's ``state_dict`` holds the
    average, and it is copied into the model when training ends.

    - Updates start after ``start_fraction`` of ``max_steps``, so the same config suits a 12-step test and a
      100k-step run (``start_fraction: null`` keeps ``update_starting_at_step``), then every
      ``update_every_n_steps`` steps.
    - Floating-point tensors are averaged; the generator's integer buffers (token ids) are copied, where a plain
      EMA would round them down (0.95 * 13 + 0.05 * 13 = 12.999... -> 12).
    - Latent space: once the autoencoder is frozen (step ``autoencoder.steps``), its averaged copy takes the
      frozen weights at every update instead of averaging them, so the averaged DiT is trained on and decoded by
      the autoencoder its latents came from.
    """

    def __init__(self, decay: float = 0.995, start_fraction: Optional[float] = 0.1,
                 update_starting_at_step: Optional[int] = None, update_every_n_steps: int = 1,
                 device: Optional[str] = None, use_buffers: bool = True) -> None:
        if start_fraction is not None and not 0.0 <= start_fraction < 1.0:
            raise ValueError(f"start_fraction must be in [0, 1), got {start_fraction}")
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=self._average)
        self.decay, self.start_fraction, self.use_buffers = decay, start_fraction, use_buffers
        self.update_starting_at_step, self.update_every_n_steps = update_starting_at_step, update_every_n_steps
        self._ema = get_ema_avg_fn(decay)
        # AveragedModel calls avg_fn once per tensor of chain(parameters(), buffers()), in that order, at each
        # update: the position of a call names the tensor on any device (the average may live elsewhere).
        self._position = 0
        self._copied: set[int] = set()   # positions whose average is a copy (a frozen autoencoder's tensors)

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        position, self._position = self._position, self._position + 1
        if not averaged.is_floating_point() or position in self._copied:
            return current
        return self._ema(averaged, current, num_averaged)

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        start = self.update_starting_at_step
        return (step_idx is not None and (start is None or step_idx >= start)
                and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.start_fraction is not None and trainer.max_steps and trainer.max_steps > 0:
            self.update_starting_at_step = int(self.start_fraction * trainer.max_steps)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._position = 0   # this step's update (at batch end) starts at the first tensor
        gen = getattr(pl_module, "generator", None)
        if (not self._copied and gen is not None and gen.autoencoder is not None
                and pl_module.global_step >= gen.config.autoencoder.steps):
            frozen = {id(t) for t in itertools.chain(gen.autoencoder.parameters(), gen.autoencoder.buffers())}
            tensors = itertools.chain(pl_module.parameters(), pl_module.buffers() if self.use_buffers else ())
            self._copied = {i for i, t in enumerate(tensors) if id(t) in frozen}
            rank_zero_info(f"autoencoder frozen after {pl_module.global_step} steps; training the DiT on its latents")


def check_weight_averaging(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse weight-averaging callbacks that would hand back wrong weights: Lightning's plain EMA rounds the
    generator's integer buffers down and never syncs a frozen autoencoder, and an EMA starting after the last
    step would hand back the untrained weights (the average is copied into the model when training ends)."""
    gen = pl_module.generator
    max_steps = trainer.max_steps
    for cb in trainer.callbacks:
        if not isinstance(cb, WeightAveraging) or isinstance(cb, GeneratorEMA):
            pass
        elif getattr(cb, "_use_buffers", False) and any(not b.is_floating_point() for b in pl_module.buffers()):
            raise ValueError("EMAWeightAveraging would average the generator's integer buffers (token ids) and "
                             "round them down; use gpt_params.training.GeneratorEMA (the same options, "
                             "floating-point tensors only) in trainer.callbacks instead")
        elif gen.autoencoder is not None:
            raise ValueError(f"{type(cb).__name__} would keep averaging the autoencoder after it is frozen; in "
                             "latent space use gpt_params.training.GeneratorEMA in trainer.callbacks instead")
        start = getattr(cb, "update_starting_at_step", None)
        if isinstance(cb, (EMAWeightAveraging, GeneratorEMA)) and start is not None and 0 < max_steps <= start:
            raise ValueError(f"{type(cb).__name__} starts at step {start} but training stops at step "
                             f"{max_steps}: lower its update_starting_at_step (config trainer.callbacks) or "
                             "raise --trainer.max_steps")


class AlignmentMonitor(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, prompt the generator from the initial checkpoints of
    ``runs`` validation runs (held out from training; the store's test runs stay untouched for reported
    figures) with ``num_prompts`` targets each, and log the median R^2 (``val/alignment``) and the
    prompted-vs-achieved figure to TensorBoard; with ``strip`` > 0 also ``denoise/strip``: the predicted networks
    of ``strip_steps`` sampler steps from the first ``strip`` validation runs' inits, prompted for the data's
    best (``gpt-params denoise``'s picture: fields as images, other networks as first-layer tiles).

    Place it after ``EMAWeightAveraging`` in ``trainer.callbacks``: it runs at validation start, when
    the EMA weights are swapped in, so it measures the weights that prompting will use.
    """

    def __init__(self, every_n_epochs: int = 5, runs: int = 8, num_prompts: int = 10,
                 sampler: Optional[Literal["ddpm", "ddim", "dpm++"]] = None, steps: Optional[int] = None,
                 strip: int = 4, strip_steps: int = 10) -> None:
        self.every_n_epochs, self.runs, self.num_prompts = every_n_epochs, runs, num_prompts
        self.sampler, self.steps, self.strip, self.strip_steps = sampler, steps, strip, strip_steps

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or (epoch + 1) % self.every_n_epochs != 0:
            return
        data = trainer.datamodule
        if data is None or getattr(data, "task", None) is None:
            return
        value = torch.tensor(float("nan"), device=pl_module.device)
        if trainer.is_global_zero:
            value.fill_(self._measure(trainer, pl_module, data))
        pl_module.log("val/alignment", value, on_epoch=True, sync_dist=True, reduce_fx="max")

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data) -> float:
        result, fig = prompt_alignment(pl_module.generator, data.task, data.store,
                                       runs=data.val_run_ids[: self.runs], num_prompts=self.num_prompts,
                                       sampler=self.sampler, steps=self.steps)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("alignment/prompted_vs_achieved", fig, global_step=trainer.global_step)
            if self.strip > 0:
                experiment.add_figure("denoise/strip", self._strip(pl_module.generator, data), global_step=trainer.global_step)
        return float(result["median"])

    def _strip(self, gen, data):
        """The denoising strip of the first ``strip`` validation runs (see the class docstring)."""
        runs = data.val_run_ids[: self.strip]
        start, start_metric = start_points(data.task, data.store, runs, gen.metric)
        target = torch.full((len(runs),), float(best_value(gen)))
        traj = trajectory(gen, data.task, start, start_metric, target, sampler=self.sampler, steps=self.strip_steps,
                          guidance=None, generator=torch.Generator().manual_seed(0))
        s, n, p = traj.steps.shape
        rendered = render_networks(data.task, gen.layer_shapes, traj.steps.reshape(s * n, p)).view(s, n, 56, 56, 3)
        nearest = data.task.nearest(traj.params) if hasattr(data.task, "nearest") else None
        return strip_figure(rendered, traj, log_spaced(s, 6), nearest)


class ParameterPrompter(pl.Callback):
    """Replace a model's parameters with generated ones for a target metric (G.pt as a learned
    optimizer: one jump instead of many gradient steps), at fit start and/or every n epochs.

    The model must hold every entry of the generator's network with the same names and shapes, at the top
    level or under one prefix (a LightningModule keeping it as ``self.net`` has ``net.0.weight``, ...);
    other entries (a loss module, a second head) are left as they are. A model without them is refused
    at setup. A fit resumed from a Lightning checkpoint keeps the weights it restored.

    Args:
        ckpt: a gpt-params generator checkpoint trained on checkpoints of this model's architecture.
        target: the target value of the generator's conditioning metric.
        at: "fit_start" prompts once when fitting begins; "never" only on ``every_n_epochs``.
        every_n_epochs: also prompt at the start of every n-th epoch (None: never).
        metric_fn: measures the model's conditioning metric (module -> float); default: the generator's
            task evaluates the parameter vector; without either, the data's median metric at init is
            used as the start metric and the metric is not logged.
        sampler, steps, guidance: the sampling settings (None: the generator's defaults).
        seed: seed of the sampling noise.
        task: the task that scores the model (built-in name or "pkg.module:Class", imported); default: the
            generator's own task when it is built in (an import path saved in a checkpoint is never imported).
    """

    def __init__(self, ckpt: str, target: float, at: Literal["fit_start", "never"] = "fit_start",
                 every_n_epochs: Optional[int] = None, metric_fn: Optional[Callable[[pl.LightningModule], float]] = None,
                 sampler: Optional[Literal["ddpm", "ddim", "dpm++"]] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None,
                 seed: int = 0, task: Optional[str] = None) -> None:
        self.ckpt, self.target, self.at, self.every_n_epochs = ckpt, float(target), at, every_n_epochs
        self.metric_fn, self.sampler, self.steps, self.guidance, self.seed = metric_fn, sampler, steps, guidance, seed
        self.task = task
        self.history: list[dict] = []
        self._gen = None
        self._task = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._gen = Generator.load(self.ckpt)
        self._prefix = self._find_prefix(float_layer_shapes(pl_module))
        if self.metric_fn is None and (self.task is not None or self._gen.task_name is not None):
            try:
                self._task = self._gen.make_task(self.task)
            except Exception as err:   # e.g. a user task not named again, or its data missing here
                rank_zero_info(f"ParameterPrompter: the metric is not measured ({err})")
                self._task = None
        lo, hi = self._gen.data_range
        if not lo <= self.target <= hi:
            rank_zero_info(f"ParameterPrompter: target {self.target} is outside the data's range "
                           f"[{lo:.4g}, {hi:.4g}]; the generator extrapolates there")

    def _find_prefix(self, shapes: dict) -> str:
        """The prefix under which the module holds the generator's network (``""``, ``"net."``, ...)."""
        want = self._gen.layer_shapes
        first = next(iter(want))
        for key in shapes:
            if key.endswith(first):
                prefix = key[: len(key) - len(first)]
                if all(shapes.get(prefix + k) == v for k, v in want.items()):
                    return prefix
        names = list(shapes)
        raise ValueError(
            f"ParameterPrompter: the model's parameters differ from the generator's ({self.ckpt}): it needs "
            f"{len(want)} entries named like {list(want)[:3]} with shapes {list(want.values())[:3]} (under any "
            f"prefix), the model has {names[:3]}...; use a generator trained on checkpoints of this "
            "architecture (names are state_dict keys)")

    def _metric(self, pl_module: pl.LightningModule, vec: torch.Tensor) -> Optional[float]:
        if self.metric_fn is not None:
            return float(self.metric_fn(pl_module))
        if self._task is not None:
            return float(self._task.evaluate(vec[None].cpu())[self._gen.metric][0])
        return None

    @torch.no_grad()
    def prompt(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Generate parameters for the target from the model's current ones and load them."""
        gen, prefix = self._gen, self._prefix
        state = pl_module.state_dict()
        net_state = {k: state[prefix + k] for k in gen.layer_shapes}
        vec = state_dict_to_vector(net_state, gen.layer_shapes).float()         # [P]
        before = self._metric(pl_module, vec)
        start_metric = before if before is not None else gen.init_metric
        g = torch.Generator().manual_seed(self.seed + len(self.history))
        new = gen.generate(vec[None], torch.tensor([start_metric]), torch.tensor([self.target]),
                           sampler=self.sampler, steps=self.steps, guidance=self.guidance, generator=g)[0].cpu()
        for name, t in vector_to_tensors(new[None], gen.layer_shapes).items():   # write back in place
            state[prefix + name].copy_(t[0])
        after = self._metric(pl_module, new)
        record = {"epoch": trainer.current_epoch, "target": self.target, "before": before, "after": after}
        self.history.append(record)
        self._log(trainer, record)
        return record

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, record: dict) -> None:
        name = self._gen.metric
        rank_zero_info(f"ParameterPrompter: {name} {record['before']} -> {record['after']} "
                       f"(target {self.target})")
        if trainer.logger is not None and record["after"] is not None:
            metrics = {f"prompter/{name}_after": record["after"]}
            if record["before"] is not None:
                metrics[f"prompter/{name}_before"] = record["before"]
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a fit resumed from a Lightning checkpoint keeps the weights it restored
        if self.at == "fit_start" and trainer.ckpt_path is None:
            self.prompt(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and epoch > 0 and epoch % self.every_n_epochs == 0:
            self.prompt(trainer, pl_module)
