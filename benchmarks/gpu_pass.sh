#!/usr/bin/env bash
# The whole GPU pass in one call (device tool): install, full tests on the GPU, realistic-size tests,
# compute-sanitizer on a small case, the main job and the benchmarks. Results go to the folder given
# as $1 (default: benchmarks/results/<date>), one log per step.
#   bash benchmarks/gpu_pass.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
python -c "import fused_resnet; print(fused_resnet.available_backends())" | tee "$OUT/backends.txt"
timeout 300 python -m pytest -q -x tests 2>&1 | tail -40 > "$OUT/tests.log"; tail -3 "$OUT/tests.log"
timeout 120 compute-sanitizer --tool memcheck python -m pytest -q tests/test_parity.py -k "triton and k3x3-s2 and train and plain" \
  > "$OUT/sanitizer.log" 2>&1; tail -3 "$OUT/sanitizer.log"
timeout 120 python -m fused_resnet --quick > "$OUT/main.log" 2>&1; tail -20 "$OUT/main.log"
timeout 240 python benchmarks/bench.py --out "$OUT" 2>&1 | grep -v "bench:" > "$OUT/bench.log"; tail -30 "$OUT/bench.log"
