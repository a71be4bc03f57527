#!/usr/bin/env bash
# One device call that checks and times the attention kernels (issue 14):
#   1. the GPU tests of the kernels (-m gpu: bf16 and FP8 forward, the autotuned out= buffer,
#      block maps; TESTS_K passes a -k filter, e.g. "not every_autotune_config"), then
#   2. benchmarks/attention.py: one table per head_dim with the device, versions, measured
#      ceilings and every baseline (SDPA cuDNN, SDPA flash, compiled Flex given full blocks, ours
#      bf16, ours FP8), densities 0.05-1.0: llama3-8b (d=128) at D128_SEQLENS, then gemma3-270m
#      (d=256) and smollm2-135m (d=64) at OTHER_SEQLENS. Each part stops after its *_TIMEOUT
#      seconds; the JSON holds every row finished by then.
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
    timeout "${TESTS_TIMEOUT:-600}" python3 -m pytest -q -m gpu -k "${TESTS_K:-}" \
        tests/test_triton.py tests/test_fp8.py tests/test_kernel_out.py 2>&1 | tail -n 20 \
        | tee "$OUT/pytest.log"
fi
bench() {  # name, timeout, attention.py arguments...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 benchmarks/attention.py --json "$OUT/attention_$name.json" \
        --md "$OUT/attention_$name.md" "$@" > "$OUT/bench_$name.log" 2>&1
    echo "attention.py $name: exit $?"
    cat "$OUT/attention_$name.md" 2>/dev/null
}
bench d128 "${D128_TIMEOUT:-1200}" --shapes llama3-8b --seqlens "${D128_SEQLENS:-8192,32768,131072}"
bench d256_d64 "${OTHER_TIMEOUT:-1200}" --shapes gemma3-270m,smollm2-135m \
    --seqlens "${OTHER_SEQLENS:-8192,32768,131072}"
