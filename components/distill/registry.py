"""Distillation methods a recipe can name."""
from components.distill.logit_kd import LogitKD
from components.registry import Registry
from components.train.method import TrainingMethod

DISTILL_METHODS = Registry("distill", TrainingMethod, [LogitKD])
