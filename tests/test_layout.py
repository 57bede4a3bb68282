"""The project's own module names stay out of the standard library's way."""
from __future__ import annotations

import sys

from tests.helpers import REPO


def test_no_module_in_flows_shadows_the_standard_library():
    """Prefect loads a deployment's flow from flows/pipeline.py and puts flows/ on sys.path; the
    flow's worker processes then imported flows/inspect.py as the standard library's inspect and
    died at start-up (any deployment that built a stage with --max-parallel above 1)."""
    shadowing = sorted(p.name for p in (REPO / "flows").glob("*.py") if p.stem in sys.stdlib_module_names)
    assert shadowing == []
