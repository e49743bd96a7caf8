"""Read a dataset (hub or local files), apply the column map, and normalise it into records.

Bad rows are counted per reason with example row ids; `strict` stops at the first one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2lora_dist.config import DatasetRef
from d2lora_dist.data.files import file_problems
from d2lora_dist.data.normalize import BadRow
from d2lora_dist.data.registry import DatasetSpec, get_spec
from d2lora_dist.errors import InputError

DROPPED_NAMED = 100  # dropped rows named in a result or manifest; the count covers all
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(InputError):
    """A dataset that cannot be used as configured; the message names the file/column/row."""


@dataclass
class Normalized:
    """Records of one form, keyed by raw row index (the index that subsets save)."""

    name: str
    form: str
    source: str
    total_rows: int
    records: dict[int, dict[str, Any]]
    bad: dict[str, list[str]] = field(default_factory=dict)

    @property
    def bad_count(self) -> int:
        return sum(len(ids) for ids in self.bad.values())

    def dropped(self, limit: int = DROPPED_NAMED) -> dict[str, Any]:
        """The rows the normaliser refused: their count, and the first `limit` as {row, reason} (for a
        phase's subset, result and manifest; `d2lora data check` reports the same rows by reason)."""
        rows = [(row, reason) for reason, ids in sorted(self.bad.items()) for row in ids]
        return {"count": len(rows), "rows": [{"row": row, "reason": reason} for row, reason in rows[:limit]]}

    def describe_dropped(self, examples: int = 5) -> str:
        """One line: how many rows of which form were dropped, per reason with example row ids."""
        reasons = "; ".join(f"{len(ids)} x {reason} ({', '.join(ids[:examples])}{', ...' * (len(ids) > examples)})"
                            for reason, ids in sorted(self.bad.items()))
        return (f"{self.name} ({self.source}): {self.bad_count} of {self.total_rows} rows dropped, not usable as "
                f"{self.form} records: {reasons}")


def data_files(ref: DatasetRef) -> list[str]:
    from d2lora_dist.assets import resolve_asset_uri

    files = ref.data_files if isinstance(ref.data_files, list) else [ref.data_files] if ref.data_files else []
    return [resolve_asset_uri(f) for f in files]


def describe_source(ref: DatasetRef, spec: DatasetSpec) -> str:
    files = ref.data_files if ref.data_files else None
    return f"{files}" if files else f"hub:{spec.hub_id}[{ref.split or spec.split}]"


def load_table(ref: DatasetRef) -> Any:
    """The raw rows as a `datasets.Dataset`, columns renamed to the schema's field names."""
    spec = get_spec(ref.name)
    files = data_files(ref)
    table = _load_local(files, ref.split) if files else _load_hub(spec, ref.split or spec.split)
    return _rename_columns(table, ref, spec)


def _load_local(files: list[str], split: str | None) -> Any:
    import datasets

    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise DataError(f"data file not found: {', '.join(missing)}")
    problems = file_problems(files)  # each bad file and line, before datasets hides them in one generic error
    if problems:
        raise DataError("cannot read the data file(s): " + "; ".join(problems))
    if len(files) == 1 and Path(files[0]).is_dir():
        try:
            loaded = datasets.load_from_disk(files[0])
        except FileNotFoundError as e:  # a folder that is not a saved dataset
            raise DataError(f"{files[0]}: not a dataset saved with save_to_disk ({e})") from e
        if isinstance(loaded, datasets.DatasetDict):
            key = split or next(iter(loaded))
            if key not in loaded:
                raise DataError(f"{files[0]}: no split {key!r} (has {sorted(loaded)})")
            loaded = loaded[key]
        return loaded
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
        raise DataError(f"data_files must share one of {sorted(_BUILDERS)} or be one saved dataset dir: {files}")
    try:
        return datasets.load_dataset(_BUILDERS[suffixes.pop()], data_files=files, split="train")
    except Exception as e:  # datasets raises several types for malformed files
        raise DataError(f"cannot read {files}: {type(e).__name__}: {e}") from e


def _load_hub(spec: DatasetSpec, split: str) -> Any:
    from d2lora_dist import hub

    offline = hub.offline()  # decided once per process; offline, datasets reads its cache only
    import datasets

    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
    except Exception as e:
        if offline:
            raise DataError(f"hub dataset {spec.hub_id} ({spec.hub_config or 'default'}, {split}) is not in the "
                            f"datasets cache ({datasets.config.HF_DATASETS_CACHE}) and {hub.why_offline()}: set `data_files` to local "
                            "copies (.jsonl/.json/.parquet/.csv files or a save_to_disk folder), or load it once where "
                            "the hub is reachable into the HF_HOME / HF_DATASETS_CACHE this machine reads") from e
        raise DataError(f"cannot load {spec.hub_id} ({spec.hub_config or 'default'}, {split}) from the hub: "
                        f"{type(e).__name__}: {e}. Offline? Point `data_files` at local copies.") from e


def _rename_columns(table: Any, ref: DatasetRef, spec: DatasetSpec) -> Any:
    unknown = sorted(set(ref.columns) - set(spec.required + spec.optional))
    if unknown:
        raise DataError(f"{ref.name}: columns map names unknown schema fields {unknown} "
                        f"(fields: {sorted(spec.required + spec.optional)})")
    present = set(table.column_names)
    for schema_field, column in ref.columns.items():
        if column not in present:
            raise DataError(f"{ref.name}: column {column!r} (for {schema_field}) not in "
                            f"{describe_source(ref, spec)}; columns: {sorted(present)}")
    renames = {column: schema_field for schema_field, column in ref.columns.items() if column != schema_field}
    clash = sorted(set(renames.values()) & (present - set(renames)))
    if clash:
        table = table.remove_columns(clash)  # the mapped column replaces a same-named one
    table = table.rename_columns(renames) if renames else table
    missing = [c for c in spec.required if c not in table.column_names]
    if missing:
        raise DataError(f"{ref.name}: missing column(s) {missing} in {describe_source(ref, spec)}; columns: "
                        f"{sorted(table.column_names)}. Map them with `columns: {{field: your_column}}`.")
    return table


def normalize(ref: DatasetRef, form: str, table: Any | None = None, max_examples: int = 5) -> Normalized:
    """Normalise every row into `form` records; bad rows are counted, or raise when strict."""
    spec = get_spec(ref.name)
    if form not in spec.forms:
        raise DataError(f"dataset {ref.name!r} has no {form} form (has: {sorted(spec.forms)})")
    table = load_table(ref) if table is None else table
    fn = spec.forms[form]
    records: dict[int, dict[str, Any]] = {}
    bad: dict[str, list[str]] = defaultdict(list)
    for index, row in enumerate(table):
        row_id = str(row.get(spec.id_column)) if spec.id_column and row.get(spec.id_column) else f"row-{index}"
        try:
            record = fn(row)
        except BadRow as e:
            if ref.strict:
                raise DataError(f"{ref.name} ({describe_source(ref, spec)}): bad row {row_id}: {e}") from e
            bad[str(e)].append(row_id)
            continue
        records[index] = {"id": row_id, **record}
    return Normalized(ref.name, form, describe_source(ref, spec), len(table), records, dict(bad))
