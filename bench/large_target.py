"""Benchmark: the tokenizer and DiT handle a target network of millions of parameters.

The target is part of a timm model built with ``pretrained=False`` (no download): ``resnet18.layer3``
(2.1M parameters, BatchNorm statistics included), ``resnet18.layer4`` (8.4M) or ``vit_small.last_block``
(1.8M). Two fresh inits of it are tokenized (``ParameterTokenizer``, per-layer normalization from their
statistics); a small ``ParameterDiT`` does training steps (``Diffusion.training_loss`` + AdamW, batch 2)
and DDIM samples of 2 steps (batch 2, ``gpt_params.sample``); the sampled vectors are loaded back into the
target with ``load_state_dict(strict=True)``.

Two projections are measured side by side, each in its own process (so that each has its own peak memory):
``grouped``, the DiT's ``TokenLinear`` (one matmul per layer id over its tokens), and ``gather``, the
reference it replaced, kept here only: the weight gathered per token, ``weight[ids]`` = ``[T, I, O]`` floats,
about 2 * P * D values for a P-parameter target and as much again for its gradient. Each process runs
``--rounds`` training steps and samples; the table gives their medians (``statistics.median``), the peak
memory beyond ``import torch`` (CUDA: max allocated; CPU: VmHWM minus the resident size after the
import) and the gather / grouped ratios.

    python bench/large_target.py --threads 1                   # CPU: resnet18.layer3, a 2-block DiT, both
    python bench/large_target.py --device cuda --size S --target resnet18.layer4 --projection grouped
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import timm
import torch

from checkpoints_dataset.params import float_layer_shapes
from gpt_params.core.diffusion import Diffusion, sample
from gpt_params.core.dit import ParameterDiT, TokenLinear
from gpt_params.core.tokenizer import ParameterTokenizer

TARGETS = {
    "resnet18.layer3": lambda: timm.create_model("resnet18", pretrained=False).layer3,
    "resnet18.layer4": lambda: timm.create_model("resnet18", pretrained=False).layer4,
    "vit_small.last_block": lambda: timm.create_model("vit_small_patch16_224", pretrained=False).blocks[-1],
}


def status_mb(field: str) -> float:
    """A memory field of this process's /proc status in MB ("VmRSS": resident now, "VmHWM": its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since start; CPU: this process's peak resident memory (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")


def gather_forward(self: TokenLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference projection: every token's weight gathered into one ``[T, I, O]`` copy."""
    return torch.einsum("nti,tio->nto", x, self.weight[self.ids]) + self.bias[self.ids]  # [N, T, O]


def use_gather(model: torch.nn.Module) -> int:
    """Switch every ``TokenLinear`` of ``model`` to the gathered-weight reference; how many were switched."""
    layers = [m for m in model.modules() if isinstance(m, TokenLinear)]
    for m in layers:
        m.forward = types.MethodType(gather_forward, m)
    return len(layers)


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
    p.add_argument("--projection", choices=["both", "grouped", "gather"], default="both",
                   help="both (default): one process per projection, then the ratios; or one of them here")
    p.add_argument("--rounds", type=int, default=3, help="training steps and samples per projection (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON line of the figures (for --projection X)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.projection == "both":
        compare(argv if argv is not None else sys.argv[1:])
        return
    baseline = status_mb("VmRSS")   # after import torch (and timm): what the measured work adds goes on top
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
    if args.projection == "gather":
        use_gather(model)
    diffusion = Diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    metric = torch.tensor([0.9, 0.1], device=device)  # [2] any metric values in the model's range
    t_train, t_sample = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        loss = diffusion.training_loss(model, tokens.flip(0), tokens, metric, metric.flip(0),
                                       mask=tok.mask.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        t_train.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with torch.no_grad():
            out = sample(model, tok, params, metric, metric.flip(0), sampler="ddim", steps=2,
                         generator=torch.Generator(device).manual_seed(0))  # [2, P]
        if cuda:
            torch.cuda.synchronize(device)
        t_sample.append(time.perf_counter() - t0)
    for sd in tok.to_state_dicts(out.cpu()):  # the generated vectors load into the target as they are
        nets[0].load_state_dict(sd, strict=True)
    if not (torch.isfinite(out).all() and torch.isfinite(loss)):
        raise RuntimeError("non-finite loss or samples")

    peak = peak_memory_mb(device) - (0.0 if cuda else baseline)
    n_dit = sum(p.numel() for p in model.parameters())
    figures = dict(projection=args.projection, train_s=t_train, sample_s=t_sample, peak_mb=peak,
                   import_mb=baseline, params=tok.num_params, tokens=tok.num_tokens, token_dim=tok.token_dim,
                   layer_ids=tok.num_layer_ids, dit_params=n_dit, tokenize_s=t_tok, threads=torch.get_num_threads(),
                   device=str(device), dit=f"{size}{' ' + str(overrides) if overrides else ''}", target=target_name)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"target {target_name}: {tok.num_params:,} parameters -> {tok.num_tokens:,} tokens x {tok.token_dim} "
          f"({args.layout} layout, {tok.num_layer_ids} layer ids); tokenize {t_tok:.2f} s")
    print(f"DiT {figures['dit']}: {n_dit / 1e6:.1f}M params, {args.projection} projection; median of "
          f"{args.rounds}: training step (batch 2) {statistics.median(t_train):.2f} s, DDIM-2 sample (batch 2) "
          f"{statistics.median(t_sample):.2f} s; samples load into the target (strict)")
    print(f"peak memory beyond import torch ({'CUDA max allocated' if cuda else 'VmHWM - VmRSS after import'}): "
          f"{peak:,.0f} MB")


def compare(argv: list[str]) -> None:
    """Both projections, each in a fresh process (its own peak memory), then one table with the ratios."""
    argv = [a for a in argv if a != "--json"]
    rows = {}
    for projection in ("grouped", "gather"):
        cmd = [sys.executable, __file__, *argv, "--projection", projection, "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{projection} failed:\n{done.stderr[-3000:]}")
        rows[projection] = json.loads(done.stdout.strip().splitlines()[-1])
    g = rows["grouped"]
    print(f"device {g['device']}, torch {torch.__version__}, threads {g['threads']}; target {g['target']}: "
          f"{g['params']:,} parameters -> {g['tokens']:,} tokens x {g['token_dim']} ({g['layer_ids']} layer ids); "
          f"DiT {g['dit']}, {g['dit_params'] / 1e6:.1f}M params; import torch {g['import_mb']:,.0f} MB resident")
    print(f"{'projection':<10} {'rounds':>6} {'train step s':>13} {'DDIM-2 s':>9} {'peak MB':>9}")
    med = {}
    for name, r in rows.items():
        med[name] = (statistics.median(r["train_s"]), statistics.median(r["sample_s"]), r["peak_mb"])
        print(f"{name:<10} {len(r['train_s']):>6} {med[name][0]:>13.2f} {med[name][1]:>9.2f} {med[name][2]:>9,.0f}")
    ratios = [a / b for a, b in zip(med["gather"], med["grouped"])]
    print(f"{'gather / grouped':<17} {ratios[0]:>13.1f}x {ratios[1]:>8.1f}x {ratios[2]:>8.1f}x")


if __name__ == "__main__":
    main()
