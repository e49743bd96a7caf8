"""The asset cache: a damaged, unmarked or half-written output is found, named and rebuilt
(`d2lora_dist.assets.cache`, through ensure_asset). Every test works on a private cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2lora_dist.assets import MARKER, asset_path, ensure_asset
from d2lora_dist.assets import datasets as asset_datasets
from tests.assets_fixtures import fetch_data, private_copy, rows, session_cache


@pytest.fixture
def private_cache(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = session_cache(tmp_path_factory)
    fetch_data(cache)  # the archives, fetched and verified once
    return private_copy(tmp_path, cache)


def test_corrupted_output_is_named_and_rebuilt(private_cache: Path, capsys: pytest.CaptureFixture) -> None:
    path = ensure_asset("gsm8k", private_cache, progress=False)
    good = path.read_bytes()
    path.write_bytes(good[:1000])
    capsys.readouterr()
    assert ensure_asset("gsm8k", private_cache, progress=False) == path
    out = capsys.readouterr().out
    assert f"output {path} is corrupted" in out and "rebuilding" in out
    assert path.read_bytes() == good


def test_missing_marker_triggers_a_rebuild(private_cache: Path, capsys: pytest.CaptureFixture) -> None:
    path = ensure_asset("alpaca_demo", private_cache, progress=False)
    (path.parent / MARKER).unlink()
    capsys.readouterr()
    ensure_asset("alpaca_demo", private_cache, progress=False)
    assert MARKER in capsys.readouterr().out
    assert (path.parent / MARKER).exists()


def test_interrupted_build_leaves_no_file_at_the_final_path(private_cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_row, calls = asset_datasets._arc_row, []

    def breaks_midway(doc: dict) -> dict:
        calls.append(1)  # row 1000 cannot be serialized: the write stops half-way through the file
        return {"unserializable": object()} if len(calls) == 1000 else real_row(doc)

    monkeypatch.setattr(asset_datasets, "_arc_row", breaks_midway)
    with pytest.raises(TypeError):
        ensure_asset("arc_easy", private_cache, progress=False)
    folder = asset_path("arc_easy", private_cache).parent
    assert list(folder.iterdir()) == []  # neither the file, nor a marker, nor a partial
    monkeypatch.setattr(asset_datasets, "_arc_row", real_row)
    assert len(rows(ensure_asset("arc_easy", private_cache, progress=False))) == 2376
