"""Slurm executor: the sweep as three jobs rendered by pure functions, then a thin submit.

    warm-up (multi-node capable) --afterok--> cell array (task i = cell i of plan.json)
                                  --afterany--> report

With several warm-up runs (named `warmups`, or a LoRA-init axis) each warm-up is its own job and
the cells are split into one array per warm-up they start from (plus one for vanilla cells, which
wait for nothing); each array waits only for its own warm-up, so a failed warm-up holds back its
own cells alone, and the report waits for every array. Within that, cells whose methods get different
launches (SFT fits one GPU, DPO needs two under ZeRO-3) go into one array per launch, each task asking for
its own method's GPUs rather than the most demanding method's.

Rendering (`render_warmup`, `render_cell_array`, `render_report`, `array_spec`) is pure:
experiment + layout (+ cell indices) -> script text, tested against recorded files in
tests/fixtures/slurm/. The templates are plain text in slurm/ (shipped with the package,
see d2lora_dist/shipped.py) with `@name` placeholders
(`@` rather than `$`: the scripts are full of shell variables). Dependencies are given on
the sbatch command line, not in the scripts, because job ids exist only at submission;
the scripts stay valid for a manual `sbatch`. `submit` writes the scripts, calls
`sbatch --parsable` and appends a record to slurm/jobs.json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Any

from d2lora_dist.config import VANILLA_GROUP, Experiment
from d2lora_dist.errors import InputError
from d2lora_dist.fileio import write_text_atomic
from d2lora_dist.layout import RunLayout
from d2lora_dist.shipped import for_command, shipped_path
from d2lora_dist.strategy import Launch, cell_launch, requested_strategy, warmup_launch
from d2lora_dist.sweep.grid import Cell, WarmupRun, needs_warmup, plan_cells
from d2lora_dist.sweep.plan import freeze_plan, load_plan
from d2lora_dist.sweep.preemption import PREEMPTED_EXIT_CODE

WARMUP_SCRIPT = "warmup.sbatch"
ARRAY_SCRIPT = "cell_array.sbatch"
REPORT_SCRIPT = "report.sbatch"


class _ShellTemplate(Template):
    delimiter = "@"


# ---------------------------------------------------------------- paths and commands


def logs_dir(layout: RunLayout) -> Path:
    return layout.slurm_dir / "logs"


def marker_dir(layout: RunLayout) -> Path:
    return layout.slurm_dir / "preempted"


def jobs_file(layout: RunLayout) -> Path:
    return layout.slurm_dir / "jobs.json"


def log_path(layout: RunLayout, step: str, job_id: str, index: int | None = None, ext: str = "err") -> Path:
    """The log Slurm writes for a job (the patterns of `_log_lines`)."""
    name = f"cell-{job_id}_{index}" if step == "array" else f"{step}-{job_id}"
    return _abs(logs_dir(layout)) / f"{name}.{ext}"


def _abs(path: Path) -> Path:
    # absolute, not resolved: keep the shared-storage path the user gave (no symlink games)
    return path.absolute()


def _q(path: Path) -> str:
    return shlex.quote(str(_abs(path)))


def warmup_command(layout: RunLayout, run: WarmupRun | None = None) -> str:
    """`d2lora warmup`; `run` names one warm-up run (several are submitted as jobs of their own)."""
    one = f" --warmup {shlex.quote(run.key)}" if run is not None else ""
    return f"d2lora warmup -c {_q(layout.experiment_file)}{one}"


def cell_command(layout: RunLayout) -> str:
    # $SLURM_ARRAY_TASK_ID expands in the step: the plan index of this task's cell
    return f"d2lora sweep cell -c {_q(layout.experiment_file)} --index $SLURM_ARRAY_TASK_ID"


def report_command(layout: RunLayout) -> str:
    return f"d2lora report -c {_q(layout.experiment_file)}"


# ---------------------------------------------------------------- rendering (pure)


def index_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (Slurm's array index syntax)."""
    idx = sorted(set(indices))
    if not idx:
        raise ValueError("no array indices: nothing to run")
    parts, start, prev = [], idx[0], idx[0]
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def array_spec(indices: Sequence[int], max_parallel: int) -> str:
    """Plan indices -> `--array` value: index ranges and the `%M` throttle."""
    if max_parallel < 1:
        raise InputError(f"slurm.max_parallel: must be >= 1, got {max_parallel}")
    return f"{index_ranges(indices)}%{max_parallel}"


