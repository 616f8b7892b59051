#!/usr/bin/env bash
# Create .venv (if missing) and install goat-lora with its test tools and the offline assets.
# torch is pinned to 2.13.0 here: on these machines that is a CPU build on local disk, while an
# open range downloads a multi-GB CUDA build. The package metadata itself keeps torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0 -e ".[test]" gguf 2>&1 | grep -v "^WARNING: Location" || true
"${PIP[@]}" install --no-deps -r requirements/assets.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import goat_lora, torch; print(f'goat-lora {goat_lora.__version__} installed (torch {torch.__version__})')"
