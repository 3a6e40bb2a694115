"""AlignmentMonitor in a real fit, and ParameterPrompter in another project's Lightning training."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from checkpoints_dataset import get_task, state_dict_to_vector
from gpt_params import AlignmentMonitor, GeneratorModule, ParameterDataModule, ParameterPrompter
from gpt_params.core.config import DiTOptions

TINY_DIT = DiTOptions(depth=1, hidden_size=32, num_heads=2)


class DigitsClassifier(pl.LightningModule):
    """Another project's module holding its network as ``net`` (state_dict keys ``net.0.weight``, ...)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module, callbacks, tmp_path):
    x, y = get_task("digits_mlp").split("train")
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    return trainer


class _Snapshot(pl.Callback):
    """The network's parameters at fit start, after the callbacks before it (the prompter) have run."""

    def __init__(self, layer_shapes):
        self.layer_shapes, self.params = layer_shapes, None

    def on_fit_start(self, trainer, pl_module):
        self.params = state_dict_to_vector(pl_module.net.state_dict(), self.layer_shapes).clone()


def test_prompter_replaces_parameters_and_logs_before_after(tiny_generator_ckpt, tmp_path):
    from gpt_params import Generator

    task = get_task("digits_mlp")
    module = DigitsClassifier(task.build_model())
    before = state_dict_to_vector(module.net.state_dict(), task.layer_shapes).clone()
    prompter = ParameterPrompter(str(tiny_generator_ckpt), target=0.3, steps=2)
    snapshot = _Snapshot(task.layer_shapes)
    _fit(module, [prompter, snapshot], tmp_path)
    (record,) = prompter.history
    before_error = task.evaluate(before[None])["val_error"]                     # [1]
    assert record["before"] == pytest.approx(before_error.item())
    # the loaded parameters are one generation from the model's own (seed 0, the generator's own sampler,
    # 2 steps), and "after" is their metric
    gen = Generator.load(tiny_generator_ckpt)
    want = gen.generate(before[None], before_error, torch.tensor([0.3]), sampler=gen.sampler, steps=2,
                        generator=torch.Generator().manual_seed(0))[0]
    assert torch.allclose(snapshot.params, want, atol=1e-6) and not torch.allclose(before, want)
    assert record["after"] == pytest.approx(task.evaluate(want[None])["val_error"].item())


def test_prompter_refuses_another_architecture(tiny_generator_ckpt, tmp_path):
    other = DigitsClassifier(torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)))
    with pytest.raises(ValueError, match="differ from the generator"):
        _fit(other, [ParameterPrompter(str(tiny_generator_ckpt), target=0.3)], tmp_path)


def test_alignment_monitor_logs_scalar_and_figure(tiny_digits_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = ParameterDataModule(root=str(tiny_digits_store), batch_size=16)
    model = GeneratorModule(data_info=data.info, dit=TINY_DIT)
    with pytest.raises(ValueError, match="--model.guidance must be a finite number >= 0"):
        GeneratorModule(data_info=data.info, dit=TINY_DIT, guidance=-1.0)
    with pytest.raises(ValueError, match="--model.sampler_steps must be a whole number >= 1"):
        GeneratorModule(data_info=data.info, dit=TINY_DIT, sampler_steps=0)
    with pytest.raises(ValueError, match="--model.sampler must be one of"):
        GeneratorModule(data_info=data.info, dit=TINY_DIT, sampler="euler")
    logger = pl.loggers.TensorBoardLogger(tmp_path)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AlignmentMonitor(every_n_epochs=1, runs=2, num_prompts=3, steps=2)])
    trainer.fit(model, datamodule=data)
    assert "val/alignment" in trainer.callback_metrics
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "alignment/prompted_vs_achieved" in events.Tags()["images"]
    assert "denoise/strip" in events.Tags()["images"]       # the denoising strip, as `gpt-params denoise` draws it
    assert "val/alignment" in events.Tags()["scalars"]


def test_generator_ema_keeps_integer_buffers_and_plain_ema_is_refused(tiny_digits_store, tmp_path):
    from pytorch_lightning.callbacks import EMAWeightAveraging

    from gpt_params.training.callbacks import GeneratorEMA

    data = ParameterDataModule(root=str(tiny_digits_store), batch_size=16)

    def fit(ema):
        model = GeneratorModule(data_info=data.info, dit=TINY_DIT)
        ints = {n: b.clone() for n, b in model.named_buffers() if not b.is_floating_point()}
        trainer = pl.Trainer(max_steps=30, limit_val_batches=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[ema],
                             default_root_dir=tmp_path)
        trainer.fit(model, datamodule=data)
        return model, ints

    # decay 0.95 from the first step: the plain EMA turns token id 13 into 12 within a few updates
    model, ints = fit(GeneratorEMA(decay=0.95, start_fraction=0.0))
    assert ints and all(torch.equal(dict(model.named_buffers())[n], b) for n, b in ints.items())
    with pytest.raises(ValueError, match="GeneratorEMA"):
        fit(EMAWeightAveraging(decay=0.95))
