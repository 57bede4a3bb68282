"""select stage: a selector keeps, drops or rewrites training documents; held-out splits pass through.

Scoring selectors stream: ``fit`` once, then score each input shard (in parallel as Prefect
tasks when the stage runs inside a flow), keeping only (score, token count) per document; the
kept rows are written in a second pass, shard by shard. Precision and recall are measured
against the injected-noise labels, which the selector never sees.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch

from prefect.cache_policies import NO_CACHE

from components.data.lm_scoring import check_tokenizer_matches
from components.data.parquet_io import ShardWriter, document_shards, read_documents, read_shard
from components.data.selection_metrics import removal_precision_recall
from components.data.tokenizer import document_token_counts
from components.data.quality_review import borderline
from components.data.selector import (DocumentTransform, ReferenceModel, ScoringSelector, SelectionContext,
                                      SelectionError, blind, budget_mask)
from tasks.engines import ENGINES, engine_module
from tasks.model_io import load_model_artifact, load_tokenizer_artifact


class EmptySelectionError(SelectionError):
    pass


def run(ctx) -> dict:
    selector = ctx.method
    shards = document_shards(ctx.input("docs").path / "docs")
    if isinstance(selector, ScoringSelector):
        keep_ids, train_ids, labels, extra = _run_scoring(ctx, selector, shards)
    else:
        keep_ids, train_ids, labels, extra = _run_whole_table(ctx, selector)
    metrics = {"train_docs_in": len(train_ids), "train_docs_kept": int(np.isin(train_ids, keep_ids).sum())}
    metrics.update(extra)
    pr = removal_precision_recall(labels, np.isin(train_ids, keep_ids))
    metrics.update({f"noise_{k}": v for k, v in pr.items() if isinstance(v, (int, float))})
    metrics.update({f"noise_recall_{k}": v for k, v in pr.get("recall_by_kind", {}).items()})
    metrics.update({f"removed_{k}": v for k, v in selector.stats.items() if isinstance(v, (int, float))})
    metrics.update({k: v for k, v in getattr(selector, "facts", {}).items() if isinstance(v, (int, float))})
    return metrics


def _empty_error(ctx, total: int) -> EmptySelectionError:
    return EmptySelectionError(
        f"stage {ctx.plan.name} ({ctx.plan.method}): no training documents left after selection "
        f"(0 of {total} kept); loosen stages.{ctx.plan.name}.params")


def _run_whole_table(ctx, selector):
    """Mask selectors (they need every document at once, e.g. dedup) and document transforms."""
    docs = read_documents(ctx.input("docs").path / "docs")
    is_train = docs["split"] == "train"
    train = docs[is_train].reset_index(drop=True)
    extra: dict = {}
    if isinstance(selector, DocumentTransform):
        context = _context(ctx, selector, docs)
        out = selector.transform(blind(train), context)
        # ground truth goes back by id; derived rows (``<id>#...``: repeats, rephrasings) inherit
        # their source document's label, so a repeated noise document stays noise
        labels = dict(zip(train["id"], train["noise_label"]))
        if "noise_label" not in out.columns:
            out = out.assign(noise_label=[labels.get(i, labels.get(i.split("#", 1)[0], "")) for i in out["id"]])
        kept = out
        extra = {"train_docs_out": len(out), "train_docs_added": int((~out["id"].isin(train["id"])).sum())}
    else:
        kept = train[selector.select(train)]
    if not isinstance(selector, DocumentTransform):  # no token counts here: shares of documents
        shares = domain_shares(train["domain"].to_numpy(), np.ones(len(train)), train["id"].isin(kept["id"]).to_numpy())
        extra.update({k.replace("_share_", "_doc_share_"): v for k, v in shares.items()})
    if kept.empty:
        raise _empty_error(ctx, len(train))
    writer = ShardWriter(ctx.out_dir / "docs")
    writer.write(pd.concat([kept, docs[~is_train]], ignore_index=True))
    writer.close()
    ctx.facts["rows"] = len(kept) + int((~is_train).sum())
    return kept["id"].to_numpy(), train["id"].to_numpy(), train["noise_label"].tolist(), extra


def domain_shares(domains: np.ndarray, weights: np.ndarray, keep: np.ndarray) -> dict[str, float]:
    """Each domain's share of the pool and of the selection (by tokens when ``weights`` are token
    counts): DSIR-style selectors are judged by how far the target's share rises."""
    out = {}
    for domain in sorted(set(domains.tolist())):
        in_domain = domains == domain
        out[f"pool_share_{domain}"] = float(weights[in_domain].sum() / max(weights.sum(), 1))
        out[f"selected_share_{domain}"] = float(weights[in_domain & keep].sum() / max(weights[keep].sum(), 1))
    return out


