"""Data-selection speed: paperdag's scorers vs the reference DSIR (PyPI ``data-selection``), one core each.

The corpus is the quickstart's (``StandardCorpus`` with ``params/quickstart.yaml``'s ``data:`` and
seed): the pool is its train split (noise included, ``noise_label`` hidden from the scorers), the
target set its validation documents of the ``prose`` domain. The reference DSIR
(``HashedNgramDSIR``, p-lambda/dsir) lives in its own venv (``bash
benchmarks/data_selection_env.sh``) and runs in a fresh subprocess per repeat
(``benchmarks/_dsir_worker.py``) on the same documents written to JSON lines, with the same
``num_buckets``, n-gram order and ``min_example_length`` and ``num_proc=1``.

Measured:

- per row of ``ROWS`` (every ``ScoringSelector`` of ``SELECTORS``: DSIR, random, lexicon score,
  GOT-D on hashed n-grams and on reference-model embeddings, perplexity filter, PreSelect,
  SnowCoder, Instruction Mining): ``score_rate`` times ``fit`` + ``score`` over the whole pool
  (wall and process CPU time; ``pool_sample`` = the whole pool, as the reference fits its raw
  side on all of it), median of ``--repeats`` (a row may run fewer: its ``repeats``); each row
  uses its method's default parameters except where its note says; documents per second, and the
  ratio to the reference DSIR's
  ``fit_importance_estimator`` + ``compute_importance_weights`` (the same work: fit both
  distributions, then a log weight per document). The reference's ``resample`` (which also
  rewrites the kept documents to disk) is reported separately, and as a full-pipeline ratio.
  Repeats alternate which side runs first, so load on the shared core hits both.
- agreement at the same k (``--keep-fraction`` of the pool): Jaccard overlap of our and the
  reference's top-k selections (``top_k=True`` on both sides: deterministic), the target-domain
  (and injected-noise) fraction of each, Spearman correlation of the two log weights; the same
  fractions for the Gumbel resampling of both sides (ours seeded per document, theirs from
  ``np.random.seed``), whose overlap is random by design.

Reference models (the rows that score with a model): set up once before any timing, as the
upstream stages of a selection recipe would produce them. A byte-level BPE tokenizer (vocabulary
4096, the recipes' ``tokenize_pool``) is trained on the pool, and three ``micro_student`` models
(the selection recipes' preset, context 128 as their ``seq_len``) are trained on it with a plain
seeded AdamW loop for ``--ref-steps`` steps: on the pool's ``prose``, on the whole pool and on its
``code`` documents (the PreSelect ladder; the prose model is the perplexity filter's reference, as
in ``params/perplexity_filter.yaml``, the pool model everyone else's). So brief a training makes
poor models, which does not matter here: the time per document depends on the model's size and
the tokens scored, hardly on its weights.

    bash benchmarks/data_selection_env.sh
    taskset -c 1 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_data_selection.py
    -> benchmarks/results/data_selection.json

``--only NAME ...`` runs only those rows besides the two DSIR rows (the agreement metrics need them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.data.byte_bpe import ByteBpeTokenizer  # noqa: E402
from components.data.dsir import DSIR  # noqa: E402
from components.data.got_d import GotD  # noqa: E402
from components.data.instruction_mining import InstructionMining  # noqa: E402
from components.data.lexicon_score import LexiconScore  # noqa: E402
from components.data.perplexity_filter import PerplexityFilter  # noqa: E402
from components.data.preselect import PreSelect  # noqa: E402
from components.data.random_selection import RandomSelection  # noqa: E402
from components.data.selector import (ReferenceModel, ScoringSelector, SelectionContext, blind,  # noqa: E402
                                      budget_mask)
from components.data.snowcoder import SnowCoder  # noqa: E402
from components.data.standard_corpus import StandardCorpus  # noqa: E402
from components.data.tokenizer import pack_documents  # noqa: E402
from components.model.presets import PRESETS, build_model, count_params  # noqa: E402

WORKER = ROOT / "benchmarks" / "_dsir_worker.py"
DSIR_PY = ROOT / "benchmarks" / "_work" / "dsir-venv" / "bin" / "python"
WORK = ROOT / "benchmarks" / "_work" / "dsir-bench"
RESULT = ROOT / "benchmarks" / "results" / "data_selection.json"


@dataclass
class Bench:
    """The corpus every row is measured on."""

    pool: pd.DataFrame  # train split, with domain and noise_label for scoring the selections
    target: pd.DataFrame  # blind target documents
    keep_fraction: float
    num_buckets: int
    min_example_length: int
    seed: int
    tokenizer: Any = None  # set by prepare_models, for the rows that score with a model
    references: dict[str, ReferenceModel] | None = None

    def context(self, **overrides) -> SelectionContext:
        """The select stage's context: target set, and the whole pool as the fit sample."""
        fields = dict(stage="bench", seed=self.seed, target=self.target, pool_sample=blind(self.pool))
        fields.update(overrides)
        return SelectionContext(**fields)

    def model_context(self, names: tuple[str, ...]) -> SelectionContext:
        """``context`` with the tokenizer and the named reference models, in that order."""
        return self.context(tokenizer=self.tokenizer, references=[self.references[n] for n in names])


