"""``gpt-params train``: a thin LightningCLI over ``GeneratorModule`` and ``ParameterDataModule``.

Before LightningCLI builds anything, the store is made sure of (built when missing, an interrupted build
finished; under DDP rank 0 builds and the others wait), so the data module only opens it.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.plugins.io import CheckpointIO

from checkpoints_dataset.fileio import savefig_atomic
from checkpoints_dataset.info import DataInfo
from gpt_params.cli.common import UsageError
from gpt_params.core.config import LEGACY_NAMES, DiTOptions, GeneratorConfig
from gpt_params.core.generator import CHECKPOINT_KEY
from gpt_params.evaluation import prompt_alignment
from gpt_params.training import AtomicCheckpointIO, GeneratorModule, LogProgressBar, ParameterDataModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"   # a link to the repository's configs/, a folder in wheels
DEFAULT_CONFIG = CONFIG_DIR / "digits_mlp.yaml"


class LastOnException(Callback):
    """On an exception (Ctrl-C included) save ``last.ckpt`` next to the run's other checkpoints, so that every
    run, however it stops, leaves a last.ckpt to resume from. (Not Lightning's OnExceptionCheckpoint: with one
    in the trainer, ``fit(ckpt_path=None)`` resumes from whatever ``last.ckpt`` it finds, and its teardown
    deletes the file at its path, ./last.ckpt before any exception.)"""

    def on_exception(self, trainer, pl_module, exception) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath:
            trainer.save_checkpoint(os.path.join(checkpoint.dirpath, "last.ckpt"))


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def with_atomic_checkpoints(plugins) -> list:
    """The trainer's plugins with ``AtomicCheckpointIO`` as the checkpoint writer: added when none of them is a
    CheckpointIO, set as the base of a wrapper without one (``AsyncCheckpointIO()``); a user's own writer
    stays as given."""
    plugins = _as_list(plugins)
    ios = [p for p in plugins if isinstance(p, CheckpointIO)]
    if not ios:
        return [*plugins, AtomicCheckpointIO()]
    for io in ios:
        while getattr(io, "checkpoint_io", None) is not None:   # a wrapper: down to its base writer
            io = io.checkpoint_io
        if hasattr(io, "checkpoint_io"):   # a wrapper without a base writer: ours
            io.checkpoint_io = AtomicCheckpointIO()
    return plugins


class GeneratorCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs):
        """The trainer with our defaults that depend on the user's choices: the atomic checkpoint writer (unless
        ``--trainer.plugins`` brings a CheckpointIO) and LogProgressBar (unless the progress bar is disabled or
        ``--trainer.callbacks`` brings one). Added here, not to the parsed config, so config.yaml stays as given."""
        config = {**(self.config_init.get("trainer") or {}), **kwargs}
        kwargs["plugins"] = with_atomic_checkpoints(config.get("plugins"))
        callbacks = _as_list(config.get("callbacks"))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, LogProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Make sure the store exists; bf16 autocast on GPUs that support it, unless --trainer.precision says
        otherwise."""
        ParameterDataModule.prepare_store(**self.config.data.as_dict())
        trainer = self.config.trainer
        if (trainer.precision is None and str(trainer.accelerator) in ("auto", "gpu", "cuda")
                and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            trainer.precision = "bf16-mixed"

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.data_info", compute_fn=lambda data: data.info.to_json(),
                              apply_on="instantiate")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="resume training from this checkpoint (e.g. a run's last.ckpt)")
        parser.add_argument("--final_eval_runs", type=int, default=32,
                            help="held-out runs for the prompt alignment printed at the end (0: skip)")


def _renamed(name: str) -> str:
    group, field = LEGACY_NAMES[name]
    return f"--model.{group}.{field}"


def check_old_option_names(argv: list[str]) -> None:
    """Refuse the flat --model.* names of before the option groups, naming the new one (on the command line
    and in --config files)."""
    for arg in argv:
        name = arg.partition("=")[0]
        if name.startswith("--model.") and name[len("--model."):] in LEGACY_NAMES:
            raise UsageError(f"{name} is now {_renamed(name[len('--model.'):])}; rename it")
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2] \
            if arg.startswith("--config=") else None
        if path and Path(path).is_file():
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as err:
                raise UsageError(f"--config {path} is not valid YAML ({err}); fix the file") from None
            model = loaded.get("model") if isinstance(loaded, dict) else None
            old = [k for k in model if k in LEGACY_NAMES] if isinstance(model, dict) else []
            if old:
                raise UsageError(f"{path}: model options {old} moved into groups; rename them to "
                                 f"{[_renamed(k)[2:] for k in old]} (nested under model:)")


