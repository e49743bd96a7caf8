"""fileio.exclusive: one holder at a time, and no lock (said aloud) where the file system has no flock;
atomic writes on a full disk: one line naming the file, the old file kept, the temporary one removed."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from d2lora_dist import fileio
from tests import disk_fixtures


def test_a_second_holder_waits_until_the_first_is_done(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lock = tmp_path / ".locks" / "key.lock"
    spans: dict[str, tuple[float, float]] = {}
    inside = threading.Event()

    def hold(name: str, seconds: float) -> None:
        with fileio.exclusive(lock, name):
            start = time.monotonic()
            inside.set()
            time.sleep(seconds)
            spans[name] = (start, time.monotonic())

    first = threading.Thread(target=hold, args=("first", 0.6))
    first.start()
    inside.wait(5)
    hold("second", 0.0)
    first.join()
    assert spans["second"][0] >= spans["first"][1]  # it entered only after the first had left
    assert "second: another process is on it; waiting for" in capsys.readouterr().out


def test_without_flock_it_goes_on_unlocked_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    def no_flock(fd: object, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fileio.fcntl, "flock", no_flock)
    ran = []
    with fileio.exclusive(tmp_path / ".locks" / "k.lock", "[lora_init] k"):
        ran.append(True)
    assert ran and "does not support flock (Function not implemented); going on without the lock" in \
        capsys.readouterr().out
    monkeypatch.setattr(fileio.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(OSError, match="denied"), fileio.exclusive(tmp_path / "x.lock", "x"):
        pass  # any other failure is not swallowed


# ---- a full disk (a real tmpfs: tests/disk_fixtures.py) -------------------------------------------------
small_disk = disk_fixtures.small_disk


def test_a_full_disk_names_the_file_and_keeps_the_old_one(small_disk: Path) -> None:
    result = small_disk / "cells" / "c" / "result.json"
    fileio.write_json_atomic(result, {"done": 1})
    disk_fixtures.fill(small_disk)
    with pytest.raises(fileio.DiskFull) as caught:
        fileio.write_json_atomic(result, {"rows": ["x" * 100] * 1000})
    message = str(caught.value)
    assert message.startswith(f"no space left on device writing {result} (needs ~")
    assert f"free on {small_disk} (tmpfs)" in message and "rerun the same command" in message
    assert fileio.read_json(result) == {"done": 1}  # the old file stays as it was
    assert sorted(p.name for p in result.parent.iterdir()) == ["result.json"]  # the temporary file is gone


def test_a_library_write_on_a_full_disk_is_named_by_the_block_that_wrote(small_disk: Path) -> None:
    """torch's writer raises a RuntimeError without errno; inside `writing`, on a full disk, that is DiskFull."""
    import torch

    disk_fixtures.fill(small_disk)
    target = small_disk / "checkpoints"
    with pytest.raises(fileio.DiskFull, match=f"no space left on device writing {target} \\(needs ~4.0 MB"):
        with fileio.writing(target, needs=4 << 20):
            torch.save(torch.zeros(1 << 20), small_disk / "optimizer.pt")
    with pytest.raises(KeyError):  # any other failure stays what it is
        with fileio.writing(target):
            raise KeyError("not a disk problem")
