"""Where every cell stands: the run directory joined with what Slurm says about its jobs.

The run directory is the truth for "done" (result.json exists); Slurm is asked only about
the job ids recorded in slurm/jobs.json, with `scontrol -o show job ID` (one line per
array task; works without slurmdbd, unlike sacct). A cell is in the array of the latest
submission that listed its index.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from d2lora_dist.config import Experiment
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.grid import Cell, plan_cells
from d2lora_dist.sweep.plan import load_plan
from d2lora_dist.sweep.preemption import PREEMPTED_EXIT_CODE
from d2lora_dist.sweep.slurm import log_path, read_records

# One `scontrol -o` record: {"JobState": "RUNNING", ...}; None = Slurm does not know the job.
JobQuery = Callable[[str], "list[dict[str, str]] | None"]

PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass(frozen=True)
class CellStatus:
    index: int
    cell_id: str
    state: str  # done | running | pending | failed | cancelled | not submitted | unknown
    job: str | None = None  # "ARRAY_TASK", e.g. "13_2"
    exit_code: int | None = None
    log: str | None = None
    detail: str = ""

    def describe(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


def cell_status(exp: Experiment, layout: RunLayout, query: JobQuery | None = None) -> list[CellStatus]:
    """One row per planned cell, in plan (array index) order."""
    query = query or scontrol_show_job
    cells = load_plan(layout) if layout.plan_file.exists() else plan_cells(exp)
    records = read_records(layout)
    cache: dict[str, list[dict[str, str]] | None] = {}

    def ask(job_id: str) -> list[dict[str, str]] | None:
        if job_id not in cache:
            cache[job_id] = query(job_id)
        return cache[job_id]

    return [_one(i, cell, layout, _latest_record(records, i), ask) for i, cell in enumerate(cells)]


def _latest_record(records: Sequence[dict[str, Any]], index: int) -> dict[str, Any] | None:
    """The latest submission of this cell, as the array (and warm-up) job that hold it."""
    for rec in reversed(records):
        for group in _groups(rec):
            if group["array"] and index in group["indices"]:
                return {**rec, "indices": group["indices"], "jobs": {"array": group["array"],
                                                                     "warmup": group["warmup"]}}
    return None


def _groups(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A submission's arrays: one (with its one warm-up), or one per warm-up run (`groups`)."""
    if "groups" in rec:
        return rec["groups"]
    return [{"indices": rec["indices"], "array": rec["jobs"].get("array"), "warmup": rec["jobs"].get("warmup")}]


def _one(i: int, cell: Cell, layout: RunLayout, rec: dict[str, Any] | None,
         ask: Callable[[str], list[dict[str, str]] | None]) -> CellStatus:
    started = layout.cell_checkpoints(cell.id).exists()
    array_id = rec["jobs"]["array"] if rec else None
    job = f"{array_id}_{i}" if array_id else None
    if layout.cell_result(cell.id).exists():
        return CellStatus(i, cell.id, "done", job)
    if rec is None:
        return CellStatus(i, cell.id, "not submitted", detail="has checkpoints" if started else "")
    task = _task_record(ask(array_id), i)
    if task is None:
        return CellStatus(i, cell.id, "unknown", job, detail=f"Slurm no longer knows job {job}"
                          + ("; has checkpoints" if started else "") + "; resubmit with --only-failed")
    return _from_task(i, cell.id, job, task, started, rec, layout, ask)


def _from_task(i: int, cell_id: str, job: str, task: dict[str, str], started: bool, rec: dict[str, Any],
               layout: RunLayout, ask: Callable[[str], list[dict[str, str]] | None]) -> CellStatus:
    state, reason = task.get("JobState", "?"), task.get("Reason", "None")
    code, sig = _exit_code(task)
    restarts = int(task.get("Restarts", "0") or 0)
    log = _task_log(task, layout, rec["jobs"]["array"], i)
    notes = [f"restarts {restarts}" if restarts else "", "has checkpoints" if started else ""]
    if "DependencyNeverSatisfied" in reason:
        blame = _warmup_blame(rec, layout, ask) or f"a dependency failed ({task.get('Dependency', '?')})"
        return CellStatus(i, cell_id, "cancelled" if state == "CANCELLED" else "blocked", job,
                          detail=blame)
    if state in PENDING:
        why = _pending_why(task, rec, ask)
        return CellStatus(i, cell_id, "pending", job, detail=_join([why, *notes]))
    if state in RUNNING:
        return CellStatus(i, cell_id, "running", job, log=log,
                          detail=_join([f"{state.lower()} on {task.get('NodeList', '?')}", *notes]))
    if state == "COMPLETED":
        return CellStatus(i, cell_id, "failed", job, code, log,
                          _join(["exited 0 but wrote no result.json", f"log {log}"]))
    if state in FAILED or state == "CANCELLED":
        how = f"{state}, exit {code}" + (f", signal {sig}" if sig else "")
        if code == PREEMPTED_EXIT_CODE:
            how += " (preempted, and the requeue failed)"
        return CellStatus(i, cell_id, "cancelled" if state == "CANCELLED" else "failed", job, code, log,
                          _join([how, *notes, f"log {log}"]))
    return CellStatus(i, cell_id, "unknown", job, code, log, f"Slurm state {state} ({reason})")


