#!/usr/bin/env bash
# The whole D2LoRA pipeline on the CPU demo experiment, from a fresh machine:
# environment, offline assets, warm-up, the adaptation grid, evaluation and the report.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="" bash launch/setup.sh
.venv/bin/d2lora assets --for launch/experiments/demo_cpu.yaml
.venv/bin/d2lora sweep run -c launch/experiments/demo_cpu.yaml "$@"
