"""The paper's figures as PNGs (matplotlib Agg, no pyplot state): metric vs n, error bars = std.

  <task>_<method>_vs_n.png   both inits for one method             (paper Fig. 2)
  <task>_methods_lora.png    SFT / DPO / ORPO on vanilla LoRA       (Fig. 1)
  <task>_forgetting.png      forgetting suite vs n, method x init   (Fig. 3)
  <task>_low_data.png        the n < 1000 sweep, when it has cells  (Fig. 4)
  <task>_delta_vs_n.png      Δ = D2LoRA − LoRA vs n, one panel per method
  <task>_<method>_delta_vs_m.png  Δ vs the warm-up size m at each n, one line per LoRA init
                             (with several warm-ups of known size)
With the warm-up or LoRA-init axes every arm (D2LoRA(m), LoRA · PiSSA, ...) is a line of its own and
every Δ pair (report.arms) a series of the Δ row.
Every figure that compares the inits has a Δ row under it: Δ with its paired 95% interval
(report.paired), a zero line, resolved points filled and joined to resolved neighbours,
unresolved ones hollow with a grey interval and never joined; every point that is not a resolved
primary comparison says its verdict in words ("unresolved", "too few seeds", "resolved (Holm)" for
an exploratory Δ resolved after Holm's correction; report.verdicts). n is drawn on evenly spaced
positions labelled with its values (0 and 10k on one axis).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from d2lora_dist.fileio import write_atomic as atomic_write
from d2lora_dist.inits import TREATMENT
from d2lora_dist.methods import method_label
from d2lora_dist.report.arms import Arm, Pair
from d2lora_dist.report.collect import Collection
from d2lora_dist.report.paired import Delta, Deltas
from d2lora_dist.report.stats import mean_std
from d2lora_dist.report.tables import TableSpec, table_arms
from d2lora_dist.sweep.grid import NO_TRAINING

SIZE_IN = (6.4, 4.0)
DELTA_ROW_IN = 2.4  # height of the Δ row under a figure that compares the inits
DPI = 100  # 640 x 400 pixels per panel, 640 x 640 with a Δ row
UNRESOLVED_COLOR = "0.6"  # grey
TREND, UNRESOLVED, INTERVAL = "trend", "unresolved", "interval"  # gids of the artists (tests look them up)
LOW_DATA_MAX_N = 1000
DODGE = 0.04  # sideways shift between series at one n, in units of the n spacing
INIT_STYLE = {"lora": {"linestyle": "--", "marker": "o"}, "d2lora": {"linestyle": "-", "marker": "s"},
              "lora_matched": {"linestyle": "-.", "marker": "o"}, "d2lora_placebo": {"linestyle": ":", "marker": "s"},
              "random_b": {"linestyle": ":", "marker": "x"}}
INIT_COLOR = {"lora": "tab:blue", "d2lora": "tab:red", "lora_matched": "tab:cyan", "d2lora_placebo": "tab:gray",
              "random_b": "tab:olive"}
METHOD_COLOR = {"sft": "tab:blue", "dpo": "tab:orange", "orpo": "tab:green"}
WARMUP_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")  # one per warm-up
LORA_INIT_MARKERS = ("o", "^", "D", "v", "P")  # one per LoRA init, when there are several
LORA_INIT_COLORS = ("tab:red", "tab:green", "tab:purple", "tab:brown")  # Δ against m: one per LoRA init
Draw = Callable[[Axes], int]  # draws one panel, returns how many series it drew


def write_plots(coll: Collection, specs: list[TableSpec], deltas: Deltas, out_dir: Path,
                warmup_sizes: dict[str, int | None] | None = None,
                warmup_labels: dict[str, str] | None = None) -> list[Path]:
    """Draw every figure that has at least one finished point; return the paths written.
    `warmup_sizes`: warm-up name -> its m (rows), for Δ against m; `warmup_labels`: its tick label."""
    written: list[Path] = []
    for task in dict.fromkeys(s.task for s in specs):
        figures = _task_figures(coll, deltas, [s for s in specs if s.task == task])
        figures += _delta_vs_m_figures(coll, deltas, [s for s in specs if s.task == task], warmup_sizes or {},
                                       warmup_labels or {})
        for name, panels, delta_row in figures:
            if (path := _figure(out_dir / f"{task}_{name}.png", panels, delta_row)) is not None:
                written.append(path)
    return written


Figure_ = tuple[str, list[Draw], list[Draw]]  # name, top row, Δ row (may be empty)


def _task_figures(coll: Collection, deltas: Deltas, specs: list[TableSpec]) -> list[Figure_]:
    task_suites = [s for s in specs if s.role == "task"]
    primary = [s for s in task_suites if s.suite == task_suites[0].suite] if task_suites else []
    trained = [s for s in primary if s.method != NO_TRAINING]
    forgetting = [s for s in specs if s.role == "forgetting"]
    figures: list[Figure_] = [
        (f"{s.method}_vs_n", [partial(_vs_n, coll=coll, spec=s)], [partial(delta_panel, deltas=deltas, specs=[s])])
        for s in trained]
    if primary:
        figures.append(("methods_lora", [partial(_methods_lora, coll=coll, specs=primary)], []))
    if forgetting:
        groups = [[s for s in forgetting if s.suite == su] for su in dict.fromkeys(s.suite for s in forgetting)]
        figures.append(("forgetting", [partial(_method_x_init, coll=coll, kind="forgetting", specs=g) for g in groups],
                        [partial(delta_panel, deltas=deltas, specs=g) for g in groups]))
    task = specs[0].task
    if primary and any(0 < c.n < LOW_DATA_MAX_N for c in coll.finished.values() if c.task == task):
        figures.append(("low_data", [partial(_method_x_init, coll=coll, specs=primary, kind="low-data")],
                        [partial(delta_panel, deltas=deltas, specs=primary, max_n=LOW_DATA_MAX_N)]))
    if trained:
        figures.append(("delta_vs_n", [partial(delta_panel, deltas=deltas, specs=[s], title=True) for s in trained],
                        []))
    return figures


def _figure(path: Path, panels: list[Draw], delta_row: list[Draw]) -> Path | None:
    """Top row of panels (nothing drawn there: no figure), and the Δ row under it if given."""
    heights = [SIZE_IN[1], DELTA_ROW_IN][:1 + bool(delta_row)]
    fig = Figure(figsize=(SIZE_IN[0] * len(panels), sum(heights)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), len(panels), squeeze=False, gridspec_kw={"height_ratios": heights})
    drawn = sum(draw(ax) for draw, ax in zip(panels, axes[0], strict=True))
    if not drawn:
        return None  # nothing finished yet: no empty figure
    for draw, ax in zip(delta_row, axes[1] if delta_row else [], strict=True):
        draw(ax)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _series(coll: Collection, spec: TableSpec, method: str, init: str, ns: tuple[int, ...]):
    key = spec.metrics[0][0]
    means, stds = [], []
    for n in ns:
        vals = coll.values(spec.task, method, init, n, spec.suite, key)
        mean, std = mean_std(vals) if vals else (np.nan, np.nan)
        means.append(mean * 100)
        stds.append(0.0 if std is None else std * 100)
    return np.array(means), np.array(stds)


def _line(ax: Axes, means: np.ndarray, stds: np.ndarray, label: str, slot: tuple[int, int], **style) -> int:
    """One series with std error bars; `slot` (i, of k) shifts it sideways so bars do not overlap."""
    if np.all(np.isnan(means)):
        return 0
    shift = (slot[0] - (slot[1] - 1) / 2) * DODGE
    ax.errorbar(np.arange(means.size) + shift, means, yerr=np.nan_to_num(stds), capsize=3, label=label, **style)
    return 1


def _decorate(ax: Axes, spec: TableSpec, ns: tuple[int, ...], title: str) -> None:
    ax.set_xticks(np.arange(len(ns)), [str(n) for n in ns])
    ax.set_xlim(-0.4, len(ns) - 0.6)
    ax.set_xlabel("task examples n")
    ax.set_ylabel(f"{spec.suite} {spec.metrics[0][1]} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def arm_style(arm: str, arms: list[str]) -> dict:
    """Vanilla LoRA dashed blue, D2LoRA solid red; with the axes, a colour per warm-up and a marker per
    LoRA init."""
    parsed = [Arm.parse(a) for a in arms]
    a = Arm.parse(arm)
    style = dict(INIT_STYLE.get(a.init, {"linestyle": "-", "marker": "o"}))
    # a colour per warm-up for D2LoRA; the controls (also tied to a warm-up) keep their own
    warmups = list(dict.fromkeys(p.warmup for p in parsed if p.init == TREATMENT))
    color = WARMUP_COLORS[warmups.index(a.warmup) % len(WARMUP_COLORS)] if a.init == TREATMENT \
        and a.warmup in warmups else INIT_COLOR.get(a.init, "tab:gray")
    lora_inits = list(dict.fromkeys(p.lora_init for p in parsed))
    if len(lora_inits) > 1:
        style["marker"] = LORA_INIT_MARKERS[lora_inits.index(a.lora_init) % len(LORA_INIT_MARKERS)]
    return {"color": color, **style}


def _vs_n(ax: Axes, coll: Collection, spec: TableSpec) -> int:
    arms = table_arms(coll, spec.task)
    names = [a for a, _ in arms]
    drawn = sum(_line(ax, *_series(coll, spec, spec.method, arm, spec.ns), label=label, slot=(i, len(arms)),
                      **arm_style(arm, names)) for i, (arm, label) in enumerate(arms))
    if drawn:
        what = "LoRA vs D2LoRA" if len(arms) == 2 else "every arm"
        _decorate(ax, spec, spec.ns, f"{spec.task}: {method_label(spec.method)}, {what}")
    return drawn


def _methods_lora(ax: Axes, coll: Collection, specs: list[TableSpec]) -> int:
    ns = tuple(sorted({n for s in specs for n in s.ns}))
    trained = [s for s in specs if s.method != NO_TRAINING]
    drawn = sum(_line(ax, *_series(coll, s, s.method, "lora", ns), label=method_label(s.method),
                      slot=(i, len(trained)), color=METHOD_COLOR.get(s.method), marker="o")
                for i, s in enumerate(trained))
    if drawn:
        _decorate(ax, specs[0], ns, f"{specs[0].task}: methods on vanilla LoRA")
    return drawn


def _method_x_init(ax: Axes, coll: Collection, specs: list[TableSpec], kind: str) -> int:
    ns = tuple(sorted({n for s in specs for n in s.ns}))
    if kind == "low-data":
        ns = tuple(n for n in ns if n < LOW_DATA_MAX_N)
    arms = table_arms(coll, specs[0].task)
    several = len(arms) > 2  # with the axes each arm has its colour; else each method has
    series = [(s, arm, label) for s in specs if s.method != NO_TRAINING for arm, label in arms]
    drawn = sum(_line(ax, *_series(coll, s, s.method, arm, ns), label=f"{method_label(s.method)} {label}",
                      slot=(i, len(series)), **(arm_style(arm, [a for a, _ in arms]) if several else
                                                {"color": METHOD_COLOR.get(s.method), **INIT_STYLE[Arm.parse(arm).init]}))
                for i, (s, arm, label) in enumerate(series))
    if drawn:
        what = "forgetting" if kind == "forgetting" else f"low-data sweep (n < {LOW_DATA_MAX_N})"
        _decorate(ax, specs[0], ns, f"{specs[0].task}: {what}, {specs[0].suite}")
    return drawn


# ---- Δ -----------------------------------------------------------------------------------------

def joined_runs(resolved: list[bool | None]) -> list[list[int]]:
    """Positions a trend line joins: maximal runs of >= 2 consecutive resolved Δ (None = no Δ there)."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i, ok in enumerate([*resolved, None]):
        if ok:
            current.append(i)
            continue
        if len(current) > 1:
            runs.append(current)
        current = []
    return runs


