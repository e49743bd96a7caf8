"""Batched greedy generation for the generative suites (GSM8K, titles).

Prompts are padded on the LEFT by this module itself (never by mutating the caller's
tokenizer), so every prompt's last token sits at the end of its row and new tokens
append right after it; position ids come from the attention mask inside `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

# Turn-end tokens of common chat formats: instruct models end a reply with these, and
# their configs do not always list them as eos (Llama-3 <|eot_id|>, ChatML <|im_end|>).
EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|im_end|>")


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end a completion: every eos the model or tokenizer declares plus
    known turn-end tokens present in the vocabulary (order kept, no duplicates)."""
    ids = _as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids += _as_list(getattr(getattr(model, "config", None), "eos_token_id", None))
    ids += _as_list(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in EXTRA_STOP_TOKENS if token in vocab]
    if not ids:
        raise ValueError("stop_token_ids: neither the model nor the tokenizer defines an eos token; "
                         "generation would only stop at max_new_tokens")
    return list(dict.fromkeys(ids))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, adding the tokenizer's special tokens (e.g. BOS) unless the
    text already starts with BOS, as chat templates such as Llama-3's do (a doubled BOS
    measurably hurts those models)."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    """New tokens up to (excluding) the first stop token; `generate` pads finished rows
    with pad tokens, and a stop token need not be a special token skip_special drops."""
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def _generate_batch(model: Any, batch: dict[str, torch.Tensor], max_new_tokens: int, stops: list[int],
                    pad_id: int) -> list[list[int]]:
    # Sampling knobs are nulled so a model's sampling defaults (temperature, top_p)
    # neither apply nor warn: decoding is greedy, one beam.
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                         pad_token_id=pad_id)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    return [_cut_at_stop(row, set(stops)) for row in new]


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
             desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy completions of `prompts` (new text only, special tokens removed), in input order."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generate: batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                         f"{max_new_tokens}")
    stops = stop_token_ids(tokenizer, model)
    # No pad token (common for base models): pad with eos; the attention mask hides it.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    # Longest first: similar lengths share a batch (little padding), and an
    # out-of-memory batch shows up at the start rather than after an hour.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    completions: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, disable=not progress,
                                          unit="prompt") as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = _left_pad([encoded[i] for i in idx], pad_id, model_device(model))
                for i, ids in zip(idx, _generate_batch(model, batch, max_new_tokens, stops, pad_id), strict=True):
                    completions[i] = tokenizer.decode(ids, skip_special_tokens=True)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return completions
