"""One entry to train a phase (warm-up or a cell): config -> model -> adapter -> train -> artifact.

The warm-up and every adaptation method share this pipeline and differ only in the method
component (methods.METHODS) and the starting adapter (none, or the warm-up artifact).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from d2lora_dist import adapters, distributed
from d2lora_dist.base_cache import FreshBase
from d2lora_dist.budget import Budget, summed_learning_rate
from d2lora_dist.config import Experiment, LoraConfig, TrainSettings
from d2lora_dist.data.lengths import Truncation, truncation, with_response
from d2lora_dist.data.loading import DataError
from d2lora_dist.divergence import stop_on_non_finite
from d2lora_dist.fileio import writing
from d2lora_dist.lora_inits import DEFAULT_LORA_INIT, lora_init_spec
from d2lora_dist.methods import get_method, phase_batching
from d2lora_dist.modeling import attach_lora, base_fingerprint
from d2lora_dist.residual import Residual, load_residual, manifest_entry, prepare_residual
from d2lora_dist.schedule import Schedule, plan_schedule
from d2lora_dist.schema import ConfigError
from d2lora_dist.strategy import describe_record, launch_record
from d2lora_dist.tracking import add_throughput_callback

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """Training stopped at a checkpoint before its last step (the job is being preempted)."""


@dataclass
class Phase:
    """Everything one training run needs; built by the warm-up or the cell runner."""

    name: str  # "warmup" or the cell id
    method: str
    settings: TrainSettings
    settings_key: str  # where the settings live in the experiment file, for error messages
    records: list[dict[str, Any]]
    out_adapter: Path
    checkpoint_dir: Path
    seed: int  # data order, fresh LoRA init and dropout masks
    lineage: dict[str, Any]  # phase, data subset, parent: goes into the manifest
    init_adapter: Path | None = None
    # PEFT's factor init of a fresh adapter (lora_inits.py); a warm-started phase keeps its parent's residual base
    lora_init: str = DEFAULT_LORA_INIT
    # the random_b control: the fresh adapter's B drawn with these per-module norms (controls.py)
    start_b_norms: dict[str, float] | None = None
    report_to: list[str] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    models: FreshBase = field(default_factory=FreshBase)  # tokenizer and base: loaded here, or a worker's shared one


@dataclass
class TrainOutcome:
    steps: int
    first_loss: float | None
    final_loss: float | None
    runtime_s: float
    manifest: dict[str, Any] | None
    log_history: list[dict[str, Any]]
    schedule: Schedule
    tokens_seen: int
    truncation: Truncation
    update: dict[str, Any] | None  # update_size.UpdateSize.to_dict() (main process)
    budget: Budget | None = None  # steps, summed learning rate and tokens as they ran (budget.py)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "first_loss": self.first_loss, "final_loss": self.final_loss,
                "runtime_s": round(self.runtime_s, 2), "world_size": self.schedule.world_size,
                "global_batch_size": self.schedule.global_batch_size, "optimizer_steps": self.schedule.optimizer_steps,
                "schedule": self.schedule.to_dict(), "tokens_seen": self.tokens_seen,
                "truncation": self.truncation.to_dict(), "update": (self.update or {}).get("summary")}


def training_arguments(exp: Experiment, phase: Phase, ds_config: str | None, schedule: Schedule) -> Any:
    """The method's TRL config. Built BEFORE the model loads so ZeRO-3 partitions at load."""
    method = get_method(phase.method)
    config_cls, _ = method.classes()
    s = phase.settings
    return config_cls(
        output_dir=str(phase.checkpoint_dir), learning_rate=s.learning_rate, num_train_epochs=s.epochs,
        max_steps=schedule.optimizer_steps, per_device_train_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=schedule.gradient_accumulation_steps, lr_scheduler_type=s.lr_scheduler,
        # transformers 5 has no warmup_ratio: a warmup_steps value below 1 is read as that ratio of all steps
        warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        logging_steps=s.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=s.save_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the logs, where divergence.py stops the phase
        save_total_limit=2, seed=phase.seed, data_seed=phase.seed, report_to=phase.report_to or "none",
        run_name=phase.name, gradient_checkpointing=exp.model.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding", dataset_num_proc=None,
        **method.extra_args(s), **distributed.trainer_kwargs(ds_config))


