"""Evaluation throughput: the previous ARC scoring and GSM8K decoding against today's, same items.

    .venv/bin/python benchmarks/eval_throughput.py [--arc-items 200] [--gsm8k-items 16] [--lm-eval]

Real SmolLM2-135M-Instruct (offline asset), float32, on this machine's CPU. For each suite the
BASELINE below (a copy of the algorithm the library used before shared-context scoring and
continuous decoding, kept here only so both run in one process on the same items) and the
library's current function run on the same items with the suite's prompts and settings. The
script checks that the per-item results agree (ARC: every choice's log-likelihood within
--tolerance and identical acc / acc_norm predictions; GSM8K: identical completions), prints
times and the ratio old/new, and exits 1 when they do not agree. Old and new run alternately
--repeats times after a short warm-up and the fastest run of each counts: on a shared CPU the
load of other processes changes from one run to the next.

--lm-eval also scores the ARC items with lm-evaluation-harness's HFLM on the same model object
and compares its log-likelihoods with the library's. HFLM needs nothing beyond this project's
dependencies, so lm-eval installs without touching torch:

    PIP_CONSTRAINT=launch/constraints.txt .venv/bin/pip install --no-deps --target /tmp/lm-eval-pkg lm-eval==0.4.13
    PYTHONPATH=/tmp/lm-eval-pkg .venv/bin/python benchmarks/eval_throughput.py --lm-eval
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from d2lora_dist.assets import resolve_asset_uri
from d2lora_dist.config import DatasetRef
from d2lora_dist.data.loading import normalize
from d2lora_dist.evaluate import suites
from d2lora_dist.evaluate.generation import (
    _cut_at_stop,
    _generate_batch,
    _left_pad,
    encode_prompt,
    generate,
    model_device,
    stop_token_ids,
)
from d2lora_dist.evaluate.loglik import choice_logliks
from d2lora_dist.evaluate.scoring import arc_predictions, score_row

# --- BASELINE: the algorithms before this change, for comparison only ------------------------


def choice_logliks_reference(model: Any, tokenizer: Any, contexts: list[str], continuations: list[list[str]],
                             batch_size: int) -> list[list[tuple[float, int]]]:
    """BASELINE ARC scoring: every context+choice sequence is its own row (the context is
    encoded once per choice), rows sorted longest first and right-padded, logits computed
    at every position."""
    requests = []
    for context, choices in zip(contexts, continuations, strict=True):
        ctx = encode_prompt(tokenizer, context)
        requests += [(ctx, list(tokenizer(c, add_special_tokens=False)["input_ids"])) for c in choices]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    scores = [0.0] * len(requests)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [requests[i] for i in idx]
            rows = [ctx + cont for ctx, cont in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
                mask[r, :len(row)] = 1
            device = model_device(model)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, (i, (ctx, cont)) in enumerate(zip(idx, batch, strict=True)):
                logprobs = logits[r, len(ctx) - 1:len(ctx) - 1 + len(cont)].float().log_softmax(-1)
                target = torch.tensor(cont, device=logprobs.device)
                scores[i] = float(logprobs.gather(-1, target[:, None]).sum())
    result, k = [], 0
    for choices in continuations:
        result.append([(scores[k + j], len(c)) for j, c in enumerate(choices)])
        k += len(choices)
    return result


def generate_reference(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                       batch_size: int) -> list[str]:
    """BASELINE decoding: `model.generate` on static batches of batch_size prompts (longest
    first); a batch runs until its last sequence ends, finished rows padded along."""
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    completions = [""] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = _left_pad([encoded[i] for i in idx], pad_id, model_device(model))
            for i, ids in zip(idx, _generate_batch(model, batch, max_new_tokens, stops, pad_id), strict=True):
                completions[i] = tokenizer.decode(_cut_at_stop(ids, set(stops)), skip_special_tokens=True)
    return completions


# --- the comparison --------------------------------------------------------------------------


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def old_and_new(old_fn: Any, new_fn: Any, repeats: int) -> tuple[Any, Any, float, float]:
    """Both results and each one's fastest time over `repeats` alternating runs (old, new, old,
    new, ...): on a shared machine the load changes between runs, and the minimum is the
    run least disturbed by it. Repeated runs must give the same results."""
    old_times, new_times, old, new = [], [], None, None
    for _ in range(repeats):
        result, seconds = timed(old_fn)
        assert old is None or result == old, "the baseline gave different results on a repeated run"
        old, old_times = result, old_times + [seconds]
        result, seconds = timed(new_fn)
        assert new is None or result == new, "the new implementation gave different results on a repeated run"
        new, new_times = result, new_times + [seconds]
    print(f"  runs: baseline {', '.join(f'{t:.1f}' for t in old_times)} s; "
          f"new {', '.join(f'{t:.1f}' for t in new_times)} s")
    return old, new, min(old_times), min(new_times)


def arc_requests(items: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The suite's own prompts: context and " " + choice, as predict_arc builds them."""
    return ([suites.arc_prompt(item) for item in items],
            [[" " + choice for choice in item["choices"]] for item in items])


