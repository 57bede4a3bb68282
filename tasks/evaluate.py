"""evaluate stage: measure every input model, then check the recipe's claims.

Writes ``metrics.json`` (per-model metrics and claim results) and ``report.md``.
"""
from __future__ import annotations

import html
import json
import logging
import math

import numpy as np

from components.data.parquet_io import read_documents
from components.distill.eft import EftModel
from components.eval import report_plots
from components.eval.claims import Claim, SeedPlan, check_claims, verdict_label
from components.eval.summary import scored_blocks
from components.eval.rank_agreement import agreement_scores, correlation_scores, rank_agreement
from components.eval.scaling_fit import claim_metrics, fit_points, fit_scaling_law, write_fit_plot
from components.eval.stability import claim_values as stability_claim_values, group_stability
from components.eval.sweep_plot import sweep_points, write_sweep_plot
from components.eval.lm_eval_task import arithmetic_examples
from components.train.trainer import MODEL_FILE, load_weights
from tasks.eval_cache import cached_evaluation
from tasks.model_io import (LOSS_CURVE, SIDE_MODULES, check_model_tokenizer, load_model_artifact,
                            load_tokenizer_artifact, read_model_facts)
from tasks.artifacts import STAGE_METRICS

FACT_METRICS = ("train_flops", "train_tokens", "steps", "final_loss", "trainable_params", "optimizer_state_bytes",
                "block_matrix_state_bytes", "block_params", "block_params_final", "block_params_avg")
FACT_PREFIXES = ("sampler_", "val_loss_", "format_", "stability_")  # numeric facts of a training sampler,
# monitor, number format or the run's stability, copied as they are
EFT_ROLES = ("eft_large_base", "eft_small_ft", "eft_small_base")
# HFLM warns on every in-memory model it wraps; the evaluate stage always passes one on purpose.
logging.getLogger("lm_eval").setLevel(logging.ERROR)


