"""PTQ1.61 (Zhao et al., ACL 2025, "PTQ1.61: Push the Real Limit of Extremely Low-Bit
Post-Training Quantization Methods for Large Language Models", arXiv 2502.13179; reference code
zjq0455/PTQ1.61 ``quantize/blockptq.py`` and ``models/int_llama_layer.py``, ``quant_type=mix``).

Per Linear weight ``W [out, in]``:

- **Structured salient mask over input channels.** From the fp model's per-input-channel
  activation statistic ``max |x|`` over the calibration tokens (the reference's
  ``generate_act_scale_shift.get_act_scales``), the top ``salient_fraction`` (paper/reference:
  20%) input channels are *salient*. The mask costs one bit per input channel, i.e. 1/out bits
  per weight (the paper's "0.0002 bit per weight" at out = 4096).
- **Salient columns** keep ``salient_bits`` (paper: 4) on an asymmetric per-row min-max grid
  (the reference's ``high_quant``). Deviation: the reference takes the row range over *all*
  input channels and then masks; we take it over the salient columns only, which is never
  wider (same storage, smaller error). The salient weights are not learned (as in the reference).
- **Non-salient columns** are binarized around the row mean: ``w ~ r1_i r2_j (α_i s_ij + μ_i)``,
  ``s = sign(w - μ)`` (+1 at 0), ``μ`` the row mean of the non-salient weights (fixed), ``α``
  the learned row scale, ``r1 [out, 1]`` and ``r2 [1, in]`` the learned "rotation" vectors
  (an outer-product rescaling, reference ``r1 @ r2 * q_low``), both initialised to 1.
  Deviation: α starts at ``mean |w - μ|`` (the L2-optimal scale for fixed signs) where the
  reference starts at ``mean |w|``; they coincide without the row mean. The signs never change.
- **Block-wise optimisation** (``reconstruction.reconstruct``, ``mode="block"``, quantized input
  stream) of α (lr 5e-4) and r1/r2 (lr 1e-3), the reference's AdamW with weight decay 0 (= Adam),
  on the reference loss ``MSE(q, fp(x_fp)) + MSE(q, fp(x_q)) - log|cos(q, fp(x_fp))| -
  log|cos(q, fp(x_q))|`` (element-mean MSE, cosine per token then averaged), where ``fp(x_q)``
  is the full-precision block on the quantized stream's input (the engine's ``dual_target``).
  The reference runs 20 epochs x 128 samples at batch 1 (2560 steps per block); ``iters`` here
  is a CPU budget. The paper's "quantization preprocessing" (restorative LoRA) stage is not
  part of this quantizer.

Storage (every byte counted by ``PackedWeights``, so ``bits_per_weight`` is the true total),
under ``<name>`` = ``<module>.weight``: ``qweight`` the non-salient sign bits (1 bit each, row-major
over ``[out, in - k]``), ``mask`` the salient mask (1 bit per input channel), ``alpha`` and
``mean`` fp16 ``[out, 1]`` (r1 folded in: ``r1·α``, ``r1·μ``), ``col_scale`` fp16 ``[1, in - k]``
(r2 on the non-salient columns), ``salient_qweight`` the salient codes (``salient_bits`` each over
``[out, k]``), ``salient_scales`` fp16 and ``salient_zeros`` uint8 ``[out, 1]``. ``mean`` is absent
without ``row_mean``, ``col_scale`` without ``rotation``. :func:`decode_ptq161` rebuilds the weight.

At LLaMA scale (4096 x 4096) that is 0.2·4 + 0.8·1 = 1.6 bits plus ~0.02 bits of side tensors,
the paper's "1.61". On small models the per-row/column fp16 side tensors weigh much more
(1/in and 1/out per weight); ``meta["bits_per_weight"]`` reports the true figure.

``salient="none"`` with ``row_mean=False, rotation=False, iters=0`` is plain sign binarization
(``α·sign(w)``, row-wise ``α = mean|w|``, no mask); ``salient="random"`` is the random-channel-mask
ablation at exactly PTQ1.61's storage cost.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.base import CalibratedParams, PackedWeights, QuantizationError, QuantizedModel, Quantizer, \
    check_bits
from components.quant.calibration import check_calibration
from components.quant.packing import pack_int, unpack_int
from components.quant.reconstruction import ReconstructionConfig, flatten_metrics, reconstruct
from components.quant.rtn import quantize_tensor
from components.registry import Paper

FP16_MAX = float(torch.finfo(torch.float16).max)
SALIENT_MODES = ("activation", "random", "none")
LOSSES = ("ptq161", "mse")


def ptq161_loss(q: torch.Tensor, fp: torch.Tensor, fp_of_q: torch.Tensor) -> torch.Tensor:
    """The reference's block loss: two element-mean MSEs and two ``-log|mean cos|`` terms, against
    the fp block's output on the fp input (``fp``) and on the quantized stream's input (``fp_of_q``)."""
    loss = F.mse_loss(q, fp) + F.mse_loss(q, fp_of_q)
    for target in (fp, fp_of_q):
        cos = F.cosine_similarity(q, target, dim=-1).mean().abs().clamp(min=1e-8)
        loss = loss - torch.log(cos)
    return loss


def activation_absmax(model: PreTrainedModel, tokens: torch.Tensor, modules: list[str],
                      batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` of each named Linear's input over ``tokens`` (fp model)."""
    named = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in modules:
        def hook(_module, args, name=name):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        handles.append(named[name].register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, tokens.shape[0], batch_size):
                model(input_ids=tokens[s:s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def salient_mask(in_features: int, fraction: float, mode: str, act: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean ``[in]``: the ``round(fraction * in)`` salient input channels (largest ``act`` for
    "activation", uniformly random for "random", none for "none")."""
    k = 0 if mode == "none" else int(round(fraction * in_features))
    mask = torch.zeros(in_features, dtype=torch.bool)
    if k == 0:
        return mask
    if mode == "activation":
        if act is None or act.shape != (in_features,):
            raise QuantizationError(f"salient='activation' needs a [{in_features}] activation statistic")
        idx = torch.topk(act.float(), k).indices
    elif mode == "random":
        idx = torch.randperm(in_features, generator=generator)[:k]
    else:
        raise QuantizationError(f"unknown salient mode {mode!r}; expected one of {list(SALIENT_MODES)}")
    mask[idx] = True
    return mask


def _fp16(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if not torch.isfinite(t).all() or t.abs().max() > FP16_MAX:
        raise QuantizationError(f"{name}: learned {what} is not finite in fp16; lower the learning rates")
    return t.detach().float().to(torch.float16)


class Ptq161Weight:
    """The LearnableQuant of one Linear weight (see module docstring)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, salient_bits: int = 4, row_mean: bool = True,
                 rotation: bool = True, scale_lr: float = 5e-4, rotation_lr: float = 1e-3, name: str = "weight"):
        if weight.dim() != 2:
            raise QuantizationError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        w = weight.detach().float()
        out_features, in_features = w.shape
        if mask.shape != (in_features,) or mask.dtype != torch.bool:
            raise QuantizationError(f"{name}: mask must be bool [{in_features}], got {mask.dtype} {tuple(mask.shape)}")
        if bool(mask.all()):
            raise QuantizationError(f"{name}: every input channel is salient; nothing left to binarize")
        if not torch.isfinite(w).all():
            raise QuantizationError(f"{name}: contains non-finite weights; cannot quantize")
        self.name, self.shape, self.mask = name, w.shape, mask.clone()
        self.salient_bits, self.row_mean, self.rotation = salient_bits, row_mean, rotation
        self.scale_lr, self.rotation_lr = scale_lr, rotation_lr
        self.sal_idx = torch.nonzero(mask).flatten()
        self.bin_idx = torch.nonzero(~mask).flatten()
        # salient columns: fixed asymmetric per-row grid (not learned)
        self.high = torch.zeros(out_features, in_features)
        self.sal_codes = self.sal_scales = self.sal_zeros = None
        if self.sal_idx.numel():
            codes, scales, zeros, dequant = quantize_tensor(w[:, self.sal_idx], salient_bits, "per_channel", 1,
                                                            False, name)
            self.sal_codes, self.sal_scales, self.sal_zeros = codes, scales, zeros
            self.high[:, self.sal_idx] = dequant
        # non-salient columns: α·sign(w - μ) + μ, rescaled by r1 r2ᵀ
        low = w[:, self.bin_idx]
        self.mu = low.mean(1, keepdim=True) if row_mean else torch.zeros(out_features, 1)
        centred = low - self.mu
        self.sign = torch.where(centred >= 0, 1.0, -1.0)
        self.alpha = torch.nn.Parameter(centred.abs().mean(1, keepdim=True))
        self.r1 = torch.nn.Parameter(torch.ones(out_features, 1)) if rotation else None
        self.r2 = torch.nn.Parameter(torch.ones(1, self.bin_idx.numel())) if rotation else None

    def parameters(self):
        groups = [{"params": [self.alpha], "lr": self.scale_lr}]
        if self.rotation:
            groups.append({"params": [self.r1, self.r2], "lr": self.rotation_lr})
        return groups

    def _assemble(self, low: torch.Tensor) -> torch.Tensor:
        return torch.index_copy(self.high, 1, self.bin_idx, low)

    def fake_weight(self) -> torch.Tensor:
        low = self.alpha * self.sign + self.mu
        if self.rotation:
            low = self.r1 * self.r2 * low
        return self._assemble(low)

    def regularization(self, step: int) -> float:
        return 0.0

    def stored(self) -> dict[str, torch.Tensor]:
        """The fp16 side tensors of the non-salient part, with r1 folded into α and μ."""
        with torch.no_grad():
            r1 = self.r1 if self.rotation else torch.ones_like(self.alpha)
            side = {"alpha": _fp16(r1 * self.alpha, "row scale", self.name)}
            if self.row_mean:
                side["mean"] = _fp16(r1 * self.mu, "row mean", self.name)
            if self.rotation:
                side["col_scale"] = _fp16(self.r2, "column scale", self.name)
            return side

    def finalize(self):
        """``(None, None, None, dequant)``: PTQ1.61 packs its own format (see :meth:`pack`)."""
        with torch.no_grad():
            return None, None, None, self._assemble(_binary_dequant(self.sign, self.stored()))

    def pack(self, store: PackedWeights) -> torch.Tensor:
        """Add this weight's tensors to ``store``; returns the dequantized weight they decode to."""
        side = self.stored()
        extra = dict(side)
        extra["mask"] = pack_int(self.mask.to(torch.uint8), 1)
        k = int(self.sal_idx.numel())
        if k:
            extra["salient_qweight"] = pack_int(self.sal_codes.reshape(-1), self.salient_bits)
            extra["salient_scales"] = self.sal_scales
            extra["salient_zeros"] = self.sal_zeros
        codes = (self.sign > 0).to(torch.uint8)
        store.add_codes(self.name, self.shape, codes, 1, extra, format="ptq161", salient_bits=self.salient_bits,
                        n_salient=k, row_mean=self.row_mean, rotation=self.rotation)
        return self.finalize()[3]


def _binary_dequant(sign: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
    low = side["alpha"].float() * sign
    if "mean" in side:
        low = low + side["mean"].float()
    if "col_scale" in side:
        low = low * side["col_scale"].float()
    return low


def decode_ptq161(packed: dict[str, torch.Tensor], name: str, info: dict) -> torch.Tensor:
    """Rebuild weight ``name`` from its packed tensors (``info`` = ``meta["tensors"][name]``)."""
    out_features, in_features = info["shape"]
    mask = unpack_int(packed[f"{name}.mask"], 1, in_features).bool()
    n_bin = int((~mask).sum())
    sign = unpack_int(packed[f"{name}.qweight"], 1, out_features * n_bin).float().reshape(out_features, n_bin) * 2 - 1
    side = {k: packed[f"{name}.{k}"] for k in ("alpha", "mean", "col_scale") if f"{name}.{k}" in packed}
    weight = torch.zeros(out_features, in_features)
    weight[:, ~mask] = _binary_dequant(sign, side)
    k = int(mask.sum())
    if k:
        codes = unpack_int(packed[f"{name}.salient_qweight"], info["salient_bits"], out_features * k)
        codes = codes.float().reshape(out_features, k)
        scales = packed[f"{name}.salient_scales"].float()
        zeros = packed[f"{name}.salient_zeros"].float()
        weight[:, mask] = (codes - zeros) * scales
    return weight


class Ptq161Quantizer(Quantizer):
    key = "ptq161"
    paper = Paper(title="PTQ1.61: Push the Real Limit of Extremely Low-Bit Post-Training Quantization Methods "
                        "for Large Language Models", url="https://arxiv.org/abs/2502.13179", arxiv="2502.13179")
    needs_calibration = True

    class Params(CalibratedParams):
        salient: Literal["activation", "random", "none"] = Field(
            "activation", description="salient input channels: top activation max|x| (the paper), random "
                                      "(ablation, same bits), or none (pure binarization)")
        salient_fraction: float = Field(0.2, ge=0, lt=1, description="fraction of input channels kept at "
                                                                      "salient_bits (paper: 0.2)")
        salient_bits: Literal[2, 3, 4, 5, 6, 7, 8] = Field(4, description="bits of the salient columns (paper: 4)")
        row_mean: bool = Field(True, description="binarize around the row mean μ (reference) instead of 0")
        rotation: bool = Field(True, description="learn the row/column rescaling vectors r1, r2")
        iters: int = Field(200, ge=0, description="optimisation steps per block (reference: 2560; 0 = no learning)")
        scale_lr: float = Field(5e-4, gt=0, description="lr of the row scales α (reference 5e-4)")
        rotation_lr: float = Field(1e-3, gt=0, description="lr of r1, r2 (reference 1e-3)")
        batch_size: int = Field(4, gt=0, description="calibration sequences per step (reference: 1)")
        loss: Literal["ptq161", "mse"] = Field(
            "ptq161", description="reference loss (MSE + -log|cos| against fp(x_fp) and fp(x_q)) or the engine's mse")
        input_stream: Literal["quantized", "fp"] = Field(
            "quantized", description="block inputs from the already-quantized model (reference) or the fp model")

    def check_params(self) -> None:
        """Params may be built without validation (``model_construct``): re-check every choice."""
        p = self.params
        if p.salient not in SALIENT_MODES:
            raise QuantizationError(f"{self.key}: unknown salient={p.salient!r}; expected one of {list(SALIENT_MODES)}")
        if not (isinstance(p.salient_fraction, (int, float)) and 0 <= p.salient_fraction < 1):
            raise QuantizationError(f"{self.key}: salient_fraction={p.salient_fraction!r} must be in [0, 1)")
        check_bits(self.key, p.salient_bits)
        if p.salient_bits < 2:
            raise QuantizationError(f"{self.key}: salient_bits={p.salient_bits!r} must be at least 2")
        if p.loss not in LOSSES:
            raise QuantizationError(f"{self.key}: unknown loss={p.loss!r}; expected one of {list(LOSSES)}")
        for what in ("scale_lr", "rotation_lr"):
            value = getattr(p, what)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise QuantizationError(f"{self.key}: {what}={value!r} must be a positive number")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        self.refuse_if_quantized(model)
        self.check_params()
        tokens = check_calibration(calibration, self.key)
        linears = self.target_linears(model)
        names = [n for n, _ in linears]
        stats = activation_absmax(model, tokens, names) if p.salient == "activation" else {}
        gen = torch.Generator().manual_seed(p.seed)
        masks = {n: salient_mask(lin.in_features, p.salient_fraction, p.salient, stats.get(n), gen)
                 for n, lin in linears}

        def make(name, linear):
            return Ptq161Weight(linear.weight, masks[name], p.salient_bits, p.row_mean, p.rotation,
                                p.scale_lr, p.rotation_lr, f"{name}.weight")

        config = ReconstructionConfig(mode="block", iters=p.iters, lr=p.scale_lr, batch_size=p.batch_size,
                                      input_stream=p.input_stream, seed=p.seed,
                                      loss=ptq161_loss if p.loss == "ptq161" else "mse",
                                      dual_target=p.loss == "ptq161")
        result = reconstruct(model, tokens, make, config, names, self.key)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store = PackedWeights()
        for name in names:
            dequant = result.quants[name].pack(store)
            state[f"{name}.weight"] = dequant.to(state[f"{name}.weight"].dtype)
        n_weights = sum(lin.weight.numel() for _, lin in linears)
        n_salient = sum(int(masks[n].sum()) * lin.out_features for n, lin in linears)
        code_bits = (n_weights - n_salient) * 1 + n_salient * p.salient_bits
        metrics = flatten_metrics(result.metrics)
        meta = store.meta(self.key, bits=None, salient=p.salient, salient_fraction=p.salient_fraction,
                          salient_bits=p.salient_bits, row_mean=p.row_mean, rotation=p.rotation,
                          salient_weight_fraction=n_salient / n_weights, code_bits_per_weight=code_bits / n_weights,
                          reconstruction=dict(mode="block", input_stream=p.input_stream, iters=p.iters,
                                              loss=p.loss, scale_lr=p.scale_lr, rotation_lr=p.rotation_lr))
        meta["side_bits_per_weight"] = meta["bits_per_weight"] - meta["code_bits_per_weight"]
        metrics.update(code_bits_per_weight=meta["code_bits_per_weight"],
                       side_bits_per_weight=meta["side_bits_per_weight"],
                       salient_weight_fraction=meta["salient_weight_fraction"])
        meta["metrics"] = metrics
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta)
