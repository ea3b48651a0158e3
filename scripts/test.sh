#!/usr/bin/env bash
# The test suite (CPU). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
# Test files run in parallel processes (pytest-xdist), one file per process so that module fixtures are
# built once; at most 4, since each holds its own compiled programs.
exec python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile "$@"
