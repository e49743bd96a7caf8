"""Run one cell idempotently: subset -> phase-2 training -> evaluation -> result.json (last, atomic).

A cell whose result.json exists is done and returns at once. A cell interrupted mid-way
resumes: a verified adapter skips training, otherwise training resumes from its last
checkpoint. Everything a cell writes stays below its own directory.

`models` says where the tokenizer and base model come from: loaded by this cell (one process per
cell), or lent by a cell worker that runs several cells on one loaded base (sweep/worker.py); the
result and the adapter's manifest record which (`shared_worker`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from d2lora_dist import adapters, controls, distributed, tracking
from d2lora_dist.base_cache import FreshBase
from d2lora_dist.budget import NOTHING, cell_budget, phase_budget_of, warmup_budget_of
from d2lora_dist.config import SINGLE_WARMUP, Experiment, TrainSettings
from d2lora_dist.data.loading import DataError
from d2lora_dist.data.selection import task_records, validation_items
from d2lora_dist.data.validation import save_validation
from d2lora_dist.errors import MissingInput
from d2lora_dist.evaluate.adapter_eval import evaluate_suites
from d2lora_dist.fileio import read_json, write_json_atomic, writing
from d2lora_dist.inits import INITS
from d2lora_dist.layout import RunLayout
from d2lora_dist.methods import get_method
from d2lora_dist.provenance import code_version
from d2lora_dist.sweep.claims import claimed
from d2lora_dist.sweep.grid import Cell, cell_suites
from d2lora_dist.sweep.slots import slot_record
from d2lora_dist.sweep.tuning import cell_settings
from d2lora_dist.train import Phase, TrainOutcome, train_phase
from d2lora_dist.warmup import warmup_artifact


def run_cell(exp: Experiment, layout: RunLayout, cell: Cell, callbacks: list[Any] | None = None,
             models: FreshBase | None = None, wait: bool = True) -> dict[str, Any]:
    """The cell, unless done, under its claim: another process on it is waited for (`wait`), else Busy."""
    if _done(layout, cell):
        return read_json(layout.cell_result(cell.id))
    with claimed(layout.cell_lock(cell.id), f"[{cell.id}]", wait):
        if distributed.broadcast_object(_done(layout, cell)):  # by the process this one waited for (main's view)
            return read_json(layout.cell_result(cell.id))
        with writing(layout.cell_dir(cell.id)):  # a full disk stops the cell naming what it wrote, no traceback
            return _run_claimed(exp, layout, cell, callbacks, models or FreshBase())


def _done(layout: RunLayout, cell: Cell) -> bool:
    done = layout.cell_result(cell.id).is_file()
    if done and distributed.is_main_process():
        print(f"[{cell.id}] already done", flush=True)
    return done


def _run_claimed(exp: Experiment, layout: RunLayout, cell: Cell, callbacks: list[Any] | None,
                 models: FreshBase) -> dict[str, Any]:
    start_adapter = _starting_adapter(layout, cell)
    timing = {"started": time.time()}  # wall seconds of the cell's parts (benchmarks/demo_wallclock.py)
    tags = [f"task:{cell.task}", f"method:{cell.method}", f"init:{cell.init}", f"n:{cell.n}", f"seed:{cell.seed}",
            f"lora_init:{cell.lora_init}", *([f"warmup:{cell.warmup}"] if cell.warmup else [])]
    outcome = None
    # a final tuned cell's settings are its selection cells' choice (n = 0 trains nothing: no settings)
    settings, tuning = cell_settings(exp, layout, cell) if cell.trains else (None, None)
    _record_selection(exp, layout, cell, tuning)
    if cell.trains:
        run = tracking.start_run(exp, layout, "adapt", cell.id, cell.to_dict() | {"arm": cell.arm}, tags)
        _declare_input(exp, run, start_adapter, cell, own=False)
        timing["train"] = time.time()
        outcome = train_cell(exp, layout, cell, start_adapter, run, callbacks or [], models, settings)
        timing["train"] = time.time() - timing["train"]
        if distributed.is_main_process():
            tracking.log_adapter_artifact(run, layout.cell_adapter(cell.id), tracking.artifact_name(exp.name, cell.id),
                                          adapters.read_manifest(layout.cell_adapter(cell.id)))
        tracking.finish_run(run, {"train": outcome.summary() if outcome else {}})
    eval_adapter = layout.cell_adapter(cell.id) if cell.trains else start_adapter
    run = tracking.start_run(exp, layout, "eval", f"{cell.id}-eval", cell.to_dict() | {"arm": cell.arm}, tags)
    _declare_input(exp, run, eval_adapter, cell, own=cell.trains)
    timing["evaluate"] = time.time()
    metrics = evaluate_suites(exp, cell.task, cell_suites(exp, cell), eval_adapter,
                              lambda suite: layout.cell_predictions(cell.id, suite), models=models)
    timing["evaluate"] = time.time() - timing["evaluate"]
    result = None
    if distributed.is_main_process():
        seconds = {f"{part}_s": round(v, 2) for part, v in timing.items() if part != "started"}
        seconds["cell_s"] = round(time.time() - timing["started"], 2)  # also W&B runs, data, loads
        result = _result(exp, layout, cell, metrics, outcome, eval_adapter) | {
            "shared_worker": models.shared, "timing": seconds, "runtime": slot_record()}
        control = control_record(exp, layout, cell)
        if control is not None:  # results of lora and d2lora read as before
            result["control"] = control
        if tuning is not None:
            result["tuning"] = tuning
        write_json_atomic(layout.cell_result(cell.id), result)
        shutil.rmtree(layout.cell_checkpoints(cell.id), ignore_errors=True)
        print(f"[{cell.id}] done -> {layout.cell_result(cell.id)}", flush=True)
    tracking.finish_run(run, {"eval": metrics})
    distributed.barrier()
    return result or {}


def _declare_input(exp: Experiment, run: Any, adapter_dir: Path | None, cell: Cell, own: bool) -> None:
    """W&B lineage: the run consumed this adapter artifact (the cell's own, or its warm-up's)."""
    if run is None or adapter_dir is None:
        return
    name = tracking.artifact_name(exp.name, cell.id) if own else warmup_artifact(exp, cell.warmup_run)
    tracking.use_adapter_artifact(run, name, adapters.read_manifest(adapter_dir)["adapter_sha256"])


def _starting_adapter(layout: RunLayout, cell: Cell) -> Path | None:
    """The warm-up adapter the cell starts from (None: fresh); a cell that reads its warm-up (random_b)
    also needs it done."""
    run = cell.warmup_run
    if run is None:
        return None
    if not layout.warmup_result_of(run.key).is_file():
        which, command = ("the warm-up adapter", "d2lora warmup") if run.key == SINGLE_WARMUP else (
            f"warm-up {run.key!r}", f"d2lora warmup --warmup {run.key}")
        raise MissingInput(f"[{cell.id}] needs {which}, but {layout.warmup_result_of(run.key)} does not exist; "
                           f"run `{command}` first")
    return layout.warmup_adapter_of(run.key) if INITS[cell.init].start == "warmup" else None


def _record_selection(exp: Experiment, layout: RunLayout, cell: Cell, tuning: dict[str, Any] | None) -> None:
    """The run directory's record of a validation split this cell keeps out of training (written once, the
    same for every cell), and of a final tuned cell's choice."""
    if not distributed.is_main_process():
        return
    if exp.tasks[cell.task].validation > 0:
        save_validation(layout.validation_file(cell.task), validation_items(exp, cell.task)[1])
    if tuning is not None and tuning["role"] == "final":
        write_json_atomic(layout.tuning_file(tuning["group"]), tuning)


