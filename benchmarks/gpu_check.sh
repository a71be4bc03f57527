#!/usr/bin/env bash
# One device call: GPU tests, then the attention benchmark (arguments pass through to
# benchmarks/attention.py). Logs and JSON land in $OUT (default ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    python3 -m pytest -q -x -m gpu tests/test_triton.py 2>&1 | tee "$OUT/pytest.log"
fi
python3 benchmarks/attention.py --json "$OUT/attention.json" --md "$OUT/attention.md" "$@" \
    2>&1 | grep -v "^$" | tee "$OUT/bench.log"
