"""Which code produced a result: the git commit of the library's source tree, and whether that tree
had uncommitted changes, or the installed package version when the library does not run from a git
checkout (installed from a wheel). Every result.json records it under `code`."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import d2lora_dist

PACKAGE = "d2lora-dist"
SOURCE_ROOT = Path(d2lora_dist.__file__).resolve().parent.parent  # the checkout, when there is one


def code_version(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """{"version": "git:<12 hex>[+dirty]" or "d2lora-dist==<version>", "commit", "dirty", "package"}.

    `dirty` counts modified tracked files and untracked files git does not ignore: either can change
    what runs. None (commit, dirty) where the source is not a git checkout or git is unavailable.
    """
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit else None
    dirty = None if status is None else bool(status.strip())
    package = _package_version()
    version = f"git:{commit[:12]}{'+dirty' if dirty else ''}" if commit else f"{PACKAGE}=={package}"
    return {"version": version, "commit": commit, "dirty": dirty, "package": package}


def _git(root: Path, *args: str) -> str | None:
    if not (root / ".git").exists():  # a file in a linked worktree, a folder otherwise
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return d2lora_dist.__version__