def _pending_why(task: dict[str, str], rec: dict[str, Any],
                 ask: Callable[[str], list[dict[str, str]] | None]) -> str:
    reason, warmup = task.get("Reason", "None"), rec["jobs"].get("warmup")
    # Reason is "None" until the scheduler's first look; the dependency is already there
    if warmup and re.search(rf":{warmup}\b", task.get("Dependency", "")):
        rows = ask(warmup) or [{}]
        return f"waiting for warm-up job {warmup} ({rows[0].get('JobState', 'unknown to Slurm')})"
    if reason == "BeginTime" and task.get("Restarts", "0") != "0":
        return "requeued, eligible again shortly (Slurm delays requeued jobs)"
    return f"reason {reason}"


def _warmup_blame(rec: dict[str, Any], layout: RunLayout,
                  ask: Callable[[str], list[dict[str, str]] | None]) -> str | None:
    """'warm-up job J failed (exit X), log PATH' when the warm-up is why the array died."""
    warmup = rec["jobs"].get("warmup")
    rows = ask(warmup) if warmup else None
    if not rows:
        return None
    w = rows[0]
    code, sig = _exit_code(w)
    log = w.get("StdErr") or str(log_path(layout, "warmup", warmup))
    what = "failed" if w.get("JobState") != "TIMEOUT" else "timed out"
    return f"warm-up job {warmup} {what} (exit {code}" + (f", signal {sig}" if sig else "") + f"), log {log}"


def _exit_code(job: dict[str, str]) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"(\d+):(\d+)", job.get("ExitCode", ""))
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _task_log(task: dict[str, str], layout: RunLayout, array_id: str, i: int) -> str:
    # scontrol expands %A_%a only for tasks that have their own record
    err = task.get("StdErr", "")
    return err if err and "%" not in err and "4294967294" not in err else str(
        log_path(layout, "array", array_id, i))


def _join(parts: Sequence[str]) -> str:
    return ", ".join(p for p in parts if p)


# ---------------------------------------------------------------- Slurm queries


def scontrol_show_job(job_id: str) -> list[dict[str, str]] | None:
    """`scontrol -o show job ID` as records; None when Slurm does not know the job."""
    try:
        proc = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                              text=True, timeout=60)
    except FileNotFoundError as e:
        raise RuntimeError("scontrol not found: `sweep status` needs the Slurm client tools "
                           "(run it on a login node)") from e
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise RuntimeError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    return [parse_scontrol(line) for line in proc.stdout.splitlines() if line.strip()]


def parse_scontrol(line: str) -> dict[str, str]:
    """One `scontrol -o` line -> {key: value}; values may contain spaces and '='."""
    return {m.group(1): m.group(2) for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", line)}


def _task_record(rows: list[dict[str, str]] | None, index: int) -> dict[str, str] | None:
    """The record covering array index `index`: its own, or the pending meta record ("2-7%2")."""
    for row in rows or []:
        if index in _expand(row.get("ArrayTaskId", "")):
            return row
    return None


def _expand(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split("%")[0].split(","):
        if re.fullmatch(r"\d+", part):
            out.add(int(part))
        elif m := re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?", part):
            out.update(range(int(m.group(1)), int(m.group(2)) + 1, int(m.group(3) or 1)))
    return out


# ---------------------------------------------------------------- table


def format_status_table(rows: Sequence[CellStatus]) -> str:
    """A fixed-width table, one line per cell, then the counts per state."""
    head = ("#", "cell", "state", "job", "exit", "detail")
    body = [(str(r.index), r.cell_id, r.state, r.job or "-", "-" if r.exit_code is None else str(r.exit_code),
             r.detail) for r in rows]
    widths = [max(len(x[k]) for x in [head, *body]) for k in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in [head, *body]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(line.rstrip() for line in lines)

