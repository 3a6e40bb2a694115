"""The LightningModule that trains the generator: one denoising loss, AdamW, warmup + cosine.

Everything needed to rebuild the generator (tokenizer structure, normalization statistics, the
conditioning metric and its range) arrives in ``data_info`` from the data module (the CLI links it)
and is saved with ``save_hyperparameters()``, so a checkpoint alone rebuilds model and tokenizer.
The EMA of the weights is Lightning's ``EMAWeightAveraging`` callback (see configs/): it stores the
averaged weights as the checkpoint's ``state_dict``, which is what prompting loads.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch

from gpt_params.diffusion import Diffusion
from gpt_params.dit import ParameterDiT
from gpt_params.tokenizer import ParameterTokenizer

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
        min_snr_gamma: min-SNR loss weighting (None: plain MSE).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to tensors with dim >= 2 only.
        betas: AdamW betas.
        warmup_steps: linear warmup steps before the cosine decay.
        min_lr_ratio: the cosine decays to lr * min_lr_ratio.
        compile: wrap the denoiser in torch.compile.
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
        min_snr_gamma: Optional[float] = None,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if data_info is None:
            raise ValueError(
                "GeneratorModule needs data_info (layer shapes, stats, metric) from the data module; "
                "`gpt-params train` links it from --data, in Python pass ParameterDataModule(...).info"
            )
        self.save_hyperparameters()
        self.hparams[CHECKPOINT_MARKER] = CHECKPOINT_FORMAT
        self.tokenizer = ParameterTokenizer(
            data_info["layer_shapes"], layout=layout, chunk_size=chunk_size,
            stats=data_info.get("stats"), spec=data_info.get("permutation_spec"),
        )
        overrides = {k: v for k, v in dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads).items()
                     if v is not None}
        self.model = ParameterDiT.from_preset(
            size, num_tokens=self.tokenizer.num_tokens, token_dim=self.tokenizer.token_dim,
            token_layer_ids=self.tokenizer.token_layer_ids, prediction=prediction, residual=residual,
            metric_range=tuple(data_info["metric_range"]), projection=projection,
            token_mask=self.tokenizer.mask, **overrides,
        )
        self.diffusion = Diffusion(prediction=prediction, min_snr_gamma=min_snr_gamma)
        self.register_buffer("token_mask", self.tokenizer.mask.clone(), persistent=False)
        self._forward_model = torch.compile(self.model) if compile else self.model

    # ------------------------------------------------------------------ steps
    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        start = self.tokenizer.tokenize(batch["start"])       # [N, T, C]
        target = self.tokenizer.tokenize(batch["target"])     # [N, T, C]
        loss = self.diffusion.training_loss(
            self._forward_model, target, start, batch["start_metric"], batch["target_metric"],
            cond_drop_prob=self.hparams.cond_drop_prob if stage == "train" else 0.0,
            mask=self.token_mask,
        )
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 sync_dist=stage != "train", batch_size=start.shape[0])
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        # nanoGPT's rule: decay matrices (linear and embedding weights), never biases, norms or the
        # zero-initialised adaLN/null vectors, whose pull towards zero would only fight the signal.
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, max(total // 10, 1))
        floor = self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
