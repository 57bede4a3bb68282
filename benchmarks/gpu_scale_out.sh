#!/usr/bin/env bash
# The GPU measurements of the scale-out issue, as one prepared script for a lent GPU machine.
#   bash benchmarks/gpu_scale_out.sh          -> $OUT (default benchmarks/results)
# 1. gpu_check.py: auto precision, the trainer against a bare bf16 loop on the `small` preset, MFU
#    against the measured GEMM rate and the device's spec peak, compile, resume on CUDA.
# 2. Two independent stages on one GPU, side by side (--max-parallel 2) against one after another:
#    bench_parallel.py on the nano DAG with the `small` model, bf16 and 300-step pretrains (both
#    pretrains, and what reads them, share the GPU; GPUs are counted, not assigned).
# 3. Two ranks on one GPU: nano's pretrain_dense with resources.ranks=2. NCCL refuses two ranks on
#    one device; the exit code and the error's last lines are kept either way.
# SMOKE=1 runs 2 and 3 on a CPU with the nano model and short pretrains, to check the plumbing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1

if [ "${SMOKE:-0}" = 1 ]; then
  model=nano; steps=20; precision=fp32
else
  OUT="$OUT" "$PY" benchmarks/gpu_check.py || echo "gpu_check.py failed ($?)"
  model=small; steps=300; precision=auto
fi
set_args=(--set "model=$model" --set "precision=$precision")
for stage in pretrain_dense pretrain_spdf; do
  set_args+=(--set "stages.$stage.params.steps=$steps" --set "stages.$stage.params.checkpoint_every=0")
done
"$PY" benchmarks/bench_parallel.py --recipe tests/recipes/nano.yaml --tries 2 "${set_args[@]}" \
  --out "$OUT/parallel_one_gpu.json" || echo "bench_parallel.py failed ($?)"

ws=$(mktemp -d)
cp -r params "$ws/params"
cp tests/recipes/nano.yaml "$ws/params/nano.yaml"
only=(); for stage in corpus filter dedup tokenize pretrain_dense; do only+=(--only "$stage"); done
(cd "$ws" && PYTHONPATH="$OLDPWD" "$PY" -m flows.cli run nano --no-progress "${only[@]}" \
   "${set_args[@]}" --set stages.pretrain_dense.resources.ranks=2) > "$OUT/ranks_one_device.log" 2>&1
rc=$?
"$PY" - "$OUT" "$rc" "$model" <<'PY'
import json, sys
from pathlib import Path
out, rc, model = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
log = (out / "ranks_one_device.log").read_text().splitlines()
(out / "ranks_one_device.json").write_text(json.dumps(
    {"model": model, "ranks": 2, "devices": 1, "returncode": rc, "last_lines": log[-15:]}, indent=2) + "\n")
print(f"two ranks on one device: exit code {rc}")
PY
rm -rf "$ws"
