"""Training methods a recipe can name, per stage kind."""
from components.registry import Registry
from components.train.adapt import AdaptivePrecisionTraining
from components.train.bert2bert import Bert2Bert
from components.train.bipft import BiPFTTraining
from components.train.compacter import CompacterFinetune
from components.train.dense import DenseTraining
from components.train.fim import FillInTheMiddle
from components.train.double_rounding import DoubleRounding
from components.train.dynamic_fixed_point import DynamicFixedPointTraining
from components.train.fp_training import FloatingPointTraining
from components.train.galore import GaLoreTraining
from components.train.gradual_pruning import GradualPruning
from components.train.halo import HaloTraining
from components.train.hedgehog import HedgehogConversion
from components.train.hft import HalfFinetune
from components.train.l4q import L4QTraining
from components.train.lora import LoraFinetune
from components.train.masked_thought import MaskedThought
from components.train.method import TrainingMethod
from components.train.perp import PerpRetrain
from components.train.qfx import FixedPointTraining
from components.train.qat import QuantAwareTraining
from components.train.retro import RetrievalPretraining
from components.train.mlm import MaskedLanguageModelling
from components.train.self_sampled import SelfSampledSolutions
from components.train.sltrain import SLTrain
from components.train.sparse_finetune import SparseFinetune
from components.train.spdf import SpdfTraining
from components.train.sr_ste import SrSteTraining
from components.train.ul2 import MixtureOfDenoisers
from components.train.vcycle_coalesce import VCycleCoalesce

PRETRAIN_METHODS = Registry("pretrain", TrainingMethod, [DenseTraining, SpdfTraining, MaskedThought, GaLoreTraining,
                                                            LoraFinetune, GradualPruning, SLTrain,
                                                            QuantAwareTraining, SrSteTraining, HaloTraining, DoubleRounding,
                                                            FixedPointTraining, MixtureOfDenoisers, FillInTheMiddle,
                                                            FloatingPointTraining, BiPFTTraining, DynamicFixedPointTraining,
                                                            RetrievalPretraining, SelfSampledSolutions, MaskedLanguageModelling,
                                                            AdaptivePrecisionTraining])
FINETUNE_METHODS = Registry("finetune", TrainingMethod, [DenseTraining, SparseFinetune, MaskedThought, LoraFinetune,
                                                            GaLoreTraining, GradualPruning, HalfFinetune,
                                                            QuantAwareTraining, PerpRetrain, SrSteTraining,
                                                            HaloTraining, L4QTraining, Bert2Bert, VCycleCoalesce,
                                                            DoubleRounding, FixedPointTraining, CompacterFinetune,
                                                            MixtureOfDenoisers, FillInTheMiddle, HedgehogConversion,
                                                            FloatingPointTraining, BiPFTTraining, DynamicFixedPointTraining,
                                                            RetrievalPretraining, SelfSampledSolutions, MaskedLanguageModelling,
                                                            AdaptivePrecisionTraining])
