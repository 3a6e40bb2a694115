"""The LightningModule that trains the generator: one denoising loss, AdamW, warmup + cosine.

Everything needed to rebuild the generator (tokenizer structure, normalization statistics, the
conditioning metric and its range) arrives in ``data_info`` from the data module (the CLI links it)
and is saved with ``save_hyperparameters()``, so a checkpoint alone rebuilds model and tokenizer.
The EMA of the weights is ``callbacks.GeneratorEMA`` (Lightning's ``EMAWeightAveraging``, see configs/): it
stores the averaged weights as the checkpoint's ``state_dict``, which is what prompting loads.

Modes (README "Latent diffusion and start-free generation"):
- ``space="params"`` (default): the DiT denoises normalized parameter tokens ``[N, T, C]``.
- ``space="latent"`` (p-diff): one module, two phases over one optimizer. Steps ``[0, autoencoder_steps)``
  train a ``ParameterAutoencoder`` (MSE with p-diff's noise augmentation; the DiT gets no gradient);
  from then on the autoencoder is frozen and the DiT denoises its latents ``[N, T, latent_dim]``. Each
  part has its own parameter groups and its own warmup + cosine schedule (the DiT's restarts at the
  switch); AdamW skips parameters without gradients, so the inactive part stays untouched. At the
  switch the EMA copy of the autoencoder is set to the frozen weights, so the EMA generator decodes with
  the autoencoder its latents came from. With DDP use ``--trainer.strategy ddp_find_unused_parameters_true``
  (each phase leaves the other part without gradients).
- ``start="none"``: start-free (no start tokens, no start metric); ``condition="none"``: unconditional
  (no target metric), p-diff's setting when both are "none".
"""
from __future__ import annotations

import functools
import math
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch

from pytorch_lightning.utilities import rank_zero_info

from gpt_params.core.autoencoder import ParameterAutoencoder
from gpt_params.core.diffusion import Diffusion
from gpt_params.core.dit import ParameterDiT
from gpt_params.core.tokenizer import ParameterTokenizer

CHECKPOINT_MARKER = "gpt_params_format"   # key in hyper_parameters that marks our checkpoints
CHECKPOINT_FORMAT = 1


