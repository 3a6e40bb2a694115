"""gpt-params: generate neural-network parameters with a conditional diffusion transformer.

The core (tokenizer, denoiser, diffusion) imports only torch, timm and diffusers; the Lightning layer
lives in its own modules and is imported from there.
"""

from .diffusion import Diffusion, sample
from .dit import PRESETS, ParameterDiT
from .tokenizer import ParameterTokenizer

__all__ = ["ParameterTokenizer", "ParameterDiT", "PRESETS", "Diffusion", "sample"]
