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
# The 2-rank CPU tests use DeepSpeed's shared-memory communication op: build it once here (about
# 50 s on a fresh machine, then cached under ~/.cache/torch_extensions) rather than inside the
# first distributed test.
echo "[test] DeepSpeed's CPU communication op"
.venv/bin/python -c "from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" 2>&1 | grep -v 'Setting accelerator' || true
# Two pytest workers where there are two cores (pytest-xdist): the Slurm tests wait on their jobs much of
# the time, and the one-process tests run beside them. Tests sharing a cluster or the multi-rank tests
# are kept together on one worker (tests/conftest.py). D2LORA_TEST_WORKERS=1 runs them one at a time.
WORKERS=${D2LORA_TEST_WORKERS:-$(( $(nproc) < 2 ? 1 : 2 ))}
PARALLEL=()
[ "$WORKERS" -gt 1 ] && PARALLEL=(-n "$WORKERS" --dist loadgroup)
.venv/bin/python -m pytest "${PARALLEL[@]}" "$@"
