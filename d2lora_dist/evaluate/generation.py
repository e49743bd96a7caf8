"""Batched greedy generation for the generative suites (GSM8K, titles).

Prompts are padded on the LEFT by this module itself (never by mutating the caller's
tokenizer), so every prompt's last token sits at the end of its row and new tokens
append right after it; position ids count real tokens only.

Decoding is continuous: a batch holds up to `batch_size` sequences, and a sequence that
ends (a stop token, or max_new_tokens) leaves the batch at once, its row and its slice of
the key/value cache dropped, while the next prompt (longest first) is encoded and joined
to the batch in its place. No compute goes to finished rows, and a batch never waits for
its longest completion. Each sequence sees exactly what it would see alone (its own
tokens, its own positions, pads masked), so greedy completions equal one-by-one greedy
decoding up to float reduction order (tests/test_evaluate_generation.py).

Where that loop cannot reproduce `generate` (a generation config that asks for logits
processing such as repetition_penalty, or a cache that is not plain per-layer key/value
tensors, e.g. sliding-window layers), batches go through `model.generate` instead,
longest prompts first and `batch_size` at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
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


# Generation-config fields that make `generate` change the logits before its argmax (or
# stop on something other than tokens and length); the continuous loop applies none.
LOGITS_SETTINGS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                   "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_length",
                   "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                   "begin_suppress_tokens", "exponential_decay_length_penalty", "guidance_scale",
                   "remove_invalid_values", "stop_strings", "max_time")


def continuous_unsupported(model: Any) -> str | None:
    """Why the continuous loop cannot stand in for `generate` on this model, or None."""
    from transformers import GenerationConfig
    from transformers.cache_utils import DynamicCache, DynamicLayer

    config = getattr(model, "generation_config", None)
    if config is not None:
        default = GenerationConfig()
        for key in LOGITS_SETTINGS:
            value = getattr(config, key, None)
            if value is not None and value != getattr(default, key, None):
                return f"generation_config.{key}={value!r}"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    layers = DynamicCache(config=model.config).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "cache layers are not plain key/value tensors"
    return None


@dataclass
class Active:
    """The sequences being decoded: row r is prompt `rows[r]`; `last` holds each row's newest
    token (not yet fed to the model), `positions` its position id, `mask` marks real columns
    of the cache (prompt and fed tokens) and grows by one column per step."""

    rows: list[int]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor

    def keep(self, keep: list[int]) -> None:
        """Drop every row not in `keep`, then the leading columns no remaining row uses."""
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.rows = [self.rows[k] for k in keep]
            self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]

    def join(self, other: Active) -> None:
        """Append `other`'s rows, left-padding the narrower cache and mask to the common width."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, -2), pad(theirs.keys, -2)])
            mine.values = torch.cat([pad(mine.values, -2), pad(theirs.values, -2)])
        self.rows += other.rows
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])


def _forward_next(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                  cache: Any) -> tuple[torch.Tensor, Any]:
    """Greedy next token after each row of `ids`, and the updated cache. Like `generate`,
    no mask is passed when nothing is padded, and the argmax is taken in float32."""
    out = model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float().argmax(-1), out.past_key_values


def _prefill(model: Any, rows: list[int], prompts: Sequence[list[int]], pad_id: int) -> Active:
    from transformers.cache_utils import DynamicCache

    batch = left_pad(prompts, pad_id, model_device(model))
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    last, cache = _forward_next(model, batch["input_ids"], mask, positions, DynamicCache(config=model.config))
    return Active(rows, cache, mask, mask.sum(-1), last)


def _step(model: Any, active: Active) -> None:
    mask = torch.cat([active.mask, active.mask.new_ones((len(active.rows), 1))], dim=1)
    active.last, active.cache = _forward_next(model, active.last[:, None], mask, active.positions[:, None],
                                              active.cache)
    active.mask, active.positions = mask, active.positions + 1


def _record(active: Active, new_ids: dict[int, list[int]], stops: set[int], max_new_tokens: int) -> list[int]:
    """Append each row's newest token to its completion; the rows that go on."""
    going = []
    for r, (row, token) in enumerate(zip(active.rows, active.last.tolist(), strict=True)):
        new_ids[row].append(token)
        if token not in stops and len(new_ids[row]) < max_new_tokens:
            going.append(r)
    return going


def _decode_continuous(model: Any, encoded: Sequence[list[int]], order: Sequence[int], max_new_tokens: int,
                       batch_size: int, stops: list[int], pad_id: int, bar: Any) -> dict[int, list[int]]:
    """New token ids per prompt (stop token included, if reached)."""
    stop_set = set(stops)
    new_ids: dict[int, list[int]] = {i: [] for i in order}
    pending = list(reversed(order))  # pop() takes the next prompt in `order`
    active: Active | None = None
    while pending or active is not None:
        free = batch_size - (len(active.rows) if active is not None else 0)
        if pending and free > 0:
            rows = [pending.pop() for _ in range(min(free, len(pending)))]
            batch = _prefill(model, rows, [encoded[i] for i in rows], pad_id)
        else:
            assert active is not None
            _step(model, active)
            batch, active = active, None
        going = _record(batch, new_ids, stop_set, max_new_tokens)
        bar.update(len(batch.rows) - len(going))
        if going:
            batch.keep(going)
            if active is None:
                active = batch
            else:
                active.join(batch)
    return new_ids


def _generate_batch(model: Any, batch: dict[str, torch.Tensor], max_new_tokens: int, stops: list[int],
                    pad_id: int) -> list[list[int]]:
    # Sampling knobs are nulled so a model's sampling defaults (temperature, top_p)
    # neither apply nor warn: decoding is greedy, one beam.
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                         pad_token_id=pad_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def _decode_static(model: Any, encoded: Sequence[list[int]], order: Sequence[int], max_new_tokens: int,
                   batch_size: int, stops: list[int], pad_id: int, bar: Any) -> dict[int, list[int]]:
    """`model.generate`, `batch_size` prompts at a time in `order`."""
    new_ids = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = left_pad([encoded[i] for i in idx], pad_id, model_device(model))
        new_ids.update(zip(idx, _generate_batch(model, batch, max_new_tokens, stops, pad_id), strict=True))
        bar.update(len(idx))
    return new_ids


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
             desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy completions of `prompts` (new text only, special tokens removed), in input order.
    `batch_size` is the most sequences decoded together."""
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
    decode = _decode_static if continuous_unsupported(model) else _decode_continuous
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, disable=not progress,
                                          unit="prompt") as bar:
            new_ids = decode(model, encoded, order, max_new_tokens, batch_size, stops, pad_id, bar)
    finally:
        model.train(was_training)
    stop_set = set(stops)
    return [tokenizer.decode(_cut_at_stop(new_ids[i], stop_set), skip_special_tokens=True)
            for i in range(len(prompts))]
