#!/usr/bin/env bash
# Separate venv with mergekit (LGPL-3.0, optional parity reference only; never a paperdag dependency).
# torch is installed first from the local CPU wheel at the exact pin so pip never resolves a CUDA build;
# the install log is kept so a pin conflict can be reported verbatim.
#   bash benchmarks/mergekit_env.sh        -> benchmarks/_work/mergekit-venv/bin/mergekit-yaml
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/benchmarks/_work/mergekit-venv"
LOG="$ROOT/benchmarks/_work/mergekit-install.log"
TORCH_PIN="torch==2.13.0"
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
  # the pin is repeated as a constraint so a mergekit requirement that conflicts with it fails loudly
  # instead of silently replacing the CPU build
  echo "$TORCH_PIN" > "$ROOT/benchmarks/_work/mergekit-constraints.txt"
  "$VENV/bin/python" -m pip install -c "$ROOT/benchmarks/_work/mergekit-constraints.txt" mergekit
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "mergekit install failed (exit $status); full log: $LOG" >&2
  exit "$status"
fi
"$VENV/bin/python" -c "import torch, mergekit, transformers, importlib.metadata as m; \
print('torch', torch.__version__, 'mergekit', m.version('mergekit'), 'transformers', transformers.__version__)"
