"""A real single-node Slurm cluster on localhost for the test session (fixture `local_slurm`).

munged (as user munge, own key and socket), slurmctld and slurmd run under one temporary
base directory on their own free ports, so they do not touch a system Slurm. The node
advertises 4 CPUs (SlurmdParameters=config_overrides) so a few array tasks run at once.
Needs root and the Debian packages slurmctld slurmd slurm-client munge; without the
binaries the tests skip. Measured facts behind the settings: shared/notes/local-slurm.md.

Use from a test module (assigned, not imported by name, so ruff sees no redefinition
when a test takes the fixture as a parameter):

    from tests import slurm_cluster

    local_slurm = slurm_cluster.local_slurm  # the session cluster
    cluster = slurm_cluster.cluster  # the same, with every job cancelled after each test
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from d2lora_dist.sweep.status import parse_scontrol

BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue",
            "scancel", "sinfo")
ADVERTISED_CPUS = 4
# A requeued job becomes eligible cred_expire + 1 s later (default 120): 10 keeps the
# preemption tests short while leaving time to start the batch steps here.
CRED_EXPIRE = 10
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "SIGNALING"}


@dataclass
class LocalSlurm:
    base: Path
    conf: Path
    node: str
    ports: tuple[int, int]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    munged_pid: int | None = None
    start_seconds: float = 0.0

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}\n"
                               f"(cluster logs under {self.base}/log)")
        return proc

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol -o show job ID` records (one per array task); [] when unknown."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return [parse_scontrol(x) for x in proc.stdout.splitlines() if x.strip()]

    def states(self, job_id: str) -> list[str]:
        return [r.get("JobState", "?") for r in self.jobs(job_id)]

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float = 60,
                   interval: float = 0.2) -> float:
        """Poll until predicate() holds; returns the seconds it took."""
        t0 = time.monotonic()
        while not predicate():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"waited {timeout} s for {what}; squeue:\n"
                                   f"{self.run('squeue', '-t', 'all', check=False).stdout}"
                                   f"(cluster logs under {self.base}/log)")
            time.sleep(interval)
        return time.monotonic() - t0

    def wait_finished(self, *job_ids: str, timeout: float = 90) -> float:
        """Until none of the jobs (every array task) is pending or running."""
        return self.wait_until(f"jobs {job_ids} to finish", lambda: all(
            st and not (set(st) & ACTIVE) for st in (self.states(j) for j in job_ids)), timeout)

    def queued_ids(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        return sorted(set(out))

    def cancel_all(self, timeout: float = 30) -> None:
        ids = self.queued_ids()
        if ids:
            self.run("scancel", *ids, check=False)
            self.wait_until("cancelled jobs to leave the queue", lambda: not self.queued_ids(), timeout)


# ---------------------------------------------------------------- start / stop


def _bin(name: str) -> str | None:
    # daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if _bin(b) is None]


def _free_ports(n: int) -> tuple[int, ...]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # held together so the n ports differ
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


def _conf_text(base: Path, node: str, ports: tuple[int, int]) -> str:
    mem_mb = int(int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 1024 * 0.9)
    return f"""\
ClusterName=d2loratest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket,cred_expire={CRED_EXPIRE}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1
DependencyParameters=kill_invalid_depend
ReturnToService=2
MinJobAge=3600
KillWait=5
MailProg=/bin/true
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
PlugStackConfig={base}/etc/plugstack.conf
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={base}/log/jobcomp.txt
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={ADVERTISED_CPUS} Sockets=1 CoresPerSocket={ADVERTISED_CPUS} \
ThreadsPerCore=1 RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _start_munged(base: Path) -> int:
    mdir = base / "munge"
    mdir.mkdir()
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(mdir, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    mdir.chmod(0o711)  # clients of any uid reach the socket, only munge lists the directory
    sock = mdir / "munge.socket"
    subprocess.run(["runuser", "-u", "munge", "--", _bin("munged"), f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
                    f"--seed-file={mdir}/munged.seed"], check=True, timeout=30)  # daemonizes
    _poll(lambda: (mdir / "munged.pid").exists() and _munge_ok(sock), 10, "munged to answer")
    return int((mdir / "munged.pid").read_text())


def _munge_ok(sock: Path) -> bool:
    cred = subprocess.run(["munge", "-S", str(sock), "-n"], capture_output=True)
    return cred.returncode == 0 and subprocess.run(["unmunge", "-S", str(sock)], input=cred.stdout,
                                                   capture_output=True).returncode == 0


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"local Slurm: timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _daemon(cluster: LocalSlurm, name: str, argv: list[str]) -> None:
    log = open(cluster.base / "log" / f"{name}.out", "w")  # stays open as long as the daemon runs
    # setsid: the daemons must not get the terminal's or pytest's signals
    cluster.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=cluster.env,
                                           start_new_session=True)


