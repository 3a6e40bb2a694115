"""Diffusion over parameter tokens with diffusers' schedulers: training loss, samplers, guidance.

- Training noise: ``DDPMScheduler`` (G.pt's schedule: 1000 steps, linear betas 1e-4..0.02).
- Sampling: ``"ddpm"`` (ancestral, G.pt's sampler at steps=1000), ``"ddim"`` (eta 0, deterministic) and
  ``"dpm++"`` (DPM-Solver++ 2M, deterministic), each with any number of steps. DDIM and DDPM use
  ``timestep_spacing="trailing"`` so the first step starts at t = T-1 (pure noise) for every step count.
  Clipping and thresholding are off everywhere: diffusers' DDIM clips predictions to [-1, 1] by default,
  which corrupts normalized parameters.
- Classifier-free guidance: the model sees the target metric dropped (null embedding) with probability
  ``cond_drop_prob`` in training; at sampling ``guidance`` s gives ``uncond + s * (cond - uncond)`` from
  one batched forward of 2N; ``guidance == 1`` is a single conditional forward (exactly unguided).
- Padding slots (``mask`` False) are kept at zero: noise is masked in training and at every sampling step.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn

from .dit import Prediction

Sampler = Literal["ddpm", "ddim", "dpm++"]
StepCallback = Callable[[int, int, Tensor], None]  # (step index, timestep, predicted clean sample [N, ...])
SAMPLERS = ("ddpm", "ddim", "dpm++")
PREDICTION_TYPES = {"x0": "sample", "epsilon": "epsilon", "v": "v_prediction"}  # ours -> diffusers'


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _metric(value, n: int, device: torch.device, what: str) -> Tensor:
    """A float, ``[1]`` or ``[N]`` metric -> finite float32 ``[N]`` on ``device``; clear error otherwise."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten().to(device)
    if t.numel() == 1:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{what} must be a number or have {n} entries (one per prompt), got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf: {t.tolist()[:8]}; pass finite metric values")
    return t


