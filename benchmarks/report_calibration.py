"""How often the report calls a null Δ resolved, and how often it detects a Δ of its printed minimum
detectable effect: simulated studies pushed through the report's own functions
(report.stats.crossed, report.verdicts.primary_resolved). Prints the table of docs/statistics.md.

    PYTHONPATH=. python benchmarks/report_calibration.py [--studies 20000] [--seed 20261207]

A study: S seeds × I items, every seed answering the same items; the per-item difference is
Δ + seed effect + an item effect every seed shares + a residual, SDs in points as the scenarios say.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from d2lora_dist.report.stats import Components, crossed, mde_at
from d2lora_dist.report.verdicts import primary_resolved

SCENARIOS = {  # name -> (seed SD in points, item SD in points, share of the item variance every seed shares)
    "seed-dominant": (2.5, 8.0, 0.0),
    "item-dominant": (0.5, 8.0, 0.75),
    "half-shared": (1.3, 8.0, 0.5),
    "half-shared, no seed variance": (0.0, 8.0, 0.5),
}
DESIGNS = [(s, i) for s in (3, 5, 8) for i in (50, 200)]
BATCH = 2000  # studies simulated at once (memory: BATCH x S x I doubles)


def simulate(rng: np.random.Generator, scenario: str, seeds: int, items: int, studies: int,
             delta: float) -> np.ndarray:
    seed_sd, item_sd, shared = SCENARIOS[scenario]
    a = rng.normal(0.0, seed_sd / 100, size=(studies, seeds, 1))
    b = rng.normal(0.0, item_sd / 100 * math.sqrt(shared), size=(studies, 1, items))
    e = rng.normal(0.0, item_sd / 100 * math.sqrt(1 - shared), size=(studies, seeds, items))
    return delta + a + b + e


def rate(rng: np.random.Generator, scenario: str, seeds: int, items: int, studies: int, delta: float,
         min_seeds: int) -> float:
    hits = 0
    for start in range(0, studies, BATCH):
        n = min(BATCH, studies - start)
        p = crossed(simulate(rng, scenario, seeds, items, n, delta)).p
        hits += int(primary_resolved(p, seeds, 16, min_seeds).sum())
    return hits / studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=20261207)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    margin = 1.96 * math.sqrt(0.05 * 0.95 / args.studies)
    print(f"{args.studies} simulated studies per line; a 5 % rate is measured to ±{margin:.2%} (95 %)")
    print("| scenario | S × I | null: interval excludes 0 | null: labelled resolved (min_seeds 5) "
          "| MDE (pp) | Δ = MDE: detected |")
    print("|---|---|---:|---:|---:|---:|")
    t0 = time.perf_counter()
    for scenario, (seed_sd, item_sd, shared) in SCENARIOS.items():
        comp = Components((seed_sd / 100) ** 2, (item_sd / 100) ** 2 * shared, (item_sd / 100) ** 2 * (1 - shared))
        for seeds, items in DESIGNS:
            interval = rate(rng, scenario, seeds, items, args.studies, 0.0, min_seeds=2)
            label = rate(rng, scenario, seeds, items, args.studies, 0.0, min_seeds=5)
            mde = mde_at(comp, seeds, items)
            power = rate(rng, scenario, seeds, items, args.studies, mde, min_seeds=2)
            print(f"| {scenario} | {seeds} × {items} | {interval:.2%} | {label:.2%} | {mde * 100:.2f} | {power:.1%} |",
                  flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
