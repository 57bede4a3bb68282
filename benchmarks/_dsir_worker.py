"""One run of the reference DSIR (PyPI ``data-selection``, p-lambda/dsir) for bench_data_selection.py.

Runs with the data-selection venv's python (``bash benchmarks/data_selection_env.sh``), never the
project's: it imports nothing from paperdag. Times ``HashedNgramDSIR.fit_importance_estimator``,
``compute_importance_weights`` and ``resample`` separately (wall and process CPU time, imports
excluded) on one process (``num_proc=1``), then writes the log importance weights (pool order) and
the ids each resample kept to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
from data_selection import HashedNgramDSIR  # noqa: E402


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def kept_ids(out_dir: Path) -> list[str]:
    ids = []
    for path in sorted(out_dir.glob("*.jsonl")):
        with open(path) as f:
            ids += [json.loads(line)["id"] for line in f if line.strip()]
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-buckets", type=int, default=10_000)
    ap.add_argument("--ngrams", type=int, default=2)
    ap.add_argument("--min-example-length", type=int, default=100)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    dsir = HashedNgramDSIR(raw_datasets=[str(args.pool)], target_datasets=[str(args.target)],
                           cache_dir=str(args.work / "cache"), num_proc=1, ngrams=args.ngrams,
                           num_buckets=args.num_buckets, tokenizer="wordpunct",
                           min_example_length=args.min_example_length)
    fit_s, fit_cpu_s = timed(lambda: dsir.fit_importance_estimator(num_tokens_to_fit="auto"))
    weights_s, weights_cpu_s = timed(dsir.compute_importance_weights)
    resample_s, resample_cpu_s = timed(
        lambda: dsir.resample(out_dir=str(args.work / "top_k"), num_to_sample=args.k, top_k=True))
    np.random.seed(args.seed)  # the reference draws its Gumbel noise from the global numpy RNG
    dsir.resample(out_dir=str(args.work / "gumbel"), num_to_sample=args.k, top_k=False)
    log_weights = np.load(str(Path(dsir.log_importance_weights_dir) / "0.npy"))
    result = {
        "fit_s": fit_s, "fit_cpu_s": fit_cpu_s, "weights_s": weights_s, "weights_cpu_s": weights_cpu_s,
        "resample_s": resample_s, "resample_cpu_s": resample_cpu_s,
        "log_weights": log_weights.tolist(),
        "kept_top_k": kept_ids(args.work / "top_k"), "kept_gumbel": kept_ids(args.work / "gumbel"),
        "kl_target_raw": float(np.sum(dsir.target_probs[dsir.target_probs > 0]
                                      * dsir.log_diff[dsir.target_probs > 0])),
    }
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
