"""Shared-context continuation scoring equals straightforward per-choice scoring, item by item."""

from __future__ import annotations

import math

import pytest
import torch

from d2lora_dist.evaluate.generation import encode_prompt
from d2lora_dist.evaluate.loglik import Span, choice_logliks, plan_batches

# Uneven numbers of choices (1 to 5), short and long contexts, one-token and long
# continuations, so batches mix left-padded contexts and right-padded continuations.
CONTEXTS = [
    "Question: Which gas do plants take in?\nAnswer:",
    "Question: 2 + 2?\nAnswer:",
    "Question: A train travels 120 km in 2 hours. What is its speed in km per hour?\nAnswer:",
    "Question: x?\nAnswer:",
    "Question: Which of these is a regular expression for digits?\nAnswer:",
]
CONTINUATIONS = [
    [" carbon dioxide", " oxygen", " a very long answer about noble gases and their uses", " neon"],
    [" 4"],
    [" 60", " 240", " sixty kilometres per hour", " 120", " 2"],
    [" yes", " no"],
    [" \\d+", " [a-z]", " json"],
]
# Contexts whose last characters and the continuation's first characters merge into
# other tokens when the joined string is tokenised (checked in the test): the scored
# tokens must still be exactly the continuation's own.
BOUNDARY_CONTEXTS = ["Question: Which gas do pla", "A train travels 60 km per hou", "regular expres", "Answer: "]
BOUNDARY_CONTINUATIONS = [["nts take in?", "ces"], ["r", "rs"], ["sions", "s"], ["carbon dioxide", "4"]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def per_choice_logliks(model, tokenizer, contexts, continuations) -> list[list[float]]:
    """The straightforward reference: one unpadded forward pass over context + choice per
    choice, context and choice tokenised separately, the choice's tokens summed."""
    result = []
    for context, choices in zip(contexts, continuations, strict=True):
        ctx = encode_prompt(tokenizer, context)
        scores = []
        for choice in choices:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logprobs = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        result.append(scores)
    return result


def assert_same_scores(result, reference, continuations) -> None:
    assert [len(r) for r in result] == [len(c) for c in continuations]
    for item, (scored, expected, choices) in enumerate(zip(result, reference, continuations, strict=True)):
        for j, ((loglik, n_chars), want, choice) in enumerate(zip(scored, expected, choices, strict=True)):
            assert n_chars == len(choice)
            # padded batches vs one unpadded pass per choice: another summation order; measured at most 3.7e-5 on
            # |loglik| up to 300 and 2.9e-6 below 30, under 2% of this bound, on avx2 and ATEN_CPU_CAPABILITY=default
            assert math.isclose(loglik, want, rel_tol=1e-5, abs_tol=1e-4), (item, j, loglik, want)
        # the predictions (argmax and length-normalised argmax) agree as well
        got = [ll for ll, _ in scored]
        assert max(range(len(got)), key=got.__getitem__) == max(range(len(expected)), key=expected.__getitem__)
        norm = [ll / n for ll, n in scored]
        want_norm = [ll / len(c) for ll, c in zip(expected, choices, strict=True)]
        assert max(range(len(norm)), key=norm.__getitem__) == max(range(len(want_norm)), key=want_norm.__getitem__)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 7, 64])
def test_shared_context_scores_equal_per_choice_scores_item_by_item(tiny, batch_size):
    model, tokenizer = tiny
    reference = per_choice_logliks(model, tokenizer, CONTEXTS, CONTINUATIONS)
    result = choice_logliks(model, tokenizer, CONTEXTS, CONTINUATIONS, batch_size=batch_size)
    assert_same_scores(result, reference, CONTINUATIONS)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_continuation_tokens_are_the_choice_own_tokens_at_a_merging_boundary(tiny, batch_size):
    model, tokenizer = tiny
    merged = [ctx + cont for ctx, conts in zip(BOUNDARY_CONTEXTS, BOUNDARY_CONTINUATIONS, strict=True)
              for cont in conts
              if encode_prompt(tokenizer, ctx + cont)
              != encode_prompt(tokenizer, ctx) + tokenizer(cont, add_special_tokens=False)["input_ids"]]
    assert len(merged) >= 3  # the joined strings really tokenise differently at the boundary
    reference = per_choice_logliks(model, tokenizer, BOUNDARY_CONTEXTS, BOUNDARY_CONTINUATIONS)
    result = choice_logliks(model, tokenizer, BOUNDARY_CONTEXTS, BOUNDARY_CONTINUATIONS, batch_size=batch_size)
    assert_same_scores(result, reference, BOUNDARY_CONTINUATIONS)


