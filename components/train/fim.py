"""Fill-in-the-middle training (Bavarian et al. 2022, "Efficient Training of Language Models to
Fill in the Middle"), with horizon-length prediction (Ding et al. 2024, "Horizon-Length
Prediction: Advancing Fill-in-the-Middle Capabilities for Code Generation with Lookahead
Planning", arXiv 2410.03103).

FIM: with probability ``fim_rate`` a training block is cut at two token positions drawn
uniformly into ``prefix | middle | suffix`` and rearranged as ``<PRE> prefix <SUF> suffix <MID>
middle`` (PSM; ``components/data/denoising.py`` holds the format and its control-byte tokens);
other blocks train as plain causal LM. The loss covers every token, as in the paper. The cut is
per block after packing, the paper's "context-level" FIM; the source is shortened by three tokens
so the FIM tokens fit. Different here: token-level cuts (the paper cuts characters of a
document) and PSM only (the paper mixes in SPM).

HLP (``horizon_weight`` > 0): a linear head on the last hidden state predicts, at ``<MID>`` and at
every middle token but the last, the share of the middle still to come, ``(M - i) / M`` after i
middle tokens; the loss adds ``horizon_weight`` times its L1 error (the head's output through a
sigmoid). [Guess: no official code was found; the paper's head and regression loss are as the
method notes give them, "a linear head + weighted regression loss"; L1 and the sigmoid are ours.]
The head trains with the model (attached in ``bind``, so it is checkpointed and resumes), is
removed before the model is saved (the artifact stays a plain Llama) and is kept beside it as
``auxiliary.safetensors`` (``horizon_head.weight``/``.bias``), where the infilling evaluation
scores its predictions (``components/eval/infilling.py``).

Draws come from a generator seeded by ``(seed, step)``, so a resumed run cuts exactly as the
uninterrupted one did. ``use_tokenizer`` (the train stage calls it) finds the FIM tokens.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.data.denoising import fim_example
from components.registry import Paper
from components.train.control_tokens import ControlTokenMethod
from components.train.method import TrainingMethod, step_seed, unwrap

HEAD_ATTR = "horizon_head"


def horizon_targets(n_context: int, middle: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, remaining share) for one FIM example: at ``<MID>`` (position ``n_context - 1``)
    and after each of the first ``middle - 1`` middle tokens, the share of the middle still to come."""
    return np.arange(n_context - 1, n_context - 1 + middle), (middle - np.arange(middle)) / middle


class FillInTheMiddle(ControlTokenMethod):
    """Causal-LM training on blocks rearranged prefix-suffix-middle, optionally with HLP's head."""

    key = "fim"
    control_tokens = "<PRE>/<SUF>/<MID> tokens"
    paper = Paper(title="Efficient Training of Language Models to Fill in the Middle",
                  url="https://arxiv.org/abs/2207.14255", arxiv="2207.14255")

    class Params(TrainingMethod.Params):
        fim_rate: float = Field(0.5, gt=0, le=1, description="share of blocks rearranged for FIM (paper: 0.5)")
        horizon_weight: float = Field(0.0, ge=0, description="weight of horizon-length prediction's loss "
                                                             "(0: plain FIM, no head)")

    @property
    def one_process_only(self) -> str:
        return ("keeps the horizon head it trains (HLP) beside the model, and only the training process holds it"
                if self.params.horizon_weight > 0 else "")

    def __init__(self, params=None):
        super().__init__(params)
        self._head_state: dict[str, torch.Tensor] = {}

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        super().bind(model, teacher, n_blocks)
        if self.params.horizon_weight > 0:
            plain = unwrap(model)
            if HEAD_ATTR in plain._modules:
                raise ValueError(f"fim: the model already has a {HEAD_ATTR!r} module")
            head = nn.Linear(plain.config.hidden_size, 1)
            nn.init.zeros_(head.weight)  # starts at 0.5 everywhere: no claim about the horizon yet
            nn.init.zeros_(head.bias)
            plain.add_module(HEAD_ATTR, head.to(next(plain.parameters()).device))

    def fim_batch(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
        """(input ids, per row the HLP (positions, remaining share); empty for causal rows) of
        ``batch`` at ``step``; deterministic."""
        tokens = self.tokens_for(batch, step)
        rng = np.random.default_rng(step_seed(self.params.seed, b"FIM", step))
        rows = batch.detach().cpu().numpy().astype(np.int64)
        seq_len = rows.shape[1]
        ids = rows.copy()
        horizons = []
        for r, row in enumerate(rows):
            if rng.random() >= self.params.fim_rate:
                horizons.append((np.zeros(0, dtype=np.int64), np.zeros(0)))
                continue
            source = row[:seq_len - 3]
            a, b = np.sort(rng.integers(0, len(source) + 1, size=2))
            sequence, n_context = fim_example(source[:a], source[a:b], source[b:], tokens)
            ids[r] = sequence
            horizons.append(horizon_targets(n_context, b - a) if b > a else
                            (np.zeros(0, dtype=np.int64), np.zeros(0)))
        return torch.from_numpy(ids).to(batch.device), horizons

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        ids, horizons = self.fim_batch(batch, self._step)
        if self.params.horizon_weight == 0:
            return model(input_ids=ids, labels=ids).loss
        out = model(input_ids=ids, labels=ids, output_hidden_states=True)
        rows = np.concatenate([np.full(len(p), r) for r, (p, _) in enumerate(horizons)]).astype(np.int64)
        positions = np.concatenate([p for p, _ in horizons]).astype(np.int64)
        if len(positions) == 0:  # no FIM row with a middle in this batch
            return out.loss
        hidden = out.hidden_states[-1][torch.from_numpy(rows), torch.from_numpy(positions)]
        predicted = torch.sigmoid(getattr(unwrap(model), HEAD_ATTR)(hidden.float()).squeeze(-1))
        target = torch.from_numpy(np.concatenate([t for _, t in horizons])).to(predicted)
        return out.loss + self.params.horizon_weight * F.l1_loss(predicted, target)

    def finalize(self, model: nn.Module) -> dict:
        plain = unwrap(model)
        if HEAD_ATTR in plain._modules:
            head = plain._modules.pop(HEAD_ATTR)
            self._head_state = {f"{HEAD_ATTR}.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}
        return {"fim_rate": self.params.fim_rate, "horizon_weight": self.params.horizon_weight}

    def auxiliary_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._head_state)
