"""Wall-clock time of the CPU demo (warm-up + every cell + report) in a fresh run directory.

    .venv/bin/python benchmarks/demo_wallclock.py [--experiment launch/experiments/demo_cpu.yaml]

Assets must be fetched first (`d2lora assets`); their one-off download and conversion is
timed separately with --with-assets on a cold cache. Prints a table of phase times read
from the run directory and the total, for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(REPO / "launch/experiments/demo_cpu.yaml"))
    parser.add_argument("--with-assets", action="store_true", help="also time `d2lora assets` on a cold cache")
    args = parser.parse_args()
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    timings: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.with_assets:
            env["D2LORA_ASSETS"] = str(Path(tmp) / "assets")
            start = time.time()
            subprocess.run([sys.executable, "-m", "d2lora_dist.cli", "assets", "--quiet"], env=env, check=True)
            timings.append(("assets (cold cache)", time.time() - start))
        start = time.time()
        command = [sys.executable, "-m", "d2lora_dist.cli", "sweep", "run", "-c", args.experiment,
                   "--set", f"output_dir={tmp}/runs"]
        subprocess.run(command, env=env, check=True, cwd=REPO)
        timings.append(("sweep run (warm-up + cells + report)", time.time() - start))
        run_dir = next((Path(tmp) / "runs").iterdir())
        cells = sorted((run_dir / "cells").glob("*/result.json"))
        train = sum((json.loads(p.read_text()).get("train") or {}).get("runtime_s", 0.0) for p in cells)
        warm = json.loads((run_dir / "warmup/result.json").read_text())["train"]["runtime_s"]
    print("\n| phase | seconds |\n|---|---|")
    for name, seconds in timings:
        print(f"| {name} | {seconds:.0f} |")
    print(f"| of which warm-up training | {warm:.0f} |")
    print(f"| of which cell training ({len(cells)} cells) | {train:.0f} |")
    print(f"\nmachine: {os.cpu_count()} CPUs; total {sum(s for _, s in timings) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
