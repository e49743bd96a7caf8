"""Row -> record normalisers, one per source schema and record form.

Records are TRL's conversational formats, so the trainers apply the model's chat template
and mask the prompt: SFT {"prompt": [msgs], "completion": [assistant msg]}, preference
{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg]}. Step-wise
preference records (Math-Step-DPO) keep both possible targets instead, and
`data.preference.preference_rows` turns them into the trainer's rows for the phase's
`preference_target`. Evaluation items are plain dicts per suite kind. A bad row raises BadRow
with a short reason, which the loader counts by reason and reports with row ids.
"""

from __future__ import annotations

import json
from typing import Any

from d2lora_dist.prompts import title_prompt


class BadRow(ValueError):
    """A row that cannot be used; the message is the reason (counted per reason)."""


def _text(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise BadRow(f"missing {field}")
    if not isinstance(value, str):
        raise BadRow(f"{field} is not text")
    if not value.strip():
        raise BadRow(f"empty {field}")
    return value


def _messages(row: dict[str, Any], field: str) -> list[dict[str, str]]:
    value = row.get(field)
    if value is None:
        raise BadRow(f"missing {field}")
    if isinstance(value, str):  # some dumps store the message list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(f"unparseable {field} messages") from e
    if not isinstance(value, list) or not value:
        raise BadRow(f"unparseable {field} messages")
    messages = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow(f"unparseable {field} messages")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _split_conversation(messages: list[dict[str, str]], field: str) -> tuple[list[dict], str]:
    """Conversation ending in an assistant turn -> (prompt messages, response text)."""
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"{field} does not end with an assistant turn")
    prompt, response = messages[:-1], messages[-1]["content"]
    if not any(m["role"] == "user" for m in prompt):
        raise BadRow(f"{field} has no user turn")
    if not response.strip():
        raise BadRow(f"empty {field} response")
    if any(not m["content"].strip() for m in prompt):
        raise BadRow(f"empty message in {field}")
    return prompt, response


def _pair(prompt: list[dict], chosen: str, rejected: str) -> dict[str, Any]:
    if chosen.strip() == rejected.strip():
        raise BadRow("chosen == rejected")
    return {"prompt": prompt, "chosen": _assistant(chosen), "rejected": _assistant(rejected)}


# --- orpo-dpo-mix-40k schema: chosen/rejected are message lists that contain the user turn
def chat_pair_sft(row: dict[str, Any]) -> dict[str, Any]:
    prompt, response = _split_conversation(_messages(row, "chosen"), "chosen")
    return {"prompt": prompt, "completion": _assistant(response)}


def chat_pair_preference(row: dict[str, Any]) -> dict[str, Any]:
    prompt, chosen = _split_conversation(_messages(row, "chosen"), "chosen")
    rejected_prompt, rejected = _split_conversation(_messages(row, "rejected"), "rejected")
    if rejected_prompt != prompt:
        raise BadRow("chosen and rejected have different prompts")
    return _pair(prompt, chosen, rejected)


# --- alpaca schema: instruction, input, output
def alpaca_sft(row: dict[str, Any]) -> dict[str, Any]:
    instruction = _text(row, "instruction")
    extra = row.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"prompt": _user(prompt), "completion": _assistant(_text(row, "output"))}


# --- Math-Step-DPO-10K schema: prompt, initial_reason_steps, chosen, rejected, full_chosen,
# full_rejected, answer. initial_reason_steps are the correct steps both answers share (ending
# with the header of the step where they diverge); chosen/rejected are that next step only;
# full_chosen/full_rejected continue from the same point to the final answer. So the whole
# correct solution is initial_reason_steps + full_chosen.
def _steps(row: dict[str, Any]) -> str:
    steps = row.get("initial_reason_steps") or ""
    if not isinstance(steps, str):
        raise BadRow("initial_reason_steps is not text")
    return steps


def _differ(chosen: str, rejected: str, reason: str) -> None:
    if chosen.strip() == rejected.strip():
        raise BadRow(reason)


def math_step_sft(row: dict[str, Any]) -> dict[str, Any]:
    solution = _steps(row) + _text(row, "full_chosen")
    return {"prompt": _user(_text(row, "prompt")), "completion": _assistant(solution)}


def math_step_preference(row: dict[str, Any]) -> dict[str, Any]:
    """Both targets of a step-wise pair: the shared steps (`prefix`, may be empty) go on the prompt
    side, the responses are the next step (`*_step`) or the rest of the solution (`*_full`).
    full_rejected is required here, whatever the target, so `step` and `full` draw the same rows."""
    chosen_step, rejected_step = _text(row, "chosen"), _text(row, "rejected")
    chosen_full, rejected_full = _text(row, "full_chosen"), _text(row, "full_rejected")
    _differ(chosen_step, rejected_step, "chosen == rejected")
    _differ(chosen_full, rejected_full, "full_chosen == full_rejected")
    return {"prompt": _user(_text(row, "prompt")), "prefix": _steps(row),
            "chosen_step": chosen_step, "rejected_step": rejected_step,
            "chosen_full": chosen_full, "rejected_full": rejected_full}


# --- abstract -> title
def title_sft(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": _user(title_prompt(_text(row, "abstract"))), "completion": _assistant(_text(row, "title"))}


def title_preference(row: dict[str, Any]) -> dict[str, Any]:
    """The paper's title against a rejected title: the row's `rejected_title` when the data has
    one, else the abstract's opening words cut to the title's length. Copying the start of the
    abstract is how a small model fails the task, so the pair teaches what a title is; it never
    borrows another paper's title, which could be a held-out one."""
    abstract, title = _text(row, "abstract"), _text(row, "title").strip()
    rejected = row.get("rejected_title")
    if rejected is None:
        rejected = " ".join(abstract.split()[:max(len(title.split()), 4)])
    elif not isinstance(rejected, str) or not rejected.strip():
        raise BadRow("rejected_title is not text")
    return _pair(_user(title_prompt(abstract)), title, rejected.strip())


def title_item(row: dict[str, Any]) -> dict[str, Any]:
    return {"abstract": _text(row, "abstract"), "title": _text(row, "title").strip()}


# --- GSM8K: question, answer ("... #### N")
def gsm8k_item(row: dict[str, Any]) -> dict[str, Any]:
    answer = _text(row, "answer")
    if "####" not in answer:
        raise BadRow("answer has no '#### N' final answer")
    return {"question": _text(row, "question"), "answer": answer}


def gsm8k_sft(row: dict[str, Any]) -> dict[str, Any]:
    item = gsm8k_item(row)
    return {"prompt": _user(item["question"]), "completion": _assistant(item["answer"])}


# --- ARC (allenai/ai2_arc): question, choices{text,label}, answerKey
def arc_item(row: dict[str, Any]) -> dict[str, Any]:
    choices = row.get("choices")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list):
        raise BadRow("unparseable choices")
    texts, labels = choices["text"], choices.get("label") or []
    if len(texts) < 2 or len(texts) != len(labels):
        raise BadRow("choices text/label lengths differ or fewer than 2")
    key = row.get("answerKey")
    if key not in labels:
        raise BadRow("answerKey not among the choice labels")
    return {"question": _text(row, "question"), "choices": list(texts), "labels": list(labels),
            "answer_index": labels.index(key)}
