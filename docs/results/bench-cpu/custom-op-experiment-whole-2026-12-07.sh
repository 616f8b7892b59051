#!/usr/bin/env bash
# python scripts/compile_custom_op_experiment.py, as run on 2026-12-07 (commit 73c6a4a plus the script): whole-model compile time of GOAT's three adapter variants and LoRA (fresh process each, empty caches), two rounds,
# then the compiled steady steps in one process
cd "$(dirname "$0")/../../.."  # the repository root
export PYTHONPATH=src TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0
M=${1:-minilm}
for round in 1 2; do
  for v in lora base customop forward-op; do
    export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
    if [[ $v == lora ]]; then
      .venv/bin/python -m goat_lora.bench.compile_time "{\"model\": \"$M\", \"method\": \"lora\", \"style\": \"whole\", \"options\": {\"compile_backend\": \"inductor\"}}" 2>/dev/null | tail -1 | sed "s/^/lora whole /"
    else
      .venv/bin/python scripts/compile_custom_op_experiment.py $v --style whole --model $M 2>/dev/null | tail -1
    fi
    rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  done
done
.venv/bin/python scripts/compile_custom_op_experiment.py steps --model $M 2>/dev/null
