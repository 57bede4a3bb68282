"""Quantization methods a recipe can name."""
from components.quant.adaquant import AdaQuantQuantizer
from components.quant.adaround import AdaRoundQuantizer
from components.quant.base import Quantizer
from components.quant.bit_switch import BitSwitch
from components.quant.cbq import CbqQuantizer
from components.quant.flatquant import FlatQuantQuantizer
from components.quant.flexround import FlexRoundQuantizer
from components.quant.fliqs import FliqsQuantizer
from components.quant.gptq import GptqQuantizer
from components.quant.gradient_ptq_study import GradientPtqQuantizer
from components.quant.hawq import HawqQuantizer
from components.quant.hawq_v2 import HawqV2Quantizer
from components.quant.interlayer_hessian import InterlayerHessianQuantizer
from components.quant.minifloat_ptq import MinifloatPtqQuantizer
from components.quant.outlier_tune import OutlierTuneQuantizer
from components.quant.ptq161 import Ptq161Quantizer
from components.quant.rtn import RtnQuantizer
from components.registry import Registry

QUANTIZERS = Registry("quantize", Quantizer, [RtnQuantizer, GptqQuantizer,
                                              HawqQuantizer, HawqV2Quantizer, InterlayerHessianQuantizer,
                                              AdaRoundQuantizer, FlexRoundQuantizer, AdaQuantQuantizer,
                                              OutlierTuneQuantizer, MinifloatPtqQuantizer, FliqsQuantizer,
                                              Ptq161Quantizer, GradientPtqQuantizer, FlatQuantQuantizer,
                                              CbqQuantizer, BitSwitch])
