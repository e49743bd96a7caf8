"""Claims: one process at a time trains a given cell or warm-up of a run directory.

Two runners on one run directory (two `sweep run` in two terminals, a local run beside a Slurm array)
would otherwise train the same cell side by side. Whoever runs a cell or a warm-up (run_cell, run_warmup:
`sweep run`'s workers and launches, Slurm tasks, `adapt`, `warmup`) holds its claim, a lock file under
`<run dir>/locks/`, while it works; the main rank holds it for every rank of a launch. A second runner
either waits for it and then finds the work done (Slurm tasks, `adapt`, `warmup`: `wait`), or is told it
is busy and comes back to it later (`sweep run`'s cells: `skip`, see sweep/pool.py).

The lock is a flock: the kernel releases it when its process dies, however it dies, so a killed run leaves
nothing that blocks. Where the file system has no flock (some Lustre and NFS mounts: flock fails with
ENOSYS/ENOLCK), the claim is a lease file instead, created exclusively (O_EXCL) and renewed every
LEASE_RENEW_S by its holder; a lease not renewed for LEASE_STALE_S belongs to a run that died and is
taken over. (A Lustre mount with `localflock` has node-local flocks that runners on two nodes do not see:
mount it with `flock`, or keep runners on one node.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from d2lora_dist import distributed
from d2lora_dist.fileio import suppress_no_space, try_flock

POLL_S = 5.0  # how often a waiting runner tries again
EXIT_BUSY = 3  # `sweep cell --if-busy skip` found the cell claimed: it did nothing
LEASE_RENEW_S = 30.0
LEASE_STALE_S = 300.0  # > LEASE_RENEW_S by far: a busy file server may delay a renewal


class Busy(RuntimeError):
    """The claim is held by another process (`skip`: the caller comes back to the work later)."""


def holder_text() -> str:
    """Who holds a claim, written into its lock file for the messages of whoever finds it held."""
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    slurm = f", Slurm job {job}{f'_{task}' if task else ''}" if job else ""
    return f"pid {os.getpid()} on {socket.gethostname()}{slurm}, since " \
           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}"


@dataclass
class _Held:
    """A taken claim: the flock's open file, or the lease file and the thread that renews it."""

    fd: int | None = None
    lease: Path | None = None
    renewing: threading.Event | None = None

    def release(self) -> None:
        if self.renewing is not None:
            self.renewing.set()
        if self.lease is not None:
            self.lease.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # releases the flock


def _lease_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".lease")


def _take(lock: Path) -> _Held | None:
    """The claim, or None when another process holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # not truncated: its text names the holder
    try:
        taken = try_flock(fd)
    except BaseException:
        os.close(fd)
        raise
    if taken:
        with suppress_no_space():  # the claim holds without its text; the work itself then meets the full disk
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_text().encode(), 0)
        return _Held(fd=fd)
    os.close(fd)
    return None if taken is False else _take_lease(_lease_path(lock))


def _take_lease(lease: Path) -> _Held | None:
    """The no-flock claim: create the lease file exclusively; take over one its holder stopped renewing."""
    try:
        if time.time() - lease.stat().st_mtime > LEASE_STALE_S:
            print(f"{lease}: not renewed for {LEASE_STALE_S:.0f}s (its run has died); taking it over", flush=True)
            lease.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return None
    try:
        with suppress_no_space():
            os.write(fd, holder_text().encode())
    finally:
        os.close(fd)
    renewing = threading.Event()

    def renew() -> None:
        while not renewing.wait(LEASE_RENEW_S):
            with contextlib.suppress(OSError):
                os.utime(lease)

    threading.Thread(target=renew, daemon=True, name=f"lease {lease.name}").start()
    return _Held(lease=lease, renewing=renewing)


def holder(lock: Path) -> str:
    """Who holds the claim, as its holder wrote it (a lease's text where there is no flock)."""
    for path in (lock, _lease_path(lock)):
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text
    return "another process"


def held_elsewhere(lock: Path) -> str | None:
    """Who holds the claim when another process does (None when nobody does); takes nothing."""
    if not lock.is_file() and not _lease_path(lock).is_file():
        return None
    held = _take(lock)
    if held is None:
        return holder(lock)
    held.release()
    return None


@contextlib.contextmanager
def claimed(lock: Path, what: str, wait: bool) -> Iterator[None]:
    """Hold the claim on `what` while the body runs (the main rank holds it for every rank). Held by another
    process: `wait` -> say so and wait for it (the caller then finds the work done, or, when that process
    failed, does it itself); else raise Busy."""
    distributed.init_process_group()  # the ranks decide together; no-op for one process
    main = distributed.is_main_process()
    held = _take(lock) if main else None
    said = False
    while not distributed.broadcast_object(held is not None):
        if not wait:
            raise Busy(f"{what}: another run is on it ({holder(lock) if main else 'see the main rank'})")
        if main and not said:
            print(f"{what}: another run is on it ({holder(lock)}); waiting for it", flush=True)
            said = True
        time.sleep(POLL_S)
        held = _take(lock) if main else None
    try:
        yield
    finally:
        if held is not None:
            held.release()
