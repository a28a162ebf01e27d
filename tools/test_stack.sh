#!/usr/bin/env bash
# `make test STACK=floor`: the compatibility selection (tests/compat_tests.txt) in another stack than
# the current one (docs/installation.md). Builds that stack's venv outside the repo (tools/setup_env.sh,
# cached: a second run rebuilds nothing), records birder's numbers with the current stack's .venv
# (birder cannot be installed in the others: tests/compat_references.py), then runs the selection there.
# Prints each stage's minutes.
set -euo pipefail
STACK="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
minutes() { echo $(( ($(date +%s) - $1) / 60 )); }
start=$(date +%s)

STACK="$STACK" bash tools/setup_env.sh
VENV="$(STACK="$STACK" SETUP_PRINT_VENV=1 bash tools/setup_env.sh)"
echo "[test $STACK] environment ready after $(minutes "$start") min: $VENV"

stage=$(date +%s)
REFERENCES="$(mktemp -d)"
trap 'rm -rf "$REFERENCES"' EXIT
.venv/bin/python tests/compat_references.py "$REFERENCES"
echo "[test $STACK] birder's references recorded by the current stack in $(minutes "$stage") min"

stage=$(date +%s)
HIERADET_MMDET_REFERENCES="$REFERENCES" "$VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile \
    @tests/compat_tests.txt
echo "[test $STACK] compatibility suite passed in $(minutes "$stage") min ($(minutes "$start") min in all)"
