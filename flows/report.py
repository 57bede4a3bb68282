"""Terminal output: the results table after a run, and the recipe catalogue."""
from __future__ import annotations

import json
from pathlib import Path

from components.eval.claims import verdict_label
from components.eval.summary import scored_blocks
from tasks.plan import RecipePlan
from tasks.workspace import Workspace


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return f"{v / 1e6:.2f} MB"
    if kind == "flops":
        return f"{v:.2e}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


def results_table(metrics: dict) -> str:
    models: dict = metrics.get("models", {})
    domains = metrics.get("domains", [])
    cols = ([(f"ppl_{d}", f"ppl {d}", "") for d in domains] + [("ppl_all", "ppl all", ""),
            ("arith_exact_match", "arith EM", ""), ("size_bytes", "size", "bytes"),
            ("bits_per_weight", "bits/w", ""), ("activation_bits", "act bits", ""), ("sparsity", "sparsity", ""),
            ("train_flops", "train FLOPs", "flops")])
    cols = [c for c in cols if any(c[0] in m for m in models.values())]  # no all-"-" columns
    header = ["model"] + [c[1] for c in cols]
    rows = [[name] + [_fmt(m.get(key), kind) for key, _, kind in cols] for name, m in models.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    scored = scored_blocks(metrics)
    if scored:
        out.append(f"perplexity over the test split: {scored}")
    claims = metrics.get("claims", [])
    if claims:
        out += ["", "claims:"]
        for c in claims:
            out.append(f"  [{verdict_label(c)}] {c['name']}: {c['statement']}")
            out.append(f"         {c['detail']}")
    return "\n".join(out)


def mlflow_run_markdown(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow run a Prefect flow run's markdown artifact names: a link into the tracking
    server's UI, or, for a local store that no browser can open, where to point `mlflow ui`."""
    from tasks.tracking import is_server  # here, not at the top: `paperdag list` imports this module

    if is_server(tracking_uri):
        return f"[MLflow run {run_id}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"MLflow run `{run_id}` (experiment {experiment_id}) in `{tracking_uri}`"


def critical_path(plan: RecipePlan, seconds: dict[str, float]) -> tuple[list[str], float]:
    """The chain of stages, each reading the one before, with the most stage time (``seconds``
    per stage; a stage not in it counts 0): no number of parallel workers finishes a run faster."""
    best: dict[str, tuple[float, list[str]]] = {}
    for name in plan.stages:  # plan order is topological
        before = max((best[u] for u in plan.stages[name].upstream), default=(0.0, []))
        best[name] = (before[0] + seconds.get(name, 0.0), before[1] + [name])
    total, path = max(best.values(), default=(0.0, []))
    return path, total


def summary_text(summary, plan: RecipePlan) -> str:
    """What a run reports at the end: stage counts, the critical path of the stages that ran,
    each evaluate stage's results and claims, and where its lineage is."""
    hits = sum(o.cached for o in summary.outcomes)
    lines = [f"{plan.name}: {len(summary.outcomes)} stages, {hits} cache hits, {summary.seconds:.1f}s"]
    ran = {o.name: o.seconds for o in summary.outcomes if not o.cached}
    if len(ran) > 1:
        path, path_s = critical_path(plan, ran)
        lines.append(f"critical path: {' -> '.join(n for n in path if n in ran)} ({path_s:.1f}s of "
                     f"{sum(ran.values()):.1f}s stage time; the shortest the run can take at any --max-parallel)")
    for outcome in summary.outcomes:
        if outcome.kind == "evaluate" and (Path(outcome.path) / "metrics.json").exists():
            lines += ["", f"results ({outcome.name}):",
                      results_table(json.loads((Path(outcome.path) / "metrics.json").read_text()))]
    lines += ["", f"lineage: mlflow ui --backend-store-uri {summary.tracking_uri}   (experiment '{plan.name}', "
              f"flow run {summary.parent_run_id})", f"         paperdag lineage {summary.parent_run_id}"]
    return "\n".join(lines)


def print_summary(summary, plan: RecipePlan, ws: Workspace) -> None:
    print("\n" + summary_text(summary, plan))


CATALOGUE = Path("benchmarks") / "results" / "catalogue.json"
PREVIOUS_CATALOGUE = CATALOGUE.with_name("catalogue_previous.json")  # rows of earlier passes


def measured_status(name: str, digests: dict[str, str], catalogue: dict) -> str:
    """Whether the catalogue's numbers for this recipe still describe it: the recorded stage
    digests against the ones it compiles to now (any code, param or data change moves them)."""
    entry = catalogue.get(name)
    if entry is None:
        return "not measured in the catalogue"
    recorded = entry.get("digests", {})
    # a stage added, changed or removed since: each moves what the claims were measured on
    changed = sorted(s for s in digests.keys() | recorded.keys() if recorded.get(s) != digests.get(s))
    at = f"commit {entry.get('commit', '?')[:12]}"
    if changed:
        return (f"STALE: {len(changed)} of {len(digests)} stages changed since it was measured at {at} "
                f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''})")
    if entry.get("returncode") or entry.get("missing_metrics"):
        return f"FAILED to run at {at} (exit code {entry.get('returncode')}): see benchmarks/results/{name}.log"
    return f"measured at {at}: " + ", ".join(
        f"{sum(c['verdict'] == v and c.get('kind') != 'accounting' for c in entry.get('claims', []))} {v}"
        for v in ("PASS", "FAIL", "NOT DISCRIMINATING")) + \
        f", {sum(c.get('kind') == 'accounting' for c in entry.get('claims', []))} accounting"


def catalogue_entries(ws: Workspace) -> list[dict]:
    """Each recipe in params/: its paper, stages, seeds, claims and whether the catalogue's
    numbers still describe it (or why it does not compile)."""
    from flows.errors import RecipeError
    from flows.plan_cache import compiled_plan

    catalogue = {}  # the latest pass's row of each recipe, else an earlier pass's (each names its commit)
    for rel in (PREVIOUS_CATALOGUE, CATALOGUE):
        if (ws.root / rel).exists():
            catalogue.update(json.loads((ws.root / rel).read_text()))
    entries, hashed = [], {}
    for path in sorted((ws.root / "params").glob("*.yaml")):
        rel = str(path.relative_to(ws.root))
        try:
            plan, listing = compiled_plan(path, hashed=hashed)
        except RecipeError as e:
            entries.append({"name": path.stem, "path": rel, "invalid": str(e)})
            continue
        entries.append({"name": listing["name"], "path": rel, **listing,
                        "results": measured_status(plan.name, {s.name: s.digest for s in plan.stages.values()},
                                                   catalogue) if catalogue else None})
    return entries


def print_catalogue(ws: Workspace, as_json: bool = False) -> None:
    entries = catalogue_entries(ws)
    if not entries and not as_json:
        print(f"no recipes in {ws.root / 'params'}: run paperdag inside the project, or pass --workspace DIR")
        return
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    for e in entries:
        if "invalid" in e:
            print(f"{e['name']}: INVALID: {e['invalid']}")
            continue
        print(f"{e['name']}  ({e['path']})")
        print(f"  paper:   {e['paper']['title']} {e['paper']['url']}")
        print(f"  stages:  {' -> '.join(e['stages'])}" + (f"  (x{len(e['seeds'])} seeds: {e['seeds']})"
                                                          if e["seeds"] else ""))
        for c in e["claims"]:
            print(f"  claim:   {c['statement']}" + (" [accounting]" if c["kind"] == "accounting" else
                                                    f" [control: {c['control']}]" if c["control"] else ""))
        if e["results"]:
            print(f"  results: {e['results']}")
        print()