def _context(ctx, selector, docs: pd.DataFrame | None = None) -> SelectionContext:
    """Target set, tokenizer and reference models for a selector, checked against its needs."""
    params = selector.params
    stage = f"stage {ctx.plan.name} ({ctx.plan.method})"
    tokenizer = load_tokenizer_artifact(ctx.input("tokenizer")) if ctx.inputs.get("tokenizer") else None
    if (selector.needs_tokenizer or getattr(params, "budget_tokens", None)) and tokenizer is None:
        need = "budget_tokens" if getattr(params, "budget_tokens", None) else "this method"
        raise SelectionError(f"{stage}: {need} needs a `tokenizer` input (a tokenize stage) to count tokens")
    references = []
    for name, art in zip(ctx.plan.inputs.get("reference", []), ctx.inputs.get("reference", [])):
        model, ref_tokenizer, facts = load_model_artifact(art)
        model.eval()
        check_tokenizer_matches(model, tokenizer, f"{stage}: reference {name}")
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SelectionError(f"{stage}: reference {name} was trained with a different tokenizer than the "
                                 f"`tokenizer` input (same size {len(tokenizer)}, different vocabulary)")
        references.append(ReferenceModel(name, model, facts))
    if len(references) < selector.min_references:
        raise SelectionError(f"{stage}: needs at least {selector.min_references} `reference` model input(s), "
                             f"got {len(references)}")
    if not selector.needs_target and (getattr(params, "target_domain", None) or ctx.inputs.get("target")):
        raise SelectionError(f"{stage}: {ctx.plan.method} does not use a target set; remove target_domain / the "
                             f"`target` input from stages.{ctx.plan.name}")
    target = _target_docs(ctx, selector, docs, stage) if selector.needs_target else None
    return SelectionContext(stage=stage, seed=getattr(params, "seed", 0), target=target, tokenizer=tokenizer,
                            references=references, work_dir=ctx.out_dir / "work", progress=ctx.progress)


def _target_docs(ctx, selector, docs: pd.DataFrame | None, stage: str) -> pd.DataFrame:
    params = selector.params
    if ctx.inputs.get("target"):
        source = read_documents(ctx.input("target").path / "docs")
        source = source[source["split"] == params.target_split]  # never the test split the evaluation reads
        where = f"split {params.target_split!r} of the `target` input ({ctx.plan.inputs['target'][0]})"
    else:
        if docs is None:  # one shard in memory at a time
            shards = document_shards(ctx.input("docs").path / "docs")
            frames = (read_shard(s) for s in shards)
            docs = pd.concat([f[f["split"] == params.target_split] for f in frames], ignore_index=True)
        source = docs[docs["split"] == params.target_split]
        where = f"split {params.target_split!r} of the input documents"
        if params.target_domain is None:
            raise SelectionError(f"{stage}: the method needs a target set: set "
                                 f"stages.{ctx.plan.name}.params.target_domain or give a `target` input")
    if params.target_domain is not None:
        domains = sorted(source["domain"].unique())
        source = source[source["domain"] == params.target_domain]
        if source.empty:
            raise SelectionError(f"{stage}: the target set is empty: no documents with domain "
                                 f"{params.target_domain!r} in {where} (its domains: {', '.join(domains) or 'none'})")
    if source.empty:
        raise SelectionError(f"{stage}: the target set is empty ({where} has no documents)")
    if params.target_max_docs and len(source) > params.target_max_docs:
        source = source.sample(n=params.target_max_docs, random_state=params.seed)
    return blind(source.reset_index(drop=True))


