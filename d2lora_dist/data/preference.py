"""Preference records -> the rows TRL's DPOTrainer, ORPOTrainer and KTOTrainer receive.

Conversational records (orpo_dpo_mix) go to TRL unchanged: it applies the chat template and ends
each response with the template's end of turn.

Step-wise records (Math-Step-DPO: `prompt`, `prefix` = the shared initial steps, `chosen_step`,
`rejected_step`, `chosen_full`, `rejected_full`) become TRL's standard (plain-text) format, with
the chat template applied here, once:

    prompt            = template(user turn, generation prompt) + prefix   # an open assistant turn
    chosen, rejected  = step target: the next step, nothing after it
                        full target: the rest of the solution + eos_token (the end of turn)

The initial steps are on the prompt side, so no loss or log-prob covers them. TRL does not
template plain text again; it tokenizes prompt and prompt + response and starts the response
where the two token lists part, so nothing is inserted at the seam. (A conversational prompt
cannot carry the open turn: DPOTrainer always renders it with add_generation_prompt, which closes
the steps' turn and opens a second assistant turn.)

TRL ends every plain-text response with EOS: DPO appends eos_token to the text, ORPO its id to
the tokens. A step is not the end of an answer, so after the trainer is built
`drop_eos_after_steps(trainer)` removes that EOS from step-target rows again (Step-DPO's own
trainer does the same: it leaves the EOS append out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from d2lora_dist.errors import InputError

TARGETS = ("step", "full")
OPEN_END = "open_end"  # row marker: TRL's EOS after this response is removed by drop_eos_after_steps
# TRL's tokenized columns per response side: DPOTrainer, the experimental ORPOTrainer, then KTOTrainer (one
# response per row, and the neighbour's response it scores for its KL baseline: every row of a phase has one target).
_TOKENIZED = (
    (("chosen_ids",), ("rejected_ids",)),
    (("chosen_input_ids", "chosen_attention_mask", "chosen_labels"),
     ("rejected_input_ids", "rejected_attention_mask", "rejected_labels")),
    (("completion_ids",), ("KL_completion_ids",)),
)


def is_stepwise(record: dict[str, Any]) -> bool:
    return "prefix" in record


def preference_rows(records: Sequence[dict[str, Any]], target: str, tokenizer: Any) -> list[dict[str, Any]]:
    """The rows for DPOTrainer/ORPOTrainer: step-wise records rendered for `target`
    (TrainSettings.preference_target), conversational records as they are."""
    if target not in TARGETS:
        raise InputError(f"preference_target: {target!r} is not one of {', '.join(TARGETS)}")
    stepwise = [is_stepwise(r) for r in records]
    if not any(stepwise):
        return list(records)
    if not all(stepwise):
        raise InputError("preference records mix step-wise and conversational rows; TRL needs one format "
                         "per dataset (one phase reads one dataset)")
    end = end_of_turn(tokenizer) if target == "full" else ""
    return [_stepwise_row(r, target, end, tokenizer) for r in records]


def unpaired_examples(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference rows (prompt, chosen, rejected) -> KTO's unpaired rows (prompt, completion, label): each pair
    gives one desirable example (its chosen response, label True) and one undesirable (its rejected, False).

    KTOTrainer reads its rows in order (its KL baseline pairs each prompt with the previous row's response in
    the micro-batch), so the order is fixed here: the desirable example of pair i, then the undesirable one of
    pair i + 2 (wrapping round). From three pairs on, neighbouring rows hold different prompts, and every
    micro-batch of two or more both labels; the pairs' own order is the seed's data order (data/subsets.py)."""
    def example(row: dict[str, Any], side: str) -> dict[str, Any]:
        kept = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        return kept | {"completion": row[side], "label": side == "chosen"}

    shift = 2 if len(rows) >= 3 else 1  # i + 1 would put pair i + 1's two examples side by side
    out = []
    for i, row in enumerate(rows):
        out += [example(row, "chosen"), example(rows[(i + shift) % len(rows)], "rejected")]
    return out


def _stepwise_row(record: dict[str, Any], target: str, end: str, tokenizer: Any) -> dict[str, Any]:
    row = {"id": record["id"]} if "id" in record else {}
    row["prompt"] = open_turn_prompt(tokenizer, record["prompt"], record["prefix"])
    row["chosen"] = record[f"chosen_{target}"] + end
    row["rejected"] = record[f"rejected_{target}"] + end
    row[OPEN_END] = target == "step"
    return row


def open_turn_prompt(tokenizer: Any, messages: list[dict[str, str]], prefix: str) -> str:
    """The templated conversation, the assistant header, then `prefix` with no end of turn.
    A BOS the template writes is left out when the tokenizer adds its own (Llama 3): DPO
    tokenizes with special tokens and ORPO adds a missing BOS, so each gets exactly one."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text + prefix


def end_of_turn(tokenizer: Any) -> str:
    """eos_token, checked to be what the chat template writes after an assistant message."""
    probe = "d2lora end-of-turn probe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}],
                                         tokenize=False)
    after = text.split(probe, 1)[1] if probe in text else ""
    eos = tokenizer.eos_token
    if not eos or not after.lstrip().startswith(eos):
        raise InputError(f"the chat template ends an assistant turn with {after!r} but tokenizer.eos_token is "
                         f"{eos!r}: TRL ends plain-text responses with eos_token, so preference_target 'full' "
                         "would not end with the template's end of turn; fix eos_token in tokenizer_config.json")
    return eos


def drop_eos_after_steps(trainer: Any) -> int:
    """Remove the EOS TRL appended to step-target responses, in the trainer's tokenized train set.
    Call right after the trainer is built; a no-op for rows without the marker (any other data).
    Returns the number of responses shortened."""
    data = trainer.train_dataset
    if data is None or OPEN_END not in data.column_names:
        return 0
    columns = set(data.column_names)
    if "ref_chosen_logps" in columns:
        raise InputError("precompute_ref_log_probs scored the step responses with TRL's EOS appended; "
                         "leave it off for preference_target 'step'")
    sides = next((s for s in _TOKENIZED if all(k in columns for side in s for k in side)), None)
    if sides is None:
        raise RuntimeError(f"unknown tokenized layout {sorted(columns)} (TRL changed?): cannot remove the EOS "
                           "TRL appends after a step; update data.preference._TOKENIZED")
    eos = trainer.processing_class.eos_token_id
    dropped = [0]

    def drop(row: dict[str, Any]) -> dict[str, Any]:
        if not row[OPEN_END]:
            return row
        for side in sides:
            if row[side[0]] and row[side[0]][-1] == eos:  # absent when ORPO truncated the response
                for key in side:
                    row[key] = row[key][:-1]
                dropped[0] += 1
        return row

    trainer.train_dataset = data.map(drop, remove_columns=[OPEN_END])
    return dropped[0]
