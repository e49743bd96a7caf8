#!/usr/bin/env bash
# One-GPU check of LoRA SFT/DPO throughput, MFU, generation, DDP/ZeRO-3 overhead and warm-start logits on a
# random Llama-3.1-8B-shaped model. Made for one H200, < 8 min, no network. Details: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--out PATH] [--only a,b] [--skip a,b]   # JSON: PATH, else $OUT/gpu_check.json
#   bash benchmarks/gpu_check.sh --tiny                                   # CPU, hidden 64 / 2 layers, seconds
#
# Environment: PYTHON (default python3), GPU_CHECK_TIMEOUT (hard limit in seconds, default 470; the checks
# get 20 s less so the JSON is always written), GPU_CHECK_WHEELS (a folder of wheels, default .whl/ in the
# repository root: installed offline into a scratch site before the run, so the TRL and DeepSpeed checks
# can run on a machine that has only torch/transformers/peft/accelerate; `--list-wheels` names them).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
py=${PYTHON:-python3}
limit=${GPU_CHECK_TIMEOUT:-470}
wheels=${GPU_CHECK_WHEELS:-$root/.whl}

# Optional wheels: --no-deps --target keeps the image's torch/transformers untouched (no resolver, no index).
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check] optional wheels from $wheels installed into $site"
  else
    echo "[gpu_check] installing wheels from $wheels failed; the checks that need them will be skipped" >&2
  fi
fi

# Offline, unbuffered, no tokenizer threads; expandable segments so an OOM retry at a smaller micro-batch
# does not fail on fragmentation left by the larger one.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 WANDB_DISABLED=true WANDB_MODE=disabled
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# Where the JSON goes (the same rule as gpu_check.py), for the note after a hard kill.
json=${OUT:-.}/gpu_check.json
prev=
for a in "$@"; do
  [ "$prev" = --out ] && json=$a
  case $a in --out=*) json=${a#--out=} ;; esac
  prev=$a
done

# TERM at the limit (the script writes its JSON and exits), KILL 15 s later if it does not. With $OUT set
# (the device machine) the whole log is kept beside the JSON: only the output's tail comes back otherwise.
cmd=(timeout --signal=TERM --kill-after=15 "$limit" "$py" -u "$here/gpu_check.py" --time-limit "$((limit - 20))" "$@")
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  "${cmd[@]}" 2>&1 | tee "$OUT/gpu_check.log"
  rc=${PIPESTATUS[0]}
else
  "${cmd[@]}"
  rc=$?
fi
case $rc in
  124|143) echo "[gpu_check] hard time limit ($limit s) reached: $json holds every finished check" >&2 ;;
  137)
    echo "[gpu_check] killed after the time limit: $json holds the checks finished before it" >&2
    # the script could not mark it: say so in the JSON (its "running_check" names the check that was cut)
    [ -f "$json" ] && "$py" - "$json" <<'PY'
import json, sys
p = sys.argv[1]
d = json.load(open(p))
d["status"] = "killed (SIGKILL after the hard time limit)"
json.dump(d, open(p, "w"), indent=2)
PY
    ;;
esac
exit $rc
