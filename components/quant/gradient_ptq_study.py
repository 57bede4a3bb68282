"""Gradient-based PTQ study (Yvinec, Dapogny & Bailly 2023, "Gradient-Based Post-Training
Quantization: Challenging the Status Quo", arXiv 2308.07662): an ablation harness over the
block-reconstruction engine, not a new method.

The paper (no public code) studies learned-rounding PTQ and reports, per its abstract, that the
process is robust to weight selection, feature augmentation and the choice of calibration set,
and derives best practices on the problem formulation (loss, degrees of freedom, non-uniform
grids) and the optimisation (choice of variables and optimizer), plus importance-based mixed
precision. Only the abstract was available to us; the directions encoded in :func:`study_claims`
are therefore the common expectations those findings point to, labelled as such, and the grid
reports every cell so a reader can check any other direction.

``gradient_ptq`` is one quantizer whose Params span the ablation axes, so a recipe lists one stage
per cell and states claims over their ``ppl_all``:

- ``loss``: ``"mse"`` (squared error summed over features, mean over tokens: the engine's),
  ``"mse+cos"`` (+ mean(1 - cos)), ``"mse+kl"`` (+ KL(softmax(fp) || softmax(q)) over the feature
  dim of the unit output, mean over tokens: a cheap distribution-matching term; the paper's own
  KL variant is not documented in the abstract).
- ``variables`` (the degrees of freedom on the fixed-bit integer grid, RTN-initialised):
  ``"rounding"`` AdaRound (rectified-sigmoid up/down per weight + annealed regulariser, RTN's
  step fixed); ``"weights"`` AdaQuant-style continuous weights ``W + ΔW`` through a
  straight-through round, step fixed; ``"scales"`` the LSQ step only (codes = round(W / s));
  ``"rounding+scales"`` AdaRound's rounding with the step learned jointly
  (``s · (floor(W / s0) + h(V) - z)``).
- ``optimizer``: ``"adam"`` | ``"adamw"`` (torch defaults) | ``"sgd"`` (momentum 0.9). Adam's lrs
  are per-step moves; SGD's multiply gradients, so ``lr_multiplier`` rescales every lr (default:
  ``SGD_LR_MULTIPLIERS`` per variable for sgd, 1 otherwise).
- ``iters``, ``calibration_sequences`` (the stage samples that many training blocks; the task's
  fixed-seed sample of n blocks is the prefix of the sample of m > n, so sizes are nested), and
  ``mode`` (``"layer"`` | ``"block"``).

:func:`ablation_grid` runs one-factor-at-a-time (or full-product) cells around a base config on a
model and returns rows with perplexity, reconstruction loss and wall time;
:func:`format_table` prints them; :func:`study_claims` returns the checkable findings as
``components.eval.claims.Claim`` objects over those rows.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.adaquant import lm_loss
from components.quant.adaround import inverse_rectified_sigmoid, rectified_sigmoid
from components.quant.base import CalibratedParams, QuantizationError, QuantizedModel, Quantizer, check_bits, \
    uniform_int_meta
from components.quant.calibration import check_calibration
from components.quant.fake_quant import round_ste
from components.quant.reconstruction import (IntGrid, ReconstructionConfig, flatten_metrics, quantized_model,
                                             reconstruct, to_fp16_step)
from components.quant.rtn import RtnQuantizer, quantize_tensor
from components.registry import Paper

LOSSES = ("mse", "mse+cos", "mse+kl")
VARIABLES = ("rounding", "weights", "scales", "rounding+scales")
OPTIMIZERS = ("adam", "adamw", "sgd")
MODES = ("layer", "block")
BITS = (2, 3, 4, 8)
GRANULARITIES = ("per_tensor", "per_channel", "group")
# SGD's lr multipliers per variable group (Params.lr_multiplier=None): chosen so that the first
# momentum-SGD step (~10 x lr x mean|grad|) matches Adam's per-step move on the trained micro model
# (mean |grad| at init over block 0, W3 per-channel: V ~2e-3, ΔW ~4e-3, log step ~3e-2).
SGD_LR_MULTIPLIERS = {"rounding": 50.0, "weights": 25.0, "scales": 3.0}
AXES = ("loss", "variables", "optimizer", "iters", "calibration_sequences", "mode")


def mse_kl_loss(q: torch.Tensor, fp: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """Engine mse plus ``kl_weight * KL(softmax(fp) || softmax(q))`` over the feature dim, token mean."""
    mse = (q - fp).pow(2).sum(-1).mean()
    kl = F.kl_div(F.log_softmax(q, -1).flatten(0, -2), F.log_softmax(fp, -1).flatten(0, -2),
                  reduction="batchmean", log_target=True)
    return mse + kl_weight * kl


class StudyWeight:
    """The LearnableQuant of one Linear weight for one ``variables`` choice (module docstring)."""

    def __init__(self, weight: torch.Tensor, grid: IntGrid, variables: str, iters: int,
                 lrs: dict[str, float], reg_lambda: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0),
                 warm_start: float = 0.2, name: str = "weight"):
        if variables not in VARIABLES:
            raise QuantizationError(f"{name}: unknown variables={variables!r}; expected one of {list(VARIABLES)}")
        grid.check(weight, name)
        self.weight = weight.detach().float().clone()
        self.grid, self.variables, self.name, self.shape = grid, variables, name, self.weight.shape
        _, scales, zeros, _ = quantize_tensor(self.weight, grid.bits, grid.granularity, grid.group_size,
                                              grid.symmetric, name)
        self.step0 = scales.float()                                  # [rows, groups], RTN init
        self.zero = zeros.float() if zeros is not None else grid.default_zero(self.step0)
        self.iters, self.reg_lambda, self.beta_range, self.warm_start = iters, reg_lambda, beta_range, warm_start
        self.rounding = "rounding" in variables
        self.V = self.delta = self.log_step = None
        if self.rounding:
            scaled = grid.view(self.weight) / self.step0.unsqueeze(-1)
            self.floor = torch.floor(scaled)
            self.V = torch.nn.Parameter(inverse_rectified_sigmoid(scaled - self.floor))
        if variables == "weights":
            self.delta = torch.nn.Parameter(torch.zeros(self.shape))  # ΔW in units of step0
        if "scales" in variables:
            self.log_step = torch.nn.Parameter(torch.log(self.step0))
        self.lrs = lrs

    def parameters(self):
        groups = []
        if self.V is not None:
            groups.append({"params": [self.V], "lr": self.lrs["rounding"]})
        if self.delta is not None:
            groups.append({"params": [self.delta], "lr": self.lrs["weights"]})
        if self.log_step is not None:
            groups.append({"params": [self.log_step], "lr": self.lrs["scales"]})
        return groups

    def _step(self) -> torch.Tensor:
        return torch.exp(self.log_step) if self.log_step is not None else self.step0

    def _source(self) -> torch.Tensor:
        """The weight being rounded: W, or W + ΔW for ``variables="weights"``."""
        if self.delta is None:
            return self.weight
        return self.weight + self.delta * self.grid.expand(self.step0, self.shape)

    def fake_weight(self) -> torch.Tensor:
        low, high = self.grid.code_range
        step = self._step().unsqueeze(-1)
        zero = self.zero.unsqueeze(-1)
        if self.rounding:
            codes = torch.clamp(self.floor + rectified_sigmoid(self.V) + zero, low, high)
        else:  # LSQ-style: clamp before the straight-through round
            codes = round_ste(torch.clamp(self.grid.view(self._source()) / step + zero, low, high))
        return ((codes - zero) * step).reshape(self.shape)

    def regularization(self, step: int) -> torch.Tensor | float:
        if not self.rounding or step < self.warm_start * self.iters:
            return 0.0
        start = self.warm_start * self.iters
        rel = (step - start) / max(self.iters - start, 1)
        high, low = self.beta_range
        beta = low + 0.5 * (high - low) * (1 + math.cos(rel * math.pi))
        return self.reg_lambda * (1 - (2 * rectified_sigmoid(self.V) - 1).abs().pow(beta)).sum()

    def finalize(self):
        with torch.no_grad():
            step16 = to_fp16_step(self._step())
            if self.rounding:
                low, high = self.grid.code_range
                up = (rectified_sigmoid(self.V) >= 0.5).float()
                codes = torch.clamp(self.floor + up + self.zero.unsqueeze(-1), low, high)
                return self.grid.encode(codes, step16, self.zero, self.shape, self.name)
            return self.grid.quantize(self._source(), step16.float(), self.zero, self.name)


class GradientPtqQuantizer(Quantizer):
    key = "gradient_ptq"
    paper = Paper(title="Gradient-Based Post-Training Quantization: Challenging the Status Quo",
                  url="https://arxiv.org/abs/2308.07662", arxiv="2308.07662")
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[2, 3, 4, 8] = Field(3, description="bits per weight code")
        granularity: Literal["per_tensor", "per_channel", "group"] = Field(
            "per_channel", description="one step per tensor, per output channel, or per group")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(True, description="symmetric grid around 0 (no stored zero points)")
        loss: Literal["mse", "mse+cos", "mse+kl"] = Field("mse", description="reconstruction loss (ablation axis)")
        variables: Literal["rounding", "weights", "scales", "rounding+scales"] = Field(
            "rounding", description="learned degrees of freedom (ablation axis)")
        optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="optimizer (ablation axis)")
        mode: Literal["layer", "block"] = Field("block", description="reconstruction unit: a Linear or a block")
        input_stream: Literal["quantized", "fp"] = Field(
            "quantized", description="unit inputs from the already-quantized model or the fp model")
        iters: int = Field(200, ge=0, description="optimisation steps per unit (ablation axis)")
        batch_size: int = Field(4, gt=0, description="calibration sequences per step")
        lr_rounding: float = Field(5e-2, gt=0, description="lr of AdaRound's V (as adaround.py)")
        lr_weights: float = Field(2e-3, gt=0, description="lr of ΔW, in units of the initial step (as adaquant.py)")
        lr_scales: float = Field(1e-2, gt=0, description="lr of log(step) (as adaquant.py)")
        lr_multiplier: float | None = Field(
            None, gt=0, description=f"multiplies every lr; None = {SGD_LR_MULTIPLIERS} for sgd, 1 otherwise")
        schedule: Literal["constant", "cosine"] = Field("constant", description="lr schedule")
        reg_lambda: float = Field(0.01, ge=0, description="AdaRound regulariser weight (rounding variables)")
        kl_weight: float = Field(1.0, ge=0, description="weight of the KL term (loss=mse+kl)")

    def check_params(self) -> None:
        """Every axis value, re-checked (Params may be built with ``model_construct``)."""
        p = self.params
        check_bits(self.key, p.bits)
        for axis, allowed in (("bits", BITS), ("granularity", GRANULARITIES), ("loss", LOSSES),
                              ("variables", VARIABLES), ("optimizer", OPTIMIZERS), ("mode", MODES),
                              ("input_stream", ("quantized", "fp")), ("schedule", ("constant", "cosine"))):
            value = getattr(p, axis)
            if value not in allowed:
                raise QuantizationError(f"{self.key}: unknown {axis}={value!r}; expected one of {list(allowed)}")
        for axis in ("iters", "calibration_sequences", "batch_size"):
            value = getattr(p, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if axis == "iters" else 1):
                raise QuantizationError(f"{self.key}: invalid {axis}={value!r}")
        for axis in ("lr_rounding", "lr_weights", "lr_scales"):
            value = getattr(p, axis)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise QuantizationError(f"{self.key}: invalid {axis}={value!r}; must be a positive number")
        if p.lr_multiplier is not None and not (isinstance(p.lr_multiplier, (int, float)) and p.lr_multiplier > 0):
            raise QuantizationError(f"{self.key}: invalid lr_multiplier={p.lr_multiplier!r}")

    def lrs(self) -> dict[str, float]:
        p = self.params
        base = {"rounding": p.lr_rounding, "weights": p.lr_weights, "scales": p.lr_scales}
        if p.lr_multiplier is not None:
            return {k: v * p.lr_multiplier for k, v in base.items()}
        if p.optimizer == "sgd":
            return {k: v * SGD_LR_MULTIPLIERS[k] for k, v in base.items()}
        return base

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        self.refuse_if_quantized(model)
        self.check_params()
        tokens = check_calibration(calibration, self.key)
        grid = IntGrid(p.bits, p.granularity, p.group_size, p.symmetric)
        linears = self.target_linears(model)
        for name, linear in linears:
            grid.check(linear.weight, f"{name}.weight")
        lrs = self.lrs()
        loss = (lambda q, fp: mse_kl_loss(q, fp, p.kl_weight)) if p.loss == "mse+kl" else p.loss
        config = ReconstructionConfig(mode=p.mode, iters=p.iters, lr=lrs["rounding"], batch_size=p.batch_size,
                                      loss=loss, input_stream=p.input_stream, schedule=p.schedule,
                                      optimizer=p.optimizer, seed=p.seed)

        def make(name, linear):
            return StudyWeight(linear.weight, grid, p.variables, p.iters, lrs, p.reg_lambda, name=f"{name}.weight")

        result = reconstruct(model, tokens, make, config, [n for n, _ in linears], self.key)
        study = dict(loss=p.loss, variables=p.variables, optimizer=p.optimizer, iters=p.iters, mode=p.mode,
                     calibration_sequences=int(tokens.shape[0]), lrs=lrs, input_stream=p.input_stream)
        meta = dict(**uniform_int_meta(p), metrics=flatten_metrics(result.metrics), study=study)
        return quantized_model(model, result.weights, self.key, meta, {n: grid for n in result.weights})


# --------------------------------------------------------------------------- the ablation grid


def cell_name(axis: str, value) -> str:
    return f"{axis}={value}"


def _cells(base: dict, axes: dict[str, list], design: str) -> list[tuple[str, dict]]:
    if design == "one_at_a_time":
        return [(cell_name(axis, v), {**base, axis: v}) for axis, values in axes.items() for v in values]
    if design == "full":
        names = list(axes)
        return [(",".join(cell_name(a, v) for a, v in zip(names, combo)), {**base, **dict(zip(names, combo))})
                for combo in itertools.product(*(axes[a] for a in names))]
    raise QuantizationError(f"ablation_grid: unknown design={design!r}; expected 'one_at_a_time' or 'full'")


def ablation_grid(model: PreTrainedModel, calibration: torch.Tensor, eval_tokens: torch.Tensor,
                  axes: dict[str, list], base: dict | None = None, design: str = "one_at_a_time",
                  baselines: bool = True, progress=None) -> list[dict]:
    """Quantize ``model`` with ``gradient_ptq`` for every cell and measure it.

    ``axes``: ablation axis -> values (axes from ``AXES``; any other Params field is allowed too).
    ``base``: the Params every cell starts from. ``calibration``: token blocks ``[n, seq]``; a cell
    uses the first ``calibration_sequences`` rows (the task's nested fixed-seed sample; default all).
    ``eval_tokens``: held-out blocks for perplexity (exp of the mean next-token cross-entropy).
    Returns one row per cell (``name``, ``params``, ``ppl``, ``loss_before``, ``loss_after``,
    ``seconds``, ``bits_per_weight``) plus, with ``baselines``, ``fp32`` and ``rtn`` (same grid)
    rows. Cells with identical params run once. ``model`` is not modified."""
    base = dict(base or {})
    base.setdefault("calibration_sequences", int(calibration.shape[0]))  # default: every given block
    for axis, values in axes.items():
        if axis not in GradientPtqQuantizer.Params.model_fields:
            raise QuantizationError(f"ablation_grid: unknown axis {axis!r}; ablation axes: {list(AXES)}")
        if not values:
            raise QuantizationError(f"ablation_grid: axis {axis!r} has no values")
    cells = _cells(base, axes, design)
    prepared = []
    for name, params in cells:  # validate every cell before spending time on any
        try:
            quantizer = GradientPtqQuantizer(GradientPtqQuantizer.Params(**params))
        except ValueError as err:  # pydantic's ValidationError
            bad = {k: v for k, v in params.items() if k in axes or k in base}
            raise QuantizationError(f"ablation_grid: cell {name} has invalid params {bad}: {err}") from None
        n = quantizer.params.calibration_sequences
        if n > calibration.shape[0]:
            raise QuantizationError(f"ablation_grid: cell {name} asks for calibration_sequences={n} but only "
                                    f"{calibration.shape[0]} calibration blocks were given")
        prepared.append((name, quantizer))
    rows: list[dict] = []
    if baselines:
        rows.append(dict(name="fp32", params={}, ppl=math.exp(lm_loss(model, eval_tokens)), seconds=0.0,
                         bits_per_weight=32.0, loss_before=float("nan"), loss_after=float("nan")))
        p = prepared[0][1].params if prepared else GradientPtqQuantizer.Params(**base)
        start = time.perf_counter()
        rtn = RtnQuantizer(RtnQuantizer.Params(bits=p.bits, granularity=p.granularity, group_size=p.group_size,
                                               symmetric=p.symmetric, targets=p.targets)).quantize(model)
        overrides = {k: rtn.state_dict[k] for k in rtn.meta["quantized_tensors"]}
        rows.append(dict(name="rtn", params=dict(bits=p.bits, granularity=p.granularity),
                         ppl=math.exp(lm_loss(model, eval_tokens, overrides)), seconds=time.perf_counter() - start,
                         bits_per_weight=rtn.meta["bits_per_weight"], loss_before=float("nan"),
                         loss_after=float("nan")))
    done: dict[str, dict] = {}
    for name, quantizer in prepared:
        key = quantizer.params.model_dump_json()
        if key not in done:
            n = quantizer.params.calibration_sequences
            start = time.perf_counter()
            q = quantizer.quantize(model, calibration[:n])
            seconds = time.perf_counter() - start
            overrides = {k: q.state_dict[k] for k in q.meta["quantized_tensors"]}
            m = q.meta["metrics"]
            done[key] = dict(ppl=math.exp(lm_loss(model, eval_tokens, overrides)), seconds=seconds,
                             bits_per_weight=q.meta["bits_per_weight"],
                             loss_before=m["reconstruction_loss_before"], loss_after=m["reconstruction_loss_after"])
        row = dict(name=name, params=quantizer.params.model_dump(include=set(axes) | set(base)), **done[key])
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`ablation_grid` rows."""
    lines = ["| cell | ppl | bits/w | recon loss before -> after | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        loss = "" if math.isnan(r["loss_after"]) else f"{r['loss_before']:.4g} -> {r['loss_after']:.4g}"
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {r['bits_per_weight']:.3f} | {loss} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def grid_metrics(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Rows as ``{cell: {"ppl": ..., ...}}``, the shape ``components.eval.claims.check_claims`` reads."""
    return {r["name"]: {k: float(r[k]) for k in ("ppl", "seconds", "bits_per_weight", "loss_before", "loss_after")}
            for r in rows}


def study_claims(small_calibration: int = 16, large_calibration: int = 64, calibration_tolerance: float = 1.02,
                 metric: str = "ppl", prefix: str = ""):
    """The study's checkable findings, over cells named by :func:`cell_name` (``prefix`` + name).

    From the abstract: GPTQ methods are robust to the calibration set (we check its size: a small
    set within ``calibration_tolerance`` of a large one) and the choice of degrees of freedom and
    optimizer matters. The directions below (rounding+scales >= rounding, Adam >= SGD, learned
    rounding >= RTN) are the usual expectations, not read from the paper's tables."""
    from components.eval.claims import Claim

    def ref(axis, value):
        return f"{prefix}{cell_name(axis, value)}.{metric}"

    def stage(axis, value):
        return f"{prefix}{cell_name(axis, value)}"

    def rtn_instead_of(*cells) -> dict:  # the control: RTN on the same grid in the method's place
        return {"replace": {stage(*cell): f"{prefix}rtn" for cell in cells}, "why": "RTN on the same grid"}

    return [
        Claim(name="learned_rounding_beats_rtn", statement="Gradient-based PTQ (learned rounding) beats RTN on the "
              "same grid", metric=ref("variables", "rounding"), op="<", than=f"{prefix}rtn.{metric}"),
        Claim(name="more_dof_helps", statement="Learning the step with the rounding (more degrees of freedom) is "
              "no worse than rounding alone", metric=ref("variables", "rounding+scales"), op="<=",
              than=ref("variables", "rounding"), control=rtn_instead_of(("variables", "rounding+scales"))),
        Claim(name="adam_beats_sgd", statement="Adam is no worse than SGD (momentum) at the same budget",
              metric=ref("optimizer", "adam"), op="<=", than=ref("optimizer", "sgd"),
              control=rtn_instead_of(("optimizer", "adam"))),
        Claim(name="small_calibration_suffices", statement=f"{small_calibration} calibration sequences come within "
              f"{(calibration_tolerance - 1) * 100:.0f}% of {large_calibration} (robust to the calibration set)",
              metric=ref("calibration_sequences", small_calibration), op="<=",
              than=ref("calibration_sequences", large_calibration), factor=calibration_tolerance,
              control=rtn_instead_of(("calibration_sequences", small_calibration))),
    ]
