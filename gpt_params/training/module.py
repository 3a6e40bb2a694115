"""The LightningModule that trains a generator: it owns a ``Generator`` and adds the loss step, AdamW
parameter groups and the warmup + cosine schedule.

Options come in groups that LightningCLI shows nested (``--model.dit.hidden_size``,
``--model.optim.lr``, ``--model.autoencoder.steps``): typed groups rather than a latent-space subclass,
because the latent mode changes one loss branch and the optimizer's groups, not the class's interface,
and one class keeps every config a plain ``model:`` section. The rest (tokens, diffusion, conditioning,
guidance) stay top-level options.

Everything needed to rebuild the generator arrives in ``data_info`` from the data module (the CLI links
it) and is saved as the checkpoint's ``gpt_params`` entry (``GeneratorConfig.to_json()``), so a
checkpoint alone rebuilds the generator without this class (``Generator.load``). The EMA of the weights
is ``callbacks.GeneratorEMA``: it stores the averaged weights as the checkpoint's ``state_dict``.

Latent space (p-diff): one module, two phases over one optimizer. Steps ``[0, autoencoder.steps)`` train
the ``ParameterAutoencoder`` (MSE with p-diff's noise; the DiT gets no gradient); from then on the
autoencoder is frozen and the DiT denoises its latents. Each part has its own parameter groups and
schedule (the DiT's restarts at the switch); AdamW skips parameters without gradients. With DDP use
``--trainer.strategy ddp_find_unused_parameters_true`` (each phase leaves the other part without gradients).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch

from checkpoints_dataset.info import DataInfo
from gpt_params.core.autoencoder import reconstruction_quality
from gpt_params.core.config import AutoencoderOptions, DiTOptions, GeneratorConfig
from gpt_params.core.dit import Prediction
from gpt_params.core.generator import CHECKPOINT_FORMAT, CHECKPOINT_KEY, LEGACY_MARKER, Generator
from gpt_params.core.tokenizer import Layout
from gpt_params.training.callbacks import check_weight_averaging


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    """AdamW and its schedule.

    Args:
        lr: peak learning rate.
        weight_decay: applied to tensors with dim >= 2 only.
        betas: AdamW betas.
        warmup_steps: linear warmup steps before the cosine decay (at most a tenth of the phase).
        min_lr_ratio: the cosine decays to lr * min_lr_ratio.
    """

    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05


def warmup_cosine(begin: int, end: int, warmup_steps: int, floor: float):
    """A LambdaLR factor: 0 before ``begin``, linear warmup, cosine from 1 to ``floor`` over ``[begin, end)``,
    then ``floor`` (after ``end`` the autoencoder's parameters get no gradient any more)."""
    length = max(end - begin, 1)
    warmup = min(warmup_steps, max(length // 10, 1))

    def schedule(step: int) -> float:
        step -= begin
        if step < 0:
            return 0.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(length - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return schedule


class FunctionLoss:
    """``weight`` x the mean squared difference between the outputs of predicted and target networks on the
    task's ``probe_inputs()``, per network divided by the variance of its target's outputs (so the weight
    means the same for any output scale). Weight error is not function error: a small MSE in weight space
    can still break a network (issue 16, hypothesis 2; Meynent et al. 2025 for weight autoencoders).
    ``probes``: compare on ``probes`` of the probe inputs only, drawn once at random (the same for every
    run and step: a fresh draw per step did not do better on the ConvNet, bench/NOTES.md; a random set,
    unlike the first few, covers a grid's whole space); None: all of them. Its cost is N x B network forwards."""

    def __init__(self, task, weight: float, probes: Optional[int] = None):
        self.task, self.weight, self.probes = task, float(weight), probes
        self._pool: Optional[torch.Tensor] = None

    def probe_batch(self, device: torch.device) -> torch.Tensor:
        """The probe inputs ``[B, ...]``: all of them, or the ``probes`` drawn once (seed 0, no replacement)."""
        if self._pool is None or self._pool.device != device:
            pool = self.task.probe_inputs()                                        # [pool, ...]
            if self.probes is not None and self.probes < len(pool):
                pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:self.probes]]
            self._pool = pool.to(device)                                           # [B, ...]
        return self._pool

    def __call__(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probe = self.probe_batch(predicted.device)                                # [B, ...]
        with torch.no_grad():
            want = self.task.network_outputs(target.float(), probe).flatten(2)     # [N, B, O]
        got = self.task.network_outputs(predicted.float(), probe).flatten(2)       # [N, B, O]
        scale = want.var(dim=(1, 2), keepdim=True).clamp_min(1e-6)                # [N, 1, 1]
        return self.weight * ((got - want) ** 2 / scale).mean()


def _group(value, cls):
    """A typed option group from itself, a dict (a checkpoint's hyperparameters) or None (the defaults)."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)


class GeneratorModule(pl.LightningModule):
    """Trains a ``Generator`` to denoise target parameters given start parameters and metrics.

    Args:
        data_info: the training data's description (``ParameterDataModule(...).info``, or its ``to_json()``);
            linked by the CLI.
        layout: parameter tokens: one per hidden unit ("neuron") or G.pt's layer chunks ("chunk").
        chunk_size: the most values in one token (rows longer than this are cut).
        mask_channel: "nonzero": beside each value a channel saying whether it is zero, for stores of sparse
            networks (the loss of a value counts only where it is nonzero); "none" (default).
        dit: the denoiser's architecture (size preset and overrides).
        prediction: what the denoiser predicts: the clean target ("x0", G.pt), the noise or v.
        min_snr_gamma: min-SNR loss weighting (None: plain MSE).
        cond_drop_prob: probability of replacing the target metric by the null embedding
            (classifier-free guidance training).
        guidance: the classifier-free guidance scale sampling uses when not told otherwise (``prompt``,
            ``evaluate``, the alignment monitor and the alignment printed after training); 1.0: off.
        sampler, sampler_steps: the sampler and its number of denoiser calls the same places use when not
            told otherwise (default DPM-Solver++ with 3 steps: as aligned as DDIM-50 on digits, bench/NOTES.md).
        space: where the diffusion runs: normalized parameter tokens ("params") or an autoencoder's
            latent tokens ("latent", p-diff).
        start: condition on a start checkpoint and its metric ("checkpoint", G.pt) or not ("none").
        condition: condition on the target metric ("target") or nothing ("none", unconditional).
        autoencoder: the latent-space autoencoder and its training phase.
        optim: AdamW and its warmup + cosine schedule.
        function_loss: weight of the function-space loss (``FunctionLoss``: outputs of the predicted networks
            against their targets' on the task's probe inputs). None (default): 1.0 where it applies (x0 or v
            predictions of parameter tokens, and a task that defines ``probe_inputs``), else off. A number:
            that weight (0: off), and an error where it cannot apply.
        function_probes: on how many of the task's probe inputs the function-space loss compares, drawn once at
            random (None: all of them, 256 for a classification task). Its cost grows with it: a
            ConvNet's forwards on 256 images for every network of the batch cost more than the DiT's step, so
            ``configs/fashion_cnn.yaml`` uses fewer.
        compile: wrap the denoiser in torch.compile.
    """

    def __init__(
        self,
        data_info: Optional[DataInfo | dict] = None,
        layout: Layout = "neuron",
        chunk_size: int = 256,
        mask_channel: Literal["none", "nonzero"] = "none",
        dit: DiTOptions = DiTOptions(),
        prediction: Prediction = "x0",
        min_snr_gamma: Optional[float] = None,
        cond_drop_prob: float = 0.1,
        guidance: float = 1.0,
        sampler: Literal["ddpm", "ddim", "dpm++"] = "dpm++",
        sampler_steps: int = 3,
        space: Literal["params", "latent"] = "params",
        start: Literal["checkpoint", "none"] = "checkpoint",
        condition: Literal["target", "none"] = "target",
        autoencoder: AutoencoderOptions = AutoencoderOptions(),
        optim: OptimOptions = OptimOptions(),
        function_loss: Optional[float] = None,
        function_probes: Optional[int] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if data_info is None:
            raise ValueError(
                "GeneratorModule needs data_info (layer shapes, stats, metric) from the data module; "
                "`gpt-params train` links it from --data, in Python pass ParameterDataModule(...).info"
            )
        info = DataInfo.from_json(data_info)
        dit, optim = _group(dit, DiTOptions), _group(optim, OptimOptions)
        autoencoder = _group(autoencoder, AutoencoderOptions)
        try:
            config = GeneratorConfig(data=info, layout=layout, chunk_size=chunk_size, mask_channel=mask_channel,
                                     dit=dit, prediction=prediction,
                                     min_snr_gamma=min_snr_gamma, space=space, start=start, condition=condition,
                                     autoencoder=autoencoder, guidance=guidance,
                                     sampler=sampler, sampler_steps=sampler_steps)
        except ValueError as err:   # name the command-line option
            raise ValueError(f"--model.{err}") from None
        self.save_hyperparameters()
        # the checkpoint keeps plain values only (it is loaded with weights_only=True)
        self.hparams.update(data_info=info.to_json(), dit=dataclasses.asdict(dit),
                            autoencoder=dataclasses.asdict(autoencoder), optim=dataclasses.asdict(optim))
        self.hparams[LEGACY_MARKER] = CHECKPOINT_FORMAT
        if function_loss is not None and not (math.isfinite(function_loss) and function_loss >= 0):
            raise ValueError(f"--model.function_loss must be a finite weight >= 0 (0: off), got {function_loss}")
        if function_loss and (prediction == "epsilon" or space != "params"):
            raise ValueError("--model.function_loss needs --model.prediction x0 or v and --model.space params (it "
                             "scores the networks of the clean predictions; from epsilon they blow up at high noise)")
        if function_probes is not None and function_probes < 1:
            raise ValueError(f"--model.function_probes must be at least 1 (or null: all), got {function_probes}")
        self.optim = optim
        self._function_loss: Optional[FunctionLoss] = None
        self._function_loss_decided = False
        self.generator = Generator(config)
        # not a registered submodule: the state_dict keeps one copy of the DiT
        self.__dict__["_denoiser"] = torch.compile(self.generator.model) if compile else self.generator.model

    # ------------------------------------------------------------------ steps
    def autoencoder_phase(self) -> bool:
        """Whether the current step trains the autoencoder (latent space, first autoencoder.steps)."""
        return self.generator.autoencoder is not None and self.global_step < self.generator.config.autoencoder.steps

    def _autoencoder_step(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int) -> torch.Tensor:
        gen = self.generator
        target = gen.tokenizer.tokenize(batch["target"])     # [N, T, C]
        loss = gen.autoencoder.reconstruction_loss(target)
        self.log(f"{stage}/ae_loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 sync_dist=stage != "train", batch_size=target.shape[0])
        if stage == "val" and batch_idx == 0:
            self._log_reconstruction_gap(batch["target"])
        return loss

    def _log_reconstruction_gap(self, params: torch.Tensor, max_networks: int = 16) -> None:
        """val/ae_<metric>_gap: mean |metric(reconstructed) - metric(original)| on the first ``max_networks``
        of the first val batch (scoring networks can cost far more than a training step)."""
        task = getattr(self.trainer.datamodule, "task", None)   # built once by the data module from the user's names
        if task is None:
            return
        gen, metric = self.generator, self.generator.metric
        q = reconstruction_quality(gen.autoencoder, gen.tokenizer, task, params[:max_networks], [metric],
                                   device=self.device)
        self.log(f"val/ae_{metric}_gap", q["metrics"][metric]["abs_diff_mean"], on_epoch=True, sync_dist=True)

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int = 0) -> torch.Tensor:
        if self.autoencoder_phase():
            return self._autoencoder_step(batch, stage, batch_idx)
        loss = self.generator.denoising_loss(
            batch, cond_drop_prob=self.hparams.cond_drop_prob if stage == "train" else 0.0, denoiser=self._denoiser,
            function_loss=self._function_loss_fn() if stage == "train" else None)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 sync_dist=stage != "train", batch_size=batch["target"].shape[0])
        return loss

    def _function_loss_fn(self) -> Optional[FunctionLoss]:
        """The function-space loss on the data module's task (decided once), or None when off."""
        if not self._function_loss_decided:
            self._function_loss, self._function_loss_decided = self._make_function_loss(), True
        return self._function_loss

    def _make_function_loss(self) -> Optional[FunctionLoss]:
        weight, config = self.hparams.function_loss, self.generator.config
        if weight == 0 or config.prediction == "epsilon" or config.space != "params":
            return None   # an explicit weight > 0 with these was refused in __init__
        task = getattr(self.trainer.datamodule, "task", None)   # None when fed plain dataloaders
        try:
            probe_ok = task is not None and task.probe_inputs() is not None
        except NotImplementedError:
            probe_ok = False
        if probe_ok:
            return FunctionLoss(task, 1.0 if weight is None else weight, self.hparams.function_probes)
        if weight is None:
            return None   # the default applies only where it can
        raise ValueError("--model.function_loss needs a task whose probe_inputs() give the networks' inputs: give "
                         "--data.task (the store names none, or one that is not built in), define probe_inputs on "
                         "your task, or pass --model.function_loss 0")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val", batch_idx)

    # ------------------------------------------------------------------ checks and checkpoints
    def on_fit_start(self) -> None:
        """Refuse averaging callbacks that would hand back wrong weights (see ``GeneratorEMA``)."""
        check_weight_averaging(self.trainer, self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The generator's config, so that ``Generator.load`` rebuilds it without this class."""
        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "generator": self.generator.config.to_json()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (--ckpt_path) onto a store of another architecture fails here, with the fix; a checkpoint
        written before the generator had its own class (keys ``model.*``) resumes with its keys renamed."""
        saved = (checkpoint.get("hyper_parameters") or {}).get("data_info") or {}
        mine = self.generator.info
        if saved.get("layer_shapes") is not None and not mine.layer_shapes.same_layout(saved["layer_shapes"]):
            raise ValueError("the checkpoint was trained on networks of another architecture than the store at "
                             f"{mine.store_root} holds; resume with the --data.root it was trained on "
                             f"({saved.get('store_root')})")
        state = checkpoint.get("state_dict", {})
        if state and not any(k.startswith("generator.") for k in state):
            checkpoint["state_dict"] = {f"generator.{k}": v for k, v in state.items()
                                        if not k.startswith("_forward_model.")}

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        # nanoGPT's rule: decay matrices (linear and embedding weights), never biases, norms or the
        # zero-initialised adaLN/null vectors, whose pull towards zero would only fight the signal.
        def groups(module: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
            params = [p for p in module.parameters() if p.requires_grad]
            return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
                    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]

        opt, gen = self.optim, self.generator
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        switch = gen.config.autoencoder.steps if gen.autoencoder is not None else 0
        if switch >= total:
            raise ValueError(f"--model.autoencoder.steps {switch} leaves no steps for the DiT (the run has {total}); "
                             "raise --trainer.max_steps or lower --model.autoencoder.steps")
        param_groups = groups(gen.model, opt.lr, opt.weight_decay)
        lambdas = [warmup_cosine(switch, total, opt.warmup_steps, opt.min_lr_ratio)] * 2
        if gen.autoencoder is not None:
            param_groups += groups(gen.autoencoder, gen.config.autoencoder.lr, 0.0)
            lambdas += [warmup_cosine(0, switch, opt.warmup_steps, opt.min_lr_ratio)] * 2
        optimizer = torch.optim.AdamW(param_groups, lr=opt.lr, betas=tuple(opt.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

