"""Label a review queue the way a careful person would, for tests and the catalogue run.

    python benchmarks/simulate_review.py QUEUE.jsonl CORPUS_ARTIFACT_DIR OUT.jsonl

The quality_review stage writes ``review_queue.jsonl`` for a person to label. This stand-in labels
each queued document from the corpus's injected-noise ground truth (noise -> drop, clean -> keep),
the judgement the noise was designed to make obvious. It is a simulation of the person, and the
catalogue's recipe says so: a real review would be done by reading the texts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def simulate_review(queue: Path, corpus_dir: Path, out: Path) -> dict[str, int]:
    from components.data.parquet_io import read_documents

    docs = read_documents(Path(corpus_dir) / "docs")
    noise = dict(zip(docs["id"], docs["noise_label"]))
    rows = [json.loads(line) for line in Path(queue).read_text().splitlines() if line.strip()]
    for row in rows:
        row["label"] = "drop" if noise.get(row["id"].split("#", 1)[0]) else "keep"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"keep": sum(r["label"] == "keep" for r in rows), "drop": sum(r["label"] == "drop" for r in rows)}


if __name__ == "__main__":
    print(simulate_review(*map(Path, sys.argv[1:4])))
