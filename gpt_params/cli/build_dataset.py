"""``gpt-params build-dataset``: the population builder's command line (``python -m checkpoints_dataset build``)."""
from __future__ import annotations

from checkpoints_dataset.__main__ import main as build_main


def main(argv: list[str]) -> int:
    return build_main(argv, prog="gpt-params build-dataset") or 0
