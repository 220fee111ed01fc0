#!/usr/bin/env bash
# The whole GPU pass in one call (run it through the device tool):
#   bash benchmarks/gpu_pass.sh OUT [STAGES]
# STAGES (default "build tests sanitize kernels profile train bench tune"): any subset, in that order, so a pass that does
# not fit one 10-minute call can be split over several (the build stays in the work tree between calls).
#   build     pip install --no-build-isolation -e . : builds fused_resnet._C in place, so the tests and
#             every command run from here import the tree with its extension (no copying by hand)
#   tests     the whole suite on the GPU: every backend, fp32/bf16/fp16 parity, fp64 gradcheck
#   sanitize  compute-sanitizer memcheck + racecheck on a small case of every kernel, both backends
#   kernels   the static kernel report with this machine's Triton (registers, spills, MMA kind, sm_90)
#             and the H100 time predictions per case: OUT/kernels.json, OUT/kernels.md
#   profile   per-kernel device time of a training step of the ResNet-50 and CIFAR layer cases (bf16,
#             channels_last): eager_cl (cuDNN), triton, cuda, against the copy bandwidth and matmul rate
#             measured in the same run: OUT/profile/profile.json, profile.md (the table for NOTES.md)
#   train     fused-resnet train --compare (digits), with the fused kernels
#   bench     fused-resnet bench --full --graphs (bf16 first, within a time budget): every provider also
#             as CUDA-graph replay; results JSON + RESULTS.md + chart
#   tune      the Triton config sweep (bf16, channels_last) within a time budget: OUT/configs.json is the
#             repo's table with this GPU's winners merged in; commit it as fused_resnet/triton/configs.json
# Every step logs to OUT/<step>.log; a summary of each goes to OUT/summary.txt. Exit status: the number
# of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_pass.sh OUT [STAGES]}
STAGES=${2:-build tests sanitize kernels profile train bench tune}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
FAILED=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
step() {  # step NAME TIMEOUT CMD...: run, log, one summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local line="$name: rc=$rc in $((SECONDS - t0))s"
  [[ $rc == 124 ]] && line="$line (TIMED OUT after ${limit}s)"
  echo "$line" | tee -a "$SUMMARY"
  tail -4 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  [[ $rc == 0 ]] || FAILED=$((FAILED + 1))
}

{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; \
  git rev-parse --short HEAD; } > "$OUT/environment.txt" 2>&1
head -20 "$OUT/environment.txt"

if has build; then
  step build 420 env MAX_JOBS=16 FUSED_RESNET_CUDA_ARCH="${FUSED_RESNET_CUDA_ARCH:-9.0}" \
    python -m pip install --no-build-isolation --no-deps -v -e .
  python -c "import fused_resnet; print(fused_resnet.available_backends())" | tee -a "$SUMMARY"
fi
if has tests; then
  step tests 540 python -m pytest -q -ra --durations=15 tests
fi
if has sanitize; then
  for backend in cuda triton; do
    for tool in memcheck racecheck; do
      step "sanitize-$backend-$tool" 300 compute-sanitizer --tool "$tool" --error-exitcode 9 \
        python benchmarks/sanitize_case.py --backend "$backend"
    done
  done
fi
if has kernels; then
  step kernels 300 python -m fused_resnet kernels --arch 90 --quiet --check --json "$OUT/kernels.json" \
    --markdown "$OUT/kernels.md"
fi
if has profile; then
  step profile 540 python -m fused_resnet.bench.profile --out "$OUT/profile"
fi
if has train; then
  step train 300 python -m fused_resnet train --compare --out "$OUT/train"
fi
if has bench; then
  # bf16 is what the targets are stated in; the other dtypes follow if time remains.
  step bench 570 python -m fused_resnet bench --full --graphs --dtypes bf16,fp16,fp32 --time-budget 480 --out "$OUT/results"
fi
if has tune; then
  cp fused_resnet/triton/configs.json "$OUT/configs.json"
  step tune 570 python -m fused_resnet kernels --tune --dtypes bfloat16 --layouts nhwc --time-budget 480 \
    --table "$OUT/configs.json" --json "$OUT/tune.json"
fi
echo "failed steps: $FAILED" | tee -a "$SUMMARY"
exit "$FAILED"
