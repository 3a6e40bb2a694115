"""A trained generator, ready to prompt: load a checkpoint, generate parameters, save them.

``Generator.load(ckpt)`` reads a gpt-params Lightning checkpoint with ``weights_only=True`` (no
unpickling of arbitrary objects), rebuilds tokenizer and denoiser from its hyperparameters and loads the
EMA weights that ``EMAWeightAveraging`` stored as its ``state_dict``.

Every mode generates parameter vectors: a latent-space generator decodes its samples with its
autoencoder; a start-free one (``uses_start`` False) ignores the start it is given (``None`` is fine);
an unconditional one (``conditional`` False) ignores the target metric.
"""
from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from gpt_params.core.diffusion import sample
from gpt_params.training.module import CHECKPOINT_MARKER, GeneratorModule

Sampler = Literal["ddpm", "ddim", "dpm++"]


class Generator:
    """The generator of a checkpoint: ``generate`` maps (start params, start metric, target metric) to
    parameter vectors. ``metric``, ``lower_is_better`` and ``data_range`` describe the conditioning;
    ``space`` ("params"/"latent"), ``uses_start`` and ``conditional`` the mode."""

    def __init__(self, module: GeneratorModule) -> None:
        module.eval()
        self.module = module
        self.model, self.tokenizer, self.diffusion = module.model, module.tokenizer, module.diffusion
        self.autoencoder = getattr(module, "autoencoder", None)
        self.space: str = module.hparams.get("space", "params")
        self.uses_start: bool = module.hparams.get("start", "checkpoint") == "checkpoint"
        self.conditional: bool = module.hparams.get("condition", "target") == "target"
        self.guidance: float = float(module.hparams.get("guidance", 1.0))  # the default of ``generate``
        info = module.hparams.data_info
        self.info = info
        self.metric: str = info["metric"]
        self.lower_is_better: bool = bool(info["lower_is_better"])
        self.data_range: tuple[float, float] = tuple(info["metric_range"])
        self.best: float = float(info["best"])
        self.init_metric: float = float(info["init_metric"])
        self.task_name: Optional[str] = info.get("task")
        self.store_root: Optional[str] = info.get("store_root")
        self.layer_shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in info["layer_shapes"].items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, ckpt_path: str | Path, device: Optional[str | torch.device] = None) -> "Generator":
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
        hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not hparams or CHECKPOINT_MARKER not in hparams or "state_dict" not in ckpt:
            raise ValueError(f"{path} is not a gpt-params checkpoint (no gpt-params hyperparameters in it); "
                             "pass a checkpoint written by `gpt-params train`")
        accepted = inspect.signature(GeneratorModule.__init__).parameters   # LightningCLI adds its own keys
        hparams = {k: v for k, v in hparams.items() if k in accepted and k != "self"}
        hparams["compile"] = False
        module = GeneratorModule(**hparams)
        module.load_state_dict(ckpt["state_dict"])
        if device is not None:
            module.to(device)
        return cls(module)

    def make_task(self, name: Optional[str] = None, **options):
        """The task that builds and scores this generator's networks: ``name`` or the one it was trained
        on, with the task options saved at training (``data_dir``) updated by the non-None ``options``
        (e.g. ``evaluator="gymnasium"`` for cartpole). None when neither is known. Refuses a task whose
        architecture (layer names and shapes) differs from the generator's."""
        from checkpoints_dataset.tasks import get_task

        name = name or self.task_name
        if name is None:
            return None
        kwargs = dict(self.info.get("task_kwargs") or {}) if name == self.task_name else {}
        kwargs.update({k: v for k, v in options.items() if v is not None})
        task = get_task(name, **kwargs)
        shapes = {k: tuple(v) for k, v in task.layer_shapes.items()}
        if shapes != self.layer_shapes:
            raise ValueError(f"task {task.name} builds another architecture than the generator's "
                             f"({len(shapes)} entries, {task.num_params} params vs {len(self.layer_shapes)} "
                             "entries); give the task the generator was trained for")
        return task

    def check_target(self, targets: Sequence[float], bounds: Optional[tuple[float, float]] = None) -> list[str]:
        """Refuse targets outside the metric's valid ``bounds``; return warnings for those outside the
        range seen in the data (the generator extrapolates there)."""
        warnings = []
        lo, hi = self.data_range
        for t in targets:
            if not math.isfinite(t):
                raise ValueError(f"target {t} is not a finite number")
            if bounds is not None and not (bounds[0] <= t <= bounds[1]):
                raise ValueError(f"target {self.metric}={t} is outside its valid range "
                                 f"[{bounds[0]}, {bounds[1]}]; choose a target inside it")
            if not (lo <= t <= hi):
                warnings.append(f"target {self.metric}={t} is outside the range seen in the data "
                                f"[{lo:.4g}, {hi:.4g}]: the generator extrapolates there")
        return warnings

    @torch.no_grad()
    def generate(self, start_params: Optional[torch.Tensor], start_metric, target_metric,
                 *, sampler: Sampler = "ddim", steps: int = 50, guidance: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, batch_size: int = 4096) -> torch.Tensor:
        """Parameter vectors [N, P] for N prompts, on the generator's device, sampled in batches.
        A start-free generator takes ``start_params=None`` (N from ``target_metric``) and ignores a
        given start; an unconditional one ignores ``target_metric`` (it still sets N). ``guidance`` None:
        the scale the generator was trained to use by default (``--model.guidance``, ``self.guidance``)."""
        guidance = self.guidance if guidance is None else guidance
        device = self.device
        if start_params is None:
            if self.uses_start:
                raise ValueError("this generator was trained with start checkpoints: pass start_params [N, P]")
            n = torch.as_tensor(target_metric).reshape(-1).shape[0]
            start_params = torch.zeros(n, self.tokenizer.num_params)
            start_metric = 0.0 if start_metric is None else start_metric
        start_params = torch.as_tensor(start_params, dtype=torch.float32)
        n = start_params.shape[0]
        start_metric = torch.as_tensor(start_metric, dtype=torch.float32).reshape(-1).expand(n)
        target_metric = torch.as_tensor(target_metric, dtype=torch.float32).reshape(-1).expand(n)
        out = []
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            out.append(sample(self.model, self.tokenizer, start_params[sl].to(device),
                              start_metric[sl].to(device), target_metric[sl].to(device),
                              sampler=sampler, steps=steps, guidance=guidance, generator=generator,
                              diffusion=self.diffusion, autoencoder=self.autoencoder))
        return torch.cat(out)