@dataclass
class Row:
    """One scorer: ``make`` builds a fresh (selector, context) for each repeat."""

    name: str
    make: Callable[[Bench], tuple[ScoringSelector, SelectionContext]]
    note: str = ""
    references: tuple[str, ...] = ()  # reference models (of REFERENCE_MODELS) the row scores with
    repeats: int | None = None  # at most this many repeats (a slow row); None: --repeats


def _dsir(top_k: bool):
    def make(b: Bench):
        params = DSIR.Params(keep_fraction=b.keep_fraction, num_buckets=b.num_buckets, top_k=top_k,
                             min_example_length=b.min_example_length, seed=b.seed)
        return DSIR(params), b.context()
    return make


def _scorer(cls: type[ScoringSelector], references: tuple[str, ...] = (), **params):
    """A row's ``make``: ``cls`` with its default parameters but ``params``, on the shared bench."""
    def make(b: Bench):
        p = cls.Params(keep_fraction=b.keep_fraction, seed=b.seed, **params)
        return cls(p), (b.model_context(references) if references else b.context())
    return make


#: the reference models trained before timing: name -> the pool domain it trains on (None: all)
REFERENCE_MODELS = {"prose": "prose", "pool": None, "code": "code"}
REFERENCE_PRESET = "micro_student"  # the selection recipes' model
MODEL_NOTE = (f"{REFERENCE_PRESET} reference ({{refs}}); its size, not its quality, sets the speed")
IM_SETTINGS = dict(n_subsets=12, finetune_steps=5)  # defaults 24 and 20: 12 is the fewest the rule allows

