#!/usr/bin/env bash
# The second external baseline's own environment: GPTQModel 7.6.0 (7.7 needs torch >= 2.14) beside the pinned
# CPU torch, built without its CUDA kernels, never in the project's venv (not a dependency of the toolchain or
# the runtime). Usage: scripts/gptqmodel_env.sh [DIR]
set -euo pipefail
DIR=${1:-work/gptqmodel-venv}
PY=${PY:-python3}
if [ ! -x "$DIR/bin/python" ] || ! "$DIR/bin/python" -c "import gptqmodel" 2>/dev/null; then
  "$PY" -m venv "$DIR"
  "$DIR/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$DIR/bin/python" -m pip install -q torch==2.13.0
  BUILD_CUDA_EXT=0 "$DIR/bin/python" -m pip install -q --no-build-isolation "gptqmodel==7.6.0" "transformers>=5.17,<6" safetensors
fi
"$DIR/bin/python" -c "import gptqmodel, torch, transformers; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
