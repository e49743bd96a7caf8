"""Adaptation methods as components: each maps to a TRL trainer, its config and its record form.

Adding a method is one entry in METHODS: the experiment schema's validation, the CLI's choices,
the plan and the report's labels all read this registry; the training pipeline does not
branch on names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from d2lora_dist.errors import UnknownName

if TYPE_CHECKING:  # annotations only: config validates names against this registry
    from d2lora_dist.config import TrainSettings

NO_TRAINING = "none"  # the method of n = 0 cells: nothing is trained
NO_TRAINING_LABEL = "no training"


@dataclass(frozen=True)
class MethodSpec:
    label: str  # how tables and plots name it
    form: str  # record form read from the dataset registry: sft | preference
    classes: Callable[[], tuple[type, type]]  # lazy (config class, trainer class): TRL imports are slow
    extra_args: Callable[[TrainSettings], dict[str, Any]]
    uses_reference: bool

    @property
    def needs_beta(self) -> bool:
        return self.form == "preference"


def _sft() -> tuple[type, type]:
    from trl import SFTConfig, SFTTrainer

    return SFTConfig, SFTTrainer


def _dpo() -> tuple[type, type]:
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer


def _orpo() -> tuple[type, type]:
    from d2lora_dist.distributed import import_experimental_trl

    import_experimental_trl()
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def _preference_args(s: TrainSettings) -> dict[str, Any]:
    # TRL switches dropout off for preference methods by default (disable_dropout=True), which
    # would make lora.dropout apply to SFT only, silently; the phase's dropout decides instead.
    return {"max_length": s.max_length, "beta": s.beta, "disable_dropout": False}


METHODS: dict[str, MethodSpec] = {
    # completion_only_loss: the loss covers the response tokens only, never the prompt.
    "sft": MethodSpec("SFT", "sft", _sft, lambda s: {"max_length": s.max_length, "completion_only_loss": True},
                      False),
    "dpo": MethodSpec("DPO", "preference", _dpo, _preference_args, True),
    "orpo": MethodSpec("ORPO", "preference", _orpo, _preference_args, False),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownName(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def method_label(name: str) -> str:
    return NO_TRAINING_LABEL if name == NO_TRAINING else METHODS[name].label if name in METHODS else name
