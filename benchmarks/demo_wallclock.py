"""Wall-clock time of a CPU sweep (warm-up + every cell + report) in a fresh run directory, split
into its parts, and optionally side by side with an older commit of the framework on the same grid.

    .venv/bin/python benchmarks/demo_wallclock.py                       # today's demo
    .venv/bin/python benchmarks/demo_wallclock.py --experiment benchmarks/inputs/demo_cpu_v1.yaml \\
        --baseline f202852                                              # old grid: old code vs today's
    .venv/bin/python benchmarks/demo_wallclock.py --slots 1             # today's code, one cell at a time

Assets must be fetched first (`d2lora assets`); their one-off download and conversion is timed
separately with --with-assets on a cold cache. With --baseline the two versions run one after
the other on the same experiment file (the baseline's code from a temporary git worktree) and
the ratio of their totals is printed: on a shared machine compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "import d2lora_dist.cli, d2lora_dist.train, d2lora_dist.evaluate.suites, trl, peft"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(REPO / "launch/experiments/demo_cpu.yaml"))
    parser.add_argument("--baseline", metavar="COMMIT", help="also run this commit's code on the same experiment")
    parser.add_argument("--with-assets", action="store_true", help="also time `d2lora assets` on a cold cache")
    parser.add_argument("--slots", default="auto", help="today's `sweep run --slots` (the baseline runs as it did)")
    args = parser.parse_args()
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    experiment = str(Path(args.experiment).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        if args.with_assets:
            cold = dict(env, D2LORA_ASSETS=str(Path(tmp) / "assets"))
            start = time.time()
            subprocess.run([sys.executable, "-m", "d2lora_dist.cli", "assets", "--quiet"], env=cold, check=True)
            print(f"\nassets on a cold cache: {time.time() - start:.0f} s")
        runs = {}
        if args.baseline:
            code = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(code), args.baseline],
                           check=True, capture_output=True)
            try:
                runs[f"baseline {args.baseline}"] = timed_sweep(code, experiment, Path(tmp) / "base", env)
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(code)], check=False)
        runs["today"] = timed_sweep(REPO, experiment, Path(tmp) / "today", env, ["--slots", args.slots])
    for label, run in runs.items():
        print(f"\n### {label}: {Path(experiment).name}\n")
        print_breakdown(run)
    if args.baseline:
        base, today = runs[f"baseline {args.baseline}"]["total"], runs["today"]["total"]
        print(f"\nbaseline / today = {base:.0f} s / {today:.0f} s = {base / today:.2f}x")
    print(f"\nmachine: {os.cpu_count()} CPUs")
    return 0


def timed_sweep(code: Path, experiment: str, out: Path, env: dict[str, str], flags: tuple[str, ...] = ()) -> dict:
    """Run `sweep run` with the package found in `code`; measure imports and a model load there too."""
    env = dict(env, PYTHONPATH=str(code))
    python = [sys.executable]
    start = time.time()
    subprocess.run([*python, "-c", IMPORTS], env=env, check=True, cwd=code)
    imports = time.time() - start
    start = time.time()
    subprocess.run([*python, "-m", "d2lora_dist.cli", "sweep", "run", "-c", experiment,
                    "--set", f"output_dir={out}", *flags], env=env, check=True, cwd=code)
    total = time.time() - start
    run_dir = next(out.iterdir())
    start = time.time()
    subprocess.run([*python, "-m", "d2lora_dist.cli", "report", "-c", str(run_dir / "experiment.yaml")],
                   env=env, check=True, cwd=code, capture_output=True)
    return {"total": total, "imports": imports, "report": time.time() - start, **parts(run_dir)}


def parts(run_dir: Path) -> dict:
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*/result.json"))]
    warm = json.loads((run_dir / "warmup/result.json").read_text())["train"]
    trains = [r["train"] for r in results if r.get("train")]
    step_times = [[h["step_time_s"] for h in t.get("log_history", []) if "step_time_s" in h] for t in trains]
    timing = [r.get("timing") or {} for r in results]
    finished = [datetime.fromisoformat(r["finished_at"].replace("Z", "+00:00")).timestamp() for r in results]
    starts = [f - t.get("cell_s", 0.0) for f, t in zip(finished, timing, strict=True)]
    warm_record = json.loads((run_dir / "warmup/result.json").read_text())
    if "finished_at" in warm_record:  # the warm-up's own wall time, and whether it ran beside the cells
        warm_end = warm_record["timing"]["ended"]
        starts.append(warm_end - warm_record["timing"]["warmup_s"])
        finished = [*finished, warm_end]
    return {
        "slots": sorted({(r.get("runtime") or {}).get("slot", "0/1").split("/")[1] for r in results}),
        # first cell start to last cell end (cells of several slots overlap)
        "cell_span": max(finished[:len(results)]) - min(starts[:len(results)]),
        # the same from the warm-up's start, when it recorded its wall time
        "work_span": max(finished) - min(starts) if "finished_at" in warm_record else None,
        "warmup_wall": warm_record.get("timing", {}).get("warmup_s"),
        "warmup_beside": "finished_at" in warm_record and min(starts[:len(results)]) < finished[-1],
        "cells": len(results),
        "workers": {bool(r.get("shared_worker")) for r in results},
        "warmup_train": warm["runtime_s"],
        "cell_train": sum(t["runtime_s"] for t in trains),
        "first_logged_step": statistics.median(s[0] for s in step_times if s) if any(step_times) else None,
        "steady_step": statistics.median(x for s in step_times for x in s[1:]) if any(len(s) > 1 for s in step_times)
        else None,
        "cell_train_wall": sum(t.get("train_s", 0.0) for t in timing),
        "cell_evaluate": sum(t.get("evaluate_s", 0.0) for t in timing),
        "cell_wall": sum(t.get("cell_s", 0.0) for t in timing),
        "timed": all(timing),
    }


def print_breakdown(run: dict) -> None:
    parallel = run["slots"] != ["1"]
    summed = f", summed over {'/'.join(run['slots'])} slots that ran at once" if parallel else ""
    beside = " (in a slot beside the cells)" if run.get("warmup_beside") else ""
    rows = [("sweep run: warm-up + cells + report", run["total"]),
            (f"  warm-up training (trainer.train){beside}", run["warmup_train"]),
            (f"  cell training (trainer.train, {run['cells']} cells{summed})", run["cell_train"])]
    if run["timed"]:
        cells_wall = run["cell_span"] if parallel else run["cell_wall"]
        rows += [(f"  cell model load + trainer set-up + adapter save{summed}",
                  run["cell_train_wall"] - run["cell_train"]),
                 (f"  cell evaluation (model load + suites){summed}", run["cell_evaluate"]),
                 (f"  cell W&B runs, data selection, result{summed}", run["cell_wall"] - run["cell_train_wall"]
                  - run["cell_evaluate"]),
                 ("  cells, first start to last end", run["cell_span"])]
        if run.get("work_span") is not None:  # the warm-up recorded its wall time: nothing counted twice
            rows += [("  warm-up, its data to its result", run["warmup_wall"]),
                     ("  warm-up and cells, first start to last end", run["work_span"]),
                     ("  outside them: process starts, imports, preflight, report", run["total"] - run["work_span"])]
        else:
            rows.append(("  outside cells: process starts, imports, warm-up load, preflight, report",
                         run["total"] - run["warmup_train"] - cells_wall))
    else:
        rows.append(("  everything else (this version records no per-cell timing)",
                     run["total"] - run["warmup_train"] - run["cell_train"]))
    rows += [("one process start + imports (measured alone)", run["imports"]),
             ("report alone (measured after)", run["report"])]
    print("| part | seconds |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.0f} |")
    if run["first_logged_step"] is not None:
        steady = f"{run['steady_step']:.2f}" if run["steady_step"] is not None else "-"
        print(f"\nmedian seconds per optimizer step: first logged {run['first_logged_step']:.2f}, later {steady}")
    worker = {True: "shared workers (one per slot)", False: "one process per cell"}
    print("cells ran in: " + ", ".join(worker[w] for w in sorted(run["workers"])) + f"; slots: {'/'.join(run['slots'])}")


if __name__ == "__main__":
    sys.exit(main())
