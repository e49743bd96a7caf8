"""Token lengths of training records, and what `max_length` does to them.

The trainers cut prompt + response to `max_length` tokens (keeping the start), and TRL drops a
row outright when its prompt alone fills `max_length`: no response token would be left to
train. Both happen silently inside TRL; counting them here, from the same chat template,
makes them visible per phase (printed, and stored in result.json and the manifest).

Records are TRL's formats: conversational (lists of messages; a prompt that ends with an
assistant message is a continued turn) or standard (plain text, already templated).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RESPONSE_KEYS = ("completion", "chosen", "rejected")


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    continued = messages[-1]["role"] == "assistant" and generation_prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt
                                         and not continued, continue_final_message=continued)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def record_lengths(record: dict[str, Any], tokenizer: Any) -> tuple[int, list[int]]:
    """(prompt tokens, prompt + response tokens for each response side of the record)."""
    prompt = record["prompt"]
    responses = [record[k] for k in RESPONSE_KEYS if k in record]
    if isinstance(prompt, str):
        return _count(tokenizer, prompt), [_count(tokenizer, prompt + r) for r in responses]
    prompt_text = _render(tokenizer, prompt, generation_prompt=True)
    if prompt[-1]["role"] == "assistant":  # a continued turn: the response extends the open message
        return _count(tokenizer, prompt_text), [_count(tokenizer, prompt_text + r[0]["content"]) for r in responses]
    return _count(tokenizer, prompt_text), [_count(tokenizer, _render(tokenizer, prompt + r, generation_prompt=False))
                                            for r in responses]


@dataclass(frozen=True)
class Truncation:
    max_length: int
    rows: int
    response_cut: int  # prompt fits, but its response (some side of it) loses its end
    prompt_fills: int  # the prompt alone reaches max_length: TRL drops the row
    longest: int  # tokens of the longest prompt + response
    mean_tokens: float  # mean prompt + response tokens (longest side), before truncation

    @property
    def kept(self) -> int:
        return self.rows - self.prompt_fills

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"max_length={self.max_length}: {self.response_cut} of {self.rows} rows have their response cut, "
                f"{self.prompt_fills} have a prompt that fills max_length (dropped: no response token left "
                f"to train); longest row {self.longest} tokens")


def with_response(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The records whose prompt leaves room for at least one response token. TRL's SFT drops the
    others itself; DPO and ORPO would keep them, and the average log-probability of an empty
    response is 0/0, which turns the ORPO odds ratio's gradient into NaN."""
    return [r for r in records if record_lengths(r, tokenizer)[0] < max_length]


def truncation(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> Truncation:
    response_cut = prompt_fills = longest = 0
    total = 0
    for record in records:
        prompt, full = record_lengths(record, tokenizer)
        top = max(full) if full else prompt
        longest, total = max(longest, top), total + top
        if prompt >= max_length:
            prompt_fills += 1
        elif top > max_length:
            response_cut += 1
    return Truncation(max_length, len(records), response_cut, prompt_fills, longest,
                      round(total / len(records), 1) if records else 0.0)