ROWS = [
    Row("dsir_top_k", _dsir(top_k=True), "paperdag DSIR, deterministic top-k"),
    Row("dsir_gumbel", _dsir(top_k=False), "paperdag DSIR, Gumbel resampling (per-document noise)"),
    Row("random", _scorer(RandomSelection), "uniform random baseline (seeded per-document draw)"),
    Row("lexicon_score", _scorer(LexiconScore), "share of words from the built-in lexicon (regex words)"),
    Row("got_d_hashed_ngrams", _scorer(GotD, embedding="hashed_ngrams"),
        "GOT-D on hashed n-gram TF-IDF vectors (4096 buckets), exact OT pool sample x target"),
    Row("got_d_reference", _scorer(GotD, ("pool",), embedding="reference"),
        "GOT-D on mean-pooled states (256 tokens/doc), exact OT; " + MODEL_NOTE.format(refs="pool"),
        references=("pool",)),
    Row("perplexity_filter", _scorer(PerplexityFilter, ("prose",)),
        "mean token loss, 256 tokens/doc; " + MODEL_NOTE.format(refs="prose"), references=("prose",)),
    Row("preselect", _scorer(PreSelect, ("prose", "pool", "code")),
        "fit: 3 models' losses on pool + target, hashed n-gram classifier; score: the classifier; "
        + MODEL_NOTE.format(refs="ladder of 3: prose, pool, code"), references=("prose", "pool", "code")),
    Row("snowcoder", _scorer(SnowCoder, ("pool",)),
        "fit: embed target + pool (top/middle/bottom chunks of 127 tokens, the model's context), logistic "
        "head; score: embed pool again; "
        + MODEL_NOTE.format(refs="pool"), references=("pool",)),
    Row("instruction_mining", _scorer(InstructionMining, ("pool",), **IM_SETTINGS),
        f"n_subsets={IM_SETTINGS['n_subsets']}, finetune_steps={IM_SETTINGS['finetune_steps']} (defaults 24, 20), "
        "other params default; fit: indicators (loss + embedding, 128 tokens/doc) of 1024 docs, n_subsets "
        "fine-tuned copies; score: indicators of the pool; " + MODEL_NOTE.format(refs="pool"), references=("pool",)),
    Row("instruction_mining_defaults", _scorer(InstructionMining, ("pool",)),
        "as instruction_mining with the recipe's defaults: n_subsets=24, finetune_steps=20", references=("pool",)),
]


def prepare_models(bench: Bench, steps: int, batch_size: int, lr: float, seq_len: int, vocab_size: int) -> dict:
    """Trains the tokenizer and ``REFERENCE_MODELS`` (not timed as a row: upstream stages' work)."""
    t0 = time.perf_counter()
    texts = bench.pool["text"].tolist()
    bench.tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=vocab_size, seq_len=seq_len)).train(texts)
    info = {"tokenizer": {"method": "byte_bpe", "vocab_size": len(bench.tokenizer), "seq_len": seq_len,
                          "trained_on": "pool", "train_s": time.perf_counter() - t0},
            "preset": REFERENCE_PRESET, "preset_config": PRESETS[REFERENCE_PRESET], "steps": steps,
            "batch_size": batch_size, "lr": lr, "optimizer": "AdamW (torch), constant lr", "models": {}}
    bench.references = {}
    for i, (name, domain) in enumerate(REFERENCE_MODELS.items()):
        t0 = time.perf_counter()
        docs = bench.pool if domain is None else bench.pool[bench.pool["domain"] == domain]
        blocks = torch.from_numpy(pack_documents(bench.tokenizer, docs["text"].tolist(), seq_len).astype(np.int64))
        seed = bench.seed + i
        model = build_model(REFERENCE_PRESET, len(bench.tokenizer), seq_len, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        rng = np.random.default_rng(seed)
        model.train()
        losses = []
        for _ in range(steps):
            batch = blocks[rng.integers(len(blocks), size=batch_size)]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        bench.references[name] = ReferenceModel(name=name, model=model)
        info["models"][name] = {"trained_on": domain or "whole pool", "blocks": int(len(blocks)), "seed": seed,
                                "params": count_params(model), "first_loss": losses[0], "last_loss": losses[-1],
                                "train_s": time.perf_counter() - t0}
        print(f"  reference model {name}: {count_params(model):,} params, loss {losses[0]:.2f} -> {losses[-1]:.2f} "
              f"in {steps} steps ({time.perf_counter() - t0:.0f} s)", flush=True)
    return info


def score_rate(selector: ScoringSelector, context: SelectionContext, docs: pd.DataFrame) -> dict:
    """Times ``fit(context)`` + ``scores(docs)`` (wall and process CPU): seconds and documents/s."""
    w0, c0 = time.perf_counter(), time.process_time()
    selector.fit(context)
    w1, c1 = time.perf_counter(), time.process_time()
    scores = selector.scores(docs)
    w2, c2 = time.perf_counter(), time.process_time()
    return {"fit_s": w1 - w0, "fit_cpu_s": c1 - c0, "score_s": w2 - w1, "score_cpu_s": c2 - c1,
            "total_s": w2 - w0, "total_cpu_s": c2 - c0, "docs_per_s": len(docs) / (w2 - w0),
            "docs_per_cpu_s": len(docs) / (c2 - c0), "scores": scores}


def build_bench(args) -> Bench:
    recipe = yaml.safe_load((ROOT / "params" / "quickstart.yaml").read_text())
    docs = StandardCorpus(StandardCorpus.Params(**recipe["data"], seed=recipe.get("seed", 0))).build()
    pool = docs[docs["split"] == "train"].reset_index(drop=True)
    target = docs[(docs["split"] == "validation") & (docs["domain"] == args.target_domain)]
    return Bench(pool=pool, target=blind(target.reset_index(drop=True)), keep_fraction=args.keep_fraction,
                 num_buckets=args.num_buckets, min_example_length=args.min_example_length, seed=args.seed)


def write_jsonl(frame: pd.DataFrame, path: Path) -> None:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(frame["id"], frame["text"])))