def _resource_lines(exp: Experiment, nodes: int, gpus: bool, share: int | None = None) -> list[str]:
    """The allocation; `share` = GPUs of a right-sized cell (cpus and memory scaled to that share of a node)."""
    s = exp.slurm
    gpus_per_node, cpus, mem = s.gpus_per_node, s.cpus_per_task, s.mem
    if share is not None and s.gpus_per_node:
        gpus_per_node, cpus, mem = share, _scaled_cpus(exp, share), _scaled_mem(exp, share)
    lines = [f"--partition={s.partition}" if s.partition else None,
             f"--account={s.account}" if s.account else None,
             f"--qos={s.qos}" if s.qos else None,
             f"--nodes={nodes}",
             "--ntasks-per-node=1",  # one launcher per node; it starts the node's ranks
             f"--gpus-per-node={gpus_per_node}" if gpus and gpus_per_node else None,
             f"--cpus-per-task={cpus}" if cpus else None,
             f"--mem={mem}" if mem else None,
             f"--time={s.time}",
             f"--constraint={s.constraint}" if gpus and s.constraint else None,
             "--exclusive" if gpus and s.whole_node else None]
    return [line for line in lines if line]


def _scaled_cpus(exp: Experiment, share: int) -> int | None:
    s = exp.slurm
    return max(1, s.cpus_per_task * share // s.gpus_per_node) if s.cpus_per_task else None


_MEM = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.IGNORECASE)
_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2, "": 1}  # Slurm reads a bare number as MB


def _scaled_mem(exp: Experiment, share: int) -> str | None:
    s = exp.slurm
    if not s.mem:
        return None
    m = _MEM.match(s.mem.strip())
    if m is None or float(m.group(1)) == 0:
        raise InputError(f"slurm.mem: {s.mem!r} cannot be split into a share of a node for a cell on {share} of "
                         f"{s.gpus_per_node} GPUs (\"0\" asks for all of a node's memory, which no other task could "
                         "share); give an amount such as 960G (cells get share/gpus_per_node of it) or set "
                         "slurm.whole_node: true")
    mib = int(float(m.group(1)) * _MIB[m.group(2).upper()] * share / s.gpus_per_node)
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def _preemptible_lines(exp: Experiment) -> list[str]:
    _check_signal_time(exp)
    return ["--requeue",
            f"--signal=B:USR1@{exp.slurm.signal_seconds}",
            "--open-mode=append"]  # a requeued run appends to, not truncates, the log


def _log_lines(layout: RunLayout, stem: str) -> list[str]:
    base = _abs(logs_dir(layout))
    return [f"--output={base}/{stem}.out", f"--error={base}/{stem}.err"]


def _header(exp: Experiment, lines: list[str], launch: Launch | None = None, extra: list[str] | None = None) -> str:
    """`#SBATCH` lines, then the extra ones (`extra`, else slurm.extra_sbatch), verbatim."""
    extra = [x if x.startswith("#SBATCH") else f"#SBATCH {x}"
             for x in (exp.slurm.extra_sbatch if extra is None else extra)]
    # after every #SBATCH line: why this many GPUs and this launch (absent for the named files)
    note = [f"# launch: {launch.choice.reason}"] if launch is not None and launch.choice is not None else []
    return "\n".join([f"#SBATCH {x}" for x in lines] + extra + note)


def _setup(exp: Experiment) -> str:
    return "\n".join(exp.slurm.setup) if exp.slurm.setup else "# (no slurm.setup lines)"


def _srun_options(exp: Experiment, share: int | None = None) -> str:
    # srun does not inherit --cpus-per-task from sbatch since Slurm 22.05: say it again
    cpus = _scaled_cpus(exp, share) if share is not None and exp.slurm.gpus_per_node else exp.slurm.cpus_per_task
    return f" --cpus-per-task={cpus}" if cpus else ""


_EXPORT = re.compile(r"^\s*(?:export\s+)?(HF_HOME|HF_HUB_CACHE)=(\S+)\s*$")