def delta_panel(ax: Axes, deltas: Deltas, specs: list[TableSpec], max_n: int | None = None,
                title: bool = False) -> int:
    """Δ of each spec's primary metric vs n with its interval; returns how many series have a Δ."""
    ns = tuple(sorted({n for s in specs for n in s.ns if max_n is None or n < max_n}))
    ax.axhline(0.0, color="black", linewidth=0.8)
    trained = [s for s in specs if s.method != NO_TRAINING]
    pairs = deltas.pairs(specs[0].task)
    series = [(s, p) for s in trained for p in pairs]
    drawn = sum(_delta_series(ax, [deltas.get(s.task, s.method, n, s.suite, s.metrics[0][0], p) for n in ns],
                              **_pair_look(s, p, pairs, deltas, several_methods=len(trained) > 1),
                              shift=(i - (len(series) - 1) / 2) * DODGE * 2)
                for i, (s, p) in enumerate(series))
    spec = specs[0]
    ax.set_xticks(np.arange(len(ns)), [str(n) for n in ns])
    ax.set_xlim(-0.4, len(ns) - 0.6)
    ax.set_xlabel("task examples n")
    ax.set_ylabel(f"Δ {spec.suite} {spec.metrics[0][1]} (pp)")
    ax.grid(alpha=0.3)
    compared = "D2LoRA − LoRA" if len(pairs) == 1 else "D2LoRA(m) − LoRA per LoRA init"
    what = f"{spec.task}: Δ {compared}, {method_label(spec.method)}, " if title else f"Δ {compared}, "
    ax.set_title(f"{what}95% paired interval (hollow, grey bar: not resolved)", fontsize=9)
    if not drawn:
        ax.text(0.5, 0.5, "no Δ yet: no seed finished for both inits", transform=ax.transAxes, ha="center",
                va="center", fontsize=9, color="0.4")
    elif len(series) > 1:
        ax.legend(fontsize=8, loc="best")
    return drawn


