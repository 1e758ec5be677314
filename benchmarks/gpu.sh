#!/usr/bin/env bash
# The whole GPU evidence in one command (about 10 minutes on one H100/H200):
#
#     bash benchmarks/gpu.sh            # writes benchmarks/results/<date>-<hhmm>-gpu-*.json and .md
#
# 1. tests/test_cuda.py: gradients over changing masks in eager, default and reduce-overhead
#    (ResNet-18 and a small ViT) and max-autotune (a small CNN and the ViT) vs the eager
#    reference; bf16 autocast; channels_last; a policy's step; NCCL DDP.
# 2. ldbfx bench: ResNet-50 and ViT-B/16 at 224 px, bf16 autocast, eager and compiled, 0/30/50/100%
#    of the eligible layers dropped, against the ideal (the same layers frozen).
# 3. benchmarks/ldb_speedup.py: LayerDropBack's epoch mix (half the epochs DROP) at kappa = 1 and 2,
#    against the paper's 16.9-23.3%: the share of the speed-up that comes from skipped dW and the
#    share from the larger batch.
# 4. benchmarks/report.py: the markdown tables for docs/benchmarks.md.
#
# On a machine without CUDA it says so and exits 0 (nothing to measure). Each phase has its own
# time limit, so a slow phase cannot eat the others; what finished is kept (ldbfx bench writes its
# JSON after every fraction).
set -uo pipefail
cd "$(dirname "$0")/.."
# The scripts under benchmarks/ import ldbfx from this checkout even where it is not installed.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device here: skipped (run it where a GPU is lent)"
    exit 0
fi
day=$(date +%Y-%m-%d)
out=benchmarks/results/$day-$(date +%H%M)-gpu  # a rerun never mixes with, or deletes, an earlier run's files
device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
echo "== $device, torch $("$PY" -c 'import torch; print(torch.__version__)'), $(date -u)"
start=$SECONDS
status=0

phase() {  # phase <limit_s> <name> <command...>
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout -k 10 "$limit" "$@" || { echo "== $name: exit $?"; status=1; }
}

# Within 540 s in all (the device machine's 600 s per command); each model's core benchmark is its
# own phase with its own file, so a phase cut short loses only its own figures.
phase 200 "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
for model in resnet50 vit_b_16; do
    phase 130 "core benchmark, $model" "$PY" -m ldbfx bench "$model" --device cuda --amp bf16 \
        --resolution 224 --batch 128 --fractions 0 0.3 0.5 1.0 --steps 5 --warmup 2 --rounds 2 \
        --out "$out-core-$model.json"
done
phase 70 "LDB epoch mix" "$PY" benchmarks/ldb_speedup.py --models resnet50 vit_b_16 --device cuda \
    --amp bf16 --resolution 224 --batch 64 --steps 5 --rounds 3 --no-compile --out "$out-ldb-speedup.json"
tables=()
for f in "$out-core-resnet50.json" "$out-core-vit_b_16.json" "$out-ldb-speedup.json"; do [ -f "$f" ] && tables+=("$f"); done
if [ ${#tables[@]} -gt 0 ]; then
    { echo "### $device ($day, \`bash benchmarks/gpu.sh\`)"; echo; "$PY" benchmarks/report.py "${tables[@]}"; } \
        > "$out.md" && echo "== tables for docs/benchmarks.md: $out.md" \
        || { echo "== report failed"; rm -f "$out.md"; status=1; }
fi
echo "== done in $((SECONDS - start))s, status $status"
exit $status
