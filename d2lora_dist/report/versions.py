"""Which versions made a report's numbers, and the rule for pooling cells made by different ones.

Prompt and scorer versions (evaluate.suites) say what a number means: a cell scored by another
title extraction or asked by another prompt is not comparable, so a report refuses to put such
cells in one table (naming them) unless it is told to (`--allow-mixed`), and then says so.

The code commit is listed, not refused: a sweep resumed after an unrelated commit (a docs fix, a
new command) still pools correctly, and everything that changes what a number means carries a
version of its own. The report lists every commit with its cells, and marks an uncommitted tree
(`+dirty`), so a reader can see which code made which cell.
"""

from __future__ import annotations

from collections import defaultdict

from d2lora_dist.errors import InputError
from d2lora_dist.report.collect import Row

VERSION_FIELDS = ("prompt_version", "scorer_version")


class MixedVersions(InputError):
    """Cells of one suite were made by different prompt or scorer versions."""


def version_conflicts(rows: list[Row]) -> dict[str, list[str]]:
    """suite -> one line per version field that differs: each value with the cells that have it."""
    out: dict[str, list[str]] = {}
    for suite in sorted({r.suite for r in rows}):
        lines = []
        for name in VERSION_FIELDS:
            cells = _cells_by(rows, suite, name)
            if len(cells) > 1:
                lines.append(f"{name} " + "; ".join(f"{value} ({', '.join(ids)})" for value, ids in cells.items()))
        if lines:
            out[suite] = lines
    return out


def check_versions(rows: list[Row], allow_mixed: bool) -> dict[str, list[str]]:
    """The conflicts, when allowed; MixedVersions naming the suites, versions and cells otherwise."""
    conflicts = version_conflicts(rows)
    if conflicts and not allow_mixed:
        detail = " | ".join(f"suite {suite}: {' / '.join(lines)}" for suite, lines in conflicts.items())
        raise MixedVersions(f"cells made by different prompt or scorer versions cannot be pooled: {detail}. "
                            "Re-evaluate the older cells (delete their result.json and run them again), or pass "
                            "--allow-mixed to report them together, marked as mixed")
    return conflicts


def code_versions(rows: list[Row]) -> dict[str, list[str]]:
    """code version -> the cells it made, most cells first."""
    cells: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        cells[r.code].add(r.cell_id)
    return {code: sorted(ids) for code, ids in sorted(cells.items(), key=lambda kv: (-len(kv[1]), kv[0]))}


def version_lines(rows: list[Row], conflicts: dict[str, list[str]]) -> list[str]:
    """The markdown a report shows about versions: mixed suites (allowed), then the code."""
    out = []
    if conflicts:
        out += ["**Mixed versions (reported with --allow-mixed): the numbers of these suites come from different "
                "prompt or scorer versions and are not comparable across the cells named.**", "",
                *[f"- {suite}: {line}" for suite, lines in conflicts.items() for line in lines], ""]
    codes = code_versions(rows)
    if len(codes) == 1:
        out += [f"Code: {next(iter(codes))} (every cell).", ""]
    elif codes:
        out += [f"Code: {len(codes)} versions made these cells (listed, not refused: prompt and scorer versions "
                "decide what is comparable; docs/evaluation.md).", "",
                *[f"- {code}: {len(ids)} cell{'s' * (len(ids) > 1)}: {', '.join(ids)}" for code, ids in codes.items()],
                ""]
    return out


def _cells_by(rows: list[Row], suite: str, field: str) -> dict[str, list[str]]:
    cells: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.suite == suite:
            cells[getattr(r, field)].add(r.cell_id)
    return {value: sorted(ids) for value, ids in sorted(cells.items())}
