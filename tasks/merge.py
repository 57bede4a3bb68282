"""merge stage: pure tensor operations over checkpoints that share a base and a tokenizer.

With an optional `tokens` input, methods that search (greedy soup, ComPEFT's alpha) score
candidates by held-out loss on the validation blocks (of one domain with `validation_domain`).
"""
from __future__ import annotations


import numpy as np
from safetensors.torch import load_file

from components.eval.perplexity import evaluate_perplexity
from components.merge.base import MergeError
from components.model.health import check_model_health
from tasks.model_io import load_model_artifact, read_model_facts, save_model_artifact

SCORE_BLOCKS = 32  # validation blocks per candidate: enough to rank soups, cheap on CPU


def _state_dict(art) -> dict:
    art.verify()
    return load_file(str(art.path / "model.safetensors"))


def run(ctx) -> dict:
    merger = ctx.method
    models = ctx.inputs["models"]
    names = list(ctx.plan.inputs["models"])  # this recipe's stage names (shared artifacts keep their first name)
    base_art = (ctx.inputs.get("base") or [None])[0]
    if merger.requires_base and base_art is None:
        raise MergeError(f"stage {ctx.plan.name}: method {ctx.plan.method} needs `inputs.base` (the shared pretrained model)")
    everything = ([("base", base_art)] if base_art else []) + list(zip(names, models))
    tokenizers = {name: (a.path / "tokenizer.json").read_bytes() for name, a in everything}
    reference_name, reference = next(iter(tokenizers.items()))
    for name, tok in tokenizers.items():
        if tok != reference:
            raise MergeError(f"stage {ctx.plan.name}: checkpoint {name!r} has a different tokenizer from "
                             f"{reference_name!r}; merged models must share one tokenizer")
    model, tokenizer, _ = load_model_artifact(base_art if merger.shaped_like_base else models[0])
    score_fn = None
    domain = merger.params.validation_domain
    if domain is not None and "tokens" not in ctx.inputs:
        raise MergeError(f"stage {ctx.plan.name}: validation_domain {domain!r} scores candidates on validation "
                         "blocks: give the stage a `tokens` input")
    if "tokens" in ctx.inputs:
        blocks = _blocks(ctx, "validation", domain)[:SCORE_BLOCKS]

        def score_fn(state_dict) -> float:  # held-out loss of a candidate merge, lower is better
            model.load_state_dict(state_dict, strict=True)
            return evaluate_perplexity(model, blocks)["loss"]

    if merger.needs_domain_losses:
        _measure_transfer(ctx, merger, model, base_art, models, names)
    if merger.needs_training_blocks:
        merger.use_training(model, _fine_tune_blocks(ctx, models[0], names[0]))
    merged = merger.merge(_state_dict(base_art) if base_art else None, [_state_dict(a) for a in models], names,
                          score_fn=score_fn)
    model.load_state_dict(merged, strict=True)
    check_model_health(model, f"stage {ctx.plan.name}: the merged model ({ctx.plan.method} with {ctx.plan.params})")
    facts = {"kind": "merge", "method": ctx.plan.method, "merged": names,
             "base": ctx.plan.inputs["base"][0] if base_art else None, "report": merger.report}
    save_model_artifact(model, tokenizer, ctx.out_dir, facts)
    metrics = {"n_models": len(models)}
    metrics.update({k: v for k, v in merger.report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return metrics


def _blocks(ctx, split: str, domain: str | None) -> np.ndarray:
    """``{split}[-{domain}].npy`` of the stage's tokens input, memory-mapped; a clear error naming
    the domains there are when it is missing or empty."""
    tokens = ctx.input("tokens").path
    path = tokens / (f"{split}-{domain}.npy" if domain else f"{split}.npy")
    blocks = np.load(path, mmap_mode="r") if path.exists() else np.zeros((0, 0), np.int32)
    if len(blocks) == 0:
        known = sorted(p.stem.removeprefix(f"{split}-") for p in tokens.glob(f"{split}-*.npy"))
        raise MergeError(f"stage {ctx.plan.name}: the tokens input {tokens} has no {split} blocks"
                         + (f" for domain {domain!r}; domains: {', '.join(known)}" if domain else ""))
    return blocks


def _fine_tune_blocks(ctx, art, name: str) -> np.ndarray:
    """The training blocks of the fine-tune's own domain (all of train.npy if it had none)."""
    if "tokens" not in ctx.inputs:
        raise MergeError(f"stage {ctx.plan.name}: method {ctx.plan.method} trains on the fine-tune's data: give it a "
                         "`tokens` input (the tokenize stage the fine-tune used)")
    return _blocks(ctx, "train", read_model_facts(art).get("train_domain"))


def _measure_transfer(ctx, merger, model, base_art, models, names) -> None:
    """Validation loss of the base and of every fine-tune on every fine-tune's training domain."""
    if "tokens" not in ctx.inputs or base_art is None:
        raise MergeError(f"stage {ctx.plan.name}: method {ctx.plan.method} measures each fine-tune's effect on the "
                         "others' domains: give it `tokens` (a tokenize stage) and `base` inputs")
    domains = []
    for name, art in zip(names, models):
        facts = read_model_facts(art)
        if not facts.get("train_domain"):
            raise MergeError(f"stage {ctx.plan.name}: fine-tune {name!r} has no train_domain; grouping by transfer "
                             "needs each fine-tune's domain (or use grouping: cosine)")
        domains.append(facts["train_domain"])
    blocks = {d: _blocks(ctx, "validation", d)[:SCORE_BLOCKS] for d in sorted(set(domains))}

    def losses(art) -> dict[str, float]:
        model.load_state_dict(_state_dict(art), strict=True)
        return {d: evaluate_perplexity(model, b)["loss"] for d, b in blocks.items()}

    merger.measure(losses(base_art), [losses(a) for a in models], domains)
