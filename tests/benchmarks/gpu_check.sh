#!/usr/bin/env bash
# The GPU check in one short command for a lent machine: from the repository root,
#   bash tests/benchmarks/gpu_check.sh            # wheels from ./wheels if present, results to $OUT
#   bash tests/benchmarks/gpu_check.sh --count 1000 --budget 300
# Every option goes on to gpu_check.py (see its --help); fill ./wheels beforehand with
#   python tests/benchmarks/gpu_check.py --fill-wheels wheels --slim
set -euo pipefail
cd "$(dirname "$0")/../.."
args=()
if [[ -d wheels && " $* " != *" --wheels "* && " $* " != *" --skip-install "* ]]; then
    args+=(--wheels wheels)
fi
exec "${PYTHON:-python3}" tests/benchmarks/gpu_check.py "${args[@]}" "$@"
