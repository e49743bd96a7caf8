"""Δ = D2LoRA − LoRA per (task, method, n, suite, metric, pair), paired by seed and by item.

A pair (report.arms) is a warm-started arm and the vanilla arm of the same LoRA init; an
experiment without warm-up or LoRA-init axes has the one pair D2LoRA − LoRA.

Only seeds finished on both sides enter (LoRA and D2LoRA cells with the same seed; n = 0 cells
are method "none", seed 0, shared by every method). Every paired seed answers the same items, so
the per-item differences (D2LoRA item score − LoRA item score, read from
`cells/<cell-id>/predictions/<suite>.jsonl` through `evaluate.scoring.item_scores`) form a seeds ×
items matrix over the items all of them answered; Δ, its interval and power come from the crossed
analysis of that matrix (report.stats.crossed). When a paired cell has no usable item scores for
the metric, that Δ falls back to the seed level (one value per seed from result.json, a t over
seeds) and says why; nothing is invented. Which Δ is resolved is decided once the family of its
table is known (report.verdicts).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace

import numpy as np

from d2lora_dist.config import Experiment
from d2lora_dist.evaluate.scoring import item_scores, read_predictions
from d2lora_dist.layout import RunLayout
from d2lora_dist.report import verdicts as v
from d2lora_dist.report.arms import LEGACY_PAIR, Pair
from d2lora_dist.report.collect import Collection, cell_method
from d2lora_dist.report.stats import Components, crossed
from d2lora_dist.report.verdicts import Verdict
from d2lora_dist.sweep.grid import NO_TRAINING

ITEMS, SEEDS, NONE = "items", "seeds", "none"  # what a Δ rests on
MATCH_TOLERANCE = 1e-6  # item-score mean vs result.json value
DELTAS_CSV_COLUMNS = ("task", "method", "n", "suite", "metric", "delta", "ci_low", "ci_high", "seeds", "items",
                      "differing_items", "resolved", "basis", "note", "treatment", "baseline", "state", "role",
                      "p_value", "p_holm", "family_size", "se", "df", "mde", "seed_sd", "item_sd", "resid_sd", "n_trained")

Scores = dict[str, dict[str, float]]  # metric -> {item id -> score}


# ---- per-item scores -----------------------------------------------------------------------

@dataclass
class ItemScores:
    """Per-item scores of every finished cell and suite, and why some are unavailable."""

    scores: dict[tuple[str, str], Scores] = field(default_factory=dict)  # (cell id, suite) -> scores
    problems: dict[tuple[str, str], str] = field(default_factory=dict)  # (cell id, suite) -> why none
    mismatches: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (cell, suite, metric) -> why

    def get(self, cell_id: str, suite: str, metric: str) -> dict[str, float] | str:
        """{item id -> score}, or the reason there is none."""
        if (cell_id, suite) in self.problems:
            return self.problems[(cell_id, suite)]
        if (cell_id, suite, metric) in self.mismatches:
            return self.mismatches[(cell_id, suite, metric)]
        scores = self.scores.get((cell_id, suite))
        if scores is None:
            return f"{cell_id}: no predictions read for suite {suite}"
        if metric not in scores:
            return (f"{suite}: evaluate.scoring.item_scores gives no per-item {metric!r} "
                    f"(it gives {', '.join(sorted(scores)) or 'nothing'})")
        return scores[metric]


def load_item_scores(exp: Experiment, layout: RunLayout, coll: Collection) -> ItemScores:
    """Read the predictions of every finished cell for every suite its result.json reports."""
    out = ItemScores()
    reported: dict[tuple[str, str], dict[str, float]] = {}
    for r in coll.rows:
        reported.setdefault((r.cell_id, r.suite), {})[r.metric] = r.value
    for (cell_id, suite), values in sorted(reported.items()):
        path = layout.cell_predictions(cell_id, suite)
        shown = path.relative_to(layout.root)
        if suite not in exp.suites:
            out.problems[(cell_id, suite)] = f"{shown}: suite {suite!r} is not in the experiment (kind unknown)"
            continue
        try:
            rows = read_predictions(path, {})
            scores = item_scores(exp.suites[suite].kind, rows)
        except FileNotFoundError:
            out.problems[(cell_id, suite)] = f"{shown}: missing"
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            out.problems[(cell_id, suite)] = f"{shown}: unreadable ({type(e).__name__}: {e})"
            continue
        ids = {len(s) for s in scores.values()}
        if ids and ids != {len(rows)}:
            out.problems[(cell_id, suite)] = f"{shown}: {len(rows)} rows but {min(ids)} distinct item ids"
            continue
        out.scores[(cell_id, suite)] = scores
        for metric, per_item in scores.items():
            if metric in values and abs(float(np.mean(list(per_item.values()))) - values[metric]) > MATCH_TOLERANCE:
                out.mismatches[(cell_id, suite, metric)] = (
                    f"{shown}: item scores of {metric} average {np.mean(list(per_item.values())):.6f} but "
                    f"result.json says {values[metric]:.6f}")
    return out


# ---- one Δ -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delta:
    task: str
    method: str  # the cells' method: "none" for n = 0
    n: int
    suite: str
    metric: str
    value: float | None  # fraction; None = no paired seed
    ci: tuple[float, float] | None
    seeds: tuple[int, ...]  # the paired seeds it rests on
    items: tuple[int, ...]  # items per paired seed (basis "items"), else ()
    differing: int | None  # item scores that differ between the arms, over the paired seeds
    basis: str  # ITEMS | SEEDS | NONE
    finished: tuple[int, int] = (0, 0)  # finished seeds (LoRA, D2LoRA), paired or not
    why: str = ""  # basis NONE: why there is no Δ
    fallback: tuple[str, ...] = ()  # basis SEEDS: why item scores could not be used
    notes: tuple[str, ...] = ()  # seeds left out, item ids that differ
    pair: Pair = LEGACY_PAIR  # treatment − baseline arms
    se: float | None = None  # standard error of value (report.stats.crossed); None without an interval
    df: float | None = None  # its Satterthwaite degrees of freedom
    p: float | None = None  # two-sided p-value of value against 0
    mde: float | None = None  # minimum detectable effect at 80% power, two-sided 5%
    components: Components | None = None  # σ² of seed, item and residual: what sizes the next study
    verdict: Verdict | None = None  # set by Deltas once the Δ's family is known

    @property
    def note(self) -> str:
        """Everything said about this Δ, one line (deltas.csv)."""
        return "; ".join([*([self.why] if self.why else []),
                          *(f"seed level only: {r}" for r in self.fallback), *self.notes])

    @property
    def resolved(self) -> bool:
        return self.verdict is not None and self.verdict.resolved

    @property
    def key(self) -> tuple:
        """(task, method, n, suite, metric, treatment arm, baseline arm): how a primary comparison names it."""
        return (self.task, self.method, self.n, self.suite, self.metric, self.pair.treatment, self.pair.baseline)

    @property
    def identical(self) -> bool:
        return self.basis == ITEMS and self.differing == 0

    @property
    def items_label(self) -> str:
        return "" if not self.items else (str(self.items[0]) if len(set(self.items)) == 1
                                          else f"{min(self.items)}-{max(self.items)}")


def compute_delta(coll: Collection, scores: ItemScores, task: str, method: str, n: int, suite: str,
                  metric: str, arms: Pair = LEGACY_PAIR) -> Delta:
    key = (task, cell_method(method, n), n, suite, metric)
    lora = coll.by_seed(task, method, arms.baseline, n, suite, metric)
    d2lora = coll.by_seed(task, method, arms.treatment, n, suite, metric)
    seeds = tuple(sorted(lora.keys() & d2lora.keys()))
    finished = (len(lora), len(d2lora))
    notes = _unpaired_notes(task, key[1], n, lora, d2lora, arms)
    if not seeds:
        why = "no seed finished on both sides" if lora or d2lora else "not finished"
        return Delta(*key, None, None, (), (), None, NONE, finished, why=why, notes=notes, pair=arms)
    rows, differing, reasons = [], 0, []
    for seed in seeds:
        lora_id, d2lora_id = (coll.cell_id(task, method, arm, n, seed) for arm in (arms.baseline, arms.treatment))
        pair = _item_differences(scores, lora_id, d2lora_id, suite, metric)
        if isinstance(pair, str):
            reasons.append(pair)
            continue
        by_item, k, mismatch = pair
        rows.append(by_item)
        differing += k
        notes += (mismatch,) if mismatch else ()
    if reasons:  # fall back to seed level for this Δ, and say why: a t over the per-seed differences
        matrix = np.array([[d2lora[s] - lora[s]] for s in seeds])
        return _with_stats(Delta(*key, None, None, seeds, (), None, SEEDS, finished,
                                 fallback=tuple(dict.fromkeys(reasons)), notes=notes, pair=arms), matrix)
    common = sorted(set.intersection(*(set(r) for r in rows)))
    if not common:
        return Delta(*key, None, None, (), (), None, NONE, finished, why="no item answered by every paired seed",
                     notes=notes, pair=arms)
    if any(len(r) != len(common) for r in rows):
        notes += (f"{task}-{key[1]}-n{n} {suite}: the paired seeds answered different items; Δ uses the "
                  f"{len(common)} items every seed answered",)
    matrix = np.array([[r[i] for i in common] for r in rows])
    return _with_stats(Delta(*key, None, None, seeds, (len(common),) * len(seeds), differing, ITEMS, finished,
                             notes=notes, pair=arms), matrix)


def _with_stats(delta: Delta, matrix: np.ndarray) -> Delta:
    """Δ with its value, interval, p, MDE and variance components from the seeds × items matrix."""
    c = crossed(matrix)
    if np.isnan(c.se):  # one seed with one value: no interval
        return replace(delta, value=float(c.delta))
    lo, hi = c.interval()
    return replace(delta, value=float(c.delta), ci=(float(lo), float(hi)), se=float(c.se), df=float(c.df),
                   p=float(c.p), mde=float(c.mde()), components=c.components())


def _item_differences(scores: ItemScores, lora_id: str, d2lora_id: str, suite: str,
                      metric: str) -> tuple[dict[str, float], int, str | None] | str:
    """({item id: D2LoRA − LoRA} over common items, how many differ, id-mismatch note) or why not available."""
    a, b = scores.get(lora_id, suite, metric), scores.get(d2lora_id, suite, metric)
    if isinstance(a, str):
        return a
    if isinstance(b, str):
        return b
    common = sorted(a.keys() & b.keys())
    note = None
    if len(common) != len(a) or len(common) != len(b):
        note = (f"{suite}: item ids differ between {lora_id} ({len(a) - len(common)} only there) and "
                f"{d2lora_id} ({len(b) - len(common)} only there); Δ uses the {len(common)} common items")
    if not common:
        return f"{suite}: {lora_id} and {d2lora_id} have no item id in common"
    diffs = {i: b[i] - a[i] for i in common}
    return diffs, sum(b[i] != a[i] for i in common), note


def _unpaired_notes(task: str, method: str, n: int, lora: dict[int, float], d2lora: dict[int, float],
                    arms: Pair) -> tuple:
    from d2lora_dist.report.arms import Arm

    notes = []
    for init, mine, other in ((Arm.parse(arms.baseline).label, lora, d2lora),
                              (Arm.parse(arms.treatment).label, d2lora, lora)):
        alone = sorted(mine.keys() - other.keys())
        if alone and other:
            notes.append(f"{task}-{method}-n{n}: {init} seed(s) {', '.join(map(str, alone))} finished without "
                         f"the other init: left out of Δ")
    return tuple(notes)


# ---- all of them -------------------------------------------------------------------------------

class Deltas:
    """Every Δ of the report, computed once (n = 0 is shared by every method's table), each with its
    verdict (report.verdicts): primary comparisons alone, the others by Holm within their table."""

    def __init__(self, coll: Collection, scores: ItemScores, min_seeds: int = 5,
                 primary: frozenset[tuple] = frozenset()):
        self.coll, self.scores = coll, scores
        self.min_seeds, self.primary = min_seeds, primary
        self._cache: dict[tuple, Delta] = {}
        self._judged: dict[tuple, Delta] = {}

    def get(self, task: str, method: str, n: int, suite: str, metric: str, pair: Pair = LEGACY_PAIR) -> Delta:
        """The Δ with its verdict."""
        key = (task, cell_method(method, n), n, suite, metric, pair)
        if key not in self._judged:
            self._judge_family(task, key[1], suite)
        return self._judged[key] if key in self._judged else self._judge_alone(self._raw(*key))

    def _raw(self, task: str, method: str, n: int, suite: str, metric: str, pair: Pair) -> Delta:
        key = (task, method, n, suite, metric, pair)
        if key not in self._cache:
            self._cache[key] = compute_delta(self.coll, self.scores, task, method, n, suite, metric, pair)
        return self._cache[key]

    def family(self, task: str, method: str, suite: str) -> list[Delta]:
        """The Δs of one table (every metric, pair and n; n = 0 has a family of its own, shared by every
        method's table), unjudged."""
        ns = [0] if method == NO_TRAINING else sorted({c.n for c in self.coll.cells()
                                                       if c.task == task and c.method == method and c.n > 0})
        return [self._raw(task, method, n, suite, metric, pair) for metric in self.coll.metrics(task, suite)
                for pair in self.pairs(task) for n in ns]

    def _judge_alone(self, d: Delta) -> Delta:
        """The verdict a Δ has without its family: too few seeds, no interval, or a primary's."""
        role = v.PRIMARY if d.key in self.primary else v.EXPLORATORY
        if d.p is None:
            state = v.NO_INTERVAL
        elif not v.enough_seeds(len(d.seeds), d.n, self.min_seeds):
            state = v.TOO_FEW
        elif role == v.PRIMARY:
            state = v.RESOLVED if v.primary_resolved(d.p, len(d.seeds), d.n, self.min_seeds) else v.UNRESOLVED
        else:
            return d  # exploratory: decided with its family
        return replace(d, verdict=v.Verdict(state, role, len(d.seeds), self.min_seeds))

    def _judge_family(self, task: str, method: str, suite: str) -> None:
        judged = [self._judge_alone(d) for d in self.family(task, method, suite)]
        open_ = [d for d in judged if d.verdict is None and d.basis != NONE]
        resolved, adjusted = v.exploratory_resolved([d.p for d in open_])
        decided = {id(d): replace(d, verdict=v.Verdict(v.RESOLVED if r else v.UNRESOLVED, v.EXPLORATORY,
                                                      len(d.seeds), self.min_seeds, a, len(open_)))
                   for d, r, a in zip(open_, resolved, adjusted, strict=True)}
        for d in judged:
            self._judged[(d.task, d.method, d.n, d.suite, d.metric, d.pair)] = decided.get(id(d), d)

    def pairs(self, task: str) -> list[Pair]:
        """The Δ pairs of a task's arms (report.arms.pairs_of)."""
        from d2lora_dist.report.arms import pairs_of

        return pairs_of(self.coll.arms(task))

    def every(self, tables: list[tuple[str, str, str, tuple[int, ...]]]) -> list[Delta]:
        """Each Δ once for (task, method, suite, ns), every metric the suite reports and every pair."""
        out = {}
        for task, method, suite, ns in tables:
            for metric in self.coll.metrics(task, suite):
                for pair in self.pairs(task):
                    for n in ns:
                        delta = self.get(task, method, n, suite, metric, pair)
                        out.setdefault((delta.task, delta.method, n, suite, metric, pair), delta)
        order = {p: i for i, p in enumerate(dict.fromkeys(d.pair for d in out.values()))}
        return sorted(out.values(), key=lambda d: (d.task, d.suite, d.metric, order[d.pair], d.method != NO_TRAINING,
                                                  d.method, d.n))

    def notes(self) -> list[str]:
        """Problems and fallbacks behind the Δ computed so far, each once."""
        lines = list(self.scores.problems.values())
        for delta in self._cache.values():
            lines += [*delta.fallback, *delta.notes]
        return list(dict.fromkeys(lines))


def render_deltas_csv(deltas: list[Delta], coll: Collection | None = None) -> str:
    """deltas.csv; n_trained (from `coll`): the rows the paired cells trained on, "" when not recorded."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(DELTAS_CSV_COLUMNS)
    for d in deltas:
        if d.basis == NONE and not any(d.finished):
            continue  # nothing finished: no line
        ci = d.ci or ("", "")
        trained = "" if coll is None else coll.n_trained(d.task, d.method, d.n, (d.pair.baseline, d.pair.treatment),
                                                         d.seeds)
        verdict, comp = d.verdict, d.components
        sds = ("", "", "") if comp is None else tuple(np.sqrt([comp.seed, comp.item, comp.resid]))
        writer.writerow([d.task, d.method, d.n, d.suite, d.metric, _num(d.value), _num(ci[0]), _num(ci[1]),
                         len(d.seeds), d.items_label, "" if d.differing is None else d.differing,
                         str(d.resolved).lower(), d.basis, d.note, d.pair.treatment, d.pair.baseline,
                         verdict.state if verdict else "", verdict.role if verdict else "", _num(d.p),
                         _num(verdict.p_holm if verdict else None), verdict.family if verdict and verdict.family else "",
                         _num(d.se), "" if d.df is None else f"{d.df:.2f}", _num(d.mde), *map(_num, sds), trained])
    return buf.getvalue()


def _num(x: float | str | None) -> str:
    return "" if x is None or x == "" else f"{float(x):.6f}"
