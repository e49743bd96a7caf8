"""The tuned arms in the report: each arm's validation score per setting, the setting chosen, and a plot
of the validation metric against the tuned axis, one line per arm (sweep/tuning.py chooses).

  <task>_<method>_n<N>_tuning.png   validation metric vs the setting, one line per arm, chosen point ringed

Only the selection cells' validation results are read here; the test tables above come from the
final cells as for any other cell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from d2lora_dist.config import Experiment
from d2lora_dist.fileio import write_atomic
from d2lora_dist.layout import RunLayout
from d2lora_dist.methods import method_label
from d2lora_dist.report.arms import Arm, ordered_arms
from d2lora_dist.report.stats import mean_std
from d2lora_dist.sweep.grid import Cell
from d2lora_dist.sweep.tune_axes import TuneSetting
from d2lora_dist.sweep.tuning import RULE, Choice, tuned_arms, validation_scores

CHOSEN = "chosen"  # gid of the ring around a chosen point (tests look it up)
AXES = (("learning_rate", "learning rate"), ("epochs", "epochs"), ("min_steps", "min_steps"))


def tuning_section(exp: Experiment, layout: RunLayout, cells: list[Cell], plots_dir: Path) -> tuple[list[str], list[Path]]:
    """Markdown lines and plots for every tuned (task, method, n): nothing when the grid tunes nothing."""
    groups: dict[tuple[str, str, int], dict[str, Choice]] = {}
    for cell in tuned_arms(cells).values():
        groups.setdefault((cell.task, cell.method, cell.n), {})[cell.arm] = validation_scores(exp, layout, cell, True)
    if not groups:
        return [], []
    lines = ["## Tuned settings (validation split)", "",
             f"Each arm's setting is chosen on its own validation scores: {RULE}. Points × 100, mean ± sd over the "
             "tune seeds; ✓ = chosen (— = no result yet). The test tables above use the chosen setting.", ""]
    plots = []
    for (task, method, n), arms in groups.items():
        first = next(iter(arms.values()))
        lines += [f"### {task} · {method_label(method)} · n = {n}: {first.suite} {first.metric}, tune seeds "
                  f"{list(first.seeds)}", "", _table(arms), ""]
        plot = _plot(arms, plots_dir / f"{task}_{method}_n{n}_tuning.png", f"{task} · {method_label(method)} · n = {n}")
        plots += [plot] if plot is not None else []
    return lines, plots


def _cell_text(choice: Choice, setting: TuneSetting) -> str:
    values = list(choice.scores.get(setting.label, {}).values())
    if not values:
        return "—"
    mean, std = mean_std(values)
    text = f"{mean * 100:.2f}" + (f" ± {std * 100:.2f}" if std is not None else "")
    return text + (" ✓" if choice.chosen == setting else "")


def _table(arms: dict[str, Choice]) -> str:
    order = ordered_arms(list(arms))
    settings = next(iter(arms.values())).settings
    rows = ["| setting | " + " | ".join(Arm.parse(a).label for a in order) + " |",
            "|---|" + "---|" * len(order)]
    rows += [f"| {s.label} | " + " | ".join(_cell_text(arms[a], s) for a in order) + " |" for s in settings]
    rows.append("| **chosen** | " + " | ".join(arms[a].chosen.label if arms[a].chosen else "pending" for a in order)
                + " |")
    return "\n".join(rows)


def _positions(settings: tuple[TuneSetting, ...]) -> tuple[np.ndarray, str, bool]:
    """x of each setting: the one tuned axis's values (learning rate on a log scale), else evenly spaced."""
    varied = [(key, label) for key, label in AXES if len({getattr(s, key) for s in settings}) > 1]
    if len(varied) == 1:
        key, label = varied[0]
        return np.array([float(getattr(s, key)) for s in settings]), label, key == "learning_rate"
    return np.arange(len(settings), dtype=float), "setting", False


def _plot(arms: dict[str, Choice], path: Path, title: str) -> Path | None:
    settings = next(iter(arms.values())).settings
    x, xlabel, log = _positions(settings)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = 0
    for arm in ordered_arms(list(arms)):
        choice = arms[arm]
        stats = [mean_std(list(choice.scores[s.label].values())) if choice.scores.get(s.label) else (np.nan, None)
                 for s in settings]
        means = np.array([m for m, _ in stats]) * 100
        if np.all(np.isnan(means)):
            continue
        stds = np.array([0.0 if sd is None else sd for _, sd in stats]) * 100
        line = ax.errorbar(x, means, yerr=stds, capsize=3, marker="o", label=Arm.parse(arm).label)
        drawn += 1
        if choice.chosen is not None:
            i = settings.index(choice.chosen)
            ax.plot([x[i]], [means[i]], marker="o", markersize=14, fillstyle="none", linestyle="none",
                    color=line[0].get_color(), gid=CHOSEN)
    if not drawn:
        return None
    if log:
        ax.set_xscale("log")
    if xlabel == "setting":
        ax.set_xticks(x, [s.label for s in settings], rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    metric = next(iter(arms.values())).metric
    ax.set_ylabel(f"validation {metric} (× 100)")
    ax.set_title(f"{title}: validation {metric} per setting (ring = chosen)")
    ax.legend()
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
