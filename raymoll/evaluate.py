"""Kept for `from raymoll.evaluate import evaluate`: the evaluation lives in raymoll.evaluation."""
from raymoll.evaluation import EvaluateError, SEVERITIES, eval_sets, evaluate, set_seed

__all__ = ["EvaluateError", "SEVERITIES", "eval_sets", "evaluate", "set_seed"]
