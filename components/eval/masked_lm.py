"""Masked-LM loss of an encoder at several sequence lengths: how well it extrapolates past the
length it trained at (MosaicBERT's ALiBi against BERT's learned positions; Press et al., "Train
Short, Test Long", arXiv 2108.12409).

The test blocks of a tokenize stage are consecutive slices of one token stream, so ``k`` adjacent
blocks are one contiguous sequence ``k`` times as long. The positions scored are picked once per
block (``mask_rate`` of each, seeded; the training objective's ``pick_positions``) and are the same at every length: the lengths differ only in
the context each scored token sees and in the positions it sits at. Every picked token becomes
``[MASK]`` (no random or kept tokens, so the score is deterministic).

Metrics: ``mlm_loss_<L>`` and ``mlm_acc_<L>`` over all test blocks (token-weighted) and per domain
(``..._<domain>``); for each length after the first, ``mlm_loss_increase_<L>``: its loss minus the
first length's, the degradation a claim compares.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from tqdm import tqdm

from components.eval.evaluator import Evaluator
from components.model.presets import is_encoder
from components.registry import MethodParams, Paper
from components.train.mlm import mask_token_id, pick_positions


class MaskedLmEvaluation(Evaluator):
    key = "masked_lm"
    paper = Paper(title="Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation",
                  url="https://arxiv.org/abs/2108.12409", arxiv="2108.12409")

    class Params(MethodParams):
        lengths: list[int] = Field(..., min_length=1, description="sequence lengths scored, in tokens; each a "
                                   "multiple of the test blocks' length (the first is the baseline of the increases)")
        mask_rate: float = Field(0.15, gt=0, lt=1, description="share of each test block's tokens scored")
        seed: int = Field(0, description="seed of the scored positions (the same for every model)")
        batch_size: int = Field(8, ge=1, description="sequences per forward pass")
        max_blocks_per_domain: int | None = Field(None, ge=1, description="test blocks per domain (the first ones)")

        @field_validator("lengths")
        @classmethod
        def _distinct_positive(cls, lengths: list[int]) -> list[int]:
            if len(set(lengths)) != len(lengths) or min(lengths) < 2:
                raise ValueError(f"lengths {lengths}: give distinct lengths of at least 2 tokens")
            return lengths

    def evaluate(self, model, tokenizer, model_dir: Path | None, blocks_by_domain: dict[str, np.ndarray],
                 task_examples: list[dict], work_dir: Path, quant_meta: dict | None = None,
                 progress: bool = False, **_) -> dict[str, float]:
        p = self.params
        if not is_encoder(model):
            raise ValueError(f"evaluate method masked_lm scores masked-LM encoders; the model {model_dir} is a causal "
                             "decoder (score it with method standard)")
        mask_id = mask_token_id(tokenizer)
        out: dict[str, float] = {}
        totals = {length: [0.0, 0, 0] for length in p.lengths}  # nll, correct, scored
        for domain, blocks in sorted(blocks_by_domain.items()):
            blocks = np.asarray(blocks[:p.max_blocks_per_domain])
            if len(blocks) == 0:
                continue
            block_len = blocks.shape[1]
            picked = pick_positions(len(blocks), block_len, p.mask_rate, torch.Generator().manual_seed(p.seed)).numpy()
            for length in p.lengths:
                if length % block_len:
                    raise ValueError(f"evaluate method masked_lm: length {length} is not a multiple of the test "
                                     f"blocks' length {block_len}")
                per_row = length // block_len
                rows = len(blocks) // per_row
                if rows == 0:
                    raise ValueError(f"evaluate method masked_lm: the {domain} test split has {len(blocks)} blocks "
                                     f"of {block_len} tokens, too few for one sequence of {length}")
                ids = blocks[:rows * per_row].reshape(rows, length)
                scored = picked[:rows * per_row].reshape(rows, length)
                nll, correct, count = _score(model, ids, scored, mask_id, p.batch_size,
                                             f"masked LM ({domain}, {length} tokens)", progress)
                out[f"mlm_loss_{length}_{domain}"] = nll / count
                out[f"mlm_acc_{length}_{domain}"] = correct / count
                for i, value in enumerate((nll, correct, count)):
                    totals[length][i] += value
        for length, (nll, correct, count) in totals.items():
            if count:
                out[f"mlm_loss_{length}"] = nll / count
                out[f"mlm_acc_{length}"] = correct / count
        first = p.lengths[0]
        for length in p.lengths[1:]:
            if f"mlm_loss_{length}" in out:
                out[f"mlm_loss_increase_{length}"] = out[f"mlm_loss_{length}"] - out[f"mlm_loss_{first}"]
        return out


def _score(model, ids: np.ndarray, scored: np.ndarray, mask_id: int, batch_size: int, desc: str,
           progress: bool) -> tuple[float, int, int]:
    """(summed NLL, correct argmax count, scored count) of the scored tokens, each replaced by ``mask_id``."""
    device = next(model.parameters()).device
    nll, correct, count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(ids), batch_size), desc=desc, disable=not progress):
                target = torch.as_tensor(ids[start:start + batch_size], dtype=torch.long, device=device)
                where = torch.as_tensor(scored[start:start + batch_size], device=device)
                logits = model(input_ids=target.masked_fill(where, mask_id)).logits[where].float()
                truth = target[where]
                nll += float(F.cross_entropy(logits, truth, reduction="sum"))
                correct += int((logits.argmax(-1) == truth).sum())
                count += int(where.sum())
    finally:
        model.train(was_training)
    return nll, correct, count