class Diffusion:
    """Noise schedule, training loss and samplers for a denoiser with the ``ParameterDiT`` signature.

    Args:
        num_train_timesteps, beta_schedule, beta_start, beta_end: DDPM schedule (G.pt's by default).
        prediction: what the model predicts ("x0", "epsilon", "v"); must match ``model.prediction``.
        min_snr_gamma: min-SNR loss weighting (Hang et al. 2023) with this gamma; None = plain MSE.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", prediction: Prediction = "x0",
                 min_snr_gamma: float | None = None, beta_start: float = 1e-4, beta_end: float = 0.02):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {list(PREDICTION_TYPES)}, got {prediction!r}")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
        self.prediction, self.min_snr_gamma = prediction, min_snr_gamma
        self.schedule = dict(num_train_timesteps=int(num_train_timesteps), beta_schedule=beta_schedule,
                             beta_start=float(beta_start), beta_end=float(beta_end),
                             prediction_type=PREDICTION_TYPES[prediction])
        self.num_train_timesteps = int(num_train_timesteps)
        self.train_scheduler = DDPMScheduler(**self.schedule, clip_sample=False)
        self.alphas_cumprod = self.train_scheduler.alphas_cumprod  # [num_train_timesteps] float32 (CPU)

    def config(self) -> dict:
        """JSON-able constructor arguments."""
        s = self.schedule
        return dict(num_train_timesteps=s["num_train_timesteps"], beta_schedule=s["beta_schedule"],
                    prediction=self.prediction, min_snr_gamma=self.min_snr_gamma,
                    beta_start=s["beta_start"], beta_end=s["beta_end"])

    def _check_model(self, model: nn.Module) -> None:
        got = getattr(model, "prediction", self.prediction)
        if got != self.prediction:
            raise ValueError(f"the model predicts {got!r} but the diffusion expects {self.prediction!r}; "
                             f"build Diffusion(prediction={got!r})")

    def make_scheduler(self, sampler: Sampler, steps: int):
        """A fresh diffusers scheduler for ``sampler`` with ``steps`` inference steps set."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if isinstance(steps, bool) or not hasattr(steps, "__index__") or operator.index(steps) < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        steps = operator.index(steps)
        if steps > self.num_train_timesteps:
            raise ValueError(f"steps={steps} exceeds the {self.num_train_timesteps} training timesteps")
        with warnings.catch_warnings():  # diffusers' own numpy-2 DeprecationWarning, nothing of ours
            warnings.simplefilter("ignore", DeprecationWarning)
            if sampler == "ddpm":
                sched = DDPMScheduler(**self.schedule, clip_sample=False, thresholding=False,
                                      timestep_spacing="trailing")
            elif sampler == "ddim":
                sched = DDIMScheduler(**self.schedule, clip_sample=False, thresholding=False,
                                      timestep_spacing="trailing")
            else:
                sched = DPMSolverMultistepScheduler(**self.schedule, algorithm_type="dpmsolver++", solver_order=2,
                                                    thresholding=False)
            sched.set_timesteps(steps)
        return sched

    # ------------------------------------------------------------------------------------------ training
    def training_loss(self, model: nn.Module, target_tokens: Tensor, start_tokens: Tensor, start_metric: Tensor,
                      target_metric: Tensor, cond_drop_prob: float = 0.1, mask: Tensor | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """Masked MSE between the model output and its target (x0, noise or velocity) at random timesteps.

        ``target_tokens``/``start_tokens`` ``[N, T, C]``, metrics ``[N]`` (raw values), ``mask [T, C]``
        bool of real entries (None = all). The target metric is dropped with probability ``cond_drop_prob``.
        """
        return self.training_terms(model, target_tokens, start_tokens, start_metric, target_metric,
                                   cond_drop_prob, mask, generator)[0].mean()

    def training_terms(self, model: nn.Module, target_tokens: Tensor, start_tokens: Tensor, start_metric: Tensor,
                       target_metric: Tensor, cond_drop_prob: float = 0.1, mask: Tensor | None = None,
                       generator: torch.Generator | None = None, parts: Tensor | None = None,
                       weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``training_loss`` per pair ``[N]`` (weighted) and the clean sample the model predicts ``[N, T, C]`` (its
        output for x0 models; from the output, ``x_t`` and the timestep for epsilon and v). ``parts [N, E]``:
        the condition parts' values (a model with parts), each dropped on its own with ``cond_drop_prob``.
        ``weights [N, T, C]``: per-slot loss weights instead of ``mask`` (e.g. a mask channel's true mask)."""
        self._check_model(model)
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        x0 = target_tokens  # [N, T, C]
        n, device = x0.shape[0], x0.device
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=gen_device).to(device)  # [N]
        noise = _randn(tuple(x0.shape), generator, device).to(x0.dtype)  # [N, T, C]
        maskf = torch.ones_like(x0[0]) if mask is None else mask.to(device=device, dtype=x0.dtype)  # [T, C]
        noise = noise * maskf
        x_t = self.train_scheduler.add_noise(x0, noise, t)  # [N, T, C]
        drop = torch.rand(n, generator=generator, device=gen_device).to(device) < cond_drop_prob  # [N]
        extra = {}
        if parts is not None:  # each part dropped on its own: guidance per part at sampling
            e = parts.shape[1]
            drop_parts = torch.rand(n, e, generator=generator, device=gen_device).to(device) < cond_drop_prob  # [N, E]
            extra = dict(parts=parts.to(device), drop_parts=drop_parts)
        pred = model(x_t, t, start_tokens, target_metric, start_metric, drop_target=drop, **extra)  # [N, T, C]
        if self.prediction == "x0":
            target = x0
        elif self.prediction == "epsilon":
            target = noise
        else:
            target = self.train_scheduler.get_velocity(x0, noise, t)  # [N, T, C]
        w = maskf if weights is None else weights.to(device=device, dtype=x0.dtype)  # [T, C] or [N, T, C]
        err = ((pred.float() - target.float()) ** 2 * w).sum(dim=(1, 2)) / w.sum(dim=(-2, -1)).clamp(min=1)  # [N]
        abar = self.alphas_cumprod.to(device=device, dtype=torch.float32)[t]  # [N]
        if self.min_snr_gamma is not None:
            snr = abar / (1 - abar)  # [N]
            clipped = snr.clamp(max=self.min_snr_gamma)
            weight = {"x0": clipped, "epsilon": clipped / snr, "v": clipped / (snr + 1)}[self.prediction]  # [N]
            err = err * weight
        return err, self._clean(pred, x_t, abar.to(pred.dtype)[:, None, None])  # abar [N, 1, 1]

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_tokens(self, model: nn.Module, start_tokens: Tensor, start_metric: Tensor, target_metric: Tensor, *,
                      sampler: Sampler = "ddim", steps: int = 50, guidance: float = 1.0,
                      generator: torch.Generator | None = None, mask: Tensor | None = None,
                      callback: StepCallback | None = None, parts: Tensor | None = None,
                      parts_given: Tensor | None = None, part_guidance: Sequence[float] | None = None,
                      x0_hook: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
        """Sample target tokens ``[N, T, C]`` for start tokens ``[N, T, C]`` and metrics ``[N]`` (raw values).

        Runs on the model's device (inputs are moved there) with the model as given (``sample`` puts it
        in eval mode). ``mask [T, C]`` keeps padding at zero. Deterministic for a given ``generator``.
        ``callback(i, t, x0)``, when given, sees after every step ``i`` (timestep ``t``) the predicted clean
        sample ``x0 [N, T, C]`` (``predicted_clean``), e.g. to watch the parameters emerge.
        Condition parts (a model with parts): ``parts [N, E]`` their values, ``parts_given [N, E]`` bool which of
        them are prompted (the others get their null embedding; default all when ``parts`` is given, none
        without), ``part_guidance`` one scale per part (1.0: off). Guidance composes: ``out = cond + (g - 1)
        (cond - uncond_target) + sum_j (g_j - 1) (cond - uncond_j)``, each ``uncond`` dropping only its own part,
        so guidance on one part leaves the others' conditioning alone (all from one batched forward).
        ``x0_hook(i, x0) -> x0``, for x0 models, replaces the (guided) prediction of step ``i`` before the
        scheduler steps with it (e.g. an exact projection onto a constraint; it returns ``x0`` to leave a step).
        """
        self._check_model(model)
        scheduler = self.make_scheduler(sampler, steps)
        guidance = float(guidance)
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number (1.0 = off), got {guidance}")
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        start = start_tokens.to(device=device, dtype=dtype)  # [N, T, C]
        n = start.shape[0]
        start_metric = _metric(start_metric, n, device, "start_metric")  # [N]
        target_metric = _metric(target_metric, n, device, "target_metric")  # [N]
        maskf = torch.ones_like(start[0]) if mask is None else mask.to(device=device, dtype=dtype)  # [T, C]
        x = _randn(tuple(start.shape), generator, device).to(dtype) * maskf * scheduler.init_noise_sigma  # [N, T, C]
        variants, extra = self._guidance_variants(n, device, guidance, parts, parts_given, part_guidance)
        k = len(variants)  # forwards per step, in one batch of k*N: the conditional one, then one per guided part
        if k > 1:
            start_k, sm_k, tm_k = start.repeat(k, 1, 1), start_metric.repeat(k), target_metric.repeat(k)  # [kN, ...]
            drop_k = torch.cat([torch.full((n,), kind == "target", device=device) for kind, _, _ in variants])  # [kN]
        for i, t in enumerate(scheduler.timesteps):
            tt = t.to(device).expand(n)  # [N]
            if k == 1:
                out = model(x, tt, start, target_metric, start_metric, **extra)  # [N, T, C]
            else:
                outs = model(x.repeat(k, 1, 1), tt.repeat(k), start_k, tm_k, sm_k, drop_target=drop_k,
                             **extra).chunk(k)  # k x [N, T, C]
                cond, out = outs[0], outs[0]
                for (kind, _, scale), uncond in zip(variants[1:], outs[1:]):
                    if kind == "target":  # G.pt's formula exactly (checkpoints before parts sample the same)
                        out = uncond + scale * (cond - uncond) + (out - cond)
                    else:
                        out = out + (scale - 1.0) * (cond - uncond)  # [N, T, C]
            if x0_hook is not None and self.prediction == "x0":
                out = x0_hook(i, out)  # [N, T, C]
            step = scheduler.step(out, t, x, generator=generator)
            if callback is not None:
                callback(i, int(t), self.predicted_clean(out, x, t, step) * maskf)  # [N, T, C]
            x = step.prev_sample * maskf  # [N, T, C]
        return x

    @staticmethod
    def _guidance_variants(n: int, device, guidance: float, parts: Tensor | None, parts_given: Tensor | None,
                           part_guidance: Sequence[float] | None) -> tuple[list[tuple[str, int, float]], dict]:
        """The forwards of one sampling step as ``(kind, part index, scale)``: ("cond", -1, 1) first, then
        ("target", -1, g) and ("part", j, g_j) for each guided condition; and the model's part arguments for
        all of them stacked ``[kN, E]``."""
        variants = [("cond", -1, 1.0)] + ([("target", -1, guidance)] if guidance != 1.0 else [])
        if parts is None:
            if part_guidance is not None and any(g != 1.0 for g in part_guidance):
                raise ValueError("part_guidance needs the parts' values (parts=...)")
            return variants, {}
        parts = parts.to(device).float()  # [N, E]
        e = parts.shape[1]
        given = torch.ones(n, e, dtype=torch.bool, device=device) if parts_given is None else \
            torch.as_tensor(parts_given, device=device).bool()  # [N, E]
        scales = [1.0] * e if part_guidance is None else [float(g) for g in part_guidance]
        if len(scales) != e or not all(math.isfinite(g) for g in scales):
            raise ValueError(f"part_guidance needs one finite scale per part ({e}), got {part_guidance}")
        unguidable = [j for j, g in enumerate(scales) if g != 1.0 and not given[:, j].all()]
        if unguidable:   # cond and uncond would be the same forward: the guidance would do nothing
            raise ValueError(f"part_guidance on parts {unguidable} needs their values for every prompt")
        variants += [("part", j, g) for j, g in enumerate(scales) if g != 1.0]
        drops = []
        for kind, j, _ in variants:
            drop = ~given  # [N, E] parts not prompted always get their null embedding
            if kind == "part":
                drop = drop.clone()
                drop[:, j] = True
            drops.append(drop)
        k = len(variants)
        return variants, dict(parts=parts.repeat(k, 1), drop_parts=torch.cat(drops))

    def predicted_clean(self, out: Tensor, x_t: Tensor, t, step=None) -> Tensor:
        """The clean sample a (guided) model output ``out`` predicts at ``x_t`` and timestep ``t``: the output
        itself for x0 models; else the scheduler step's ``pred_original_sample`` where it gives one (DDPM,
        DDIM), or ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (epsilon) / ``sqrt(abar) x_t - sqrt(1 - abar) v``
        (v) from the schedule (DPM-Solver++)."""
        if self.prediction == "x0":
            return out
        given = getattr(step, "pred_original_sample", None)
        if given is not None:
            return given
        return self._clean(out, x_t, self.alphas_cumprod[int(t)].to(device=x_t.device, dtype=x_t.dtype))

    def _clean(self, out: Tensor, x_t: Tensor, abar: Tensor) -> Tensor:
        """The clean sample a model output predicts at ``x_t`` with ``abar`` (a scalar or one per sample)."""
        if self.prediction == "x0":
            return out
        if self.prediction == "epsilon":   # unstable where abar -> 0 (1/sqrt(abar) ~ 150 at t = 999)
            return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        return abar.sqrt() * x_t - (1 - abar).sqrt() * out  # v


def sample(model: nn.Module, tokenizer, start_params: Tensor, start_metric, target_metric, *,
           sampler: Sampler = "ddim", steps: int = 50, guidance: float = 1.0,
           generator: torch.Generator | None = None, diffusion: Diffusion | None = None,
           autoencoder: nn.Module | None = None, callback: StepCallback | None = None, parts: Tensor | None = None,
           parts_given: Tensor | None = None, part_guidance: Sequence[float] | None = None,
           project: Callable[[Tensor, Tensor | None], Tensor] | None = None, project_from: float = 0.5) -> Tensor:
    """Generate parameter vectors ``[N, P]`` (float32, on ``start_params``' device) for a batch of prompts.

    ``start_params [N, P]`` (or ``[P]``), metrics as numbers or ``[N]`` raw values. The model runs in
    eval mode under ``torch.no_grad`` on its own device (its training mode is restored afterwards);
    ``diffusion`` defaults to ``Diffusion(prediction=model.prediction)``.
    Latent space: with an ``autoencoder`` (``ParameterAutoencoder``) the model denoises latent tokens;
    the start is encoded and the sample decoded at the end. A start-free model
    (``model.start_input == "none"``) gets zero start tokens; ``start_params`` then only gives N.
    ``callback(i, t, params [N, P])`` sees the predicted clean sample of every step, decoded to parameter
    vectors like the result; ``parts``, ``parts_given`` and ``part_guidance``: the condition parts (see
    ``Diffusion.sample_tokens``). ``project(params [N, P], scores [N, P] | None) -> [N, P]`` (parameter space,
    no autoencoder) is applied to the x0 prediction of the steps from ``project_from`` of the way on (x0 models)
    and to the result, so the last denoising steps work from networks that meet the constraint; with a mask
    channel it gets every value as predicted and the channel as the scores to keep by, else ``None``.
    """
    start_params = torch.as_tensor(start_params)
    if start_params.dim() == 1:
        start_params = start_params[None]  # [1, P]
    if torch.is_floating_point(start_params) and not torch.isfinite(start_params).all():
        bad = (~torch.isfinite(start_params)).any(dim=1).nonzero()[:, 0].tolist()
        raise ValueError(f"start_params has NaN or inf in rows {bad[:8]}; pass finite parameter vectors")
    device = next(model.parameters()).device
    n = start_params.shape[0]
    start_free = getattr(model, "start_input", "checkpoint") == "none"
    start_metric, target_metric = _metric(start_metric, n, device, "start_metric"), _metric(
        target_metric, n, device, "target_metric")  # [N]
    diffusion = diffusion if diffusion is not None else Diffusion(prediction=getattr(model, "prediction", "x0"))
    modules = [m for m in (model, autoencoder) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            if start_free:  # [N, T, C] or [N, T, d] zeros: the model ignores them
                start_tokens = torch.zeros(n, model.num_tokens, model.token_dim, device=device)
            else:
                start_tokens = tokenizer.tokenize(start_params.to(device)).float()  # [N, T, C]
                if autoencoder is not None:
                    start_tokens = autoencoder.encode(start_tokens)  # [N, T, d]
            def decode(tokens: Tensor) -> Tensor:  # [N, T, C] or latents [N, T, d] -> [N, P]
                if autoencoder is not None:
                    tokens = autoencoder.decode(tokens)  # [N, T, C]
                return tokenizer.detokenize(tokens.float()).to(start_params.device)  # [N, P]

            step_fn = None if callback is None else (lambda i, t, x0: callback(i, t, decode(x0)))
            if project is not None and autoencoder is not None:
                raise ValueError("project works in parameter space: it needs a generator with space 'params'")
            first = math.ceil(project_from * steps) if project is not None else steps

            def constrained(tokens: Tensor) -> Tensor:  # [N, T, C] -> projected [N, P]
                scores = tokenizer.mask_scores(tokens)
                params = tokenizer.detokenize(tokens.float(), apply_mask=False).to(start_params.device)
                return project(params, None if scores is None else scores.float().to(start_params.device))

            hook = None if project is None else (
                lambda i, x0: tokenizer.tokenize(constrained(x0).to(x0.device)).to(x0.dtype) if i >= first else x0)
            tokens = diffusion.sample_tokens(model, start_tokens, start_metric, target_metric, sampler=sampler,
                                             steps=steps, guidance=guidance, generator=generator,
                                             mask=None if autoencoder is not None else tokenizer.mask,
                                             callback=step_fn, parts=parts, parts_given=parts_given,
                                             part_guidance=part_guidance, x0_hook=hook)
            return decode(tokens) if project is None else constrained(tokens)  # [N, P]
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
