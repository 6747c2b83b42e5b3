#!/usr/bin/env bash
# GPU check: one short run (a few minutes; it times itself out) on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT if set, else a new temporary folder
#   GPU_CHECK_BUDGET_S=300 OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# Installs nothing from the network: torch, torchvision, pytorch-ignite, omegaconf,
# tensorboard and scikit-learn must be there already; ember itself is installed with
# `pip install -e . --no-deps` when it cannot be imported.
#
# Sections (each with its own time limit, cut to what is left of the budget):
#   1. environment     nvidia-smi, torch/CUDA versions, the GPUs
#   2. gpu tests       python -m pytest -m gpu (tests marked `gpu`, skipped on CPU machines)
#   3. throughput      benchmarks/gpu_throughput.py: ember trainer/evaluator vs the hand loop,
#                      alexnet 224 px batch 256, fp32 / bf16 / bf16+channels_last, images/s
#   4. DISTRIBUTED     hook, marked below: single GPU vs DataParallel vs DDP-nccl agreement
# Each section's output goes to $OUT/<section>.txt and, all together, to $OUT/gpu_check.log;
# the throughput numbers also to $OUT/gpu_throughput.json. Exit status: 0 when every
# section passed, else the number of sections that failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
OUT="${OUT:-$(mktemp -d -t ember-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
FAILED=0
PY="${PYTHON:-python}"

# section NAME LIMIT_S COMMAND...: run COMMAND with a time limit, log its output.
section() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((left < 20)); then
        echo "=== $name: skipped, the ${BUDGET_S} s budget is spent ===" | tee -a "$LOG"
        FAILED=$((FAILED + 1))
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit} s, ${SECONDS} s elapsed) ===" | tee -a "$LOG"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" >> "$LOG"
    local rc=${PIPESTATUS[0]}
    tail -n 40 "$OUT/$name.txt"
    if ((rc == 124 || rc == 137)); then
        echo "=== $name: TIMED OUT after ${limit} s ===" | tee -a "$LOG"
    else
        echo "=== $name: exit $rc ===" | tee -a "$LOG"
    fi
    ((rc != 0)) && FAILED=$((FAILED + 1))
}

# ---- 1. environment --------------------------------------------------------------------
if ! "$PY" -c "import ember" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >> "$LOG" 2>&1
fi
section environment 60 bash -c "nvidia-smi || true; $PY -c '
import torch, ignite, ember
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version())
print(\"ignite\", ignite.__version__, \"ember\", ember.__version__)
print(\"GPUs:\", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print(\"bf16 supported:\", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
'"

# ---- 2. tests marked gpu ----------------------------------------------------------------
section gpu_tests 150 "$PY" -m pytest -m gpu -q -x -p no:cacheprovider

# ---- 3. throughput: ember vs the hand-written loop ------------------------------------------
section throughput 240 "$PY" benchmarks/gpu_throughput.py \
    --model alexnet --image-size 224 --batch 256 --iters 20 --repeats 3 \
    --configs fp32 bf16 bf16+channels_last --json "$OUT/gpu_throughput.json"

# ==== 4. DISTRIBUTED HOOK: single GPU vs DataParallel vs DDP-nccl agreement ===================
# The same AlexNet from the same seed on the same batches: one GPU, nn.DataParallel over the
# visible GPUs, DDP with nccl (one process per GPU), and bf16; images/s and weight agreement.
section distributed 150 "$PY" benchmarks/gpu_distributed.py --batch 256 --image-size 224 --iters 12
# ==== end of DISTRIBUTED HOOK ===============================================================

echo "=== done in ${SECONDS} s; ${FAILED} section(s) failed; results in $OUT ===" | tee -a "$LOG"
exit "$FAILED"
