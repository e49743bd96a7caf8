"""Statistics of the report: mean ± sample std over seeds, and the interval, p-value and minimum
detectable effect of Δ = D2LoRA − LoRA from a crossed seeds × items design (docs/statistics.md).

Every paired seed answers the same test items, so the per-item differences form an S × I matrix
d[s, i] = D2LoRA score − LoRA score. Its model is a two-way random-effects ANOVA without
replication:

    d[s, i] = Δ + a_s + b_i + e_si,   Var a = σ²_seed, Var b = σ²_item, Var e = σ²_resid

b_i is the part of an item's difference every seed shares (the item is easy for D2LoRA whichever
seed trained it); it does not average out over seeds. The mean squares estimate the components
by the method of moments, each clipped at 0:

    MS_seed  = I · Σ_s (row mean − mean)² / (S − 1)          E = σ²_resid + I σ²_seed
    MS_item  = S · Σ_i (column mean − mean)² / (I − 1)       E = σ²_resid + S σ²_item
    MS_resid = Σ (d − row − column + mean)² / ((S − 1)(I − 1))   E = σ²_resid

    Var(Δ̂) = σ²_seed / S + σ²_item / I + σ²_resid / (S I)

which is a linear combination Σ c_k MS_k of the mean squares; its Satterthwaite degrees of
freedom ν = (Σ c_k MS_k)² / Σ (c_k MS_k)² / df_k give the t interval Δ̂ ± t_{ν, 0.975} · SE. One
seed (the n = 0 cells) leaves the item term alone (a paired t over items, ν = I − 1); one value
per seed (the seed-level fallback) leaves the seed term alone (a t over seeds, ν = S − 1).

Everything is vectorised over leading axes: `crossed(d)` takes (..., S, I) arrays, so the
calibration tests push thousands of simulated studies through the function the report calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95  # two-sided: resolved when p < 1 − LEVEL, i.e. the LEVEL t interval excludes 0
POWER = 0.80  # the power the minimum detectable effect is stated at
_CF_ITERATIONS = 3000  # the incomplete beta's continued fraction stops earlier once converged
_CF_EPS = 1e-14
NORMAL_FROM_DF = 1e5  # t_ν with more degrees of freedom is taken as the normal
CORNISH_FISHER_FROM_DF = 1000.0


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


# ---- the crossed design --------------------------------------------------------------------------

@dataclass(frozen=True)
class Components:
    """Variance components of one Δ (fractions²): what a different seed, a different item and their
    interaction add to one per-item difference. Projecting them to other S and I sizes a study."""

    seed: float
    item: float
    resid: float

    def se_df(self, seeds: int, items: int) -> tuple[float, float]:
        """Standard error of Δ̂ and its Satterthwaite degrees of freedom at S seeds × I items, from the
        mean squares these components imply (their expected values)."""
        s, i = np.asarray(seeds, float), np.asarray(items, float)
        ms = (self.resid + i * self.seed, self.resid + s * self.item, np.full_like(s, self.resid))
        se, df = _combine(ms, (s - 1, i - 1, (s - 1) * (i - 1)), s, i, clip=False)
        return float(se), float(df)


@dataclass(frozen=True)
class Crossed:
    """Δ̂, its standard error, degrees of freedom, two-sided p-value and components; arrays of the
    leading shape of the input (floats for one matrix)."""

    delta: np.ndarray
    se: np.ndarray
    df: np.ndarray  # inf when SE = 0 (every difference the same), nan when there is no interval
    p: np.ndarray
    seed_var: np.ndarray
    item_var: np.ndarray
    resid_var: np.ndarray
    seeds: int
    items: int

    def resolved(self, level: float = LEVEL) -> np.ndarray:
        """The LEVEL t interval excludes 0 (p < 1 − LEVEL); False where there is no interval."""
        return np.asarray(self.p < 1.0 - level)

    def interval(self, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        half = t_quantile(0.5 + level / 2, self.df) * self.se
        return self.delta - half, self.delta + half

    def mde(self, level: float = LEVEL, power: float = POWER) -> np.ndarray:
        """Minimum detectable effect: (t_{ν, 1−α/2} + t_{ν, power}) · SE, the |Δ| a two-sided test at
        1 − LEVEL detects with probability `power` under these variance components."""
        return (t_quantile(0.5 + level / 2, self.df) + t_quantile(power, self.df)) * self.se

    def components(self) -> Components:
        return Components(float(self.seed_var), float(self.item_var), float(self.resid_var))


def crossed(d: np.ndarray) -> Crossed:
    """The crossed random-effects analysis of (..., S, I) per-item differences (module docstring)."""
    d = np.asarray(d, dtype=float)
    if d.ndim < 2 or d.shape[-1] == 0 or d.shape[-2] == 0:
        raise ValueError("paired statistics need an S x I matrix with at least one seed and one item")
    s, i = d.shape[-2:]
    grand = d.mean(axis=(-2, -1))
    rows = d.mean(axis=-1) - grand[..., None]
    cols = d.mean(axis=-2) - grand[..., None]
    resid = d - rows[..., :, None] - cols[..., None, :] - grand[..., None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        ms_seed = i * (rows ** 2).sum(-1) / (s - 1) if s > 1 else np.zeros_like(grand)
        ms_item = s * (cols ** 2).sum(-1) / (i - 1) if i > 1 else np.zeros_like(grand)
        ms_resid = (resid ** 2).sum((-2, -1)) / ((s - 1) * (i - 1)) if s > 1 and i > 1 else np.zeros_like(grand)
    se, df = _combine((ms_seed, ms_item, ms_resid), (s - 1, i - 1, (s - 1) * (i - 1)), s, i, clip=True)
    if s == 1 and i == 1:
        se, df = np.full_like(grand, np.nan), np.full_like(grand, np.nan)
    seed_var = np.maximum(ms_seed - ms_resid, 0.0) / i if s > 1 else np.zeros_like(grand)
    item_var = np.maximum(ms_item - (ms_resid if s > 1 else 0.0), 0.0) / s if i > 1 else np.zeros_like(grand)
    p = _p_value(grand, se, df)
    return Crossed(*(_out(x) for x in (grand, se, df, p, seed_var, item_var, ms_resid)), seeds=s, items=i)


def _combine(ms: tuple, dfs: tuple, s: float, i: float, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """SE and Satterthwaite ν of Var(Δ̂) = σ²_seed/S + σ²_item/I + σ²_resid/(SI) written in mean squares.

    With both components positive that is (MS_seed + MS_item − MS_resid)/(SI). A component whose
    estimate clips to 0 drops out, and with it the MS_resid it would have subtracted: σ²_seed = 0
    leaves MS_item/(SI) (ν = I − 1), σ²_item = 0 leaves MS_seed/(SI), both leave MS_resid/(SI).
    A mean square with no degrees of freedom (S = 1 or I = 1) is absent."""
    ms_seed, ms_item, ms_resid = (np.asarray(m, float) for m in ms)
    df_seed, df_item, df_resid = (np.asarray(x, float) for x in dfs)
    has_seed, has_item = df_seed > 0, df_item > 0
    crossed_ = has_seed & has_item
    keep_seed = has_seed & (~has_item | (ms_seed > ms_resid) if clip else has_seed)
    keep_item = has_item & (~has_seed | (ms_item > ms_resid) if clip else has_item)
    c_seed = np.where(keep_seed, 1.0, 0.0)
    c_item = np.where(keep_item, 1.0, 0.0)
    c_resid = np.where(crossed_, 1.0 - c_seed - c_item, 0.0)  # +1 when both drop, −1 when both stay
    terms = [(c_seed * ms_seed, df_seed), (c_item * ms_item, df_item), (c_resid * ms_resid, df_resid)]
    var = sum(t for t, _ in terms) / (s * i)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = sum(np.where(f > 0, t ** 2 / np.where(f > 0, f, 1.0), 0.0) for t, f in terms)
        df = np.where(denom > 0, (var * s * i) ** 2 / np.where(denom > 0, denom, 1.0), np.inf)
    return np.sqrt(np.maximum(var, 0.0)), np.maximum(df, 1.0)


def _p_value(delta: np.ndarray, se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided p of Δ̂ / SE against t_ν; SE = 0 gives 0 for Δ̂ ≠ 0 and 1 for Δ̂ = 0; no SE gives nan."""
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.abs(delta) / np.where(se > 0, se, 1.0)
    p = 2.0 * t_sf(np.where(se > 0, t, 0.0), np.where(np.isfinite(df), df, 1.0))
    p = np.where(np.isinf(df) & (se > 0), 2.0 * _normal_sf(t), p)
    p = np.where(se == 0, np.where(delta != 0, 0.0, 1.0), p)
    return np.where(np.isnan(se), np.nan, np.minimum(p, 1.0))


