"""FLIQS (Dotzel et al., arXiv 2308.03290): a per-layer search over integer and floating-point formats.

The paper trains a one-shot supernet: the shared weights keep training while a REINFORCE
controller samples per-layer formats, its reward trading quality against a hardware cost, with
a cosine entropy-regularisation schedule (read from the abstract; we take it to mean explore
early, commit late). This is the post-training version (our simplification, as the issue allows):

- **No weight training.** The model is frozen; every candidate format's RTN-quantized copy of each
  Linear is computed once, and a sampled assignment is evaluated by swapping those copies in.
  Quality = mean next-token loss on the first ``search_sequences`` calibration sequences (a fixed
  batch, so the reward of an assignment is deterministic and cached).
- **Controller**: independent categorical logits per targeted Linear over ``formats`` (default
  {int4, int8, fp8 e4m3, fp8 e5m2}), Adam on the REINFORCE objective
  ``mean_k (R_k - b) log π(a_k) + β_t · mean_l H(π_l)`` with ``samples_per_iteration`` samples per
  step, an exponential-moving-average baseline ``b`` and advantages divided by a running reward
  std (so ``lr`` and β do not depend on the loss scale).
- **Entropy schedule**: ``β_t = β_end + (β_start - β_end)·(1 + cos(π t / T)) / 2`` (cosine decay
  over the ``iterations``; the paper's exact constants were not available to us).
- **Reward**: ``R = -loss - penalty · max(0, avg_bits - size_budget_bits)``, ``avg_bits`` = mean
  code bits per quantized weight (the model-size cost; fp16 scales are the same for every format
  and are left out, as in ``hawq``'s budget). One-sided, because the budget is a hard size cap
  (the paper's exact cost term was not read).
- **Start**: logits ``-λ·bits`` with λ set so the expected bits equal the budget (uniform if
  the average format already fits), so the controller does not spend its first steps only
  learning the budget.
- **Final choice**: the best-reward *feasible* assignment among the policy's argmax (made feasible
  by moving the layers with the highest probability on a cheaper format down, cheapest first) and
  every sampled one. It is always within the budget.

Each layer is then stored with RTN in its format: integers as ``rtn.quantize_tensor`` codes
(``add_int``), floats as per-channel scaled minifloat codes (``minifloat_ptq.MinifloatGrid``).
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, PackedWeights, QuantizationError, QuantizedModel, Quantizer
from components.quant.calibration import check_calibration, swapped_weights
from components.quant.minifloat_ptq import MinifloatGrid, mean_loss, weight_format
from components.quant.rtn import quantize_tensor
from components.registry import Paper

DEFAULT_FORMATS = ["int4", "int8", "e4m3", "e5m2"]


def parse_format(name: str) -> tuple[str, int]:
    """``"intN"`` (N in 2..8) -> ("int", N); a minifloat name (3..8 bits) -> (its name, bits)."""
    match = re.fullmatch(r"int(\d+)", str(name).strip().lower())
    if match:
        bits = int(match[1])
        if not 2 <= bits <= 8:
            raise QuantizationError(f"fliqs: format {name!r}: integer formats need 2..8 bits")
        return "int", bits
    fmt = weight_format(name)
    return fmt.name, fmt.bits


class FormatBank:
    """Every candidate format's RTN copy of every targeted Linear, computed once."""

    def __init__(self, linears: dict[str, torch.nn.Linear], formats: Sequence[str], granularity: str,
                 group_size: int):
        self.formats = list(formats)
        self.kinds = [parse_format(f) for f in self.formats]
        self.bits = [b for _, b in self.kinds]
        self.granularity, self.group_size = granularity, group_size
        self.names = list(linears)
        self.sizes = torch.tensor([linears[m].weight.numel() for m in self.names], dtype=torch.float64)
        self.encoded: dict[str, list[tuple]] = {}
        for m, lin in linears.items():
            w = lin.weight.detach().float()
            self.encoded[m] = [self._quantize(w, i, f"{m}.weight") for i in range(len(self.formats))]

    def _quantize(self, w: torch.Tensor, i: int, name: str):
        kind, bits = self.kinds[i]
        if kind == "int":
            codes, scales, zeros, dq = quantize_tensor(w, bits, self.granularity, self.group_size, True, name)
            return ("int", codes, scales, dq)
        grid = MinifloatGrid(weight_format(kind), self.granularity, self.group_size, "float")
        codes, side, dq = grid.rtn(w, name)
        return (grid, codes, side, dq)

    def dequant(self, m: str, i: int) -> torch.Tensor:
        return self.encoded[m][i][3]

    def average_bits(self, assignment: Sequence[int]) -> float:
        bits = torch.tensor([self.bits[i] for i in assignment], dtype=torch.float64)
        return float((bits * self.sizes).sum() / self.sizes.sum())


