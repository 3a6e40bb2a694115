"""Evaluation: what the networks a generator makes actually do. Needs only the core (no Lightning).

One module per section (``alignment``, ``one_step``, ``recursive``, ``novelty``, ``diversity``,
``landscape``), shared helpers in ``common``, figures in ``plots``, the section loop and the report in
``suite`` (``run_sections``, ``evaluate_all``), the mode comparison in ``modes``.
"""
from gpt_params.evaluation.alignment import alignment_r2, prompt_alignment
from gpt_params.evaluation.diversity import diversity
from gpt_params.evaluation.landscape import landscape
from gpt_params.evaluation.modes import compare_modes
from gpt_params.evaluation.novelty import novelty
from gpt_params.evaluation.one_step import one_step
from gpt_params.evaluation.recursive import recursive
from gpt_params.evaluation.suite import SECTIONS, evaluate_all, run_sections, summary_lines

__all__ = ["SECTIONS", "alignment_r2", "compare_modes", "diversity", "evaluate_all", "landscape", "novelty",
           "one_step", "prompt_alignment", "recursive", "run_sections", "summary_lines"]