def start_local_slurm(base: Path) -> LocalSlurm:
    """Start munged, slurmctld and slurmd under `base`; on failure stop what was started."""
    t0 = time.monotonic()
    for sub in ("etc", "state", "spool", "run", "log"):
        (base / sub).mkdir(parents=True)
    node = socket.gethostname().split(".")[0]
    cluster = LocalSlurm(base, base / "etc" / "slurm.conf", node, _free_ports(2))
    cluster.conf.write_text(_conf_text(base, node, cluster.ports))
    (base / "etc" / "plugstack.conf").write_text("")
    try:
        _start_daemons(cluster)
    except BaseException:
        stop_local_slurm(cluster)
        raise
    cluster.start_seconds = time.monotonic() - t0
    return cluster


def _start_daemons(cluster: LocalSlurm) -> None:
    cluster.munged_pid = _start_munged(cluster.base)
    _daemon(cluster, "slurmctld", [_bin("slurmctld"), "-D", "-c", "-f", str(cluster.conf)])
    _poll(lambda: "is UP" in cluster.run("scontrol", "ping", check=False).stdout, 20, "slurmctld (scontrol ping)")
    _daemon(cluster, "slurmd", [_bin("slurmd"), "-D", "-f", str(cluster.conf), "-N", cluster.node])
    _poll(lambda: _node_idle(cluster), 30, "the node to be idle")
    # Arrays and dependent jobs wait for the main scheduler's first pass (about 3 s after
    # slurmctld starts); waiting here keeps the first test from paying for it.
    slog = cluster.base / "log" / "slurmctld.log"
    _poll(lambda: slog.exists() and "SchedulerParameters=" in slog.read_text(), 20, "the main scheduler")


def _node_idle(cluster: LocalSlurm) -> bool:
    state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
    if state.startswith(("down", "drain", "inval")):
        cluster.run("scontrol", "update", f"nodename={cluster.node}", "state=resume", check=False)
    return state in ("idle", "mixed", "allocated")


def _alive(pid: int) -> bool:
    # `kill -0` succeeds on zombies (PID 1 here may reap late): read the state instead
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def _stop_pid(pid: int, popen: subprocess.Popen | None = None) -> None:
    if not _alive(pid):
        return
    os.kill(pid, 15)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            break
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, 9)
    if popen is not None:
        popen.wait(timeout=10)


def stop_local_slurm(cluster: LocalSlurm) -> None:
    try:
        if "slurmctld" in cluster.procs:
            cluster.cancel_all()
    finally:
        for name in ("slurmd", "slurmctld"):
            if name in cluster.procs:
                _stop_pid(cluster.procs[name].pid, cluster.procs[name])
        pidfile = cluster.base / "munge" / "munged.pid"
        if cluster.munged_pid is None and pidfile.exists():  # started, but never answered
            cluster.munged_pid = int(pidfile.read_text())
        if cluster.munged_pid:
            _stop_pid(cluster.munged_pid)


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[LocalSlurm]:
    """A running single-node cluster; SLURM_CONF is exported for the session."""
    missing = _missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge binaries not installed ({', '.join(missing)}): apt-get install -y "
                    "--no-install-recommends slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        raise RuntimeError("the local Slurm fixture runs slurmd/slurmctld as root and munged as user "
                           "munge: run the slurm tests as root (e.g. in the CI container)")
    # Not pytest's tmp_path: its 0700 parents would keep user munge from its own socket.
    base = Path(tempfile.mkdtemp(prefix="d2lora-slurm-"))
    base.chmod(0o755)
    old_conf = os.environ.get("SLURM_CONF")
    cluster = None
    try:
        cluster = start_local_slurm(base)
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        if cluster is not None:
            stop_local_slurm(cluster)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if not os.environ.get("D2LORA_KEEP_SLURM"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cluster(local_slurm: LocalSlurm) -> Iterator[LocalSlurm]:
    """The session cluster, with every job cancelled after the test (a failed test leaves none)."""
    yield local_slurm
    local_slurm.cancel_all()


# ---------------------------------------------------------------- test experiments

_TRAIN = {"learning_rate": 1.0e-4, "epochs": 1, "global_batch_size": 8}


def experiment_dict(name: str, output_dir: str, **slurm: object) -> dict:
    """A small valid experiment: task math, sft for lora and d2lora, n=8, seeds 0 and 1 (4 cells)."""
    return {
        "name": name,
        "output_dir": output_dir,
        "model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"},
        "warmup": {"dataset": {"name": "orpo_dpo_mix"}, "train": dict(_TRAIN)},
        "tasks": {"math": {"dataset": {"name": "math_step_dpo"}, "suites": ["gsm8k"]}},
        "suites": {"gsm8k": {"kind": "gsm8k", "dataset": {"name": "gsm8k"}}},
        "methods": {"sft": dict(_TRAIN)},
        "grid": [{"task": "math", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [8], "seeds": [0, 1]}],
        "slurm": dict(slurm),
    }
