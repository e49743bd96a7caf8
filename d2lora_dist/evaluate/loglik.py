"""Log-likelihood of continuations given contexts (multiple-choice scoring, e.g. ARC).

The context and the continuation are tokenised SEPARATELY and their ids concatenated:
tokenising the joined string could merge the last context character with the first
continuation character into one token, and then no token boundary would separate
"what the model was given" from "what it is scored on".

The choices of one question share its context, so the context is encoded once per batch
instead of once per choice. One forward pass over the batch's contexts (left-padded, so
every context ends in the last column) gives each context's key/value cache and, at its
last position, the distribution of every continuation's first token. The cache is then
repeated once per choice and the continuations (all tokens but their last: token t
predicts token t+1) run against it, right-padded, in a second pass. Mathematically this is
the score of each context+continuation sequence on its own; in floating point it differs
by reduction order only (tests/test_evaluate_loglik.py compares the two item by item).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from d2lora_dist.evaluate.generation import encode_prompt, left_pad, model_device


@dataclass(frozen=True)
class Span:
    """Choices lo..hi-1 of item `item`: the part of one item that one batch scores."""

    item: int
    lo: int
    hi: int


def _encode(tokenizer: Any, contexts: Sequence[str],
            continuations: Sequence[Sequence[str]]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Context ids per item and continuation ids per choice."""
    if len(contexts) != len(continuations):
        raise ValueError(f"choice_logliks: {len(contexts)} contexts but {len(continuations)} "
                         "continuation lists")
    ctx_ids, cont_ids = [], []
    for i, (context, choices) in enumerate(zip(contexts, continuations, strict=True)):
        ctx = encode_prompt(tokenizer, context)
        if not ctx:
            raise ValueError(f"choice_logliks: context {i} is empty after tokenisation (and the "
                             "tokenizer adds no BOS), so the first continuation token has no condition")
        conts = []
        for choice in choices:
            cont = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
            if not cont:
                raise ValueError(f"choice_logliks: continuation {choice!r} of context {i} has no tokens")
            conts.append(cont)
        ctx_ids.append(ctx)
        cont_ids.append(conts)
    return ctx_ids, cont_ids


def plan_batches(order: Sequence[int], n_choices: Sequence[int], batch_size: int) -> list[list[Span]]:
    """The items in `order`, at most `batch_size` choices per batch. An item whose choices do
    not fit in what is left of a batch continues in the next one (its context is then
    encoded in both)."""
    batches: list[list[Span]] = []
    current: list[Span] = []
    used = 0
    for item in order:
        lo = 0
        while lo < n_choices[item]:
            hi = min(n_choices[item], lo + batch_size - used)
            current.append(Span(item, lo, hi))
            used += hi - lo
            lo = hi
            if used == batch_size:
                batches.append(current)
                current, used = [], 0
    if current:
        batches.append(current)
    return batches


def _encode_contexts(model: Any, contexts: Sequence[list[int]], pad_id: int,
                     device: torch.device) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(log-probabilities of the token after each context [G, vocab], the contexts' cache,
    their attention mask [G, width]). Left padding: every context ends in the last column;
    position ids count real tokens only, as `generate` does with left padding."""
    batch = left_pad(contexts, pad_id, device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    # float32 before log_softmax so bf16 rounding does not leak into the sums
    return out.logits[:, -1].float().log_softmax(-1), out.past_key_values, mask


def _score_batch(model: Any, spans: Sequence[Span], ctx_ids: Sequence[list[int]],
                 cont_ids: Sequence[Sequence[list[int]]], pad_id: int) -> list[float]:
    """Summed log-probabilities of the continuations of `spans`, in span order."""
    device = model_device(model)
    first, cache, ctx_mask = _encode_contexts(model, [ctx_ids[s.item] for s in spans], pad_id, device)
    rows = [(g, cont_ids[s.item][j]) for g, s in enumerate(spans) for j in range(s.lo, s.hi)]
    # Token 0 of a continuation is predicted by its context's last position.
    token_logprobs = [first[g, cont[0]].view(1) for g, cont in rows]
    width = max(len(cont) for _, cont in rows) - 1  # inputs: every continuation token but the last
    if width > 0:
        group = torch.tensor([g for g, _ in rows], device=device)
        cache.batch_select_indices(group)  # one copy of its context's cache per choice
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, cont) in enumerate(rows):
            ids[r, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
            cont_mask[r, :len(cont) - 1] = 1
        cont_mask = cont_mask.to(device)
        # Right padding after each continuation: a causal mask keeps pads out of real positions.
        positions = ctx_mask.sum(-1)[group, None] + torch.arange(width, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=torch.cat([ctx_mask[group], cont_mask], dim=1),
                       position_ids=positions, past_key_values=cache, use_cache=True).logits
        for r, (_, cont) in enumerate(rows):
            if len(cont) > 1:  # position t predicts continuation token t+1
                logprobs = logits[r, :len(cont) - 1].float().log_softmax(-1)
                target = torch.tensor(cont[1:], device=logprobs.device)
                token_logprobs[r] = torch.cat([token_logprobs[r], logprobs.gather(-1, target[:, None])[:, 0]])
    return [float(lp.sum()) for lp in token_logprobs]


def choice_logliks(model: Any, tokenizer: Any, contexts: list[str], continuations: list[list[str]],
                   batch_size: int, desc: str = "loglik", progress: bool = False) -> list[list[tuple[float, int]]]:
    """For each context, [(sum log p(continuation | context), len(continuation) in characters)]
    per continuation, in input order. The character length is what lm-eval-harness
    `acc_norm` divides by. `batch_size` counts continuations (choices) per forward pass."""
    if batch_size < 1:
        raise ValueError(f"choice_logliks: batch_size must be >= 1, got {batch_size}")
    ctx_ids, cont_ids = _encode(tokenizer, contexts, continuations)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked anyway
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory
    # batch shows up at the start. The continuation pass has a row per choice (about 4 per
    # context), so its padding counts most: longest choice first, then longest context.
    order = sorted(range(len(contexts)), key=lambda i: (-max(map(len, cont_ids[i]), default=0), -len(ctx_ids[i])))
    scores: list[list[float]] = [[0.0] * len(conts) for conts in cont_ids]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=sum(map(len, cont_ids)), desc=desc, disable=not progress,
                                          unit="choice") as bar:
            for spans in plan_batches(order, [len(c) for c in cont_ids], batch_size):
                batch_scores = iter(_score_batch(model, spans, ctx_ids, cont_ids, pad_id))
                for span in spans:
                    for j in range(span.lo, span.hi):
                        scores[span.item][j] = next(batch_scores)
                bar.update(sum(s.hi - s.lo for s in spans))
    finally:
        model.train(was_training)
    return [[(score, len(choice)) for score, choice in zip(item_scores, choices, strict=True)]
            for item_scores, choices in zip(scores, continuations, strict=True)]