def print_plan(phase: Phase, schedule: Schedule, cut: Truncation, lora: LoraConfig, launch: dict[str, Any]) -> None:
    """Derived quantities at start-up: the launch, the batch, the steps, truncation, where the adapter starts."""
    if distributed.is_main_process():
        s = phase.settings
        print(f"[{phase.name}] launch: {describe_record(launch)}", flush=True)
        print(f"[{phase.name}] {phase.method}: {schedule.describe()}; lr {s.learning_rate:g}, seed {phase.seed}, "
              f"LoRA dropout {lora.dropout:g}, init {phase.init_adapter or 'fresh LoRA'} ({phase.lora_init})", flush=True)
        print(f"[{phase.name}] {cut.describe()}", flush=True)


def train_phase(exp: Experiment, phase: Phase) -> TrainOutcome:
    from datasets import Dataset
    from transformers import set_seed

    distributed.init_process_group()
    ds_config = distributed.deepspeed_config_file(exp.launch.deepspeed_config)
    distributed.check_launch(phase.settings, phase.settings_key, ds_config)  # before any model loads
    check_reference(phase)
    launch = launch_record(exp, phase.settings_key, phase.settings, phase.method, distributed.launch_mode(),
                           ds_config, distributed.world_size())
    tokenizer = phase.models.tokenizer(exp.model)
    rows = training_rows(phase, tokenizer)
    cut = truncation(rows, tokenizer, phase.settings.max_length)
    if cut.kept == 0:
        raise DataError(f"[{phase.name}] all {cut.rows} training rows have a prompt that fills max_length="
                        f"{phase.settings.max_length} tokens, so no response token is left to train; raise "
                        f"{phase.settings_key}.max_length (longest row: {cut.longest} tokens)")
    if cut.prompt_fills and get_method(phase.method).form == "preference":
        rows = with_response(rows, tokenizer, phase.settings.max_length)  # as TRL's SFT does; counted in `cut`
        if distributed.is_main_process():
            print(f"[{phase.name}] {cut.rows - len(rows)} of {cut.rows} rows dropped before training: their prompt "
                  f"alone fills max_length={phase.settings.max_length} ({phase.settings_key}.max_length)", flush=True)
    schedule = plan_schedule(phase.settings, cut.kept, distributed.world_size())  # re-planned if TRL keeps more
    args = training_arguments(exp, phase, ds_config, schedule)
    lora = phase_lora(exp, phase)
    print_plan(phase, schedule, cut, lora, launch)
    base = base_fingerprint(exp.model)
    init_state, parent = None, None
    if phase.init_adapter is not None:
        init_state, parent = adapters.load_adapter_state(phase.init_adapter, base, lora_summary(exp))
    residual = phase_residual(exp, phase, base, parent)  # cached factors, the same on every rank
    with phase.models.base(exp.model, training=True) as model:  # given back pristine, also on failure
        set_seed(phase.seed)  # the fresh LoRA's initial A follows the cell's seed, on every rank alike
        model = attach_lora(model, lora, init_state, phase.lora_init, residual, phase.models.before_overwrite)
        if phase.start_b_norms is not None:
            from d2lora_dist.controls import draw_random_b

            draw_random_b(model, phase.start_b_norms, phase.seed)
        start_state = adapters.gathered_state_dict(model)  # where this phase starts, for its update size
        trainer = make_trainer(phase, model, args, Dataset.from_list(rows), tokenizer)
        schedule = _replan_for_kept_rows(phase, trainer, cut, schedule, given=len(rows))
        resume = last_complete_checkpoint(phase.checkpoint_dir)
        if resume and distributed.is_main_process():
            print(f"[{phase.name}] resuming from {resume}", flush=True)
        if init_state is not None and resume is None:  # a resume's masters come from its checkpoint
            trainer.add_callback(full_precision_warm_start(phase.name, init_state))
        start = time.time()
        with writing(phase.checkpoint_dir, needs=_checkpoint_bytes(start_state)):  # a full disk names it
            result = trainer.train(resume_from_checkpoint=resume)
        if result.global_step < trainer.state.max_steps:  # a callback (preemption) stopped it
            raise Preempted(f"[{phase.name}] stopped at step {result.global_step} of {trainer.state.max_steps}; "
                            f"the checkpoint in {phase.checkpoint_dir} resumes it")
        trained = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        end_state = adapters.gathered_state_dict(trained)
        update = measure_phase_update(exp, phase, start_state, end_state, base["weights_fingerprint"])
        budget = Budget(result.global_step, summed_learning_rate(trainer.lr_scheduler, result.global_step),
                        int(trainer.state.num_input_tokens_seen))
        lineage = {**phase.lineage, "base_model": base, "lora": lora_summary(exp), "method": phase.method,
                   "lora_init": manifest_entry(phase.lora_init, residual),
                   "reference": reference_used(phase, residual),
                   "hyperparameters": _as_dict(phase.settings), "seed": phase.seed, "lora_dropout": lora.dropout,
                   "schedule": schedule.to_dict(), "launch": launch,
                   "batching": phase_batching(phase.method, phase.settings, model).to_dict(),
                   "tokens_seen": int(trainer.state.num_input_tokens_seen),
                   "truncation": cut.to_dict(), "update": update, "budget": budget.to_dict(),
                   "parent": _parent_ref(phase.init_adapter, parent)}
        manifest = adapters.save_adapter(trained, phase.out_adapter, lineage)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        outcome = TrainOutcome(result.global_step, losses[0] if losses else None, losses[-1] if losses else None,
                               time.time() - start, manifest, list(trainer.state.log_history), schedule,
                               int(trainer.state.num_input_tokens_seen), cut, update, budget)
        distributed.release_training_state()  # the next phase or evaluation in this process starts clean
        del trainer, trained  # the engine, its optimizer states and gradients; freed below
    distributed.free_device_memory()  # before evaluation loads, not whenever the garbage collector runs
    return outcome


