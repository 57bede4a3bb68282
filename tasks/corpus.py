"""corpus stage: build the document table from the recipe's `data.sources`."""
from __future__ import annotations

from components.data.parquet_io import write_documents


def run(ctx) -> dict:
    docs = ctx.method.build()
    write_documents(docs, ctx.out_dir / "docs")
    ctx.facts["rows"] = len(docs)
    metrics = {"docs": len(docs), "noise_docs": int((docs["noise_label"] != "").sum())}
    for domain, n in docs.groupby("domain").size().items():
        metrics[f"docs_{domain}"] = int(n)
    return metrics
