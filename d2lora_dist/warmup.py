"""Phase 1: LoRA SFT on general data, once per experiment, published as a verified artifact."""

from __future__ import annotations

from typing import Any

from d2lora_dist import distributed, tracking
from d2lora_dist.config import Experiment
from d2lora_dist.data.selection import warmup_records
from d2lora_dist.fileio import read_json, write_json_atomic
from d2lora_dist.layout import RunLayout
from d2lora_dist.schema import ConfigError
from d2lora_dist.train import Phase, train_phase


def warmup_artifact(exp: Experiment) -> str:
    return tracking.artifact_name(exp.name, "warmup")


def run_warmup(exp: Experiment, layout: RunLayout, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train the warm-up adapter unless it is already done; return its result record."""
    if exp.warmup is None:
        raise ConfigError([f"experiment {exp.name!r} has no `warmup` section"], exp.name)
    if layout.warmup_result.is_file():
        if distributed.is_main_process():
            print(f"warm-up already done: {layout.warmup_adapter}", flush=True)
        return read_json(layout.warmup_result)
    records, subset = warmup_records(exp)
    run = tracking.start_run(exp, layout, "warmup", f"{exp.name}-warmup",
                             {"phase": "warmup", "n": len(records)}, ["warmup"])
    phase = Phase(name="warmup", method="sft", settings=exp.warmup.train, settings_key="warmup.train",
                  records=records, out_adapter=layout.warmup_adapter, checkpoint_dir=layout.warmup_dir / "checkpoints",
                  seed=exp.warmup.seed, lineage={"phase": "warmup", "data": subset.to_dict() | {"indices": None}},
                  report_to=["wandb"] if run is not None else [], callbacks=callbacks or [])
    outcome = train_phase(exp, phase)
    result = {"phase": "warmup", "train": outcome.summary(), "data": {"dataset": subset.dataset, "n": subset.n,
              "subset_sha256": subset.sha256}, "adapter": None}
    if outcome.manifest is not None and distributed.is_main_process():
        result["adapter"] = {"sha256": outcome.manifest["adapter_sha256"], "path": str(layout.warmup_adapter)}
        write_json_atomic(layout.warmup_dir / "subset.json", subset.to_dict())
        tracking.log_adapter_artifact(run, layout.warmup_adapter, warmup_artifact(exp), outcome.manifest)
        write_json_atomic(layout.warmup_result, result)
    tracking.finish_run(run, {"train/" + k: v for k, v in outcome.summary().items()})
    distributed.barrier()
    return result
