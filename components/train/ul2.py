"""UL2's mixture of denoisers on a decoder-only model (Tay et al. 2022, "UL2: Unifying Language
Learning Paradigms"; continued training of a causal LM as in UL2R, Tay et al. 2022b).

Every training block becomes one denoising example of a denoiser drawn from the mixture
(``components/data/denoising.py`` holds the format): R (regular span corruption: short spans,
15%), X (extreme: long spans or 50% corrupted) and S (sequential: prefix LM, the last 25%
predicted). A mode token names the paradigm at the start, so a caller picks one at inference
(``[X]`` for infilling). The loss is on the targets only; the input is context.

Defaults are the paper's seven denoisers, as the method notes give them from third-party configs:
R (mu=3, r=0.15), R (8, 0.15), S (r=0.25), X (3, 0.5), X (8, 0.5), X (64, 0.15), X (64, 0.5).
[Guess: equal weights for the seven; the paper's own sampling rates are not in the notes.]

Different here: the model keeps causal attention over the input (UL2's decoder-only runs use a
prefix-LM mask there), because the artifact must stay a plain ``LlamaForCausalLM`` that every
other stage loads; the denoised example is built inside one training block (the source shortened
so that sentinels fit), padded to the block length, pads outside the loss.

CodeT5+ (Wang et al. 2023, arXiv 2305.07922) is a setting of this class, not a copy: its
decoder-side mixture of span denoising (R, mu=3, r=0.15), seq2seq causal LM at a random pivot
(S with ``corruption_max``) and decoder-only causal LM (C) is ``params/codet5p.yaml``. Its
text-code matching is the M denoiser: a row becomes ``[MATCH] docstring [SEP] function`` and the
model predicts ``[YES]`` or ``[NO]`` (``components/data/text_code.py`` holds the format and its
deviations). Pairs are the functions with docstrings found in the training blocks
(``use_blocks``); half the rows are matched pairs, half mismatched, and ``hard_negatives`` of the
mismatched take the most similar other function. With M rows in a batch the loss is the sum of
the denoising loss (mean over target tokens) and the matching loss (mean over M rows), as
CodeT5+ sums its objectives' losses; one token per M row in a shared token mean would weigh
matching about a hundred times less.

Draws come from a generator seeded by ``(seed, step, row)``, so a resumed run corrupts exactly as
the uninterrupted one did. The tokenizer is needed to find the mode and sentinel tokens:
``use_tokenizer`` (the train stage calls it) must come before training.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from components.data.denoising import corrupt, source_length
from components.data.text_code import MatchingPairs
from components.registry import Paper
from components.train.control_tokens import ControlTokenMethod
from components.train.method import TrainingMethod, step_seed

IGNORE = -100  # HF's ignored label


class Denoiser(BaseModel):
    """One denoiser of the mixture: paradigm, mean span length (R and X) and corrupted share.
    ``C`` is plain causal LM on the whole block (no mode token, loss on every token), which
    CodeT5+'s mixture adds to span denoising."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["R", "S", "X", "C", "M"]
    corruption: float | None = Field(None, gt=0, lt=1, description="share of the source that becomes targets "
                                                                 "(R, S, X)")
    corruption_max: float | None = Field(None, gt=0, lt=1, description="S only: draw the share uniformly from "
                                         "[corruption, corruption_max] per example (a random pivot, as CodeT5+)")
    mean_span: float = Field(3.0, ge=1, description="mean noise-span length in tokens (R and X; S has one suffix)")
    weight: float = Field(1.0, gt=0, description="relative sampling weight in the mixture")
    hard_negatives: float | None = Field(None, ge=0, le=1, description="M only: share of the mismatched pairs "
                                         "whose function is the most similar other one (the rest: a random one)")

    @model_validator(mode="after")
    def _fields_fit_the_mode(self):
        if self.mode in ("C", "M") and (self.corruption is not None or self.corruption_max is not None):
            raise ValueError(f"denoiser {self.mode} ({'plain causal LM' if self.mode == 'C' else 'text-code matching'})"
                             " takes no corruption")
        if (self.mode == "M") != (self.hard_negatives is not None):
            raise ValueError("hard_negatives is the M denoiser's (text-code matching), and M needs it: the share of "
                             f"mismatched pairs given the most similar other function; got mode {self.mode}")
        if self.mode not in ("C", "M") and self.corruption is None:
            raise ValueError(f"denoiser {self.mode} needs corruption, the share of the source that becomes targets")
        if self.corruption_max is not None and (self.mode != "S" or self.corruption_max < self.corruption):
            raise ValueError(f"corruption_max (a random pivot) applies to the S denoiser only and must be at least "
                             f"corruption; got mode {self.mode}, corruption {self.corruption}, "
                             f"corruption_max {self.corruption_max}")
        return self