class FliqsQuantizer(Quantizer):
    key = "fliqs"
    paper = Paper(title="FLIQS: One-Shot Mixed-Precision Floating-Point and Integer Quantization Search",
                  url="https://arxiv.org/abs/2308.03290", arxiv="2308.03290")
    needs_calibration = True

    class Params(CalibratedParams):
        formats: list[str] = Field(default_factory=lambda: list(DEFAULT_FORMATS), min_length=2,
                                   description="per-layer choices: 'intN' (2..8) or minifloat names (3..8 bits)")
        size_budget_bits: float = Field(6.0, gt=0, description="max mean code bits per quantized weight")
        iterations: int = Field(30, ge=1, description="controller updates")
        samples_per_iteration: int = Field(4, ge=1, description="assignments sampled per update")
        search_sequences: int = Field(8, gt=0, description="calibration sequences in the reward's loss")
        lr: float = Field(0.1, gt=0, description="Adam lr on the controller logits")
        entropy_start: float = Field(0.1, ge=0, description="entropy coefficient β at the first update")
        entropy_end: float = Field(0.0, ge=0, description="entropy coefficient β at the last update")
        penalty: float = Field(1.0, ge=0, description="reward penalty (nats) per bit over the budget")
        baseline_decay: float = Field(0.8, ge=0, lt=1, description="EMA decay of the reward baseline")
        granularity: Literal["per_channel", "group"] = Field(
            "per_channel", description="scale granularity, every format")
        group_size: int = Field(128, gt=0, description="input weights per scale (granularity=group)")
        batch_size: int = Field(8, gt=0, description="sequences per forward pass")

        @field_validator("formats")
        @classmethod
        def _formats(cls, value: list[str]) -> list[str]:
            for f in value:
                parse_format(f)
            if len(set(value)) != len(value):
                raise ValueError(f"formats={value} has duplicates")
            return value

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        self.refuse_if_quantized(model)
        tokens = check_calibration(calibration, self.key)[:p.search_sequences]
        linears = dict(self.target_linears(model))
        bank = FormatBank(linears, p.formats, p.granularity, p.group_size)
        if p.size_budget_bits < min(bank.bits):
            raise QuantizationError(f"{self.key}: size_budget_bits={p.size_budget_bits} is below the cheapest "
                                    f"format's {min(bank.bits)} bits; no assignment fits")
        start = time.perf_counter()
        search = _Search(model, linears, bank, tokens, p)
        choice, history = search.run()
        search_seconds = time.perf_counter() - start
        return self._pack(model, bank, choice, search, history, search_seconds)

    def _pack(self, model, bank: FormatBank, choice: list[int], search: "_Search", history: list[float],
              search_seconds: float) -> QuantizedModel:
        p = self.params
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store = PackedWeights()
        for m, i in zip(bank.names, choice):
            name = f"{m}.weight"
            kind, codes, side, dq = bank.encoded[m][i]
            state[name] = dq.to(state[name].dtype)
            if kind == "int":
                store.add_int(name, dq.shape, codes, side, None, bank.bits[i], p.granularity, p.group_size, True)
            else:
                store.add_codes(name, dq.shape, codes, kind.bits, side, **kind.info())
        avg_bits = bank.average_bits(choice)
        loss = search.loss(choice)
        metrics = {"final_reward": search.reward(choice), "calibration_loss": loss,
                   "fp_calibration_loss": search.fp_loss, "average_code_bits": avg_bits,
                   "size_budget_bits": float(p.size_budget_bits), "search_seconds": search_seconds,
                   "assignments_evaluated": len(search.cache), "reward_first_iteration": history[0],
                   "reward_last_iteration": history[-1]}
        for m, i in zip(bank.names, choice):
            metrics[f"bits.{m}"] = bank.bits[i]
            metrics[f"format_index.{m}"] = i
        for i, f in enumerate(bank.formats):
            metrics[f"layers_{f}"] = sum(c == i for c in choice)
        meta = store.meta(self.key, bits=avg_bits, granularity=p.granularity,
                          group_size=p.group_size if p.granularity == "group" else None, symmetric=True,
                          mixed_precision=True, formats=list(bank.formats), size_budget_bits=float(p.size_budget_bits),
                          allocation={m: bank.formats[i] for m, i in zip(bank.names, choice)}, metrics=metrics,
                          search=dict(iterations=p.iterations, samples_per_iteration=p.samples_per_iteration,
                                      search_sequences=int(search.tokens.shape[0]), seed=p.seed,
                                      entropy=[p.entropy_start, p.entropy_end], penalty=p.penalty,
                                      final_probabilities={m: [round(float(x), 4) for x in row] for m, row in
                                                           zip(bank.names, search.probabilities())}))
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)