def compute_node_hub_cache(exp: Experiment) -> tuple[str, str]:
    """The Hugging Face hub cache the jobs read, and where that comes from. The scripts set no HF_*
    variable themselves: a job gets sbatch's copy of the submitting shell's environment, then
    `slurm.setup`, whose last `export HF_HUB_CACHE=` / `HF_HOME=` line wins (HF_HUB_CACHE over HF_HOME)."""
    found: dict[str, str] = {}
    for line in exp.slurm.setup:
        match = _EXPORT.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip("'\"")
    for var, origin in ((found.get("HF_HUB_CACHE"), "HF_HUB_CACHE in slurm.setup"),
                        (found.get("HF_HOME") and f"{found['HF_HOME']}/hub", "HF_HOME in slurm.setup"),
                        (os.environ.get("HF_HUB_CACHE"), "HF_HUB_CACHE of this shell"),
                        (os.environ.get("HF_HOME") and f"{os.environ['HF_HOME']}/hub", "HF_HOME of this shell")):
        if var:
            return os.path.expanduser(os.path.expandvars(var)), origin
    return os.path.expanduser("~/.cache/huggingface/hub"), "the default, no HF_HOME set"


def _launch(exp: Experiment, lc: Launch, command: str, multinode: bool) -> str:
    """The per-node step: launcher (or the plain command) with USR1 ignored by the launcher."""
    # the user's file as given, else the shipped copy (absolute: the job may run anywhere)
    config = shlex.quote(for_command(lc.accelerate_config)) if lc.accelerate_config else ""
    config += "".join(f" {shlex.quote(flag)}" for flag in lc.accelerate_flags())
    pin = ""
    if lc.accelerate_config is None:
        launched = command
        if exp.slurm.gpus_per_node:
            # a plain process (one rank) on a node share or whole node of several GPUs: it sees the first
            # only, else transformers would train with DataParallel on all of them at N x the planned batch
            pin = ("CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}; "
                   "export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}; ")
    elif multinode:
        # accelerate's --num_processes is the total over all machines; ours is per node
        launched = (f"accelerate launch --config_file {config}"
                    " --num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID"
                    " --main_process_ip $MAIN_PROCESS_IP --main_process_port $MAIN_PROCESS_PORT"
                    f" --num_processes $((SLURM_NNODES * {lc.num_processes}))"
                    # "standard" = torchrun per node; the default "pdsh" would ssh to the others
                    " --deepspeed_multinode_launcher standard"
                    f" --no_python {command}")
    else:
        # port 0: accelerate picks a free one, so cells sharing a node do not collide
        launched = (f"accelerate launch --config_file {config}"
                    f" --num_machines 1 --num_processes {lc.num_processes}"
                    f" --main_process_port {exp.launch.main_process_port} --no_python {command}")
    # `trap "" USR1` is inherited through exec: the launcher ignores USR1, ranks handle it
    return shlex.quote(f'trap "" USR1; {pin}exec {launched}')


def _preemption_block(layout: RunLayout) -> str:
    text = shipped_path("slurm", "preemption.sh").read_text().rstrip("\n")
    return _ShellTemplate(text).substitute(preempted_exit_code=PREEMPTED_EXIT_CODE,
                                           marker_dir=_q(marker_dir(layout)))


def _main_port(exp: Experiment) -> str:
    if exp.launch.main_process_port:
        return f"MAIN_PROCESS_PORT={exp.launch.main_process_port}"
    # all nodes must agree on the port: pick a free one here, on the first node
    return ("MAIN_PROCESS_PORT=$(python3 -c 'import socket; s = socket.socket(); "
            's.bind(("", 0)); print(s.getsockname()[1])\')')


def _render(name: str, **values: str) -> str:
    return _ShellTemplate(shipped_path("slurm", name).read_text()).substitute(values)


def render_warmup(exp: Experiment, layout: RunLayout, command: str | None = None, run: WarmupRun | None = None) -> str:
    """warmup.sbatch: one srun task per node, each starting `accelerate launch` for its ranks.
    `run`: one of several warm-up runs (its own job, named after it)."""
    nodes = exp.slurm.nodes
    launch = warmup_launch(exp, nodes, name=run.name if run is not None else None)
    if nodes > 1 and launch.accelerate_config is None:
        raise InputError(f"slurm.nodes: {nodes} nodes need launch.accelerate_config (a plain command "
                         "would run the whole warm-up once per node); set it or use slurm.nodes=1")
    job = "warmup" if run is None else f"warmup-{run.key}"
    header = _header(exp, [f"--job-name=d2lora-{exp.name}-{job}",
                           *_resource_lines(exp, nodes, gpus=True), *_preemptible_lines(exp),
                           *_log_lines(layout, "warmup-%j")], launch)
    return _render(WARMUP_SCRIPT, experiment=exp.name, header=header, setup=_setup(exp),
                   preemption=_preemption_block(layout), main_port=_main_port(exp),
                   srun_options=_srun_options(exp),
                   step=_launch(exp, launch, command or warmup_command(layout, run), multinode=True))


