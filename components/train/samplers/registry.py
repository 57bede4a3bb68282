"""Training-data samplers a recipe can name (stage option ``sampler: {method: <key>, params: {...}}``)."""
from components.registry import Registry
from components.train.samplers.base import Sampler
from components.train.samplers.fixed_subset import FixedSubsetSampler
from components.train.samplers.rs2 import Rs2Sampler
from components.train.samplers.skill_it import SkillItSampler
from components.train.samplers.uniform import UniformSampler

SAMPLERS = Registry("sampler", Sampler, [UniformSampler, FixedSubsetSampler, Rs2Sampler, SkillItSampler])
