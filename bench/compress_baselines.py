"""Compressed networks: the generator against compression after the fact and sparse training (issue 19).

    python -m bench.compress_baselines                      # digits_mlp, end to end (~20 min on 2 cores)
    python -m bench.compress_baselines --task fashion_mlp   # the full comparison (Fashion-MNIST files)
    python -m bench.compress_baselines --sizes-only         # packed against dense file sizes, 0.9 + int4

Trains what is missing under ``--work`` (the store and the generator of ``configs/<task>_compressed.yaml``;
a second call reuses them), then runs the evaluation's ``compression`` section on the store's test runs
(every method from the same default inits) and prints one row per method and (sparsity, bits): the test
error (median over the inits), the sparsity and bits measured on the networks, and for the generator the
error before the projection and the distance the projection moved it; last, the sizes of packed against dense
files at 0.9 sparsity and int4. The whole report goes to ``--work/report.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from checkpoints_dataset.fileio import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def _train(task: str, work: Path, max_steps: int | None) -> Path:
    """The generator of the task's compressed config (and its store), trained under ``work`` unless present."""
    from gpt_params.cli import main

    done = sorted(work.glob("run/lightning_logs/version_*/checkpoints/last.ckpt"))
    if done:
        return done[-1]
    args = ["train", "--config", str(ROOT / "configs" / f"{task}_compressed.yaml"), "--data.root",
            str(work / "data"), "--trainer.default_root_dir", str(work / "run")]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    if main(args) != 0:
        raise SystemExit(f"training the {task} generator failed")
    return sorted(work.glob("run/lightning_logs/version_*/checkpoints/last.ckpt"))[-1]


def _rows(report: dict) -> list[tuple]:
    metric = report["metric"]
    rows = []
    for key, r in report["rows"].items():
        def row(method, d, extra=""):
            rows.append((method, r["sparsity"], r["bits"], d[metric]["median"], d["sparsity"]["median"],
                         d["bits"]["median"], extra))
        if "generated" in r:
            g = r["generated"]
            row("generated + projection", g, f"before projection {g['before_projection']['median']:.3f}, "
                                             f"moved {g['distance']['median']:.2f}; alignment R^2 "
                                             f"{r['alignment']['median']:.3f}")
        row("dense generator, compressed", r["dense_then_compressed"]["one_shot"])
        row("  + masked fine-tune", r["dense_then_compressed"]["finetuned"],
            f"{r['dense_then_compressed']['finetune_steps']} steps")
        sfs = r["sparse_from_start"]
        match = sfs.get("steps_to_match", {})
        row("sparse from the start (Adam)", sfs["adam"],
            f"store runs {sfs['store_runs']['median']}; steps to match the generated: {match.get('median')} "
            f"({match.get('above_cap', '-')} above {match.get('cap', '-')})")
        if "ticket_mode" in r:
            row("ticket mode (generated mask)", r["ticket_mode"], "1 training")
        row("lottery tickets", r["lottery_tickets"], f"{r['lottery_tickets']['trainings']} trainings")
        row("random masks", r["random_masks"])
    return rows


def packed_sizes() -> list[tuple[str, int, int]]:
    """(network, dense bytes, packed bytes) of a default init projected to sparsity 0.9 and int4, written both
    ways as `gpt-params prompt` writes them (tasks whose data files are missing are left out)."""
    import tempfile

    from checkpoints_dataset import get_task
    from checkpoints_dataset.compress import prunable_names
    from gpt_params.core.compression import pack, project
    from gpt_params.core.generator import save_state_dict

    out = []
    for label, name, options in (("digits_mlp", "digits_mlp", {}), ("fashion_mlp", "fashion_mlp", {}),
                                 ("fashion_mlp hidden=1280", "fashion_mlp", {"hidden": 1280})):
        try:
            task = get_task(name, **options)
        except FileNotFoundError:
            continue
        names = prunable_names(task.build_model())
        state = task.to_state_dict(project(task.init_params(1), task.layer_shapes, names, 0.9, 4).params[0])
        with tempfile.TemporaryDirectory() as tmp:
            save_state_dict(Path(tmp) / "dense.safetensors", state, {"metric": "val_error"})
            tensors, meta = pack(state, names, 4)
            save_state_dict(Path(tmp) / "packed.safetensors", tensors, {"metric": "val_error", **meta})
            out.append((label, (Path(tmp) / "dense.safetensors").stat().st_size,
                        (Path(tmp) / "packed.safetensors").stat().st_size))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["digits_mlp", "fashion_mlp"], default="digits_mlp")
    p.add_argument("--work", default=None, help="directory for the store, the generator and report.json "
                                                "(default bench_runs/compress_<task>)")
    p.add_argument("--num-inits", type=int, default=8, help="held-out default inits per method")
    p.add_argument("--runs", type=int, default=64, help="the store's test runs the sparse-from-the-start row reads")
    p.add_argument("--max-steps", type=int, default=None, help="generator training steps (default: the config's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--sizes-only", action="store_true", help="only the file sizes of packed against dense networks")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sizes_only:
        for label, dense, packed in packed_sizes():
            print(f"{label}: 0.9 sparse + int4, dense file {dense} B, packed {packed} B: {dense / packed:.1f}x smaller")
        return 0
    from gpt_params.core.generator import Generator
    from gpt_params.evaluation.suite import run_sections

    work = Path(args.work or f"bench_runs/compress_{args.task}")
    t0 = time.perf_counter()
    ckpt = _train(args.task, work, args.max_steps)
    trained = time.perf_counter() - t0
    gen = Generator.load(ckpt)
    task = gen.make_task()
    from checkpoints_dataset import open_store
    store = open_store(gen.store_root)
    notes: list[str] = []
    report = run_sections(gen, task, store, ["compression"], runs=args.runs, notes=notes,
                          options={"compression": {"num_inits": args.num_inits}})["compression"]
    write_json_atomic(work / "report.json", {"compression": report, "notes": notes, "checkpoint": str(ckpt)})
    print(f"{args.task}: generator {ckpt} ({trained / 60:.1f} min to train or find), comparison "
          f"{(time.perf_counter() - t0 - trained) / 60:.1f} min; {report['num_inits']} inits, {report['metric']}")
    print(f"{'method':<30} {'sparsity':>8} {'bits':>4} {report['metric']:>10} {'measured s':>10} {'b':>3}  notes")
    for method, s, b, err, ms, mb, extra in _rows(report):
        print(f"{method:<30} {s:>8g} {b:>4} {err:>10.3f} {ms:>10.3f} {mb:>3g}  {extra}")
    for n in notes:
        print(f"note: {n}")
    for label, dense, packed in packed_sizes():
        print(f"{label}: 0.9 sparse + int4, dense file {dense} B, packed {packed} B: {dense / packed:.1f}x smaller")
    print(json.dumps({"report": str(work / "report.json")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