class _Search:
    """The REINFORCE controller and its cached reward."""

    def __init__(self, model, linears, bank: FormatBank, tokens: torch.Tensor, params):
        self.model, self.linears, self.bank, self.tokens, self.p = model, linears, bank, tokens, params
        self.cache: dict[tuple[int, ...], float] = {}
        self.fp_loss = mean_loss(model, tokens, params.batch_size)
        self.logits = budget_logits(bank.bits, params.size_budget_bits).repeat(len(bank.names), 1).requires_grad_()

    def loss(self, assignment: Sequence[int]) -> float:
        key = tuple(int(i) for i in assignment)
        if key not in self.cache:
            weights = {m: self.bank.dequant(m, i) for m, i in zip(self.bank.names, key)}
            with swapped_weights(self.linears, weights):
                self.cache[key] = mean_loss(self.model, self.tokens, self.p.batch_size)
        return self.cache[key]

    def reward(self, assignment: Sequence[int]) -> float:
        over = max(0.0, self.bank.average_bits(assignment) - self.p.size_budget_bits)
        return -self.loss(assignment) - self.p.penalty * over

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), -1)

    def beta(self, t: int) -> float:
        p = self.p
        frac = t / max(p.iterations - 1, 1)
        return p.entropy_end + (p.entropy_start - p.entropy_end) * 0.5 * (1 + math.cos(math.pi * frac))

    def run(self) -> tuple[list[int], list[float]]:
        p = self.p
        gen = torch.Generator().manual_seed(p.seed)
        opt = torch.optim.Adam([self.logits], lr=p.lr)
        baseline, var = None, None
        best, best_reward = None, -math.inf
        history = []
        for t in range(p.iterations):
            probs = torch.softmax(self.logits, -1)
            samples = torch.multinomial(probs.detach(), p.samples_per_iteration, replacement=True,
                                        generator=gen).T  # [K, L]
            rewards = torch.tensor([self.reward(s.tolist()) for s in samples], dtype=torch.float64)
            for s, r in zip(samples, rewards.tolist()):
                if r > best_reward and self.bank.average_bits(s.tolist()) <= p.size_budget_bits:
                    best, best_reward = s.tolist(), r
            mean = float(rewards.mean())
            history.append(mean)
            if baseline is None:
                baseline, var = mean, float(rewards.var(unbiased=False)) if len(rewards) > 1 else 0.0
            adv = rewards - baseline
            var = p.baseline_decay * var + (1 - p.baseline_decay) * float(adv.pow(2).mean())
            adv = (adv / math.sqrt(var + 1e-12)).float()
            baseline = p.baseline_decay * baseline + (1 - p.baseline_decay) * mean
            logp = torch.log_softmax(self.logits, -1)
            chosen = logp.gather(1, samples.T).T  # [K, L]
            entropy = -(probs * logp).sum(-1).mean()
            objective = (adv.unsqueeze(1) * chosen).sum(1).mean() + self.beta(t) * entropy
            opt.zero_grad()
            (-objective).backward()
            opt.step()
        argmax = self.feasible(self.logits.detach().argmax(-1).tolist())
        if best is None or self.reward(argmax) >= best_reward:
            best = argmax
        return best, history

    def feasible(self, assignment: list[int]) -> list[int]:
        """Move layers to cheaper formats until the budget holds: each step, the layer/format pair
        (strictly fewer bits) with the highest policy probability, ties to the cheapest format."""
        assignment = list(assignment)
        probs = self.probabilities()
        bits = self.bank.bits
        while self.bank.average_bits(assignment) > self.p.size_budget_bits:
            moves = [(float(probs[l, j]), -bits[j], l, j) for l, i in enumerate(assignment)
                     for j in range(len(bits)) if bits[j] < bits[i]]
            _, _, l, j = max(moves)
            assignment[l] = j
        return assignment


def budget_logits(bits: Sequence[int], budget: float) -> torch.Tensor:
    """Initial logits ``-λ·bits``: uniform if the mean format fits the budget, else the λ > 0
    (bisection) whose expected bits per weight equal the budget, so the search starts on it."""
    b = torch.tensor(bits, dtype=torch.float64)

    def expected(lam: float) -> float:
        return float((torch.softmax(-lam * b, 0) * b).sum())

    if expected(0.0) <= budget or b.min() >= budget:
        return torch.zeros(len(bits)) if b.min() < budget else (-(b - b.min()) * 10).float()
    lo, hi = 0.0, 1.0
    while expected(hi) > budget:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) > budget else (lo, mid)
    return (-hi * b).float()


def random_feasible_assignment(n_layers: int, bits: Sequence[int], sizes: Sequence[float], budget: float,
                               generator: torch.Generator) -> list[int]:
    """A uniformly sampled assignment, then random layers moved to the cheapest format until within
    budget (a baseline for tests and benchmarks)."""
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    a = torch.randint(0, len(bits), (n_layers,), generator=generator).tolist()
    cheapest = min(range(len(bits)), key=lambda j: bits[j])

    def avg(x):
        return float((torch.tensor([bits[i] for i in x], dtype=torch.float64) * sizes_t).sum() / sizes_t.sum())

    for l in torch.randperm(n_layers, generator=generator).tolist():
        if avg(a) <= budget:
            break
        a[l] = cheapest
    return a
