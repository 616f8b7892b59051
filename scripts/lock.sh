#!/usr/bin/env bash
# The locked stack (requirements/lock.txt) and the stacks pyproject.toml allows, each tried with the suite.
#
#   bash scripts/lock.sh refresh   newest allowed versions in a throwaway venv -> the suite there ->
#                                  requirements/lock.txt rewritten only if the suite passes
#   bash scripts/lock.sh newest    the same stack and suite, the lock left alone
#   bash scripts/lock.sh oldest    every dependency at its floor in pyproject.toml (transitive ones at the
#                                  newest they allow) -> the suite; the lock left alone
#
# Each runs in a throwaway clone of the committed HEAD (edits not yet committed are not tested), prints
# the versions it tested and the suite's last line, and appends both, dated, to docs/results/stacks.md.
# The clone and its venv are removed afterwards (KEEP=1 keeps them). torch stays 2.13.0 in every stack:
# it is the only build on these machines' disk.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
mode=${1:-}
case "$mode" in refresh | newest | oldest) ;; *) echo "usage: bash scripts/lock.sh refresh | newest | oldest" >&2; exit 2 ;; esac

work=$(mktemp -d /tmp/goat-stack-XXXXXX)
cleanup() { [[ -n "${KEEP:-}" ]] || rm -rf "$work"; }
trap cleanup EXIT
git clone -q "$repo" "$work/src"
commit=$(git -C "$work/src" rev-parse --short HEAD)
cd "$work/src"

constraints=""
if [[ $mode == oldest ]]; then  # name>=X in pyproject.toml (dependencies and every extra) -> name==X
  constraints="$work/floors.txt"
  python3 - "$constraints" <<'EOF'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
floors = {}
for requirement in wanted:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*", requirement.split(";")[0])
    if match:
        floors[match.group(1).lower()] = match.group(2)
with open(sys.argv[1], "w") as fh:
    fh.writelines(f"{name}=={version}\n" for name, version in sorted(floors.items()))
EOF
  echo "floors:"; sed 's/^/  /' "$constraints"
fi

started=$(date +%s)
VENV="$work/venv" LOCK="$constraints" bash scripts/install.sh
install_s=$(( $(date +%s) - started ))
# --all: setuptools too (torch, tensorboard and pytablewriter require it); pip itself is the venv's own
"$work/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^pip==' \
  | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' > "$work/freeze.txt"

set +e
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider 2>&1 | tee "$work/suite.log" | tail -n 25
status=${PIPESTATUS[0]}
set -e
summary=$(grep -E "(passed|failed|error)" "$work/suite.log" | tail -n 1)
key="accelerate bitsandbytes datasets huggingface-hub kernels lm-eval numpy peft safetensors tokenizers torch transformers trl"
versions=$(for name in $key; do grep -i "^${name//-/[-_]}==" "$work/freeze.txt" | tr '\n' ' '; done)

stacks="$repo/docs/results/stacks.md"
[[ -f "$stacks" ]] || printf '# Stacks the suite ran on\n\nWritten by `bash scripts/lock.sh refresh | newest | oldest`, one entry a run.\n' > "$stacks"
{
  echo
  echo "## $(date -u '+%Y-%m-%d %H:%M UTC'): $mode stack at commit $commit, suite $([[ $status == 0 ]] && echo passed || echo FAILED)"
  echo "- machine: $(uname -m), $(nproc) CPU cores; install ${install_s} s"
  echo "- versions: $versions"
  echo "- suite: $summary"
} >> "$stacks"

if [[ $status != 0 ]]; then
  echo "the suite failed on the $mode stack (exit $status); requirements/lock.txt unchanged" >&2
  exit 1
fi
if [[ $mode == refresh ]]; then
  { echo "# Every package of the tested stack, transitive ones included: scripts/install.sh installs exactly these."
    echo "# Written by 'bash scripts/lock.sh refresh' on $(date -u '+%Y-%m-%d') after the suite passed with them; do not edit by hand."
    cat "$work/freeze.txt"; } > "$repo/requirements/lock.txt.new"
  mv "$repo/requirements/lock.txt.new" "$repo/requirements/lock.txt"
  echo "requirements/lock.txt rewritten ($(grep -vc '^#' "$repo/requirements/lock.txt") packages)"
fi
