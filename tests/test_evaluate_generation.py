"""Continuous batched greedy decoding gives the completions of one-by-one greedy decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from evaluate_fixtures import MIXED_PROMPTS, greedy_ids

from d2lora_dist.evaluate.generation import continuous_unsupported, generate

# Prompt lengths from 2 to ~25 tokens: batches mix left padding, and rows that join a
# batch are narrower or wider than the rows already in it.
PROMPTS = [
    *MIXED_PROMPTS,
    "Title: Low rank adapters",
    "She pays $1,250 for rent and $300 for food.",
    "os",
    "Which gas do plants take in?",
    "Return a new path with the file name changed.",
    "2 + 2 =",
]
MAX_NEW = 12
ATTENTION_SCALE = 8.0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama with its attention weights scaled up. At its initial scale attention
    adds little to the residual stream and greedy tokens hardly depend on anything but the
    last token; scaled, a wrong position id, mask or cache row changes the completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.o_proj):
                proj.weight.mul_(ATTENTION_SCALE)
    return model, tokenizer



def cut(ids: list[int], stops: set[int]) -> list[int]:
    return next((ids[:k] for k, t in enumerate(ids) if t in stops), ids)


@pytest.fixture(scope="module")
def stopping(tiny):
    """The tiny model with a second eos: a token its greedy outputs produce at different
    steps, so sequences end at different times and leave the batch while others go on.
    Returns (model, one-by-one reference completions, new token counts)."""
    model, tokenizer = tiny
    greedy = [greedy_ids(model, tokenizer, p, MAX_NEW) for p in PROMPTS]
    first_steps: dict[int, set[int]] = {}  # token -> the steps at which it first appears
    for ids in greedy:
        for k, t in enumerate(ids):
            if t not in ids[:k]:
                first_steps.setdefault(t, set()).add(k)
    stop = max(first_steps, key=lambda t: len(first_steps[t]))
    stops = {tokenizer.eos_token_id, stop}
    assert len({len(cut(ids, stops)) for ids in greedy}) >= 3  # several different end steps
    stopped = copy.deepcopy(model)
    stopped.generation_config.eos_token_id = sorted(stops)
    cut_ids = [cut(ids, stops) for ids in greedy]
    reference = [tokenizer.decode(ids, skip_special_tokens=True) for ids in cut_ids]
    new_tokens = [min(len(ids) + 1, MAX_NEW) for ids in cut_ids]  # the stop token is generated too
    return stopped, reference, new_tokens


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 32])
def test_continuous_batches_give_one_by_one_greedy_completions(tiny, stopping, batch_size):
    _, tokenizer = tiny
    model, reference, _ = stopping
    assert continuous_unsupported(model) is None
    assert generate(model, tokenizer, PROMPTS, MAX_NEW, batch_size, progress=False) == reference
    assert len(set(reference)) > 3  # a constant model would make the comparison vacuous


def test_finished_rows_cost_no_compute_and_batches_stay_full(tiny, stopping, monkeypatch):
    """Every new token but the first (which the prompt's pass yields) costs exactly one row
    of one decoding step; no step holds more than batch_size rows, nor fewer while prompts wait."""
    _, tokenizer = tiny
    model, _, new_tokens = stopping
    steps = []  # (rows, input length) of every forward pass
    original = type(model).forward

    def spy(self, *args, **kwargs):
        steps.append(tuple(kwargs["input_ids"].shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    batch_size = 3
    generate(model, tokenizer, PROMPTS, MAX_NEW, batch_size, progress=False)
    decode_rows = [rows for rows, length in steps if length == 1]
    prefill_rows = [rows for rows, length in steps if length > 1]
    assert sum(decode_rows) == sum(n - 1 for n in new_tokens)
    assert sum(prefill_rows) == len(PROMPTS)
    assert max(decode_rows) <= batch_size
    # the rows decoded before the last prompt joined: always a full batch
    last_prefill = max(i for i, (_, length) in enumerate(steps) if length > 1)
    assert all(rows == batch_size for rows, length in steps[:last_prefill] if length == 1)


def test_max_new_tokens_one_and_repeated_prompts(tiny):
    model, tokenizer = tiny
    prompts = ["hi", "hi", PROMPTS[1], "hi"]
    one = generate(model, tokenizer, prompts, 1, batch_size=2, progress=False)
    assert one == [tokenizer.decode(greedy_ids(model, tokenizer, p, 1), skip_special_tokens=True) for p in prompts]
    assert generate(model, tokenizer, [], 4, batch_size=2, progress=False) == []


def test_a_generation_config_with_logits_settings_goes_through_hf_generate(tiny, monkeypatch):
    model, tokenizer = tiny
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.5
    assert continuous_unsupported(penalised) == "generation_config.repetition_penalty=1.5"
    reference = [tokenizer.decode(cut(greedy_ids(penalised, tokenizer, p, MAX_NEW), {tokenizer.eos_token_id}),
                                  skip_special_tokens=True) for p in PROMPTS[:4]]
    calls = []
    original = type(penalised).generate
    monkeypatch.setattr(type(penalised), "generate", lambda self, **kw: calls.append(1) or original(self, **kw))
    assert generate(penalised, tokenizer, PROMPTS[:4], MAX_NEW, batch_size=2, progress=False) == reference
    assert len(calls) == 2
    # the plain model does not: the penalty is what changed the completions
    assert generate(model, tokenizer, PROMPTS[:4], MAX_NEW, batch_size=2, progress=False) != reference


def test_a_lora_wrapped_model_decodes_like_its_own_generate(tiny):
    import peft

    model, tokenizer = tiny
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    reference = [tokenizer.decode(cut(greedy_ids(lora, tokenizer, p, MAX_NEW), {tokenizer.eos_token_id}),
                                  skip_special_tokens=True) for p in PROMPTS[:5]]
    assert generate(lora, tokenizer, PROMPTS[:5], MAX_NEW, batch_size=2, progress=False) == reference
    assert reference != [tokenizer.decode(cut(greedy_ids(model, tokenizer, p, MAX_NEW), {tokenizer.eos_token_id}),
                                          skip_special_tokens=True) for p in PROMPTS[:5]]
