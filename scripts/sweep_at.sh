#!/usr/bin/env bash
# Run a sweep at an earlier code revision, e.g. the cells a table still lacks: a table summarizes one revision
# (paper_figs/tables.py refuses mixed ones), so cells added later must run the code the first cells ran.
#
#   bash scripts/sweep_at.sh <revision> <sweep dir> <hydra overrides ...>
#   bash scripts/sweep_at.sh ba4c37d multirun/table3 experiment=table3 +tuned=regime hydra/launcher=joblib hydra.launcher.n_jobs=2
#
# The revision is checked out as a detached worktree under .cache/worktrees/<revision> (reused), sharing this
# checkout's .venv; the SFT'd models committed here (results/models) are unpacked into its checkpoint cache, so
# nothing is retrained when that revision computes the same cache keys. The sweep directory is relative to this
# checkout. Its jobs record the revision (opd/results.py), and the table reads them beside the earlier rows:
#   python paper_figs/tables.py results/rows/table1.jsonl.gz multirun/table3 --table table3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/sweep_at.sh <revision> <sweep dir> <hydra overrides ...>" >&2
  exit 2
fi
REV="$1"; SWEEP="$2"; shift 2
if ! FULL="$(git -C "$ROOT" rev-parse --verify --quiet "$REV^{commit}")"; then
  echo "error: revision: $REV is not a commit of this repository" >&2
  exit 2
fi
case "$SWEEP" in /*) ;; *) SWEEP="$ROOT/$SWEEP" ;; esac
if [ -e "$SWEEP" ]; then
  echo "error: sweep dir: $SWEEP exists; a sweep writes into a new directory (nothing already there is overwritten)" >&2
  exit 2
fi
source "$ROOT/scripts/bootstrap.sh"
TREE="$ROOT/.cache/worktrees/${FULL:0:12}"
[ -d "$TREE" ] || git -C "$ROOT" worktree add --detach "$TREE" "$FULL" >&2
[ -e "$TREE/.venv" ] || ln -s "$ROOT/.venv" "$TREE/.venv"
(cd "$ROOT" && python - "$TREE/.cache/opd/checkpoints" <<'EOF'
import sys
from pathlib import Path

from opd.train.store import unpack

root = Path(sys.argv[1])
for archive in sorted(Path("results/models").glob("*.tar.gz")):
    key = archive.name[: -len(".tar.gz")]
    if not (root / key).exists():
        unpack(key, "results/models", root)
        print(f"[sweep_at] unpacked {archive} into {root / key}", file=sys.stderr)
EOF
)
cd "$TREE"
exec python -m experiments.opd -m "hydra.sweep.dir=$SWEEP" "$@"
