"""prune stage: a trained model with weights of its block Linears set to zero, as a plain
``LlamaForCausalLM`` that the quantize, merge, finetune and evaluate stages take like any other.

Calibrated pruners (Wanda, SparseGPT) draw their calibration sequences from the training split
of the stage's ``tokens`` input, as calibrated quantizers do.
"""
from __future__ import annotations

from components.model.health import check_model_health
from components.prune.base import PruneError
from tasks.calibration import model_and_calibration
from tasks.model_io import save_model_artifact


def run(ctx) -> dict:
    method, stage = ctx.method, ctx.plan.name  # a quantize stage is no model input here (tasks/kinds.py)
    model, tokenizer, parent_facts, calibration = model_and_calibration(ctx, PruneError)
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
