"""``GeneratorConfig``: everything that rebuilds a generator, as plain values (nanoGPT's ``GPTConfig``).

``Generator(GeneratorConfig(...))`` builds tokenizer, denoiser, diffusion and (latent space) autoencoder
from the config alone; a checkpoint stores ``config.to_json()`` next to the weights. Checkpoints written
before the options were grouped kept them flat (``lr``, ``hidden_size``, ``autoencoder_steps``, ...):
``LEGACY_NAMES`` maps each flat name to its group and field, for ``from_legacy_hparams`` and for the
command line's message on an old option name.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, Optional

from checkpoints_dataset.info import DataInfo
from gpt_params.core.diffusion import Sampler
from gpt_params.core.dit import PRESETS, Activation, AttentionKind, Prediction
from gpt_params.core.tokenizer import Layout, MaskChannel

Space = Literal["params", "latent"]
Start = Literal["checkpoint", "none"]
Condition = Literal["target", "none"]


@dataclasses.dataclass(frozen=True)
class DiTOptions:
    """The denoiser's architecture.

    Args:
        size: DiT size preset (XS, S, B, L); ``hidden_size``/``depth``/``num_heads`` override its entries.
        hidden_size: width D of the transformer (None: from the preset).
        depth: number of DiT blocks (None: from the preset).
        num_heads: attention heads (None: from the preset).
        residual: output = start + zero-initialized update (G.pt's global residual).
        projection: token projections in and out shared by a layer ("layer") or one per token position.
        relations: the weights between two hidden layers as edges between unit tokens ("edges", see
            ``gpt_params.core.relations``: the model is then equivariant to every hidden layer's unit
            permutations) or as plain token entries ("none", the only choice before issue 16: generated
            networks with two hidden layers were at chance). Networks with one hidden layer have no such
            weights, so the option changes nothing for them; a latent-space generator has none either.
        edge_size: rank of the edge encoder's and decoder's products.
        activation: the MLPs' GELU, also the latent autoencoder's: exact ("gelu") or the tanh approximation
            ("gelu_tanh", the only one before issue 16; speed: bench/activation.py).
        attention: every token attends to every other ("full") or to the ``window`` consecutive tokens of its
            window plus one summary per window ("window": ``T * (window + T / window)`` attention scores
            instead of ``T^2``, for long sequences such as a million-parameter target; bench/NOTES.md,
            issue 17). The latent autoencoder keeps full attention.
        window: tokens per window of ``attention="window"``.
    """

    size: Literal["XS", "S", "B", "L"] = "XS"
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    residual: bool = False
    projection: Literal["layer", "position"] = "layer"
    relations: Literal["edges", "none"] = "edges"
    edge_size: int = 64
    activation: Activation = "gelu"
    attention: AttentionKind = "full"
    window: int = 128

    def __post_init__(self) -> None:
        if self.size not in PRESETS:
            raise ValueError(f"dit.size must be one of {list(PRESETS)}, got {self.size!r}")
        _choice("dit.relations", self.relations, ("edges", "none"))
        _choice("dit.activation", self.activation, ("gelu", "gelu_tanh"))
        _choice("dit.attention", self.attention, ("full", "window"))
        if int(self.window) != self.window or self.window < 1:
            raise ValueError(f"dit.window must be a whole number >= 1, got {self.window}")
        if int(self.edge_size) < 1:
            raise ValueError(f"dit.edge_size must be >= 1, got {self.edge_size}")

    def overrides(self) -> dict[str, int]:
        """The preset entries this config overrides."""
        return {k: v for k, v in dict(hidden_size=self.hidden_size, depth=self.depth,
                                      num_heads=self.num_heads).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class AutoencoderOptions:
    """The latent-space autoencoder (p-diff; used when ``space="latent"``).

    Args:
        steps: the first ``steps`` training steps train the autoencoder, the rest the DiT on its latents.
        latent_dim: width d of a latent token (one latent token per parameter token).
        hidden_size: encoder/decoder width.
        depth: encoder/decoder blocks.
        num_heads: encoder/decoder attention heads.
        lr: peak learning rate of the autoencoder phase.
        input_noise: p-diff's noise on the input tokens while training (normalized units).
        latent_noise: p-diff's noise on the latents while training.
    """

    steps: int = 2000
    latent_dim: int = 96
    hidden_size: int = 128
    depth: int = 1
    num_heads: int = 4
    lr: float = 3e-3
    input_noise: float = 1e-3
    latent_noise: float = 0.1


# Flat option names of checkpoints written before the groups existed: name -> (group, field).
LEGACY_NAMES: dict[str, tuple[str, str]] = {
    **{k: ("dit", k) for k in ("size", "hidden_size", "depth", "num_heads", "residual", "projection")},
    **{k: ("optim", k) for k in ("lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio")},
    "autoencoder_steps": ("autoencoder", "steps"), "latent_dim": ("autoencoder", "latent_dim"),
    "autoencoder_hidden_size": ("autoencoder", "hidden_size"), "autoencoder_depth": ("autoencoder", "depth"),
    "autoencoder_heads": ("autoencoder", "num_heads"), "autoencoder_lr": ("autoencoder", "lr"),
    "input_noise": ("autoencoder", "input_noise"), "latent_noise": ("autoencoder", "latent_noise"),
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# what checkpoints written before these options existed were made with
BEFORE_ISSUE_16 = {"sampler": "ddim", "sampler_steps": 50}
DIT_BEFORE_ISSUE_16 = {"relations": "none", "activation": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """A generator, as plain values.

    Args:
        data: the training data's description (layer shapes, normalization, conditioning metric).
        layout: parameter tokens: one per hidden unit ("neuron") or G.pt's layer chunks ("chunk").
        chunk_size: the most values in one token (rows longer than this are cut).
        mask_channel: "nonzero" gives every value a channel saying whether it is zero (sparse networks; values
            normalized by the nonzero entries' statistics and their loss weighted by the true mask); "none".
        dit: the denoiser's architecture.
        prediction: what the denoiser predicts: the clean target ("x0", G.pt), the noise or v.
        min_snr_gamma: min-SNR loss weighting (None: plain MSE).
        space: where the diffusion runs: normalized parameter tokens or an autoencoder's latents (p-diff).
        start: condition on a start checkpoint and its metric ("checkpoint", G.pt) or not ("none").
        condition: condition on the target metric ("target") or nothing ("none", unconditional).
        autoencoder: the latent-space autoencoder (``space="latent"`` only).
        guidance: the classifier-free guidance scale ``generate`` uses when not told otherwise (1.0: off).
        sampler, sampler_steps: the sampler and its number of denoiser calls ``generate`` uses when not told
            otherwise. The x0 denoiser is nearly deterministic given its prompt, so a few DPM-Solver++ steps
            align as well as many DDIM steps (the study: bench/NOTES.md, issue 16).
    """

    data: DataInfo
    layout: Layout = "neuron"
    chunk_size: int = 256
    mask_channel: MaskChannel = "none"
    dit: DiTOptions = DiTOptions()
    prediction: Prediction = "x0"
    min_snr_gamma: Optional[float] = None
    space: Space = "params"
    start: Start = "checkpoint"
    condition: Condition = "target"
    autoencoder: AutoencoderOptions = AutoencoderOptions()
    guidance: float = 1.0
    sampler: Sampler = "dpm++"
    sampler_steps: int = 3

    def __post_init__(self) -> None:
        for name, value, choices in (("space", self.space, ("params", "latent")),
                                     ("start", self.start, ("checkpoint", "none")),
                                     ("condition", self.condition, ("target", "none")),
                                     ("sampler", self.sampler, ("ddpm", "ddim", "dpm++")),
                                     ("mask_channel", self.mask_channel, ("none", "nonzero"))):
            _choice(name, value, choices)
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0 (1.0: off), got {self.guidance}")
        if int(self.sampler_steps) != self.sampler_steps or self.sampler_steps < 1:
            raise ValueError(f"sampler_steps must be a whole number >= 1, got {self.sampler_steps}")
        if self.mask_channel != "none" and self.space != "params":
            raise ValueError("mask_channel needs space 'params' (the autoencoder would blur the mask)")
        if self.space == "latent" and self.autoencoder.steps < 1:
            raise ValueError(f"autoencoder.steps must be >= 1 in latent space, got {self.autoencoder.steps}")

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(data=self.data.to_json(), dit=dataclasses.asdict(self.dit),
                   autoencoder=dataclasses.asdict(self.autoencoder))
        return out

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> GeneratorConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"unknown generator config keys {unknown}: the checkpoint was written by a newer "
                             "gpt-params; upgrade to load it")
        kwargs = {**BEFORE_ISSUE_16, **config}   # older checkpoints keep what they were written with
        kwargs["data"] = DataInfo.from_json(config["data"])
        kwargs["dit"] = DiTOptions(**{**DIT_BEFORE_ISSUE_16, **config.get("dit", {})})
        kwargs["autoencoder"] = AutoencoderOptions(**config.get("autoencoder", {}))
        return cls(**kwargs)

    @classmethod
    def from_legacy_hparams(cls, hparams: Mapping[str, Any]) -> GeneratorConfig:
        """The config of a checkpoint written before the redesign (flat ``GeneratorModule`` hyperparameters)."""
        top = {f.name for f in dataclasses.fields(cls)} - {"data", "dit", "autoencoder"}
        groups: dict[str, dict[str, Any]] = {"dit": {}, "optim": {}, "autoencoder": {}}
        kwargs: dict[str, Any] = dict(BEFORE_ISSUE_16)
        for key, value in hparams.items():
            if key in LEGACY_NAMES:
                group, field = LEGACY_NAMES[key]
                groups[group][field] = value
            elif key in top:
                kwargs[key] = value
        return cls(data=DataInfo.from_json(hparams["data_info"]), dit=DiTOptions(**{**DIT_BEFORE_ISSUE_16, **groups["dit"]}),
                   autoencoder=AutoencoderOptions(**groups["autoencoder"]), **kwargs)
