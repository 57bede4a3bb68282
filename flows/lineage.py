"""``paperdag lineage``: walk manifests from an artifact (or an MLflow run) back to the data."""
from __future__ import annotations

import json
import re
import sys

from tasks.artifacts import Artifact
from tasks.workspace import Workspace

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _artifact_for_run(ws: Workspace, run_id: str) -> Artifact | None:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=ws.tracking_uri).get_run(run_id)
    digest = run.data.tags.get("paperdag.artifact_digest")
    if digest is None:  # a flow (parent) run: start from its evaluate stage, else its last stage
        children = MlflowClient(tracking_uri=ws.tracking_uri).search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        children = sorted(children, key=lambda r: r.info.start_time)
        evals = [c for c in children if c.data.tags.get("paperdag.kind") == "evaluate"] or children
        if not evals:
            return None
        digest = evals[-1].data.tags["paperdag.artifact_digest"]
    return ws.artifacts.find(digest)


def lineage_tree(ws: Workspace, art: Artifact, depth: int | None = None) -> dict:
    """The artifact and its inputs, recursively, as nested dicts. An artifact reached a second
    time (the shared tokenizer, the base model) is a reference to the first, not a copy."""
    seen: set[str] = set()

    def node(a: Artifact, level: int) -> dict:
        m = a.manifest
        facts = m.get("facts", {})
        out = {"stage": m.get("stage", "?"), "recipe": m.get("recipe"), "kind": m["kind"], "method": m["method"],
               "digest": m["digest"], "run_id": m.get("mlflow_run_id"), "path": str(a.path),
               "facts": {k: facts[k] for k in ("rows", "precision", "train_flops", "bits", "blocks") if k in facts}}
        if m["digest"] in seen:
            return out | {"shown_above": True}
        seen.add(m["digest"])
        if depth is not None and level >= depth:
            n = sum(len(ds) for ds in m.get("inputs", {}).values())
            return out | ({"inputs_not_shown": n} if n else {})
        inputs = []
        for role, digests in sorted(m.get("inputs", {}).items()):
            for digest in digests:
                up = ws.artifacts.find(digest)
                inputs.append({"role": role, **(node(up, level + 1) if up is not None else
                                                {"digest": digest, "missing": True})})
        return out | {"inputs": inputs}

    return node(art, 0)


def lineage_lines(tree: dict) -> list[str]:
    lines: list[str] = []

    def walk(n: dict, prefix: str, last: bool, root: bool) -> None:
        connector = "" if root else ("└─ " if last else "├─ ")
        label = f"{n['role']}: " if "role" in n else ""
        if n.get("missing"):
            lines.append(f"{prefix}{connector}{label}{n['digest'][:16]} (artifact not in this workspace)")
            return
        extra = ", ".join(f"{k}={v}" for k, v in n["facts"].items())
        tail = ("  (shown above)" if n.get("shown_above") else
                f"  (+{n['inputs_not_shown']} inputs below --depth)" if n.get("inputs_not_shown") else "")
        lines.append(f"{prefix}{connector}{label}{n['stage']} [{n['kind']}/{n['method']}] {n['digest'][:16]}  "
                     f"run={n['run_id'] or '-'}  {n['path']}" + (f"  ({extra})" if extra else "") + tail)
        children = n.get("inputs", [])
        child_prefix = prefix + ("" if root else ("   " if last else "│  "))
        for i, child in enumerate(children):
            walk(child, child_prefix, i == len(children) - 1, False)

    walk(tree, "", True, True)
    return lines


def print_lineage(ws: Workspace, ref: str, as_json: bool = False, depth: int | None = None) -> int:
    art = None
    if RUN_ID.match(ref):
        from mlflow.exceptions import MlflowException

        try:
            art = _artifact_for_run(ws, ref)
        except MlflowException:  # not a run id after all: try it as a digest
            art = None
    if art is None and len(ref) >= 4:
        art = ws.artifacts.find(ref)
    if art is None:
        print(f"error: no artifact or MLflow run matches {ref!r} in {ws.root}", file=sys.stderr)
        return 1
    tree = lineage_tree(ws, art, depth)
    print(json.dumps(tree, indent=2) if as_json else "\n".join(lineage_lines(tree)))
    return 0
