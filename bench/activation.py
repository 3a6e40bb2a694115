"""Benchmark: the DiT's MLP activation, exact GELU against its tanh approximation (DiT's choice).

Builds the default digits_mlp generator twice with the same weights (``--model.dit.activation gelu`` and
``gelu_tanh``), then times one sampling step's denoiser call on a batch of prompts (what generation pays
per step), alternating the two in each round. Prints each round, the medians and the ratio, and how far
the two models' outputs are apart.

    python bench/activation.py --threads 1 --rounds 15
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from checkpoints_dataset import get_task
from checkpoints_dataset.info import DataInfo
from gpt_params.core.config import DiTOptions, GeneratorConfig
from gpt_params.core.generator import Generator


def build(activation: str) -> Generator:
    task = get_task("digits_mlp")
    info = DataInfo(layer_shapes=task.layer_shapes, metric="val_error", lower_is_better=True, metric_range=(0.0, 1.0),
                    best=0.0, init_metric=0.9, permutation_spec=task.permutation_spec.to_json())
    dit = DiTOptions(hidden_size=128, num_heads=4, activation=activation)   # configs/digits_mlp.yaml's DiT
    return Generator(GeneratorConfig(data=info, dit=dit)).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="prompts per denoiser call (evaluate's one step: 32)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=10, help="denoiser calls timed per round and model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    exact, approx = build("gelu"), build("gelu_tanh")
    for p_ in exact.model.parameters():   # adaLN-Zero starts at zero: give every layer something to compute
        torch.nn.init.normal_(p_, std=0.05)
    approx.load_state_dict(exact.state_dict())
    model_e, model_a = exact.model, approx.model
    n, t, c = args.batch, model_e.num_tokens, model_e.token_dim
    x, start = torch.randn(n, t, c), torch.randn(n, t, c)            # [N, T, C]
    steps, metric = torch.full((n,), 500), torch.full((n,), 0.1)        # [N]
    call = lambda m: m(x, steps, start, metric, metric)  # noqa: E731
    with torch.no_grad():
        diff = (call(model_e) - call(model_a)).abs().max().item()
        times = {"gelu": [], "gelu_tanh": []}
        for r in range(args.rounds + 1):   # round 0 warms up
            for name, model in (("gelu", model_e), ("gelu_tanh", model_a)) if r % 2 else \
                    (("gelu_tanh", model_a), ("gelu", model_e)):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call(model)
                if r:
                    times[name].append((time.perf_counter() - t0) / args.calls)
            if r:
                print(f"round {r}: gelu {1e3 * times['gelu'][-1]:.2f} ms, gelu_tanh {1e3 * times['gelu_tanh'][-1]:.2f} ms")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median per denoiser call (batch {n}, {t} tokens): gelu {1e3 * med['gelu']:.2f} ms, "
          f"gelu_tanh {1e3 * med['gelu_tanh']:.2f} ms, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"largest output difference: {diff:.2e}")
    print(f"speed ratio gelu_tanh / gelu: {med['gelu_tanh'] / med['gelu']:.2f}x")


if __name__ == "__main__":
    main()
