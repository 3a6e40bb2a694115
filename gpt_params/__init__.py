"""gpt-params: generate neural-network parameters with a conditional diffusion transformer.

The core (tokenizer, denoiser, diffusion) imports only torch, timm and diffusers. The Lightning layer
(module, data module, callbacks, prompting, evaluation) is exported here too but imported on first use,
so ``import gpt_params`` stays light.
"""
from .diffusion import Diffusion, sample
from .dit import PRESETS, ParameterDiT
from .tokenizer import ParameterTokenizer

_LAZY = {
    "GeneratorModule": ".module",
    "ParameterDataModule": ".data",
    "AlignmentMonitor": ".callbacks",
    "ParameterPrompter": ".callbacks",
    "Generator": ".prompting",
    "evaluate_all": ".evaluate",
    "prompt_alignment": ".evaluate",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ParameterTokenizer", "ParameterDiT", "PRESETS", "Diffusion", "sample", *_LAZY]
