"""Evaluation of a student: FoQA, perplexity, distillation metrics, diversity, EuroEval, and run reports.

`qa_scores` is the SQuAD-style scorer (no heavy imports); `evaluate_checkpoint` runs the chosen suites on one
model and returns their results as one dict (what `grpo-kd evaluate` writes and what the demo prints before
and after training); `save_evaluation` and `run_report` write the JSON, markdown and PNG files.
"""

from grpo_kd.evaluate.qa import normalize_answer, qa_scores

__all__ = ["evaluate_checkpoint", "normalize_answer", "qa_scores", "run_report", "save_evaluation"]


def __getattr__(name: str):
    """Import the model-running parts on first use, so that `qa_scores` stays cheap to import."""
    if name == "evaluate_checkpoint":
        from grpo_kd.evaluate.suite import evaluate_checkpoint

        return evaluate_checkpoint
    if name in ("run_report", "save_evaluation"):
        from grpo_kd.evaluate import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
