"""Evaluation of a student: FoQA, perplexity, distillation metrics, diversity, EuroEval, and run reports.

`qa_scores` is the SQuAD-style scorer; `evaluate_checkpoint` runs the chosen suites on one model and returns
their results as one dict (what `grpo-kd evaluate` writes and what the demo prints before and after).
"""

from grpo_kd.evaluate.qa import normalize_answer, qa_scores

__all__ = ["normalize_answer", "qa_scores"]
