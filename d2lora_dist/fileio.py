"""Atomic file writes, checksums and locks: a reader sees the old file or the new one, never half of one.

Every file and folder written here gets the mode a plain `open()` / `mkdir()` would give it under the
process umask (files 0666 & ~umask, folders 0777 & ~umask): the temporary-file pattern (`mkstemp`,
`mkdtemp`) and safetensors create theirs 0600 / 0700, which on a shared project directory would keep
colleagues from reading adapters and results. `temporary_dir` and `publish_dir` put that right for whole
artifact folders (adapters, LoRA-init factors), `write_atomic` for single files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through `write` into a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; results live on shared storage
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def umask() -> int:
    """The process umask, read without changing it where the kernel says it (/proc, Linux 4.7+): setting it
    to read it would briefly change it for every thread of the process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """What `open(path, "w")` gives a new file under the process umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """What `mkdir` gives a new folder under the process umask."""
    return 0o777 & ~umask()


def temporary_dir(beside: Path) -> Path:
    """A new, empty, hidden folder beside `beside` (created with its parent), to fill and then `publish_dir`."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-", dir=beside.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp makes 0700
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Give every file and folder under `tmp` the umask's modes, then rename it to `final` (which must not
    exist as a non-empty folder: the rename fails then, and nothing is overwritten)."""
    files, dirs = file_mode(), dir_mode()
    os.chmod(tmp, dirs)
    for path in Path(tmp).rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dirs if path.is_dir() else files)
    os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# errno values of a file system that has no flock (some Lustre and NFS mounts)
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


def try_flock(fd: int | IO[Any]) -> bool | None:
    """Take an exclusive flock on an open file without waiting: True when taken, False when another open
    file holds it (this process's included), None when the file system has no flock. The kernel releases
    the lock when the file is closed or its process dies, however it dies."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        return None


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (created with its folder): another process doing the same `what`
    waits, then finds it done. On a file system without flock (some Lustre or NFS mounts) this does not
    lock and says so; the callers' writes are atomic renames, so two writers only repeat the work."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        locked = True
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{what}: another process is on it; waiting for {lock_file}", flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            print(f"{what}: {lock_file.parent} does not support flock ({e.strerror}); going on without the lock",
                  flush=True)
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
