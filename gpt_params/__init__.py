"""gpt-params: generate neural-network parameters with a conditional diffusion transformer.

Layers, bottom up: ``gpt_params.core`` (tokenizer, DiT, diffusion, autoencoder, Generator; no Lightning),
``gpt_params.evaluation`` (needs only the core), ``gpt_params.training`` (Lightning) and ``gpt_params.cli``.
The core is imported here; evaluation and the Lightning classes on first use, so ``import gpt_params``
never imports Lightning.
"""
import importlib

from gpt_params.core import (PRESETS, Diffusion, Generator, GeneratorConfig, ParameterAutoencoder, ParameterDiT,
                             ParameterTokenizer, load_state_dict, sample, save_state_dict)

_LAZY = {   # name -> module; imported on first access (Lightning or matplotlib behind them)
    "GeneratorModule": "gpt_params.training",
    "ParameterDataModule": "gpt_params.training",
    "GeneratorEMA": "gpt_params.training",
    "AlignmentMonitor": "gpt_params.training",
    "ParameterPrompter": "gpt_params.training",
    "evaluate_all": "gpt_params.evaluation",
    "prompt_alignment": "gpt_params.evaluation",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRESETS", "Diffusion", "Generator", "GeneratorConfig", "ParameterAutoencoder", "ParameterDiT", "ParameterTokenizer",
           "load_state_dict", "sample", "save_state_dict", "GeneratorModule", "ParameterDataModule", "GeneratorEMA",
           "AlignmentMonitor", "ParameterPrompter", "evaluate_all", "prompt_alignment"]
