"""Generation, log-likelihood scoring, sharding and the suite runner on a tiny random Llama."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from evaluate_fixtures import MIXED_PROMPTS, build_tiny_llama, build_tiny_tokenizer, greedy_ids

from d2lora_dist import fileio
from d2lora_dist.config import SuiteConfig
from d2lora_dist.evaluate import suites
from d2lora_dist.evaluate.answers import ANSWER_RULES_VERSION
from d2lora_dist.evaluate.generation import encode_prompt, generate, stop_token_ids
from d2lora_dist.evaluate.loglik import choice_logliks
from d2lora_dist.evaluate.scoring import ITEM_SCORES, REQUIRED_KEYS, SCORERS, score_file
from d2lora_dist.evaluate.sharding import gather_in_order, shard
from d2lora_dist.evaluate.suites import run_suite

PROMPTS = MIXED_PROMPTS
GSM8K_ITEMS = [{"id": f"g{i}", "question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
                "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(5)]
TITLE_ITEMS = [{"id": f"t{i}", "abstract": f"We study low rank adapters number {i} for language models.",
                "title": f"Low rank adapters {i}"} for i in range(4)]
ARC_ITEMS = [{"id": f"a{i}", "question": q, "choices": c, "answer_index": g} for i, (q, c, g) in enumerate([
    ("Which gas do plants take in?", ["carbon dioxide", "oxygen", "helium", "neon"], 0),
    ("What is 2 + 2?", ["3", "4", "five"], 1),
    ("Which is a mammal?", ["shark", "trout", "whale", "eel"], 2),
])]
ROW_KEYS = {
    "gsm8k": {"id", "prompt", "completion", "extracted", "reference", "correct", "extracted_strict",
              "extracted_flexible", "correct_strict", "correct_flexible", "extracted_strict_match",
              "correct_strict_match", "extracted_flexible_extract", "correct_flexible_extract"},
    "titles": {"id", "prompt", "completion", "extracted", "reference", "score", "bare_title"},
    "arc": {"id", "prompt", "choices", "logliks", "pred", "pred_norm", "gold", "correct", "correct_norm"},
}
ITEMS = {"gsm8k": GSM8K_ITEMS, "titles": TITLE_ITEMS, "arc": ARC_ITEMS}
# String entries of run_suite's metrics besides the numbers, per kind.
LABELS = {"gsm8k": {"prompt_version", "answer_filter", "answer_rules", "scorer_version", "lm_eval_rules"},
          "titles": {"prompt_version", "scorer_version"}, "arc": {"prompt_version", "scorer_version"}}


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return build_tiny_llama(tokenizer)


def settings(kind: str, **overrides) -> SuiteConfig:
    return SuiteConfig(**{"kind": kind, "batch_size": 2, "max_new_tokens": 8, **overrides})



# --- stop tokens ---------------------------------------------------------------------

def test_stop_token_ids_collects_eos_and_turn_end_tokens(tokenizer, model):
    assert stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id]
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|eot_id|>"]})
    ids = stop_token_ids(chat_tok, model)
    assert ids == [tokenizer.eos_token_id, *chat_tok.convert_tokens_to_ids(["<|eot_id|>", "<|im_end|>"])]


def test_stop_token_ids_reads_generation_config_lists(tokenizer):
    chat_model = copy.deepcopy(build_tiny_llama(tokenizer))
    chat_model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    assert stop_token_ids(tokenizer, chat_model) == [7, tokenizer.eos_token_id]


# --- generation ------------------------------------------------------------------------

def test_left_padding_gives_the_same_greedy_output_alone_and_in_a_batch(model, tokenizer):
    alone = generate(model, tokenizer, ["x"], max_new_tokens=12, batch_size=1, progress=False)
    batched = generate(model, tokenizer, [PROMPTS[1], "x", PROMPTS[2]], max_new_tokens=12, batch_size=3,
                       progress=False)
    assert batched[1] == alone[0]
    # and it matches HF generate on the unpadded prompt, token for token
    assert alone[0] == tokenizer.decode(greedy_ids(model, tokenizer, "x", 12), skip_special_tokens=True)


def test_output_order_equals_input_order(model, tokenizer):
    one_by_one = [generate(model, tokenizer, [p], 10, 1, progress=False)[0] for p in PROMPTS]
    assert generate(model, tokenizer, PROMPTS, 10, batch_size=2, progress=False) == one_by_one
    assert len(set(one_by_one)) > 1  # a constant model would make the order check vacuous


def test_generation_stops_at_a_stop_token(model, tokenizer):
    # A greedy position k >= 2 whose token has not appeared before: declaring that token
    # an eos must cut the completion to exactly the k tokens before it.
    greedy = {p: greedy_ids(model, tokenizer, p, 10) for p in PROMPTS}
    prompt, ids, k = next((p, ids, k) for p, ids in greedy.items() for k in range(2, len(ids))
                          if ids[k] not in ids[:k])
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[k]]
    out = generate(stopping, tokenizer, [prompt, PROMPTS[1]], 10, batch_size=2, progress=False)
    assert out[0] == tokenizer.decode(ids[:k], skip_special_tokens=True)
    assert out[0] != tokenizer.decode(ids, skip_special_tokens=True)


def test_generation_respects_max_new_tokens_and_drops_special_tokens(model, tokenizer, monkeypatch):
    decoded = []  # the new token ids of each completion, as handed to the tokenizer
    original = type(tokenizer).decode

    def spy(self, ids, *args, **kwargs):
        decoded.append(list(ids))
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "decode", spy)
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, progress=False)
    assert len(decoded) == len(PROMPTS) and max(map(len, decoded)) == 5
    assert not any(t in o for o in outputs for t in ("<pad>", "</s>", "<s>", "<|assistant|>"))


def test_generation_leaves_tokenizer_and_model_mode_alone(model, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    tok.pad_token = None
    model.train()
    try:
        out = generate(model, tok, PROMPTS[:3], 6, batch_size=3, progress=False)
        assert model.training
    finally:
        model.eval()
    assert tok.padding_side == "right" and tok.pad_token is None
    assert out == generate(model, tokenizer, PROMPTS[:3], 6, batch_size=3, progress=False)


# --- log-likelihood ---------------------------------------------------------------------

def manual_loglik(model, tokenizer, context: str, continuation: str) -> float:
    ctx = encode_prompt(tokenizer, context)
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logprobs = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_choice_logliks_match_a_manual_forward_pass(model, tokenizer):
    contexts = ["Question: Which gas do plants take in?\nAnswer:", "Question: 2 + 2?\nAnswer:"]
    continuations = [[" carbon dioxide", " oxygen", " a very long answer about noble gases"], [" 4", " five"]]
    result = choice_logliks(model, tokenizer, contexts, continuations, batch_size=2)
    assert [len(r) for r in result] == [3, 2]
    for context, choices, scored in zip(contexts, continuations, result, strict=True):
        for choice, (loglik, n_chars) in zip(choices, scored, strict=True):
            assert n_chars == len(choice)
            # batched with padding vs one unpadded pass: another summation order, ~1e-6 relative (rtol 1e-5 +
            # atol 1e-4 as in test_evaluate_loglik.py, where the measurement is)
            assert math.isclose(loglik, manual_loglik(model, tokenizer, context, choice), rel_tol=1e-5, abs_tol=1e-4)
            assert loglik < 0


def test_choice_logliks_do_not_depend_on_batch_size(model, tokenizer):
    contexts = ["Question: a?\nAnswer:", "Question: a much longer question about json files?\nAnswer:"]
    continuations = [[" yes", " no"], [" maybe", " certainly not today"]]
    one = choice_logliks(model, tokenizer, contexts, continuations, batch_size=1)
    four = choice_logliks(model, tokenizer, contexts, continuations, batch_size=4)
    for a, b in zip(sum(one, []), sum(four, []), strict=True):
        assert math.isclose(a[0], b[0], rel_tol=1e-5, abs_tol=1e-4)  # another padding: see the test above


# --- sharding --------------------------------------------------------------------------

@pytest.mark.parametrize("n, world", [(7, 3), (2, 4), (6, 2), (5, 1)])
def test_shard_covers_every_item_once(n, world):
    items = list(range(n))
    shards = [shard(items, r, world) for r in range(world)]
    assert sorted(sum(shards, [])) == items


def test_gather_in_order_single_process_and_bad_rank():
    assert gather_in_order([1, 2, 3], 0, 1) == [1, 2, 3]
    with pytest.raises(ValueError, match="rank"):
        shard([1, 2], 2, 2)
    with pytest.raises(RuntimeError, match="not initialised"):
        gather_in_order([1], 0, 2)


# --- run_suite ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gsm8k", "titles", "arc"])
def test_run_suite_writes_one_row_per_item_and_metrics_in_range(kind, model, tokenizer, tmp_path):
    out = tmp_path / "predictions" / f"{kind}.jsonl"
    metrics = run_suite(kind, ITEMS[kind], model, tokenizer, settings(kind), out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [item["id"] for item in ITEMS[kind]]
    assert all(ROW_KEYS[kind] <= set(r) for r in rows)
    assert metrics["items"] == len(ITEMS[kind])
    assert metrics["prompt_version"] == suites.SUITES[kind].prompt_version
    assert set(metrics) == {*suites.SUITES[kind].metrics, *LABELS[kind]}
    assert all(isinstance(metrics[k], str) for k in LABELS[kind])
    numbers = {k: v for k, v in metrics.items() if k != "items" and k not in LABELS[kind]}
    assert numbers and all(0.0 <= v <= 1.0 for v in numbers.values())
    # the predictions file alone reproduces the metrics
    rescored = score_file(kind, out)
    assert all(math.isclose(rescored[k], metrics[k]) for k in suites.SUITES[kind].metrics)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_every_suite_kind_is_rescored_and_scored_per_item():
    # `d2lora score` offers the kinds of scoring.SCORERS; a kind missing there could not be rescored
    assert set(suites.SUITES) == set(SCORERS) == set(REQUIRED_KEYS) == set(ITEM_SCORES)
    for kind, suite in suites.SUITES.items():
        assert set(ITEM_SCORES[kind]) == set(suite.metrics) - {"items"}, kind


def test_item_tokens_count_what_each_kind_runs_through_the_model(tokenizer):
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    gsm8k = suites.SUITES["gsm8k"].item_tokens(GSM8K_ITEMS[0], tokenizer, settings("gsm8k", max_new_tokens=16))
    assert gsm8k == count(suites.gsm8k_prompt(GSM8K_ITEMS[0], tokenizer)) + 16  # the prompt + the whole budget
    titles = suites.SUITES["titles"].item_tokens(TITLE_ITEMS[0], tokenizer, settings("titles", max_new_tokens=5))
    assert titles == count(suites.titles_prompt(TITLE_ITEMS[0], tokenizer)) + 5
    arc = suites.SUITES["arc"].item_tokens(ARC_ITEMS[1], tokenizer, settings("arc", max_new_tokens=99))
    assert arc == count("Question: What is 2 + 2?\nAnswer:") + count(" 3") + count(" 4") + count(" five")


def test_run_suite_rows_hold_what_the_prompts_and_scores_say(model, tokenizer, tmp_path):
    out = tmp_path / "gsm8k.jsonl"
    run_suite("gsm8k", GSM8K_ITEMS[:2], model, tokenizer, settings("gsm8k"), out, progress=False)
    row = json.loads(out.read_text().splitlines()[0])
    assert row["prompt"].startswith("<|user|>\n") and row["prompt"].endswith("<|assistant|>\n")
    assert GSM8K_ITEMS[0]["question"] in row["prompt"] and "The answer is" in row["prompt"]
    assert row["reference"] == GSM8K_ITEMS[0]["answer"]
    arc_out = tmp_path / "arc.jsonl"
    run_suite("arc", ARC_ITEMS, model, tokenizer, settings("arc"), arc_out, progress=False)
    arc_row = json.loads(arc_out.read_text().splitlines()[1])
    assert arc_row["prompt"] == "Question: What is 2 + 2?\nAnswer:"
    assert arc_row["gold"] == 1 and len(arc_row["logliks"]) == 3
    assert arc_row["correct"] == (arc_row["pred"] == 1)


# --- gsm8k answer filters ----------------------------------------------------------------

# One question asked twice with two references: the completion the model is taught has
# no answer marker and ends on 4, so s0 is right under flexible only and s1 is wrong.
FILTER_ITEMS = [{"id": "s0", "question": "Tom has 1 apple and buys 3 more. How many now?", "answer": "#### 4"},
                {"id": "s1", "question": "Tom has 1 apple and buys 3 more. How many now?", "answer": "#### 3"}]
TAUGHT_COMPLETION = "He has 1 + 3 = 4 apples."


def teach(model, tokenizer, prompt: str, completion: str, max_steps: int = 300) -> None:
    """Fit the model to answer `prompt` with exactly `completion` and then stop (eos), so
    greedy generation writes a known text: the suite, not the model, is under test."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + completion_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(max_steps):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.05:  # a clear greedy margin on every token
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def taught_model(tokenizer):
    model = build_tiny_llama(tokenizer, seed=1)
    teach(model, tokenizer, suites.gsm8k_prompt(FILTER_ITEMS[0], tokenizer), TAUGHT_COMPLETION)
    return model


