"""A phase's optimisation schedule: the global batch split over ranks, and the optimizer steps.

The experiment states the global batch (examples per optimizer step over all ranks), so the
same file takes the same steps on 1, 4 or 8 GPUs; gradient accumulation is what is left after
the per-device micro-batch and the world size. `min_steps` guarantees small n enough steps to
get past a learning-rate warm-up (n = 100 at a global batch of 32 would otherwise be 4 steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from d2lora_dist.config import TrainSettings
from d2lora_dist.schema import ConfigError


@dataclass(frozen=True)
class Schedule:
    examples: int
    world_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    steps_per_epoch: int
    optimizer_steps: int
    epochs: float  # passes over the data the steps amount to (more than configured under min_steps)
    raised_to_min_steps: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        extra = f", raised to min_steps ({self.epochs:.3g} epochs)" if self.raised_to_min_steps else ""
        return (f"global batch {self.global_batch_size} = {self.per_device_batch_size} per device x "
                f"{self.gradient_accumulation_steps} accumulation x {self.world_size} ranks; "
                f"{self.optimizer_steps} optimizer steps over {self.examples} examples{extra}")


def batch_problem(settings: TrainSettings, key: str, world_size: int) -> str | None:
    """Why this world size cannot produce the configured global batch (None when it can)."""
    per_step = settings.per_device_batch_size * world_size
    if settings.global_batch_size < 1 or settings.per_device_batch_size < 1:
        return None  # reported by the config's own range checks
    if settings.global_batch_size % per_step:
        fits = [w for w in range(1, settings.global_batch_size + 1)
                if settings.global_batch_size % (settings.per_device_batch_size * w) == 0]
        return (f"{key}.global_batch_size={settings.global_batch_size} is not a multiple of "
                f"{key}.per_device_batch_size ({settings.per_device_batch_size}) x world size ({world_size}); "
                f"world sizes that fit: {fits[:8]}; or change per_device_batch_size")
    return None


def accumulation(settings: TrainSettings, world_size: int) -> int:
    problem = batch_problem(settings, "settings", world_size)
    if problem:
        raise ConfigError([problem], "global batch")
    return settings.global_batch_size // (settings.per_device_batch_size * world_size)


def plan_schedule(settings: TrainSettings, examples: int, world_size: int) -> Schedule:
    """Optimizer steps as the HF Trainer counts them (a last partial batch still steps)."""
    accum = accumulation(settings, world_size)
    micro_batches = math.ceil(examples / (settings.per_device_batch_size * world_size))
    per_epoch = max(1, math.ceil(micro_batches / accum))
    if settings.max_steps > 0:
        steps, raised = settings.max_steps, False
    else:
        steps = max(1, math.ceil(settings.epochs * per_epoch))
        raised = steps < settings.min_steps
        steps = max(steps, settings.min_steps)
    return Schedule(examples, world_size, settings.per_device_batch_size, accum, settings.global_batch_size,
                    per_epoch, steps, steps / per_epoch, raised)
