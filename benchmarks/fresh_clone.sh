#!/usr/bin/env bash
# A newcomer's first run, timed: clone this repository into a temporary folder and run one of the
# README's two commands there with empty caches (pip, offline assets, DeepSpeed's compiled ops), so
# nothing a previous run left behind makes it faster. Prints the wall time of each part.
#   bash benchmarks/fresh_clone.sh demo      # bash launch/demo.sh
#   bash benchmarks/fresh_clone.sh test      # bash launch/test.sh -q (what .ci/run calls)
# Further arguments go to the command (e.g. test --durations=30).
# Run it on a quiet machine: two processes on two cores slow each other several-fold.
set -euo pipefail
which=${1:?usage: fresh_clone.sh demo|test [args]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/d2lora-fresh.XXXXXX)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
export PIP_CACHE_DIR="$work/pip-cache" D2LORA_ASSETS="$work/assets" TORCH_EXTENSIONS_DIR="$work/torch-ext"
case "$which" in
  demo) cmd=(bash launch/demo.sh "$@") ;;
  test) cmd=(bash launch/test.sh -q "$@") ;;
  *) echo "fresh_clone.sh: expected demo or test, got '$which'" >&2; exit 2 ;;
esac
cd "$work/clone"
echo "[fresh] $(git log -1 --format='%h %s' | cut -c1-80)"
start=$(date +%s)
# Each line is prefixed with the seconds since the start, so the parts can be read off the log.
set +e
"${cmd[@]}" 2>&1 | while IFS= read -r line; do printf '%5ds %s\n' "$(( $(date +%s) - start ))" "$line"; done
code=${PIPESTATUS[0]}
set -e
echo "[fresh] '${cmd[*]}' exited $code after $(( $(date +%s) - start )) s"
exit "$code"