def array_launch(exp: Experiment, cells: Sequence[Cell]) -> tuple[Launch, int | None]:
    """The one launch of an array job and the GPUs its tasks ask for (None = a whole node's).

    With a strategy, each task asks for the GPUs its memory estimate needs, so tasks share nodes
    (slurm.whole_node: true gives each a node). One array has one request: it is sized for its
    most demanding method (the cells of a method all need the same).
    """
    packed = not exp.slurm.whole_node and requested_strategy(exp) is not None
    launch = cell_launch(exp, [c.method for c in cells], packed)
    return launch, (launch.num_processes if packed and launch.choice is not None else None)


def launch_groups(exp: Experiment, cells: Sequence[Cell], indices: Sequence[int]) -> list[tuple[str, list[int]]]:
    """The indices split by the launch their array tasks get, each method's own (array_launch): one array per
    distinct launch, so that a cell that fits one GPU neither waits for nor holds the GPUs another method's
    cells need. [("", indices)] when they all get the same; else each group is labelled by its launch
    (`ddp-x1`, `zero3-x2`)."""
    by_method = {m: array_launch(exp, [next(c for c in cells if c.method == m)])
                 for m in sorted({cells[i].method for i in indices})}
    groups: dict[tuple, tuple[str, list[int]]] = {}
    for i in indices:
        launch, share = by_method[cells[i].method]
        key = (launch.accelerate_config, launch.deepspeed_config, launch.num_processes, share)
        groups.setdefault(key, (launch.short().replace(" ", "-"), []))[1].append(i)
    if len(groups) == 1:
        return [("", list(indices))]
    ordered = [groups[key] for key in sorted(groups, key=lambda k: (k[2], groups[k][0]))]  # fewest GPUs first
    seen: dict[str, int] = {}
    named = []
    for label, part in ordered:  # two launches that print alike still get their own script and job names
        seen[label] = seen.get(label, 0) + 1
        named.append((label if seen[label] == 1 else f"{label}-{seen[label]}", part))
    return named


def render_cell_array(exp: Experiment, layout: RunLayout, indices: Sequence[int],
                      command: str | None = None, cells: Sequence[Cell] | None = None, group: str | None = None,
                      max_parallel: int | None = None) -> str:
    """cell_array.sbatch: array task i runs cell i of the frozen plan (`cells`; default the experiment's).
    `group`: the warm-up key (or "vanilla") and/or the launch of one of several arrays, in its job name;
    `max_parallel`: its throttle, when slurm.max_parallel is shared out among several arrays."""
    cells = plan_cells(exp) if cells is None else cells
    launch, share = array_launch(exp, [cells[i] for i in indices if 0 <= i < len(cells)] or cells)
    header = _header(exp, [f"--job-name=d2lora-{exp.name}-cells" + (f"-{group}" if group else ""),
                           f"--array={array_spec(indices, max_parallel or exp.slurm.max_parallel)}",
                           *_resource_lines(exp, 1, gpus=True, share=share), *_preemptible_lines(exp),
                           *_log_lines(layout, "cell-%A_%a")], launch)
    return _render(ARRAY_SCRIPT, experiment=exp.name, plan_file=str(_abs(layout.plan_file)),
                   header=header, setup=_setup(exp), preemption=_preemption_block(layout),
                   srun_options=_srun_options(exp, share),
                   step=_launch(exp, launch, command or cell_command(layout), multinode=False))


