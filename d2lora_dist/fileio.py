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
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from d2lora_dist.errors import InputError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 2**20  # bytes: a file system with less free than this counts as full after a failed write


class DiskFull(InputError):
    """A write found no space left (or the quota used up); the message names the path and the space.
    Nothing a user can fix in the input, but a clean stop: free space and rerun the same command."""


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], needs: int | None = None) -> Path:
    """Write through `write` into a temporary file beside `path`, then rename it into place. A full disk stops
    with DiskFull naming `path` (and the `needs` bytes, where known); the temporary file is removed and the
    old `path`, if any, stays as it was."""
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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in NO_SPACE:
            raise DiskFull(no_space_message(path, e, needs)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def writing(path: Path, needs: int | None = None) -> Iterator[None]:
    """Run a block that writes under `path` (a phase's checkpoints, a cell): a full disk anywhere in it (a
    library's own write included) stops with DiskFull naming `path`, instead of the library's traceback."""
    try:
        yield
    except DiskFull:
        raise  # a write inside already named its file
    except Exception as e:
        error = no_space_error(e, path)
        if error is None:
            raise
        raise DiskFull(no_space_message(path, error, needs)) from e


@contextlib.contextmanager
def suppress_no_space() -> Iterator[None]:
    """For a log line: on a full disk it is lost rather than stopping what writes it."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise


def no_space_error(error: BaseException | None, path: Path | None = None) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in `error`'s chain (causes and contexts), if there is one. Libraries that
    write through their own code say it in words (safetensors: "os error 28"), or not at all: torch's writer
    raises RuntimeError ("file write failed", "iostream error", "unexpected pos"), taken as a full disk when
    the file system of `path` (the block's own folder) has less than LOW_SPACE left."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error
        text = str(error)
        for code in NO_SPACE:
            if os.strerror(code) in text or f"os error {code})" in text:
                return OSError(code, os.strerror(code))
        if isinstance(error, RuntimeError) and path is not None and _below(free_bytes(path), LOW_SPACE):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        error = error.__cause__ or error.__context__
    return None


def no_space_message(path: Path | str | None, error: OSError, needs: int | None = None) -> str:
    """One line: which path found no space, how much it needed (where known) and how much is free where."""
    what = "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
    named = path or error.filename
    space = [f"needs ~{human_size(needs)}" if needs else "", _free_space(Path(named)) if named else ""]
    detail = ", ".join(s for s in space if s)
    where = f" writing {named}" if named else " (the error names no file)"
    return (f"{what}{where}{f' ({detail})' if detail else ''}; free space and rerun the same command "
            "(what is done is kept)")


def full_disk(path: Path) -> str | None:
    """After a failed launch that wrote under `path`: the no-space line when its file system is (almost) full
    (less than LOW_SPACE free), else None."""
    if not _below(free_bytes(path), LOW_SPACE):
        return None
    return no_space_message(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system that holds `path` (its nearest existing folder)."""
    existing = _existing(path)
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def _free_space(path: Path) -> str:
    free = free_bytes(path)
    return "" if free is None else f"{human_size(free)} free on {_mount_of(_existing(path))}"


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_of(path: Path) -> str:
    """The mount point that holds `path`, with its device where /proc/mounts names it."""
    point = path if path.is_dir() else path.parent
    while not os.path.ismount(point) and point != point.parent:
        point = point.parent
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(point):
                return f"{point} ({fields[0]})"
    return str(point)


def human_size(size: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size // scale} {unit}"
    return f"{size} B"


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
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data), needs=len(data))


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


def _below(free: int | None, limit: int) -> bool:
    return free is not None and free < limit
