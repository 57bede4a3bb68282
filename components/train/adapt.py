"""AdaPT: adaptive per-layer fixed-point precision training (Kummer, Sidak, Reichmann and Gansterer,
"Adaptive Precision Training (AdaPT): A dynamic fixed point quantized training approach for DNNs",
SDM 2023, arXiv 2107.13490).

Every targeted block projection trains on a signed fixed-point format of its own, ``word_bits``
bits of which ``frac_bits`` are fractional (``components.quant.fake_quant.fixed_point``'s grid),
with stochastic rounding: its weight (the fp32 master copy re-quantized at every step), its
input and output, and its weight gradient. Each layer's format changes while it trains:

- every step, the layer's weight gradient (quantized, then scaled to unit norm) is added to a
  running sum; the **gradient diversity** ``count / ||sum||`` (1 when every gradient points the
  same way, up to ``sqrt(count)`` for unrelated ones) sets the **lookback**, how many steps the
  layer waits before it reconsiders its format: ``ceil(clip(max_lookback / diversity, min, max))``,
  smoothed by ``lookback_momentum``. The histogram **resolution** (bins) grows by one while the
  lookback sits at its maximum and shrinks by one at its minimum;
- once the layer has waited ``lookback`` steps, **push-down** finds the fewest fractional bits
  (not below ``min_frac_bits``), then the shortest word, that lose no information about the
  weights: the histogram (``resolution`` bins over the weights' range) of the re-quantized
  weights must equal the fp32 one (their KL divergence is 0);
- then **push-up** guards against vanishing gradients: with ``L = ln(diversity) - 1 > 0`` it adds
  ``s = min(ceil(1 / L^2), ceil(cap * L^2) - frac_bits)`` fractional bits (``mean``/``max`` take
  their mean or maximum; ``s = 1`` when ``L <= 0``), lengthens the word by one, and keeps
  ``results_buffer`` integer bits above the fraction (``word >= frac + buffer``). The strategy
  moves ``min -> mean -> max`` while the loss stops falling (the current loss not below the mean
  of the last ``lookback`` losses) and back to ``min`` when it falls.

``adaptive: false`` keeps every layer at its starting format: the static fixed-point control,
the same method with the switching off.

What was read and what is not: only the paper's abstract was found; everything above is the
authors' code (github.com/lorenz0890/AdaPT at 81e54e0, ``optimizers/msgd_fp.py`` and
``models/resnet_fp.py``), read. Defaults are its CIFAR-10 ResNet configuration (start at 8-bit
words with 4 fractional bits, lookback 25 to 100, resolution 50 to 150 bins, buffer 8, strategy
``min``). Where this differs from that code, on purpose:
- the update is the stage's optimizer (AdamW, as for every other run of a comparison) on the
  quantized gradient; the code's own optimizer takes a momentum-SGD step on each gradient scaled
  to unit norm (the unit-norm gradients feed the diversity here as there). Its added loss terms
  (an L1 penalty and a word-length x density term) are left out;
- push-down is a bisection for the lowest lossless point; the code's fractional-length loop tests
  the interval's lower end instead of its midpoint and its word-length loop returns the last
  lossy length, which the push-up then lengthens by one. The divergence is a true KL of the two
  histograms (the code hands probabilities to ``KLDivLoss`` as log-probabilities);
- words are capped at 24 bits (fp32 master weights carry 24 significant bits, so a wider word is
  not emulated exactly), where the code caps at 32: fractions at ``24 - results_buffer`` and the
  push-up's ``32 * L^2`` at ``24 * L^2``;
- the lookback counts optimizer steps (the code steps once per 4 accumulated mini-batches);
- like the code, the push-down looks at the weight's first output row only.
Norm weights and the embeddings stay in fp32 (the code quantizes every parameter; a bias takes
the format of the weight before it).

The saved model is a plain ``LlamaForCausalLM`` holding each layer's last re-quantized weights;
the facts list each layer's final format, ``format_word_bits_mean`` (each step's mean word length
over layers, averaged over the steps: the budget a static control is compared at) and
``format_switches``, how often a decision changed a format. No packed
file: words above 8 bits do not fit the project's packed-code format.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from components.quant.fake_quant import fixed_point
from components.registry import Paper
from components.train.method import step_seed
from components.train.replacement import FoldableLinear, LinearReplacement

WORD_BITS_LIMIT = 24  # fp32 master weights carry 24 significant bits
STRATEGIES = ("min", "mean", "max")


def stochastic_fixed_point(x: torch.Tensor, word_bits: int, frac_bits: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` stochastically rounded onto the signed (``word_bits``, ``frac_bits``) grid: up with
    probability equal to the fraction (unbiased inside the range), saturating outside; gradients
    pass straight through inside the range. Round-to-nearest of ``x + (u - 1/2) 2^-f`` is
    ``floor(x 2^f + u) 2^-f``, so this is the project's one fixed-point grid with a seeded ``u``."""
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device)  # a CPU generator
    return fixed_point(x + (u - 0.5) * 2.0 ** -frac_bits, word_bits, frac_bits)