def _pool_sample(shards, n: int, seed: int) -> pd.DataFrame:
    """A seeded uniform sample of ``n`` training documents, one shard in memory at a time."""
    rng = np.random.default_rng(seed)
    sizes = [int((read_shard(s)["split"] == "train").sum()) for s in shards]
    total = sum(sizes)
    chosen = np.sort(rng.choice(total, size=min(n, total), replace=False)) if total else np.zeros(0, int)
    parts, offset = [], 0
    for shard, size in zip(shards, sizes):
        local = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        if local.size:
            train = read_shard(shard).query("split == 'train'").reset_index(drop=True)
            parts.append(train.iloc[local])
        offset += size
    return blind(pd.concat(parts, ignore_index=True)) if parts else pd.DataFrame()


def _score_shard(selector: ScoringSelector, shard, tokenizer) -> dict:
    train = read_shard(shard).query("split == 'train'").reset_index(drop=True)
    if train.empty:
        return {"ids": np.zeros(0, object), "scores": np.zeros(0), "tokens": np.zeros(0, np.int64), "labels": [],
                "domains": np.zeros(0, object)}
    if tokenizer is not None:
        tokens = document_token_counts(tokenizer, train["text"])
    else:
        tokens = np.ones(len(train), dtype=np.int64)
    return {"ids": train["id"].to_numpy(), "scores": selector.scores(train), "tokens": tokens,
            "labels": train["noise_label"].tolist(), "domains": train["domain"].to_numpy()}


SHARD_RUNNER_ENV = "PAPERDAG_SHARD_RUNNER"


def shard_task_runner(spec: str | None = None):
    """The Prefect task runner that scores shards, from ``$PAPERDAG_SHARD_RUNNER``:
    ``threads`` or ``threads:N`` (default; local threads), ``dask:<scheduler address>`` or
    ``ray:<address>`` (needs ``prefect-dask`` / ``prefect-ray`` installed)."""
    spec = (spec if spec is not None else os.environ.get(SHARD_RUNNER_ENV, "threads")).strip()
    scheme, _, arg = spec.partition(":")
    if scheme == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        # default: as many shards at once as the cores allow with torch's intra-op threads, so
        # memory stays a few shards and model scorers do not oversubscribe the CPU
        workers = int(arg) if arg else max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))
        return ThreadPoolTaskRunner(max_workers=workers)
    if scheme in ENGINES:
        module = engine_module(scheme, f"{SHARD_RUNNER_ENV}={spec!r}", SelectionError)
        if scheme == "dask":
            return module.DaskTaskRunner(address=arg or None)
        return module.RayTaskRunner(address=arg or None)
    raise SelectionError(f"{SHARD_RUNNER_ENV}={spec!r}: expected threads[:N], dask:<address> or ray:<address>")


def _map_shards(selector, shards, tokenizer) -> list[dict]:
    """Score shards as parallel Prefect tasks inside a flow run, else one after another."""
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None or len(shards) == 1:
        return [_score_shard(selector, s, tokenizer) for s in shards]
    from prefect import task

    score_task = task(_score_shard, name="score-shard", cache_policy=NO_CACHE, persist_result=False)
    with shard_task_runner() as runner:
        futures = [runner.submit(score_task, {"selector": selector, "shard": s, "tokenizer": tokenizer})
                   for s in shards]
        return [f.result() for f in futures]


