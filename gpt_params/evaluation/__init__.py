"""Evaluation: what the networks a generator makes actually do. Needs only the core (no Lightning)."""
from gpt_params.evaluation.suite import (SECTIONS, alignment_r2, evaluate_all, one_step, prompt_alignment, recursive,
                                         summary_lines)
from gpt_params.evaluation.space import diversity, landscape, novelty
from gpt_params.evaluation.modes import compare_modes

__all__ = ["SECTIONS", "alignment_r2", "compare_modes", "diversity", "evaluate_all", "landscape", "novelty",
           "one_step", "prompt_alignment", "recursive", "summary_lines"]
