#!/usr/bin/env bash
# Separate venv with the PyPI `data-selection` package (p-lambda/dsir, MIT; the reference DSIR, a
# speed and agreement reference only, never a paperdag dependency). It needs no torch: its
# dependencies are numpy, datasets, tqdm, joblib and nltk (the `wordpunct` tokenizer needs no nltk
# data download). The install log is kept so a failure can be reported verbatim. Idempotent:
# re-running reuses the venv.
#   bash benchmarks/data_selection_env.sh   -> benchmarks/_work/dsir-venv/bin/python
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/benchmarks/_work/dsir-venv"
LOG="$ROOT/benchmarks/_work/dsir-install.log"
DSIR_SPEC="${DSIR_SPEC:-data-selection==1.0.3}"
PY="${PYTHON:-python3.11}"

mkdir -p "$ROOT/benchmarks/_work"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
set +e
{
  set -e
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install "$DSIR_SPEC"
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "data-selection install failed (exit $status); full log: $LOG" >&2
  exit "$status"
fi
"$VENV/bin/python" -c "import importlib.metadata as m, numpy, nltk; \
from data_selection import HashedNgramDSIR; \
print('data-selection', m.version('data-selection'), 'numpy', numpy.__version__, 'nltk', nltk.__version__)"
