#!/usr/bin/env bash
# One-shot GPU session for the packed kernels (issue 5), about 6 minutes on one H100, no installs:
#
#   bash benchmarks/gpu_packed_session.sh        # from the repository root; $OUT (if set) gets the results
#
# 1. tests/test_triton_cuda.py (compiled Triton kernels vs the reference, CUDA-graph capture; 10 random
#    shapes per property test instead of 40: OVSW_CUDA_EXAMPLES);
# 2. benchmarks/packed_gemm_gpu.py, packed_conv_gpu.py, packed_resnet_gpu.py in quick mode (OVSW_QUICK=1).
# Each step has its own time limit, so one slow or failing step does not take the others' time; the
# script exits non-zero if any step failed. The JSON results (benchmarks/results/*_gpu_*.json) and a log
# are copied to "$OUT" when it is set.
#
# The package maps ``lightning_ovsw.kernels`` to ./kernels (pyproject package-dir), which PYTHONPATH=.
# alone does not: a throw-away folder links lightning_ovsw/* and kernels/ into one package instead.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
SHIM=$(mktemp -d)
mkdir "$SHIM/lightning_ovsw"
for f in "$ROOT"/lightning_ovsw/*; do ln -s "$f" "$SHIM/lightning_ovsw/"; done
ln -s "$ROOT/kernels" "$SHIM/lightning_ovsw/kernels"
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OVSW_QUICK=1 OVSW_CUDA_EXAMPLES=10
unset TRITON_INTERPRET
LOG=${OUT:-$ROOT/benchmarks/results}/gpu_packed_session.log
mkdir -p "$(dirname "$LOG")"
START=$(date +%s)
FAILED=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - START ))s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { FAILED+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"); }
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee -a "$LOG"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
step "pytest tests/test_triton_cuda.py" 150 "$PY" -m pytest -v -p no:cacheprovider --durations=10 tests/test_triton_cuda.py
step "packed_gemm_gpu.py" 45 "$PY" benchmarks/packed_gemm_gpu.py --quick
step "packed_conv_gpu.py" 55 "$PY" benchmarks/packed_conv_gpu.py --quick
step "packed_resnet_gpu.py" 110 "$PY" benchmarks/packed_resnet_gpu.py --quick

if [ -n "${OUT:-}" ]; then
  find benchmarks/results -name '*_gpu_*.json' -newermt "@$START" -exec cp {} "$OUT"/ \;
fi
rm -rf "$SHIM"
echo "=== done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}" | tee -a "$LOG"
[ ${#FAILED[@]} -eq 0 ]