def compare_arc(name: str, items: Sequence[dict[str, Any]], old: list[list[tuple[float, int]]],
                new: list[list[tuple[float, int]]], tolerance: float) -> bool:
    diffs = [abs(a[0] - b[0]) for o, n in zip(old, new, strict=True) for a, b in zip(o, n, strict=True)]
    preds = [(arc_predictions([ll for ll, _ in o], item["choices"]), arc_predictions([ll for ll, _ in n], item["choices"]))
             for item, o, n in zip(items, old, new, strict=True)]
    same_acc = sum(a[0] == b[0] for a, b in preds)
    same_norm = sum(a[1] == b[1] for a, b in preds)
    acc = [sum(p[k][0] == item["answer_index"] for p, item in zip(preds, items, strict=True)) / len(items)
           for k in (0, 1)]
    ok = max(diffs) <= tolerance and same_acc == same_norm == len(items)
    print(f"  {name}: max |Δ loglik| {max(diffs):.2e} over {len(diffs)} choices (tolerance {tolerance:g}); "
          f"acc predictions equal on {same_acc}/{len(items)}, acc_norm on {same_norm}/{len(items)}; "
          f"accuracy {acc[0]:.4f} vs {acc[1]:.4f}  {'OK' if ok else 'MISMATCH'}")
    return ok


def run_arc(model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[bool, list[tuple[str, float, float]]]:
    items = load_items("arc_easy", "asset:arc_easy", args.arc_items)
    contexts, continuations = arc_requests(items)
    n_choices = sum(map(len, continuations))
    print(f"ARC-Easy: {len(items)} items, {n_choices} choices, batch_size {args.arc_batch_size}")
    # warm-up: the first passes of a process pay for memory the allocator has not mapped yet
    choice_logliks_reference(model, tokenizer, contexts[:8], continuations[:8], args.arc_batch_size)
    choice_logliks(model, tokenizer, contexts[:8], continuations[:8], args.arc_batch_size)
    old, new, t_old, t_new = old_and_new(
        lambda: choice_logliks_reference(model, tokenizer, contexts, continuations, args.arc_batch_size),
        lambda: choice_logliks(model, tokenizer, contexts, continuations, args.arc_batch_size), args.repeats)
    print(f"  baseline {t_old:.1f} s, new {t_new:.1f} s (fastest runs), ratio old/new {t_old / t_new:.2f}")
    ok = compare_arc("baseline vs new", items, old, new, args.tolerance)
    rows = [("ARC-Easy", t_old, t_new)]
    if args.lm_eval:
        lm_ok, t_lm = run_lm_eval(model, tokenizer, items, contexts, continuations, new, args)
        ok = ok and lm_ok
        rows.append(("ARC-Easy lm-eval HFLM vs new", t_lm, t_new))
    return ok, rows


def run_lm_eval(model: Any, tokenizer: Any, items: Sequence[dict[str, Any]], contexts: list[str],
                continuations: list[list[str]], new: list[list[tuple[float, int]]],
                args: argparse.Namespace) -> tuple[bool, float]:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise SystemExit(f"--lm-eval: lm_eval is not importable ({e}); `pip install --no-deps lm-eval` "
                         "(with PIP_CONSTRAINT=launch/constraints.txt so torch stays) or put it on PYTHONPATH") from e
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.arc_batch_size)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=j)
                for ctx, conts in zip(contexts, continuations, strict=True) for j, cont in enumerate(conts)]
    flat, t_lm = timed(lm.loglikelihood, requests, disable_tqdm=True)
    result, k = [], 0
    for conts in continuations:
        result.append([(flat[k + j][0], len(c)) for j, c in enumerate(conts)])
        k += len(conts)
    print(f"  lm-eval HFLM {t_lm:.1f} s (batch_size {args.arc_batch_size})")
    return compare_arc("lm-eval vs new", items, result, new, args.tolerance), t_lm


