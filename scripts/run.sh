#!/usr/bin/env bash
# The project's main job: prepare (or reuse) teacher and student, then run one LSM on-policy
# distillation experiment. Extra arguments are Hydra overrides, e.g. `bash scripts/run.sh loss=sampled_token`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec python -m experiments.opd "$@"
