"""The generator core: tokenizer, DiT denoiser, diffusion, autoencoder and the Generator that joins them.

Imports torch, timm, einops and diffusers, never Lightning: loading a generator to prompt or evaluate
works without the training stack.
"""
from gpt_params.core.autoencoder import ParameterAutoencoder, reconstruct, reconstruction_quality
from gpt_params.core.conditions import Conditions
from gpt_params.core.config import AutoencoderOptions, DiTOptions, GeneratorConfig
from gpt_params.core.diffusion import Diffusion, sample
from gpt_params.core.dit import PRESETS, ParameterDiT
from gpt_params.core.generator import Generator, load_state_dict, save_state_dict
from gpt_params.core.tokenizer import ParameterTokenizer

__all__ = ["AutoencoderOptions", "Conditions", "DiTOptions", "Diffusion", "Generator", "GeneratorConfig", "PRESETS",
           "ParameterAutoencoder", "ParameterDiT", "ParameterTokenizer", "load_state_dict", "reconstruct",
           "reconstruction_quality", "sample", "save_state_dict"]
