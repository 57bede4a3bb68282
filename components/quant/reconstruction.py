"""Block reconstruction: learn each unit's quantization variables so its quantized output matches
the full-precision one (the engine behind AdaRound, FlexRound, AdaQuant; later FlatQuant, CBQ,
PTQ1.61).

The engine walks the decoder blocks in order with two activation streams, both computed on the
calibration sequences once they reach block 0 (``capture_block_inputs``):

- the **fp stream**: inputs/outputs of the untouched full-precision blocks (the targets);
- the **quantized stream**: what the already-quantized earlier blocks (and, in ``layer`` mode,
  earlier Linears of the same block) produce. ``input_stream="quantized"`` (default, the
  "asymmetric reconstruction" of AdaRound eq. 25 / BRECQ) feeds it to the unit being optimised;
  ``input_stream="fp"`` feeds the fp inputs instead (AdaQuant's "parallel" mode).

A **unit** is one Linear (``mode="layer"``), one decoder block (``"block"``), or ``window``
consecutive blocks sliding with ``overlap`` blocks shared by neighbouring windows
(``"window"``, CBQ's cross-block reconstruction; a block in the overlap keeps its learnable
state and is optimised again by the next window, then finalised when it leaves the window).

Every target Linear gets one :class:`LearnableQuant` (from the method's factory). During
optimisation the unit is run with ``torch.func.functional_call``, substituting each Linear's
weight by ``fake_weight()``, so the model is never modified: its structure and weights are the
same afterwards. Adam minimises ``loss(unit_q(x_q), unit_fp(x_fp)) + sum(regularization(step))``
for ``iters`` steps on random mini-batches (``batch_size`` calibration sequences, fixed seed).

Loss ``"mse"``: squared error summed over the feature dim, averaged over tokens (the
``lp_loss(p=2)`` of the BRECQ/AdaRound reference code, so AdaRound's λ keeps its published
meaning; Adam makes the overall scale otherwise irrelevant). ``"mse+cos"`` adds
``cos_weight * mean(1 - cos(q, fp))`` over tokens.

The per-unit ``loss_before``/``loss_after`` (objective without regulariser, on all calibration
sequences) are measured with the *hard* quantized weights of ``finalize()``: before = the
initial grid (RTN-like), after = the learned one.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from components.quant.base import BLOCK_PREFIX, PackedWeights, QuantizationError, QuantizedModel, check_bits
from components.quant.calibration import capture_block_inputs, check_calibration, decoder_blocks, linear_groups
from components.quant.fake_quant import int_range

log = logging.getLogger("paperdag.quant")
# A unit whose loss ends more than 1% above where it started is reported: learning made the
# rounding worse (a diverging lr, bad calibration data). 1% keeps batch noise quiet.
WORSE_TOLERANCE = 0.01

FP16_MAX = float(torch.finfo(torch.float16).max)
FP16_TINY = float(torch.finfo(torch.float16).tiny)  # smallest normal fp16: a safe lower bound for steps

# (codes uint8 [out, in], scales fp16 [rows, groups], zeros uint8 [rows, groups] | None, dequant fp32 [out, in])
Finalized = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


@runtime_checkable
class LearnableQuant(Protocol):
    """The learnable quantization of one Linear weight, as the engine sees it.

    Optional (not part of the protocol check): ``fake_input(x) -> x``. If the object has it, the
    engine feeds that Linear's input through it in every quantized-stream forward (optimisation,
    the loss_before/after evaluations and the quantized stream passed on to later units), so a
    weight+activation method (FlatQuant) learns against its own activation fake-quant. The fp
    stream never sees it."""

    def parameters(self) -> Iterable[torch.Tensor | dict]:
        """Tensors to optimise (engine lr), or Adam param-group dicts with their own ``lr``."""

    def fake_weight(self) -> torch.Tensor:
        """The differentiable fake-quantized weight [out, in] used in the forward while learning."""

    def regularization(self, step: int) -> torch.Tensor | float:
        """Added to the loss at optimisation step ``step`` (AdaRound's rounding term; else 0)."""

    def finalize(self) -> Finalized:
        """The hard quantized weight in the packed int format (callable at any time, no side effects).
        A method that packs its own format (e.g. PTQ1.61) may return ``(None, None, None, dequant)``:
        the engine only uses ``dequant``."""


# --------------------------------------------------------------------------- integer grid


@dataclass(frozen=True)
class IntGrid:
    """The packed int grid of base.py: ``(code - zero) * scale`` with one fp16 scale per group.

    Weights are handled as ``[rows, groups, size]`` views (``view``); scales and zeros as
    ``[rows, groups]``. Symmetric grids use codes ``zero + [-qmax, qmax]`` with the implicit zero
    point ``2**(bits-1)`` (as rtn.py); asymmetric ones codes ``[0, 2**bits - 1]``."""

    bits: int
    granularity: str
    group_size: int
    symmetric: bool

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest stored code."""
        if self.symmetric:
            low, high = int_range(self.bits, True)
            return low + self.implicit_zero, high + self.implicit_zero
        return 0, self.levels

    @property
    def implicit_zero(self) -> int:
        return 2 ** (self.bits - 1)

    def check(self, weight: torch.Tensor, name: str) -> None:
        if weight.dim() != 2:
            raise QuantizationError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        if self.granularity == "group" and weight.shape[1] % self.group_size:
            raise QuantizationError(
                f"{name}: group_size={self.group_size} does not divide its input width {weight.shape[1]}; "
                "choose a group_size that divides every targeted layer's in_features")
        if self.granularity not in ("per_tensor", "per_channel", "group"):
            raise QuantizationError(f"{name}: unknown granularity {self.granularity!r}")

    def view(self, weight: torch.Tensor) -> torch.Tensor:
        """``[out, in]`` -> ``[rows, groups, size]``: the weights sharing one scale on the last dim."""
        out_features, in_features = weight.shape
        if self.granularity == "per_tensor":
            return weight.reshape(1, 1, -1)
        if self.granularity == "per_channel":
            return weight.reshape(out_features, 1, in_features)
        return weight.reshape(out_features, in_features // self.group_size, self.group_size)

    def expand(self, per_group: torch.Tensor, shape) -> torch.Tensor:
        """``[rows, groups]`` values -> broadcastable to the ``[out, in]`` weight."""
        if self.granularity == "per_tensor":
            return per_group.reshape(1, 1)
        if self.granularity == "per_channel":
            return per_group.reshape(shape[0], 1)
        return per_group.repeat_interleave(self.group_size, dim=1)

    def default_zero(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full_like(like, float(self.implicit_zero))

    def encode(self, codes: torch.Tensor, step16: torch.Tensor, zero: torch.Tensor, shape,
               name: str = "weight") -> Finalized:
        """Integer codes ``[rows, groups, size]`` (float or int), fp16 steps and integer zeros
        ``[rows, groups]`` -> the packed tuple, with dequant computed from the stored fp16 scale."""
        low, high = self.code_range
        codes = codes.float()
        if torch.any(codes != torch.round(codes)) or codes.min() < low or codes.max() > high:
            raise QuantizationError(f"{name}: codes off the {self.bits}-bit grid [{low}, {high}]")
        if step16.dtype != torch.float16 or not torch.isfinite(step16).all() or (step16 <= 0).any():
            raise QuantizationError(f"{name}: scales must be positive finite fp16")
        zero = zero.float()
        dequant = ((codes - zero.unsqueeze(-1)) * step16.float().unsqueeze(-1)).reshape(shape)
        zeros = None if self.symmetric else zero.to(torch.uint8)
        return codes.to(torch.uint8).reshape(shape), step16, zeros, dequant

    def quantize(self, weight: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None = None,
                 name: str = "weight") -> Finalized:
        """Round-to-nearest of ``weight`` on the grid of (fp32) ``step`` ``[rows, groups]``."""
        step16 = to_fp16_step(step)
        zero = self.default_zero(step16.float()) if zero is None else zero
        low, high = self.code_range
        rows = self.view(weight.detach().float())
        codes = torch.clamp(torch.round(rows / step16.float().unsqueeze(-1)) + zero.unsqueeze(-1), low, high)
        return self.encode(codes, step16, zero, weight.shape, name)


LEARNED_BITS = (2, 3, 4, 8)  # the widths the learned-rounding quantizers offer


def check_learned_bits(method: str, bits: int, supported=LEARNED_BITS) -> None:
    """``check_bits`` plus the narrower set these methods' Params allow (Params may be built
    without validation, e.g. ``model_construct``)."""
    check_bits(method, bits)
    if bits not in supported:
        raise QuantizationError(f"{method}: unsupported bits={bits!r}; supported bits: {list(supported)}")


def to_fp16_step(step: torch.Tensor) -> torch.Tensor:
    """A learned fp32 step as the stored fp16 scale (round to nearest, kept positive and finite)."""
    if not torch.isfinite(step).all():
        raise QuantizationError("learned quantization step is not finite; lower the learning rate")
    return step.detach().float().clamp(FP16_TINY, FP16_MAX).to(torch.float16)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class ReconstructionConfig:
    mode: str = "block"                 # "layer" | "block" | "window"
    iters: int = 200                    # Adam steps per unit
    lr: float = 1e-3                    # for tensors returned without their own param group
    batch_size: int = 4                 # calibration sequences per step
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "mse"  # "mse" | "mse+cos" | fn(q, fp)
    cos_weight: float = 1.0
    input_stream: str = "quantized"     # "quantized" | "fp"
    window: int = 2                     # blocks per unit (mode="window")
    overlap: int = 1                    # blocks shared by consecutive windows
    schedule: str = "constant"          # "constant" | "cosine" (cosine annealing to 0)
    seed: int = 0
    progress: bool | None = None        # None: a bar only on a terminal
    keep_quants: bool = True            # return the learned objects (False: drop each once finalised)
    # -- PTQ1.61 / gradient-PTQ study extensions (defaults keep the behaviour above)
    optimizer: str = "adam"             # "adam" | "adamw" (torch defaults) | "sgd" (momentum 0.9)
    dual_target: bool = False           # also pass fp_unit(x_q) to a callable loss: fn(q, fp, fp_of_q)

    def validate(self, method: str) -> None:
        def bad(what: str):
            raise QuantizationError(f"{method}: {what}")

        if self.mode not in ("layer", "block", "window"):
            bad(f"unknown reconstruction mode {self.mode!r}; expected 'layer', 'block' or 'window'")
        if self.input_stream not in ("quantized", "fp"):
            bad(f"unknown input_stream {self.input_stream!r}; expected 'quantized' or 'fp'")
        if not callable(self.loss) and self.loss not in ("mse", "mse+cos"):
            bad(f"unknown reconstruction loss {self.loss!r}; expected 'mse' or 'mse+cos'")
        if self.schedule not in ("constant", "cosine"):
            bad(f"unknown lr schedule {self.schedule!r}; expected 'constant' or 'cosine'")
        if self.iters < 0 or self.batch_size < 1 or not self.lr > 0:
            bad(f"need iters >= 0, batch_size >= 1 and lr > 0; got iters={self.iters}, "
                f"batch_size={self.batch_size}, lr={self.lr}")
        if self.mode == "window" and not 0 <= self.overlap < self.window:
            bad(f"window mode needs 0 <= overlap < window; got window={self.window}, overlap={self.overlap}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
        if self.dual_target and not callable(self.loss):
            bad("dual_target=True needs a callable loss fn(q, fp, fp_of_q)")


@dataclass
class ReconstructionResult:
    weights: dict[str, Finalized]                       # "<module>.weight" -> packed tuple
    metrics: dict[str, dict] = field(default_factory=dict)  # unit -> loss_before/after, ...
    quants: dict[str, LearnableQuant] = field(default_factory=dict)  # module name -> learned object


OPTIMIZERS = {"adam": lambda groups, lr: torch.optim.Adam(groups, lr=lr),
              "adamw": lambda groups, lr: torch.optim.AdamW(groups, lr=lr),
              "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9)}


def reconstruction_loss(q: torch.Tensor, fp: torch.Tensor, config: ReconstructionConfig,
                        fp_of_q: torch.Tensor | None = None) -> torch.Tensor:
    """``fp_of_q``: the fp unit's output on the quantized-stream input (``dual_target`` only)."""
    if callable(config.loss):
        return config.loss(q, fp) if fp_of_q is None else config.loss(q, fp, fp_of_q)
    loss = (q - fp).pow(2).sum(-1).mean()
    if config.loss == "mse+cos":
        loss = loss + config.cos_weight * (1 - F.cosine_similarity(q, fp, dim=-1)).mean()
    return loss


