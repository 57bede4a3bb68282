"""FlatQuant (Sun et al. 2024, "FlatQuant: Flatness Matters for LLM Quantization", arXiv 2410.09426;
reference code ruikangliu/FlatQuant: ``flatquant/trans_utils.py``, ``flat_linear.py``,
``quant_utils.py``, ``train_utils.py``, ``model_tools/llama_utils.py``, ``args_utils.py``).

Per input-sharing group of Linears (q/k/v share one transform, gate/up another; o_proj and
down_proj have their own) a learnable invertible affine transform of the input

    T = diag(d) (P_L ⊗ P_R),   n_L · n_R = in_features (most balanced factor pair),

is applied as ``x -> x T`` before activation quantization, while the weight becomes
``W T^-T`` before weight quantization, so without quantization ``(x T)(W T^-T)^T = x W^T``
exactly. ``x (P_L ⊗ P_R)`` is computed without forming the Kronecker product: x is reshaped to
``[n_L, n_R]`` and becomes ``P_L^T X P_R`` (the reference's ``kronecker_matmul``).

Learned per decoder block (reference ``cali_flat_quant``), all initialised as the reference does:

- ``P_L``, ``P_R``: ``parametrization="svd"`` (reference default) ``U diag(σ) V^T`` with U, V
  orthogonal through a Cayley map and σ = 1 at the start, so the inverse is ``V diag(1/σ) U^T``
  without a matrix inverse. The reference registers ``orthogonal(cayley)`` on random orthogonal
  matrices; we write ``U = U0 · cayley(A)`` with U0 random orthogonal (fixed) and A = 0 at the
  start, so P starts as the random orthogonal ``U0`` (V0 = I). ``"inv"``: P free, inverted by
  ``torch.linalg.inv`` in float64 (the reference's ``--direct_inv``).
- ``d``: per-channel scaling (``--add_diag``), SmoothQuant-style init
  ``d = max|W|^(1-α) / max|x|^α`` (clamped at 1e-5), α = 0.3 (``--diag_alpha``); statistics from
  the fp model on the calibration sequences, max|W| over the group's concatenated weights.
- learnable weight clipping (``lwc``): per output row, ``W' = clamp(W T^-T, σ(c_min)·min,
  σ(c_max)·max)`` with c = 4 at the start (σ(4) ≈ 0.982), then min-max scales of the clamped W'.
- learnable activation clipping (``lac``): per Linear, the per-token absmax times σ(c), c = 4 at
  the start. The reference learns separate factors for the min and the max; the packed
  ``act_clip`` side tensor holds one ratio, so we learn one (identical for symmetric grids when
  both factors are equal). The scale is differentiated through absmax, as in the reference.

Objective: block-output MSE between the fp block on fp inputs and the W+A fake-quantized block
on the same fp inputs (reference: ``fp_inps`` feed both; ``input_stream="fp"`` here), through the
shared reconstruction engine, whose ``fake_input`` hook applies ``x -> Q_a(x T) T^-1`` inside the
block during training. AdamW (torch defaults, as the reference's ``AdamW(trained_params)``), cosine
decay, transform lr = ``lr``, clipping lr = 10·``lr`` (reference). The reference divides each
batch loss by its own detached value; we keep the engine's plain MSE (Adam's update is invariant
to a constant loss scale; only the per-batch weighting differs). Reference schedule: 15 epochs of
128 samples at batch 4 (480 steps per block) at lr 5e-3 (its Llama scripts); our default is fewer
steps for CPU (``iters``). KV-cache quantization (the paper's KV4) is not emulated.

Weights are then quantized on the transformed, clamped W' by RTN (reference default) or, with
``weight_solver="gptq"``, by GPTQ on the Hessian of the transformed (and activation-quantized)
inputs collected sequentially through the already-quantized model (reference ``--gptq``).

Stored (``activation.py`` contract): the model weight is ``W_eff = Q(W T^-T) T^T``, so plain
transformers loads the weight-only-quantized model; the packed codes/scales are those of
``Q(W T^-T)`` (``dequantize_packed(...) @ act_transform.T == W_eff``); ``activation_state`` holds
``act_transform = T`` (dense ``[in, in]``, diag scaling included), ``act_transform_inv = T^-1`` and
``act_clip`` (if ``lac``); ``meta["activations"]`` is the per-token symmetric int spec, so the
evaluate stage's hooks compute ``Q_a(x T) T^-1 W_eff^T = Q_a(x T) Q(W T^-T)^T``. A deployment
folds ``d`` into the preceding RMSNorm and keeps P_L, P_R as online Kronecker matmuls.
"""
from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.activation import ActivationSpec
from components.quant.base import BLOCK_PREFIX, CalibratedParams, QuantizationError, QuantizedModel, Quantizer, \
    uniform_int_meta
