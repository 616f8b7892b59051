#!/usr/bin/env bash
# Every GPU figure the project tracks, in one device call of at most 8 minutes on one H200 (each step under
# its own time limit, cheapest first where it matters, so a slow compile costs only its own table):
#   llama    LLaMA-2-7B stack (2 layers, bf16 autocast, 4 x 512): eager, compiled, CUDA graphs; GOAT vs peft LoRA
#   minilm   MiniLM's architecture (32 x 64), the same three modes     smollm2  SmolLM2-135M's (8 x 128), eager
#   kernels  CUDA kernels per eager step (torch.profiler)              cudagraph  CUDA-graph training = eager?
#   init     initialisation of one LLaMA-2-7B layer, both routes judged against a float64 SVD
# then summary.md: each figure against its target. Random weights throughout (the device has no model files).
#
#   device:  bash scripts/gpu_bench.sh                                (OUT=... to choose the folder)
#   here:    PYTHON=.venv/bin/python bash scripts/gpu_bench.sh --smoke (the dry run: tiny models, the CPU, seconds)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu-bench}
PYTHON=${PYTHON:-python3}
SMOKE=""; BENCH_SMOKE=()
if [[ ${1:-} == --smoke ]]; then SMOKE=--smoke; BENCH_SMOKE=(--smoke --compile-backend eager --device cpu); fi
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: output in NAME.log, its time and exit status after it
  local name=$1 limit=$2; shift 2
  echo "== $name (limit $limit s): $*"; SECONDS=0
  timeout "$limit" "$@" 2>&1 | grep -v -e Warning -e "warnings.warn" -e USDT | tee "$OUT/$name.log"
  echo "== $name took ${SECONDS} s, exit ${PIPESTATUS[0]}"
}
bench() { local name=$1 limit=$2; shift 2; step "$name" "$limit" "$PYTHON" -m goat_lora.bench "$@" "${BENCH_SMOKE[@]}" --json "$OUT/$name.json"; }
{ nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv 2>&1 || true
  "$PYTHON" -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  git rev-parse --short HEAD 2>/dev/null; } 2>&1 | tee "$OUT/env.log"
bench llama 200 --models llama2-7b-2layers --bf16 --steps 10 --compile
step kernels 40 "$PYTHON" scripts/gpu_checks.py kernels --out "$OUT" $SMOKE
step cudagraph 60 "$PYTHON" scripts/gpu_checks.py cudagraph --out "$OUT" $SMOKE
bench init 50 --init
bench smollm2 40 --models smollm2-arch --steps 10 --methods lora goat
bench minilm 90 --models minilm-arch --steps 20 --compile
"$PYTHON" scripts/gpu_checks.py summary --out "$OUT" | tee "$OUT/summary.log"
