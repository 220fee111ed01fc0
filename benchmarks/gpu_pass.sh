#!/usr/bin/env bash
# The whole GPU pass in one call of the device tool, driven by one deadline (benchmarks/gpu_pass.py says how):
#   bash benchmarks/gpu_pass.sh OUT [--budget SECONDS] [--dry-run] [--stages env,build,smoke,...]
# Default budget 480 s; the pass ends within budget + 30 s. OUT gets at most 8 files, 2 folders deep:
# summary.md (read it first), results.json, logs.tar.gz, profile.md, RESULTS.md, results/<run>.json + .png,
# configs.json (when the Triton sweep ran). --dry-run checks every stage's command on a CPU (CI does).
# The runbook (the device call, what to carry, what to commit): benchmarks/NOTES.md and docs/gpu-pass.md.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-$(command -v python || command -v python3)}" benchmarks/gpu_pass.py "$@"