def _pair_look(spec: TableSpec, pair: Pair, pairs: list[Pair], deltas: Deltas, several_methods: bool) -> dict:
    """Colour and legend label of one Δ series: by method without the axes, by treatment arm with them."""
    if len(pairs) == 1:
        return {"color": METHOD_COLOR.get(spec.method, "tab:purple"), "label": method_label(spec.method)}
    arms = deltas.coll.arms(spec.task)
    label = pair.label if not several_methods else f"{method_label(spec.method)} {pair.label}"
    # D2LoRA − control takes the control's look (D2LoRA − LoRA keeps D2LoRA's)
    styled = pair.baseline if Arm.parse(pair.baseline).from_warmup else pair.treatment
    look = arm_style(styled, arms)
    return {"color": look["color"], "label": label, "marker": look["marker"]}


def _delta_series(ax: Axes, deltas: list[Delta], color: str, label: str, shift: float, marker: str = "o") -> int:
    """Points at their n position: filled and joined when resolved; hollow with a grey interval when
    not (the edge keeps the method's colour, so panels with several methods stay readable)."""
    if all(d.value is None for d in deltas):
        return 0
    x = np.arange(len(deltas)) + shift
    for i, d in enumerate(deltas):
        if d.value is None:
            continue
        if d.ci is not None:
            ax.vlines(x[i], d.ci[0] * 100, d.ci[1] * 100, color=color if d.resolved else UNRESOLVED_COLOR,
                      linewidth=1.5, gid=INTERVAL)
        ax.plot([x[i]], [d.value * 100], linestyle="none", marker=marker, markersize=6, color=color,
                markerfacecolor=color if d.resolved else "none", gid=None if d.resolved else UNRESOLVED)
        words = d.verdict.short if d.verdict else "unresolved"
        if words != "resolved":  # said in words: a hollow marker alone is easy to misread in print, and a
            # point resolved only after Holm's correction is exploratory
            ax.annotate(words, (x[i], d.value * 100), xytext=(4, 4), textcoords="offset points", fontsize=7,
                        color=color if d.resolved else UNRESOLVED_COLOR, gid=None if d.resolved else UNRESOLVED)
    for run in joined_runs([d.resolved if d.value is not None else None for d in deltas]):
        ax.plot(x[run], [deltas[i].value * 100 for i in run], color=color, linewidth=1.2, gid=TREND)
    ax.plot([], [], marker=marker, linestyle="none", color=color, label=label)  # legend entry
    return 1


