"""The ``gpt-params`` command: one file per verb; the only code that prints tables and exits."""
from gpt_params.cli.dispatch import VERBS, main
from gpt_params.cli.train import CONFIG_DIR, DEFAULT_CONFIG

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "VERBS", "main"]
