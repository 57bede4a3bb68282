"""Text-to-code retrieval on the test split: which of several functions does a docstring describe?

The pairs are the functions with docstrings found in one domain's test blocks
(``components/data/text_code.py``). Each docstring is a query; its candidates are its own
function and ``candidates - 1`` others drawn at random (seeded, the same for every model). Two
scores rank the candidates:

- ``match``: CodeT5+'s text-code matching as trained by ul2's M denoiser, ``logit([YES]) -
  logit([NO])`` after ``[MATCH] text [SEP] code``. A model never trained on the format reads the
  verdict untrained; its ranking can still land above chance through biases such as the
  code's length, which is why a claim compares it with a control.
- ``pmi``: what any causal LM can do without that training, the pointwise mutual information of
  the code and the text, ``log p(code | "# text\\n") - log p(code)``, both after a document start.
  The text and code are cut as in the matching format, so both scores see the same tokens.

Metrics: ``tcm_top1_<score>`` (the query's own function ranks strictly first), ``tcm_mrr_<score>``
(mean reciprocal rank; a tie ranks the own function below), ``tcm_queries`` and ``tcm_chance``
(``1 / candidates``, the top-1 of a random ranking).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from components.data.denoising import DenoisingTokens
from components.data.text_code import MatchingPairs, fit_pair, matching_example
from components.registry import MethodParams

class MatchingSpec(MethodParams):
    """Which retrieval queries to build from the test blocks."""

    domain: str = Field("code", description="test domain whose functions with docstrings are the pairs")
    candidates: int = Field(8, ge=2, description="functions ranked per query, its own among them")
    max_queries: int | None = Field(None, ge=1, description="the first this many pairs are queries; None: all")
    seed: int = 0


def retrieval_sets(spec: MatchingSpec, pairs: MatchingPairs) -> list[list[int]]:
    """Per query ``i``: candidate pair indices, ``i`` first, the same for every model (seeded)."""
    if len(pairs) < spec.candidates:
        raise ValueError(f"matching: the {spec.domain} test blocks hold {len(pairs)} functions with a docstring, "
                         f"fewer than candidates ({spec.candidates})")
    rng = np.random.default_rng(spec.seed)
    queries = range(min(len(pairs), spec.max_queries or len(pairs)))
    return [[i, *(int(j) for j in rng.choice([j for j in range(len(pairs)) if j != i], spec.candidates - 1,
                                                replace=False))] for i in queries]


@torch.no_grad()
def _batched_logits(model, sequences: list[np.ndarray], pad: int, batch_size: int):
    """Yields ``(ids, logits, lengths)`` of right-padded batches of ``sequences`` (causal, so the
    padding after a sequence never reaches it)."""
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
        for r, seq in enumerate(chunk):
            ids[r, :len(seq)] = torch.as_tensor(seq)
        ids = ids.to(device)
        yield ids, model(input_ids=ids).logits.float(), [len(seq) for seq in chunk]


def _last_logits(model, sequences: list[np.ndarray], pad: int, batch_size: int) -> torch.Tensor:
    """The logits after each sequence's last token."""
    return torch.cat([logits[torch.arange(len(lengths)), torch.as_tensor(lengths) - 1].cpu()
                      for _, logits, lengths in _batched_logits(model, sequences, pad, batch_size)])


def _tail_log_likelihood(model, sequences: list[np.ndarray], tails: list[int], pad: int,
                         batch_size: int) -> np.ndarray:
    """Per sequence, the summed log-probability of its last ``tails[k]`` tokens."""
    out = []
    for ids, logits, lengths in _batched_logits(model, sequences, pad, batch_size):
        logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        for r, n in enumerate(lengths):
            tail = tails[len(out)]
            out.append(float(logp[r, n - 1 - tail:n - 1].sum()))  # logp[t] scores token t + 1
    return np.array(out)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Per query row (own candidate first): how many others score at least as high."""
    return (scores[:, 1:] >= scores[:, :1]).sum(axis=1)


def matching_metrics(model, tokenizer, spec: MatchingSpec, blocks_by_domain: dict[str, np.ndarray],
                     batch_size: int = 16) -> dict[str, float]:
    """``tcm_top1_<score>`` and ``tcm_mrr_<score>`` for both scores (see the module docstring)."""
    if spec.domain not in blocks_by_domain:
        raise ValueError(f"matching.domain names {spec.domain!r}, which has no test blocks; domains: "
                         f"{', '.join(sorted(blocks_by_domain))}")
    blocks = np.asarray(blocks_by_domain[spec.domain])
    tokens = DenoisingTokens.from_tokenizer(tokenizer)
    pairs = MatchingPairs.from_blocks(blocks, tokenizer)
    sets = retrieval_sets(spec, pairs)
    seq_len, start = blocks.shape[1], tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokens.pad
    # (query, candidate) pairs, each cut once as the matching format cuts it
    cut = [(row[0], *fit_pair(pairs.texts[row[0]], pairs.codes[j], seq_len)) for row in sets for j in row]
    examples = [matching_example(text, code, seq_len, tokens.match) for _, text, code in cut]
    logits = _last_logits(model, examples, tokens.pad, batch_size)
    scores = {"match": (logits[:, tokens.match["YES"]] - logits[:, tokens.match["NO"]]).numpy()}
    comments = {}  # the text as a comment, once per query (its cut does not depend on the candidate)
    conditioned, alone, tails = [], [], []
    for i, text, code in cut:
        if i not in comments:
            comments[i] = tokenizer("# " + tokenizer.decode(text) + "\n", add_special_tokens=False)["input_ids"]
        comment = comments[i]
        conditioned.append(np.array([start, *comment, *code]))
        alone.append(np.array([start, *code]))
        tails.append(len(code))
    scores["pmi"] = (_tail_log_likelihood(model, conditioned, tails, tokens.pad, batch_size)
                     - _tail_log_likelihood(model, alone, tails, tokens.pad, batch_size))
    out = {"tcm_queries": float(len(sets)), "tcm_chance": 1.0 / spec.candidates}
    for name, values in scores.items():
        ranks = _ranks(np.asarray(values).reshape(len(sets), spec.candidates))
        out[f"tcm_top1_{name}"] = float((ranks == 0).mean())
        out[f"tcm_mrr_{name}"] = float((1.0 / (ranks + 1)).mean())
    return out