def test_scores_do_not_depend_on_item_order(tiny):
    model, tokenizer = tiny
    forward = choice_logliks(model, tokenizer, CONTEXTS, CONTINUATIONS, batch_size=5)
    backward = choice_logliks(model, tokenizer, CONTEXTS[::-1], CONTINUATIONS[::-1], batch_size=5)[::-1]
    for a, b in zip(sum(forward, []), sum(backward, []), strict=True):
        assert math.isclose(a[0], b[0], rel_tol=1e-5, abs_tol=1e-4)


def test_each_context_is_encoded_once_per_batch(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = []
    original = type(model).forward

    def spy(self, *args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    choice_logliks(model, tokenizer, CONTEXTS, CONTINUATIONS, batch_size=64)
    width = max(len(encode_prompt(tokenizer, c)) for c in CONTEXTS)
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for cs in CONTINUATIONS for c in cs)
    # one pass over the 5 contexts, one over the 15 continuations (all but their last token)
    assert calls == [(len(CONTEXTS), width), (sum(map(len, CONTINUATIONS)), longest - 1)]


def test_single_token_continuations_need_no_second_pass(tiny, monkeypatch):
    model, tokenizer = tiny
    contexts, continuations = ["Question: 2 + 2?\nAnswer:"], [[" a", " the"]]
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in continuations[0])
    calls = []
    original = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    result = choice_logliks(model, tokenizer, contexts, continuations, batch_size=4)
    assert len(calls) == 1
    assert_same_scores(result, per_choice_logliks(model, tokenizer, contexts, continuations), continuations)


@pytest.mark.parametrize("n_choices, batch_size, expected", [
    ([4, 3], 8, [[Span(0, 0, 4), Span(1, 0, 3)]]),
    ([4, 3], 3, [[Span(0, 0, 3)], [Span(0, 3, 4), Span(1, 0, 2)], [Span(1, 2, 3)]]),
    ([5, 0, 2], 2, [[Span(0, 0, 2)], [Span(0, 2, 4)], [Span(0, 4, 5), Span(2, 0, 1)], [Span(2, 1, 2)]]),
    ([2, 2], 1, [[Span(0, 0, 1)], [Span(0, 1, 2)], [Span(1, 0, 1)], [Span(1, 1, 2)]]),
])
def test_plan_batches_splits_an_item_across_batches_and_covers_every_choice_once(n_choices, batch_size, expected):
    plan = plan_batches(range(len(n_choices)), n_choices, batch_size)
    assert plan == expected
    assert all(sum(s.hi - s.lo for s in batch) <= batch_size for batch in plan)


def test_items_without_choices_and_model_mode(tiny):
    model, tokenizer = tiny
    model.train()
    try:
        result = choice_logliks(model, tokenizer, CONTEXTS[:2], [[], [" 4", " five"]], batch_size=2)
        assert model.training
    finally:
        model.eval()
    assert result[0] == [] and [n for _, n in result[1]] == [2, 5]


@pytest.mark.parametrize("contexts, continuations, batch_size, message", [
    (["a"], [["b"], ["c"]], 2, "1 contexts but 2 continuation lists"),
    (["Question: a?\nAnswer:"], [[""]], 2, "has no tokens"),
    (["Question: a?\nAnswer:"], [[" b"]], 0, "batch_size must be >= 1"),
])
def test_bad_requests_are_errors(tiny, contexts, continuations, batch_size, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        choice_logliks(model, tokenizer, contexts, continuations, batch_size=batch_size)
