"""Log-likelihood of continuations given contexts (multiple-choice scoring, e.g. ARC).

The context and the continuation are tokenised SEPARATELY and their ids concatenated:
tokenising the joined string could merge the last context character with the first
continuation character into one token, and then no token boundary would separate
"what the model was given" from "what it is scored on".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from d2lora_dist.evaluate.generation import encode_prompt, model_device


def _requests(tokenizer: Any, contexts: Sequence[str],
              continuations: Sequence[Sequence[str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per choice, flattened item-major."""
    if len(contexts) != len(continuations):
        raise ValueError(f"choice_logliks: {len(contexts)} contexts but {len(continuations)} "
                         "continuation lists")
    requests = []
    for i, (context, choices) in enumerate(zip(contexts, continuations, strict=True)):
        ctx = encode_prompt(tokenizer, context)
        if not ctx:
            raise ValueError(f"choice_logliks: context {i} is empty after tokenisation (and the "
                             "tokenizer adds no BOS), so the first continuation token has no condition")
        for choice in choices:
            cont = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
            if not cont:
                raise ValueError(f"choice_logliks: continuation {choice!r} of context {i} has no tokens")
            requests.append((ctx, cont))
    return requests


def _score_batch(model: Any, batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Summed log-probabilities of each continuation, one forward pass per batch.

    Right padding: with a causal mask, pads after a sequence cannot affect it, and
    positions 0..n-1 stay the default position ids.
    """
    rows = [ctx + cont for ctx, cont in batch]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    device = model_device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    sums = []
    for i, (ctx, cont) in enumerate(batch):
        # Logits at position t predict token t+1: the continuation tokens at positions
        # len(ctx)..end are predicted by positions len(ctx)-1..end-1. float32 before
        # log_softmax so bf16 rounding does not leak into the sums.
        start = len(ctx) - 1
        logprobs = logits[i, start:start + len(cont)].float().log_softmax(-1)
        target = torch.tensor(cont, device=logprobs.device)
        sums.append(float(logprobs.gather(-1, target[:, None]).sum()))
    return sums


def choice_logliks(model: Any, tokenizer: Any, contexts: list[str], continuations: list[list[str]],
                   batch_size: int, desc: str = "loglik", progress: bool = False) -> list[list[tuple[float, int]]]:
    """For each context, [(sum log p(continuation | context), len(continuation) in characters)]
    per continuation, in input order. The character length is what lm-eval-harness
    `acc_norm` divides by."""
    if batch_size < 1:
        raise ValueError(f"choice_logliks: batch_size must be >= 1, got {batch_size}")
    requests = _requests(tokenizer, contexts, continuations)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked anyway
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))  # longest first
    scores = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(requests), desc=desc, disable=not progress,
                                          unit="choice") as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                for i, score in zip(idx, _score_batch(model, [requests[i] for i in idx], pad_id), strict=True):
                    scores[i] = score
                bar.update(len(idx))
    finally:
        model.train(was_training)
    result, k = [], 0
    for choices in continuations:
        result.append([(scores[k + j], len(choice)) for j, choice in enumerate(choices)])
        k += len(choices)
    return result
