"""``paperdag lineage``: walk manifests from an artifact (or an MLflow run) back to the data."""
from __future__ import annotations

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


def lineage_lines(ws: Workspace, art: Artifact) -> list[str]:
    lines: list[str] = []

    def walk(a: Artifact, prefix: str, label: str, last: bool, root: bool) -> None:
        m = a.manifest
        facts = m.get("facts", {})
        extra = ", ".join(f"{k}={facts[k]}" for k in ("rows", "precision", "train_flops", "bits", "blocks") if k in facts)
        connector = "" if root else ("└─ " if last else "├─ ")
        lines.append(f"{prefix}{connector}{label}{m.get('stage', '?')} [{m['kind']}/{m['method']}] "
                     f"{m['digest'][:16]}  run={m.get('mlflow_run_id') or '-'}  {a.path}" + (f"  ({extra})" if extra else ""))
        child_prefix = prefix + ("" if root else ("   " if last else "│  "))
        items = [(role, d) for role, ds in sorted(m.get("inputs", {}).items()) for d in ds]
        for i, (role, digest) in enumerate(items):
            up = ws.artifacts.find(digest)
            is_last = i == len(items) - 1
            if up is None:
                lines.append(f"{child_prefix}{'└─ ' if is_last else '├─ '}{role}: {digest[:16]} (artifact not in this workspace)")
            else:
                walk(up, child_prefix, f"{role}: ", is_last, False)

    walk(art, "", "", True, True)
    return lines


def print_lineage(ws: Workspace, ref: str) -> int:
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
    print("\n".join(lineage_lines(ws, art)))
    return 0
