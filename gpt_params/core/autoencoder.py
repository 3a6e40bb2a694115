"""ParameterAutoencoder: p-diff's parameter autoencoder over the tokenizer's per-layer tokens.

p-diff ("Neural Network Diffusion", Wang et al. 2024) compresses parameters with an autoencoder and runs
diffusion in its latent space. Ours works on the same normalized tokens ``[N, T, C]`` as the DiT and is
built from the DiT's own blocks:

- Encoder: per-token projection ``TokenLinear(ids, C, D)`` (shared by a layer id, so the encoder is
  equivariant to permutations of hidden units like the DiT), ``depth`` ``DiTBlock``s whose adaLN
  conditioning vector is a learned constant, and ``TokenLinear(ids, D, d)``.
- Latent: ``[N, T, d]`` (one latent token per parameter token, ``d = latent_dim``), standardized per
  latent channel by a ``BatchNorm1d`` without affine (batch statistics in training, running statistics
  in eval mode: ``encode`` is deterministic in eval mode, which sampling and the frozen phase use). The
  fixed scale makes p-diff's latent noise (sigma 0.1) meaningful (the encoder cannot grow its latent to
  drown the noise) and hands the diffusion unit-scale inputs. Unlike a per-token LayerNorm it keeps
  each token's magnitude (a neuron's weight norm), which a per-token normalization would erase.
- Decoder: ``TokenLinear(ids, d, D)``, ``depth`` blocks with their own learned constant, and
  ``TokenLinear(ids, D, C)``; padding slots (``token_mask``) are zero. The blocks start as identities
  (adaLN-Zero), so the untrained autoencoder is a linear one and the blocks learn corrections; no
  LayerNorm sits on the linear path, which would also erase token magnitudes.
- Training: MSE reconstruction with p-diff's noise augmentation: Gaussian noise of ``input_noise``
  (0.001) on the input tokens and ``latent_noise`` (0.1) on the latent, both in normalized units.
  ``encode``/``decode`` never add noise.

``reconstruction_quality`` reports what matters for parameters: the task metrics of reconstructed
networks against those of the originals.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .dit import Activation, DiTBlock, TokenLinear


class ParameterAutoencoder(nn.Module):
    """Tokens ``[N, T, C]`` <-> latent tokens ``[N, T, latent_dim]``.

    Args:
        num_tokens, token_dim: T and C of the tokenizer.
        token_layer_ids: ``[T]`` layer id per token (tokenizer.token_layer_ids); None = one per position.
        latent_dim: d, the width of a latent token.
        hidden_size, depth, num_heads, mlp_ratio: width D and blocks of the encoder (and of the decoder).
        input_noise, latent_noise: standard deviations of p-diff's training noise (normalized units).
        token_mask: ``[T, C]`` bool (tokenizer.mask); reconstructions are zero at padding, the loss
            counts real entries only.
        activation: the blocks' GELU (``ParameterDiT``'s; the generator gives both the same).
    """

    def __init__(self, num_tokens: int, token_dim: int, token_layer_ids: Tensor | None = None,
                 latent_dim: int = 32, hidden_size: int = 128, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 4.0, input_noise: float = 1e-3, latent_noise: float = 0.1,
                 token_mask: Tensor | None = None, activation: Activation = "gelu"):
        super().__init__()
        if latent_dim < 2:
            raise ValueError(f"latent_dim must be >= 2 (latent tokens are normalized over it), got {latent_dim}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if input_noise < 0 or latent_noise < 0:
            raise ValueError(f"noise levels must be >= 0, got input {input_noise}, latent {latent_noise}")
        ids = torch.arange(num_tokens) if token_layer_ids is None else torch.as_tensor(token_layer_ids).long()
        if ids.shape != (num_tokens,):
            raise ValueError(f"token_layer_ids must be [{num_tokens}], got {list(ids.shape)}")
        mask = torch.ones(num_tokens, token_dim, dtype=torch.bool) if token_mask is None else torch.as_tensor(token_mask)
        if mask.shape != (num_tokens, token_dim):
            raise ValueError(f"token_mask must be [{num_tokens}, {token_dim}], got {list(mask.shape)}")
        self.num_tokens, self.token_dim, self.latent_dim = num_tokens, token_dim, latent_dim
        self.input_noise, self.latent_noise = float(input_noise), float(latent_noise)
        self.register_buffer("token_mask", mask.bool(), persistent=False)
        self.enc_in = TokenLinear(ids, token_dim, hidden_size)
        self.enc_cond = nn.Parameter(torch.zeros(hidden_size))  # the constant adaLN conditioning vector
        self.enc_blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, activation) for _ in range(depth)])
        self.enc_out = TokenLinear(ids, hidden_size, latent_dim)
        self.latent_norm = nn.BatchNorm1d(latent_dim, affine=False)
        self.dec_in = TokenLinear(ids, latent_dim, hidden_size)
        self.dec_cond = nn.Parameter(torch.zeros(hidden_size))
        self.dec_blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, activation) for _ in range(depth)])
        self.dec_out = TokenLinear(ids, hidden_size, token_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier linears and token projections; blocks start as identities (adaLN-Zero), small constants."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for lin in (self.enc_in, self.enc_out, self.dec_in, self.dec_out):
            bound = math.sqrt(6.0 / (lin.weight.shape[1] + lin.weight.shape[2]))
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        for block in (*self.enc_blocks, *self.dec_blocks):
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.normal_(self.enc_cond, std=0.02)
        nn.init.normal_(self.dec_cond, std=0.02)

    def _check(self, x: Tensor, width: int, what: str) -> None:
        if x.dim() != 3 or x.shape[1:] != (self.num_tokens, width):
            raise ValueError(f"{what} must be [N, {self.num_tokens}, {width}], got {list(x.shape)}")

    def encode(self, tokens: Tensor) -> Tensor:
        """Normalized parameter tokens ``[N, T, C]`` -> latent ``[N, T, d]`` (standardized channels)."""
        self._check(tokens, self.token_dim, "tokens")
        h = self.enc_in(tokens)  # [N, T, D]
        c = self.enc_cond.to(h.dtype).expand(h.shape[0], -1)  # [N, D]
        for block in self.enc_blocks:
            h = block(h, c)  # [N, T, D]
        z = self.enc_out(h)  # [N, T, d]
        return self.latent_norm(z.reshape(-1, self.latent_dim)).reshape(z.shape)  # [N, T, d]

    def decode(self, latent: Tensor) -> Tensor:
        """Latent ``[N, T, d]`` -> parameter tokens ``[N, T, C]`` (zero at padding)."""
        self._check(latent, self.latent_dim, "latent")
        h = self.dec_in(latent)  # [N, T, D]
        c = self.dec_cond.to(h.dtype).expand(h.shape[0], -1)  # [N, D]
        for block in self.dec_blocks:
            h = block(h, c)  # [N, T, D]
        return self.dec_out(h) * self.token_mask  # [N, T, C]

    def forward(self, tokens: Tensor) -> Tensor:
        """Noise-free round trip ``[N, T, C] -> [N, T, C]`` (deterministic in eval mode)."""
        return self.decode(self.encode(tokens))

    def reconstruction_loss(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """p-diff's training loss: masked MSE of ``decode(encode(tokens + s_in e1) + s_lat e2)`` vs ``tokens``."""
        maskf = self.token_mask.to(tokens.dtype)  # [T, C]
        noise_in = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        z = self.encode(tokens + self.input_noise * noise_in * maskf)  # [N, T, d]
        noise_lat = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        recon = self.decode(z + self.latent_noise * noise_lat)  # [N, T, C]
        return (((recon - tokens) ** 2) * maskf).sum() / (maskf.sum() * tokens.shape[0])