def window_spans(n_blocks: int, config: ReconstructionConfig) -> list[tuple[int, int]]:
    """Block ranges ``[start, end)`` of the units in block/window mode."""
    if config.mode == "block":
        return [(i, i + 1) for i in range(n_blocks)]
    size, stride = config.window, config.window - config.overlap
    spans, start = [], 0
    while True:
        spans.append((start, min(start + size, n_blocks)))
        if start + size >= n_blocks:
            return spans
        start += stride


def _out(result):
    return result[0] if isinstance(result, tuple) else result


class _Engine:
    def __init__(self, model, tokens, make_quant, config, targets, method):
        self.config, self.method, self.make_quant = config, method, make_quant
        self.blocks = decoder_blocks(model)
        self.prefix = {i: f"{BLOCK_PREFIX}{i}." for i in range(len(self.blocks))}
        # per block: target Linear names inside the block, in forward (input-sharing group) order
        wanted = set(targets)
        self.targets: dict[int, list[list[str]]] = {}
        for i, block in enumerate(self.blocks):
            groups = [[n for n in g if self.prefix[i] + n in wanted] for g in linear_groups(block)]
            self.targets[i] = [g for g in groups if g]
        self.modules = dict(model.named_modules())
        self.mb = min(config.batch_size, tokens.shape[0])
        inputs = capture_block_inputs(model, tokens, batch_size=self.mb)
        self.kwargs = inputs.kwargs
        self.fp_x = torch.cat(inputs.batches)          # fp stream, at the current block
        self.q_x = self.fp_x                            # quantized stream, at the current block
        self.gen = torch.Generator().manual_seed(config.seed)
        self.quants: dict[str, LearnableQuant] = {}
        self.weights: dict[str, Finalized] = {}
        self.metrics: dict[str, dict] = {}
        self.bar = None

    # ---- forward helpers
    def _params(self, i: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block i's tensors (detached, so the model gets no gradients) with ``weights`` substituted."""
        block = self.blocks[i]
        tensors = {n: p.detach() for n, p in block.named_parameters()}
        tensors.update({n: b for n, b in block.named_buffers()})
        tensors.update(weights)
        return tensors

    def _block(self, i: int, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Block i on ``x`` with optional weight overrides; never touches the model's parameters."""
        block = self.blocks[i]
        if not weights and not torch.is_grad_enabled():
            return _out(block(x, **self.kwargs))
        return _out(functional_call(block, self._params(i, weights or {}), (x,), self.kwargs))

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(x[s:s + self.mb]) for s in range(0, x.shape[0], self.mb)])

    def _hard(self, names: list[tuple[int, str]]) -> dict[int, dict[str, torch.Tensor]]:
        """The current hard-quantized weights, as functional_call overrides per block."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for i, local in names:
            full = self.prefix[i] + local
            dequant = self.weights[full + ".weight"][3] if full + ".weight" in self.weights \
                else self.quants[full].finalize()[3]
            out.setdefault(i, {})[local + ".weight"] = dequant
        return out

    def _fake(self, names: list[tuple[int, str]]) -> dict[int, dict[str, torch.Tensor]]:
        out: dict[int, dict[str, torch.Tensor]] = {}
        for i, local in names:
            out.setdefault(i, {})[local + ".weight"] = self.quants[self.prefix[i] + local].fake_weight()
        return out

    def _quant(self, i: int, local: str) -> LearnableQuant:
        full = self.prefix[i] + local
        if full not in self.quants:
            linear = self.modules[full]
            quant = self.make_quant(full, linear)
            if not isinstance(quant, LearnableQuant):
                raise QuantizationError(f"{self.method}: factory returned {type(quant).__name__} for {full}, "
                                        "not a LearnableQuant")
            self.quants[full] = quant
        return self.quants[full]

    # ---- optimisation of one unit
    def _optimise(self, unit: str, quants: list[LearnableQuant], weights_fn, forward_q, x_q: torch.Tensor,
                  y_fp: torch.Tensor, y_fpq: torch.Tensor | None = None):
        """Adam on one unit: ``forward_q(x_q batch, weights_fn(hard))`` against the fp outputs ``y_fp``."""
        n_rows = x_q.shape[0]
        cfg = self.config

        def evaluate() -> float:
            total, count = 0.0, 0
            with torch.no_grad():
                hard = weights_fn(True)
                for s in range(0, n_rows, self.mb):
                    sl = slice(s, s + self.mb)
                    q = forward_q(x_q[sl], hard)
                    fp = y_fp[sl]
                    total += float(reconstruction_loss(q, fp, cfg, None if y_fpq is None else y_fpq[sl])) * q.shape[0]
                    count += q.shape[0]
            return total / max(count, 1)

        before = evaluate()
        groups, default = [], []
        for quant in quants:
            for item in quant.parameters():
                (groups.append(dict(item)) if isinstance(item, dict) else default.append(item))
        if default:
            groups.append({"params": default})
        loss_value = float("nan")
        if groups and cfg.iters > 0:
            optimizer = OPTIMIZERS[cfg.optimizer](groups, cfg.lr)
            scheduler = None
            if cfg.schedule == "cosine":
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, cfg.iters) / cfg.iters)))
            with torch.enable_grad():
                for step in range(cfg.iters):
                    idx = torch.randint(0, n_rows, (self.mb,), generator=self.gen)
                    loss = reconstruction_loss(forward_q(x_q[idx], weights_fn(False)), y_fp[idx], cfg,
                                               None if y_fpq is None else y_fpq[idx])
                    reg = sum((quant.regularization(step) for quant in quants), torch.zeros(()))
                    optimizer.zero_grad(set_to_none=True)
                    (loss + reg).backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    loss_value = float(loss.detach())
                    if self.bar is not None and step % 10 == 0:
                        self.bar.set_postfix_str(
                            f"{unit} step {step} loss {loss_value:.4g} reg {float(reg.detach()):.3g}")
        after = evaluate()
        if not after <= before * (1 + WORSE_TOLERANCE):  # also true for a NaN loss
            log.warning("%s: the reconstruction loss of %s rose from %.4g to %.4g while learning (lr=%g, %d iters); "
                        "the learned result is worse than where it started: lower the lr or check the calibration "
                        "data", self.method, unit, before, after, cfg.lr, cfg.iters)
        self.metrics[unit] = dict(loss_before=before, loss_after=after, iters=cfg.iters,
                                  last_batch_loss=loss_value)

    def _finalize(self, i: int, local: str) -> None:
        full = self.prefix[i] + local
        result = self.quants[full].finalize()
        dequant = result[3]
        weight = self.modules[full].weight
        if dequant.shape != weight.shape:
            raise QuantizationError(f"{self.method}: finalize() of {full} gave shape {tuple(dequant.shape)}, "
                                    f"expected {tuple(weight.shape)}")
        self.weights[full + ".weight"] = tuple(t.detach() if t is not None else None for t in result)
        if not self.config.keep_quants:
            del self.quants[full]  # its parameters and optimiser state are no longer needed

    # ---- modes
    def run_windows(self) -> None:
        spans = window_spans(len(self.blocks), self.config)
        self.bar = tqdm(total=len(spans), desc=f"{self.method} reconstruction", disable=self._no_bar())
        position = 0  # both streams sit at the input of block `position`
        for n, (start, end) in enumerate(spans):
            last = n == len(spans) - 1
            leave = end if last else min(spans[n + 1][0], end)
            assert start == position
            names = [(i, local) for i in range(start, end) for g in self.targets[i] for local in g]
            if names:
                quants = [self._quant(i, local) for i, local in names]
                fp_y = self._run(lambda h: self._through(start, end, h, {}), self.fp_x)

                def weights_fn(hard, names=names):
                    return self._hard(names) if hard else self._fake(names)

                def forward_q(x, weights, start=start, end=end):
                    return self._through(start, end, x, weights)

                unit = f"blocks.{start}" if end - start == 1 else f"blocks.{start}-{end - 1}"
                fpq_y = self._run(lambda h: self._through(start, end, h, {}), self._stream_q()) \
                    if self.config.dual_target else None
                with self._input_quant(names):
                    self._optimise(unit, quants, weights_fn, forward_q, self._stream_q(), fp_y, fpq_y)
                fp_y = fpq_y = None
            for i in range(start, leave):  # blocks leaving the window: finalise and advance both streams
                for g in self.targets[i]:
                    for local in g:
                        self._finalize(i, local)
                self._advance(i)
                position = i + 1
            self.bar.update()
        self.bar.close()

    def _through(self, start: int, end: int, x: torch.Tensor, weights: dict[int, dict]) -> torch.Tensor:
        for i in range(start, end):
            x = self._block(i, x, weights.get(i))
        return x

    def _stream_q(self) -> torch.Tensor:
        return self.fp_x if self.config.input_stream == "fp" else self.q_x

    def _advance(self, i: int) -> None:
        dequant = {local + ".weight": self.weights[self.prefix[i] + local + ".weight"][3]
                   for g in self.targets[i] for local in g}
        if self.config.input_stream == "quantized":
            with self._input_quant([(i, local) for g in self.targets[i] for local in g]):
                self.q_x = self._run(lambda h: self._block(i, h, dequant), self.q_x)
        self.fp_x = self._run(lambda h: self._block(i, h), self.fp_x)
        if self.config.input_stream == "fp":
            self.q_x = self.fp_x

    def run_layers(self) -> None:
        n_units = sum(len(g) for groups in self.targets.values() for g in groups)
        self.bar = tqdm(total=n_units, desc=f"{self.method} reconstruction", disable=self._no_bar())
        for i in range(len(self.blocks)):
            for group in self.targets[i]:
                x_fp = self._capture(i, group, self.fp_x, {})
                if self.config.input_stream == "fp":
                    x_q = x_fp
                else:
                    done = {local + ".weight": self.weights[self.prefix[i] + local + ".weight"][3]
                            for g in self.targets[i] for local in g
                            if self.prefix[i] + local + ".weight" in self.weights}
                    with self._input_quant([(i, k.removesuffix(".weight")) for k in done]):
                        x_q = self._capture(i, group, self.q_x, done)
                for local in group:
                    quant = self._quant(i, local)
                    weight = self.modules[self.prefix[i] + local].weight.detach()
                    full = self.prefix[i] + local

                    def weights_fn(hard, quant=quant):
                        return quant.finalize()[3] if hard else quant.fake_weight()

                    y_fp = self._run(lambda x, w=weight: F.linear(x, w), x_fp[local])
                    y_fpq = self._run(lambda x, w=weight: F.linear(x, w), x_q[local]) \
                        if self.config.dual_target else None
                    fake_input = getattr(quant, "fake_input", None)
                    forward_q = F.linear if fake_input is None else \
                        (lambda x, w, f=fake_input: F.linear(f(x), w))
                    self._optimise(full, [quant], weights_fn, forward_q, x_q[local], y_fp, y_fpq)
                    del y_fp, y_fpq
                    self._finalize(i, local)
                    self.bar.update()
                del x_fp, x_q
            self._advance(i)
        self.bar.close()

    @contextmanager
    def _input_quant(self, names: list[tuple[int, str]]):
        """Pre-hooks feeding each named Linear's input through its quant's optional ``fake_input``."""
        handles = []
        try:
            for i, local in names:
                full = self.prefix[i] + local
                fake_input = getattr(self.quants.get(full), "fake_input", None)
                if fake_input is not None:
                    handles.append(self.modules[full].register_forward_pre_hook(
                        lambda _m, args, f=fake_input: (f(args[0]),) + tuple(args[1:])))
            yield
        finally:
            for h in handles:
                h.remove()

    def _capture(self, i: int, group: list[str], x: torch.Tensor, weights: dict) -> dict[str, torch.Tensor]:
        """Inputs of the Linears in ``group`` of block i, for all calibration sequences."""
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in group}
        shared: dict[int, str] = {}
        handles = []
        for local in group:
            def hook(_module, args, local=local):
                seen[local].append(args[0].detach())
            handles.append(self.modules[self.prefix[i] + local].register_forward_pre_hook(hook))
        try:
            self._run(lambda h: self._block(i, h, weights), x)
        finally:
            for h in handles:
                h.remove()
        out: dict[str, torch.Tensor] = {}
        for local in group:  # Linears fed by the same tensor (q/k/v) share one cached copy
            key = seen[local][0].data_ptr()
            out[local] = out[shared[key]] if key in shared else torch.cat(seen[local])
            shared.setdefault(key, local)
        return out

    def _no_bar(self) -> bool | None:
        return None if self.config.progress is None else not self.config.progress


def reconstruct(model: PreTrainedModel, tokens: torch.Tensor,
                make_quant: Callable[[str, torch.nn.Linear], LearnableQuant],
                config: ReconstructionConfig, targets: list[str], method: str = "reconstruction"
                ) -> ReconstructionResult:
    """Optimise one ``make_quant(name, linear)`` per target Linear (full module names) by
    reconstruction on calibration ``tokens`` [n_sequences, seq_len]; ``model`` is not modified.

    Returns every target's finalised packed tuple (keyed ``"<module>.weight"``), per-unit
    metrics and the learned objects."""
    config.validate(method)
    was_training = model.training
    model.eval()  # no dropout in the calibration forwards; restored below
    try:
        engine = _Engine(model, tokens, make_quant, config, targets, method)
        missing = set(targets) - {engine.prefix[i] + n for i, gs in engine.targets.items() for g in gs for n in g}
        if missing:
            raise QuantizationError(f"{method}: targets outside the decoder blocks' Linears: {sorted(missing)}")
        if config.mode == "layer":
            engine.run_layers()
        else:
            engine.run_windows()
    finally:
        model.train(was_training)
    return ReconstructionResult(engine.weights, engine.metrics, engine.quants)


# --------------------------------------------------------------------------- packaging


def checked_grid_inputs(quantizer, model: PreTrainedModel, calibration: torch.Tensor | None
                        ) -> tuple[torch.Tensor, IntGrid, list[tuple[str, torch.nn.Linear]]]:
    """What an int-grid reconstruction quantizer checks before any work: not already quantized,
    supported bits, usable calibration, and a grid that fits every target Linear. Returns
    ``(calibration tokens, grid, target linears)``."""
    p = quantizer.params
    quantizer.refuse_if_quantized(model)
    check_learned_bits(quantizer.key, p.bits)
    tokens = check_calibration(calibration, quantizer.key)
    grid = IntGrid(p.bits, p.granularity, p.group_size, p.symmetric)
    linears = quantizer.target_linears(model)
    for name, linear in linears:
        grid.check(linear.weight, f"{name}.weight")
    return tokens, grid, linears


def quantized_model(model: PreTrainedModel, weights: dict[str, Finalized], scheme: str, meta: dict,
                    grids: dict[str, IntGrid]) -> QuantizedModel:
    """The full dequantized state dict plus the packed store of ``weights`` (each with its grid)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    store = PackedWeights()
    for name, (codes, scales, zeros, dequant) in weights.items():
        grid = grids[name]
        state[name] = dequant.to(state[name].dtype)
        store.add_int(name, dequant.shape, codes, scales, zeros, grid.bits, grid.granularity, grid.group_size,
                      grid.symmetric)
    return QuantizedModel(state_dict=state, packed=store.packed, meta=store.meta(scheme, **meta))