def check_resume(ckpt_path: Path, info: DataInfo, dit: Optional[DiTOptions] = None) -> None:
    """Refuse, before anything is written, a --ckpt_path that is missing, trained on another architecture, or
    written with other denoiser options than ``dit`` (today's defaults differ from older checkpoints')."""
    if not ckpt_path.is_file():
        raise UsageError(f"--ckpt_path {ckpt_path} is not a file; give the last.ckpt of a run to resume")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:   # not a torch zip file, or pickled classes of another program
        raise UsageError(f"--ckpt_path {ckpt_path} is not a checkpoint written by gpt-params train "
                         f"({type(err).__name__}); give the last.ckpt of a run to resume") from None
    saved = ((ckpt.get("hyper_parameters") or {}).get("data_info") or {}) if isinstance(ckpt, dict) else {}
    if saved.get("layer_shapes") is not None and not info.layer_shapes.same_layout(saved["layer_shapes"]):
        raise UsageError(f"--ckpt_path {ckpt_path} was trained on networks of another architecture than the store "
                         f"at {info.store_root} holds; resume with the --data.root it was trained on "
                         f"({saved.get('store_root')})")
    written = _saved_dit(ckpt)
    if dit is not None and written is not None and written != dit:
        flags = " ".join(f"--model.dit.{k} {v}" for k, v in dataclasses.asdict(written).items()
                         if getattr(dit, k) != v and v is not None)
        raise UsageError(f"--ckpt_path {ckpt_path} was written with other denoiser options than this command's; "
                         f"resume with the ones it was trained with: {flags}")


def _saved_dit(ckpt) -> Optional[DiTOptions]:
    """The denoiser options a checkpoint was written with (older ones read with their defaults), if any."""
    try:
        if isinstance(ckpt, dict) and isinstance(ckpt.get(CHECKPOINT_KEY), dict) and "generator" in ckpt[CHECKPOINT_KEY]:
            return GeneratorConfig.from_json(ckpt[CHECKPOINT_KEY]["generator"]).dit
        hparams = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
        return GeneratorConfig.from_legacy_hparams(hparams).dit if "data_info" in hparams else None
    except (ValueError, TypeError, KeyError):
        return None


def main(argv: list[str]) -> int:
    """Train a generator; prints the checkpoint, the TensorBoard command and the prompt alignment."""
    check_old_option_names(argv)
    parser_kwargs = {"default_config_files": [str(DEFAULT_CONFIG)]} if DEFAULT_CONFIG.exists() else {}
    parser_kwargs["description"] = "Train a gpt-params generator (LightningCLI; see configs/)."
    parser_kwargs["exit_on_error"] = False   # a bad option is one line (the dispatcher), not the whole usage
    with warnings.catch_warnings():   # our argv comes from the dispatcher, not LightningCLI's sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = GeneratorCLI(
            GeneratorModule, ParameterDataModule, run=False, args=argv,
            parser_kwargs=parser_kwargs, save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [ModelCheckpoint(save_last=True), LastOnException()]},
        )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if cli.config.get("ckpt_path"):
        check_resume(Path(cli.config.get("ckpt_path")), data.info, model.generator.config.dit)
    trainer.fit(model, datamodule=data, ckpt_path=cli.config.get("ckpt_path"), weights_only=True)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)   # a collective call: every rank makes it
    last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
    if not last.exists():   # a stop between checkpoint events: save the state it ended in (every rank: a barrier)
        trainer.save_checkpoint(last)
    # Lightning leaves the process group up; a gloo group torn down by interpreter exit can abort a rank
    # ("terminate called without an active exception") after all its work is done
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return 0
    print(f"\nCheckpoint: {last}")
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    n_runs = cli.config.get("final_eval_runs", 32)
    if n_runs > 0 and data.task is not None:
        gen = model.generator
        t0 = time.perf_counter()
        result, fig = prompt_alignment(gen, data.task, data.store, runs=data.store.test_runs[:n_runs])
        savefig_atomic(fig, log_dir / "alignment.png", dpi=100)
        print(f"Prompt alignment on {len(result['per_network'])} held-out runs ({gen.metric}): "
              f"R^2 median {result['median']:.3f}, mean {result['mean']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)")
    return 0
