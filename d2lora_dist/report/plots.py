"""The paper's figures as PNGs (matplotlib Agg, no pyplot state): metric vs n, error bars = std.

  <task>_<method>_vs_n.png   both inits for one method             (paper Fig. 2)
  <task>_methods_lora.png    SFT / DPO / ORPO on vanilla LoRA       (Fig. 1)
  <task>_forgetting.png      forgetting suite vs n, method x init   (Fig. 3)
  <task>_low_data.png        the n < 1000 sweep, when it has cells  (Fig. 4)
n is drawn on evenly spaced positions labelled with its values (0 and 10k on one axis).
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
from d2lora_dist.report.collect import Collection
from d2lora_dist.report.stats import mean_std
from d2lora_dist.report.tables import INITS, METHOD_LABELS, TableSpec
from d2lora_dist.sweep.grid import NO_TRAINING

SIZE_IN = (6.4, 4.0)
DPI = 100  # 640 x 400 pixels per panel
LOW_DATA_MAX_N = 1000
DODGE = 0.04  # sideways shift between series at one n, in units of the n spacing
INIT_STYLE = {"lora": {"linestyle": "--", "marker": "o"}, "d2lora": {"linestyle": "-", "marker": "s"}}
INIT_COLOR = {"lora": "tab:blue", "d2lora": "tab:red"}
METHOD_COLOR = {"sft": "tab:blue", "dpo": "tab:orange", "orpo": "tab:green"}
Draw = Callable[[Axes], int]  # draws one panel, returns how many series it drew


def write_plots(coll: Collection, specs: list[TableSpec], out_dir: Path) -> list[Path]:
    """Draw every figure that has at least one finished point; return the paths written."""
    written: list[Path] = []
    for task in dict.fromkeys(s.task for s in specs):
        for name, panels in _task_figures(coll, [s for s in specs if s.task == task]):
            if (path := _figure(out_dir / f"{task}_{name}.png", panels)) is not None:
                written.append(path)
    return written


def _task_figures(coll: Collection, specs: list[TableSpec]) -> list[tuple[str, list[Draw]]]:
    task_suites = [s for s in specs if s.role == "task"]
    primary = [s for s in task_suites if s.suite == task_suites[0].suite] if task_suites else []
    forgetting = [s for s in specs if s.role == "forgetting"]
    figures: list[tuple[str, list[Draw]]] = [
        (f"{s.method}_vs_n", [partial(_vs_n, coll=coll, spec=s)]) for s in primary if s.method != NO_TRAINING]
    if primary:
        figures.append(("methods_lora", [partial(_methods_lora, coll=coll, specs=primary)]))
    if forgetting:
        suites = dict.fromkeys(s.suite for s in forgetting)
        figures.append(("forgetting", [partial(_method_x_init, coll=coll, kind="forgetting",
                                               specs=[s for s in forgetting if s.suite == su]) for su in suites]))
    task = specs[0].task
    if primary and any(0 < c.n < LOW_DATA_MAX_N for c in coll.finished.values() if c.task == task):
        figures.append(("low_data", [partial(_method_x_init, coll=coll, specs=primary, kind="low-data")]))
    return figures


def _figure(path: Path, panels: list[Draw]) -> Path | None:
    fig = Figure(figsize=(SIZE_IN[0] * len(panels), SIZE_IN[1]), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    drawn = sum(draw(ax) for draw, ax in zip(panels, axes, strict=True))
    if not drawn:
        return None  # nothing finished yet: no empty figure
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


def _vs_n(ax: Axes, coll: Collection, spec: TableSpec) -> int:
    drawn = sum(_line(ax, *_series(coll, spec, spec.method, init, spec.ns), label=label, slot=(i, len(INITS)),
                      color=INIT_COLOR[init], **INIT_STYLE[init]) for i, (init, label) in enumerate(INITS))
    if drawn:
        _decorate(ax, spec, spec.ns, f"{spec.task}: {METHOD_LABELS[spec.method]}, LoRA vs D2LoRA")
    return drawn


def _methods_lora(ax: Axes, coll: Collection, specs: list[TableSpec]) -> int:
    ns = tuple(sorted({n for s in specs for n in s.ns}))
    trained = [s for s in specs if s.method != NO_TRAINING]
    drawn = sum(_line(ax, *_series(coll, s, s.method, "lora", ns), label=METHOD_LABELS[s.method],
                      slot=(i, len(trained)), color=METHOD_COLOR.get(s.method), marker="o")
                for i, s in enumerate(trained))
    if drawn:
        _decorate(ax, specs[0], ns, f"{specs[0].task}: methods on vanilla LoRA")
    return drawn


def _method_x_init(ax: Axes, coll: Collection, specs: list[TableSpec], kind: str) -> int:
    ns = tuple(sorted({n for s in specs for n in s.ns}))
    if kind == "low-data":
        ns = tuple(n for n in ns if n < LOW_DATA_MAX_N)
    series = [(s, init, label) for s in specs if s.method != NO_TRAINING for init, label in INITS]
    drawn = sum(_line(ax, *_series(coll, s, s.method, init, ns), label=f"{METHOD_LABELS[s.method]} {label}",
                      slot=(i, len(series)), color=METHOD_COLOR.get(s.method), **INIT_STYLE[init])
                for i, (s, init, label) in enumerate(series))
    if drawn:
        what = "forgetting" if kind == "forgetting" else f"low-data sweep (n < {LOW_DATA_MAX_N})"
        _decorate(ax, specs[0], ns, f"{specs[0].task}: {what}, {specs[0].suite}")
    return drawn
