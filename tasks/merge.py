"""merge stage: pure tensor operations over checkpoints that share a base and a tokenizer."""
from __future__ import annotations

from safetensors.torch import load_file

from components.merge.base import MergeError
from tasks.model_io import load_model_artifact, save_model_artifact


def _state_dict(art) -> dict:
    art.verify()
    return load_file(str(art.path / "model.safetensors"))


def run(ctx) -> dict:
    merger = ctx.method
    models = ctx.inputs["models"]
    names = [a.manifest.get("stage", a.digest[:16]) for a in models]
    base_art = (ctx.inputs.get("base") or [None])[0]
    if merger.requires_base and base_art is None:
        raise MergeError(f"stage {ctx.plan.name}: method {ctx.plan.method} needs `inputs.base` (the shared pretrained model)")
    everything = ([base_art] if base_art else []) + list(models)
    tokenizers = {a.manifest.get("stage"): (a.path / "tokenizer.json").read_bytes() for a in everything}
    reference_name, reference = next(iter(tokenizers.items()))
    for name, tok in tokenizers.items():
        if tok != reference:
            raise MergeError(f"stage {ctx.plan.name}: checkpoint {name!r} has a different tokenizer from "
                             f"{reference_name!r}; merged models must share one tokenizer")
    merged = merger.merge(_state_dict(base_art) if base_art else None, [_state_dict(a) for a in models], names)
    model, tokenizer, _ = load_model_artifact(models[0])
    model.load_state_dict(merged, strict=True)
    facts = {"kind": "merge", "method": ctx.plan.method, "merged": names,
             "base": base_art.manifest.get("stage") if base_art else None}
    save_model_artifact(model, tokenizer, ctx.out_dir, facts)
    return {"n_models": len(models)}
