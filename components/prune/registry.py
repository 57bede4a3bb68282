"""Pruning methods a recipe can name."""
from components.prune.base import Pruner
from components.prune.magnitude import MagnitudePruner
from components.prune.sparsegpt import SparseGptPruner
from components.prune.wanda import WandaPruner
from components.registry import Registry

PRUNERS = Registry("prune", Pruner, [MagnitudePruner, WandaPruner, SparseGptPruner])
