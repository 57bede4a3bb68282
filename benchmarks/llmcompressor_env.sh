#!/usr/bin/env bash
# Separate venv with llm-compressor (Apache-2.0, optional GPTQ parity reference only; never a paperdag
# dependency). torch is installed first from the local CPU wheel at the exact pin so pip never resolves
# a CUDA build; the pin is then repeated as a constraint so an llmcompressor requirement that conflicts
# with it fails loudly instead of silently replacing the CPU build. The install log is kept so a pin
# conflict can be reported verbatim. Idempotent: re-running reuses the venv.
#   bash benchmarks/llmcompressor_env.sh   -> benchmarks/_work/llmc-venv/bin/python
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/benchmarks/_work/llmc-venv"
LOG="$ROOT/benchmarks/_work/llmc-install.log"
CONSTRAINTS="$ROOT/benchmarks/_work/llmc-constraints.txt"
TORCH_PIN="torch==2.13.0"
LLMC_SPEC="${LLMC_SPEC:-llmcompressor}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
PY="${PYTHON:-python3.11}"

mkdir -p "$ROOT/benchmarks/_work"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
set +e
{
  set -e
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch from the local CPU wheel file (its own deps from the index); the pin is checked against the file
  wheel=$(ls "$TORCH_WHEEL_DIR"/torch-2.13.0+cpu-*.whl | head -n1)
  "$VENV/bin/python" -m pip install "$wheel"
  echo "$TORCH_PIN" > "$CONSTRAINTS"
  "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "$LLMC_SPEC"
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "llmcompressor install failed (exit $status); full log: $LOG" >&2
  exit "$status"
fi
"$VENV/bin/python" -c "import torch, llmcompressor, transformers, importlib.metadata as m; \
from llmcompressor.modifiers.quantization import GPTQModifier; from llmcompressor import oneshot; \
print('torch', torch.__version__, 'llmcompressor', llmcompressor.__version__, \
'compressed-tensors', m.version('compressed-tensors'), 'transformers', transformers.__version__)"