def run(ctx) -> dict:
    tokens = ctx.input("tokens")
    domains = sorted(p.stem.removeprefix("test-") for p in tokens.path.glob("test-*.npy"))
    blocks = {d: np.load(tokens.path / f"test-{d}.npy") for d in domains}
    heldout = read_documents(tokens.path / "heldout")
    examples = arithmetic_examples(heldout[(heldout["split"] == "test") & (heldout["domain"] == "arithmetic")]["text"].tolist())
    evaluator = ctx.method
    extra = _extra_inputs(evaluator, tokens.path, heldout)
    per_model: dict[str, dict] = {}
    curves: dict[str, dict] = {}  # the evaluated models that a training stage made: loss by step
    reused = 0
    # Name models by this recipe's stage names: an artifact shared with another recipe (same
    # digest) carries the stage name of whichever recipe built it first.
    test_tokenizer = load_tokenizer_artifact(tokens)
    for name, art in zip(ctx.plan.inputs.get("models", []), ctx.inputs.get("models", [])):
        check_model_tokenizer(art.path, test_tokenizer, f"stage {ctx.plan.name}: model {name!r} ({art.path}) "
                                                        f"on the test tokens of stage {ctx.plan.inputs['tokens'][0]}")
        facts = read_model_facts(art)
        if (art.path / LOSS_CURVE).exists():
            curves[name] = json.loads((art.path / LOSS_CURVE).read_text())

        def score(work_dir, art=art, facts=facts) -> dict:
            return _score_model(ctx, evaluator, art, facts, blocks, examples, extra, work_dir,
                                quant_meta=facts.get("quantization"))

        m, was_cached = cached_evaluation(ctx.workspace.artifacts, evaluator, art, tokens, ctx.out_dir / name, score)
        reused += was_cached
        m.update({k: facts[k] for k in FACT_METRICS if k in facts})
        m.update(prefixed_fact_metrics(facts))
        per_model[name] = m
        if getattr(evaluator.params, "checkpoints", False):
            per_model.update(_score_kept_checkpoints(ctx, evaluator, name, art, facts, blocks, examples, extra))
    if reused:
        print(f"{ctx.plan.name}: reused the cached evaluation of {reused} of {len(per_model)} models "
              f"(same model, test data, evaluator and code)", flush=True)
    ctx.facts["evaluations_reused"] = reused
    eft_roles = [r for r in EFT_ROLES if r in ctx.inputs]
    if eft_roles:
        if len(eft_roles) != len(EFT_ROLES):
            raise ValueError(f"stage {ctx.plan.name}: EFT needs all of {', '.join(EFT_ROLES)}; got {', '.join(eft_roles)}")
        loaded = [load_model_artifact(ctx.input(r), activation_hooks=True, keeps=SIDE_MODULES) for r in EFT_ROLES]
        eft = EftModel(*(m for m, _, _ in loaded), beta=evaluator.params.eft_beta, tokenizers=[t for _, t, _ in loaded])
        eft.eval()
        per_model["eft"] = _without_attention_probes(evaluator).evaluate(eft, loaded[0][1], None, blocks, examples, ctx.out_dir / "eft",
                                              progress=ctx.progress, **extra)
    if not per_model:
        raise ValueError(f"stage {ctx.plan.name}: nothing to evaluate; give `inputs.models` or the three EFT inputs")
    claims = [Claim.model_validate(c) for c in ctx.plan.options.get("claims", [])]
    seeds = ctx.plan.options.get("seeds")
    upstream = _upstream_metrics(ctx)
    fits = _scaling_fits(ctx, evaluator, per_model)
    agreements = _rank_agreements(ctx, evaluator, per_model)
    stability = _stability_groups(ctx, evaluator, per_model)
    results = check_claims(claims, {**upstream, **{n: {**upstream.get(n, {}), **m} for n, m in per_model.items()},
                                    **{name: claim_metrics(fit["result"]) for name, fit in fits.items()},
                                    **{name: a["result"] for name, a in agreements.items()},
                                    **{name: stability_claim_values(g) for name, g in stability.items()}},
                           SeedPlan(seeds["seeds"], seeds["expanded"]) if seeds else None)
    report = {"models": per_model, "domains": [d for d in domains if len(blocks[d])], "claims": results,
              "arith_examples": len(examples), "training_curves": curves}
    if agreements:
        report["rank_agreements"] = agreements
    if stability:
        report["stability"] = stability
    if fits:
        report["scaling_fits"] = {name: {**fit["result"].as_dict(), "points": fit["points"], "figure": fit["figure"]}
                                  for name, fit in fits.items()}
    plot = getattr(evaluator.params, "plot", None)
    if plot is not None:
        report["sweep"] = {"metric": plot.metric, "x_label": plot.x_label, "points": sweep_points(plot, per_model),
                           "figure": f"{plot.name}.png"}
        write_sweep_plot(plot, report["sweep"]["points"], ctx.out_dir, f"{ctx.recipe.name}: {plot.metric}")
    figures = _figures(report, ctx.out_dir)
    (ctx.out_dir / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    (ctx.out_dir / "report.md").write_text(_markdown(ctx.recipe, report, figures))
    (ctx.out_dir / "report.html").write_text(_html(ctx.recipe, report, figures))
    flat = {f"{model}.{k}": v for model, m in per_model.items() for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
    flat.update({f"fit.{name}.{k}": v for name, fit in fits.items() for k, v in claim_metrics(fit["result"]).items()
                 if math.isfinite(v)})
    flat.update({f"ranks.{name}.{k}": v for name, a in agreements.items() for k, v in a["result"].items()
                 if math.isfinite(v)})
    flat.update({f"stability.{name}.{k}": v for name, g in stability.items()
                 for k, v in stability_claim_values(g).items()})
    flat.update({f"claim.{c['name']}": float(c["passed"]) for c in results})
    flat["claims_passed"] = sum(c["passed"] for c in results)
    flat["claims_reproduced"] = sum(c["reproduced"] for c in results)
    flat["claims_not_discriminating"] = sum(c["verdict"] == "NOT DISCRIMINATING" for c in results)
    flat["claims_accounting"] = sum(c["kind"] == "accounting" for c in results)
    flat["claims_total"] = len(results)
    ctx.facts["claims"] = {c["name"]: c["verdict"] + (" (accounting)" if c["kind"] == "accounting" else "")
                           for c in results}
    return flat


def _without_attention_probes(evaluator):
    """``evaluator`` without its ``attention_kl_maps``, for the EFT ensemble: those probes swap one
    model's attention layers, and the ensemble has none of its own (its members are scored apart)."""
    if not getattr(evaluator.params, "attention_kl_maps", ()):
        return evaluator
    return type(evaluator)(evaluator.params.model_copy(update={"attention_kl_maps": ()}))


def checkpoint_label(model: str, fraction: float) -> str:
    """``pretrain_dense_at30``: the model at 30% of its training (a name MLflow accepts in metric keys)."""
    return f"{model}_at{round(100 * fraction)}"


def _score_model(ctx, evaluator, art, facts: dict, blocks, examples, extra, work_dir, quant_meta: dict | None = None,
                 weights=None) -> dict:
    """The evaluator's scores of the artifact's model, or of ``weights`` (a safetensors file) in its config."""
    model, tokenizer, _ = load_model_artifact(art, activation_hooks=True, keeps=SIDE_MODULES, encoder_ok=True)
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    model_extra = {"facts": facts} if getattr(evaluator, "needs_model_facts", False) else {}
    return evaluator.evaluate(model, tokenizer, art.path, blocks, examples, work_dir, quant_meta=quant_meta,
                              progress=ctx.progress, **extra, **model_extra)


def _score_kept_checkpoints(ctx, evaluator, name: str, art, facts: dict, blocks, examples, extra) -> dict[str, dict]:
    """Each checkpoint the model's training stage kept (``keep_checkpoints``), scored like the model
    itself: its weights in the artifact's config. Not cached apart from the stage: a sweep is
    rescored when the evaluate stage reruns."""
    out = {}
    for kept in facts.get("kept_checkpoints", []):
        label = checkpoint_label(name, kept["fraction"])
        m = _score_model(ctx, evaluator, art, facts, blocks, examples, extra, ctx.out_dir / label,
                         weights=art.path / kept["path"] / MODEL_FILE)
        out[label] = {**m, "checkpoint_of": name, "checkpoint_step": kept["step"],
                      "checkpoint_fraction": kept["fraction"]}
    return out


def _scaling_fits(ctx, evaluator, per_model: dict[str, dict]) -> dict[str, dict]:
    """Each ``params.fits`` law fitted across the evaluated models, with its plot in the artifact."""
    out = {}
    for spec in getattr(evaluator.params, "fits", None) or []:
        where = f"stage {ctx.plan.name}: params.fits[{spec.name}]"
        try:
            x, y = fit_points(spec, per_model)
            holdout = fit_points(spec, per_model, spec.holdout) if spec.holdout else None
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        result = fit_scaling_law(spec.law, x, y, spec.bootstrap, spec.seed, where=where, holdout=holdout)
        figure = write_fit_plot(spec, x, y, result, ctx.out_dir, f"{ctx.recipe.name}: {spec.name}", holdout)
        points = {"models": spec.models, "x": x, spec.metric: y}
        if holdout:
            points["holdout"] = {"models": spec.holdout, "x": holdout[0], spec.metric: holdout[1]}
        out[spec.name] = {"result": result, "figure": figure.name, "points": points}
    return out


def _rank_agreements(ctx, evaluator, per_model: dict[str, dict]) -> dict[str, dict]:
    """Each ``params.rank_agreements`` entry (the runs' early-checkpoint and final scores) and each
    ``params.correlations`` entry (two metrics across runs): Spearman's rho with its interval and
    permutation null."""
    out = {}
    for spec in getattr(evaluator.params, "rank_agreements", None) or []:
        try:
            early, final = agreement_scores(spec, per_model, checkpoint_label)
            result = rank_agreement(early, final, spec.bootstrap, spec.permutations, spec.seed)
        except ValueError as error:
            raise ValueError(f"stage {ctx.plan.name}: params.rank_agreements[{spec.name}]: {error}") from None
        out[spec.name] = {"result": result, "title": f"{spec.metric} at {round(100 * spec.at)}% of training vs final",
                          "columns": ["early", "final"], "runs": spec.models, "values": [early, final]}
    for spec in getattr(evaluator.params, "correlations", None) or []:
        try:
            x, y, given = correlation_scores(spec, per_model)
            result = rank_agreement(x, y, spec.bootstrap, spec.permutations, spec.seed, given=given)
        except ValueError as error:
            raise ValueError(f"stage {ctx.plan.name}: params.correlations[{spec.name}]: {error}") from None
        out[spec.name] = {"result": result,
                          "title": f"{spec.x} vs {spec.y}"
                                   + (f", holding {' and '.join(spec.given)} fixed (partial)" if given else ""),
                          "columns": [spec.x, spec.y, *spec.given],
                          "runs": [a if a == b else f"{a} / {b}" for a, b in spec.pairs()],
                          "values": [x, y, *(given or [])]}
    return out


def _stability_groups(ctx, evaluator, per_model: dict[str, dict]) -> dict[str, dict]:
    """Each ``params.stability`` group's share of unstable runs (``components/eval/stability.py``)."""
    out = {}
    for spec in getattr(evaluator.params, "stability", None) or []:
        try:
            out[spec.name] = group_stability(spec, per_model)
        except ValueError as error:
            raise ValueError(f"stage {ctx.plan.name}: params.stability[{spec.name}]: {error}") from None
    return out


def _upstream_metrics(ctx) -> dict[str, dict]:
    """Logged metrics of every stage upstream of this one, by stage name, for claims such as
    "the selection's prose share is 3x the pool's" (``select_dsir.selected_share_prose``)."""
    out = {}
    for name in sorted(ctx.recipe.ancestors(ctx.plan.name)):
        stage = ctx.recipe.stages[name]
        art = ctx.workspace.artifacts.get(stage.kind, stage.digest)
        path = art.path / STAGE_METRICS if art is not None else None
        if path is not None and path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _extra_inputs(evaluator, tokens_dir, heldout) -> dict:
    """What an evaluator asks for beyond the test blocks: ``train_blocks`` ({domain: memmapped
    blocks}) when it sets ``needs_train_blocks``, the ``heldout`` documents when ``needs_heldout``."""
    extra: dict = {}
    if getattr(evaluator, "needs_train_blocks", False):
        extra["train_blocks"] = {p.stem.removeprefix("train-"): np.load(p, mmap_mode="r")
                                 for p in sorted(tokens_dir.glob("train-*.npy"))}
    if getattr(evaluator, "needs_heldout", False):
        extra["heldout"] = heldout
    return extra


def prefixed_fact_metrics(facts: dict) -> dict:
    """Numeric model facts whose key starts with one of ``FACT_PREFIXES`` (e.g. ``sampler_*``)."""
    return {k: v for k, v in facts.items()
            if k.startswith(FACT_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _figures(report: dict, out_dir) -> dict[str, str]:
    """The report's figures, {caption: file name}, drawn from what ``report`` holds."""
    drawn = {
        "Perplexity by domain": report_plots.perplexity_by_domain(report["models"], report["domains"],
                                                                  out_dir / "perplexity_by_domain.png"),
        "Size against quality (Pareto front)": report_plots.size_against_quality(
            report["models"], out_dir / "size_vs_quality.png"),
        "Claims: slack relative to the bar, 95% interval over seeds": report_plots.claims_against_bars(
            report["claims"], out_dir / "claims.png"),
        "Training curves": report_plots.training_curves(report["training_curves"], out_dir / "training_curves.png"),
        "Checkpoint sweep: each capability along training": report_plots.checkpoint_sweep(
            report["models"], report["domains"], out_dir / "checkpoint_sweep.png"),
    }
    drawn["Stability: unstable share of runs by peak learning rate"] = report_plots.stability_grid(
        report.get("stability", {}), out_dir / "stability_grid.png")
    if "sweep" in report:
        drawn[f"Sweep: {report['sweep']['metric']}"] = out_dir / report["sweep"]["figure"]
    for name, fit in report.get("scaling_fits", {}).items():
        drawn[f"Scaling fit: {name} ({fit['formula']})"] = out_dir / fit["figure"]
    for name, entry in report.get("rank_agreements", {}).items():
        drawn[f"Rank correlation: {name} ({entry['title']})"] = report_plots.rank_correlation(
            entry, out_dir / f"ranks_{name}.png")
    return {caption: path.name for caption, path in drawn.items() if path is not None and path.exists()}


def _markdown(recipe, report: dict, figures: dict[str, str]) -> str:
    lines = [f"# {recipe.name}: {recipe.paper.get('title', '')}", "", recipe.paper.get("url", ""), ""]
    lines += [f"![{caption}]({name})" for caption, name in figures.items()] + ([""] if figures else [])
    cols = sorted({k for m in report["models"].values() for k in m})
    lines.append("| model | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for name, m in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(m.get(c)) for c in cols) + " |")
    if scored_blocks(report):
        lines += ["", f"Perplexity over the test split: {scored_blocks(report)}."]
    for name, fit in report.get("scaling_fits", {}).items():
        lines += ["", f"## Scaling fit {name}: {fit['formula']}", "",
                  f"{fit['n_points']} points, rmse of the log residuals {fit['rmse_log']:.4g}, 95% intervals from "
                  f"{fit['bootstrap']} bootstrap refits ({fit['failed_refits']} failed).", "",
                  "| parameter | value | 95% interval |", "|---|---|---|"]
        lines += [f"| {p} | {_cell(v)} | [{_cell(fit['intervals_95'][p][0])}, {_cell(fit['intervals_95'][p][1])}] |"
                  for p, v in fit["params"].items()]
    for name, a in report.get("rank_agreements", {}).items():
        r = a["result"]
        partial = (f" Without holding anything fixed, rho is {_cell(r['raw_spearman'])}." if "raw_spearman" in r
                   else "")
        lines += ["", f"## Rank correlation {name}: {a['title']}", "",
                  f"Spearman rho {_cell(r['spearman'])}, 95% bootstrap interval [{_cell(r['spearman_low'])}, "
                  f"{_cell(r['spearman_high'])}] ({_cell(r['bootstrap_dropped'])} tied resamples dropped); "
                  f"permutation null's 95th percentile {_cell(r['null_q95'])}, one-sided p {_cell(r['p_value'])}; "
                  f"one shuffled ranking's rho {_cell(r['shuffled_spearman'])}.{partial}", "",
                  "| run | " + " | ".join(a["columns"]) + " |", "|---|" + "---|" * len(a["columns"])]
        lines += [f"| {run} | " + " | ".join(_cell(v[i]) for v in a["values"]) + " |"
                  for i, run in enumerate(a["runs"])]
    for name, g in report.get("stability", {}).items():
        lines += ["", f"## Stability {name}: {g['unstable']} of {g['runs']} runs unstable, "
                      f"{_cell(g['diverged_fraction'])} diverged", "",
                  "| run | peak lr | diverged | loss spike | unstable |", "|---|---|---|---|---|"]
        lines += [f"| {run} | {_cell(d['lr'])} | {d['diverged']} | {_cell(d['loss_spike'])} | {d['unstable']} |"
                  for run, d in g["runs_detail"].items()]
    lines += ["", "## Claims", ""]
    for c in report["claims"]:
        lines.append(f"- **{verdict_label(c)}** {c['name']}: {c['statement']}  \n  {c['detail']}")
    return "\n".join(lines) + "\n"


def _html(recipe, report: dict, figures: dict[str, str]) -> str:
    """The same report as one HTML page beside its PNGs (open it from the artifact or MLflow)."""
    esc = html.escape
    cols = sorted({k for m in report["models"].values() for k in m})
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join(f"<tr><th>{esc(n)}</th>" + "".join(f"<td>{esc(_cell(m.get(c)))}</td>" for c in cols) + "</tr>"
                   for n, m in report["models"].items())
    claims = "".join(f"<li><b>{esc(verdict_label(c))}</b> {esc(c['name'])}: {esc(c['statement'])}<br>"
                     f"<small>{esc(c['detail'])}</small></li>" for c in report["claims"])
    images = "".join(f'<figure><img src="{esc(name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption>'
                     "</figure>" for caption, name in figures.items())
    url = esc(recipe.paper.get("url", ""))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(recipe.name)}</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px} img{max-width:100%}</style></head><body>"
            f"<h1>{esc(recipe.name)}: {esc(recipe.paper.get('title', ''))}</h1><p><a href='{url}'>{url}</a></p>"
            f"<h2>Claims</h2><ul>{claims}</ul>{images}<h2>Models</h2>"
            f"<table><tr><th>model</th>{head}</tr>{body}</table></body></html>\n")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
