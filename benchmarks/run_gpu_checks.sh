#!/usr/bin/env bash
# The issue-6 GPU checks in one run (benchmarks 1 and 2 on a CUDA device); < 10 min in total.
#
#   bash benchmarks/run_gpu_checks.sh [OUTDIR]        # OUTDIR: default $OUT, else benchmarks/gpu_results
#
# 1. refactor_overhead.py --device cuda: LLaMA-7B-shaped LoRA pairs, 32 layers, r = 8, 16, 32
#    (targets: engine <= 0.8x the per-layer reference and <= 1.0x an AdamW step at r = 32;
#    the engine's r x r maths runs sync-free on the GPU), limit 180 s.
# 2. training_overhead.py --device cuda --model-size 1b: 1.1 B-parameter random LLaMA, bf16,
#    batch 4 x 512, lora / reflora / reflora-s / scaledgd / lora-rite / lora-pro with AdamW
#    (targets: reflora <= 1.05x lora, reflora-s <= 1.02x, lora-rite <= 1.38x, lora-pro <= 1.66x,
#    extra peak memory <= LoRA params),
#    limit 270 s.
# 3. the same on SmolLM2-135M's shapes (30 layers, hidden 576, 9/3 heads), bf16, batch 8 x 256,
#    limit 150 s.
# Each benchmark's full output goes to OUTDIR/<name>.log; the tables and headlines are printed
# at the end. A benchmark that fails or runs out of time is reported, and the other still runs.
# Copy the printed tables into benchmarks/RESULTS.md with the date and the GPU model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-benchmarks/gpu_results}}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu_checks: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False)" >&2
    exit 2
fi
{
    date -u +"date: %Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        | sed 's/^/gpu: /'
    "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)"
    lscpu 2>/dev/null | grep -m1 'Model name' | sed 's/  */ /g'
} | tee "$OUTDIR/machine.txt"

status=0
run_one() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s; log: $OUTDIR/$name.log"
    if [ "$rc" -ne 0 ]; then
        status=1
        [ "$rc" -eq 124 ] && echo "   TIMED OUT" || tail -n 5 "$OUTDIR/$name.log"
    fi
}

run_one refactor_overhead 180 "$PYTHON" benchmarks/refactor_overhead.py --device cuda \
    --layers 32 --repeats 10 --warmup 3
run_one training_overhead 270 "$PYTHON" benchmarks/training_overhead.py --device cuda \
    --model-size 1b --dtype bfloat16 --steps 10 --repeats 5 --warmup 3
run_one training_overhead_smollm2 150 "$PYTHON" benchmarks/training_overhead.py --device cuda \
    --model-size smollm2-135m --dtype bfloat16 --steps 10 --repeats 5 --warmup 3

echo
for name in refactor_overhead training_overhead training_overhead_smollm2; do
    echo "## $name"
    grep -E '^(#|\||headline)' "$OUTDIR/$name.log" 2>/dev/null || echo "(no table: see $OUTDIR/$name.log)"
    echo
done
exit $status
