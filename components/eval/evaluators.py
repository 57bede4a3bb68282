"""The evaluate stage's registry."""
from components.eval.arithmetic_eval import ArithmeticExactMatch
from components.eval.evaluator import Evaluator
from components.eval.masked_lm import MaskedLmEvaluation
from components.eval.standard import StandardEvaluation
from components.registry import Registry

EVALUATORS = Registry("evaluate", Evaluator, [StandardEvaluation, ArithmeticExactMatch, MaskedLmEvaluation])
