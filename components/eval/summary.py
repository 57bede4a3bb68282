"""Plain-text summaries of an evaluate stage's metrics, shared by the report and the terminal."""
from __future__ import annotations


def scored_blocks(metrics: dict) -> str:
    """"prose 43, code 170 blocks" as the evaluate stage scored them (the same for every model)."""
    models = list(metrics.get("models", {}).values())
    counts = {d: models[0].get(f"blocks_{d}") for d in metrics.get("domains", [])} if models else {}
    return ", ".join(f"{d} {int(n)}" for d, n in counts.items() if n is not None) + " blocks" if any(
        n is not None for n in counts.values()) else ""