def save_state_dict(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Write a state_dict as safetensors (contiguous CPU tensors; metadata values as strings)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state_dict (never a pickle)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: start parameters must be a .safetensors state_dict (pickles are not "
                         "loaded); save one with safetensors.torch.save_file(model.state_dict(), path)")
    return load_file(str(path))


# ------------------------------------------------------------------------------------ gpt-params prompt
def _prepare_out(out: Path, overwrite: bool, marker: str = "results.json") -> None:
    """Refuse an --out that is a file, already holds results (unless overwrite) or is not writable."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file; give a directory")
    if out.is_dir() and ((out / marker).exists() or any(out.glob("*.safetensors"))) and not overwrite:
        raise SystemExit(f"--out {out} already holds results; pass --overwrite to replace them "
                         "or choose another directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"--out {out} is not writable ({err.strerror}); choose a directory you can write")


def _prepare_report_dir(out: Path, overwrite: bool) -> None:
    _prepare_out(out, overwrite, marker="report.json")


def run_prompt(args) -> int:
    """The `gpt-params prompt` program (arguments: see gpt_params.cli._prompt_parser)."""
    from checkpoints_dataset.params import state_dict_to_vector
    from checkpoints_dataset.store import write_json_atomic

    if args.num < 1:
        raise SystemExit(f"--num must be at least 1 (got {args.num})")
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1 (got {args.steps})")
    if args.guidance is not None and args.guidance < 0:
        raise SystemExit(f"--guidance must be >= 0 (1.0: off; got {args.guidance})")
    gen = Generator.load(args.ckpt, device=args.device)
    guidance = gen.guidance if args.guidance is None else args.guidance  # used, and recorded in results.json
    task = gen.make_task(args.task, data_dir=getattr(args, "data_dir", None),
                         evaluator=getattr(args, "evaluator", None))
    start_arg, target_values = _check_mode_arguments(gen, args)
    out = Path(args.out)
    _prepare_out(out, args.overwrite)
    bounds = task.metric_bounds.get(gen.metric) if task is not None else None
    if gen.conditional:
        for w in gen.check_target(target_values, bounds):
            print(f"warning: {w}", file=sys.stderr)

    g = torch.Generator().manual_seed(args.seed)
    n = len(target_values) * args.num
    if start_arg == "none":
        start = None
    elif start_arg == "random":
        if task is None:
            raise SystemExit("--start random needs the task's model: give --task pkg.module:Class, "
                             "or --start PATH to a .safetensors state_dict")
        start = task.init_params(n, generator=g)                                   # [n, P]
    else:
        vec = state_dict_to_vector(load_state_dict(start_arg), gen.layer_shapes)   # [P]
        start = vec.float().unsqueeze(0).expand(n, -1).clone()                     # [n, P]
    if start is None:
        start_metric = None
    elif task is not None:
        start_metric = task.evaluate(start)[gen.metric]
    else:
        start_metric = torch.full((n,), gen.init_metric)
        print(f"note: no task to evaluate the start; its {gen.metric} is taken as the data's median "
              f"at init ({gen.init_metric:.4g})", file=sys.stderr)
    targets = torch.tensor([0.0 if t is None else t for t in target_values]).repeat_interleave(args.num)  # [n]
    params = gen.generate(start, start_metric, targets, sampler=args.sampler, steps=args.steps,
                          guidance=guidance, generator=g).cpu()                     # [n, P]
    achieved = {k: v.cpu() for k, v in task.evaluate(params).items()} if task is not None else None
    if achieved is None:
        print("note: no task given, so the generated networks are not evaluated "
              "(pass --task pkg.module:Class to evaluate them)", file=sys.stderr)

    records = []
    for i in range(n):
        target = target_values[i // args.num]
        name = (f"target{i // args.num:02d}_{i % args.num:03d}.safetensors" if target is not None
                else f"sample_{i:03d}.safetensors")
        if task is not None:
            sd = task.to_state_dict(params[i])
        else:
            from checkpoints_dataset.params import vector_to_tensors
            sd = {k: v[0] for k, v in vector_to_tensors(params[i:i + 1], gen.layer_shapes).items()}
        save_state_dict(out / name, sd, {"target": target, "metric": gen.metric})
        rec = {"target": None if target is None else float(target), "file": name}
        if achieved is not None:
            rec["achieved"] = {k: float(v[i]) for k, v in achieved.items()}
        records.append(rec)
    write_json_atomic(out / "results.json", {"metric": gen.metric, "guidance": guidance, "records": records})
    _print_table(gen.metric, records, args.num)
    print(f"\n{n} networks written to {out} (results.json lists them)")
    return 0


def _check_mode_arguments(gen: Generator, args) -> tuple[str, list[Optional[float]]]:
    """--start and --target against the generator's mode -> (start: "none" | "random" | PATH, targets).

    Start-free generators take no start (``--start`` defaults to none for them, a given one is refused);
    generators with a start default to random inits and refuse ``--start none``. Conditional generators
    need ``--target``; unconditional ones ignore it with a note (each value then only names a group of
    ``--num`` networks; without any, ``--num`` networks are made with target None)."""
    start = args.start
    if not gen.uses_start:
        if start not in (None, "none"):
            raise SystemExit(f"this generator is start-free (trained with --model.start none): it takes no start "
                             f"checkpoint; drop --start {start} (or pass --start none)")
        start = "none"
    elif start == "none":
        raise SystemExit("this generator was trained with start checkpoints (--model.start checkpoint): give "
                         "--start random (fresh inits, the default) or --start PATH to a .safetensors state_dict")
    else:
        start = start or "random"
    targets = list(args.target or [])
    if gen.conditional and not targets:
        raise SystemExit(f"--target is required: this generator is conditioned on {gen.metric} "
                         "(e.g. --target 0.05; repeat for several)")
    if not gen.conditional:
        if targets:
            print(f"note: this generator is unconditional (trained with --model.condition none): --target "
                  f"{' '.join(map(str, targets))} is ignored; each value only names a group of --num networks",
                  file=sys.stderr)
        else:
            targets = [None]
    return start, targets


def _print_table(metric: str, records: list[dict], num: int) -> None:
    if "achieved" not in records[0]:
        return
    names = [metric] + [k for k in records[0]["achieved"] if k != metric and ("val" in k or "test" in k)]
    print(f"\n{'target':>10} | " + " | ".join(f"{k:>18}" for k in names))
    print("-" * (13 + 21 * len(names)))
    for i in range(0, len(records), num):
        group = records[i:i + num]
        cells = []
        for k in names:
            vals = torch.tensor([r["achieved"][k] for r in group])
            cells.append(f"{vals.mean():>9.4f} ± {vals.std(unbiased=False):<6.4f}")
        label = "-" if group[0]["target"] is None else f"{group[0]['target']:.4f}"
        print(f"{label:>10} | " + " | ".join(cells))