def flatten_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    """Per-unit numbers as flat ``<unit>/loss_before|loss_after`` floats (MLflow-friendly) plus sums."""
    flat = {f"{unit}/{key}": float(m[key]) for unit, m in metrics.items() for key in ("loss_before", "loss_after")}
    flat["reconstruction_loss_before"] = float(sum(m["loss_before"] for m in metrics.values()))
    flat["reconstruction_loss_after"] = float(sum(m["loss_after"] for m in metrics.values()))
    return flat


def linear_output_errors(model: PreTrainedModel, weights: dict[str, torch.Tensor], tokens: torch.Tensor,
                         batch_size: int = 8) -> dict[str, float]:
    """Per-Linear output MSE ``mean((X W_q^T - X W^T)^2)`` on the fp model's own inputs ``X`` for
    ``tokens`` (e.g. held-out sequences): an evaluation of quantized ``weights`` (``"<module>.weight"``
    -> tensor) layer by layer, independent of how they were found. ``model`` is not modified."""
    modules = dict(model.named_modules())
    sums = {name: 0.0 for name in weights}
    counts = {name: 0 for name in weights}
    handles = []
    for name, w_q in weights.items():
        linear = modules[name.removesuffix(".weight")]

        def hook(module, args, output, name=name, w_q=w_q):
            err = F.linear(args[0], w_q.to(output.dtype)) - output
            sums[name] += float(err.pow(2).sum())
            counts[name] += err.numel()
        handles.append(linear.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for s in range(0, tokens.shape[0], batch_size):
                model(input_ids=tokens[s:s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / max(counts[name], 1) for name in weights}
