"""Local data files are checked before `datasets` reads them: each bad file is named with its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.config import DatasetRef
from d2lora_dist.data.loading import DataError, normalize
from tests.conftest import write_experiment
from tests.test_cli import _cli

GOOD = [{"id": f"paper-{i}", "abstract": f"We study adapters number {i}.", "title": f"Adapters {i}"}
        for i in range(4)]


def _good_lines() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in GOOD).encode()


# (what the third line is, its bytes, what the error must say about it)
BAD_LINES = {
    "non-UTF-8 byte": (b'{"id": "x", "abstract": "caf\xe9 au lait", "title": "T"}\n',
                       r"line 5: not UTF-8 at byte \d+ \(column 29: byte 0xe9"),
    "JSON array, not an object": (b"[1, 2]\n", r"line 5: a JSON array, not an object"),
    "bare string": (b'"just a string"\n', r"line 5: a JSON string, not an object"),
    "truncated last line": (b'{"id": "p", "abstract": "We st', r"line 5: not valid JSON at column 25 "
                                                                 r"\(Unterminated string.*looks cut off"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_a_bad_line_is_refused_naming_the_file_and_the_line(kind: str, tmp_path: Path) -> None:
    line, said = BAD_LINES[kind]
    path = tmp_path / "titles.jsonl"
    path.write_bytes(_good_lines() + line)
    with pytest.raises(DataError, match=rf"{path}: {said}"):
        normalize(DatasetRef("econ_abstracts", data_files=[str(path)]), "sft")


def test_the_byte_offset_of_a_bad_byte_counts_from_the_start_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "titles.jsonl"
    head = _good_lines()
    path.write_bytes(head + b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match=rf"line 5: not UTF-8 at byte {len(head) + 8} \(column 9: byte 0xff"):
        normalize(DatasetRef("econ_abstracts", data_files=[str(path)]), "sft")


def test_an_empty_file_and_a_blank_one_are_refused(tmp_path: Path) -> None:
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_bytes(b"")
    blank.write_bytes(b"\n\n")
    with pytest.raises(DataError, match=rf"{empty}: empty file \(0 bytes\)"):
        normalize(DatasetRef("econ_abstracts", data_files=[str(empty)]), "sft")
    with pytest.raises(DataError, match=rf"{blank}: no rows \(only blank lines\)"):
        normalize(DatasetRef("econ_abstracts", data_files=[str(blank)]), "sft")


def test_several_bad_files_are_all_named_in_one_error(tmp_path: Path) -> None:
    files = []
    for name, (line, _) in zip(("a", "b", "c"), BAD_LINES.values(), strict=False):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_bytes(_good_lines() + line)
    (tmp_path / "ok.jsonl").write_bytes(_good_lines())
    with pytest.raises(DataError) as caught:
        normalize(DatasetRef("econ_abstracts", data_files=[*map(str, files), str(tmp_path / "ok.jsonl")]), "sft")
    message = str(caught.value)
    assert all(f"{f}: line 5:" in message for f in files) and "ok.jsonl" not in message.split("data file(s):")[1]


def test_a_json_array_file_names_the_item_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "titles.json"
    path.write_text(json.dumps([*GOOD, "a string", 3]))
    with pytest.raises(DataError, match=rf"{path}: item 4: a JSON string.*{path}: item 5: a JSON number"):
        normalize(DatasetRef("econ_abstracts", data_files=[str(path)]), "sft")


def test_what_datasets_reads_still_reads(tmp_path: Path) -> None:
    """A byte order mark, blank lines and CRLF line ends are fine; so is a JSON array of objects."""
    lines = tmp_path / "titles.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + _good_lines().replace(b"\n", b"\r\n") + b"\n\n")
    assert len(normalize(DatasetRef("econ_abstracts", data_files=[str(lines)]), "sft").records) == 4
    array = tmp_path / "titles.json"
    array.write_text(json.dumps(GOOD, indent=1))
    assert len(normalize(DatasetRef("econ_abstracts", data_files=[str(array)]), "sft").records) == 4


def test_a_truncated_parquet_file_is_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "titles.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=rf"{path}: not a readable Parquet file"):
        normalize(DatasetRef("econ_abstracts", data_files=[str(path)]), "sft")


def test_sweep_run_refuses_bad_files_before_any_model_loads(tiny_experiment: dict, tmp_path: Path) -> None:
    """The preflight names every bad file (the task's, the warm-up's) with its line, exits 2, writes nothing."""
    titles, warmup = tmp_path / "titles.jsonl", tmp_path / "warmup.jsonl"
    titles.write_bytes(_good_lines() + b'{"id": "x", "abstract": "caf\xe9"}\n')
    warmup.write_bytes(b"")
    tiny_experiment["tasks"]["titles"]["dataset"]["data_files"] = [str(titles)]
    tiny_experiment["warmup"]["dataset"]["data_files"] = [str(warmup)]
    tiny_experiment["grid"] = [{"task": "titles", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [4]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    done = _cli("sweep", "run", "-c", str(path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"tasks.titles.dataset: cannot read the data file(s): {titles}: line 5: not UTF-8 at byte" in done.stderr
    assert f"warmup.dataset: cannot read the data file(s): {warmup}: empty file" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_rows_the_normaliser_drops_are_named_in_the_output_logs_results_and_manifests(
        tiny_experiment: dict, tiny_data: dict, tmp_path: Path) -> None:
    """A missing, null or numeric title is no error, but `sweep run` says which rows it dropped and why, and
    the cell's log, result.json and adapter manifest record them; so do the warm-up's."""
    rows = [json.loads(line) for line in Path(tiny_data["titles"]).read_text().splitlines()]
    del rows[3]["title"]
    rows[5]["title"], rows[8]["title"] = None, 42
    titles = tmp_path / "titles.jsonl"
    titles.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [json.loads(line) for line in Path(tiny_data["warmup"]).read_text().splitlines()]
    del pairs[2]["chosen"]
    warmup = tmp_path / "warmup.jsonl"
    warmup.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    tiny_experiment["tasks"]["titles"]["dataset"]["data_files"] = [str(titles)]
    tiny_experiment["warmup"]["dataset"]["data_files"] = [str(warmup)]
    tiny_experiment["grid"] = [{"task": "titles", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [4]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    done = _cli("sweep", "run", "-c", str(path), "--slots", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    said = ("3 of 24 rows dropped, not usable as sft records: 2 x missing title (paper-3, paper-5); "
            "1 x title is not text (paper-8)")
    assert f"data: tasks.titles.dataset (sft): econ_abstracts (['{titles}']): {said}" in done.stdout
    assert "data: warmup.dataset: orpo_dpo_mix" in done.stdout and "1 x missing chosen (row-2)" in done.stdout
    run = tmp_path / "runs" / "tiny"
    logs = "".join(p.read_text() for p in (run / "logs").glob("slot*.log"))
    assert logs.count(said) >= 2  # each cell's worker says it again in the cell's log
    expected = {"count": 3, "rows": [{"row": "paper-3", "reason": "missing title"},
                                     {"row": "paper-5", "reason": "missing title"},
                                     {"row": "paper-8", "reason": "title is not text"}]}
    for cell in ("titles-sft-lora-n4-s0", "titles-sft-d2lora-n4-s0"):
        assert json.loads((run / "cells" / cell / "result.json").read_text())["data"]["dropped"] == expected
        assert json.loads((run / "cells" / cell / "adapter" / "manifest.json").read_text())["data"]["dropped"] \
            == expected
    warm = {"count": 1, "rows": [{"row": "row-2", "reason": "missing chosen"}]}
    assert json.loads((run / "warmup" / "result.json").read_text())["data"]["dropped"] == warm
    assert json.loads((run / "warmup" / "adapter" / "manifest.json").read_text())["data"]["dropped"] == warm
