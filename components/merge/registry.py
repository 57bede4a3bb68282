"""Merge methods a recipe can name."""
from components.merge.base import Merger
from components.merge.compeft import ComPEFT
from components.merge.dare import DareLinear, DareTies
from components.merge.grafting import Grafting
from components.merge.greedy_soup import GreedySoup
from components.merge.groupwise import GroupwiseMerge
from components.merge.task_arithmetic import TaskArithmetic
from components.merge.ties import Ties
from components.merge.uniform_soup import UniformSoup
from components.merge.vcycle_interpolate import VCycleInterpolate
from components.registry import Registry

MERGERS = Registry("merge", Merger, [UniformSoup, TaskArithmetic, Ties, DareLinear, DareTies,
                                     GreedySoup, ComPEFT, GroupwiseMerge, Grafting, VCycleInterpolate])