class GeneratorModule(pl.LightningModule):
    """Trains a ParameterDiT to denoise target parameters given start parameters and metrics.

    Args:
        data_info: what the data module knows of the store (layer shapes, normalization stats,
            permutation spec, conditioning metric, its range in the data, task name); linked by the CLI.
        layout: parameter tokens: one per hidden unit ("neuron") or G.pt's layer chunks ("chunk").
        chunk_size: the most values in one token (rows longer than this are cut).
        size: DiT size preset; ``hidden_size``/``depth``/``num_heads`` override its entries.
        hidden_size: width D of the transformer (None: from the preset).
        depth: number of DiT blocks (None: from the preset).
        num_heads: attention heads (None: from the preset).
        prediction: what the denoiser predicts: the clean target ("x0", G.pt), the noise or v.
        residual: output = start + zero-initialized update (G.pt's global residual).
        projection: token projections in and out shared by a layer ("layer") or one per token position.
        cond_drop_prob: probability of replacing the target metric by the null embedding
            (classifier-free guidance training).
        guidance: the classifier-free guidance scale sampling uses when not told otherwise (``prompt``,
            ``evaluate``, the alignment monitor and the alignment printed after training); 1.0: off.
        min_snr_gamma: min-SNR loss weighting (None: plain MSE).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to tensors with dim >= 2 only.
        betas: AdamW betas.
        warmup_steps: linear warmup steps before the cosine decay.
        min_lr_ratio: the cosine decays to lr * min_lr_ratio.
        compile: wrap the denoiser in torch.compile.
        space: where the diffusion runs: normalized parameter tokens ("params") or an autoencoder's
            latent tokens ("latent", p-diff).
        start: condition on a start checkpoint and its metric ("checkpoint", G.pt) or not ("none").
        condition: condition on the target metric ("target") or nothing ("none", unconditional).
        autoencoder_steps: latent space: the first steps train the autoencoder, the rest the DiT.
        latent_dim: latent space: width d of a latent token (one latent token per parameter token).
        autoencoder_hidden_size, autoencoder_depth, autoencoder_heads: encoder/decoder width and blocks.
        autoencoder_lr: peak learning rate of the autoencoder phase.
        input_noise, latent_noise: p-diff's noise augmentation of the autoencoder (normalized units).
    """

    def __init__(
        self,
        data_info: Optional[dict] = None,
        layout: Literal["neuron", "chunk"] = "neuron",
        chunk_size: int = 256,
        size: Literal["XS", "S", "B", "L"] = "XS",
        hidden_size: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        prediction: Literal["x0", "epsilon", "v"] = "x0",
        residual: bool = False,
        projection: Literal["layer", "position"] = "layer",
        cond_drop_prob: float = 0.1,
        guidance: float = 1.0,
        min_snr_gamma: Optional[float] = None,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        compile: bool = False,
        space: Literal["params", "latent"] = "params",
        start: Literal["checkpoint", "none"] = "checkpoint",
        condition: Literal["target", "none"] = "target",
        autoencoder_steps: int = 2000,
        latent_dim: int = 96,
        autoencoder_hidden_size: int = 128,
        autoencoder_depth: int = 1,
        autoencoder_heads: int = 4,
        autoencoder_lr: float = 3e-3,
        input_noise: float = 1e-3,
        latent_noise: float = 0.1,
    ) -> None:
        super().__init__()
        if data_info is None:
            raise ValueError(
                "GeneratorModule needs data_info (layer shapes, stats, metric) from the data module; "
                "`gpt-params train` links it from --data, in Python pass ParameterDataModule(...).info"
            )
        for name, value, choices in (("space", space, ("params", "latent")), ("start", start, ("checkpoint", "none")),
                                     ("condition", condition, ("target", "none"))):
            if value not in choices:
                raise ValueError(f"--model.{name} must be one of {list(choices)}, got {value!r}")
        if not (math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"--model.guidance must be a finite number >= 0 (1.0: off), got {guidance}")
        if space == "latent" and autoencoder_steps < 1:
            raise ValueError(f"--model.autoencoder_steps must be >= 1 in latent space, got {autoencoder_steps}")
        self.save_hyperparameters()
        self.hparams[CHECKPOINT_MARKER] = CHECKPOINT_FORMAT
        self.tokenizer = ParameterTokenizer(
            data_info["layer_shapes"], layout=layout, chunk_size=chunk_size,
            stats=data_info.get("stats"), spec=data_info.get("permutation_spec"),
        )
        overrides = {k: v for k, v in dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads).items()
                     if v is not None}
        tok = self.tokenizer
        self.autoencoder = None
        if space == "latent":
            self.autoencoder = ParameterAutoencoder(
                tok.num_tokens, tok.token_dim, tok.token_layer_ids, latent_dim=latent_dim,
                hidden_size=autoencoder_hidden_size, depth=autoencoder_depth, num_heads=autoencoder_heads,
                input_noise=input_noise, latent_noise=latent_noise, token_mask=tok.mask)
        self.model = ParameterDiT.from_preset(
            size, num_tokens=tok.num_tokens, token_dim=latent_dim if space == "latent" else tok.token_dim,
            token_layer_ids=tok.token_layer_ids, prediction=prediction, residual=residual,
            metric_range=tuple(data_info["metric_range"]), projection=projection,
            token_mask=None if space == "latent" else tok.mask, start_input=start, condition=condition,
            **overrides,
        )
        self.diffusion = Diffusion(prediction=prediction, min_snr_gamma=min_snr_gamma)
        self.register_buffer("token_mask", self.tokenizer.mask.clone(), persistent=False)
        self._forward_model = torch.compile(self.model) if compile else self.model

    # ------------------------------------------------------------------ steps
    def autoencoder_phase(self) -> bool:
        """Whether the current step trains the autoencoder (latent space, first autoencoder_steps)."""
        return self.autoencoder is not None and self.global_step < self.hparams.autoencoder_steps

    def _autoencoder_step(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int) -> torch.Tensor:
        target = self.tokenizer.tokenize(batch["target"])     # [N, T, C]
        loss = self.autoencoder.reconstruction_loss(target)
        self.log(f"{stage}/ae_loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 sync_dist=stage != "train", batch_size=target.shape[0])
        if stage == "val" and batch_idx == 0:
            self._log_reconstruction_gap(batch["target"])
        return loss

    def _log_reconstruction_gap(self, params: torch.Tensor, max_networks: int = 16) -> None:
        """val/ae_<metric>_gap: mean |metric(reconstructed) - metric(original)| on the first ``max_networks``
        of the first val batch (scoring networks can cost far more than a training step)."""
        if self._gap_task is None:
            return
        from gpt_params.core.autoencoder import reconstruction_quality

        metric = self.hparams.data_info["metric"]
        q = reconstruction_quality(self.autoencoder, self.tokenizer, self._gap_task, params[:max_networks], [metric],
                                   device=self.device)
        self.log(f"val/ae_{metric}_gap", q["metrics"][metric]["abs_diff_mean"], on_epoch=True, sync_dist=True)

    @functools.cached_property
    def _gap_task(self):
        """The task scoring reconstructions, built once (a task may load its data set); None without a task
        or for a user task that cannot be imported here."""
        from checkpoints_dataset.tasks import get_task

        name = self.hparams.data_info.get("task")
        try:
            return None if name is None else get_task(name, **(self.hparams.data_info.get("task_kwargs") or {}))
        except Exception:
            return None

    def _encode(self, params: torch.Tensor) -> torch.Tensor:
        """Parameter vectors [N, P] -> the tokens the DiT works on: [N, T, C] or frozen latents [N, T, d]."""
        tokens = self.tokenizer.tokenize(params)              # [N, T, C]
        if self.autoencoder is None:
            return tokens
        self.autoencoder.eval()   # frozen: running latent statistics, never updated again
        with torch.no_grad():
            return self.autoencoder.encode(tokens)            # [N, T, d]

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int = 0) -> torch.Tensor:
        if self.autoencoder_phase():
            return self._autoencoder_step(batch, stage, batch_idx)
        target = self._encode(batch["target"])                # [N, T, C] or [N, T, d]
        start = self._encode(batch["start"]) if self.hparams.start == "checkpoint" else torch.zeros_like(target)
        loss = self.diffusion.training_loss(
            self._forward_model, target, start, batch["start_metric"], batch["target_metric"],
            cond_drop_prob=self.hparams.cond_drop_prob if stage == "train" else 0.0,
            mask=None if self.autoencoder is not None else self.token_mask,
        )
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 sync_dist=stage != "train", batch_size=start.shape[0])
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val", batch_idx)

    def on_fit_start(self) -> None:
        """Refuse an EMA that would never update: Lightning copies the average into the model at the end
        of training, so an EMA starting after the last step would hand back the untrained weights."""
        from pytorch_lightning.callbacks import EMAWeightAveraging

        from gpt_params.training.callbacks import GeneratorEMA

        max_steps = self.trainer.max_steps
        for cb in self.trainer.callbacks:
            if (isinstance(cb, EMAWeightAveraging) and not isinstance(cb, GeneratorEMA)
                    and getattr(cb, "_use_buffers", False) and any(not b.is_floating_point() for b in self.buffers())):
                raise ValueError("EMAWeightAveraging would average the generator's integer buffers (token ids) and "
                                 "round them down; use gpt_params.training.callbacks.GeneratorEMA (the same options, "
                                 "floating-point tensors only) in trainer.callbacks instead")
            start = getattr(cb, "update_starting_at_step", None)
            if isinstance(cb, EMAWeightAveraging) and start is not None and 0 < max_steps <= start:
                raise ValueError(f"EMAWeightAveraging starts at step {start} but training stops at step "
                                 f"{max_steps}: lower its update_starting_at_step (config trainer.callbacks) or "
                                 "raise --trainer.max_steps")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (--ckpt_path) onto a store of another architecture fails here, with the fix."""
        saved = (checkpoint.get("hyper_parameters") or {}).get("data_info") or {}
        mine = self.hparams.data_info
        if saved.get("layer_shapes") not in (None, mine["layer_shapes"]):
            raise ValueError("the checkpoint was trained on networks of another architecture than the store at "
                             f"{mine.get('store_root')} holds; resume with the --data.root it was trained on "
                             f"({saved.get('store_root')})")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.autoencoder is not None and self.global_step == self.hparams.autoencoder_steps:
            self._freeze_autoencoder()

    def _freeze_autoencoder(self) -> None:
        """At the switch to the DiT phase: the EMA copies of the autoencoder (Lightning's WeightAveraging
        callbacks) take the frozen weights, so the EMA DiT is trained on and decoded by the same one."""
        from pytorch_lightning.callbacks import WeightAveraging

        for cb in self.trainer.callbacks if self.trainer is not None else []:
            averaged = getattr(cb, "_average_model", None) if isinstance(cb, WeightAveraging) else None
            if averaged is not None:
                averaged.module.autoencoder.load_state_dict(self.autoencoder.state_dict())  # params + buffers
        rank_zero_info(f"autoencoder frozen after {self.global_step} steps; training the DiT on its latents")

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        # nanoGPT's rule: decay matrices (linear and embedding weights), never biases, norms or the
        # zero-initialised adaLN/null vectors, whose pull towards zero would only fight the signal.
        def groups(module: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
            params = [p for p in module.parameters() if p.requires_grad]
            return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
                    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]

        total = max(int(self.trainer.estimated_stepping_batches), 1)
        floor = self.hparams.min_lr_ratio

        def warmup_cosine(begin: int, end: int, warmup_steps: int):
            """Warmup + cosine over steps [begin, end) (0 before ``begin``; the floor after ``end``, where the
            autoencoder's parameters get no gradient any more)."""
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

        switch = self.hparams.autoencoder_steps if self.autoencoder is not None else 0
        if switch >= total:
            raise ValueError(f"--model.autoencoder_steps {switch} leaves no steps for the DiT (the run has {total}); "
                             "raise --trainer.max_steps or lower --model.autoencoder_steps")
        param_groups = groups(self.model, self.hparams.lr, self.hparams.weight_decay)
        lambdas = [warmup_cosine(switch, total, self.hparams.warmup_steps)] * 2
        if self.autoencoder is not None:
            param_groups += groups(self.autoencoder, self.hparams.autoencoder_lr, 0.0)
            lambdas += [warmup_cosine(0, switch, self.hparams.warmup_steps)] * 2
        optimizer = torch.optim.AdamW(param_groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
