"""select stage: a selector keeps or drops training documents; held-out splits pass through.

Precision and recall are measured against the injected-noise labels, which the selector
never sees.
"""
from __future__ import annotations

import pandas as pd

from components.data.parquet_io import read_documents, write_documents
from components.data.selection_metrics import removal_precision_recall


class EmptySelectionError(RuntimeError):
    pass


def run(ctx) -> dict:
    docs = read_documents(ctx.input("docs").path / "docs")
    is_train = docs["split"] == "train"
    train = docs[is_train].reset_index(drop=True)
    selector = ctx.method
    keep = selector.select(train)
    if not keep.any():
        raise EmptySelectionError(
            f"stage {ctx.plan.name} ({ctx.plan.method}): no training documents left after selection "
            f"(0 of {len(train)} kept); loosen stages.{ctx.plan.name}.params")
    kept = pd.concat([train[keep], docs[~is_train]], ignore_index=True)
    write_documents(kept, ctx.out_dir / "docs")
    ctx.facts["rows"] = len(kept)
    pr = removal_precision_recall(train["noise_label"].tolist(), keep)
    metrics = {"train_docs_in": len(train), "train_docs_kept": int(keep.sum())}
    metrics.update({f"noise_{k}": v for k, v in pr.items() if isinstance(v, (int, float))})
    metrics.update({f"noise_recall_{k}": v for k, v in pr.get("recall_by_kind", {}).items()})
    metrics.update({f"removed_{k}": v for k, v in selector.stats.items() if isinstance(v, (int, float))})
    return metrics
