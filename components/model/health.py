"""Is a model a model? A check for weights that a merge or quantizer has broken.

A merge with ``scaling: 1e38`` overflowed the weights to inf, the logits to NaN, and every
perplexity came out as exactly the vocabulary size: a plausible-looking number from a
broken model. Before such a model is saved as an artifact, this check asks:
- are all parameters finite?
- on a fixed probe batch, are the logits finite, and do they still discriminate between
  tokens (per-position spread above ``MIN_LOGIT_SPREAD``) rather than collapsing to uniform?

A freshly initialised nano model has a logit spread of about 0.14, so the bound is far below
anything a working model produces and far above the 0 of a collapsed one.
"""
from __future__ import annotations

import torch

MIN_LOGIT_SPREAD = 1e-6
PROBE_SHAPE = (2, 32)


class DegenerateModelError(ValueError):
    """A model's weights or outputs are non-finite or collapsed."""


@torch.no_grad()
def check_model_health(model: torch.nn.Module, what: str) -> None:
    """Raise DegenerateModelError naming ``what`` and the first broken parameter or output."""
    for name, param in model.named_parameters():
        bad = int((~torch.isfinite(param)).sum())
        if bad:
            raise DegenerateModelError(f"{what}: parameter {name} has {bad} non-finite values of {param.numel()}")
    vocab = model.get_output_embeddings().out_features
    seq = min(PROBE_SHAPE[1], getattr(model.config, "max_position_embeddings", PROBE_SHAPE[1]))
    probe = torch.randint(0, vocab, (PROBE_SHAPE[0], seq), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=probe.to(device), use_cache=False).logits.float()
    finally:
        model.train(was_training)
    if not torch.isfinite(logits).all():
        raise DegenerateModelError(f"{what}: its outputs are not finite (NaN or inf logits) on a probe batch")
    spread = float(logits.std(dim=-1).max())
    if spread < MIN_LOGIT_SPREAD:
        raise DegenerateModelError(f"{what}: its outputs collapsed to a uniform distribution (logit spread "
                                   f"{spread:.2g} on a probe batch)")
