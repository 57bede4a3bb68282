"""OutlierTune (Wang et al. 2024): static per-channel activation quantization, made cheap by
"pre-execution of dequantization", plus "symmetrization" of the activation channels.

Sources. Only the abstract of arXiv 2406.18832 was readable here; the paper body was not. The
algorithm below follows the authors' released code (github.com/aIiKkkk/OutlierTune:
``Smoothquant/smooth.py``, ``Symmetrization/sym_calibration.py``, ``symmetrization.py``,
``Get_scale_*/act_calibration.py``, ``fake_quant_Llama.py``, ``main_Llama.py``). Where this
module departs from that code it says so; the departures are our interpretation.

For each targeted Linear ``y = x W^T`` (``W`` is ``[out, in]``), from fp32 calibration statistics:

1. Symmetrization (``symmetrize``): a per-input-channel shift ``z_c``, the mean over calibration
   sequences of each sequence's mid-range ``(max_c + min_c) / 2`` (the reference sums the
   per-sample mid-ranges and divides by the sample count), so each channel of ``x - z`` is
   roughly symmetric around 0.
2. Static per-channel activation step ``s_c = absmax_c(x - z) / qmax`` with ``qmax =
   2**(activation_bits-1) - 1``; ``absmax_c`` is the largest value over all calibration tokens
   (the reference's running max). ``clip_ratio < 1`` first clamps each calibration sequence to
   ``clip_ratio`` times its own whole-tensor min and max, as the reference's Llama scales do
   with 0.8 (``act_scales_or/*-0.8.pt``); the default 1.0 is the plain absmax.
3. Pre-execution of dequantization (``fold_scales``): ``W' = W diag(s)`` is quantized per output
   channel on an RTN integer grid (the reference: asymmetric per-channel min-max, hence the
   default ``weight_symmetric=False``). At inference ``X_int = clamp(round((X - z) / s))`` goes
   straight into the integer GEMM ``X_int Q(W')^T``: the per-channel activation scales sit on
   the reduction axis, where they could not be factored out of the GEMM; folded into ``W'`` they
   need no runtime rescale, only the per-output-channel weight scale of ``Q(W')``. The division
   by ``s`` (and the shift) fuse into the preceding norm (gamma/s, bias - z/s) for q/k/v and
   gate/up; o_proj and down_proj need an elementwise quantize op anyway.
4. The shift's contribution is a constant: a deployment folds it into the Linear's bias.

Emulation (what is stored). The model's weights are the dequantized *effective* weights
``W_eff = Q(W') diag(1/s)`` so plain transformers loading gives the weight-only model, and
``meta["activations"]`` plus the per-module ``act_scale`` (= ``s``) and ``act_shift`` (= ``z``)
side tensors let ``install_activation_quant`` hook in ``x -> q((x - z)/s) s + z``. That composes to

    hook(x) W_eff^T = X_int diag(s) diag(1/s) Q(W')^T + z W_eff^T = X_int Q(W')^T + W_eff z,

i.e. exactly a deployment whose folded bias is ``b = W_eff z = Q(W') (z / s)`` (computable from
the packed codes and ``act_scale``). The reference code instead symmetrizes the fp model first
(``fc.bias += W z``, LayerNorm ``bias -= z``) and quantizes afterwards, i.e. folds ``b = W z``;
the two differ by ``(W - W_eff) z``, the weight-rounding error applied to the constant part,
which forward-pre-hooks on the input cannot express. Llama Linears have no bias: a deployment
adds one (and, to absorb ``-z`` for free, a bias on the RMSNorm, as the reference's
``LlamaRMSNorm_bias`` does).

Packed format: ``<name>.qweight/.scales[/.zeros]`` hold the codes of ``Q(W')`` (the *folded*
weight) and ``<name>.act_scale`` (fp32 ``s``) is stored alongside, so ``W_eff =
dequantize_packed(...) / act_scale``; ``meta["tensors"][name]["folded_act_scale"]`` marks it.

Ablations and reference variants:
- ``fold_scales=False``: one static per-tensor activation scale ``max_c absmax_c / qmax`` and
  plain per-channel RTN weights (the per-tensor static baseline; the shift still applies when
  ``symmetrize``).
- ``channelwise="norm_inputs"``: the reference's Llama setting: static per-channel (and the
  shift) only for the norm-fed q/k/v and gate/up projections; o_proj and down_proj get plain RTN
  weights and dynamic per-token activation scales. ``"all"`` (default) treats every target alike.
- The reference's Llama path does not symmetrize (its symmetrization is wired for OPT/BLOOM,
  whose LayerNorms have a bias); ``symmetrize=True`` on Llama is our extension via ``act_shift``.
- Saturation: the emulation clamps codes to ``[-qmax, qmax]`` (activation.py's symmetric grid);
  the reference's Llama kernel clamps to ``[-qmax-1, qmax]``. Statistics are taken on the fp32
  model in one pass (not sequentially through already-quantized layers), as the reference does.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from transformers import PreTrainedModel

from components.quant.activation import ActivationSpec
from components.quant.base import CalibratedParams, PackedWeights, QuantizationError, QuantizedModel, Quantizer
from components.quant.calibration import check_calibration
from components.quant.rtn import quantize_tensor
from components.registry import Paper

SUPPORTED = (4, 6, 8)
# Linears fed by an RMSNorm in a Llama block: where the reference uses static per-channel scales.
NORM_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


class OutlierTuneQuantizer(Quantizer):
    key = "outlier_tune"
    paper = Paper(
        title="OutlierTune: Efficient Channel-Wise Quantization for Large Language Models",
        url="https://arxiv.org/abs/2406.18832",
        arxiv="2406.18832",
    )
    needs_calibration = True

    class Params(CalibratedParams):
        bits: Literal[4, 6, 8] = Field(8, description="weight bits (per-output-channel RTN grid of W diag(s))")
        activation_bits: Literal[4, 6, 8] = Field(8, description="activation bits (static scales)")
        symmetrize: bool = Field(True, description="per-channel mid-range shift z before quantizing x")
        fold_scales: bool = Field(
            True, description="per-channel static activation scales folded into the weights (OutlierTune); "
                              "False = one static per-tensor activation scale (baseline)")
        channelwise: Literal["all", "norm_inputs"] = Field(
            "all", description="'norm_inputs' = reference Llama setting: static per-channel only for "
                               "q/k/v and gate/up, dynamic per-token for o_proj and down_proj")
        clip_ratio: float = Field(1.0, gt=0, le=1, description="clamp each calibration sequence to this "
                                  "fraction of its min/max before the channel absmax (reference Llama: 0.8)")
        weight_symmetric: bool = Field(False, description="symmetric weight grid (reference: asymmetric)")
        batch_size: int = Field(8, gt=0, description="calibration sequences per forward pass")

    def quantize(self, model: PreTrainedModel, calibration: torch.Tensor | None = None) -> QuantizedModel:
        p = self.params
        for field in ("bits", "activation_bits"):  # params may be built unvalidated (model_construct)
            value = getattr(p, field)
            if value not in SUPPORTED:
                raise QuantizationError(f"{self.key}: unsupported {field}={value!r}; supported: {list(SUPPORTED)}")
        if not 0 < p.clip_ratio <= 1:
            raise QuantizationError(f"{self.key}: clip_ratio={p.clip_ratio!r} must be in (0, 1]")
        self.refuse_if_quantized(model)
        tokens = check_calibration(calibration, self.key)
        targets = self.target_linears(model)
        static = [(n, m) for n, m in targets
                  if p.channelwise == "all" or any(n.endswith("." + s) for s in NORM_INPUTS)]
        ranges = collect_channel_ranges(model, [n for n, _ in static], tokens, p.batch_size)

        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store = PackedWeights()
        side: dict[str, torch.Tensor] = {}
        ratios = []
        static_names = {n for n, _ in static}
        for module_name, linear in targets:
            name = f"{module_name}.weight"
            weight = linear.weight.detach().to(torch.float32)
            if module_name in static_names:
                mins, maxs = ranges[module_name]
                step, shift, absmax = activation_scales(mins, maxs, p.activation_bits, p.symmetrize,
                                                        p.fold_scales, p.clip_ratio)
                ratios.append(float(absmax.max() / absmax.median().clamp(min=1e-12)))
                codes, scales, zeros, effective = fold_quantize_weight(
                    weight, step if p.fold_scales else None, p.bits, p.weight_symmetric, name)
                side[f"{module_name}.act_scale"] = step
                if p.symmetrize:
                    side[f"{module_name}.act_shift"] = shift
            else:
                codes, scales, zeros, effective = fold_quantize_weight(weight, None, p.bits, p.weight_symmetric, name)
            state[name] = effective.to(state[name].dtype)
            store.add_int(name, weight.shape, codes, scales, zeros, p.bits, "per_channel", None, p.weight_symmetric)
            if module_name in static_names and p.fold_scales:
                store.add_raw(f"{name}.act_scale", side[f"{module_name}.act_scale"])
                store.tensors[name]["folded_act_scale"] = True

        spec = ActivationSpec(bits=p.activation_bits, modules=tuple(n for n, _ in targets),
                              granularity="per_token", symmetric=True)
        meta = store.meta(
            "outlier_tune", bits=p.bits, granularity="per_channel", group_size=None,
            symmetric=p.weight_symmetric, zero_point=2 ** (p.bits - 1) if p.weight_symmetric else None,
            activations=spec.to_meta(), fold_scales=p.fold_scales, symmetrize=p.symmetrize,
            channelwise=p.channelwise, clip_ratio=p.clip_ratio,
            metrics={"act_channel_absmax_max_over_median": max(ratios) if ratios else 0.0})
        return QuantizedModel(state_dict=state, packed=store.packed, meta=meta, activation_state=side)


@torch.no_grad()
def collect_channel_ranges(model: PreTrainedModel, names: list[str], tokens: torch.Tensor,
                           batch_size: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per calibration sequence, each named Linear's per-input-channel min and max over tokens.

    Returns ``{name: (mins, maxs)}``, each ``[n_sequences, in_features]`` fp32, from the fp model."""
    modules = dict(model.named_modules())
    found: dict[str, tuple[list, list]] = {n: ([], []) for n in names}

    def hook(_module, args, name):
        x = args[0].detach().float()
        x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 2 else x.reshape(1, 1, -1)
        found[name][0].append(x.amin(dim=1))
        found[name][1].append(x.amax(dim=1))

    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[start:start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (torch.cat(lo), torch.cat(hi)) for n, (lo, hi) in found.items()}


