#!/usr/bin/env bash
# Separate venv with llm-compressor (Apache-2.0, optional GPTQ parity reference only; never a paperdag
# dependency); see peer_env.sh for how torch stays the CPU build.
#   bash benchmarks/llmcompressor_env.sh   -> benchmarks/_work/llmc-venv/bin/python
exec bash "$(dirname "$0")/peer_env.sh" llmc "${LLMC_SPEC:-llmcompressor}" \
  "import torch, llmcompressor, transformers, importlib.metadata as m; \
from llmcompressor.modifiers.quantization import GPTQModifier; from llmcompressor import oneshot; \
print('torch', torch.__version__, 'llmcompressor', llmcompressor.__version__, \
'compressed-tensors', m.version('compressed-tensors'), 'transformers', transformers.__version__)"
