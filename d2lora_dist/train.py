"""One entry to train a phase (warm-up or a cell): config -> model -> adapter -> train -> artifact.

The warm-up and every adaptation method share this pipeline and differ only in the method
component (methods.METHODS) and the starting adapter (none, or the warm-up artifact).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2lora_dist import adapters, distributed
from d2lora_dist.config import Experiment, TrainSettings
from d2lora_dist.methods import get_method
from d2lora_dist.modeling import attach_lora, base_fingerprint, load_base_model, load_tokenizer
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
    records: list[dict[str, Any]]
    out_adapter: Path
    checkpoint_dir: Path
    seed: int
    lineage: dict[str, Any]  # phase, data subset, parent: goes into the manifest
    init_adapter: Path | None = None
    report_to: list[str] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)


@dataclass
class TrainOutcome:
    steps: int
    first_loss: float | None
    final_loss: float | None
    runtime_s: float
    manifest: dict[str, Any] | None
    log_history: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "first_loss": self.first_loss, "final_loss": self.final_loss,
                "runtime_s": round(self.runtime_s, 2)}


def training_arguments(exp: Experiment, phase: Phase, ds_config: str | None) -> Any:
    """The method's TRL config. Built BEFORE the model loads so ZeRO-3 partitions at load."""
    method = get_method(phase.method)
    config_cls, _ = method.classes()
    s = phase.settings
    return config_cls(
        output_dir=str(phase.checkpoint_dir), learning_rate=s.learning_rate, num_train_epochs=s.epochs,
        max_steps=s.max_steps, per_device_train_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        logging_steps=s.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=s.save_steps,
        save_total_limit=2, seed=phase.seed, data_seed=exp.data_seed, report_to=phase.report_to or "none",
        run_name=phase.name, gradient_checkpointing=exp.model.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding", dataset_num_proc=None,
        **method.extra_args(s), **distributed.trainer_kwargs(ds_config))


def print_plan(exp: Experiment, phase: Phase) -> None:
    """Derived quantities at start-up: effective batch, steps, and where the adapter goes."""
    s = phase.settings
    world = distributed.world_size()
    batch = s.per_device_batch_size * s.gradient_accumulation_steps * world
    steps = s.max_steps if s.max_steps > 0 else math.ceil(len(phase.records) / batch) * math.ceil(s.epochs)
    if distributed.is_main_process():
        print(f"[{phase.name}] {phase.method}: {len(phase.records)} examples, effective batch {batch} "
              f"({s.per_device_batch_size} x {s.gradient_accumulation_steps} accum x {world} ranks), "
              f"~{steps} steps, lr {s.learning_rate:g}, init {phase.init_adapter or 'fresh LoRA'}", flush=True)


def train_phase(exp: Experiment, phase: Phase) -> TrainOutcome:
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    distributed.init_process_group()
    ds_config = distributed.deepspeed_config_file(exp.launch.deepspeed_config)
    settings_key = "warmup.train" if phase.lineage.get("phase") == "warmup" else f"methods.{phase.method}"
    distributed.check_launch(phase.settings, settings_key, ds_config)  # before any model loads
    args = training_arguments(exp, phase, ds_config)
    print_plan(exp, phase)
    base = base_fingerprint(exp.model)
    lora = lora_summary(exp)
    init_state, parent = None, None
    if phase.init_adapter is not None:
        init_state, parent = adapters.load_adapter_state(phase.init_adapter, base, lora)
    tokenizer = load_tokenizer(exp.model)
    model = attach_lora(load_base_model(exp.model, training=True), exp.lora, init_state)
    trainer = make_trainer(phase, model, args, Dataset.from_list(phase.records), tokenizer)
    resume = get_last_checkpoint(str(phase.checkpoint_dir)) if phase.checkpoint_dir.is_dir() else None
    if resume and distributed.is_main_process():
        print(f"[{phase.name}] resuming from {resume}", flush=True)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    if result.global_step < trainer.state.max_steps:  # a callback (preemption) stopped it
        raise Preempted(f"[{phase.name}] stopped at step {result.global_step} of {trainer.state.max_steps}; "
                        f"the checkpoint in {phase.checkpoint_dir} resumes it")
    lineage = {**phase.lineage, "base_model": base, "lora": lora, "method": phase.method,
               "hyperparameters": _as_dict(phase.settings), "seed": phase.seed,
               "parent": _parent_ref(phase.init_adapter, parent)}
    manifest = adapters.save_adapter(trainer.accelerator.unwrap_model(trainer.model_wrapped),
                                     phase.out_adapter, lineage)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    outcome = TrainOutcome(result.global_step, losses[0] if losses else None, losses[-1] if losses else None,
                           time.time() - start, manifest, list(trainer.state.log_history))
    distributed.release_training_state()  # the next phase or evaluation in this process starts clean
    return outcome


def make_trainer(phase: Phase, model: Any, args: Any, dataset: Any, tokenizer: Any) -> Any:
    method = get_method(phase.method)
    _, trainer_cls = method.classes()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[*phase.callbacks, *distributed.test_callbacks()])
    add_throughput_callback(trainer)
    _check_rows_kept(phase, len(dataset), len(trainer.train_dataset))
    if method.uses_reference and phase.settings.reference == "base":
        # TRL keeps a frozen copy of a given adapter ("ref") as the reference; without it, the
        # reference is the model with adapters disabled, i.e. the base model.
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in unwrapped.peft_config:
            unwrapped.delete_adapter("ref")
            unwrapped.set_adapter("default")
    return trainer


def _check_rows_kept(phase: Phase, given: int, kept: int) -> None:
    """TRL drops rows whose response is truncated away; with none left it fails cryptically."""
    if kept == 0:
        raise ValueError(f"[{phase.name}] all {given} training rows were dropped by truncation to "
                         f"max_length={phase.settings.max_length}; raise max_length for method {phase.method!r}")
    if kept < given and distributed.is_main_process():
        print(f"[{phase.name}] {given - kept} of {given} rows dropped: longer than max_length="
              f"{phase.settings.max_length}", flush=True)


def lora_summary(exp: Experiment) -> dict[str, Any]:
    return {"r": exp.lora.r, "alpha": exp.lora.alpha, "target_modules": sorted(exp.lora.target_modules)}


def _parent_ref(path: Path | None, manifest: dict | None) -> dict[str, Any] | None:
    if path is None or manifest is None:
        return None
    return {"adapter_sha256": manifest["adapter_sha256"], "path": str(path), "phase": manifest.get("phase")}


def _as_dict(settings: TrainSettings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)