def activation_scales(mins: torch.Tensor, maxs: torch.Tensor, bits: int, symmetrize: bool = True,
                      per_channel: bool = True, clip_ratio: float = 1.0):
    """Static activation step, shift and clipped absmax from per-sequence channel ranges.

    ``mins``/``maxs``: ``[n_sequences, in]``. Returns ``(step, shift, absmax)``: ``step`` is
    ``[in]`` (per channel) or ``[1]`` (per tensor), ``shift`` and ``absmax`` are ``[in]`` (all fp32).
    """
    mins, maxs = mins.float(), maxs.float()
    if mins.dim() == 1:
        mins, maxs = mins[None], maxs[None]
    shift = ((mins + maxs) / 2).mean(0) if symmetrize else torch.zeros(mins.shape[-1])
    lo, hi = mins - shift, maxs - shift
    if clip_ratio < 1.0:  # clamp each sequence to a fraction of its whole-tensor range (monotone, so
        seq_lo = lo.amin(1, keepdim=True) * clip_ratio  # clamping the channel extrema is exact)
        seq_hi = hi.amax(1, keepdim=True) * clip_ratio
        lo = torch.minimum(torch.maximum(lo, seq_lo), seq_hi)
        hi = torch.minimum(torch.maximum(hi, seq_lo), seq_hi)
    absmax = torch.maximum(lo.abs(), hi.abs()).amax(0)
    if not torch.isfinite(absmax).all():
        raise QuantizationError("outlier_tune: calibration activations contain inf or nan")
    qmax = 2 ** (bits - 1) - 1
    step = absmax / qmax if per_channel else (absmax.max() / qmax).reshape(1)
    step = torch.where(step > 0, step, torch.ones_like(step))  # never active in calibration: any step
    return step, shift, absmax


def fold_quantize_weight(weight: torch.Tensor, step: torch.Tensor | None, bits: int, symmetric: bool,
                         name: str = "weight"):
    """Quantize ``W diag(step)`` per output channel; return ``(codes, scales, zeros, W_eff)``.

    ``W_eff = Q(W diag(step)) diag(1/step)`` is the weight an fp forward must use with inputs
    fake-quantized as ``round(x / step) * step``; ``step=None`` is plain per-channel RTN."""
    folded = weight if step is None else weight * step[None, :]
    codes, scales, zeros, dequant = quantize_tensor(folded, bits, "per_channel", 128, symmetric, name)
    effective = dequant if step is None else dequant / step[None, :]
    return codes, scales, zeros, effective
