"""Merge methods a recipe can name."""
from components.merge.base import Merger
from components.merge.task_arithmetic import TaskArithmetic
from components.merge.uniform_soup import UniformSoup
from components.registry import Registry

MERGERS = Registry("merge", Merger, [UniformSoup, TaskArithmetic])