def render_report(exp: Experiment, layout: RunLayout, command: str | None = None) -> str:
    """report.sbatch: one CPU task after the array (no GPUs, not requeued), with the modest resources of
    slurm.report rather than the cells' node."""
    r, s = exp.slurm.report, exp.slurm
    lines = [f"--job-name=d2lora-{exp.name}-report",
             *(f"--{key}={value}" for key, value in (("partition", r.partition), ("account", s.account),
                                                     ("qos", s.qos)) if value),
             "--nodes=1", "--ntasks-per-node=1", f"--cpus-per-task={r.cpus_per_task}", f"--mem={r.mem}",
             f"--time={r.time}", *_log_lines(layout, "report-%j")]
    header = _header(exp, lines, extra=r.extra_sbatch)
    return _render(REPORT_SCRIPT, experiment=exp.name, header=header, setup=_setup(exp),
                   command=command or report_command(layout))


def _check_signal_time(exp: Experiment) -> None:
    limit = _slurm_seconds(exp.slurm.time)
    if limit is not None and exp.slurm.signal_seconds >= limit:
        raise InputError(f"slurm.signal_seconds: {exp.slurm.signal_seconds} s is not shorter than "
                         f"slurm.time={exp.slurm.time!r}: the checkpoint signal would never come in time")


def _slurm_seconds(value: str) -> int | None:
    """Seconds of a Slurm time ([D-]HH:MM:SS, MM:SS, MM, D-HH[:MM]); None if not understood."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    if b is not None:
        return a * 60 + b
    return a * 60


def unfinished_indices(layout: RunLayout, cells: Sequence[Cell]) -> list[int]:
    """Plan indices of cells without result.json (the --only-failed array)."""
    return [i for i, c in enumerate(cells) if not layout.cell_result(c.id).exists()]


# ---------------------------------------------------------------- submission


@dataclass(frozen=True)
class Step:
    """One job to submit: its script and what it waits for ((kind, step names) or None)."""

    name: str  # warmup | array | report; warmup:<key> | array:<key> with several warm-up runs; array:<launch>,
    # array:<key>-<launch> when a warm-up's cells get different launches
    script: Path
    text: str
    after: tuple[str, tuple[str, ...]] | None = None
    indices: tuple[int, ...] = ()  # an array's plan indices


@dataclass
class SubmitResult:
    steps: list[Step]
    indices: list[int]
    commands: list[list[str]]
    jobs: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    failed: dict[str, str] | None = None  # {step, error} of an sbatch that refused its job

    def describe(self, scripts: bool = False) -> str:
        out = []
        # strict=False: after a failed sbatch there are fewer commands than steps
        for step, argv in zip(self.steps, self.commands, strict=False):
            if scripts:
                out += [f"# ---- {step.script}", step.text.rstrip("\n"), ""]
            job = f"  -> job {self.jobs[step.name]}" if step.name in self.jobs else ""
            out.append(f"{shlex.join(argv)}{job}")
        out += [f"# {name} not submitted: {why}" for name, why in self.skipped.items()]
        return "\n".join(out)


def plan_submission(exp: Experiment, layout: RunLayout, cells: Sequence[Cell], indices: Sequence[int],
                    commands: dict[str, str] | None = None) -> tuple[list[Step], dict[str, str]]:
    """The jobs to submit for these plan indices, and why any stage is left out."""
    commands = commands or {}
    skipped: dict[str, str] = {}
    steps: list[Step] = []
    if not indices:
        return [], {"array": "every cell has result.json", "report": "no new cells"}
    if _one_warmup(exp, cells):
        return _single_warmup_steps(exp, layout, cells, indices, commands)
    d = layout.slurm_dir
    groups: dict[WarmupRun | None, list[int]] = {}
    for i in indices:
        groups.setdefault(cells[i].warmup_run, []).append(i)
    for run in sorted(r for r in groups if r is not None):
        if layout.warmup_result_of(run.key).exists():
            skipped[f"warmup:{run.key}"] = f"done ({layout.warmup_result_of(run.key)} exists)"
        else:
            steps.append(Step(f"warmup:{run.key}", d / f"warmup-{run.key}.sbatch",
                              render_warmup(exp, layout, commands.get("warmup"), run)))
    trained = {s.name for s in steps}
    arrays = []
    for run in sorted(groups, key=lambda r: (r is not None, r or WarmupRun(""))):
        key = run.key if run is not None else VANILLA_GROUP
        after = ("afterok", (f"warmup:{key}",)) if f"warmup:{key}" in trained else None
        for label, part in launch_groups(exp, cells, groups[run]):
            name = f"{key}-{label}" if label else key
            arrays.append(PlannedArray(f"array:{name}", d / f"cell_array-{name}.sbatch", name, after, tuple(part)))
    return _with_arrays_and_report(exp, layout, cells, commands, steps, _finals_after(cells, arrays)), skipped


def _one_warmup(exp: Experiment, cells: Sequence[Cell]) -> bool:
    """An experiment with one `warmup` and PEFT's default LoRA init: the three jobs it always had."""
    return exp.warmups is None and all(c.warmup_run in (None, WarmupRun("warmup")) for c in cells)


