"""The input model of a quantize or prune stage, with its calibration sequences when the method
is calibrated: drawn (fixed seed) from the training split of the stage's ``tokens`` input."""
from __future__ import annotations

import numpy as np

from components.quant.calibration import calibration_sample
from tasks.model_io import load_model_artifact, load_tokenizer_artifact


def model_and_calibration(ctx, error: type[Exception]):
    """``(model, tokenizer, parent_facts, calibration or None)``; ``error`` names what is missing."""
    method, stage = ctx.method, ctx.plan.name
    tokens = calibration = None
    if method.needs_calibration:
        if "tokens" not in ctx.inputs:
            raise error(f"stage {stage}: method {ctx.plan.method!r} needs calibration data; add "
                        "`tokens: <tokenize stage>` to its inputs")
        tokens = ctx.input("tokens")
        calibration = calibration_sample(np.load(tokens.path / "train.npy"), method.params.calibration_sequences,
                                         method.params.seed)
    model, tokenizer, parent_facts = load_model_artifact(ctx.input("model"))
    entries = len(load_tokenizer_artifact(tokens)) if tokens is not None else model.config.vocab_size
    if entries != model.config.vocab_size:
        raise error(f"stage {stage}: calibration tokens {tokens.path} use a tokenizer of {entries} entries but "
                    f"the model has vocab_size {model.config.vocab_size}; calibrate on the tokens the model was "
                    "trained on")
    return model, tokenizer, parent_facts, calibration
