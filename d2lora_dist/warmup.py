"""Phase 1: LoRA SFT on general data, once per warm-up run, published as a verified artifact.

An experiment has one `warmup` or several named `warmups`; each is trained once per LoRA init its
D2LoRA cells use (sweep/grid.WarmupRun), into its own directory and W&B artifact; and once more as a
placebo (responses shuffled across prompts, controls.py) when a `d2lora_placebo` cell uses it, and once
per cell seed under `seeds: per_cell`.
"""

from __future__ import annotations

import time
from typing import Any

from d2lora_dist import distributed, tracking
from d2lora_dist.config import SINGLE_WARMUP, Experiment
from d2lora_dist.controls import placebo_records
from d2lora_dist.data.selection import warmup_records
from d2lora_dist.errors import UnknownName
from d2lora_dist.fileio import read_json, write_json_atomic, writing
from d2lora_dist.layout import RunLayout
from d2lora_dist.provenance import code_version
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.claims import claimed
from d2lora_dist.sweep.grid import WarmupRun, plan_cells, warmup_runs
from d2lora_dist.sweep.slots import slot_record
from d2lora_dist.train import Phase, train_phase

SINGLE = WarmupRun(SINGLE_WARMUP)


def warmup_artifact(exp: Experiment, run: WarmupRun = SINGLE) -> str:
    return tracking.artifact_name(exp.name, "warmup" if run == SINGLE else f"warmup-{run.key}")


def planned_warmups(exp: Experiment) -> list[WarmupRun]:
    """The warm-up runs the experiment's cells start from (the single warm-up when no cell needs one:
    `d2lora warmup` on its own still trains it)."""
    runs = warmup_runs(plan_cells(exp))
    if runs or not exp.warmup_configs():
        return runs
    return [WarmupRun(name) for name in exp.warmup_configs()]


def resolve_warmup(exp: Experiment, key: str | None) -> list[WarmupRun]:
    """`--warmup KEY` (name[+lora_init]) -> that run; None -> every planned one."""
    if exp.warmup is None and not exp.warmups:
        raise ConfigError([f"experiment {exp.name!r} has no `warmup` or `warmups` section"], exp.name)
    planned = planned_warmups(exp)
    if key is None:
        return planned
    run = WarmupRun.parse(key)
    if run not in planned:
        raise UnknownName(f"--warmup {key!r}: not a warm-up run of experiment {exp.name!r} "
                          f"(planned: {', '.join(r.key for r in planned)})")
    return [run]


def run_warmup(exp: Experiment, layout: RunLayout, callbacks: list[Any] | None = None,
               run: WarmupRun = SINGLE) -> dict[str, Any]:
    """Train one warm-up adapter unless it is already done; return its result record."""
    configs = exp.warmup_configs()
    if run.name not in configs:
        raise ConfigError([f"experiment {exp.name!r} has no warm-up {run.name!r} (defined: {sorted(configs)})"],
                          exp.name)
    result_file = layout.warmup_result_of(run.key)
    if _done(layout, run):
        return read_json(result_file)
    with claimed(layout.warmup_lock(run.key), f"warm-up {run.key}", wait=True):
        if distributed.broadcast_object(_done(layout, run)):  # by the process this one waited for (main's view)
            return read_json(result_file)
        with writing(layout.warmup_home(run.key)):  # a full disk stops the warm-up naming what it wrote, no traceback
            return _train_claimed(exp, layout, run, callbacks)


def _done(layout: RunLayout, run: WarmupRun) -> bool:
    done = layout.warmup_result_of(run.key).is_file()
    if done and distributed.is_main_process():
        print(f"warm-up {run.key} already done: {layout.warmup_adapter_of(run.key)}", flush=True)
    return done


def _train_claimed(exp: Experiment, layout: RunLayout, run: WarmupRun, callbacks: list[Any] | None) -> dict[str, Any]:
    cfg, settings_key = exp.warmup_configs()[run.name], exp.warmup_settings_key(run.name)
    home, adapter, result_file = layout.warmup_home(run.key), layout.warmup_adapter_of(run.key), \
        layout.warmup_result_of(run.key)
    started = time.time()
    seed = cfg.seed if run.seed is None else run.seed
    records, subset = warmup_records(exp, run.name, seed)
    placebo = None
    if run.placebo:  # the same rows, each response moved to another prompt
        records, moved = placebo_records(records, seed)
        placebo = {"responses_from": moved}
    name = "warmup" if run == SINGLE else f"warmup-{run.key}"
    described = {"phase": "warmup", "warmup": run.name, "lora_init": run.lora_init, "n": len(records),
                 "placebo": run.placebo, "seed": seed}
    wandb_run = tracking.start_run(exp, layout, "warmup", f"{exp.name}-{name}", described,
                                   ["warmup", f"warmup:{run.name}", f"lora_init:{run.lora_init}",
                                    *(["placebo"] if run.placebo else [])])
    data = subset.to_dict() | {"indices": None} | ({"placebo": True} if run.placebo else {})
    phase = Phase(name=name, method="sft", settings=cfg.train, settings_key=f"{settings_key}.train",
                  records=records, out_adapter=adapter, checkpoint_dir=home / "checkpoints", seed=seed,
                  lineage={"phase": "warmup", "warmup": run.name, "data": data},
                  lora_init=run.lora_init, report_to=["wandb"] if wandb_run is not None else [],
                  callbacks=callbacks or [])
    outcome = train_phase(exp, phase)
    extra = {"seed": seed} if run.seed is not None else {}
    result = {"phase": "warmup", "warmup": run.name, "lora_init": run.lora_init, **extra,
              **({"placebo": placebo} if placebo else {}), "train": outcome.summary(),
              "budget": outcome.budget.to_dict(),  # what D2LoRA cells add to their own (budget.py)
              "data": {"dataset": subset.dataset, "n": subset.n, "subset_sha256": subset.sha256,
                       "dropped": subset.dropped},
              "adapter": None,
              # wall seconds from its data to its result, where it ran (benchmarks/demo_wallclock.py)
              "timing": {"warmup_s": round(time.time() - started, 2), "ended": round(time.time(), 3)},
              "runtime": slot_record(), "code": code_version(),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if outcome.manifest is not None and distributed.is_main_process():
        result["adapter"] = {"sha256": outcome.manifest["adapter_sha256"], "path": str(adapter)}
        write_json_atomic(home / "subset.json", subset.to_dict())
        tracking.log_adapter_artifact(wandb_run, adapter, warmup_artifact(exp, run), outcome.manifest)
        write_json_atomic(result_file, result)  # last: its existence means the warm-up is done
    tracking.finish_run(wandb_run, {"train/" + k: v for k, v in outcome.summary().items()})
    distributed.barrier()
    return result
