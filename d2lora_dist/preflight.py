"""One preflight before any model loads: every check that needs data, the launch or Slurm.

The experiment schema finds unknown keys, wrong types and cross-field mistakes (config.validate);
an entry's source carries them here so that they come in one round with these. What is left needs
more than the file: how many usable rows each dataset really has against n + holdout, how many
items each suite has against its limit, whether the world size can produce each phase's global
batch, whether the base model is on this machine and has the LoRA target modules, whether the
finished warm-ups a cell starts from are intact, and whether the Slurm request can hold the
launch. Every entry (warmup, adapt, eval, sweep plan/run/cell/submit) calls `preflight`, which
reports all problems at once, naming the key and the file, before anything expensive starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from d2lora_dist.config import Experiment, TrainSettings
from d2lora_dist.config_source import ConfigSource, held_problems
from d2lora_dist.errors import InputError, UnknownName
from d2lora_dist.schedule import batch_problem
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.grid import Cell

_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$|^(\d+)$")


class PreflightError(ConfigError):
    """Problems found before any model loads; the message lists every one."""


@dataclass(frozen=True)
class Checks:
    """What an entry is about to do, so that exactly its checks run."""

    cells: tuple[Cell, ...] = ()
    warmup: bool = False
    suites: tuple[tuple[str, str | None], ...] = ()  # (suite, the task whose holdout it may evaluate)
    cell_world_size: int | None = None  # ranks a cell trains on; None = not known here (skip)
    warmup_world_size: int | None = None
    slurm: bool = False
    warmups: tuple[str, ...] = ()  # the warm-ups (names) to check when `warmup`; empty = every one

    def warmup_names(self, exp: Experiment) -> list[str]:
        if not self.warmup:
            return []
        return list(self.warmups) or [c.warmup for c in self.cells if c.warmup] or list(exp.warmup_configs())


def for_cells(exp: Experiment, cells: Iterable[Cell], world_size: int | None, warmup_world_size: int | None,
              slurm: bool = False) -> Checks:
    """What running these cells needs: their rows, their suites, their batches (and the warm-up's)."""
    from d2lora_dist.sweep.grid import cell_suites, needs_warmup

    cells = tuple(cells)
    suites = tuple((s, c.task) for c in cells if c.task in exp.tasks for s in cell_suites(exp, c))
    return Checks(cells, needs_warmup(list(cells)), suites, world_size, warmup_world_size, slurm)


def for_sweep(exp: Experiment, cells: Iterable[Cell], slurm: bool) -> Checks:
    """A whole sweep as its executor will launch it: cells on one node, the warm-up on slurm.nodes."""
    per_node = exp.launch.num_processes
    return for_cells(exp, cells, per_node, per_node * (exp.slurm.nodes if slurm else 1), slurm)


def preflight(exp: Experiment, checks: Checks, source: str | ConfigSource) -> None:
    """Every problem at once: the field problems `source` still holds (config.read_experiment) and those
    of the data, the model's files, existing adapters, the launch and Slurm. With field problems the
    experiment is only partly built: a check that trips over a broken field adds nothing (that field's
    own problem names it) and the others still run."""
    pending = held_problems(source)
    guarded = bool(pending)
    problems = pending + _collect([lambda: _request_problems(exp, checks)], guarded)
    if len(problems) > len(pending):  # the checks below look the requested task and method up
        raise PreflightError(problems, source)
    dropped: dict[str, str] = {}
    units: list[Callable[[], list[str]]] = [
        lambda: _row_problems(exp, checks, dropped), lambda: _suite_problems(exp, checks, dropped),
        lambda: _batch_problems(exp, checks), lambda: model_problems(exp), lambda: _adapter_problems(exp, checks)]
    if checks.slurm:
        units.append(lambda: slurm_problems(exp))
    problems += _collect(units, guarded)
    if problems:
        raise PreflightError(problems, source)
    _say_dropped(dropped)


def _say_dropped(dropped: dict[str, str]) -> None:
    """Rows the normalisers refused are not an error, but the run says which (and records them: subsets.Subset)."""
    from d2lora_dist.distributed import is_main_process

    if is_main_process():
        for key, line in dropped.items():
            print(f"data: {key}: {line}", flush=True)


def _collect(units: list[Callable[[], list[str]]], guarded: bool) -> list[str]:
    problems: list[str] = []
    for unit in units:
        if not guarded:  # a well-built experiment: any exception is a bug and stays loud
            problems += unit()
            continue
        try:
            problems += unit()
        except InputError as e:
            problems.append(str(e))
        except (TypeError, AttributeError, KeyError, ValueError):
            pass  # a broken field, already named by its own problem
    return problems


# ---- the request -----------------------------------------------------------------------------
def _request_problems(exp: Experiment, checks: Checks) -> list[str]:
    """A cell named on the command line (`adapt`) must exist in the experiment."""
    from d2lora_dist.inits import INITS
    from d2lora_dist.lora_inits import is_lora_init

    problems = []
    for cell in checks.cells:
        if cell.task not in exp.tasks:
            problems.append(f"--task {cell.task!r}: not a task of the experiment ({sorted(exp.tasks)})")
        if cell.trains and cell.method not in exp.methods:
            problems.append(f"--method {cell.method!r}: no settings under `methods` ({sorted(exp.methods)})")
        if INITS[cell.init].from_warmup and cell.warmup not in exp.warmup_configs():
            problems.append(f"--init {cell.init}: the experiment has no warm-up {cell.warmup!r} "
                            f"(defined: {sorted(exp.warmup_configs())})")
        if not is_lora_init(cell.lora_init):
            problems.append(f"--lora-init {cell.lora_init!r}: unknown (valid: default, gaussian, pissa, olora, "
                            "pissa_niter_K)")
    return problems


# ---- data ----------------------------------------------------------------------------------
def _row_problems(exp: Experiment, checks: Checks, dropped: dict[str, str]) -> list[str]:
    """Too few usable rows for n; `dropped` gains a line per dataset and form whose normaliser refused rows."""
    from d2lora_dist.data.loading import DataError, normalize
    from d2lora_dist.data.subsets import usable_rows
    from d2lora_dist.methods import get_method

    problems: list[str] = []
    usable: dict[tuple[str, str], int | None] = {}
    for cell in sorted(c for c in checks.cells if c.trains):
        task = exp.tasks[cell.task]
        form = get_method(cell.method).form
        if (cell.task, form) not in usable:
            try:
                data = normalize(task.dataset, form)
                usable[cell.task, form] = usable_rows(data, exp.data_seed, task.holdout + task.validation)
                if data.bad:
                    dropped[f"tasks.{cell.task}.dataset ({form})"] = data.describe_dropped()
            except UnknownName:  # config validation names it
                usable[cell.task, form] = None
            except DataError as e:
                problem = f"tasks.{cell.task}.dataset: {e}"
                if problem not in problems:  # a dataset that cannot load fails the same way for each form
                    problems.append(problem)
                usable[cell.task, form] = None
        have = usable[cell.task, form]
        if have is not None and cell.n > have:
            problems.append(f"{cell.id}: n={cell.n} but task {cell.task!r} has only {have} usable {form} rows "
                            f"({task.dataset.name}, {task.holdout} held out"
                            + (f", {task.validation} for validation" if task.validation else "")
                            + "); lower n in the grid or add data")
    for name in dict.fromkeys(checks.warmup_names(exp)):
        cfg, key = exp.warmup_configs()[name], exp.warmup_settings_key(name)
        if cfg.n is None or cfg.n < 1:  # all rows (the dataset loads when the warm-up starts); below 1 config names it
            continue
        try:
            data = normalize(cfg.dataset, "sft")
        except UnknownName:  # config validation names it
            continue
        except DataError as e:
            problems.append(f"{key}.dataset: {e}")
            continue
        have = usable_rows(data, exp.data_seed, 0)
        if data.bad:
            dropped[f"{key}.dataset"] = data.describe_dropped()
        if cfg.n > have:
            problems.append(f"{key}.n: {cfg.n} but {cfg.dataset.name} has only {have} usable SFT rows")
    return problems


def _suite_problems(exp: Experiment, checks: Checks, dropped: dict[str, str]) -> list[str]:
    """Each suite has items (and no more than its limit asks for); `dropped` gains a line per suite whose
    dataset has rows the normaliser refused (they are not evaluated)."""
    from d2lora_dist.data.loading import DataError
    from d2lora_dist.data.selection import suite_source

    problems: list[str] = []
    for name, task in dict.fromkeys(checks.suites):
        cfg = exp.suites[name]
        key = f"suites.{name}"
        if cfg.limit is not None and cfg.limit < 1:
            continue  # config validation names it
        try:
            records, data = suite_source(exp, name, task)
        except UnknownName:  # config validation names it
            continue
        except DataError as e:
            problems.append(f"{key}: {e}")
            continue
        items = len(records)
        if data.bad:
            dropped[f"{key}.dataset" if cfg.dataset is not None else f"{key} (task {task!r} holdout)"] = \
                data.describe_dropped()
        if items == 0:
            problems.append(f"{key}: no usable items to evaluate")
        elif cfg.limit is not None and cfg.limit > items:
            problems.append(f"{key}.limit: {cfg.limit} but the suite has only {items} items; lower it or use "
                            "null (all items)")
    return problems


# ---- the model and existing adapters ---------------------------------------------------------
def model_problems(exp: Experiment) -> list[str]:
    """The base model is on this machine (or can be downloaded) and has every `lora.target_modules` entry."""
    from d2lora_dist.model_files import missing_targets, model_dir_problem, module_names, short_names

    problem = model_dir_problem(exp.model.name_or_path)
    if problem is not None:
        return [problem]
    modules = module_names(exp.model.name_or_path)  # None: not here yet (a hub id to download) or not safetensors
    if modules is None:
        return []
    missing = set(missing_targets(list(exp.lora.target_modules), modules))
    return [f"lora.target_modules[{i}]: {target!r} is not a module of {exp.model.name_or_path} (its modules with "
            f"weight matrices: {', '.join(short_names(modules))})"
            for i, target in enumerate(exp.lora.target_modules) if target in missing]


def _adapter_problems(exp: Experiment, checks: Checks) -> list[str]:
    """A finished warm-up that an unfinished cell starts from must be intact, of this LoRA shape and for this
    base model: a run directory reused after its adapter was damaged, or trained with another rank, stops
    here, not in every cell."""
    from d2lora_dist.inits import INITS
    from d2lora_dist.layout import RunLayout

    layout = RunLayout(exp.run_dir)
    runs = {c.warmup_run for c in checks.cells if INITS[c.init].from_warmup and c.warmup_run is not None
            and not layout.cell_result(c.id).is_file()}
    done = sorted((r for r in runs if layout.warmup_result_of(r.key).is_file()), key=lambda r: r.key)
    if not done:
        return []
    from d2lora_dist.adapters import AdapterError, verify_adapter
    from d2lora_dist.modeling import ModelError, base_fingerprint
    from d2lora_dist.train import lora_summary

    try:
        base = base_fingerprint(exp.model)
    except ModelError:  # a hub model not downloaded yet: the cell compares it once loaded
        base = None
    problems = []
    for run in done:
        try:
            verify_adapter(layout.warmup_adapter_of(run.key), expected_base=base, expected_lora=lora_summary(exp))
        except AdapterError as e:
            problems.append(f"warm-up {run.key}: {e}; restore it, or move {layout.warmup_home(run.key)} away "
                            "so that the warm-up trains again")
    return problems


# ---- launch --------------------------------------------------------------------------------
def _batch_problems(exp: Experiment, checks: Checks) -> list[str]:
    problems: list[str] = []
    if checks.warmup_world_size is not None:
        for name in dict.fromkeys(checks.warmup_names(exp)):
            problems += _batch(exp.warmup_configs()[name].train, f"{exp.warmup_settings_key(name)}.train",
                               checks.warmup_world_size)
    if checks.cell_world_size is not None:
        for method in sorted({c.method for c in checks.cells if c.trains}):
            problems += _batch(exp.methods[method], f"methods.{method}", checks.cell_world_size)
    return problems


def _batch(settings: TrainSettings, key: str, world: int) -> list[str]:
    problem = batch_problem(settings, key, world)
    return [problem] if problem else []


# ---- Slurm ---------------------------------------------------------------------------------
def slurm_seconds(text: str) -> int | None:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in seconds; None if unreadable."""
    match = _SLURM_TIME.match(text.strip())
    if not match:
        return None
    if match.group(5) is not None:
        return int(match.group(5)) * 60
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.group(1, 2, 3, 4))
    if match.group(2) is None:  # MM:SS
        return minutes * 60 + seconds
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def slurm_problems(exp: Experiment) -> list[str]:
    s, launch = exp.slurm, exp.launch
    problems: list[str] = []
    limit = slurm_seconds(s.time)
    if limit is None:
        problems.append(f"slurm.time: {s.time!r} is not a Slurm time (e.g. 08:00:00 or 1-00:00:00)")
    elif s.signal_seconds >= limit:
        problems.append(f"slurm.signal_seconds: {s.signal_seconds} s is not below slurm.time ({s.time}); the "
                        "checkpoint signal would come before the job starts")
    if slurm_seconds(s.report.time) is None:
        problems.append(f"slurm.report.time: {s.report.time!r} is not a Slurm time (e.g. 01:00:00)")
    if s.report.cpus_per_task < 1:
        problems.append(f"slurm.report.cpus_per_task: must be >= 1, got {s.report.cpus_per_task}")
    if s.nodes < 1:
        problems.append(f"slurm.nodes: must be >= 1, got {s.nodes}")
    if s.max_parallel < 1:
        problems.append(f"slurm.max_parallel: must be >= 1, got {s.max_parallel}")
    if s.gpus_per_node and launch.num_processes > s.gpus_per_node:
        problems.append(f"launch.num_processes: {launch.num_processes} ranks per node but slurm.gpus_per_node "
                        f"asks for {s.gpus_per_node} GPUs")
    problems += [f"launch.{key}: file {path!r} not found" for key, path in _launch_files(exp)
                 if not _exists(path)]
    return problems + slurm_job_problems(exp)


def slurm_job_problems(exp: Experiment) -> list[str]:
    """What the Slurm jobs would fail on once they start: a GPU launch without GPUs, a model they cannot read
    (part of slurm_problems, which `sweep submit` refuses and `sweep plan` shows beside its Slurm view)."""
    model = _compute_node_model_problem(exp)
    return _gpu_launch_problems(exp) + ([model] if model else [])


def _gpu_launch_problems(exp: Experiment) -> list[str]:
    """A launch for GPUs with slurm.gpus_per_node 0: the jobs would get no GPU and fail once they start,
    after their time in the queue."""
    from d2lora_dist.strategy import warmup_launch

    if exp.slurm.gpus_per_node:
        return []
    fix = "set slurm.gpus_per_node to the GPUs of one node (e.g. 8)"
    if exp.launch.strategy is not None:
        return [f"launch.strategy: {exp.launch.strategy} sizes the launch for GPUs (launch.gpu_memory_gib) but "
                f"slurm.gpus_per_node is 0, so the jobs would get no GPU; {fix}, or drop launch.strategy and name a "
                "CPU launch (launch.accelerate_config: launch/accelerate/cpu_2proc_ddp.yaml)"]
    if exp.launch.accelerate_config:
        if not _names_gpus(exp.launch.accelerate_config):
            return []
        return [f"launch.accelerate_config: {exp.launch.accelerate_config} launches on GPUs (use_cpu is not true) "
                f"but slurm.gpus_per_node is 0, so the jobs would get no GPU; {fix}, or name a CPU config "
                "(use_cpu: true, e.g. launch/accelerate/cpu_2proc_ddp.yaml)"]
    try:  # nothing named: the strategy the model's memory estimate chooses
        launch = warmup_launch(exp, max(exp.slurm.nodes, 1))
    except InputError:
        return []  # the strategy's own check names it
    if launch.choice is None or launch.accelerate_config is None:
        return []
    return [f"model.name_or_path: the memory estimate of {exp.model.name_or_path} needs {launch.choice.strategy} "
            f"on {launch.choice.devices} GPU(s) (launch.gpu_memory_gib={exp.launch.gpu_memory_gib:g}) but "
            f"slurm.gpus_per_node is 0, so the jobs would get no GPU; {fix}"]


def _names_gpus(path: str) -> bool:
    """Does this accelerate config launch on GPUs? (not `use_cpu: true`, and GPU ids or MULTI_GPU named)"""
    import yaml

    from d2lora_dist.shipped import find_file

    found = find_file(path)
    if found is None:
        return False  # named as not found above
    try:
        config = yaml.safe_load(found.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(config, dict) or config.get("use_cpu") is True:
        return False
    return "gpu_ids" in config or config.get("distributed_type") == "MULTI_GPU"


def _compute_node_model_problem(exp: Experiment) -> str | None:
    """A hub model the jobs cannot read: not in the hub cache they use (slurm.compute_node_hub_cache).
    Compute nodes are often offline, and where they are not, every job would download the model."""
    from d2lora_dist.assets import resolve_asset_uri
    from d2lora_dist.model_files import cache_dir, looks_local, model_dir_problem, valid_repo_id
    from d2lora_dist.sweep.slurm import compute_node_hub_cache

    try:
        name = resolve_asset_uri(exp.model.name_or_path)
    except (InputError, ValueError, OSError):
        return None  # model_problems names it
    if Path(name).expanduser().exists() or looks_local(name) or not valid_repo_id(name):
        return None  # a local path: model_problems checks it (it must be on a file system the nodes share)
    cache, origin = compute_node_hub_cache(exp)
    if "$" in cache:
        return None  # a variable only the job's shell knows
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache), str):
        return None
    if Path(cache).resolve() == Path(cache_dir()).resolve() and model_dir_problem(exp.model.name_or_path):
        return None  # the jobs read this machine's cache, whose missing model model_problems names already
    return (f"model.name_or_path: hub id {name!r} is not in the Hugging Face cache the Slurm jobs read ({cache}, "
            f"{origin}); download it once into a shared HF_HOME where the hub is reachable "
            f"(HF_HOME=/shared/hf hf download {name}) and give it to the jobs (slurm.setup: "
            "[\"export HF_HOME=/shared/hf\", \"export HF_HUB_OFFLINE=1\"]), or set model.name_or_path to a "
            "local directory on a shared file system")


def _launch_files(exp: Experiment) -> Iterable[tuple[str, str]]:
    for key in ("accelerate_config", "deepspeed_config"):
        path = getattr(exp.launch, key)
        if path:
            yield key, path


def _exists(path: str) -> bool:
    """As given (the working directory first), else the shipped copy (d2lora_dist/shipped.py)."""
    from d2lora_dist.shipped import find_file

    return find_file(path) is not None