def _out(x: np.ndarray) -> np.ndarray:
    return x[()] if isinstance(x, np.ndarray) and x.ndim == 0 else x


def seeds_to_detect(effect: float, comp: Components, items: int, level: float = LEVEL, power: float = POWER,
                    most: int = 1000) -> int | None:
    """The fewest seeds whose minimum detectable effect at `items` items is at most |effect| (the MDE
    falls with the seeds); None when more than `most` would be needed (the item terms alone are larger
    than the effect, or nearly)."""
    if mde_at(comp, most, items, level, power) > abs(effect):
        return None
    lo, hi = 1, most  # mde(lo) > effect >= mde(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mde_at(comp, mid, items, level, power) <= abs(effect) else (mid, hi)
    return hi


def mde_at(comp: Components, seeds: int, items: int, level: float = LEVEL, power: float = POWER) -> float:
    """The minimum detectable effect a study of `seeds` × `items` would print, with these components."""
    se, df = comp.se_df(seeds, items)
    return float((t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * se)


# ---- families of Δ -------------------------------------------------------------------------------

def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (valid under any dependence between the tests): the j-th
    smallest p times (m − j + 1), made monotone, at most 1. A Δ is resolved when its adjusted p < α."""
    order = np.argsort(np.asarray(p, float), kind="stable")
    m = len(order)
    adjusted = np.empty(m)
    running = 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p[k])))
        adjusted[k] = running
    return adjusted.tolist()


# ---- Student's t, without scipy ------------------------------------------------------------------

def t_sf(t: np.ndarray | float, df: np.ndarray | float) -> np.ndarray:
    """P(T_ν > t) for t ≥ 0: ½ I_{ν/(ν+t²)}(ν/2, ½), the regularized incomplete beta (DLMF 8.17.22)."""
    t, df = np.broadcast_arrays(np.asarray(t, float), np.asarray(df, float))
    big = df > NORMAL_FROM_DF  # the fraction needs ~√ν terms; there t_ν is the normal to 1e-6
    small_df = np.where(big, 1.0, df)
    x = small_df / (small_df + t * t)
    return _out(np.where(big, _normal_sf(t), 0.5 * _betainc(small_df / 2, np.full_like(df, 0.5), x)))


def t_quantile(q: float, df: np.ndarray | float) -> np.ndarray:
    """The q quantile (½ < q < 1) of t_ν: Newton steps on t_sf kept inside the bracket [z_q, t_{1,q}]
    (the normal and the Cauchy quantile; bisection when a step leaves it), to 1e-12. Above
    CORNISH_FISHER_FROM_DF degrees of freedom the Cornish–Fisher series in 1/ν (its error there is
    below 1e-8); ν = inf is the normal quantile."""
    df = np.asarray(df, float)
    z = NormalDist().inv_cdf(q)
    nu = np.where(np.isfinite(df) & ~np.isnan(df), df, 1e150)  # inf: the series is z
    series = z + (z ** 3 + z) / (4 * nu) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu ** 2)
    small = nu < CORNISH_FISHER_FROM_DF
    if small.any():
        series = np.where(small, _t_quantile_newton(q, np.where(small, nu, 1.0), z), series)
    return _out(np.where(np.isnan(df), np.nan, series))


def _t_quantile_newton(q: float, df: np.ndarray, z: float) -> np.ndarray:
    lo, hi = np.full_like(df, z), np.full_like(df, math.tan(math.pi * (q - 0.5)))
    x = np.clip(z + (z ** 3 + z) / (4 * df), lo, hi)
    log_norm = _lgamma((df + 1) / 2) - _lgamma(df / 2) - 0.5 * np.log(df * math.pi)
    for _ in range(100):
        excess = t_sf(x, df) - (1.0 - q)  # > 0: x is below the quantile
        if np.all(np.abs(excess) < 1e-15 * (1.0 - q)):
            break
        lo, hi = np.where(excess > 0, x, lo), np.where(excess > 0, hi, x)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
        step = x + excess / density
        x = np.where((step >= lo) & (step <= hi), step, (lo + hi) / 2)
        if np.all(hi - lo < 1e-13 * hi):
            break
    return x


def _normal_sf(z: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: 0.5 * math.erfc(v / math.sqrt(2.0)), otypes=[float])(z)


_lgamma = np.vectorize(math.lgamma, otypes=[float])


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) by its continued fraction, evaluated where it converges
    fast (x < (a+1)/(a+b+2)) and through I_x(a, b) = 1 − I_{1−x}(b, a) elsewhere."""
    x = np.clip(x, 0.0, 1.0)
    flip = x > (a + 1) / (a + b + 2)
    a2, b2, x2 = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - x, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_front = (_lgamma(a2 + b2) - _lgamma(a2) - _lgamma(b2) + a2 * np.log(x2) + b2 * np.log1p(-x2))
        value = np.where(x2 > 0, np.exp(log_front) * _continued_fraction(a2, b2, x2) / a2, 0.0)
    return np.where(flip, 1.0 - value, value)


def _continued_fraction(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Modified Lentz evaluation of the incomplete beta's continued fraction, vectorised."""
    tiny = 1e-300
    c = np.ones_like(x)
    d = 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    done = np.zeros(x.shape, bool)
    for m in range(1, _CF_ITERATIONS + 1):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / np.where(np.abs(c) < tiny, tiny, c)
            step = d * c
            h = np.where(done, h, h * step)
        done |= np.abs(step - 1.0) < _CF_EPS
        if done.all():
            break
    return h


def excludes_zero(ci: tuple[float, float] | None) -> bool:
    """The interval lies strictly on one side of 0 (touching 0 is not enough)."""
    return ci is not None and (ci[0] > 0.0 or ci[1] < 0.0)
