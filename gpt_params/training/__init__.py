"""The Lightning layer: the module that trains a generator, the data module, the callbacks, the atomic checkpoint
writer and the progress bar for logs."""
from gpt_params.training.callbacks import AlignmentMonitor, GeneratorEMA, ParameterPrompter
from gpt_params.training.checkpoint_io import AtomicCheckpointIO
from gpt_params.training.data import ParameterDataModule
from gpt_params.training.module import GeneratorModule
from gpt_params.training.progress import LogProgressBar

__all__ = ["AlignmentMonitor", "AtomicCheckpointIO", "GeneratorEMA", "GeneratorModule", "LogProgressBar",
           "ParameterDataModule", "ParameterPrompter"]
