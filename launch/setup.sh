#!/usr/bin/env bash
# Create .venv and install d2lora-dist with the tested versions.
#   bash launch/setup.sh            CPU machine (torch pinned to the CPU wheel)
#   TORCH_SPEC="torch==2.13.0" EXTRAS="dev,cuda" bash launch/setup.sh   GPU machine
#   EXTRAS="" bash launch/setup.sh  the package alone (what the demo needs)
# Order matters: torch first (an unpinned torch pulls GBs of CUDA wheels), then
# DeepSpeed without build isolation (its build would otherwise fetch another torch), then
# the package. DeepSpeed's CPU communication op is not compiled here: only multi-rank CPU
# runs use it, so launch/test.sh builds it (about 50 s, cached) and the demo does not wait.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS-dev}
export PIP_CONSTRAINT="$PWD/launch/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
echo "[setup] torch ($TORCH_SPEC)"
$PIP install -q "$TORCH_SPEC"
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  echo "[setup] deepspeed"
  $PIP install -q setuptools wheel ninja
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation deepspeed
fi
echo "[setup] d2lora-dist${EXTRAS:+[$EXTRAS]}"
$PIP install -q -e ".${EXTRAS:+[$EXTRAS]}"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, peft, trl, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "deepspeed", deepspeed.__version__)')"