def _single_warmup_steps(exp: Experiment, layout: RunLayout, cells: Sequence[Cell], indices: Sequence[int],
                         commands: dict[str, str]) -> tuple[list[Step], dict[str, str]]:
    skipped: dict[str, str] = {}
    steps: list[Step] = []
    d = layout.slurm_dir
    if layout.warmup_result.exists():
        skipped["warmup"] = f"done ({layout.warmup_result} exists)"
    elif not needs_warmup([cells[i] for i in indices]):
        skipped["warmup"] = "no submitted cell uses init d2lora"
    else:
        steps.append(Step("warmup", d / WARMUP_SCRIPT, render_warmup(exp, layout, commands.get("warmup"))))
    after = ("afterok", ("warmup",)) if steps else None
    arrays = [PlannedArray(f"array:{label}", d / f"cell_array-{label}.sbatch", label, after, tuple(part)) if label
              else PlannedArray("array", d / ARRAY_SCRIPT, None, after, tuple(part))
              for label, part in launch_groups(exp, cells, indices)]  # one array, unless launches differ
    return _with_arrays_and_report(exp, layout, cells, commands, steps, _finals_after(cells, arrays)), skipped


@dataclass(frozen=True)
class PlannedArray:
    """An array step before its script is rendered: `group` names it in the job name."""

    name: str
    script: Path
    group: str | None
    after: tuple[str, tuple[str, ...]] | None
    indices: tuple[int, ...]


def _finals_after(cells: Sequence[Cell], arrays: list[PlannedArray]) -> list[PlannedArray]:
    """A tuned block's selection cells and final cells (sweep/tuning.py) each in an array of their own, the
    final one after the selection one (afterok: a failed selection holds its final cells back, as a failed
    warm-up holds back its cells). Arrays without tuned cells stay as they are."""
    out: list[PlannedArray] = []
    for array in arrays:
        parts = {stage: tuple(i for i in array.indices if _stage(cells[i]) == stage) for stage in ("", "select", "final")}
        if not parts["select"] and not parts["final"]:
            out.append(array)
            continue
        if parts[""]:
            out.append(replace(array, indices=parts[""]))
        after = array.after
        for stage in ("select", "final"):
            if not parts[stage]:
                continue
            staged = _staged(array, stage, after, parts[stage])
            out.append(staged)
            kind, names = after or ("afterok", ())
            after = (kind, (*names, staged.name))
    return _after_every_selection(cells, out)


def _after_every_selection(cells: Sequence[Cell], arrays: list[PlannedArray]) -> list[PlannedArray]:
    """A final array also waits for the select arrays of other groups that hold its cells' selection cells:
    with a warm-up per seed, the final cell of seed 1 is chosen by selection cells of tune seed 0, which
    train from warm-up 0 and so sit in that warm-up's select array."""
    def arm(cell: Cell) -> tuple:
        return cell.tune, cell.task, cell.method, cell.init, cell.n, cell.warmup, cell.lora_init

    holding: dict[tuple, set[str]] = {}
    for array in arrays:
        for i in array.indices:
            if cells[i].selects:
                holding.setdefault(arm(cells[i]), set()).add(array.name)
    out = []
    for array in arrays:
        needed = sorted({name for i in array.indices if cells[i].tuned and not cells[i].selects
                         for name in holding.get(arm(cells[i]), ())})
        kind, names = array.after or ("afterok", ())
        missing = tuple(n for n in needed if n not in names)
        out.append(replace(array, after=(kind, (*names, *missing))) if missing else array)
    return _dependencies_first(out)