def train_cell(exp: Experiment, layout: RunLayout, cell: Cell, start_adapter: Path | None, run: Any = None,
               callbacks: list[Any] | None = None, models: FreshBase | None = None,
               settings: TrainSettings | None = None) -> TrainOutcome | None:
    """The cell's training phase: its seed draws its rows; None when its adapter already exists. `settings`:
    the method's unless tuning chose others (sweep/tuning.cell_settings)."""
    models = models or FreshBase()
    adapter_dir = layout.cell_adapter(cell.id)
    if (adapter_dir / adapters.MANIFEST).is_file():  # trained before an interruption in evaluation
        adapters.verify_adapter(adapter_dir)
        return None
    method = get_method(cell.method)
    records, subset = task_records(exp, cell.task, method.form, cell.n, cell.seed)
    _save_subset(layout, cell, subset.to_dict())
    settings, b_norms = _control_settings(exp, layout, cell, settings or exp.methods[cell.method], len(records))
    phase = Phase(name=cell.id, method=cell.method, settings=settings,
                  settings_key=f"methods.{cell.method}", records=records,
                  out_adapter=adapter_dir, checkpoint_dir=layout.cell_checkpoints(cell.id), seed=cell.seed,
                  lineage={"phase": "adapt", "cell": cell.to_dict(), "init": cell.init,
                           "data": {k: v for k, v in subset.to_dict().items() if k != "indices"},
                           "shared_worker": models.shared},
                  init_adapter=start_adapter, lora_init=cell.lora_init, report_to=["wandb"] if run is not None else [],
                  callbacks=callbacks or [], models=models, start_b_norms=b_norms)
    return train_phase(exp, phase)


def _control_settings(exp: Experiment, layout: RunLayout, cell: Cell, settings: TrainSettings,
                      examples: int) -> tuple[TrainSettings, dict[str, float] | None]:
    """The cell's settings (the method's, or tuning's choice; lora_matched: with the warm-up's steps added)
    and random_b's B norms."""
    spec = INITS[cell.init]
    if spec.matched_steps:
        settings = controls.matched_settings(exp, cell.warmup, settings, examples)[0]
    run = cell.warmup_run
    norms = controls.b_norms(layout.warmup_adapter_of(run.key)) if spec.start == "random_b" and run else None
    return settings, norms


