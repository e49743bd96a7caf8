"""Check local data files before `datasets` reads them, so that a bad file is named with its line.

`datasets` reports a non-UTF-8 byte, an empty file or a broken JSON line as a generic generation
error (or a pyarrow traceback) without the file or the line. One pass over each file finds them
first: the file, the line and (for encoding errors) the byte offset and column, for every bad file
at once. A file that passed is remembered by size and modification time, since preflight and the
phase read the same files several times.
"""

from __future__ import annotations

import json
from pathlib import Path

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which datasets skips
MAX_PER_FILE = 5  # bad lines named per file; the rest are counted
_PASSED: set[tuple[str, int, int]] = set()


def file_problems(files: list[str]) -> list[str]:
    """Every problem of every file (one line each, naming the file and the line); empty when all are readable."""
    problems: list[str] = []
    for name in files:
        path = Path(name)
        if path.is_dir():
            continue  # a saved dataset: load_from_disk checks its own files
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _PASSED:
            continue
        found = _problems_of(path, stat.st_size)
        if found:
            problems += [f"{path}: {p}" for p in found]
        else:
            _PASSED.add(key)
    return problems


def _problems_of(path: Path, size: int) -> list[str]:
    if size == 0:
        return ["empty file (0 bytes); it has no rows"]
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _json_problems(path)
    if suffix == ".parquet":
        return _parquet_problems(path)
    if suffix == ".csv":
        return _text_problems(path)
    return []


def _json_problems(path: Path) -> list[str]:
    """JSON Lines (one object per line), or, for a file that opens with `[`, one JSON array of objects (the two
    layouts `datasets` reads; a file that is one multi-line JSON object is left to it, as pandas reads those)."""
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    if head.startswith(b"["):
        return _json_array_problems(path)
    problems: list[str] = []
    bad = rows = 0
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            start = len(BOM) if number == 1 and raw.startswith(BOM) else 0
            problem = _line_problem(raw[start:], offset + start)
            offset += len(raw)
            if problem is None:
                rows += raw.strip() != b""
                continue
            bad += 1
            if len(problems) < MAX_PER_FILE:
                problems.append(f"line {number}: {problem}")
    if bad and head.startswith(b"{") and _one_json_document(path):
        return []
    if bad > len(problems):
        problems.append(f"... and {bad - len(problems)} more bad line(s)")
    if not bad and not rows:
        problems.append("no rows (only blank lines)")
    return problems


def _one_json_document(path: Path) -> bool:
    try:
        json.loads(path.read_bytes().removeprefix(BOM).decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False
    return True


def _line_problem(raw: bytes, offset: int) -> str | None:
    """What is wrong with one JSON line (None when it is an object or blank)."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return _encoding_problem(raw, e.start, offset, e.reason)
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; the line looks cut off" if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated") else ""
        return f"not valid JSON at column {e.colno} ({e.msg}{hint})"
    if not isinstance(value, dict):
        return f"a JSON {_kind(value)}, not an object; each line must be one row {{\"field\": value, ...}}"
    return None


def _encoding_problem(line: bytes, start: int, line_offset: int, reason: str) -> str:
    """`start`: the bad byte's index in `line`, which begins at byte `line_offset` of the file."""
    column = len(line[:start].decode("utf-8", errors="replace")) + 1
    return (f"not UTF-8 at byte {line_offset + start} (column {column}: byte 0x{line[start]:02x}, {reason}); "
            "save the file as UTF-8")


def _json_array_problems(path: Path) -> list[str]:
    raw = path.read_bytes().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        return [f"line {line}: {_encoding_problem(raw[line_start:], e.start - line_start, line_start, e.reason)}"]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"line {e.lineno}: not valid JSON at column {e.colno}: {e.msg}"]
    items = [i for i, item in enumerate(value) if not isinstance(item, dict)]
    problems = [f"item {i}: a JSON {_kind(value[i])}, not an object" for i in items[:MAX_PER_FILE]]
    if len(items) > MAX_PER_FILE:
        problems.append(f"... and {len(items) - MAX_PER_FILE} more items that are not objects")
    if not value:
        problems.append("an empty JSON array; it has no rows")
    return problems


def _text_problems(path: Path) -> list[str]:
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return [f"line {number}: {_encoding_problem(raw, e.start, offset, e.reason)}"]
            offset += len(raw)
    return []


def _parquet_problems(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)  # the footer only: cheap, and what a truncated file lacks
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        return [f"not a readable Parquet file ({type(e).__name__}: {e})"]
    return []


def _kind(value: object) -> str:
    return {str: "string", list: "array", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
