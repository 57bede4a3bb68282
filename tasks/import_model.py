"""model stage: an existing checkpoint, checked and rewritten as a model artifact.

The artifact has the layout every model stage writes (an HF directory, fp32 safetensors, the
tokenizer, paperdag.json), plus ``tokenizer/`` so a tokenize stage can pack the corpus in this
model's own vocabulary (``inputs: {tokenizer: <this stage>}``) for quantize calibration,
distillation and evaluation.
"""
from __future__ import annotations

from transformers import AutoTokenizer

from components.model.hf_checkpoint import check_checkpoint_dir
from components.model.presets import count_params, load_model
from tasks.model_io import save_model_artifact


def run(ctx) -> dict:
    source = ctx.method.checkpoint_dir()
    check_checkpoint_dir(source)
    model = load_model(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: no usable tokenizer next to the weights ({e}); save the model's tokenizer "
                         "into the checkpoint directory") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(f"{source}: the tokenizer has {len(tokenizer)} entries but the model's embedding has "
                         f"{vocab} rows, so they do not belong together")
    facts = {"source": str(ctx.method.params.hub or source), "revision": ctx.method.params.revision,
             "architecture": type(model).__name__, "n_params": count_params(model), "vocab_size": vocab}
    save_model_artifact(model, tokenizer, ctx.out_dir, facts)
    tokenizer.save_pretrained(str(ctx.out_dir / "tokenizer"))
    ctx.facts.update(facts)
    return {"n_params": facts["n_params"], "vocab_size": vocab,
            "safetensors_bytes": sum(p.stat().st_size for p in ctx.out_dir.glob("*.safetensors"))}