def check_reference(phase: Phase) -> None:
    """A residual init (PiSSA, OLoRA) rewrites the base: the model with adapters disabled is the residual,
    so `reference: base` would compare against a model nobody trained or released."""
    if (get_method(phase.method).uses_reference and phase.settings.reference == "base"
            and lora_init_spec(phase.lora_init).residual):
        raise ConfigError([f"{phase.settings_key}.reference: 'base' with lora_init {phase.lora_init!r}: with "
                           "adapters disabled the model is the residual W - s*B0*A0, not the base model; use "
                           "'init' (the starting adapter over the residual: the base model for a fresh adapter)"],
                          phase.name)


def phase_residual(exp: Experiment, phase: Phase, base: dict[str, str], parent: dict | None) -> Residual | None:
    """The residual base the phase trains on: its own init's, or a warm start's parent's (collective)."""
    if parent is None:
        return prepare_residual(exp, phase.lora_init, phase.seed, base)
    name, ref = adapters.lora_init_of(parent)
    if name != phase.lora_init:
        raise ConfigError([f"lora_init {phase.lora_init!r}, but the starting adapter {phase.init_adapter} was "
                           f"trained from lora_init {name!r}; a warm start keeps its parent's init and residual "
                           "base, so use the same lora_init for both phases"], phase.name)
    return None if ref is None else load_residual(ref, exp.run_dir)


def reference_used(phase: Phase, residual: Residual | None) -> str | None:
    """What a preference phase compared against (None: the method has no reference model)."""
    if not get_method(phase.method).uses_reference:
        return None
    if phase.settings.reference == "base":
        return "base (adapters disabled)"
    where = f" over residual {Path(residual.ref['path']).name}" if residual is not None else ""
    return f"init (starting adapter{where})"


