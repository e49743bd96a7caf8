"""The code version a result records: a git checkout's commit (dirty or not), else the package version."""

from __future__ import annotations

import subprocess
from pathlib import Path

from d2lora_dist import __version__
from d2lora_dist.provenance import code_version


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_a_checkout_records_its_commit_and_whether_it_is_dirty(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "module.py").write_text("x = 1\n")
    git(tmp_path, "add", "module.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    commit = git(tmp_path, "rev-parse", "HEAD")
    clean = code_version(tmp_path)
    assert clean["version"] == f"git:{commit[:12]}" and clean["commit"] == commit and clean["dirty"] is False
    (tmp_path / "module.py").write_text("x = 2\n")  # a tracked change
    assert code_version(tmp_path)["version"] == f"git:{commit[:12]}+dirty"
    git(tmp_path, "checkout", "-q", "module.py")
    (tmp_path / "new.py").write_text("y = 1\n")  # an untracked file that would be imported
    assert code_version(tmp_path)["dirty"] is True


def test_outside_a_checkout_the_package_version_is_recorded(tmp_path):
    version = code_version(tmp_path)  # no .git: as installed from a wheel
    assert version["commit"] is None and version["dirty"] is None
    assert version["version"] == f"d2lora-dist=={version['package']}" and version["package"] == __version__