def run_gsm8k(model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[bool, list[tuple[str, float, float]]]:
    items = load_items("gsm8k", "asset:gsm8k", args.gsm8k_items)
    prompts = [suites.gsm8k_prompt(item, tokenizer) for item in items]
    print(f"GSM8K: {len(items)} items, batch_size {args.gsm8k_batch_size}, max_new_tokens {args.max_new_tokens}")
    old, new, t_old, t_new = old_and_new(
        lambda: generate_reference(model, tokenizer, prompts, args.max_new_tokens, args.gsm8k_batch_size),
        lambda: generate(model, tokenizer, prompts, args.max_new_tokens, args.gsm8k_batch_size, progress=False),
        args.repeats)
    same = [a == b for a, b in zip(old, new, strict=True)]
    same_answer = sum(score_row("gsm8k", a, item["answer"])["extracted"] == score_row("gsm8k", b, item["answer"])["extracted"]
                      for a, b, item in zip(old, new, items, strict=True))
    new_tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in new)
    print(f"  baseline {t_old:.1f} s, new {t_new:.1f} s (fastest runs), ratio old/new {t_old / t_new:.2f}; "
          f"{new_tokens} completion tokens")
    print(f"  completions identical on {sum(same)}/{len(items)}, extracted answers on {same_answer}/{len(items)}"
          f"  {'OK' if all(same) else 'MISMATCH'}")
    for i, equal in enumerate(same):
        if not equal:
            print(f"    item {items[i]['id']}: baseline {old[i][:80]!r}... new {new[i][:80]!r}...")
    return all(same), [("GSM8K", t_old, t_new)]


def load_items(name: str, uri: str, limit: int) -> list[dict[str, Any]]:
    records = list(normalize(DatasetRef(name=name, data_files=[uri]), "eval").records.values())
    return records[:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arc-items", type=int, default=200, help="first N ARC-Easy test items (2376 in all)")
    parser.add_argument("--arc-batch-size", type=int, default=32, help="choices per forward pass (paper: 32)")
    parser.add_argument("--gsm8k-items", type=int, default=16, help="first N GSM8K test items (1319 in all); 0 skips")
    parser.add_argument("--gsm8k-batch-size", type=int, default=8, help="sequences decoded together (demo: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="GSM8K completion limit (demo_cpu: 96, paper: 512)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |Δ loglik| per choice")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the fastest counts")
    parser.add_argument("--lm-eval", action="store_true", help="also score the ARC items with lm-eval's HFLM")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_asset_uri("asset:smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"SmolLM2-135M-Instruct float32 on CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} alternating runs each, fastest counts")
    ok, rows = True, []
    if args.arc_items > 0:
        arc_ok, arc_rows = run_arc(model, tokenizer, args)
        ok, rows = ok and arc_ok, rows + arc_rows
    if args.gsm8k_items > 0:
        gsm_ok, gsm_rows = run_gsm8k(model, tokenizer, args)
        ok, rows = ok and gsm_ok, rows + gsm_rows
    print("\n| suite | items | old s | new s | old/new |\n|---|---|---|---|---|")
    for name, t_old, t_new in rows:
        n = args.gsm8k_items if name.startswith("GSM8K") else args.arc_items
        print(f"| {name} | {n} | {t_old:.1f} | {t_new:.1f} | {t_old / t_new:.2f} |")
    print("results agree" if ok else "RESULTS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
