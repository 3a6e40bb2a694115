"""The Lightning layer: the module that trains a generator, the data module and the callbacks."""
from gpt_params.training.callbacks import AlignmentMonitor, GeneratorEMA, ParameterPrompter
from gpt_params.training.data import ParameterDataModule
from gpt_params.training.module import GeneratorModule

__all__ = ["AlignmentMonitor", "GeneratorEMA", "GeneratorModule", "ParameterDataModule", "ParameterPrompter"]
