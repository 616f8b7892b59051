#!/usr/bin/env bash
# Issue 13's GPU figures in one device call: compiled GOAT against compiled peft LoRA and both eager
# (goat bench --compile), on MiniLM's and SmolLM2-135M's architectures (random weights: the device
# machine has no model packages; same step cost) and on the LLaMA-shaped stack (hidden 4096,
# intermediate 11008, 2 layers, bfloat16 autocast, batch 4 x 512). Cheapest compile first, each bench
# under its own time limit, so a slow compile costs only its own table. Figures land in $OUT.
#
#   device:  bash scripts/gpu_issue13.sh                      (python3 there holds torch, transformers, peft)
#   here:    PYTHON=.venv/bin/python bash scripts/gpu_issue13.sh --smoke --compile-backend eager  (a dry run)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu-issue13}
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-240}  # seconds per bench
mkdir -p "$OUT"
bench() {  # bench NAME ARGS...: one goat bench, its table in NAME.log, its figures in NAME.json
  local name=$1; shift
  echo "== $name: goat bench $* $EXTRA"
  timeout "$LIMIT" "$PYTHON" -m goat_lora.bench --compile "$@" $EXTRA --json "$OUT/$name.json" 2>&1 \
    | grep -v -e Warning -e USDT -e "warnings.warn" | tee "$OUT/$name.log"
}
EXTRA="$*"
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
bench llama2-7b --models llama2-7b-2layers --bf16 --steps 10
bench minilm --models minilm-arch --steps 20
bench smollm2 --models smollm2-arch --steps 20
