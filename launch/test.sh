#!/usr/bin/env bash
# Install everything the tests need (environment, Slurm daemons, offline assets) and run them.
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if ! command -v slurmctld >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[test] installing Slurm and munge (Debian packages) for the local-cluster tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  else
    echo "[test] not root: the Slurm cluster tests will be skipped (install slurmctld slurmd munge)"
  fi
fi
.venv/bin/d2lora assets --quiet
.venv/bin/python -m pytest "$@"
