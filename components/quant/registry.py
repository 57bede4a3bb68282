"""Quantization methods a recipe can name."""
from components.quant.base import Quantizer
from components.quant.gptq import GptqQuantizer
from components.quant.rtn import RtnQuantizer
from components.registry import Registry

QUANTIZERS = Registry("quantize", Quantizer, [RtnQuantizer, GptqQuantizer])
