#!/usr/bin/env bash
# The whole GPU evidence in one command, within GPU_SH_BUDGET seconds (default 570: the device
# machine's 600 s per command, less a margin):
#
#     bash benchmarks/gpu.sh            # all phases
#     bash benchmarks/gpu.sh tests      # the tests only (1)
#     bash benchmarks/gpu.sh bench      # the benchmarks only (2-4)
#
# 1. tests/test_cuda.py: gradients over changing masks in eager, default and reduce-overhead
#    (ResNet-18 and a small ViT) vs the eager reference, CUDA graphs kept under reduce-overhead;
#    bf16 autocast; channels_last; a policy's step; row selections from CUDA indices; NCCL DDP.
#    The same under max-autotune (a small CNN and the ViT) runs last, with what the budget leaves.
# 2. ldbfx bench: ResNet-50 (channels_last) and ViT-B/16 at 224 px, bf16 autocast, eager at
#    0/30/50/100% of the eligible layers dropped and compiled at 0/30% (each compiled fraction
#    costs the ideal one more compile of the model: GPU_SH_COMPILED="0 0.3 0.5 1.0" for all),
#    against the ideal (the same layers frozen).
# 3. benchmarks/ldb_speedup.py: LayerDropBack's epoch mix (half the epochs DROP) at kappa = 1 and 2,
#    against the paper's 16.9-23.3%: the share of the speed-up that comes from skipped dW and the
#    share from the larger batch.
# 4. benchmarks/report.py: the markdown tables for docs/benchmarks.md, also printed at the end.
# 5. benchmarks/time_to_loss.py lm-lora at the GPU size (hidden 512, 8 layers, sequences of 256,
#    batch 32), one seed, short budgets: does DropBP reach the baseline's loss sooner where the
#    backward is a larger share of the step than on 2 CPU cores? (needs transformers and peft).
#
# Everything goes to $OUT when it is set (the device tool returns only that folder; a command cut
# off by its time limit still returns what is there), else to benchmarks/results/: the test log
# and JUnit XML, each phase's JSON (written as it is measured) and log, and the tables.
# On a machine without CUDA it says so and exits 0 (nothing to measure); a Python without torch is
# an error (exit 2), not a skip. Each phase has its own time limit, cut to what is left of the
# budget, so a slow phase cannot eat the others; what finished is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
# The scripts under benchmarks/ import ldbfx from this checkout even where it is not installed.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The device image's Python with torch is python3; plain python may be absent or another one.
PY=${PYTHON:-$(command -v python3 || command -v python)}
if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "benchmarks/gpu.sh: '$PY' cannot import torch (set PYTHON to the Python that has it)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device here: skipped (run it where a GPU is lent)"
    exit 0
fi
what=${1:-all}
case $what in all|tests|bench) ;; *) echo "usage: bash benchmarks/gpu.sh [all|tests|bench]" >&2; exit 2 ;; esac
budget=${GPU_SH_BUDGET:-570}
compiled_fractions=${GPU_SH_COMPILED:-0 0.3}
day=$(date +%Y-%m-%d)
dir=${OUT:-benchmarks/results}
mkdir -p "$dir"
out=$dir/$day-$(date +%H%M%S)-gpu  # a rerun never mixes with, or deletes, an earlier run's files
device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
echo "== $device, torch $("$PY" -c 'import torch; print(torch.__version__)'), $(date -u), budget ${budget}s"
start=$SECONDS
status=0

phase() {  # phase <limit_s> <name> <log> <command...>: at most its limit, and what the budget leaves
    local limit=$1 name=$2 log=$3 left
    shift 3
    left=$((budget - (SECONDS - start) - 10))  # 10 s for the tables
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "== $name: skipped, ${left}s of the budget left"; status=1; return
    fi
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"; status=1; }
}

cuda_tests() {  # cuda_tests <limit_s> <name> <file stem> <pytest -k expression>
    # -v: a log cut off by the limit still shows which tests passed.
    phase "$1" "$2" "$out-$3.log" "$PY" -m pytest -v -p no:cacheprovider --junitxml "$out-$3.xml" \
        -k "$4" tests/test_cuda.py
}
if [ "$what" != bench ]; then
    cuda_tests 240 "CUDA tests" cuda-tests "not max_autotune"
fi
if [ "$what" != tests ]; then
    for model in resnet50 vit_b_16; do
        # channels_last: how CNNs are trained on GPUs
        if [ "$model" = resnet50 ]; then limit=150 layout=(--channels-last); else limit=120 layout=(); fi
        # shellcheck disable=SC2086  # the fractions are separate words
        phase "$limit" "core benchmark, $model" "$out-core-$model.log" "$PY" -m ldbfx bench "$model" \
            --device cuda --amp bf16 ${layout[@]+"${layout[@]}"} --resolution 224 --batch 128 \
            --fractions 0 0.3 0.5 1.0 --compiled-fractions $compiled_fractions \
            --steps 5 --warmup 2 --rounds 2 --out "$out-core-$model.json"
    done
    phase 50 "LDB epoch mix" "$out-ldb-speedup.log" "$PY" benchmarks/ldb_speedup.py \
        --models resnet50 vit_b_16 --device cuda --amp bf16 --resolution 224 --batch 64 --steps 5 \
        --rounds 3 --no-compile --out "$out-ldb-speedup.json"
    tables=()
    for f in "$out-core-resnet50.json" "$out-core-vit_b_16.json" "$out-ldb-speedup.json"; do
        [ -f "$f" ] && tables+=("$f")
    done
    if [ ${#tables[@]} -gt 0 ]; then
        { echo "### $device ($day, \`bash benchmarks/gpu.sh\`)"; echo; "$PY" benchmarks/report.py "${tables[@]}"; } \
            > "$out.md" && { echo "== tables for docs/benchmarks.md ($out.md):"; cat "$out.md"; } \
            || { echo "== report failed"; rm -f "$out.md"; status=1; }
    fi
fi
if [ "$what" != tests ]; then
    phase 240 "time to loss, LoRA" "$out-time-to-loss.log" "$PY" benchmarks/time_to_loss.py lm-lora \
        --size gpu --device cuda --budget 8 --seeds 0 --evals 6 --pretrain-steps 400 --cache "${TMPDIR:-/tmp}/ldbfx-cache" \
        --out "$out-time-to-loss"
fi
if [ "$what" != bench ]; then
    # max-autotune tunes every distinct kernel shape: last, with whatever the budget leaves.
    cuda_tests 240 "CUDA tests, max-autotune" cuda-tests-max-autotune "max_autotune"
fi
echo "== done in $((SECONDS - start))s, status $status"
exit $status
