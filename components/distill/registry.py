"""Distillation methods a recipe can name."""
from components.distill.adaptive_sparse_kd import AdaptiveSparseKD
from components.distill.bipft_kd import BiPFTKD
from components.distill.feature_kd import FeatureKD
from components.distill.ferkd import FerKD
from components.distill.label_free_kd import LabelFreeKD
from components.distill.logit_kd import LogitKD
from components.distill.pela import Pela
from components.distill.ps_kd import PSKD
from components.registry import Registry
from components.train.method import TrainingMethod

DISTILL_METHODS = Registry("distill", TrainingMethod, [LogitKD, FeatureKD, LabelFreeKD, FerKD, PSKD, Pela,
                                                       AdaptiveSparseKD, BiPFTKD])