def run_reference(args, bench: Bench, k: int, repeat: int) -> dict:
    out = WORK / f"reference_{repeat}.json"
    cmd = [str(DSIR_PY), str(WORKER), "--pool", str(WORK / "pool.jsonl"), "--target", str(WORK / "target.jsonl"),
           "--work", str(WORK / f"reference_{repeat}"), "--out", str(out), "--num-buckets", str(bench.num_buckets),
           "--min-example-length", str(bench.min_example_length), "--k", str(k), "--seed", str(bench.seed)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    w0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reference DSIR worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - w0
    return result


def fractions(pool: pd.DataFrame, keep: np.ndarray, target_domain: str) -> dict:
    kept = pool[keep]
    return {"target_fraction": float((kept["domain"] == target_domain).mean()),
            "noise_fraction": float((kept["noise_label"] != "").mean()),
            "domains": {str(d): int(n) for d, n in kept["domain"].value_counts().items()}}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def median(xs):
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep-fraction", type=float, default=0.1)
    ap.add_argument("--num-buckets", type=int, default=10_000)
    ap.add_argument("--min-example-length", type=int, default=100, help="the reference's default")
    ap.add_argument("--target-domain", default="prose")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=1, help="pin this process and the workers to this core")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--only", nargs="+", metavar="ROW", help="run only these rows besides the DSIR rows")
    ap.add_argument("--ref-steps", type=int, default=40, help="AdamW steps of each reference model")
    ap.add_argument("--ref-batch-size", type=int, default=16)
    ap.add_argument("--ref-lr", type=float, default=2e-3, help="the selection recipes' pretraining lr")
    ap.add_argument("--seq-len", type=int, default=128, help="tokenizer seq_len and model context (the recipes')")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})  # the workers inherit it: one core each, never both at once
    torch.set_num_threads(1)
    if not DSIR_PY.exists():
        sys.exit(f"{DSIR_PY} missing: run `bash benchmarks/data_selection_env.sh` first")
    rows = ROWS
    if args.only:
        unknown = sorted(set(args.only) - {row.name for row in ROWS})
        if unknown:
            sys.exit(f"--only: unknown rows {unknown}; rows: {[row.name for row in ROWS]}")
        rows = [row for row in ROWS if row.name in set(args.only) | {"dsir_top_k", "dsir_gumbel"}]

    bench = build_bench(args)
    pool, n = bench.pool, len(bench.pool)
    WORK.mkdir(parents=True, exist_ok=True)
    write_jsonl(pool, WORK / "pool.jsonl")
    write_jsonl(bench.target, WORK / "target.jsonl")
    k = int(budget_mask(np.zeros(n), np.ones(n), None, args.keep_fraction, "bench").sum())
    print(f"pool {n} docs ({(pool['domain'] == args.target_domain).mean():.3f} {args.target_domain}), "
          f"target {len(bench.target)} docs, k={k}", flush=True)
    models = None
    if any(row.references for row in rows):
        models = prepare_models(bench, args.ref_steps, args.ref_batch_size, args.ref_lr, args.seq_len,
                                args.vocab_size)

    runs: dict[str, list[dict]] = {row.name: [] for row in rows}
    reference: list[dict] = []
    for repeat in range(args.repeats):
        order = ["ours", "reference"] if repeat % 2 == 0 else ["reference", "ours"]
        for side in order:
            if side == "reference":
                reference.append(run_reference(args, bench, k, repeat))
                r = reference[-1]
                print(f"  [{repeat}] reference: fit {r['fit_s']:.2f} s + weights {r['weights_s']:.2f} s + "
                      f"resample {r['resample_s']:.2f} s", flush=True)
                continue
            for row in rows:
                if row.repeats is not None and repeat >= row.repeats:
                    continue
                selector, context = row.make(bench)
                m = score_rate(selector, context, pool)
                m["facts"] = {name: float(v) for name, v in getattr(selector, "facts", {}).items()}
                runs[row.name].append(m)
                print(f"  [{repeat}] {row.name}: fit {m['fit_s']:.3f} s + score {m['score_s']:.3f} s "
                      f"= {m['docs_per_s']:.0f} docs/s", flush=True)

    ref_fit_weights = [r["fit_s"] + r["weights_s"] for r in reference]
    ref_fit_weights_cpu = [r["fit_cpu_s"] + r["weights_cpu_s"] for r in reference]
    ref_full = [r["fit_s"] + r["weights_s"] + r["resample_s"] for r in reference]
    ref_rate, ref_rate_cpu = n / median(ref_fit_weights), n / median(ref_fit_weights_cpu)
    rows_out = []
    for row in rows:
        ms = runs[row.name]
        total, total_cpu = median([m["total_s"] for m in ms]), median([m["total_cpu_s"] for m in ms])
        rows_out.append({
            "name": row.name, "method": row.make(bench)[0].key, "note": row.note, "repeats": len(ms),
            "reference_models": list(row.references), "fit_s_median": median([m["fit_s"] for m in ms]),
            "score_s_median": median([m["score_s"] for m in ms]), "total_s": [m["total_s"] for m in ms],
            "total_cpu_s": [m["total_cpu_s"] for m in ms], "docs_per_s": n / total, "docs_per_cpu_s": n / total_cpu,
            "ratio_docs_per_s_over_reference": (n / total) / ref_rate,
            "ratio_docs_per_cpu_s_over_reference": (n / total_cpu) / ref_rate_cpu,
            "repeats_identical": all(np.array_equal(ms[0]["scores"], m["scores"]) for m in ms),
            "facts": ms[-1]["facts"]})

    # agreement at the same k, on the last repeat of each side
    ids = pool["id"].to_numpy()
    last = reference[-1]
    ours_top = runs["dsir_top_k"][-1]["scores"]
    ours_gumbel = runs["dsir_gumbel"][-1]["scores"]
    keep_ours = budget_mask(ours_top, np.ones(n), None, args.keep_fraction, "bench")
    keep_ours_gumbel = budget_mask(ours_gumbel, np.ones(n), None, args.keep_fraction, "bench")
    keep_ref = np.isin(ids, last["kept_top_k"])
    keep_ref_gumbel = np.isin(ids, last["kept_gumbel"])
    selector, _ = ROWS[0].make(bench)
    selector.fit(bench.context())
    ours_log_w, words = selector.log_weights(pool)
    ref_log_w = np.asarray(last["log_weights"])
    long_docs = words >= bench.min_example_length
    agreement = {
        "k": k,
        "pool_target_fraction": float((pool["domain"] == args.target_domain).mean()),
        "pool_noise_fraction": float((pool["noise_label"] != "").mean()),
        "long_docs": int(long_docs.sum()),
        "top_k_jaccard": jaccard(set(ids[keep_ours]), set(ids[keep_ref])),
        "top_k_ours": fractions(pool, keep_ours, args.target_domain),
        "top_k_reference": fractions(pool, keep_ref, args.target_domain),
        "gumbel_jaccard": jaccard(set(ids[keep_ours_gumbel]), set(ids[keep_ref_gumbel])),
        "gumbel_ours": fractions(pool, keep_ours_gumbel, args.target_domain),
        "gumbel_reference": fractions(pool, keep_ref_gumbel, args.target_domain),
        "spearman_log_weights_all": float(spearmanr(ours_log_w, ref_log_w).statistic),
        "spearman_log_weights_long_docs": float(spearmanr(ours_log_w[long_docs], ref_log_w[long_docs]).statistic),
        "kl_target_raw_ours": selector.facts["kl_target_raw"],
        "kl_target_raw_reference": last["kl_target_raw"],
        "reference_top_k_repeats_identical": all(sorted(r["kept_top_k"]) == sorted(last["kept_top_k"])
                                                  for r in reference),
    }
    versions = subprocess.run([str(DSIR_PY), "-c", "import importlib.metadata as m, numpy, nltk; "
                               "print(m.version('data-selection'), numpy.__version__, nltk.__version__)"],
                              capture_output=True, text=True).stdout.split()
    result = {
        "what": "documents/s of fit + score on one core: paperdag scorers vs the reference DSIR "
                "(data-selection HashedNgramDSIR fit_importance_estimator + compute_importance_weights)",
        "corpus": {"recipe": "params/quickstart.yaml data:", "pool_docs": n, "target_docs": len(bench.target),
                   "target": f"validation split, domain {args.target_domain}",
                   "pool_domains": {str(d): int(c) for d, c in pool["domain"].value_counts().items()}},
        "settings": {"num_buckets": bench.num_buckets, "ngrams": 2, "min_example_length": bench.min_example_length,
                     "keep_fraction": args.keep_fraction, "seed": bench.seed, "repeats": args.repeats,
                     "cpu": args.cpu, "num_proc_reference": 1},
        "reference": {
            "package": "data-selection", "version": versions[0] if versions else None,
            "numpy": versions[1] if len(versions) > 1 else None, "nltk": versions[2] if len(versions) > 2 else None,
            "fit_s": [r["fit_s"] for r in reference], "weights_s": [r["weights_s"] for r in reference],
            "resample_s": [r["resample_s"] for r in reference],
            "fit_weights_cpu_s": ref_fit_weights_cpu, "process_s": [r["process_s"] for r in reference],
            "docs_per_s": ref_rate, "docs_per_cpu_s": ref_rate_cpu,
            "full_pipeline_docs_per_s": n / median(ref_full)},
        "rows": rows_out,
        "reference_models": models,
        "agreement": agreement,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
                    "platform": platform.platform(), "cpus_visible": os.cpu_count()},
        "command": "taskset -c 1 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "
                   ".venv/bin/python benchmarks/bench_data_selection.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in rows_out:
        print(f"{r['name']}: {r['docs_per_s']:.0f} docs/s, x{r['ratio_docs_per_s_over_reference']:.3g} the reference "
              f"({ref_rate:.0f} docs/s); CPU x{r['ratio_docs_per_cpu_s_over_reference']:.3g}")
    a = agreement
    print(f"top-k (k={k}) Jaccard {a['top_k_jaccard']:.3f}; target fraction ours "
          f"{a['top_k_ours']['target_fraction']:.3f} vs reference {a['top_k_reference']['target_fraction']:.3f} "
          f"(pool {a['pool_target_fraction']:.3f}); Spearman {a['spearman_log_weights_all']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
