"""Evaluation entry points. Evaluators are plain functions, not registered methods: a recipe
chooses what to measure through stage kinds, not through method keys."""
from components.eval.claims import Claim, ClaimError, check_claims
from components.eval.lm_eval_task import arithmetic_examples, run_lm_eval, write_arithmetic_task
from components.eval.perplexity import evaluate_perplexity
from components.eval.sizes import model_size_report

__all__ = [
    "Claim", "ClaimError", "check_claims", "arithmetic_examples", "run_lm_eval",
    "write_arithmetic_task", "evaluate_perplexity", "model_size_report",
]
