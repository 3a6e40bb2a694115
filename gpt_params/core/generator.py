"""The generator: tokenizer + DiT denoiser + diffusion (+ autoencoder), rebuilt from its config alone.

``Generator(GeneratorConfig(...))`` builds every part from plain values (nanoGPT's
``GPT(GPTConfig(**args))``); ``Generator.load(ckpt)`` reads a checkpoint written by ``gpt-params train``
with ``weights_only=True`` (nothing is unpickled) and loads the EMA weights Lightning stored as its
``state_dict``. Nothing here imports Lightning: training wraps a Generator in
``gpt_params.training.GeneratorModule``, which adds only the optimizer, the schedule and the loss step.

Every mode generates parameter vectors: a latent-space generator decodes its samples with its
autoencoder; a start-free one (``uses_start`` False) ignores the start it is given (``None`` is fine);
an unconditional one (``conditional`` False) ignores the target metric.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Mapping, Optional, Sequence

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from checkpoints_dataset.fileio import write_bytes_atomic
from checkpoints_dataset.info import DataInfo
from checkpoints_dataset.params import LayerShapes
from checkpoints_dataset.tasks import Task, TaskRef
from gpt_params.core.autoencoder import ParameterAutoencoder
from gpt_params.core.compression import Projection, read_network
from gpt_params.core.conditions import Conditions
from gpt_params.core.config import GeneratorConfig
from gpt_params.core.diffusion import Diffusion, sample
from gpt_params.core.dit import ParameterDiT
from gpt_params.core.parts import PartSpec, parts_from_json
from gpt_params.core.relations import find_relations
from gpt_params.core.tokenizer import ParameterTokenizer

Sampler = Literal["ddpm", "ddim", "dpm++"]
CHECKPOINT_KEY = "gpt_params"            # top-level checkpoint key: {"format": 2, "generator": config.to_json()}
CHECKPOINT_FORMAT = 2
LEGACY_MARKER = "gpt_params_format"      # format 1: flat GeneratorModule hyperparameters held the config
GENERATE_VALUES = 2 ** 24                # parameters generated at once by default (16 networks of 1M)


class Generator(nn.Module):
    """Maps (start params, start metric, target metric) to parameter vectors; see ``generate``.

    ``conditions`` describes the conditioning (metric, its range in the data, start and target use);
    ``metric``, ``lower_is_better``, ``data_range``, ``best``, ``init_metric``, ``uses_start`` and
    ``conditional`` are its fields; ``space`` ("params"/"latent") and ``guidance`` (the default scale)
    come from the config.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        info = config.data
        # Built in this order (tokenizer, autoencoder, DiT) so a seed gives the weights it always gave.
        masked = config.mask_channel != "none"
        self.tokenizer = ParameterTokenizer(info.layer_shapes, layout=config.layout, chunk_size=config.chunk_size,
                                            stats=info.nonzero_stats if masked and info.nonzero_stats else info.stats,
                                            spec=info.permutation_spec, mask_channel=config.mask_channel)
        tok = self.tokenizer
        latent = config.space == "latent"
        self.autoencoder: Optional[ParameterAutoencoder] = None
        if latent:
            ae = config.autoencoder
            self.autoencoder = ParameterAutoencoder(
                tok.num_tokens, tok.token_dim, tok.token_layer_ids, latent_dim=ae.latent_dim,
                hidden_size=ae.hidden_size, depth=ae.depth, num_heads=ae.num_heads,
                input_noise=ae.input_noise, latent_noise=ae.latent_noise, token_mask=tok.mask,
                activation=config.dit.activation)
        self.model = ParameterDiT.from_preset(
            config.dit.size, num_tokens=tok.num_tokens,
            token_dim=config.autoencoder.latent_dim if latent else tok.token_dim,
            token_layer_ids=tok.token_layer_ids, prediction=config.prediction, residual=config.dit.residual,
            metric_range=info.metric_range, projection=config.dit.projection,
            token_mask=None if latent else tok.mask, start_input=config.start, condition=config.condition,
            relations=[r.to_json() for r in find_relations(tok)] if config.dit.relations == "edges" and not latent
            else None, edge_size=config.dit.edge_size, activation=config.dit.activation,
            attention=config.dit.attention, window=config.dit.window,
            parts=list(info.parts), **config.dit.overrides())
        self.diffusion = Diffusion(prediction=config.prediction, min_snr_gamma=config.min_snr_gamma)
        self.register_buffer("token_mask", tok.mask.clone(), persistent=False)   # [T, C]
        self.conditions = Conditions(
            metric=info.metric, lower_is_better=bool(info.lower_is_better), data_range=info.metric_range,
            best=float(info.best), init_metric=float(info.init_metric), uses_start=config.start == "checkpoint",
            conditional=config.condition == "target")

    # ------------------------------------------------------------------ description
    @property
    def info(self) -> DataInfo:
        return self.config.data

    @property
    def metric(self) -> str:
        return self.conditions.metric

    @property
    def parts(self) -> list[PartSpec]:
        """The condition parts besides the target metric (named scalars and labels; issue 18)."""
        return parts_from_json(self.info.parts)

    @property
    def lower_is_better(self) -> bool:
        return self.conditions.lower_is_better

    @property
    def data_range(self) -> tuple[float, float]:
        return self.conditions.data_range

    @property
    def best(self) -> float:
        return self.conditions.best

    @property
    def init_metric(self) -> float:
        return self.conditions.init_metric

    @property
    def uses_start(self) -> bool:
        return self.conditions.uses_start

    @property
    def conditional(self) -> bool:
        return self.conditions.conditional

    @property
    def space(self) -> str:
        return self.config.space

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale ``generate`` uses by default (``--model.guidance``; 1.0: off)."""
        return float(self.config.guidance)

    @property
    def sampler(self) -> str:
        """The sampler ``generate`` uses by default (``--model.sampler``)."""
        return self.config.sampler

    @property
    def sampler_steps(self) -> int:
        """The sampler's number of denoiser calls ``generate`` uses by default (``--model.sampler_steps``)."""
        return int(self.config.sampler_steps)

    @property
    def task_name(self) -> Optional[str]:
        return self.info.task

    @property
    def store_root(self) -> Optional[str]:
        return self.info.store_root

    @property
    def layer_shapes(self) -> LayerShapes:
        return self.info.layer_shapes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_target(self, targets: Sequence[float], bounds: Optional[tuple[float, float]] = None) -> list[str]:
        """See ``Conditions.check_target``."""
        return self.conditions.check_target(targets, bounds)

    # ------------------------------------------------------------------ training
    def encode(self, params: Tensor) -> Tensor:
        """Parameter vectors [N, P] -> the tokens the DiT works on: [N, T, C], or frozen latents [N, T, d]."""
        tokens = self.tokenizer.tokenize(params)              # [N, T, C]
        if self.autoencoder is None:
            return tokens
        self.autoencoder.eval()   # frozen: running latent statistics, never updated again
        with torch.no_grad():
            return self.autoencoder.encode(tokens)            # [N, T, d]

    def denoising_loss(self, batch: dict[str, Tensor], cond_drop_prob: float, denoiser: nn.Module | None = None,
                       generator: torch.Generator | None = None,
                       function_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """The diffusion loss of a batch of pairs (``start``/``target`` [N, P], ``start_metric``/``target_metric``
        [N]); ``denoiser`` is ``self.model`` or a compiled wrapper of it. ``function_loss(predicted [N, P],
        target [N, P])`` (see ``FunctionLoss``), when given, is added: it compares the networks of the clean
        predictions (x0, or derived from v) with their targets on the task's inputs."""
        target = self.encode(batch["target"])                 # [N, T, C] or [N, T, d]
        start = self.encode(batch["start"]) if self.uses_start else torch.zeros_like(target)
        err, pred = self.diffusion.training_terms(
            denoiser or self.model, target, start, batch["start_metric"], batch["target_metric"],
            cond_drop_prob=cond_drop_prob, mask=None if self.autoencoder is not None else self.token_mask,
            generator=generator, parts=batch.get("target_parts") if self.parts else None,
            weights=self.tokenizer.loss_weights(target) if self.config.mask_channel != "none" else None)
        loss = err.mean()
        if function_loss is not None:
            if self.autoencoder is not None or self.config.prediction == "epsilon":
                raise ValueError("the function-space loss needs clean predictions of parameter tokens: use "
                                 "--model.prediction x0 or v and --model.space params")
            loss = loss + function_loss(self.tokenizer.detokenize(pred), batch["target"])
        return loss

    # ------------------------------------------------------------------ prompting
    @torch.no_grad()
    def generate(self, start_params: Optional[Tensor], start_metric, target_metric, *, sampler: Optional[Sampler] = None,
                 steps: Optional[int] = None, guidance: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 batch_size: Optional[int] = None, trajectory: bool = False, parts: Optional[Mapping] = None,
                 part_guidance: Optional[Mapping[str, float]] = None,
                 constraint: Optional[Callable[[Tensor, Optional[Tensor]], Projection]] = None,
                 constrain_from: float = 0.5) -> Tensor | tuple[Tensor, Tensor] | Projection:
        """Parameter vectors [N, P] for N prompts, on the generator's device, sampled in batches.
        A start-free generator takes ``start_params=None`` (N from ``target_metric``) and ignores a
        given start; an unconditional one ignores ``target_metric`` (it still sets N). ``sampler``, ``steps``
        and ``guidance`` None: the generator's defaults (``self.sampler``, ``self.sampler_steps``, ``self.guidance``).
        ``batch_size`` None: as many networks at once as hold ``GENERATE_VALUES`` parameters (at most 4096);
        sampling holds several token tensors per network, so 80 networks of 1M parameters took 6 GB at once.
        ``trajectory=True`` also returns the predicted clean sample of every step, decoded to parameters
        ``[S, N, P]`` on the CPU (S sampler steps; the last equals the result for the deterministic samplers).
        ``parts``: values of the condition parts by name (a number or ``[N]`` each; a label as its class
        index); parts not named get their null embedding. ``part_guidance``: a guidance scale by part name.
        A name the generator does not know is refused. ``constraint(params [n, P], scores) -> Projection`` (e.g.
        ``lambda p, s: project(p, layer_shapes, names, 0.9, 4, scores=s)``, the same for every network; ``scores``
        is a mask channel's output, what to keep by, or None) is applied to the x0
        predictions of the steps from ``constrain_from`` of the way on and to the result, so the last steps
        denoise networks that meet it; then a ``Projection`` is returned whose ``distance`` is how far the
        model's last own prediction was from the constraint (1.0: only the result is projected)."""
        guidance = self.guidance if guidance is None else guidance
        sampler = self.sampler if sampler is None else sampler
        steps = self.sampler_steps if steps is None else steps
        device = self.device
        if constraint is not None and trajectory:
            raise ValueError("generate takes either trajectory=True or a constraint, not both")
        if start_params is None:
            if self.uses_start:
                raise ValueError("this generator was trained with start checkpoints: pass start_params [N, P]")
            n = torch.as_tensor(target_metric).reshape(-1).shape[0]
            start_params = torch.zeros(n, self.tokenizer.num_params)
            start_metric = 0.0 if start_metric is None else start_metric
        start_params = torch.as_tensor(start_params, dtype=torch.float32)
        n = start_params.shape[0]
        start_metric = torch.as_tensor(start_metric, dtype=torch.float32).reshape(-1).expand(n)    # [N]
        target_metric = torch.as_tensor(target_metric, dtype=torch.float32).reshape(-1).expand(n)  # [N]
        values, given, scales = self._part_inputs(n, parts, part_guidance)   # [N, E], [N, E], [E] or Nones
        if batch_size is None:
            batch_size = max(1, min(4096, GENERATE_VALUES // self.tokenizer.num_params))
        out, path, moved = [], [], []
        for i in range(0, n, batch_size):
            sl, steps_seen, log = slice(i, i + batch_size), [], []

            def project(params: Tensor, scores: Optional[Tensor]) -> Tensor:
                log.append(constraint(params, scores))
                return log[-1].params.to(params.device)

            out.append(sample(self.model, self.tokenizer, start_params[sl].to(device),
                              start_metric[sl].to(device), target_metric[sl].to(device),
                              sampler=sampler, steps=steps, guidance=guidance, generator=generator,
                              diffusion=self.diffusion, autoencoder=self.autoencoder,
                              callback=(lambda _i, _t, x0: steps_seen.append(x0.cpu())) if trajectory else None,
                              parts=None if values is None else values[sl].to(device),
                              parts_given=None if given is None else given[sl].to(device), part_guidance=scales,
                              project=project if constraint is not None else None, project_from=constrain_from))
            path.append(steps_seen)
            if constraint is not None:   # the last hooked step's projection (the model's own last prediction)
                moved.append(log[-2] if len(log) > 1 else log[-1])
        if constraint is not None:
            return Projection(params=torch.cat(out), distance=torch.cat([m.distance for m in moved]),
                              pruned_mass=torch.cat([m.pruned_mass for m in moved]))
        if not trajectory:
            return torch.cat(out)                             # [N, P]
        return torch.cat(out), torch.stack([torch.cat(step) for step in zip(*path)])  # [N, P], [S, N, P]

    def _part_inputs(self, n: int, parts: Optional[Mapping], part_guidance: Optional[Mapping[str, float]]):
        """Named part values and guidance -> ``values [N, E]``, ``given [N, E]`` bool and scales ``[E]`` in the
        model's order (all None for a generator without parts)."""
        specs = self.parts
        names = [p.name for p in specs]
        for what, given in (("parts", parts), ("part_guidance", part_guidance)):
            unknown = sorted(set(given or {}) - set(names))
            if unknown:
                raise ValueError(f"{what} {unknown}: this generator is conditioned on "
                                 f"{names or 'no parts'} besides {self.metric}")
        if not specs:
            return None, None, None
        values = torch.zeros(n, len(specs))
        given = torch.zeros(n, len(specs), dtype=torch.bool)
        for j, spec in enumerate(specs):
            if parts is not None and spec.name in parts:
                v = torch.as_tensor(parts[spec.name], dtype=torch.float32).reshape(-1)
                if v.numel() not in (1, n):
                    raise ValueError(f"part {spec.name} has {v.numel()} values: give one, or one per prompt ({n})")
                spec.check(v)
                values[:, j], given[:, j] = v.expand(n), True
        scales = [float((part_guidance or {}).get(p.name, 1.0)) for p in specs]
        for spec, scale, j in zip(specs, scales, range(len(specs))):
            if scale != 1.0 and not given[:, j].any():
                raise ValueError(f"guidance on part {spec.name} needs its value: give parts={{{spec.name!r}: ...}} "
                                 f"(--label {spec.name}=VALUE)")
        return values, given, scales

    def make_task(self, name: Optional[str] = None, **options) -> Optional[Task]:
        """The task that builds and scores this generator's networks.

        ``name`` is a task the caller gives (a built-in name or an import path, which is imported). Without it,
        the task the generator was trained on, with its saved options: a built-in task, or an import path that
        is refused (``UntrustedTaskError``), since a name read from a checkpoint is never imported; the user
        names it again with ``--task``. Saved options are updated by the non-None ``options`` (e.g.
        ``data_dir``, ``evaluator="gymnasium"``). None when no task is known. Refuses a task whose
        architecture (layer names and shapes) differs from the generator's."""
        saved = self.info.task
        if name is None and saved is None:
            return None
        if name is None or name == saved:
            ref = TaskRef.from_file(saved, self.info.task_kwargs, given=name, option="--task",
                                    source="the generator's checkpoint")
        else:
            ref = TaskRef(name)
        return ref.with_options(**options).check_shapes(self.info.layer_shapes, "this generator's")

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load(cls, ckpt_path: str | Path, device: Optional[str | torch.device] = None) -> Generator:
        """The generator of a checkpoint written by ``gpt-params train`` (EMA weights, eval mode)."""
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: pass the .ckpt written by `gpt-params train` "
                                    "(it prints its path; look under <default_root_dir>/.../checkpoints/)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path} is not a gpt-params checkpoint: it cannot be read as a weights-only torch "
                             "checkpoint (files from others are never unpickled); pass a checkpoint written by "
                             "`gpt-params train`") from err
        config, prefix = cls._read_config(ckpt, path)
        gen = cls(config)
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items()
                 if k.startswith(prefix) and not k.startswith("_forward_model.")}  # format 1 held the DiT twice
        try:
            gen.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{path}: its weights do not fit the generator its config describes ({err})") from None
        gen.eval()
        return gen if device is None else gen.to(device)

    @staticmethod
    def _read_config(ckpt, path: Path) -> tuple[GeneratorConfig, str]:
        """(config, state_dict prefix) of a checkpoint of either format."""
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"{path} is not a gpt-params checkpoint (no state_dict); pass a checkpoint written "
                             "by `gpt-params train`")
        if isinstance(ckpt.get(CHECKPOINT_KEY), dict) and "generator" in ckpt[CHECKPOINT_KEY]:
            return GeneratorConfig.from_json(ckpt[CHECKPOINT_KEY]["generator"]), "generator."
        hparams = ckpt.get("hyper_parameters") or {}
        if LEGACY_MARKER in hparams and "data_info" in hparams:
            return GeneratorConfig.from_legacy_hparams(hparams), ""
        raise ValueError(f"{path} is not a gpt-params checkpoint (no generator config in it); pass a checkpoint "
                         "written by `gpt-params train`")


def save_state_dict(path: str | Path, state_dict: dict[str, Tensor], metadata: Optional[dict] = None) -> None:
    """Write a state_dict as safetensors (contiguous CPU tensors; metadata values as strings), atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors state_dict (never a pickle)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: start parameters must be a .safetensors state_dict (pickles are not "
                         "loaded); save one with safetensors.torch.save_file(model.state_dict(), path)")
    try:
        return read_network(path)   # a packed file (prompt --format packed) comes back dense
    except FileNotFoundError:
        raise
    except Exception as err:   # safetensors raises its own error type for a damaged file
        raise ValueError(f"{path} is not a readable safetensors state_dict ({err}); save one with "
                         "safetensors.torch.save_file(model.state_dict(), path)") from None
