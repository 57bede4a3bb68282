"""Which stages a run visits and which it recomputes: ``--only`` and ``--from``.

Plain data over a compiled plan (no Prefect, no torch), so ``paperdag status`` answers what a
run would do without importing the flow.
"""
from __future__ import annotations

from flows.errors import StageSelectionError
from tasks.plan import RecipePlan


def stages_to_run(plan: RecipePlan, only: list[str], from_stage: str | None) -> tuple[list[str], set[str]]:
    """(stages to visit in order, stages to force-recompute)."""
    for name in [*only, *([from_stage] if from_stage else [])]:
        if name not in plan.stages and name not in plan.seed_copies:
            raise StageSelectionError(f"recipe {plan.name} has no stage {name!r}; stages: {', '.join(plan.stages)}")
    if only and from_stage:
        raise StageSelectionError("use either --only or --from, not both")
    if only:  # a seed-dependent stage's name selects all its per-seed copies
        only = [c for name in only for c in plan.seed_copies.get(name, [name])]
        return [s for s in plan.stages if s in only], set(only)
    if from_stage:
        starts = plan.seed_copies.get(from_stage, [from_stage])
        forced = set(starts).union(*(plan.descendants(s) for s in starts))
        return list(plan.stages), forced
    return list(plan.stages), set()
