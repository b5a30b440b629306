#!/usr/bin/env bash
# Everything that needs a GPU, in sections that fit a short GPU session (no installs, from the source tree):
#
#   bash benchmarks/gpu_session.sh tests packed        # ~6 min on one H100
#   bash benchmarks/gpu_session.sh train accuracy      # ~5 min; accuracy needs CIFAR-10 in $OVSW_DATA
#
# tests:    every CUDA test (packed Triton kernels and CUDA graphs, fused training kernels, OvSW update
#           kernels, callbacks under 16-mixed / bf16-mixed against a plain AMP loop); OVSW_CUDA_EXAMPLES=10
#           random shapes per property test instead of 40;
# packed:   packed_gemm_gpu.py, packed_conv_gpu.py, packed_resnet_gpu.py in quick mode (issue 5 targets);
# train:    train_throughput.py (float twin, BNN, each callback, all three; fused and unfused) and
#           layer_kernels_gpu.py (issue 4 targets);
# accuracy: accuracy.py, ResNet-20 vanilla / AGS / SAD / AGS+SAD x 2 seeds, $OVSW_EPOCHS (default 10) epochs of
#           the 600-epoch schedule, 8 runs at once; rerun it to continue the runs (issue 3).
# Each step has its own time limit, so one slow or failing step does not take the others' time; the script
# exits non-zero if any step failed. JSON/markdown results and the log go to "$OUT" when it is set.
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
RESULTS=${OUT:-$ROOT/benchmarks/results}
LOG=$RESULTS/gpu_session.log
mkdir -p "$RESULTS"
START=$(date +%s)
FAILED=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - START ))s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee -a "$LOG"
"$PY" -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

for section in "${@:-tests}"; do
  case $section in
    tests)
      step "pytest (CUDA tests)" 300 "$PY" -m pytest -v -p no:cacheprovider --durations=10 \
        tests/test_triton_cuda.py tests/test_callbacks_cuda.py tests/test_ovsw_update.py tests/test_train_kernels.py ;;
    packed)
      step "packed_gemm_gpu.py" 45 "$PY" benchmarks/packed_gemm_gpu.py --quick
      step "packed_conv_gpu.py" 55 "$PY" benchmarks/packed_conv_gpu.py --quick
      step "packed_resnet_gpu.py" 110 "$PY" benchmarks/packed_resnet_gpu.py --quick ;;
    train)
      step "train_throughput.py" 150 "$PY" benchmarks/train_throughput.py --precisions 16-mixed --steps 30 --warmup 8 --unfused
      step "train_throughput.py bf16" 60 "$PY" benchmarks/train_throughput.py --precisions bf16-mixed --steps 30 --warmup 8
      step "layer_kernels_gpu.py" 60 "$PY" benchmarks/layer_kernels_gpu.py ;;
    accuracy)
      step "accuracy.py" 200 "$PY" benchmarks/accuracy.py --data "${OVSW_DATA:-data/cifar10-jpeg.tar.xz}" \
        --epochs "${OVSW_EPOCHS:-10}" --parallel 8 --resume --runs "$ROOT/runs/accuracy" --out "$RESULTS/accuracy" ;;
    *) echo "unknown section $section (tests, packed, train, accuracy)" | tee -a "$LOG"; FAILED+=("$section") ;;
  esac
done

if [ -n "${OUT:-}" ]; then
  find benchmarks/results -newermt "@$START" -type f -exec cp {} "$OUT"/ \;
fi
rm -rf "$SHIM"
echo "=== done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}" | tee -a "$LOG"
[ ${#FAILED[@]} -eq 0 ]
