"""The ``gpt-params`` dispatcher: one verb per module (build_dataset, train, prompt, evaluate).

Library code raises; this is the one place that turns bad input into one line on stderr and exit code 2.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from gpt_params.cli import build_dataset, evaluate, prompt, train

VERBS = {"build-dataset": build_dataset.main, "train": train.main, "prompt": prompt.main, "evaluate": evaluate.main}
USAGE = """usage: gpt-params {build-dataset,train,prompt,evaluate} [options]

  build-dataset  train many small networks at once into a checkpoint store
  train          train the generator (LightningCLI; default config: configs/digits_mlp.yaml)
  prompt         generate networks for target metrics and evaluate them
  evaluate       prompt alignment, one step, recursive, novelty, diversity, landscape

`gpt-params VERB --help` explains each verb."""


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which a test harness or a notebook may have replaced)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_library_notes() -> None:
    """The libraries' notes and warnings (``logging``) go to stderr, one plain line each."""
    for name in ("checkpoints_dataset", "gpt_params"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``gpt-params`` console script and ``python -m gpt_params``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_library_notes()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"gpt-params: unknown command {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        return VERBS[verb](rest)
    except SystemExit as exit_:                # argparse: a message means bad input
        if not isinstance(exit_.code, str):
            raise
        print(f"gpt-params {verb}: error: {exit_.code}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError, TimeoutError) as err:   # bad input: one line, no traceback
        if os.environ.get("GPT_PARAMS_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gpt-params {verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
