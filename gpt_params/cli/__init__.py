"""The ``gpt-params`` command: one file per verb; the only code that prints tables and exits."""
from gpt_params.cli.main import main

__all__ = ["main"]
