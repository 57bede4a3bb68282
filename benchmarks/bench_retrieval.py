"""The retrieval database's search (FAISS ``IndexFlatIP``, ``components/data/retrieval.py``) against
the obvious baseline, an exact search written in numpy (one BLAS matrix product of the query and
key vectors, then ``argpartition`` for the top k), on the same vectors, in one run.

Databases of random token blocks (vocab 4096, 128 tokens: the micro recipes' shape) at the micro
corpus's size (4442 training blocks) and ten times it; 1024 query chunks of 32 tokens; k = 2,
the ``retro`` recipe's layout. The two are timed in alternation (``--repeats`` rounds; the ratio of
the medians is reported with every round's ratio), and must agree: the same scores at every rank
(rows may differ only where two keys tie).

    python benchmarks/bench_retrieval.py [--repeats 5]   -> benchmarks/results/retrieval.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._provenance import commit_and_cpu  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VOCAB, SEQ, QUERIES = 4096, 128, 1024


def numpy_search(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top k, nearest first: (scores, rows)."""
    scores = queries @ keys.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-picked, axis=1)
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(top, order, axis=1)


def workload(n_blocks: int, repeats: int) -> dict:
    from components.data.retrieval import ChunkIndex, RetrievalLayout

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, VOCAB, size=(n_blocks, SEQ)).astype(np.int32)
    layout = RetrievalLayout()
    start = time.perf_counter()
    index = ChunkIndex(blocks, layout)
    build_s = time.perf_counter() - start
    keys = index.embed(blocks[:, :layout.chunk_tokens])
    queries = index.embed(blocks[rng.integers(0, n_blocks, QUERIES), :layout.chunk_tokens])
    base_t, faiss_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        base_scores, _ = numpy_search(keys, queries, layout.neighbours)
        base_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        faiss_scores, _ = index.index.search(queries, layout.neighbours)
        faiss_t.append(time.perf_counter() - start)
    worst = float(np.abs(base_scores - faiss_scores).max())
    if worst > 1e-5:
        raise AssertionError(f"FAISS and numpy disagree on the top-{layout.neighbours} scores by {worst}")
    ratio = statistics.median(faiss_t) / statistics.median(base_t)
    print(f"{n_blocks} blocks: faiss / numpy = {ratio:.3f} "
          f"(rounds {[round(f / b, 3) for b, f in zip(base_t, faiss_t)]})", flush=True)
    return {"blocks": n_blocks, "queries": QUERIES, "k": layout.neighbours, "dims": layout.dims,
            "index_build_s": build_s, "numpy_s": base_t, "faiss_s": faiss_t, "ratio": ratio,
            "round_ratios": [f / b for b, f in zip(base_t, faiss_t)], "max_score_difference": worst}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    commit, cpu = commit_and_cpu()
    rows = [workload(n, args.repeats) for n in (4442, 44420)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrieval.json").write_text(json.dumps({"commit": commit, "cpu": cpu, "workloads": rows}, indent=2))
    lines = [f"Measured at commit `{commit}` on {cpu}, {args.repeats} alternating rounds.", "",
             "| database blocks | queries | FAISS / numpy search time (median) | rounds | top-k scores agree within |",
             "|---|---|---|---|---|"]
    for r in rows:
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(f"| {r['blocks']} | {r['queries']} | {r['ratio']:.2f}x | {rounds} | "
                     f"{r['max_score_difference']:.1e} |")
    (RESULTS / "retrieval.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'retrieval.md'}")


if __name__ == "__main__":
    main()
