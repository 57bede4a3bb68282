"""prune stage: a trained model with weights of its block Linears set to zero, as a plain
``LlamaForCausalLM`` that the quantize, merge, finetune and evaluate stages take like any other.

Calibrated pruners (Wanda, SparseGPT) draw their calibration sequences from the training split
of the stage's ``tokens`` input, as calibrated quantizers do.
"""
from __future__ import annotations

import numpy as np

from components.model.health import check_model_health
from components.prune.base import PruneError
from components.quant.calibration import calibration_sample
from tasks.model_io import load_model_artifact, load_tokenizer_artifact, save_model_artifact


def run(ctx) -> dict:
    source, method, stage = ctx.input("model"), ctx.method, ctx.plan.name
    if source.kind == "quantize":
        raise PruneError(f"stage {stage}: input {source.manifest.get('stage')} ({source.path}) is quantized; point "
                         "`inputs.model` at the full-precision model (prune first, then quantize the pruned one)")
    calibration = None
    if method.needs_calibration:
        if "tokens" not in ctx.inputs:
            raise PruneError(f"stage {stage}: method {ctx.plan.method!r} needs calibration data; add "
                             "`tokens: <tokenize stage>` to its inputs")
        tokens = ctx.input("tokens")
        calibration = calibration_sample(np.load(tokens.path / "train.npy"), method.params.calibration_sequences,
                                         method.params.seed)
    model, tokenizer, parent_facts = load_model_artifact(source)
    if calibration is not None and len(load_tokenizer_artifact(tokens)) != model.config.vocab_size:
        raise PruneError(f"stage {stage}: calibration tokens {tokens.path} use a tokenizer of "
                         f"{len(load_tokenizer_artifact(tokens))} entries but the model has vocab_size "
                         f"{model.config.vocab_size}; calibrate on the tokens the model was trained on")
    try:
        pruned = method.prune(model, calibration)
    except PruneError as e:
        raise PruneError(f"stage {stage}: {e}") from None
    check_model_health(model, f"stage {stage}: the pruned model ({ctx.plan.method})")
    save_model_artifact(model, tokenizer, ctx.out_dir, {"kind": "prune", "method": ctx.plan.method, "pruning": pruned,
                                                        "parents": {"model": parent_facts}})
    ctx.facts.update(sparsity=pruned["sparsity"], pattern=pruned["pattern"])
    metrics = {"sparsity": pruned["sparsity"], "target_sparsity": pruned["target_sparsity"]}
    for layer, facts in pruned["layers"].items():
        metrics[f"sparsity.{layer}"] = facts["sparsity"]
        for key in ("output_mse", "magnitude_output_mse"):
            if key in facts:
                metrics[f"{key}.{layer}"] = facts[key]
    errors = [f for f in pruned["layers"].values() if "output_mse" in f]
    if errors:  # the layers where the method's output error is at most magnitude pruning's
        metrics["layers_better_than_magnitude"] = sum(f["output_mse"] <= f["magnitude_output_mse"] for f in errors)
    return metrics