def _dependencies_first(arrays: list[PlannedArray]) -> list[PlannedArray]:
    """The arrays in their order, except that one is submitted only after the arrays it waits for (sbatch
    needs their job ids): a final array of seed 0 may wait for a select array of tune seed 1."""
    names = {a.name for a in arrays}
    placed: list[PlannedArray] = []
    waiting = list(arrays)
    while waiting:
        done = {a.name for a in placed}
        ready = next(a for a in waiting if all(n in done or n not in names for n in (a.after or ("", ()))[1]))
        placed.append(ready)
        waiting.remove(ready)
    return placed


def _stage(cell: Cell) -> str:
    return "select" if cell.selects else "final" if cell.tuned else ""


def _staged(array: PlannedArray, stage: str, after: tuple[str, tuple[str, ...]] | None,
            indices: tuple[int, ...]) -> PlannedArray:
    """The array's `stage` cells: `array:<group>-<stage>` in `cell_array-<group>-<stage>.sbatch`."""
    stem = array.script.name.removesuffix(".sbatch")
    name = f"{array.name}-{stage}" if ":" in array.name else f"array:{stage}"
    return PlannedArray(name, array.script.with_name(f"{stem}-{stage}.sbatch"),
                        f"{array.group}-{stage}" if array.group else stage, after, indices)


def _with_arrays_and_report(exp: Experiment, layout: RunLayout, cells: Sequence[Cell], commands: dict[str, str],
                            steps: list[Step], arrays: list[PlannedArray]) -> list[Step]:
    """`steps` + the arrays' steps + the report after all of them. Arrays that start together (the launches
    of one warm-up's cells) share slurm.max_parallel, as Slurm throttles each array on its own; arrays that
    wait for different warm-ups start at different times and each keep the whole throttle."""
    together: dict[tuple | None, list[int]] = {}
    for i, array in enumerate(arrays):
        together.setdefault(array.after, []).append(i)
    throttles = [0] * len(arrays)
    for members in together.values():
        shares = share_throttle(exp.slurm.max_parallel, [len(arrays[i].indices) for i in members]) \
            if len(members) > 1 else [exp.slurm.max_parallel]
        for i, share in zip(members, shares, strict=True):
            throttles[i] = share
    for array, throttle in zip(arrays, throttles, strict=True):
        text = render_cell_array(exp, layout, array.indices, commands.get("cell"), cells, array.group, throttle)
        steps.append(Step(array.name, array.script, text, array.after, array.indices))
    steps.append(Step("report", layout.slurm_dir / REPORT_SCRIPT, render_report(exp, layout, commands.get("report")),
                      ("afterany", tuple(a.name for a in arrays))))
    return steps