PAPER_MIXTURE = (
    Denoiser(mode="R", mean_span=3, corruption=0.15), Denoiser(mode="R", mean_span=8, corruption=0.15),
    Denoiser(mode="S", corruption=0.25),
    Denoiser(mode="X", mean_span=3, corruption=0.5), Denoiser(mode="X", mean_span=8, corruption=0.5),
    Denoiser(mode="X", mean_span=64, corruption=0.15), Denoiser(mode="X", mean_span=64, corruption=0.5),
)


class MixtureOfDenoisers(ControlTokenMethod):
    """Causal-LM training on span-corrupted examples from UL2's mixture of denoisers."""

    key = "ul2"
    control_tokens = "mode tokens and sentinels"
    paper = Paper(title="UL2: Unifying Language Learning Paradigms", url="https://arxiv.org/abs/2205.05131",
                  arxiv="2205.05131")

    class Params(TrainingMethod.Params):
        denoisers: list[Denoiser] = Field(default_factory=lambda: list(PAPER_MIXTURE), min_length=1)

    def __init__(self, params=None):
        super().__init__(params)
        weights = np.array([d.weight for d in self.params.denoisers], dtype=float)
        self._probabilities = weights / weights.sum()
        self._matching = any(d.mode == "M" for d in self.params.denoisers)
        self._tokenizer = None
        self._pairs: MatchingPairs | None = None

    def use_tokenizer(self, tokenizer) -> None:
        super().use_tokenizer(tokenizer)
        self._tokenizer = tokenizer

    def use_blocks(self, blocks: np.ndarray) -> None:
        if not self._matching:
            return
        if self._tokenizer is None:
            raise ValueError("ul2's M denoiser reads text-code pairs from the training blocks: call "
                             "method.use_tokenizer(tokenizer) first")
        self._pairs = MatchingPairs.from_blocks(blocks, self._tokenizer)
        if len(self._pairs) < 2:
            raise ValueError(f"ul2's M denoiser (text-code matching) found {len(self._pairs)} functions with a "
                             f"docstring in the {len(blocks)} training blocks and needs at least 2; train it on "
                             "Python source (train_domain: code)")

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        super().bind(model, teacher, n_blocks)
        if self._matching and self._pairs is None:
            raise ValueError("ul2's M denoiser needs its text-code pairs: call method.use_blocks(blocks) before "
                             "training")

    def denoise_batch(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(input ids, labels, mode of each row) of ``batch`` at ``step``; deterministic."""
        tokens = self.tokens_for(batch, step)
        rng = np.random.default_rng(step_seed(self.params.seed, b"UL2", step))
        rows = batch.detach().cpu().numpy()
        seq_len = rows.shape[1]
        ids = np.full(rows.shape, tokens.pad, dtype=np.int64)
        labels = np.full(rows.shape, IGNORE, dtype=np.int64)
        modes = []
        for r, row in enumerate(rows):
            d = self.params.denoisers[rng.choice(len(self.params.denoisers), p=self._probabilities)]
            if d.mode == "C":
                sequence, n_input = row.astype(np.int64), 0
            elif d.mode == "M":
                sequence, n_input = self._pairs.draw(rng, d.hard_negatives, seq_len, tokens.match)
            else:
                share = d.corruption if d.corruption_max is None else float(rng.uniform(d.corruption, d.corruption_max))
                length = source_length(seq_len, d.mode, share, d.mean_span)
                sequence, n_input = corrupt(row[:length], d.mode, share, d.mean_span, tokens, rng)
            ids[r, :len(sequence)] = sequence
            labels[r, n_input:len(sequence)] = sequence[n_input:]
            modes.append(d.mode)
        return torch.from_numpy(ids).to(batch.device), torch.from_numpy(labels).to(batch.device), modes

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        ids, labels, modes = self.denoise_batch(batch, self._step)
        matching = torch.tensor([m == "M" for m in modes], device=ids.device)
        if not matching.any() or matching.all():
            return model(input_ids=ids, labels=labels).loss
        # the denoising rows' token mean plus the matching rows' mean (see the module docstring)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        counted = targets != IGNORE
        denoising = per_token[~matching].sum() / counted[~matching].sum().clamp(min=1)
        return denoising + per_token[matching].sum() / counted[matching].sum()

    def finalize(self, model: nn.Module) -> dict:
        return {"ul2_denoisers": len(self.params.denoisers),
                **({"text_code_pairs": len(self._pairs)} if self._pairs is not None else {})}
