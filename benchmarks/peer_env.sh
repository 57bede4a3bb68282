#!/usr/bin/env bash
# A separate venv for a peer library that benchmarks compare against (never a paperdag dependency).
# torch is installed first from the local CPU wheel at the exact pin so pip never resolves a CUDA
# build; the pin is then repeated as a constraint so a peer requirement that conflicts with it fails
# loudly instead of silently replacing the CPU build. The install log is kept so a pin conflict can
# be reported verbatim. Idempotent: re-running reuses the venv.
#   bash benchmarks/peer_env.sh NAME PIP_SPEC CHECK_PYTHON   -> benchmarks/_work/NAME-venv/bin/python
# CHECK_PYTHON runs in the venv last and prints the versions the benchmark used. A peer that needs no
# torch sets PEER_TORCH=0: nothing is pinned then.
set -euo pipefail
NAME="$1"; SPEC="$2"; CHECK="$3"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/benchmarks/_work/$NAME-venv"
LOG="$ROOT/benchmarks/_work/$NAME-install.log"
CONSTRAINTS="$ROOT/benchmarks/_work/$NAME-constraints.txt"
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
  if [ "${PEER_TORCH:-1}" = 1 ]; then
    # torch from the local CPU wheel file (its own deps from the index); the pin is checked against the file
    wheel=$(ls "$TORCH_WHEEL_DIR"/torch-2.13.0+cpu-*.whl | head -n1)
    "$VENV/bin/python" -m pip install "$wheel"
    echo "$TORCH_PIN" > "$CONSTRAINTS"
  else
    : > "$CONSTRAINTS"
  fi
  "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" $SPEC
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "$NAME install failed (exit $status); full log: $LOG" >&2
  exit "$status"
fi
"$VENV/bin/python" -c "$CHECK"