def share_throttle(max_parallel: int, sizes: Sequence[int]) -> list[int]:
    """max_parallel split over arrays of these many cells: evenly, no array given more than its cells, what
    one cannot use going to the others; 1 each when there are more arrays than max_parallel (Slurm has no
    throttle across arrays, so then the cap is exceeded)."""
    if max_parallel < 1:
        raise InputError(f"slurm.max_parallel: must be >= 1, got {max_parallel}")
    shares = [0] * len(sizes)
    left, open_ = max_parallel, [i for i, size in enumerate(sizes) if size > 0]
    while left > 0 and open_:
        each = max(1, left // len(open_))
        for i in list(open_):
            give = min(each, sizes[i] - shares[i], left)
            shares[i] += give
            left -= give
            if shares[i] >= sizes[i]:
                open_.remove(i)
            if left == 0:
                break
    return [max(1, share) for share in shares]


def sbatch_argv(step: Step, jobs: dict[str, str]) -> list[str]:
    """`sbatch --parsable [--dependency=KIND:ID] SCRIPT`; unknown ids print as <name-job-id>."""
    argv = ["sbatch", "--parsable"]
    if step.after:
        kind, names = step.after
        argv.append(f"--dependency={kind}:" + ":".join(jobs.get(on, f"<{on}-job-id>") for on in names))
    return [*argv, str(_abs(step.script))]


def submit(exp: Experiment, layout: RunLayout, dry_run: bool = False, only_failed: bool = False,
           commands: dict[str, str] | None = None) -> SubmitResult:
    """Freeze the plan, write the scripts, sbatch warm-up -> array -> report, record job ids.

    `commands` overrides the step commands ({"warmup"|"cell"|"report": shell text}), for tests.
    A dry run prints the scripts and sbatch lines and writes nothing.
    """
    cells = _plan_for(exp, layout, dry_run)
    indices = unfinished_indices(layout, cells) if only_failed else list(range(len(cells)))
    steps, skipped = plan_submission(exp, layout, cells, indices, commands)
    result = SubmitResult(steps, indices, [], skipped=skipped, dry_run=dry_run)
    if dry_run:
        result.commands = [sbatch_argv(s, {}) for s in steps]
        print(result.describe(scripts=True))
        return result
    for path in (logs_dir(layout), marker_dir(layout)):  # Slurm does not create log directories
        path.mkdir(parents=True, exist_ok=True)
    try:
        for step in steps:
            write_text_atomic(step.script, step.text)
            argv = sbatch_argv(step, result.jobs)
            result.commands.append(argv)
            try:
                result.jobs[step.name] = _sbatch(argv)
            except SbatchFailed as e:
                result.failed = {"step": step.name, "error": str(e)}
                raise SbatchFailed(_failure_line(layout, step, e, result)) from e
    finally:  # record what was submitted even when a later sbatch fails
        if result.jobs:
            _append_record(layout, result, only_failed)
    return result


class SbatchFailed(InputError):
    """`sbatch` refused a job (a partition, account or limit Slurm does not accept) or is not there."""


def _failure_line(layout: RunLayout, step: Step, error: SbatchFailed, result: SubmitResult) -> str:
    """One line: which job sbatch refused and why, and the jobs already submitted, to cancel or keep."""
    kind = {"warmup": "warm-up", "array": "cell array", "report": "report"}[step.name.split(":")[0]]
    label = f" {step.name.split(':', 1)[1]}" if ":" in step.name else ""
    if result.jobs:
        done = ", ".join(f"{name} {job}" for name, job in result.jobs.items())
        already = (f"already submitted: {done} (recorded in {jobs_file(layout)}; `scancel "
                   f"{' '.join(result.jobs.values())}` cancels them, or fix the cause and submit again)")
    else:
        already = "nothing was submitted"
    return f"sweep submit: the {kind} job{label} was not submitted: {error}; {already}"


def _plan_for(exp: Experiment, layout: RunLayout, dry_run: bool) -> list[Cell]:
    if not dry_run:  # idempotent; refuses an experiment that differs from the frozen one
        return freeze_plan(exp, layout)
    return load_plan(layout) if layout.plan_file.exists() else plan_cells(exp)  # writes nothing


def _sbatch(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise SbatchFailed(f"`{argv[0]}` not found on PATH: sweep submit runs on a Slurm login node "
                           "(`sweep run` runs the sweep on this machine)") from e
    job = proc.stdout.strip().split(";")[0]  # --parsable prints "ID" or "ID;CLUSTER"
    if proc.returncode != 0 or not job:
        said = " ".join(proc.stderr.split()) or "(nothing on stderr)"
        raise SbatchFailed(f"`{shlex.join(argv)}` exited {proc.returncode}: {said}")
    return job


def _append_record(layout: RunLayout, result: SubmitResult, only_failed: bool) -> None:
    """Append this submission to jobs.json; earlier records are never rewritten."""
    records = read_records(layout)
    array = any(s.name.startswith("array") for s in result.steps)
    names = ("warmup", "array", "report") if any(s.name == "array" for s in result.steps) else \
        tuple(s.name for s in result.steps)
    record = {
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "only_failed": only_failed,
        "indices": result.indices,
        "array": index_ranges(result.indices) if array else None,
        "jobs": {name: result.jobs.get(name) for name in names},
        "skipped": result.skipped,
        "commands": result.commands,
    }
    if result.failed:  # the last command is the one sbatch refused: its job has no id
        record["failed"] = result.failed
    if "array" not in names:  # one array per warm-up: which cells each array (and its warm-up) holds
        record["groups"] = [{"indices": list(s.indices), "array": result.jobs.get(s.name),
                             "warmup": result.jobs.get(s.after[1][0]) if s.after else None}
                            for s in result.steps if s.name.startswith("array:")]
    records.append(record)
    write_text_atomic(jobs_file(layout), json.dumps(records, indent=1) + "\n")


def read_records(layout: RunLayout) -> list[dict[str, Any]]:
    path = jobs_file(layout)
    return json.loads(path.read_text()) if path.exists() else []