def histogram_kl(reference: torch.Tensor, quantized: torch.Tensor, bins: int) -> float:
    """KL(P || Q) of the two normalised ``bins``-bin histograms over ``reference``'s range
    (infinite where Q misses a bin P fills; 0 exactly when the histograms are equal)."""
    low, high = float(reference.min()), float(reference.max())
    if high <= low:
        return 0.0 if torch.equal(reference, quantized) else math.inf
    p = torch.histc(reference.float(), bins, low, high)
    q = torch.histc(quantized.float().clamp(low, high), bins, low, high)
    p, q = p / p.sum(), q / q.sum()
    filled = p > 0
    if bool((q[filled] == 0).any()):
        return math.inf
    return float((p[filled] * (p[filled] / q[filled]).log()).sum())


def lowest_lossless(bits_lossy, low: int, high: int) -> int:
    """The smallest ``b`` in ``[low, high]`` with ``not bits_lossy(b)``, by bisection (losslessness
    assumed monotone in ``b``); ``high`` when every tested point loses information."""
    while low < high:
        mid = (low + high) // 2
        if bits_lossy(mid):
            low = mid + 1
        else:
            high = mid
    return high


def push_up_step(diversity: float, frac_bits: int, strategy: str) -> int:
    """Fractional bits the push-up adds, from the gradient diversity (AdaPT's vanishing-gradient guard)."""
    step = 1
    if 0 < diversity < math.inf:
        spread = math.log(diversity) - 1.0
        if spread > 0:
            s1 = max(math.ceil(1.0 / spread**2), 1)
            s2 = max(min(math.ceil(WORD_BITS_LIMIT * spread**2), WORD_BITS_LIMIT) - frac_bits, 0)
            step = {"min": min(s1, s2), "mean": math.ceil((s1 + s2) / 2), "max": max(s1, s2)}[strategy]
    return step


