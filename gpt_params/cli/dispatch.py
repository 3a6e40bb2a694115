"""The ``gpt-params`` dispatcher: one verb per module (build_dataset, train, prompt, denoise, evaluate).

Library code raises; this is the one place that turns bad input into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Optional

from gpt_params.cli import build_dataset, denoise, evaluate, prompt, train

VERBS = {"build-dataset": build_dataset.main, "train": train.main, "prompt": prompt.main, "denoise": denoise.main,
         "evaluate": evaluate.main}
USAGE = """usage: gpt-params {build-dataset,train,prompt,denoise,evaluate} [options]

  build-dataset  train many small networks at once into a checkpoint store
  train          train the generator (LightningCLI; default config: configs/digits_mlp.yaml)
  prompt         generate networks for target metrics and evaluate them
  denoise        watch networks emerge step by step: denoise.gif, denoise.png, trajectory.json
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
        return VERBS[verb](rest)   # argparse's own errors print usage and exit 2 (SystemExit) by themselves
    except argparse.ArgumentError as err:      # LightningCLI's parser (train)
        return _error(verb, f"{err} (see gpt-params {verb} --help)")
    except (ValueError, KeyError, TimeoutError, OSError) as err:   # bad input or environment: one line, no traceback
        if os.environ.get("GPT_PARAMS_DEBUG"):
            raise
        return _error(verb, _message(err))


def _message(err: Exception) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename else ""
        if err.errno == errno.ENOSPC:
            return f"no space left on the device{where}: free some space or write somewhere else; nothing was replaced"
        return f"{err.strerror}{where}: check the path and its permissions"
    return str(err)


def _error(verb: str, message: str) -> int:
    """Bad input: one line on stderr (the problem and the fix), exit code 2."""
    print(f"gpt-params {verb}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
