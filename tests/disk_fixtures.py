"""A small real file system to fill: a 2 MiB tmpfs mounted for one test.

Mounting needs root (CAP_SYS_ADMIN); elsewhere, or where the mount is refused (a container without the
capability), the tests that use it skip and say why. A real full disk, not a mock: every write the code
under test makes, and every library write inside it, meets ENOSPC exactly as on a full shared disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SIZE = "2m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all but `leave` bytes of the disk's free space with one file (removed to free the space again)."""
    filler = disk / "filler"
    with filler.open("ab") as f:
        free = shutil.disk_usage(disk).free - leave
        try:
            while free > 0:
                f.write(b"\0" * min(free, 1 << 16))
                f.flush()
                free = shutil.disk_usage(disk).free - leave
        except OSError:  # the last pages: the disk is full
            pass
    return filler