class AdaptiveFixedPointLinear(FoldableLinear):
    """``x_q W_q^T`` with output ``y_q``, every operand on the layer's current format; ``weight`` is
    the fp32 master copy. ``format`` holds (word bits, frac bits) as a buffer, so it is saved and
    restored with the model's state."""

    def __init__(self, linear: nn.Linear, word_bits: int, frac_bits: int, method: "AdaptivePrecisionTraining"):
        super().__init__(linear)
        self.weight = linear.weight
        self.register_buffer("format", torch.tensor([word_bits, frac_bits], dtype=torch.int64))
        self._method = [method]  # a list: not a registered submodule
        self.quantized_weight: torch.Tensor | None = None

    def bits(self) -> tuple[int, int]:
        word, frac = self.format.tolist()
        return int(word), int(frac)

    def requantize(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.quantized_weight = stochastic_fixed_point(self.weight.detach().float(), *self.bits(), generator)

    def effective_weight(self) -> torch.Tensor:
        if self.quantized_weight is None:  # outside training (e.g. folding a model never stepped)
            return self.weight
        return self.weight + (self.quantized_weight - self.weight).detach()  # STE to the master copy

    @torch.autocast("cpu", enabled=False)  # the emulated fixed-point GEMM stays fp32 under bf16 autocast
    @torch.autocast("cuda", enabled=False)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        generator = self._method[0].generator
        word, frac = self.bits()
        xq = stochastic_fixed_point(x.float(), word, frac, generator)
        bias = None if self.bias is None else self.bias.float()
        y = torch.nn.functional.linear(xq, self.effective_weight().float(), bias)
        return stochastic_fixed_point(y, word, frac, generator).to(x.dtype)


class AdaptivePrecisionTraining(LinearReplacement):
    key = "adapt"
    quantizes_weights = True
    # each rank would see only its own gradients and switch formats on its own
    one_process_only = "switches each layer's format from the gradients of its one process"
    paper = Paper(title="Adaptive Precision Training (AdaPT): A dynamic fixed point quantized training approach "
                        "for DNNs", url="https://arxiv.org/abs/2107.13490", arxiv="2107.13490")

    class Params(LinearReplacement.Params):
        word_bits: int = Field(8, ge=2, le=WORD_BITS_LIMIT, description="Starting word length of every layer.")
        frac_bits: int = Field(4, ge=0, le=WORD_BITS_LIMIT - 1, description="Starting fractional bits of every layer.")
        adaptive: bool = Field(True, description="Switch formats while training (AdaPT); false keeps the starting "
                                                 "format (static fixed point).")
        min_frac_bits: int = Field(4, ge=0, description="Push-down never goes below this many fractional bits.")
        min_lookback: int = Field(25, ge=1, description="Fewest steps between two format decisions of a layer.")
        max_lookback: int = Field(100, ge=1, description="Most steps between two format decisions of a layer.")
        lookback_momentum: float = Field(1.0, gt=0, le=1, description="Weight of the new lookback against the old.")
        min_resolution: int = Field(50, ge=2, description="Fewest histogram bins of the push-down's KL test.")
        max_resolution: int = Field(150, ge=2, description="Most histogram bins of the push-down's KL test.")
        results_buffer: int = Field(8, ge=1, le=WORD_BITS_LIMIT - 1,
                                    description="Integer bits kept above the fraction (word >= frac + buffer).")
        push_up: Literal["min", "mean", "max"] = Field("min", description="Starting push-up strategy.")

        @model_validator(mode="after")
        def _consistent(self):
            if self.frac_bits >= self.word_bits:
                raise ValueError(f"frac_bits={self.frac_bits} must be below word_bits={self.word_bits} (one sign bit)")
            if self.min_lookback > self.max_lookback:
                raise ValueError(f"min_lookback={self.min_lookback} exceeds max_lookback={self.max_lookback}")
            if self.min_resolution > self.max_resolution:
                raise ValueError(f"min_resolution={self.min_resolution} exceeds max_resolution={self.max_resolution}")
            if self.adaptive and self.min_frac_bits > WORD_BITS_LIMIT - self.results_buffer:
                raise ValueError(f"min_frac_bits={self.min_frac_bits} leaves no room under the {WORD_BITS_LIMIT}-bit "
                                 f"word cap with results_buffer={self.results_buffer}")
            return self

    def prepare(self, model: nn.Module) -> None:
        p = self.params
        self.generator = torch.Generator().manual_seed(step_seed(p.seed, b"adapt", 0))
        targets = self.targets(model)
        self.replace(model, targets, lambda linear: AdaptiveFixedPointLinear(linear, p.word_bits, p.frac_bits, self))
        self.layers = dict(sorted(self.replaced(model).items()))
        self.layer_list = list(self.layers.values())  # by index, for the gradient hooks
        n = len(self.layers)
        # per layer: lookback, resolution, gradients counted since the last decision; their unit-norm sum
        self.lookback = torch.full((n,), p.min_lookback, dtype=torch.int64)
        self.resolution = torch.full((n,), p.min_resolution, dtype=torch.int64)
        self.count = torch.zeros(n, dtype=torch.int64)
        self.grad_sum = [torch.zeros_like(m.weight, dtype=torch.float32) for m in self.layers.values()]
        self.strategy = torch.tensor([STRATEGIES.index(p.push_up)])
        self.recent_losses: list[float] = []
        self.word_bit_steps = torch.zeros(2, dtype=torch.float64)  # (sum over steps of mean word bits, steps)
        self.switches = torch.zeros(1, dtype=torch.int64)
        for index, layer in enumerate(self.layers.values()):
            layer.weight.register_hook(lambda grad, index=index: self._on_gradient(index, grad))

    def on_batch(self, step: int, indices) -> None:
        self.generator.manual_seed(step_seed(self.params.seed, b"adapt", step))  # resume draws the same
        for layer in self.layers.values():
            layer.requantize(self.generator)
        words = [layer.bits()[0] for layer in self.layers.values()]
        self.word_bit_steps += torch.tensor([sum(words) / len(words), 1.0], dtype=torch.float64)

    def loss(self, model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        loss = super().loss(model, batch, teacher)
        if self.params.adaptive:
            self._adapt_strategy(float(loss.detach()))
        return loss

    def _adapt_strategy(self, loss: float) -> None:
        window = int(self.lookback.float().mean())
        if len(self.recent_losses) >= window:
            recent = self.recent_losses[-window:]
            current = int(self.strategy)
            if sum(recent) / len(recent) <= loss:  # not falling: push harder
                self.strategy[0] = min(current + 1, len(STRATEGIES) - 1)
            else:
                self.strategy[0] = 0
        self.recent_losses = (self.recent_losses + [loss])[-self.params.max_lookback:]

    def _on_gradient(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        layer = self.layer_list[index]
        quantized = stochastic_fixed_point(grad.detach().float(), *layer.bits(), self.generator).to(grad.dtype)
        if self.params.adaptive:
            norm = quantized.float().norm()
            self.grad_sum[index] += quantized.float() / norm if norm > 0 else quantized.float()
            self.count[index] += 1
            self._adapt_window(index)
            if self.count[index] >= self.lookback[index]:
                self._switch(index, layer)
        return quantized

    def _diversity(self, index: int) -> float:
        norm = float(self.grad_sum[index].norm())
        return float(self.count[index]) / norm if norm > 0 else math.inf

    def _adapt_window(self, index: int) -> None:
        p = self.params
        diversity = self._diversity(index)
        proposed = math.ceil(min(max(p.max_lookback / diversity, p.min_lookback), p.max_lookback))
        lookback = math.ceil(proposed * p.lookback_momentum + int(self.lookback[index]) * (1 - p.lookback_momentum))
        self.lookback[index] = lookback
        resolution = int(self.resolution[index]) + (lookback == p.max_lookback) - (lookback == p.min_lookback)
        self.resolution[index] = min(max(resolution, p.min_resolution), p.max_resolution)

    def _switch(self, index: int, layer: AdaptiveFixedPointLinear) -> None:
        p = self.params
        word, frac = layer.bits()
        row = layer.weight.detach()[0].float()
        bins = int(self.resolution[index])

        def lossy(word_bits: int, frac_bits: int) -> bool:
            return histogram_kl(row, stochastic_fixed_point(row, word_bits, frac_bits, self.generator), bins) > 0

        if frac >= p.min_frac_bits:  # push-down: fewest fraction bits, then the shortest word, losing nothing
            frac = lowest_lossless(lambda f: lossy(word, f), p.min_frac_bits, frac)
            word = lowest_lossless(lambda w: lossy(w, frac), frac + 1, word)
        frac = min(frac + push_up_step(self._diversity(index), frac, STRATEGIES[int(self.strategy)]), WORD_BITS_LIMIT)
        word = min(max(word, frac) + 1, WORD_BITS_LIMIT)
        frac = min(frac, WORD_BITS_LIMIT - p.results_buffer)
        word = max(min(frac + p.results_buffer, WORD_BITS_LIMIT), word)
        if (word, frac) != layer.bits():
            self.switches += 1
        layer.format.copy_(torch.tensor([word, frac]))
        self.count[index] = 0
        self.grad_sum[index].zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # the formats are model buffers (saved with the weights); the rest is the switching state
        state = {"lookback": self.lookback, "resolution": self.resolution, "count": self.count,
                 "strategy": self.strategy, "word_bit_steps": self.word_bit_steps, "switches": self.switches,
                 "recent_losses": torch.tensor(self.recent_losses, dtype=torch.float64)}
        state.update({f"grad_sum.{name}": g for name, g in zip(self.layers, self.grad_sum)})
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in ("lookback", "resolution", "count", "strategy", "word_bit_steps", "switches"):
            getattr(self, key).copy_(tensors[key])
        self.recent_losses = tensors["recent_losses"].tolist()
        for name, g in zip(self.layers, self.grad_sum):
            g.copy_(tensors[f"grad_sum.{name}"])

    def finalize(self, model: nn.Module) -> dict:
        formats = {name: list(layer.bits()) for name, layer in self.layers.items()}
        total, steps = self.word_bit_steps.tolist()
        weights = {name: layer.weight.numel() for name, layer in self.layers.items()}
        final_bits = sum(weights[n] * formats[n][0] for n in formats) / sum(weights.values())
        # the last optimizer step moved the master weights after the last re-quantization, and a
        # decision may have changed a format since: the saved weights are the updated ones on the final grid
        self.generator.manual_seed(step_seed(self.params.seed, b"adapt-final", 0))
        for layer in self.layers.values():
            layer.requantize(self.generator)
        self.fold_back(model)
        # format_* facts are also model metrics of the evaluate stage (claims can read them)
        return {"adaptive": self.params.adaptive, "quantized_layers": len(formats), "formats": formats,
                "format_word_bits_final_mean": round(final_bits, 4),
                # the budget: each step's mean word length over layers, averaged over the run's steps
                "format_word_bits_mean": round(total / steps, 4) if steps else float(self.params.word_bits),
                "format_frac_bits_final_mean": round(sum(f for _, f in formats.values()) / len(formats), 4),
                "format_switches": int(self.switches)}
