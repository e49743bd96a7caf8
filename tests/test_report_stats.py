"""The report's Δ statistics: the crossed seeds × items interval against hand-worked cases, Student's t
against closed forms, Holm, and the calibration that makes a "resolved" label mean what it says.

The calibration tests simulate whole studies (every seed answers the same items, true Δ = 0 or the
printed minimum detectable effect) and push them through the functions the report calls
(report.stats.crossed for the interval, report.verdicts.primary_resolved for the label).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2lora_dist.report.stats import Components, crossed, holm, mde_at, seeds_to_detect, t_quantile, t_sf
from d2lora_dist.report.verdicts import primary_resolved

# ---- Student's t against closed forms -------------------------------------------------------------


@pytest.mark.parametrize("q", [0.6, 0.8, 0.9, 0.975, 0.995])
def test_t_quantiles_match_the_closed_forms_of_one_and_two_degrees_of_freedom(q):
    assert t_quantile(q, 1.0) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-9)  # Cauchy
    assert t_quantile(q, 2.0) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-9)
    z = t_quantile(q, np.inf)
    assert 0.5 * math.erfc(z / math.sqrt(2)) == pytest.approx(1 - q, rel=1e-9)


def test_t_tail_tends_to_the_normal_and_is_vectorised():
    tails = t_sf(np.array([1.96, 1.96, 1.96]), np.array([4.0, 1318.0, 5e5]))
    assert tails[0] == pytest.approx(0.0607, abs=1e-4)  # t_4 has heavier tails
    assert tails[1] == pytest.approx(0.02511, abs=2e-5) and tails[2] == pytest.approx(0.024998, abs=1e-5)
    assert t_quantile(0.975, 4.0) == pytest.approx(2.776445, abs=1e-6)  # every textbook's table


# ---- the crossed interval against hand-worked cases ----------------------------------------------


def test_constant_differences_give_exactly_that_constant():
    for d in (np.full((1, 1319), 0.25), np.full((3, 50), -0.5), np.full((2, 200), 0.03)):
        c = crossed(d)
        assert c.delta == pytest.approx(d[0, 0], abs=1e-15) and c.se == pytest.approx(0.0, abs=1e-15)
        lo, hi = c.interval()
        assert (lo, hi) == pytest.approx((d[0, 0], d[0, 0]), abs=1e-14) and c.p == 0.0 and c.resolved()


def test_two_seeds_constant_within_seed_give_a_t_over_the_two_seed_means():
    """Rows a and b, no item variation: SE = |a − b| / 2 on 1 degree of freedom (t = 12.706)."""
    a, b = 0.02, 0.06
    c = crossed(np.array([[a] * 300, [b] * 300]))
    lo, hi = c.interval()
    half = math.tan(math.pi * 0.475) * abs(a - b) / 2
    assert (lo, hi) == pytest.approx(((a + b) / 2 - half, (a + b) / 2 + half), rel=1e-9)
    assert c.df == 1.0 and not c.resolved()  # [min, max] = [0.02, 0.06] would call it resolved


def test_one_seed_is_the_paired_t_over_items():
    rng = np.random.default_rng(7)
    d = (rng.random(1319) < 0.82).astype(float) - (rng.random(1319) < 0.80).astype(float)
    c = crossed(d[None, :])
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert (c.se, c.df) == pytest.approx((se, d.size - 1))
    assert c.interval()[0] == pytest.approx(d.mean() - t_quantile(0.975, d.size - 1) * se)


def test_one_value_per_seed_is_the_t_over_seeds_and_one_value_has_no_interval():
    """The seed-level fallback: S × 1."""
    x = np.array([0.01, 0.04, 0.02, 0.05, 0.03])
    c = crossed(x[:, None])
    assert (c.se, c.df) == pytest.approx((x.std(ddof=1) / math.sqrt(5), 4))
    assert np.isnan(crossed(np.array([[0.03]])).se)


def test_an_item_effect_shared_by_every_seed_counts_once_not_divided_by_the_seeds():
    """d[s, i] = a_s + b_i exactly (no residual): Var = var(a)/S + var(b)/I; the per-seed item
    resampling of the old bootstrap would have divided var(b) by S · I."""
    a = np.array([0.0, 0.02, -0.01, 0.01])
    b = np.tile([0.2, -0.2], 20)  # 40 items
    c = crossed(a[:, None] + b[None, :])
    assert c.se == pytest.approx(math.sqrt(a.var(ddof=1) / 4 + b.var(ddof=1) / 40), rel=1e-9)
    comp = c.components()
    assert (comp.seed, comp.item, comp.resid) == pytest.approx((a.var(ddof=1), b.var(ddof=1), 0.0), abs=1e-15)


def test_holm_adjusts_step_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.3, 0.3]) == [0.6, 0.6] and holm([0.8, 0.9]) == [1.0, 1.0]


def test_projected_power_falls_with_seeds_and_finds_the_seeds_needed():
    comp = Components(seed=0.02 ** 2, item=0.05 ** 2, resid=0.05 ** 2)
    mdes = [mde_at(comp, s, 100) for s in (3, 5, 8, 20)]
    assert mdes == sorted(mdes, reverse=True)
    need = seeds_to_detect(0.04, comp, 100)
    assert mde_at(comp, need, 100) <= 0.04 < mde_at(comp, need - 1, 100)
    assert seeds_to_detect(0.001, comp, 100) is None  # σ_item / √I alone exceeds it


# ---- calibration: what "resolved" promises ---------------------------------------------------------

# Δ in fractions; SDs in points as the issue states them: seed SD 1.3–2.5 points, item SD 8 points,
# a share of the item variance common to every seed (the item is easy for D2LoRA whichever seed).
SCENARIOS = {  # (seed SD, share of the item variance shared by the seeds)
    "seed-dominant": (2.5, 0.0),
    "item-dominant": (0.5, 0.75),
    "half-shared": (1.3, 0.5),
    "half-shared, no seed variance": (0.0, 0.5),
}
DESIGNS = [(s, i) for s in (3, 5, 8) for i in (50, 200)]
STUDIES = 4000  # simulated studies per design
# Above 6 % on 4000 studies: a true rate of 5 % reaches it with probability < 0.1 % (binomial SD
# 0.34 points, 6 % is 2.9 SD up); 5.5 %, the worst measured with 20,000 studies at 5 seeds, 7 %.
MAX_FALSE_RESOLVED = 0.06
MIN_DETECTION = 0.70  # at Δ = the MDE the study would print; 80 % is the target, 70 % the floor
POWER_STUDIES = 2000  # measured 77-80 % detection; 70 % is 8 binomial SDs (0.9 points) below that


def simulate(rng: np.random.Generator, scenario: str, seeds: int, items: int, delta: float = 0.0,
             studies: int = STUDIES) -> np.ndarray:
    """(studies, seeds, items) per-item differences: Δ + seed effect + shared item effect + residual."""
    seed_sd, shared = SCENARIOS[scenario]
    a = rng.normal(0.0, seed_sd / 100, size=(studies, seeds, 1))
    b = rng.normal(0.0, 0.08 * math.sqrt(shared), size=(studies, 1, items))
    e = rng.normal(0.0, 0.08 * math.sqrt(1 - shared), size=(studies, seeds, items))
    return delta + a + b + e


def true_components(scenario: str) -> Components:
    seed_sd, shared = SCENARIOS[scenario]
    return Components((seed_sd / 100) ** 2, 0.08 ** 2 * shared, 0.08 ** 2 * (1 - shared))


def test_null_studies_are_labelled_resolved_at_most_six_percent_of_the_time():
    """True Δ = 0 at 3, 5 and 8 seeds × 50 and 200 items, four variance structures: the report's
    label (default min_seeds 5) and, at 3 seeds, the bare interval too (min_seeds lowered to 3)."""
    rng = np.random.default_rng(20261207)
    rates = {}
    for scenario in SCENARIOS:
        for seeds, items in DESIGNS:
            p = crossed(simulate(rng, scenario, seeds, items)).p
            rates[(scenario, seeds, items)] = float(primary_resolved(p, seeds, 16, min_seeds=5).mean())
            rates[(scenario, seeds, items, "interval")] = float(primary_resolved(p, seeds, 16, min_seeds=2).mean())
    labelled = {k: r for k, r in rates.items() if len(k) == 3}
    assert all(r == 0.0 for (_, s, _), r in labelled.items() if s < 5)  # too few seeds: never resolved
    worst = max(labelled, key=labelled.get)
    assert labelled[worst] <= MAX_FALSE_RESOLVED, f"{worst}: {labelled[worst]:.2%} of null studies resolved"
    # The interval itself at 5 and 8 seeds is what the label reports; at 3 seeds it may run a little
    # liberal (measured 6.7-7.3 % with 20,000 studies: why min_seeds defaults to 5), never like the bootstrap.
    intervals = {k[:3]: r for k, r in rates.items() if len(k) == 4}
    assert max(r for (_, s, _), r in intervals.items() if s >= 5) <= MAX_FALSE_RESOLVED
    assert max(intervals.values()) <= 0.085, intervals


def test_a_true_delta_of_the_printed_mde_is_detected_at_least_seventy_percent_of_the_time():
    """Δ = the MDE a study of that design prints (from the true components: the median printed MDE
    is within a few percent of it at 5 seeds and more)."""
    rng = np.random.default_rng(7)
    for scenario in SCENARIOS:
        for seeds, items in DESIGNS:
            if seeds < 5:
                continue
            mde = mde_at(true_components(scenario), seeds, items)
            studies = simulate(rng, scenario, seeds, items, delta=mde, studies=POWER_STUDIES)
            c = crossed(studies)
            printed = float(np.median(crossed(studies[:100]).mde()))
            assert printed == pytest.approx(mde, rel=0.15), (scenario, seeds, items)
            detected = float(primary_resolved(c.p, seeds, 16, min_seeds=5).mean())
            assert detected >= MIN_DETECTION, f"{scenario} {seeds}x{items}: {detected:.1%} at Δ = MDE {mde:.4f}"