from components.quant.calibration import (block_linears, capture_block_inputs, check_calibration, decoder_blocks,
                                          linear_groups, linear_input_hooks)
from components.quant.fake_quant import round_ste
from components.quant.gptq_solver import HessianAccumulator, gptq_quantize
from components.quant.reconstruction import (IntGrid, ReconstructionConfig, check_learned_bits, flatten_metrics,
                                             quantized_model, reconstruct)
from components.registry import Paper

CLIP_INIT = 4.0  # reference init of the lwc/lac logits: sigmoid(4) ≈ 0.982


def balanced_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b == n``, ``a <= b`` and ``a`` as large as possible (a prime n gives (1, n)).
    The reference's ``get_decompose_dim`` finds the same pair via a difference of squares, which has
    no solution for n = 2 mod 4; a divisor search covers every n."""
    if n < 1:
        raise QuantizationError(f"cannot factor in_features={n}")
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def kron_matmul(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ kron(left, right)`` for x ``[..., n_L * n_R]``, as ``left^T X right`` on ``[n_L, n_R]`` views."""
    shape = x.shape
    x = x.reshape(-1, left.shape[0], right.shape[0])
    return torch.matmul(left.transpose(0, 1), torch.matmul(x, right)).reshape(shape)


def cayley(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``(I - S)^-1 (I + S)`` of the skew-symmetric ``S = A - A^T``."""
    s = a - a.transpose(0, 1)
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(eye - s, eye + s)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR with the sign fix, as the reference's ``get_random_orthg``)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class KroneckerTransform:
    """``T = diag(d) (P_L ⊗ P_R)`` with learnable factors (see module docstring); shared by a group."""

    def __init__(self, n: int, generator: torch.Generator, parametrization: str = "svd",
                 init_rotation: bool = True, diag: torch.Tensor | None = None, learn_transform: bool = True):
        if parametrization not in ("svd", "inv"):
            raise QuantizationError(f"unknown FlatQuant parametrization {parametrization!r}; use 'svd' or 'inv'")
        self.n, self.factors, self.parametrization = n, balanced_factors(n), parametrization
        self.learn_transform = learn_transform
        self.sides = []
        for size in self.factors:
            base = random_orthogonal(size, generator) if init_rotation else torch.eye(size)
            if parametrization == "svd":
                side = dict(u0=base, v0=torch.eye(size),
                            a_u=torch.nn.Parameter(torch.zeros(size, size)),
                            a_v=torch.nn.Parameter(torch.zeros(size, size)),
                            sigma=torch.nn.Parameter(torch.ones(size)))
            else:
                side = dict(matrix=torch.nn.Parameter(base.clone()))
            self.sides.append(side)
        self.diag = None if diag is None else torch.nn.Parameter(diag.detach().float().clone())

    def parameters(self) -> list[torch.Tensor]:
        params = [t for side in self.sides for t in side.values() if isinstance(t, torch.nn.Parameter)] \
            if self.learn_transform else []
        return params + ([self.diag] if self.diag is not None else [])

    def _side(self, side: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, P^-1)`` of one factor."""
        if self.parametrization == "svd":
            u = side["u0"] @ cayley(side["a_u"])
            v = side["v0"] @ cayley(side["a_v"])
            return (u * side["sigma"]) @ v.T, (v / side["sigma"]) @ u.T
        m = side["matrix"]
        return m, torch.linalg.inv(m.double()).to(m.dtype)

    def matrices(self):
        """``(P_L, P_R, P_L^-1, P_R^-1)``, differentiable."""
        (left, left_inv), (right, right_inv) = (self._side(s) for s in self.sides)
        return left, right, left_inv, right_inv

    def _d(self, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.diag is None else self.diag.to(like.dtype)

    # x-side: x -> x T and back
    def forward(self, x: torch.Tensor, mats=None) -> torch.Tensor:
        left, right, _, _ = mats or self.matrices()
        d = self._d(x)
        return kron_matmul(x if d is None else x * d, left, right)

    def inverse(self, x: torch.Tensor, mats=None) -> torch.Tensor:
        _, _, left_inv, right_inv = mats or self.matrices()
        x = kron_matmul(x, left_inv, right_inv)
        d = self._d(x)
        return x if d is None else x / d

    # w-side: W -> W T^-T (quantized there) and Q -> Q T^T (the stored effective weight)
    def weight_to(self, w: torch.Tensor, mats=None) -> torch.Tensor:
        _, _, left_inv, right_inv = mats or self.matrices()
        d = self._d(w)
        return kron_matmul(w if d is None else w / d, left_inv.T, right_inv.T)

    def weight_from(self, q: torch.Tensor, mats=None) -> torch.Tensor:
        left, right, _, _ = mats or self.matrices()
        q = kron_matmul(q, left.T, right.T)
        d = self._d(q)
        return q if d is None else q * d

    def factor_tensors(self) -> dict[str, torch.Tensor]:
        """``P_L``, ``P_R`` (and the diagonal) as fp32: everything ``T`` is built from."""
        with torch.no_grad():
            left, right, _, _ = self.matrices()
            out = {"transform_left": left.detach().float().clone(), "transform_right": right.detach().float().clone()}
            if self.diag is not None:
                out["transform_diag"] = self.diag.detach().float().clone()
            return out

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, T^-1)`` as dense fp32 ``[in, in]`` matrices (built in float64)."""
        with torch.no_grad():
            left, right, left_inv, right_inv = (m.double() for m in self.matrices())
            t, t_inv = torch.kron(left, right), torch.kron(left_inv, right_inv)
            if self.diag is not None:
                d = self.diag.double()
                t, t_inv = d[:, None] * t, t_inv / d[None, :]
            return t.float(), t_inv.float()


def fake_quant_tokens(x: torch.Tensor, bits: int, clip: torch.Tensor | None) -> torch.Tensor:
    """Symmetric per-token int fake quant ``[-qmax, qmax]`` (activation.py's grid), scale
    ``absmax * clip / qmax`` differentiated through absmax and clip, rounding by STE."""
    qmax = 2 ** (bits - 1) - 1
    absmax = x.abs().amax(-1, keepdim=True)
    scale = absmax / qmax if clip is None else absmax / qmax * clip
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale


class FlatQuantWeight:
    """The LearnableQuant of one Linear: its weight/activation clipping plus (for the group's
    ``owner``) the shared transform's parameters."""

    def __init__(self, weight: torch.Tensor, grid: IntGrid, transform: KroneckerTransform, owner: bool,
                 activation_bits: int, lr: float, clip_lr: float, lwc: bool = True, lac: bool = True,
                 name: str = "weight"):
        grid.check(weight, name)
        self.weight = weight.detach().float().clone()
        self.grid, self.transform, self.owner, self.name = grid, transform, owner, name
        self.activation_bits, self.lr, self.clip_lr = activation_bits, lr, clip_lr
        rows = self.weight.shape[0]
        self.c_max = torch.nn.Parameter(torch.full((rows, 1), CLIP_INIT)) if lwc else None
        self.c_min = torch.nn.Parameter(torch.full((rows, 1), CLIP_INIT)) if lwc else None
        self.c_act = torch.nn.Parameter(torch.full((1,), CLIP_INIT)) if lac and activation_bits < 16 else None

    def parameters(self):
        groups = []
        if self.owner and self.transform.parameters():
            groups.append({"params": self.transform.parameters(), "lr": self.lr})
        clips = [t for t in (self.c_max, self.c_min, self.c_act) if t is not None]
        if clips:
            groups.append({"params": clips, "lr": self.clip_lr})
        return groups

    def regularization(self, step: int) -> float:
        return 0.0

    # ---- weights
    def clipped(self, mats=None) -> torch.Tensor:
        """``W' = W T^-T``, clamped per output row by the learned clipping ratios."""
        w = self.transform.weight_to(self.weight, mats)
        if self.c_max is None:
            return w
        high = w.amax(1, keepdim=True) * torch.sigmoid(self.c_max)
        low = w.amin(1, keepdim=True) * torch.sigmoid(self.c_min)
        return torch.clamp(w, low, high)

    def _scale_zero(self, rows: torch.Tensor):
        """Min-max step (and integer zero point, None if symmetric) per group of ``rows`` [r, g, s]."""
        if self.grid.symmetric:
            qmax = 2 ** (self.grid.bits - 1) - 1
            return (rows.abs().amax(-1) / qmax).clamp(min=1e-8), None
        low = rows.amin(-1).clamp(max=0)
        high = rows.amax(-1).clamp(min=0)
        step = ((high - low) / self.grid.levels).clamp(min=1e-8)
        return step, torch.clamp(torch.round(-low.detach() / step.detach()), 0, self.grid.levels)

    def unquantized_weight(self) -> torch.Tensor:
        """``(W T^-T) T^T`` with neither clipping nor rounding: W again, up to fp error (identity check)."""
        with torch.no_grad():
            mats = self.transform.matrices()
            return self.transform.weight_from(self.transform.weight_to(self.weight, mats), mats)

    def fake_weight(self) -> torch.Tensor:
        mats = self.transform.matrices()
        w = self.clipped(mats)
        rows = self.grid.view(w)
        step, zero = self._scale_zero(rows)
        low, high = self.grid.code_range
        if zero is None:
            zero = torch.full_like(step, float(self.grid.implicit_zero))
        codes = torch.clamp(round_ste(rows / step.unsqueeze(-1)) + zero.unsqueeze(-1), low, high)
        q = ((codes - zero.unsqueeze(-1)) * step.unsqueeze(-1)).reshape(w.shape)
        return self.transform.weight_from(q, mats)

    def finalize(self):
        """Codes of ``Q(W')``; the dequantized entry is the stored ``W_eff = Q(W') T^T``."""
        with torch.no_grad():
            w = self.clipped()
            step, zero = self._scale_zero(self.grid.view(w))
            codes, scales, zeros, dequant = self.grid.quantize(w, step, zero, self.name)
            return codes, scales, zeros, self.transform.weight_from(dequant)

    # ---- activations
    def activation_clip(self) -> torch.Tensor | None:
        return None if self.c_act is None else torch.sigmoid(self.c_act)

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_a(x T) T^-1`` (identity up to rounding when activations stay at 16 bits)."""
        if self.activation_bits >= 16:
            return x
        mats = self.transform.matrices()
        x_t = fake_quant_tokens(self.transform.forward(x, mats), self.activation_bits, self.activation_clip())
        return self.transform.inverse(x_t, mats)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the integer GEMM sees: ``Q_a(x T)`` (``x T`` at 16 bits)."""
        x_t = self.transform.forward(x)
        return x_t if self.activation_bits >= 16 else fake_quant_tokens(x_t, self.activation_bits,
                                                                        self.activation_clip())

    def side_tensors(self) -> dict[str, torch.Tensor]:
        """``act_transform`` / ``act_transform_inv`` (and ``act_clip``) for activation.py's hooks."""
        t, t_inv = self.transform.dense()
        side = {"act_transform": t, "act_transform_inv": t_inv}
        clip = self.activation_clip()
        if clip is not None:
            side["act_clip"] = clip.detach().float().clone()
        return side

    def learnable_count(self) -> int:
        own = sum(t.numel() for t in (self.c_max, self.c_min, self.c_act) if t is not None)
        return own + (sum(t.numel() for t in self.transform.parameters()) if self.owner else 0)


def input_absmax(model: PreTrainedModel, tokens: torch.Tensor, names: list[str],
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of each named Linear's input over ``tokens`` (fp model)."""
    modules = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m, args, name=name):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)
        handles.append(modules[name].register_forward_pre_hook(hook))
    body = getattr(model, "model", model)  # the decoder stack only: the lm_head is not needed here
    try:
        with torch.no_grad():
            for s in range(0, tokens.shape[0], batch_size):
                body(input_ids=tokens[s:s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def smooth_diag(w_absmax: torch.Tensor, x_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reference ``get_init_scale``: ``max|W|^(1-α) / max|x|^α``, clamped at 1e-5 (x is multiplied by it)."""
    return (w_absmax.clamp(min=1e-5).pow(1 - alpha) / x_absmax.clamp(min=1e-5).pow(alpha)).clamp(min=1e-5)


class FlatQuantQuantizer(Quantizer):
    key = "flatquant"
    paper = Paper(title="FlatQuant: Flatness Matters for LLM Quantization",
                  url="https://arxiv.org/abs/2410.09426", arxiv="2410.09426")
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[2, 3, 4, 8] = Field(4, description="weight bits")
        activation_bits: Literal[4, 8, 16] = Field(
            4, description="Linear-input bits, symmetric per token (16 = weight-only with the learned transform)")
        granularity: Literal["per_channel", "group"] = Field(
            "per_channel", description="weight scale per output channel (reference) or per group")
        group_size: int = Field(128, gt=0, description="input weights per group (granularity=group)")
        symmetric: bool = Field(True, description="symmetric weight grid (reference default)")
        weight_solver: Literal["rtn", "gptq"] = Field(
            "rtn", description="how W T^-T is quantized after calibration: RTN or GPTQ (reference --gptq)")
        gptq_damp: float = Field(0.01, gt=0, description="GPTQ Hessian damping (weight_solver=gptq)")
        mode: Literal["block", "window"] = Field("block", description="calibration unit: one decoder block "
                                                                      "(reference) or a window of blocks")
        window: int = Field(2, ge=1, description="blocks per unit (mode=window)")
        overlap: int = Field(1, ge=0, description="blocks shared by consecutive windows (mode=window)")
        input_stream: Literal["fp", "quantized"] = Field(
            "fp", description="unit inputs: fp model's (reference) or the already-quantized model's")
        iters: int = Field(150, ge=0, description="AdamW steps per block (reference: 15 epochs x 32 = 480)")
        lr: float = Field(5e-3, gt=0, description="transform lr (reference Llama scripts: 5e-3), cosine-decayed")
        clip_lr_factor: float = Field(10.0, gt=0, description="clipping lr = factor * lr (reference: 10)")
        batch_size: int = Field(4, gt=0, description="calibration sequences per step (reference: 4)")
        parametrization: Literal["svd", "inv"] = Field(
            "svd", description="P = U diag(σ) V^T with Cayley-orthogonal U, V (reference default) or a free "
                               "matrix inverted directly (--direct_inv)")
        init_rotation: bool = Field(True, description="start P_L, P_R at random orthogonal matrices (reference)")
        learn_transform: bool = Field(True, description="learn P_L, P_R (reference --cali_trans)")
        add_diag: bool = Field(True, description="learnable per-channel scaling (reference --add_diag)")
        diag_alpha: float = Field(0.3, ge=0, le=1, description="SmoothQuant-style init exponent (reference 0.3)")
        lwc: bool = Field(True, description="learnable weight clipping")
        lac: bool = Field(True, description="learnable activation clipping")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        self.refuse_if_quantized(model)
        check_learned_bits(self.key, p.bits)
        if p.activation_bits not in (4, 8, 16):
            raise QuantizationError(f"{self.key}: activation_bits={p.activation_bits!r}; supported: 4, 8, 16")
        if p.activations is not None:
            raise QuantizationError(f"{self.key}: sets its own activation quantization; use activation_bits "
                                    "instead of the `activations` param")
        tokens = check_calibration(calibration, self.key)
        grid = IntGrid(p.bits, p.granularity, p.group_size, p.symmetric)
        linears = self.target_linears(model)
        for name, linear in linears:
            grid.check(linear.weight, f"{name}.weight")
        names = [n for n, _ in linears]
        quants = self.build(model, tokens, grid)
        config = ReconstructionConfig(mode=p.mode, iters=p.iters, lr=p.lr, batch_size=p.batch_size,
                                      input_stream=p.input_stream, window=p.window, overlap=p.overlap,
                                      schedule="cosine", optimizer="adamw", seed=p.seed)
        result = reconstruct(model, tokens, lambda name, linear: quants[name], config, names, self.key)
        weights = result.weights
        if p.weight_solver == "gptq":
            weights = gptq_weights(model, tokens, quants, grid, p.gptq_damp, p.batch_size)
        meta = dict(**uniform_int_meta(p), metrics=flatten_metrics(result.metrics),
                    flatquant=dict(activation_bits=p.activation_bits, weight_solver=p.weight_solver,
                                   parametrization=p.parametrization, iters=p.iters, lr=p.lr,
                                   factors={n: list(quants[n].transform.factors) for n in names},
                                   learnable_parameters=sum(q.learnable_count() for q in quants.values())))
        out = quantized_model(model, weights, self.key, meta, {n: grid for n in weights})
        # The packed codes are Q(W T^-T); rebuilding the stored W_eff = Q(W T^-T) T^T needs T, so
        # its Kronecker factors (and diagonal), one set per input-sharing group, are part of the
        # packed weights and of bits_per_weight. The dense T in activation.safetensors is derived.
        for name in names:
            if quants[name].owner:
                for key, tensor in quants[name].transform.factor_tensors().items():
                    out.packed[f"{name}.{key}"] = tensor
        out.meta["packed_bytes"] = sum(t.numel() * t.element_size() for t in out.packed.values())
        out.meta["bits_per_weight"] = out.meta["packed_bytes"] * 8 / out.meta["n_quantized_weights"]
        if p.activation_bits < 16:
            for name in names:
                for key, tensor in quants[name].side_tensors().items():
                    out.activation_state[f"{name}.{key}"] = tensor
            out.meta["activations"] = ActivationSpec(bits=p.activation_bits, modules=tuple(names),
                                                     granularity="per_token", symmetric=True).to_meta()
        return out

    def build(self, model: PreTrainedModel, tokens: torch.Tensor, grid: IntGrid) -> dict[str, FlatQuantWeight]:
        """One FlatQuantWeight per target Linear (module name -> object), transforms shared per
        input-sharing group and initialised from the fp model's statistics on ``tokens``."""
        p = self.params
        linears = dict(self.target_linears(model))
        stats = input_absmax(model, tokens, list(linears)) if p.add_diag else {}
        generator = torch.Generator().manual_seed(p.seed)
        quants: dict[str, FlatQuantWeight] = {}
        for index, block in enumerate(decoder_blocks(model)):
            prefix = f"{BLOCK_PREFIX}{index}."
            for group in linear_groups(block):
                members = [prefix + n for n in group if prefix + n in linears]
                if not members:
                    continue
                diag = None
                if p.add_diag:
                    w_absmax = torch.cat([linears[m].weight.detach().float() for m in members]).abs().amax(0)
                    diag = smooth_diag(w_absmax, stats[members[0]], p.diag_alpha)
                transform = KroneckerTransform(linears[members[0]].in_features, generator, p.parametrization,
                                               p.init_rotation, diag, p.learn_transform)
                for k, m in enumerate(members):
                    quants[m] = FlatQuantWeight(linears[m].weight, grid, transform, k == 0, p.activation_bits,
                                                p.lr, p.lr * p.clip_lr_factor, p.lwc, p.lac, f"{m}.weight")
        return quants


def gptq_weights(model: PreTrainedModel, tokens: torch.Tensor, quants: dict[str, FlatQuantWeight], grid: IntGrid,
                 damp: float, batch_size: int) -> dict:
    """GPTQ on each clamped ``W T^-T`` with the Hessian of ``Q_a(x T)``, collected group by group
    through a copy of the model whose earlier Linears already hold ``W_eff`` and quantize inputs."""
    work = copy.deepcopy(model).eval()
    inputs = capture_block_inputs(work, tokens, batch_size)
    weights: dict = {}
    handles = []
    try:
        for index, block in enumerate(decoder_blocks(work)):
            linears = block_linears(block)
            prefix = f"{BLOCK_PREFIX}{index}."
            for group in linear_groups(block):
                names = [n for n in group if prefix + n in quants]
                if not names:
                    continue
                hessians = {n: HessianAccumulator(linears[n].in_features, name=prefix + n) for n in names}
                with torch.no_grad(), linear_input_hooks(
                        block, names, lambda n, x: hessians[n].add(quants[prefix + n].quantized_input(x))):
                    inputs.run(block)
                for n in names:
                    quant = quants[prefix + n]
                    with torch.no_grad():
                        w = quant.clipped()
                    codes, scales, zeros, dequant = gptq_quantize(
                        w, hessians[n].hessian, grid.bits, grid.granularity, grid.group_size, grid.symmetric,
                        damp=damp, name=f"{prefix}{n}.weight")
                    with torch.no_grad():
                        w_eff = quant.transform.weight_from(dequant)
                        linears[n].weight.copy_(w_eff)
                    weights[f"{prefix}{n}.weight"] = (codes, scales, zeros, w_eff)
                    handles.append(linears[n].register_forward_pre_hook(
                        lambda _m, args, q=quant: (q.fake_input(args[0]),) + tuple(args[1:])))
            with torch.no_grad():
                inputs = inputs.run(block)
    finally:
        for h in handles:
            h.remove()
    return weights
