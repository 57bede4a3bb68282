"""Errors that mean "the request was wrong" (exit code 2), as opposed to a stage failing (exit 1)."""
from flows.pipeline import StageSelectionError
from flows.recipe import RecipeError

USAGE_ERRORS = (RecipeError, StageSelectionError)