def _run_scoring(ctx, selector: ScoringSelector, shards):
    params = selector.params
    context = _context(ctx, selector)
    context.pool_sample = _pool_sample(shards, params.fit_sample_docs, params.seed)
    if context.pool_sample.empty:
        raise EmptySelectionError(f"{context.stage}: the input {ctx.plan.inputs['docs'][0]} has no training documents")
    selector.fit(context)
    parts = _map_shards(selector, shards, context.tokenizer)
    ids = np.concatenate([p["ids"] for p in parts])
    scores = np.concatenate([p["scores"] for p in parts])
    tokens = np.concatenate([p["tokens"] for p in parts])
    labels = [label for p in parts for label in p["labels"]]
    domains = np.concatenate([p["domains"] for p in parts])
    keep = budget_mask(scores, tokens, params.budget_tokens, params.keep_fraction, context.stage)
    keep_ids = set(ids[keep])
    score_of = dict(zip(ids, scores))
    column = f"{selector.key}_score"
    queue = _review_queue(selector, ids, scores, keep)  # id -> (score, kept), for a person to label
    queue_rows = []
    writer = ShardWriter(ctx.out_dir / "docs")
    rows = 0
    for shard in shards:  # second pass: kept training rows (with their score) and held-out rows
        frame = read_shard(shard)
        is_train = frame["split"] == "train"
        out = frame[~is_train | frame["id"].isin(keep_ids)].copy()
        out[column] = [score_of.get(i, np.nan) if t else np.nan for i, t in zip(out["id"], out["split"] == "train")]
        writer.write(out)
        rows += len(out)
        if queue:
            for doc in frame[is_train & frame["id"].isin(queue)].itertuples():
                queue_rows.append({"id": doc.id, "domain": doc.domain, "score": float(queue[doc.id][0]),
                                   "kept": bool(queue[doc.id][1]), "label": None, "text": doc.text})
    writer.close()
    ctx.facts.update(rows=rows, selected_tokens=int(tokens[keep].sum()), score_column=column)
    extra = {"selected_tokens": int(tokens[keep].sum()), "pool_tokens": int(tokens.sum()),
             "score_median_kept": float(np.median(scores[keep])), "score_median_pool": float(np.median(scores))}
    shares = domain_shares(domains, tokens, keep)
    if context.tokenizer is None:  # no token counts (tokens are all 1): these are document shares
        shares = {k.replace("_share_", "_doc_share_"): v for k, v in shares.items()}
    extra.update(shares)
    if context.target is not None:
        extra["target_docs"] = len(context.target)
    if getattr(selector, "writes_review_queue", False):
        extra.update(_write_review_queue(ctx.out_dir / REVIEW_QUEUE, queue_rows, selector, ids, labels, keep))
    return ids[keep], ids, labels, extra


REVIEW_QUEUE = "review_queue.jsonl"


def _review_queue(selector, ids: np.ndarray, scores: np.ndarray, keep: np.ndarray) -> dict:
    if not getattr(selector, "writes_review_queue", False):
        return {}
    reviewed = np.isin(ids, list(selector.reviewed_ids()))
    picks = borderline(scores, keep, selector.params.review_size, reviewed)
    return {ids[i]: (scores[i], keep[i]) for i in picks}


def _write_review_queue(path, rows: list[dict], selector, ids: np.ndarray, labels: list[str], keep: np.ndarray) -> dict:
    """The borderline documents for a person (highest score first), and how well the selection
    removes noise among the documents nobody reviewed (what the review taught the classifier)."""
    rows.sort(key=lambda r: -r["score"])
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    unreviewed = ~np.isin(ids, list(selector.labeled_ids()))
    pr = removal_precision_recall([label for label, u in zip(labels, unreviewed) if u], keep[unreviewed])
    return {"review_queue_docs": len(rows), **{f"noise_{k}_unreviewed": pr[k] for k in ("precision", "recall", "f1")}}
