"""fileio.exclusive: one holder at a time, and no lock (said aloud) where the file system has no flock."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from d2lora_dist import fileio


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
