"""Infilling built from the corpus: fill a middle span of a test block, given what surrounds it.

Each example cuts ``prefix | middle | suffix`` out of a test block at a seeded position (the same
examples for every model). A model is scored in three formats, on the middle's tokens only:

- ``prefix``: left to right, ``prefix`` then the middle; the suffix is unseen. This is what a
  plain causal LM can do.
- ``sentinel``: the X-denoiser's format (``components/data/denoising.py``), ``[X] prefix <s0>
  suffix <s0>`` then the middle, which a model trained on span corruption (UL2) reads.
- ``fim``: fill-in-the-middle's ``<PRE> prefix <SUF> suffix <MID>`` then the middle (FIM, HLP).

A model trained with horizon-length prediction keeps its head beside it
(``auxiliary.safetensors``); its predictions of the share of the middle still to come, at
``<MID>`` and after each middle token but the last, are scored as ``hlp_mae`` (mean absolute
error), beside ``hlp_mae_constant``, the error of predicting the mean share everywhere.

Metrics per format: ``infill_nll_<format>`` (mean negative log-likelihood per middle token) and
``infill_acc_<format>`` (teacher-forced top-1 accuracy on the middle tokens), over all examples
and per domain (``..._<domain>``). Teacher-forced scores are used rather than exact match of a
generated middle, which a micro model almost never gets right, so every model would tie at 0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from components.data.denoising import DenoisingTokens, fim_example, infill_example
from components.registry import MethodParams
from components.train.fim import HEAD_ATTR
from components.train.method import AUXILIARY_FILE

FORMATS = ("prefix", "sentinel", "fim")


class InfillSpec(MethodParams):
    """Which infilling examples to build from the test blocks."""

    examples_per_domain: int = Field(64, ge=1)
    middle_tokens: int = Field(8, ge=1, description="length of the span to fill in")
    context_tokens: int = Field(32, ge=1, description="length of the prefix and of the suffix")
    domains: list[str] | None = Field(None, description="test domains to cut examples from; None: every domain")
    seed: int = 0


def infill_examples(spec: InfillSpec, blocks_by_domain: dict[str, np.ndarray]) -> dict[str, list[tuple]]:
    """``{domain: [(prefix, middle, suffix), ...]}``, the same for every model (seeded)."""
    need = 2 * spec.context_tokens + spec.middle_tokens
    domains = spec.domains if spec.domains is not None else sorted(blocks_by_domain)
    rng = np.random.default_rng(spec.seed)
    out = {}
    for domain in domains:
        if domain not in blocks_by_domain:
            raise ValueError(f"infill.domains names {domain!r}, which has no test blocks; domains: "
                             f"{', '.join(sorted(blocks_by_domain))}")
        blocks = np.asarray(blocks_by_domain[domain])
        if len(blocks) == 0:
            raise ValueError(f"infill: domain {domain!r} has no test blocks")
        if blocks.shape[1] < need:
            raise ValueError(f"infill needs blocks of at least 2 x context_tokens + middle_tokens = {need} tokens; the "
                             f"test blocks have {blocks.shape[1]}")
        examples = []
        for i in range(spec.examples_per_domain):
            block = blocks[i % len(blocks)]
            start = int(rng.integers(0, blocks.shape[1] - need + 1))
            a, b = start + spec.context_tokens, start + spec.context_tokens + spec.middle_tokens
            examples.append((block[start:a], block[a:b], block[b:b + spec.context_tokens]))
        out[domain] = examples
    return out


@torch.no_grad()
def span_scores(model, sequences: np.ndarray, n_context: int,
                head: torch.nn.Linear | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per example: NLL summed over the tokens from position ``n_context`` on (the middle), their
    correct top-1 count, and the horizon head's predictions at ``<MID>`` and the middle tokens but
    the last (with ``head``)."""
    ids = torch.from_numpy(sequences.astype(np.int64)).to(next(model.parameters()).device)
    out = model(input_ids=ids, **({"output_hidden_states": True} if head is not None else {}))
    logits = out.logits[:, n_context - 1:-1].float()
    targets = ids[:, n_context:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    correct = (logits.argmax(-1) == targets).sum(1)
    horizon = None
    if head is not None:
        hidden = out.hidden_states[-1][:, n_context - 1:-1].float()
        horizon = torch.sigmoid(head(hidden).squeeze(-1)).cpu().numpy()
    return nll.view(targets.shape).sum(1).cpu().numpy(), correct.cpu().numpy(), horizon


def load_horizon_head(model_dir) -> torch.nn.Linear | None:
    """The HLP head a FIM training stage kept beside its model, if it kept one."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(model_dir) / AUXILIARY_FILE if model_dir is not None else None
    if path is None or not path.exists():
        return None
    tensors = load_file(str(path))
    if f"{HEAD_ATTR}.weight" not in tensors:
        return None
    weight = tensors[f"{HEAD_ATTR}.weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": tensors[f"{HEAD_ATTR}.bias"]})
    return head


def infill_metrics(model, tokenizer, spec: InfillSpec, blocks_by_domain: dict[str, np.ndarray],
                   batch_size: int = 16, model_dir=None) -> dict[str, float]:
    """``infill_{nll,acc}_{format}`` overall and per domain, and ``hlp_mae`` where ``model_dir``
    holds a horizon head (see the module docstring)."""
    tokens = DenoisingTokens.from_tokenizer(tokenizer)
    head = load_horizon_head(model_dir)
    examples = infill_examples(spec, blocks_by_domain)
    out: dict[str, float] = {}
    totals = {f: [0.0, 0.0, 0] for f in FORMATS}  # nll, correct, middle tokens
    horizons = []
    for domain, items in examples.items():
        tokens.check_absent(torch.from_numpy(np.concatenate([np.concatenate(x) for x in items])), f"infill ({domain})")
        for f in FORMATS:
            if f == "prefix":
                built = [(np.concatenate([p, m]), len(p)) for p, m, _ in items]
            else:
                build = infill_example if f == "sentinel" else fim_example
                built = [build(p, m, s, tokens) for p, m, s in items]
            n_context = built[0][1]
            sequences = np.stack([seq for seq, _ in built])
            nll, correct = 0.0, 0
            for i in range(0, len(sequences), batch_size):
                n, c, h = span_scores(model, sequences[i:i + batch_size], n_context, head if f == "fim" else None)
                nll, correct = nll + float(n.sum()), correct + int(c.sum())
                if h is not None:
                    horizons.append(h)
            count = len(items) * spec.middle_tokens
            out[f"infill_nll_{f}_{domain}"] = nll / count
            out[f"infill_acc_{f}_{domain}"] = correct / count
            totals[f][0] += nll
            totals[f][1] += correct
            totals[f][2] += count
    for f, (nll, correct, count) in totals.items():
        out[f"infill_nll_{f}"] = nll / count
        out[f"infill_acc_{f}"] = correct / count
    if horizons:
        m = spec.middle_tokens
        predicted = np.concatenate(horizons)  # [examples, m]
        truth = (m - np.arange(m)) / m
        out["hlp_mae"] = float(np.abs(predicted - truth).mean())
        out["hlp_mae_constant"] = float(np.abs(truth.mean() - truth).mean())
    return out