def control_record(exp: Experiment, layout: RunLayout, cell: Cell) -> dict[str, Any] | None:
    """What a control arm changed, for its result (None for lora and d2lora)."""
    spec = INITS[cell.init]
    if not spec.rules_out:
        return None
    record: dict[str, Any] = {"control": cell.init, "rules_out": spec.rules_out}
    if spec.matched_steps and cell.trains:
        record |= controls.matched_settings(exp, cell.warmup, exp.methods[cell.method], cell.n)[1]
    run = cell.warmup_run
    if run is not None:
        manifest = adapters.read_manifest(layout.warmup_adapter_of(run.key))
        record |= {"warmup_run": run.key, "warmup_sha256": manifest["adapter_sha256"]}
    return record


def _save_subset(layout: RunLayout, cell: Cell, subset: dict[str, Any]) -> None:
    """Saved once; a rerun must select exactly the same rows (else the data changed)."""
    path = layout.cell_subset(cell.id)
    if distributed.is_main_process():
        saved = read_json(path) if path.is_file() else None
        if saved is not None and saved["sha256"] != subset["sha256"]:
            raise DataError(f"[{cell.id}] the task data changed since this cell started: {path} records "
                             f"other rows; move the cell directory away to start it again")
        if saved != subset:
            write_json_atomic(path, subset)


def _result(exp: Experiment, layout: RunLayout, cell: Cell, metrics: dict[str, Any],
            outcome: TrainOutcome | None, eval_adapter: Path | None) -> dict[str, Any]:
    adapter, manifest = None, None
    if eval_adapter is not None:
        manifest = adapters.read_manifest(eval_adapter)
        adapter = {"sha256": manifest["adapter_sha256"], "path": str(eval_adapter),
                   "parent_sha256": (manifest.get("parent") or {}).get("adapter_sha256")}
    numbers = {suite: {k: v for k, v in m.items() if isinstance(v, (int, float))} for suite, m in metrics.items()}
    versions = {suite: m.get("prompt_version") for suite, m in metrics.items()}
    # what the numbers mean: prompt and answer-rule versions, the headline answer filter
    labels = {suite: {k: v for k, v in m.items() if isinstance(v, str)} for suite, m in metrics.items()}
    return {"cell": cell.to_dict(), "experiment": exp.name, "metrics": numbers, "prompt_versions": versions,
            "labels": labels, "code": code_version(), "n_trained": n_trained(cell, outcome, manifest),
            "suites": {s: exp.tasks[cell.task].role(s) for s in cell_suites(exp, cell)},
            "train": outcome.summary() if outcome else None, "adapter": adapter, "data": _data_record(layout, cell),
            "budget": _budget(layout, cell, outcome, manifest),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def n_trained(cell: Cell, outcome: TrainOutcome | None, manifest: dict[str, Any] | None) -> int | None:
    """The rows the cell really trained on: n minus the rows whose prompt fills max_length (dropped
    before or by the trainer); from the adapter's manifest when training finished in an earlier run."""
    if not cell.trains:
        return 0
    schedule = outcome.schedule.to_dict() if outcome is not None else (manifest or {}).get("schedule")
    return int(schedule["examples"]) if schedule else None


def _budget(layout: RunLayout, cell: Cell, outcome: TrainOutcome | None,
            manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The cell's optimisation budget: its phase's (as it ran, or from its adapter's manifest when it trained
    in an earlier run) and its warm-up's (from the warm-up's result.json) for a cell that starts from one."""
    phase = NOTHING
    if cell.trains:
        phase = outcome.budget if outcome is not None and outcome.budget is not None else phase_budget_of(manifest)
    warmup = None
    if INITS[cell.init].start == "warmup" and cell.warmup_run is not None:  # not lora_matched (its extra steps
        # are its own phase's) nor random_b (it reads the warm-up's B norms, it does not train from them)
        warmup = warmup_budget_of(read_json(layout.warmup_result_of(cell.warmup_run.key)))
    return cell_budget(phase, warmup)


def _data_record(layout: RunLayout, cell: Cell) -> dict[str, Any] | None:
    """What the cell trained on, from its saved subset: dataset, n, checksum and the rows the normaliser
    dropped (None for a cell that trains nothing)."""
    path = layout.cell_subset(cell.id)
    if not cell.trains or not path.is_file():
        return None
    subset = read_json(path)
    return {"dataset": subset["dataset"], "n": subset["n"], "subset_sha256": subset["sha256"],
            "dropped": subset.get("dropped", {"count": 0, "rows": []})}  # subsets saved before it was recorded