@pytest.mark.parametrize("answer_filter, accuracy", [("flexible", 0.5), ("strict", 0.0)])
def test_gsm8k_rows_and_metrics_carry_both_filters_and_the_setting_picks_the_headline(
        answer_filter, accuracy, taught_model, tokenizer, tmp_path):
    out = tmp_path / "gsm8k.jsonl"
    metrics = run_suite("gsm8k", FILTER_ITEMS, taught_model, tokenizer,
                        settings("gsm8k", answer_filter=answer_filter, max_new_tokens=24), out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion"] for r in rows] == [TAUGHT_COMPLETION] * 2  # the model says what it was taught
    assert [(r["extracted_strict"], r["correct_strict"]) for r in rows] == [(None, False), (None, False)]
    assert [(r["extracted_flexible"], r["correct_flexible"]) for r in rows] == [("4", True), ("4", False)]
    # lm-eval's own filters: no "#### " for strict-match; flexible-extract's last number is the 4
    assert [(r["extracted_strict_match"], r["correct_strict_match"]) for r in rows] == [("[invalid]", False)] * 2
    assert [(r["extracted_flexible_extract"], r["correct_flexible_extract"]) for r in rows] == [
        ("4", True), ("4", False)]
    assert [(r["extracted"], r["correct"]) for r in rows] == [
        (r[f"extracted_{answer_filter}"], r[f"correct_{answer_filter}"]) for r in rows]
    assert metrics == {"accuracy": accuracy, "strict_accuracy": 0.0, "flexible_accuracy": 0.5,
                       "strict_match": 0.0, "flexible_extract": 0.5, "items": 2,
                       "prompt_version": suites.GSM8K_PROMPT_VERSION, "answer_filter": answer_filter,
                       "answer_rules": ANSWER_RULES_VERSION,
                       "scorer_version": f"{ANSWER_RULES_VERSION}/{answer_filter}",
                       "lm_eval_rules": "lm-eval-0.4/gsm8k-3.0/v1"}
    # the file alone reproduces every number, given the headline filter
    rescored = score_file("gsm8k", out, answer_filter=answer_filter)
    assert {k: rescored[k] for k in suites.SUITES["gsm8k"].metrics} == {
        k: metrics[k] for k in suites.SUITES["gsm8k"].metrics}


def test_run_suite_rejects_an_unknown_answer_filter_before_generating(tmp_path):
    with pytest.raises(ValueError, match=r"answer_filter must be one of \['flexible', 'strict'\], got 'loose'"):
        run_suite("gsm8k", GSM8K_ITEMS, None, None, settings("gsm8k", answer_filter="loose"),
                  tmp_path / "p.jsonl", progress=False)
    assert not (tmp_path / "p.jsonl").exists()


def test_run_suite_applies_limit(model, tokenizer, tmp_path):
    out = tmp_path / "titles.jsonl"
    metrics = run_suite("titles", TITLE_ITEMS, model, tokenizer, settings("titles", limit=2), out,
                        progress=False)
    assert metrics["items"] == 2
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["t0", "t1"]


def test_run_suite_without_a_chat_template_uses_plain_text(model, tokenizer, tmp_path):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    out = tmp_path / "titles.jsonl"
    run_suite("titles", TITLE_ITEMS[:1], model, plain, settings("titles"), out, progress=False)
    assert json.loads(out.read_text())["prompt"].startswith("Write a")


@pytest.mark.parametrize("kind, items, overrides, message", [
    ("gsm8k", [{"id": 1, "question": "q"}], {}, "lacks key 'answer'"),
    ("arc", [{**ARC_ITEMS[0], "answer_index": 9}], {}, "outside its 4 choices"),
    ("gsm8k", [], {}, "no items"),
    ("gsm8k", GSM8K_ITEMS, {"limit": 0}, "limit must be >= 1"),
    ("mmlu", GSM8K_ITEMS, {}, "unknown suite kind"),
])
def test_run_suite_rejects_bad_input_before_generating(kind, items, overrides, message, tmp_path):
    cfg = settings(kind if kind in suites.SUITES else "gsm8k", **overrides)
    with pytest.raises(ValueError, match=message):
        run_suite(kind, items, None, None, cfg, tmp_path / "p.jsonl", progress=False)
    assert not (tmp_path / "p.jsonl").exists()


def test_run_suite_kind_must_match_settings(tmp_path):
    with pytest.raises(ValueError, match="settings are for kind 'titles'"):
        run_suite("gsm8k", GSM8K_ITEMS, None, None, settings("titles"), tmp_path / "p.jsonl")


def test_failed_run_keeps_the_existing_predictions_file(model, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "gsm8k.jsonl"
    out.write_text('{"old": true}\n')

    def disk_full(fd):  # the rows are written to the temp file; flushing them to disk fails
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        run_suite("gsm8k", GSM8K_ITEMS[:2], model, tokenizer, settings("gsm8k"), out, progress=False)
    assert out.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["gsm8k.jsonl"]


# --- two ranks (gloo) -------------------------------------------------------------------

def _two_rank_worker(rank: int, world: int, workdir: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world)
    try:
        local = shard(list(range(7)), rank, world)
        gathered = gather_in_order([x * 10 for x in local], rank, world)
        assert gathered == ([x * 10 for x in range(7)] if rank == 0 else None)
        tokenizer = AutoTokenizer.from_pretrained(f"{workdir}/tiny")
        model = AutoModelForCausalLM.from_pretrained(f"{workdir}/tiny")
        metrics = run_suite("gsm8k", GSM8K_ITEMS, model, tokenizer, settings("gsm8k"),
                            Path(workdir) / "dist.jsonl", progress=False)
        Path(workdir, f"metrics-{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_predictions(model, tokenizer, tmp_path):
    import torch.multiprocessing as mp

    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = run_suite("gsm8k", GSM8K_ITEMS, model, tokenizer, settings("gsm8k"), tmp_path / "single.jsonl",
                       progress=False)
    assert (tmp_path / "dist.jsonl").read_text() == (tmp_path / "single.jsonl").read_text()
    for rank in (0, 1):  # every rank returns the same metrics
        assert json.loads((tmp_path / f"metrics-{rank}.json").read_text()) == single