def last_complete_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing, or None.

    A job killed while saving leaves a checkpoint-N directory without trainer_state.json (the
    Trainer writes it last); resuming from it fails, so it is skipped for the one before it.
    """
    if not checkpoint_dir.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in checkpoint_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        log.warning("skipping incomplete checkpoint %s (no trainer_state.json: interrupted while saving)", path)
    return None


def training_rows(phase: Phase, tokenizer: Any) -> list[dict[str, Any]]:
    """The rows the trainer receives (step-wise preference rows in the phase's target format)."""
    if get_method(phase.method).form != "preference":
        return phase.records
    from d2lora_dist.data.preference import preference_rows

    rows = preference_rows(phase.records, phase.settings.preference_target, tokenizer)
    examples = get_method(phase.method).examples  # the method's own rows from the pairs (KTO's unpaired ones)
    return rows if examples is None else examples(rows)


def phase_lora(exp: Experiment, phase: Phase) -> LoraConfig:
    """The experiment's LoRA shape with this phase's dropout (the shape never changes between phases)."""
    dropout = phase.settings.lora_dropout
    return exp.lora if dropout is None else replace(exp.lora, dropout=dropout)


def measure_phase_update(exp: Experiment, phase: Phase, start: dict[str, Any], end: dict[str, Any],
                         weights_fingerprint: str) -> dict | None:
    """How far the phase moved the model (main process): printed, warned about, kept in the manifest."""
    if not distributed.is_main_process():
        return None
    from d2lora_dist.update_size import adapted_modules, lora_scaling, measure_update

    norms = base_weight_norms(exp, adapted_modules(end), weights_fingerprint)
    size = measure_update(start, end, lora_scaling(exp.lora.alpha, exp.lora.r), norms)
    print(size.describe(f"[{phase.name}]"), flush=True)
    warning = size.warning(exp.update_warning_below)
    if warning:
        log.warning("[%s] %s", phase.name, warning)
        print(f"[{phase.name}] WARNING: {warning}", flush=True)
    return {**size.to_dict(), "warning": warning, "threshold": exp.update_warning_below}


def base_weight_norms(exp: Experiment, modules: list[str], weights_fingerprint: str) -> dict[str, float]:
    """||W|| of the adapted modules, cached in the run directory per base model (reading an 8B
    model's weights takes a while; every cell of a sweep needs the same numbers)."""
    from d2lora_dist.fileio import read_json, write_json_atomic
    from d2lora_dist.modeling import local_model_dir
    from d2lora_dist.update_size import base_weight_norms as read_norms

    cache = exp.run_dir / "base_weight_norms.json"
    key = weights_fingerprint  # computed once per phase by train_phase
    cached = read_json(cache) if cache.is_file() else {}
    norms = cached.get("norms", {}) if cached.get("weights_fingerprint") == key else {}
    missing = [m for m in modules if m not in norms]
    if missing:
        norms = {**norms, **read_norms(local_model_dir(exp.model), missing)}
        write_json_atomic(cache, {"weights_fingerprint": key, "norms": norms})
    return {m: norms[m] for m in modules}


def make_trainer(phase: Phase, model: Any, args: Any, dataset: Any, tokenizer: Any) -> Any:
    method = get_method(phase.method)
    _, trainer_cls = method.classes()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[*phase.callbacks, stop_on_non_finite(phase.name), *distributed.test_callbacks()])
    for callback in distributed.engine_callbacks(trainer):
        trainer.add_callback(callback)
    if method.form == "preference":
        from d2lora_dist.data.preference import drop_eos_after_steps

        drop_eos_after_steps(trainer)  # a step is not the end of the answer (docs/preference-targets.md)
    add_throughput_callback(trainer)
    if method.uses_reference and phase.settings.reference == "base":
        distributed.use_base_model_as_reference(trainer)
    return trainer


def full_precision_warm_start(phase_name: str, state: dict[str, Any]) -> Any:
    """A callback that starts the optimizer from the float32 warm-up adapter, not its bf16 rounding
    (bf16 DeepSpeed builds its fp32 masters from the bf16 parameters: adapters.restore_fp32_masters).
    Built here so that transformers is imported only when a phase trains."""
    from transformers import TrainerCallback

    class _Restore(TrainerCallback):
        def on_train_begin(self, args, state_, control, model=None, **kwargs):  # the optimizer exists now
            if adapters.restore_fp32_masters(model, state) and distributed.is_main_process():
                print(f"[{phase_name}] optimizer's fp32 masters set from the float32 starting adapter "
                      "(the bf16 parameters hold it rounded)", flush=True)

    return _Restore()


def _replan_for_kept_rows(phase: Phase, trainer: Any, cut: Truncation, schedule: Schedule, given: int) -> Schedule:
    """TRL's SFT drops rows whose prompt alone fills max_length (DPO/ORPO rows were dropped before, in
    train_phase); the optimizer steps follow the rows the trainer really kept. `given`: rows handed to it."""
    kept = len(trainer.train_dataset)
    if kept < given and distributed.is_main_process():
        print(f"[{phase.name}] {given - kept} of {given} rows dropped by the trainer: their prompt alone "
              f"fills max_length={phase.settings.max_length} ({phase.settings_key}.max_length)", flush=True)
    if kept == schedule.examples:
        return schedule
    replanned = plan_schedule(phase.settings, kept, schedule.world_size)
    trainer.args.max_steps = replanned.optimizer_steps
    return replanned


def _checkpoint_bytes(adapter: dict[str, Any]) -> int:
    """About what one checkpoint takes: the adapter's float32 weights and Adam's two moments of them."""
    return 3 * sum(v.numel() * 4 for v in adapter.values())


def lora_summary(exp: Experiment) -> dict[str, Any]:
    return {"r": exp.lora.r, "alpha": exp.lora.alpha, "target_modules": sorted(exp.lora.target_modules)}


def _parent_ref(path: Path | None, manifest: dict | None) -> dict[str, Any] | None:
    if path is None or manifest is None:
        return None
    return {"adapter_sha256": manifest["adapter_sha256"], "path": str(path), "phase": manifest.get("phase")}


def _as_dict(settings: TrainSettings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)
