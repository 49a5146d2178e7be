#!/usr/bin/env bash
# The external baseline's own environment: AutoRound 0.16.1 beside the pinned CPU torch, never in the
# project's venv (it is not a dependency of the toolchain or the runtime). Usage: scripts/autoround_env.sh [DIR]
set -euo pipefail
DIR=${1:-work/autoround-venv}
PY=${PY:-python3}
if [ ! -x "$DIR/bin/python" ] || ! "$DIR/bin/python" -c "import auto_round" 2>/dev/null; then
  "$PY" -m venv "$DIR"
  "$DIR/bin/python" -m pip install -q --upgrade pip
  "$DIR/bin/python" -m pip install -q torch==2.13.0
  "$DIR/bin/python" -m pip install -q "auto-round==0.16.1" "transformers>=5.17,<6" safetensors
fi
"$DIR/bin/python" -c "import auto_round, torch, transformers; print('auto-round', auto_round.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