# ------------------------------------------------------------------------------------------ quality
@torch.no_grad()
def reconstruct(autoencoder: ParameterAutoencoder, tokenizer, params: Tensor, chunk: int = 512) -> Tensor:
    """Parameter vectors ``[K, P]`` through tokenizer, encoder, decoder and back -> ``[K, P]`` (CPU, float32)."""
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    try:
        out = [tokenizer.detokenize(autoencoder(tokenizer.tokenize(params[i:i + chunk].float().to(device)))).cpu()
               for i in range(0, params.shape[0], chunk)]  # [k, P] each
    finally:
        autoencoder.train(was_training)
    return torch.cat(out)  # [K, P]


def reconstruction_quality(autoencoder: ParameterAutoencoder, tokenizer, task, params: Tensor,
                           metrics: list[str] | None = None, device=None) -> dict:
    """The task metrics of reconstructed networks vs the originals ``params [K, P]``.

    Returns ``{"metrics": {name: {"original": mean, "reconstructed": mean, "abs_diff_mean": ...,
    "abs_diff_max": ...}}, "relative_l2": mean ||rec - orig|| / ||orig||, "num_networks": K}``
    (``metrics``: names to report, default all of the task's).
    """
    params = torch.as_tensor(params).float().cpu()  # [K, P]
    rec = reconstruct(autoencoder, tokenizer, params)  # [K, P]
    before, after = task.evaluate(params, device=device), task.evaluate(rec, device=device)
    names = list(before) if metrics is None else list(metrics)
    report = {}
    for name in names:
        a = before[name].detach().double().cpu().numpy()
        b = after[name].detach().double().cpu().numpy()
        diff = np.abs(a - b)
        report[name] = {"original": float(a.mean()), "reconstructed": float(b.mean()),
                        "abs_diff_mean": float(diff.mean()), "abs_diff_max": float(diff.max())}
    rel = ((rec - params).norm(dim=1) / params.norm(dim=1).clamp_min(1e-12)).mean()
    return {"metrics": report, "relative_l2": float(rel), "num_networks": int(params.shape[0])}
