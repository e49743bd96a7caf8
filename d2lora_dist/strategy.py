"""The launch strategy: how ranks share the model, chosen from the memory estimate before anything runs.

Fastest first, when it fits: ddp (every rank holds the whole model; nothing but gradients is
communicated) > zero2 (gradients and optimizer states split) > zero3 (weights split too: every
layer is all-gathered in each forward and backward pass, the slowest path for LoRA on a model that
would fit whole) > zero3_offload (weights and optimizer states in CPU memory). `auto` takes the
first that fits `launch.gpu_memory_gib`, on the fewest GPUs it fits on; a named strategy is
checked the same way and refused when it cannot fit. The choice becomes the launch: which shipped
accelerate config and DeepSpeed JSON `accelerate launch` gets, with how many ranks.

Experiment files that name `launch.accelerate_config` / `deepspeed_config` and no strategy keep
them as they are (the launch of earlier versions); nothing named and no strategy means auto.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from d2lora_dist.config import Experiment, TrainSettings
from d2lora_dist.errors import InputError
from d2lora_dist.memory_estimate import (
    GIB,
    MemoryEstimate,
    Shape,
    Sharding,
    Workload,
    estimate,
    model_shape,
    workload,
)

DDP_ACCELERATE = "launch/accelerate/ddp.yaml"
DEEPSPEED_ACCELERATE = "launch/accelerate/deepspeed.yaml"


@dataclass(frozen=True)
class Strategy:
    sharding: Sharding
    deepspeed_config: str | None  # the shipped JSON; None = no DeepSpeed


# Insertion order is the speed order `auto` tries.
STRATEGIES: dict[str, Strategy] = {
    "ddp": Strategy(Sharding(), None),
    "zero2": Strategy(Sharding(optimizer=True), "ds_configs/zero2.json"),
    "zero3": Strategy(Sharding(weights=True, optimizer=True), "ds_configs/zero3_bf16.json"),
    "zero3_offload": Strategy(Sharding(weights=True, optimizer=True, offload=True), "ds_configs/zero3_offload.json"),
}


@dataclass(frozen=True)
class Need:
    """One phase a launch must hold: its settings (for the batch split) and its activations."""

    key: str  # where the settings live, e.g. methods.dpo
    settings: TrainSettings | None  # None = evaluation only (n = 0 cells)
    work: Workload


@dataclass(frozen=True)
class Choice:
    strategy: str
    devices: int
    estimate: MemoryEstimate  # the most demanding phase's, per device
    capacity: int  # bytes per device
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "devices": self.devices, "gpu_memory_gib": round(self.capacity / GIB, 2),
                "estimate": self.estimate.to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class Launch:
    """What runs a phase: `accelerate launch` with these files and ranks, or one plain process."""

    accelerate_config: str | None
    deepspeed_config: str | None
    num_processes: int
    choice: Choice | None = None  # None: the experiment's named files, no estimate

    def accelerate_flags(self) -> list[str]:
        """Flags beyond --config_file: the strategy's DeepSpeed JSON overrides the yaml's."""
        if self.choice is None or self.deepspeed_config is None:
            return []
        from d2lora_dist.shipped import for_command

        return ["--deepspeed_config_file", for_command(self.deepspeed_config)]

    def short(self) -> str:
        """`ddp x1`, `zero3 x8`: the table cell of `sweep plan`; "as configured" for the named files."""
        return f"{self.choice.strategy} x{self.num_processes}" if self.choice else "as configured"

    def describe(self) -> str:
        if self.choice is None:
            return (f"launch as configured: {self.accelerate_config or 'one plain process'}"
                    f"{f' x {self.num_processes} ranks' if self.accelerate_config else ''}")
        return self.choice.reason


def evaluation_need(exp: Experiment) -> Need:
    # no training: the weights (and a generation cache the activation margin covers)
    return Need("evaluation", None, Workload(0, 1, 0, exp.model.gradient_checkpointing))


def method_need(exp: Experiment, method: str) -> Need:
    settings = exp.methods[method]
    return Need(f"methods.{method}", settings, workload(exp, settings, method))


def warmup_need(exp: Experiment, name: str | None = None) -> Need:
    """The memory and batch a warm-up needs (the first one's when no name is given)."""
    configs = exp.warmup_configs()
    name = name if name is not None else next(iter(configs))
    cfg = configs[name]
    return Need(f"{exp.warmup_settings_key(name)}.train", cfg.train, workload(exp, cfg.train, "sft"))


def choose(exp: Experiment, needs: Sequence[Need], device_counts: Sequence[int], requested: str) -> Choice:
    """The fastest strategy (or the requested one) that fits every need, on the fewest of these device counts."""
    if requested not in ("auto", *STRATEGIES):
        raise InputError(f"launch.strategy: {requested!r} is not a strategy (valid: auto, {', '.join(STRATEGIES)})")
    shape = Shape.of(model_shape(exp))
    capacity = int(exp.launch.gpu_memory_gib * GIB)
    counts = [n for n in sorted(set(device_counts)) if all(_divides(need, n) for need in needs)]
    if not counts:
        raise InputError(f"launch.num_processes: no world size up to {max(device_counts)} splits the global batch of "
                         f"{', '.join(n.key for n in needs if n.settings)}; change global_batch_size or "
                         "per_device_batch_size")
    tried: list[str] = []
    smallest: tuple[str, MemoryEstimate] | None = None
    for name in STRATEGIES if requested == "auto" else [requested]:
        for n in counts:
            worst = max((_estimate(exp, shape, need, name, n) for need in needs), key=lambda e: e.total)
            if worst.total <= capacity:
                return Choice(name, n, worst, capacity, _reason(requested, name, n, worst, capacity, tried))
            if smallest is None or worst.total < smallest[1].total:
                smallest = (name, worst)
        tried.append(f"{name} needs {worst.total / GIB:.1f} GiB even on {counts[-1]} GPU(s)")
    assert smallest is not None
    name, best = smallest
    value = f"{requested!r}" + ("" if exp.launch.strategy else " (null with no named accelerate/deepspeed config)")
    other = "" if requested == "auto" else ", or use auto"
    evaluation = any(n.settings is None for n in needs) and best.total == max(
        _estimate(exp, shape, n, name, best.devices).total for n in needs if n.settings is None)
    why = (" (evaluation loads the whole model on every GPU, unsharded: the weights alone do not fit; use GPUs "
           "with more memory)") if evaluation else ""
    raise InputError(f"launch.strategy: {value} does not fit launch.gpu_memory_gib={exp.launch.gpu_memory_gib:g} "
                     f"({', '.join(n.key for n in needs)}): the least is {name} on {best.devices} GPU(s) at "
                     f"{best.describe()} per device{why}; lower per_device_batch_size or max_length, set "
                     f"model.gradient_checkpointing: true, raise launch.num_processes{other}")


def _divides(need: Need, devices: int) -> bool:
    s = need.settings
    return s is None or s.global_batch_size % (s.per_device_batch_size * devices) == 0


def _estimate(exp: Experiment, shape: Shape, need: Need, name: str, devices: int) -> MemoryEstimate:
    # evaluation loads the whole model on every rank whatever the training strategy (adapter_eval.py):
    # generation under ZeRO-3 is unusably slow, so its weights are never sharded
    sharding = STRATEGIES["ddp"].sharding if need.settings is None else STRATEGIES[name].sharding
    return estimate(shape, exp.model.dtype, exp.lora.r, exp.lora.target_modules, need.work, sharding, devices)


def _reason(requested: str, name: str, devices: int, est: MemoryEstimate, capacity: int, tried: list[str]) -> str:
    why = "as set in launch.strategy" if requested != "auto" else (
        "auto: the fastest that fits" + (f" ({'; '.join(tried)})" if tried else ""))
    return f"{name} on {devices} GPU(s): {est.describe()} per device of {capacity / GIB:g} GiB; {why}"


# ---- from a choice to a launch ------------------------------------------------------------------
def requested_strategy(exp: Experiment) -> str | None:
    """The strategy to choose by, or None when the experiment's named files decide (earlier behaviour)."""
    lc = exp.launch
    if lc.strategy is not None:
        return lc.strategy
    return None if (lc.accelerate_config or lc.deepspeed_config) else "auto"


def as_configured(exp: Experiment) -> Launch:
    return Launch(exp.launch.accelerate_config, exp.launch.deepspeed_config, exp.launch.num_processes)


def launch_for(exp: Experiment, needs: Sequence[Need], device_counts: Sequence[int]) -> Launch:
    """The launch for these phases: the named files as they are, or the chosen strategy's."""
    requested = requested_strategy(exp)
    if requested is None:
        return as_configured(exp)
    if exp.launch.strategy is None and _shape_problem(exp):  # implicit auto, nothing to estimate: as before
        return as_configured(exp)
    choice = choose(exp, needs, device_counts, requested)
    spec = STRATEGIES[choice.strategy]
    if spec.deepspeed_config is not None:
        return Launch(DEEPSPEED_ACCELERATE, spec.deepspeed_config, choice.devices, choice)
    if choice.devices == 1:  # DDP of one rank is one process: no launcher, no process group
        return Launch(None, None, 1, choice)
    return Launch(DDP_ACCELERATE, None, choice.devices, choice)


def _shape_problem(exp: Experiment) -> str | None:
    """Why no estimate can be made (unknown shape, modules the estimate does not know), or None."""
    try:
        Shape.of(model_shape(exp)).lora_params(exp.lora.r, exp.lora.target_modules)
    except InputError as e:
        return str(e)
    return None


def cell_needs(exp: Experiment, methods: Sequence[str]) -> list[Need]:
    """What cells of these methods hold: their training, and the evaluation every cell ends with."""
    return [*(method_need(exp, m) for m in sorted(set(methods)) if m in exp.methods), evaluation_need(exp)]


def cell_launch(exp: Experiment, methods: Sequence[str], packed: bool) -> Launch:
    """Cells of these methods: on the fewest GPUs that hold them when `packed` (Slurm array tasks that
    share nodes), else on all launch.num_processes ranks (a local sweep, or whole nodes)."""
    top = exp.launch.num_processes
    return launch_for(exp, cell_needs(exp, methods), range(1, top + 1) if packed else [top])


def warmup_launch(exp: Experiment, nodes: int = 1, name: str | None = None) -> Launch:
    """The warm-up takes every rank it is given (one job, nothing to share the nodes with)."""
    launch = launch_for(exp, [warmup_need(exp, name)], [nodes * exp.launch.num_processes])
    if launch.choice is not None and nodes > 1:  # the launcher counts ranks per node
        return Launch(launch.accelerate_config or DDP_ACCELERATE, launch.deepspeed_config,
                      exp.launch.num_processes, launch.choice)
    return launch


# ---- what a running phase records ---------------------------------------------------------------
def running_strategy(mode: str, ds_config: dict[str, Any] | None) -> str:
    """The strategy of the running launch, read from the launch itself (mode: single | ddp | deepspeed)."""
    if mode != "deepspeed" or ds_config is None:
        return "ddp"  # one process is DDP of one rank
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 3:
        offload = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
        return "zero3_offload" if offload else "zero3"
    return f"zero{stage}" if stage else "deepspeed (no ZeRO)"


def launch_record(exp: Experiment, key: str, settings: TrainSettings, method: str, mode: str,
                  ds_config_file: str | None, world: int) -> dict[str, Any]:
    """The manifest's `launch`: the strategy that really runs (read from the launch), and its estimate."""
    import json
    from pathlib import Path

    ds_config = json.loads(Path(ds_config_file).read_text()) if ds_config_file else None
    name = running_strategy(mode, ds_config)
    need = Need(key, settings, workload(exp, settings, method))
    record: dict[str, Any] = {"strategy": name, "world_size": world, "requested": exp.launch.strategy,
                              "gpu_memory_gib": exp.launch.gpu_memory_gib}
    problem = _shape_problem(exp)
    if problem:
        return {**record, "estimate": None, "estimate_error": problem}
    if name in STRATEGIES:
        est = _estimate(exp, Shape.of(model_shape(exp)), need, name, world)
        record["estimate"] = est.to_dict()
        record["fits"] = est.total <= exp.launch.gpu_memory_gib * GIB
    return record


def describe_record(record: dict[str, Any]) -> str:
    est = record.get("estimate")
    size = f"~{est['total_gib']:g} GiB per device of {record['gpu_memory_gib']:g}" if est else "no estimate"
    return f"{record['strategy']} on {record['world_size']} rank(s), {size}"
