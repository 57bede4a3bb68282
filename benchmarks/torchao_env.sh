#!/usr/bin/env bash
# Separate venv with torchao (BSD-3; PyTorch's quantization library), a parity and speed reference
# for the QAT fake quantization only, never a paperdag dependency (safetensors carries the tensors
# between the two processes).
#   bash benchmarks/torchao_env.sh   -> benchmarks/_work/torchao-venv/bin/python
exec bash "$(dirname "$0")/peer_env.sh" torchao "${TORCHAO_SPEC:-torchao==0.18.0 safetensors numpy}" \
  "import torch, torchao, importlib.metadata as m; \
print('torch', torch.__version__, 'torchao', m.version('torchao'))"
