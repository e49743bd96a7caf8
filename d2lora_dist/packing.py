"""SFT with padding-free micro-batches: TRL's SFT trainer and config, plus the `batching` request.

A padding-free micro-batch is its rows joined into one sequence of shape (1, sum of lengths), with
position_ids restarting at 0 for each row and no attention_mask; the attention keeps the rows apart
(methods.PACKED_ATTENTION) and TRL's collator masks the label of each row's first token, so the
loss covers the same tokens as a padded batch, and no padding token is computed. Which rows form a
micro-batch, and which micro-batches an optimizer step takes, do not change.

TRL 1.16 refuses `padding_free=True` with a `max_length` unless rows are packed into bins
(sft_trainer.py: "When `padding_free=True` without packing, `max_length` is not enforced"), though
it has truncated at dataset preparation, whatever the collator, since truncation moved there. Bins
(`packing=True`) would change how many rows a step sees, so the trainer is built as TRL builds a
padded one (same truncation, dropped rows, pad token) and its collator then flattens the batches.
Can go when TRL accepts padding_free with max_length and without packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trl
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from d2lora_dist.methods import model_attention, resolve_batching


@dataclass
class SFTConfig(trl.SFTConfig):
    batching: str = field(default="padded", metadata={
        "help": "auto | padded | padding_free; resolved by the trainer against the model's attention "
                "(d2lora_dist.methods.resolve_batching)."})


class SFTTrainer(trl.SFTTrainer):
    """trl.SFTTrainer whose micro-batches are padding-free when `args.batching` resolves to it."""

    def __init__(self, model: Any, args: SFTConfig, **kwargs: Any) -> None:
        self.batching = resolve_batching("sft", args.batching, args.per_device_train_batch_size,
                                         model_attention(model))
        super().__init__(model=model, args=args, **kwargs)
        if self.batching.used == "padding_free":
            flatten_batches(self)


def flatten_batches(trainer: Any) -> None:
    """Switch a padded SFT trainer's collator to padding-free batches (TRL's own flattening)."""
    collator = trainer.data_collator
    if type(collator) is not DataCollatorForLanguageModeling or collator.padding_free:
        raise TypeError(f"padding-free batches need TRL's padded language-modeling collator, got {collator!r}")
    collator.padding_free = True
    trainer.padding_free = True
    # Trainer counts "non_padding" tokens without an attention_mask as input_ids != pad_token_id,
    # which would miss every end-of-turn token whose id is the pad token's; a flattened batch
    # without pad_to_multiple_of holds no padding, so all its tokens are the non-padding ones.
    if trainer.args.include_num_input_tokens_seen == "non_padding" and collator.pad_to_multiple_of is None:
        trainer.args.include_num_input_tokens_seen = "all"
