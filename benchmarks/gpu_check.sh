#!/usr/bin/env bash
# One device call that checks and times the attention kernels (issue 14):
#   1. the GPU tests of the kernels (-m gpu: bf16 and FP8 forward, every autotune config, block
#      maps, the out= buffer), then
#   2. benchmarks/attention.py: one table per head_dim (llama3-8b d=128, smollm2-135m d=64,
#      gemma3-270m d=256) with the device, versions, measured ceilings and every baseline (SDPA
#      cuDNN, SDPA flash, compiled Flex given full blocks, ours bf16, ours FP8), N 8k-128k,
#      densities 0.05-1.0. Arguments pass through to attention.py (e.g. --seqlens 8192).
# Logs, JSON and markdown land in $OUT (default ./gpu_out).
#   OUT=gpu_out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    python3 -m pytest -q -x -m gpu tests/test_triton.py tests/test_fp8.py tests/test_kernel_out.py \
        2>&1 | tail -n 30 | tee "$OUT/pytest.log"
fi
python3 benchmarks/attention.py --json "$OUT/attention.json" --md "$OUT/attention.md" "$@" \
    2>&1 | grep -v "^$" | tee "$OUT/bench.log" | grep -v '^{'
