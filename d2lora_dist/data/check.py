"""`d2lora data check`: what a dataset looks like after normalisation, per form."""

from __future__ import annotations

from typing import Any

from d2lora_dist.config import DatasetRef
from d2lora_dist.data.loading import load_table, normalize
from d2lora_dist.data.registry import get_spec


def check_dataset(ref: DatasetRef, examples_per_reason: int = 5) -> dict[str, Any]:
    spec = get_spec(ref.name)
    table = load_table(ref)
    report: dict[str, Any] = {"dataset": ref.name, "hub_id": spec.hub_id, "rows": len(table),
                              "columns": sorted(table.column_names), "forms": {}}
    for form in spec.forms:
        data = normalize(ref, form, table=table)
        report["source"] = data.source
        first = next(iter(data.records.values()), None)
        report["forms"][form] = {
            "valid_rows": len(data.records),
            "invalid_rows": data.bad_count,
            "invalid_by_reason": {reason: {"count": len(ids), "examples": ids[:examples_per_reason]}
                                  for reason, ids in sorted(data.bad.items())},
            "example": first,
        }
    return report


def format_check(report: dict[str, Any]) -> str:
    lines = [f"dataset {report['dataset']} ({report['source']}): {report['rows']} rows; "
             f"columns {', '.join(report['columns'])}"]
    for form, info in report["forms"].items():
        lines.append(f"  {form}: {info['valid_rows']} valid, {info['invalid_rows']} invalid")
        for reason, bad in info["invalid_by_reason"].items():
            lines.append(f"    {bad['count']:>6} x {reason}  e.g. {', '.join(bad['examples'])}")
        if info["example"] is not None:
            lines.append(f"    example: {_short(info['example'])}")
    return "\n".join(lines)


def _short(record: dict[str, Any], width: int = 300) -> str:
    text = repr(record)
    return text if len(text) <= width else text[:width] + "..."
