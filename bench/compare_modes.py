"""Train one generator per mode on a tiny CPU budget and compare them in one table (issue 8).

    python bench/compare_modes.py --store data/digits_mlp --out runs/bench_modes
    python bench/compare_modes.py --store data/fashion_cnn_64 --out runs/bench_modes_fashion --steps 600
    python bench/compare_modes.py --combine runs/bench_modes runs/bench_modes_fashion --out runs/bench_modes_all

(any store works: its task replaces the config's digits_mlp; a store of your own task needs --task
pkg.module:Class, the same import path its manifest names; --combine prints one table of several).

Modes: params+start (G.pt-style, the default), latent+start, and p-diff (latent, start-free,
unconditional). Each trains with bench/modes_digits.yaml (same steps and wall-time cap), then
``gpt_params.evaluation.modes.compare_modes`` writes OUT/compare/modes.md and modes.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from checkpoints_dataset import open_store
from checkpoints_dataset.tasks import TaskRef
from gpt_params.cli import main
from gpt_params.evaluation.modes import compare_modes

MODES = {
    "params+start": [],
    "latent+start": ["--model.space", "latent"],
    "p-diff (latent, no start, uncond.)": ["--model.space", "latent", "--model.start", "none",
                                           "--model.condition", "none"],
}


def store_task(store: str, given: str | None) -> TaskRef:
    """The store's task: a built-in name from its manifest, or the import path ``--task`` gives again (a path
    read from a manifest is never imported on its own); ``--task`` for a store recorded without one."""
    s = open_store(store)
    if s.task is None:
        if given is None:
            raise SystemExit(f"the store at {store} names no task (recorded by another project): pass --task")
        return TaskRef(given)
    options = (s.manifest.get("build_config") or {}).get("task_options", {})
    return TaskRef.from_file(s.task, options, given=given, option="--task", source=f"the store at {store}")


def run(store: str, out: str, steps: int, ae_steps: int, max_time: str, runs: int, given: str | None) -> None:
    torch.set_num_threads(1)
    config = Path(__file__).with_name("modes_digits.yaml")
    ref = store_task(store, given)                         # the config names digits_mlp; the store decides
    task = ref.name
    ckpts = {}
    for i, (name, extra) in enumerate(MODES.items()):
        root = Path(out) / f"mode{i}"
        last = sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
        if not last:
            total = steps + (ae_steps if "latent" in extra else 0)   # the same DiT steps for every mode
            assert main(["train", "--config", str(config), "--data.root", store, "--data.task", task,
                         "--trainer.default_root_dir",
                         str(root), "--trainer.max_steps", str(total), "--model.autoencoder.steps", str(ae_steps),
                         "--trainer.max_time", max_time,
                         "--final_eval_runs", "0", *extra]) == 0
            last = sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
        ckpts[name] = last[-1]
    s = open_store(store)
    report = compare_modes(ckpts, ref.task, s, Path(out) / "compare", runs=runs)
    print(report["markdown"])
    for note in report["notes"]:
        print("note:", note)


def combine(outs: list[str], dest: str) -> None:
    """One table of several comparisons (e.g. digits_mlp and fashion_cnn): rows of each OUT/compare/modes.json,
    the mode prefixed with its task; written to DEST/modes_all.md and printed."""
    from gpt_params.evaluation.modes import markdown_table

    rows, metrics = [], set()
    for out in outs:
        report = json.loads((Path(out) / "compare" / "modes.json").read_text())
        metrics.add(report["config"]["metric"])
        rows += [{**r, "mode": f"{report['config']['task']}: {r['mode']}"} for r in report["rows"]]
    table = markdown_table(rows, " / ".join(sorted(metrics)))
    Path(dest).mkdir(parents=True, exist_ok=True)
    (Path(dest) / "modes_all.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="data/digits_mlp")
    p.add_argument("--out", default="runs/bench_modes")
    p.add_argument("--steps", type=int, default=150, help="DiT steps of every mode")
    p.add_argument("--ae_steps", type=int, default=80, help="autoencoder steps of the latent modes")
    p.add_argument("--max_time", default="00:00:06:00")
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--task", default=None, help="a store of your own task: the import path pkg.module:Class its "
                   "manifest names (default: the store's built-in task)")
    p.add_argument("--combine", nargs="+", metavar="OUT",
                   help="instead of training: print one table of the comparisons already in these --out dirs")
    a = p.parse_args()
    if a.combine:
        combine(a.combine, a.out)
    else:
        run(a.store, a.out, a.steps, a.ae_steps, a.max_time, a.runs, a.task)
