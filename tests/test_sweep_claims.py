"""Claims: two runners on one run directory never train the same cell or warm-up at once, a claim of a run
that died blocks nothing, and without flock a lease file does the claiming."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from d2lora_dist.sweep import claims
from tests import disk_fixtures
from tests.conftest import write_experiment
from tests.test_cli import REPO, _cli

HOLD = """
import sys, time
from pathlib import Path
from d2lora_dist.sweep.claims import claimed
with claimed(Path(sys.argv[1]), "holder", wait=False):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(lock: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds the claim on `lock` for `seconds` (returns once it holds it)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_two_sweep_runs_started_together_train_every_cell_and_the_warmup_once(tiny_experiment: dict,
                                                                             tmp_path: Path) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 4]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    # every optimizer step waits a little, so that the two runs overlap on every phase
    env = os.environ | {"PYTHONPATH": str(REPO), "D2LORA_TEST_STEP_DELAY_S": "0.5"}
    command = [sys.executable, "-m", "d2lora_dist.cli", "sweep", "run", "-c", str(path), "--slots", "1"]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    logs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n=====\n".join(log[-3000:] for log in logs)
    both = "\n".join(logs)
    run_dir = tmp_path / "runs" / "tiny"
    cells = sorted(p.name for p in (run_dir / "cells").iterdir())
    assert cells == ["math-none-d2lora-n0-s0", "math-none-lora-n0-s0", "math-sft-d2lora-n4-s0", "math-sft-lora-n4-s0"]
    # a phase that trains prints its launch once as it starts; every cell prints its result once
    trained = re.findall(r"^\[([\w@+.-]+)\] launch: ", both, flags=re.M)
    assert sorted(trained) == ["math-sft-d2lora-n4-s0", "math-sft-lora-n4-s0", "warmup"], trained
    finished = re.findall(r"^\[([\w@+.-]+)\] done -> ", both, flags=re.M)
    assert sorted(finished) == cells, finished
    assert all((run_dir / "cells" / c / "result.json").is_file() for c in cells)
    assert (run_dir / "warmup" / "result.json").is_file() and (run_dir / "report" / "results.md").is_file()
    # the second run said what it found: the warm-up the first was training, and cells it was on
    assert "warm-up warmup: another run is on it (pid " in both and "; waiting for it" in both
    assert "another run is on it" in both.replace("warm-up warmup: another run is on it", "")
    assert "failed" not in both.lower()


def test_a_claimed_cell_is_skipped_by_sweep_runs_launches_and_waited_for_by_adapt(tiny_experiment: dict,
                                                                                 tmp_path: Path) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora"], "n": [4]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    lock = run_dir / "locks" / "cells" / "math-sft-lora-n4-s0.lock"
    holder = _hold(lock, 600)
    log = tmp_path / "adapt.log"
    try:
        skipped = _cli("sweep", "cell", "-c", str(path), "--cell", "math-sft-lora-n4-s0", "--if-busy", "skip")
        assert skipped.returncode == claims.EXIT_BUSY, skipped.stderr[-2000:]
        assert f"another run is on it (pid {holder.pid} on " in skipped.stdout and "skipped" in skipped.stdout
        assert not (run_dir / "cells" / "math-sft-lora-n4-s0").exists()  # nothing done
        with log.open("w") as out:
            adapt = subprocess.Popen([sys.executable, "-m", "d2lora_dist.cli", "adapt", "-c", str(path), "--task",
                                      "math", "--method", "sft", "--init", "lora", "--n", "4"], cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while "waiting for it" not in log.read_text() and adapt.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2 * claims.POLL_S)
        assert adapt.poll() is None and not (run_dir / "cells" / "math-sft-lora-n4-s0").exists()  # still waits
    finally:
        holder.kill()  # the holder dies: its claim goes with it
        holder.wait()
    assert adapt.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"another run is on it (pid {holder.pid} on " in log.read_text()
    assert (run_dir / "cells" / "math-sft-lora-n4-s0" / "result.json").is_file()


def test_the_claim_of_a_killed_run_blocks_nothing(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "cells" / "c.lock"
    holder = _hold(lock, 600)
    assert claims.held_elsewhere(lock) == claims.holder(lock) and f"pid {holder.pid} on " in claims.holder(lock)
    with pytest.raises(claims.Busy, match=f"pid {holder.pid}"), claims.claimed(lock, "c", wait=False):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert claims.held_elsewhere(lock) is None
    with claims.claimed(lock, "c", wait=False):
        assert claims.held_elsewhere(lock) is not None  # held here now: another open file sees it taken


def test_without_flock_a_lease_file_claims_and_a_stale_one_is_taken_over(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "try_flock", lambda fd: None)  # a file system without flock
    monkeypatch.setattr(claims, "LEASE_RENEW_S", 0.2)
    lock = tmp_path / "locks" / "warmups" / "w.lock"
    lease = lock.with_name("w.lock.lease")
    inside, leave = threading.Event(), threading.Event()

    def first() -> None:
        with claims.claimed(lock, "w", wait=False):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(10) and lease.is_file()
    os.utime(lease, (time.time() - 100, time.time() - 100))
    time.sleep(0.6)
    assert time.time() - lease.stat().st_mtime < 5  # its holder renews it
    with pytest.raises(claims.Busy, match=f"pid {os.getpid()}"), claims.claimed(lock, "w", wait=False):
        pass
    leave.set()
    thread.join()
    assert not lease.exists()  # given back at the end
    lease.write_text("pid 1 on a node that died")
    os.utime(lease, (time.time() - claims.LEASE_STALE_S - 1,) * 2)
    with claims.claimed(lock, "w", wait=False):
        assert f"pid {os.getpid()}" in lease.read_text()


small_disk = disk_fixtures.small_disk


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "lease"])
def test_a_claim_taken_on_a_full_disk_holds_and_is_given_back(small_disk: Path, flock: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On a full disk the holder's text cannot be written: the claim still holds while its work runs (and meets
    the full disk itself), and it is given back afterwards; a claim left held would make the next runner call
    its own failed cell "busy"."""
    if not flock:
        monkeypatch.setattr(claims, "try_flock", lambda fd: None)
    lock = small_disk / "locks" / "cells" / "c.lock"
    lock.parent.mkdir(parents=True)
    disk_fixtures.fill(small_disk)
    with claims.claimed(lock, "c", wait=False):
        assert claims.held_elsewhere(lock) is not None
    assert claims.held_elsewhere(lock) is None
    with claims.claimed(lock, "c", wait=False):  # and it can be taken again
        pass
