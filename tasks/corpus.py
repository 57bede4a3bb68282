"""corpus stage: build the document table from the recipe's `data.sources`."""
from __future__ import annotations

from pathlib import Path

from components.data.parquet_io import write_documents


def run(ctx) -> dict:
    root = ctx.workspace.root.resolve()
    for index, src in enumerate(getattr(ctx.method.params, "sources", [])):
        cache_dir = getattr(src, "cache_dir", None)  # the one path a recipe makes paperdag write to
        if cache_dir is not None and not Path(cache_dir).resolve().is_relative_to(root):
            raise ValueError(f"data.sources[{index}].cache_dir: {cache_dir} is outside the workspace {root}; a recipe "
                             "may only write inside its workspace (leave cache_dir unset to use the datasets default)")
    docs = ctx.method.build()
    write_documents(docs, ctx.out_dir / "docs")
    ctx.facts["rows"] = len(docs)
    metrics = {"docs": len(docs), "noise_docs": int((docs["noise_label"] != "").sum())}
    for domain, n in docs.groupby("domain").size().items():
        metrics[f"docs_{domain}"] = int(n)
    return metrics
