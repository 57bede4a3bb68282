"""Learning from self-sampled correct and partially-correct solutions (Ni et al. 2023, "Learning
from Self-Sampled Correct and Partially-Correct Programs", ICLR 2023, arXiv 2205.14318;
``microsoft/TraceCodegen``), on the addition task of ``components/data/arithmetic_formats.py``.

While training, the model samples solutions to training problems (the reference's on-policy
sampling at temperature 0.8). A sample whose every step is right is a correct solution; one whose
leading steps are right is a partially-correct one (the paper checks a prefix's execution states
against those of known-correct programs; here each scratchpad line, or reversed answer digit,
fixes the state, so it is checked against the computed trace: ``verified_prefix``). Verified
solutions go into a buffer, and each step adds the causal-LM loss of ``buffer_batch`` buffer
entries (prompt tokens unscored) to the usual loss of the batch: the reference's MLE-Aug
objective (``mle_lambda 1, mml_lambda 0``), with the gold solutions in the packed training blocks.

Different here:
- Addition has one correct trace per problem, so every verified sample is a prefix of the gold
  one: the buffer keeps the longest per problem, and the paper's gain from finding *new*
  correct programs cannot appear; what is left is training on the model's own verified steps.
- Problems are the prompts found whole in the training blocks (``use_blocks``), drawn
  ``problems_per_round`` at a time every ``sample_every`` steps, rather than the batch's own.
- ``targets_from: gold`` is the control: the drawn problems enter the buffer with their whole
  gold solution, no sampling, the same extra loss per step. ``partial: false`` keeps complete
  solutions only (the paper's "FCP only" ablation).

Train FLOPs count the training blocks only; ``finalize`` reports the buffer tokens trained and
the tokens generated, the extra work, as measured counts.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from components.data.arithmetic_formats import (
    ArithmeticFormat, find_prompts, format_prompt, solution_steps, verified_prefix,
)
from components.eval.arithmetic_eval import generate_answers
from components.registry import Paper
from components.train.acceleration import eager
from components.train.method import TrainingMethod, step_seed, unwrap

IGNORE = -100  # HF's ignored label


class SelfSampledError(ValueError):
    """The method cannot run as configured (no tokenizer, no problems in the data...)."""


class SelfSampledSolutions(TrainingMethod):
    """Causal LM on the blocks plus the model's own verified (partial) solutions."""

    key = "self_sampled"
    paper = Paper(title="Learning from Self-Sampled Correct and Partially-Correct Programs",
                  url="https://arxiv.org/abs/2205.14318", arxiv="2205.14318")
    one_process_only = "the buffer of self-sampled solutions is filled in one process"

    class Params(TrainingMethod.Params):
        format: ArithmeticFormat = Field("scratchpad_simple", description="the arithmetic format of the training "
                                         "problems (how samples are verified)")
        targets_from: Literal["sampled", "gold"] = Field(
            "sampled", description="sampled: the model's verified solutions; gold: the drawn problems' gold "
                                   "solutions (the control)")
        partial: bool = Field(True, description="keep partially-correct samples too (false: complete ones only)")
        sample_every: int = Field(1, ge=1, description="steps between sampling rounds")
        problems_per_round: int = Field(8, ge=1, description="training problems sampled per round")
        temperature: float = Field(0.8, gt=0, description="sampling temperature (reference: 0.8)")
        buffer_batch: int = Field(8, ge=1, description="buffer entries trained per step")
        buffer_weight: float = Field(1.0, gt=0, description="weight of the buffer loss (reference mle_lambda: 1)")

    def __init__(self, params=None):
        super().__init__(params)
        self._tokenizer = None
        self._problems: list[tuple[int, int]] = []
        self._buffer: dict[tuple[int, int], int] = {}  # problem -> verified steps
        self._counts = np.zeros(4, dtype=np.int64)  # samples, complete, partial, generated tokens
        self._buffer_tokens = 0
        self._width = 0
        self._step = 0
        self._sequences: dict[tuple[int, int, int], tuple[list[int], int]] = {}  # (a, b, steps) -> tokens

    # -- setup ---------------------------------------------------------------------------------

    def use_tokenizer(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise SelfSampledError("self_sampled: the tokenizer has no eos token (prompts start at a document "
                                   "boundary)")
        self._tokenizer = tokenizer

    def use_blocks(self, blocks: np.ndarray) -> None:
        """Collect the training problems: every prompt of ``format`` found whole in a block."""
        if self._tokenizer is None:
            raise SelfSampledError("self_sampled needs the tokenizer: call method.use_tokenizer(tokenizer) first")
        found: set[tuple[int, int]] = set()
        for row in blocks:
            text = self._tokenizer.decode(row.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            found |= find_prompts(self.params.format, text)
        if not found:
            raise SelfSampledError(f"self_sampled: no {self.params.format} prompts in the {len(blocks)} training "
                                   f"blocks; set `format` to the training data's arithmetic format")
        self._problems = sorted(found)
        # buffer rows share one width (the longest whole solution), so a compiled model sees one shape
        self._width = max(len(self._sequence(a, b, len(solution_steps(self.params.format, a, b)))[0])
                          for a, b in self._problems)

    def bind(self, model: nn.Module, teacher: nn.Module | None, n_blocks: int) -> None:
        if not self._problems:
            raise SelfSampledError("self_sampled needs its training problems: call method.use_blocks(blocks) "
                                   "before training")
        positions = getattr(unwrap(model).config, "max_position_embeddings", None)
        if positions and self._width > positions:
            raise SelfSampledError(f"self_sampled: a whole {self.params.format} example takes {self._width} tokens "
                                   f"but the model's context is {positions}")

    # -- the buffer ----------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sequence(self, a: int, b: int, steps: int) -> tuple[list[int], int]:
        """(token ids, first scored position) of the problem's prompt and its first ``steps``
        steps, between document boundaries; a complete solution ends with eos as documents do.
        Cached: buffer entries are drawn again and again, and tokenizing is pure."""
        key = (a, b, steps)
        if key not in self._sequences:
            self._sequences[key] = self._tokenize_sequence(a, b, steps)
        return self._sequences[key]

    def _tokenize_sequence(self, a: int, b: int, steps: int) -> tuple[list[int], int]:
        fmt = self.params.format
        solution = solution_steps(fmt, a, b)
        eos = self._tokenizer.eos_token_id
        prompt = [eos] + self._encode(format_prompt(fmt, a, b))
        target = self._encode("".join(solution[:steps])) + ([eos] if steps == len(solution) else [])
        return prompt + target, len(prompt)

    def sampling_round(self, model: nn.Module, step: int) -> None:
        """Draw problems and add their verified solutions (sampled, or gold for the control)."""
        p = self.params
        rng = np.random.default_rng(step_seed(p.seed, b"SELF", step))
        drawn = [self._problems[i] for i in rng.choice(len(self._problems),
                                                        size=min(p.problems_per_round, len(self._problems)),
                                                        replace=False)]
        if p.targets_from == "gold":
            for a, b in drawn:
                self._buffer[(a, b)] = len(solution_steps(p.format, a, b))
            return
        plain = unwrap(model)
        with eager(plain):
            texts = generate_answers(plain, self._tokenizer, p.format, drawn, batch_size=len(drawn),
                                     extra_new_tokens=0, temperature=p.temperature,
                                     seed=step_seed(p.seed, b"SAMPLE", step))
        for (a, b), text in zip(drawn, texts):
            completion = text[len(format_prompt(p.format, a, b)):]
            steps, complete = verified_prefix(p.format, a, b, completion)
            self._counts += (1, complete, 0 < steps and not complete, len(self._encode(completion)))
            if complete or (p.partial and steps > 0):
                self._buffer[(a, b)] = max(steps, self._buffer.get((a, b), 0))

    def buffer_batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, attention mask, labels) of ``buffer_batch`` entries drawn at ``step``."""
        keys = sorted(self._buffer)
        rng = np.random.default_rng(step_seed(self.params.seed, b"BUFFER", step))
        chosen = [keys[i] for i in rng.integers(0, len(keys), size=self.params.buffer_batch)]
        eos = self._tokenizer.eos_token_id
        ids = torch.full((len(chosen), self._width), eos, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for row, (a, b) in enumerate(chosen):
            tokens, scored = self._sequence(a, b, self._buffer[(a, b)])
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, scored:len(tokens)] = torch.tensor(tokens[scored:])
            mask[row, :len(tokens)] = 1
        return ids.to(device), mask.to(device), labels.to(device)

    # -- trainer hooks -------------------------------------------------------------------------

    def on_batch(self, step: int, indices: np.ndarray) -> None:
        self._step = step

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        if (self._step - 1) % self.params.sample_every == 0:
            self.sampling_round(model, self._step)
        loss = model(input_ids=batch, labels=batch).loss
        if not self._buffer:
            return loss
        ids, mask, labels = self.buffer_batch(self._step, batch.device)
        self._buffer_tokens += int((labels != IGNORE).sum())
        return loss + self.params.buffer_weight * model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def state_tensors(self) -> dict[str, torch.Tensor]:
        rows = [(a, b, steps) for (a, b), steps in sorted(self._buffer.items())]
        return {"self_sampled.buffer": torch.tensor(rows, dtype=torch.long).reshape(-1, 3),
                "self_sampled.counts": torch.tensor([*self._counts.tolist(), self._buffer_tokens], dtype=torch.long)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {"self_sampled.buffer", "self_sampled.counts"}
        if set(tensors) != expected:
            raise SelfSampledError(f"self_sampled: the checkpoint holds {sorted(tensors)}, expected {sorted(expected)}")
        self._buffer = {(a, b): steps for a, b, steps in tensors["self_sampled.buffer"].tolist()}
        counts = tensors["self_sampled.counts"].tolist()
        self._counts, self._buffer_tokens = np.array(counts[:4], dtype=np.int64), counts[4]

    def finalize(self, model: nn.Module) -> dict:
        samples, complete, partial, generated = self._counts.tolist()
        whole = sum(steps == len(solution_steps(self.params.format, a, b)) for (a, b), steps in self._buffer.items())
        return {"self_sampled": {
            "targets_from": self.params.targets_from, "training_problems": len(self._problems),
            "samples": samples, "samples_complete": complete, "samples_partial": partial,
            "buffer_problems": len(self._buffer), "buffer_complete": whole,
            "buffer_tokens_trained": self._buffer_tokens, "generated_tokens": generated}}
