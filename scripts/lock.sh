#!/usr/bin/env bash
# Moves the dependency locks forward on purpose: resolves pyproject.toml's ranges afresh and
# rewrites constraints/dev.txt (the newest releases the ranges admit: what the test command
# installs) and constraints/lowest.txt (every direct dependency at its lowest admitted release: what
# the lowest-versions check installs). Review `git diff constraints/` and commit it on its own.
set -euo pipefail
cd "$(dirname "$0")/.."

tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
"${PYTHON:-python3}" -m venv "$tool/venv"
"$tool/venv/bin/python" -m pip install -q uv
uv="$tool/venv/bin/uv"

compile() {  # compile OUTPUT WHAT [uv options...]
  local out=$1 what=$2
  shift 2
  # hatchling builds the editable install (constraints/build.in): locked too, so that a new release
  # of it cannot change a test run
  "$uv" pip compile pyproject.toml constraints/build.in --extra all --extra dev --universal \
    --python-version 3.11 --no-header --quiet "$@" -o "$out.new"
  { echo "# $what, written by scripts/lock.sh from pyproject.toml's ranges; do not edit by hand."
    cat "$out.new"; } > "$out"
  rm -f "$out.new"
}
compile constraints/dev.txt "The newest releases" --upgrade
# the lowest-versions pass tests the runtime ranges: the test tools stay at their dev.txt releases
grep -iE '^(pytest|pytest-asyncio|pytest-timeout|pytest-cov|coverage|hypothesis|moto|mypy|ruff|types-pyyaml)==' \
  constraints/dev.txt > constraints/test-tools.txt
compile constraints/lowest.txt "Each runtime dependency at its lowest admitted release (test tools as dev.txt)" \
  --resolution lowest-direct --override constraints/test-tools.txt

git --no-pager diff --stat -- constraints/ || true
git --no-pager diff -U0 -- constraints/ | grep -E '^[-+][A-Za-z0-9]' || echo "no version changed"