# ---- Δ against the warm-up size m ----------------------------------------------------------------

def _delta_vs_m_figures(coll: Collection, deltas: Deltas, specs: list[TableSpec],
                        sizes: dict[str, int | None], labels: dict[str, str]) -> list[Figure_]:
    """One figure per method of the task metric: a panel per n, Δ against m, a series per LoRA init."""
    treated = [Arm.parse(p.treatment) for p in deltas.pairs(specs[0].task) if p.treatment != p.baseline]
    warmups = sorted({a.warmup for a in treated if sizes.get(a.warmup) is not None}, key=lambda w: sizes[w])
    task_suites = [s for s in specs if s.role == "task"]
    if len(warmups) < 2 or not task_suites:
        return []
    primary = [s for s in task_suites if s.suite == task_suites[0].suite and s.method != NO_TRAINING]
    return [(f"{s.method}_delta_vs_m", [partial(delta_vs_m_panel, deltas=deltas, spec=s, n=n, warmups=warmups,
                                                sizes=sizes, labels=labels) for n in s.ns], [])
            for s in primary]


def delta_vs_m_panel(ax: Axes, deltas: Deltas, spec: TableSpec, n: int, warmups: list[str],
                     sizes: dict[str, int | None], labels: dict[str, str] | None = None) -> int:
    """Δ = D2LoRA(m) − LoRA at one n against m (evenly spaced, labelled), one series per LoRA init."""
    ax.axhline(0.0, color="black", linewidth=0.8)
    pairs = deltas.pairs(spec.task)
    lora_inits = list(dict.fromkeys(Arm.parse(p.treatment).lora_init for p in pairs))
    drawn = 0
    for i, lora_init in enumerate(lora_inits):
        by_warmup = {Arm.parse(p.treatment).warmup: p for p in pairs if Arm.parse(p.treatment).lora_init == lora_init}
        if not all(w in by_warmup for w in warmups):
            continue
        series = [deltas.get(spec.task, spec.method, n, spec.suite, spec.metrics[0][0], by_warmup[w]) for w in warmups]
        arm = by_warmup[warmups[0]].treatment
        label = "default init" if lora_init == Arm("lora").lora_init else Arm.parse(arm).label.split(" · ")[-1]
        drawn += _delta_series(ax, series, color=LORA_INIT_COLORS[i % len(LORA_INIT_COLORS)], label=label,
                               shift=(i - (len(lora_inits) - 1) / 2) * DODGE * 2,
                               marker=LORA_INIT_MARKERS[i % len(LORA_INIT_MARKERS)])
    ax.set_xticks(np.arange(len(warmups)), [(labels or {}).get(w, f"{sizes[w]}\n({w})") for w in warmups])
    ax.set_xlim(-0.4, len(warmups) - 0.6)
    ax.set_xlabel("warm-up rows m")
    ax.set_ylabel(f"Δ {spec.suite} {spec.metrics[0][1]} (pp)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{spec.task}: Δ D2LoRA(m, n={n}) − LoRA(n={n}), {method_label(spec.method)}\n"
                 "95% paired interval (hollow, grey bar: not resolved)", fontsize=9)
    if drawn > 1:
        ax.legend(fontsize=8, loc="best")
    return drawn
