"""Adaptation methods as components: each maps to a TRL trainer, its config and its record form.

Adding a method is one entry in METHODS: the experiment schema's validation, the CLI's choices,
the plan and the report's labels all read this registry; the training pipeline does not
branch on names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from d2lora_dist.data.preference import unpaired_examples
from d2lora_dist.errors import InputError, UnknownName

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
    padding_free: bool = False  # its trainer can flatten a micro-batch into one row (see resolve_batching)
    # preference pairs -> the rows its trainer takes (None: the pairs themselves); data/preference.py holds the rules
    examples: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
    min_micro_batch: int = 1  # rows per micro-batch its loss needs (config validation names per_device_batch_size)

    @property
    def needs_beta(self) -> bool:
        return self.form == "preference"


def _sft() -> tuple[type, type]:
    from d2lora_dist.packing import SFTConfig, SFTTrainer  # TRL's, with padding-free batches under max_length

    return SFTConfig, SFTTrainer


def _dpo() -> tuple[type, type]:
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer


def _orpo() -> tuple[type, type]:
    from d2lora_dist.distributed import import_experimental_trl

    import_experimental_trl()
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def _kto() -> tuple[type, type]:
    from trl import KTOConfig, KTOTrainer

    return KTOConfig, KTOTrainer


def _preference_args(s: TrainSettings) -> dict[str, Any]:
    # TRL switches dropout off for preference methods by default (disable_dropout=True), which
    # would make lora.dropout apply to SFT only, silently; the phase's dropout decides instead.
    return {"max_length": s.max_length, "beta": s.beta, "disable_dropout": False}


def _sft_args(s: TrainSettings) -> dict[str, Any]:
    # completion_only_loss: the loss covers the response tokens only, never the prompt. batching is the
    # request; the trainer resolves it against the model's attention (resolve_batching).
    return {"max_length": s.max_length, "completion_only_loss": True, "batching": s.batching}


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("SFT", "sft", _sft, _sft_args, False, padding_free=True),
    # TRL 1.16's DPOTrainer turns padding_free=True back off ("temporarily unavailable after a
    # refactor"); its experimental ORPOTrainer has no such option: both always pad.
    "dpo": MethodSpec("DPO", "preference", _dpo, _preference_args, True),
    "orpo": MethodSpec("ORPO", "preference", _orpo, _preference_args, False),
    # KTO learns from single examples marked desirable or undesirable: each pair gives one of each. Its loss
    # estimates a KL baseline from the other rows of a micro-batch, so it needs at least two (TRL refuses one).
    "kto": MethodSpec("KTO", "preference", _kto, _preference_args, True, examples=unpaired_examples,
                      min_micro_batch=2),
}

# Attention implementations that keep the rows of a flattened micro-batch apart, given position_ids
# that restart at 0 for each row and no attention_mask: flash attention through its varlen kernel
# (TRL's collator passes cu_seq_lens), sdpa and eager through transformers' packed-sequence mask
# (masking_utils.find_packed_sequence_indices: a block-diagonal causal mask). Any other attention
# would let a row attend to the rows before it. The mask is built only without a cache (TRL's
# compute_loss passes use_cache=False); with one, transformers skips the packed-sequence check.
PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa", "eager")
BATCHINGS = ("auto", "padded", "padding_free")


@dataclass(frozen=True)
class Batching:
    """How a phase's micro-batches are laid out: what was asked, what is used and why."""

    requested: str
    used: str  # padded | padding_free
    attention: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "used": self.used, "attention": self.attention, "reason": self.reason}


def _masks_packed_rows(attention: str) -> bool:
    if attention not in PACKED_ATTENTION:
        return False
    if attention.startswith("flash_attention"):
        return True
    import transformers.masking_utils as masking  # sdpa/eager: the mask is built from position_ids

    return hasattr(masking, "find_packed_sequence_indices")


def resolve_batching(method: str, requested: str, per_device_batch_size: int, attention: str) -> Batching:
    """padding_free where it trains the same loss as padding (the method's trainer flattens rows and
    the attention keeps them apart), padded otherwise. `auto` falls back with the reason;
    `padding_free` asked for where it would be wrong stops (config validation catches the method)."""
    spec = get_method(method)
    if requested not in BATCHINGS:
        raise InputError(f"batching: {requested!r} is not one of {', '.join(BATCHINGS)}")
    if requested == "padded":
        return Batching(requested, "padded", attention, "asked for")
    why_not = (f"TRL's {spec.label} trainer always pads" if not spec.padding_free
               else f"attention {attention!r} does not keep flattened rows apart" if not _masks_packed_rows(attention)
               else "one row per micro-batch has no padding to remove" if per_device_batch_size == 1 and requested == "auto"
               else None)
    if why_not is None:
        return Batching(requested, "padding_free", attention,
                        f"{spec.label} flattens each micro-batch; {attention} keeps its rows apart")
    if requested == "padding_free":
        raise InputError(f"batching: padding_free is not correct for {method} here ({why_not}); use auto or padded")
    return Batching(requested, "padded", attention, why_not)


def model_attention(model: Any) -> str:
    """The attention implementation a loaded (or PEFT-wrapped) model really runs."""
    return str(model.config._attn_implementation)


def phase_batching(method: str, settings: TrainSettings, model: Any) -> Batching:
    """The batching a phase of `method` with `settings` uses on `model` (what its trainer resolves)."""
    return resolve_batching(method, settings.batching, settings.per_device_batch_size, model_attention(model))


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownName(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def method_label(name: str) -> str:
    return NO_TRAINING_LABEL if name == NO_TRAINING else METHODS[name].label if name in METHODS else name
