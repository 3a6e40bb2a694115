"""Benchmark: the tokenizer and DiT handle a target network of millions of parameters.

The target is part of a timm model built with ``pretrained=False`` (no download): ``resnet18.layer3``
(2.1M parameters, BatchNorm statistics included), ``resnet18.layer4`` (8.4M) or ``vit_small.last_block``
(1.8M). Two fresh inits of it are tokenized (``ParameterTokenizer``, per-layer normalization from their
statistics); a small ``ParameterDiT`` does one training step (``Diffusion.training_loss`` + AdamW, batch 2)
and one DDIM sample of 2 steps (batch 2, ``gpt_params.sample``); the sampled vectors are loaded back into
the target with ``load_state_dict(strict=True)``. It prints parameters, tokens, the DiT's size, the
seconds of each stage and the peak memory (CUDA: max allocated; CPU: the process's VmHWM).

    python bench/large_target.py                               # CPU: resnet18.layer3, a 2-block DiT
    python bench/large_target.py --device cuda --size S       # resnet18.layer4: --target resnet18.layer4

Memory: ``TokenLinear`` (gpt_params/core/dit.py) gathers its weight per token, ``weight[ids]`` = ``[T, 2C, D]``
floats, i.e. about 2 * P * D values for a P-parameter target (4.3 GB at P = 2.1M, D = 256, fp32), plus as
much again for its gradient; that, not attention, dominates the peak memory printed here.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch

from checkpoints_dataset.params import float_layer_shapes
from gpt_params.core.diffusion import Diffusion, sample
from gpt_params.core.dit import ParameterDiT
from gpt_params.core.tokenizer import ParameterTokenizer

TARGETS = {
    "resnet18.layer3": lambda: timm.create_model("resnet18", pretrained=False).layer3,
    "resnet18.layer4": lambda: timm.create_model("resnet18", pretrained=False).layer4,
    "vit_small.last_block": lambda: timm.create_model("vit_small_patch16_224", pretrained=False).blocks[-1],
}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since start; CPU: this process's peak resident memory (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--target", choices=list(TARGETS), default=None,
                   help="target network (default resnet18.layer3)")
    p.add_argument("--layout", choices=["neuron", "chunk"], default="neuron")
    p.add_argument("--chunk-size", type=int, default=1024, help="the most values in one token")
    p.add_argument("--size", choices=["XS", "S", "B", "L"], default=None,
                   help="DiT preset (default CPU: XS with 2 blocks, CUDA: S)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    target_name = args.target or "resnet18.layer3"
    size = args.size or ("S" if cuda else "XS")
    overrides = {} if args.size or cuda else {"depth": 2}
    if args.threads:
        torch.set_num_threads(args.threads)

    nets = []
    for seed in (0, 1):  # two fresh inits of the target
        torch.manual_seed(seed)
        nets.append(TARGETS[target_name]())
    layer_shapes = float_layer_shapes(nets[0])
    t0 = time.perf_counter()
    plain = ParameterTokenizer(layer_shapes, layout=args.layout, chunk_size=args.chunk_size)
    params = plain.from_state_dicts([n.state_dict() for n in nets]).to(device)  # [2, P]
    stats, offset = {}, 0
    for name, shape in layer_shapes.items():  # per-layer normalization from the two inits
        n = int(torch.tensor(shape).prod())
        values = params[:, offset:offset + n]
        stats[name] = (float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0)
        offset += n
    tok = ParameterTokenizer(layer_shapes, layout=args.layout, chunk_size=args.chunk_size, stats=stats)
    tokens = tok.tokenize(params)  # [2, T, C]
    assert torch.allclose(tok.detokenize(tokens), params, atol=1e-5), "tokenize/detokenize is not exact"
    t_tok = time.perf_counter() - t0

    model = ParameterDiT.from_preset(size, tok.num_tokens, tok.token_dim, token_layer_ids=tok.token_layer_ids,
                                     token_mask=tok.mask, **overrides).to(device)
    diffusion = Diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    metric = torch.tensor([0.9, 0.1], device=device)  # [2] any metric values in the model's range
    t0 = time.perf_counter()
    loss = diffusion.training_loss(model, tokens.flip(0), tokens, metric, metric.flip(0), mask=tok.mask.to(device))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = sample(model, tok, params, metric, metric.flip(0), sampler="ddim", steps=2,
                 generator=torch.Generator(device).manual_seed(0))  # [2, P]
    if cuda:
        torch.cuda.synchronize(device)
    t_sample = time.perf_counter() - t0
    for sd in tok.to_state_dicts(out.cpu()):  # the generated vectors load into the target as they are
        nets[0].load_state_dict(sd, strict=True)
    if not (torch.isfinite(out).all() and torch.isfinite(loss)):
        raise RuntimeError("non-finite loss or samples")

    n_dit = sum(p.numel() for p in model.parameters())
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"target {target_name}: {tok.num_params:,} parameters -> {tok.num_tokens:,} tokens x {tok.token_dim} "
          f"({args.layout} layout, {tok.num_layer_ids} layer ids); tokenize {t_tok:.2f} s")
    print(f"DiT {size}{' ' + str(overrides) if overrides else ''}: {n_dit / 1e6:.1f}M params; "
          f"one training step (batch 2) {t_train:.2f} s, loss {loss.item():.3f}; DDIM-2 sample (batch 2) "
          f"{t_sample:.2f} s; samples load into the target (strict)")
    print(f"peak memory ({'CUDA max allocated' if cuda else 'VmHWM'}): {peak_memory_mb(device):,.0f} MB")


if __name__ == "__main__":
    main()
