"""Evaluation suites: versioned prompt definitions plus one runner.

A suite kind is data (prompt text and its version, the item keys it reads) plus two
functions: `predict` turns items into prediction rows, `score` turns rows into metrics.
The metrics come from the same `scoring` functions that rescore a predictions file, so
`score_file(kind, out_path)` reproduces what `run_suite` returned (a gsm8k suite whose
headline is the strict filter: `score_file("gsm8k", out_path, answer_filter="strict")`).

Bump a PROMPT_VERSION whenever its prompt text or construction changes, and a scorer version
(`answers.ANSWER_RULES_VERSION`, `answers.TITLE_RULES_VERSION`, ARC_SCORER_VERSION) whenever
what a completion or log-likelihood scores changes: numbers from different versions are not
comparable. Every result records both (`prompt_version`, `scorer_version`; gsm8k also its
`answer_rules` and which answer filter is the headline accuracy), and the report refuses to
pool cells whose versions differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from d2lora_dist import distributed, prompts
from d2lora_dist.errors import InputError
from d2lora_dist.evaluate.answers import ANSWER_RULES_VERSION, TITLE_RULES_VERSION, answer_extractor
from d2lora_dist.evaluate.generation import generate
from d2lora_dist.evaluate.lm_eval_gsm8k import LM_EVAL_RULES
from d2lora_dist.evaluate.loglik import choice_logliks
from d2lora_dist.evaluate.scoring import arc_predictions, score_arc, score_gsm8k, score_row, score_titles
from d2lora_dist.evaluate.sharding import gather_in_order, shard
from d2lora_dist.fileio import write_text_atomic

if TYPE_CHECKING:  # annotations only: evaluation reads settings, it does not parse configs
    from d2lora_dist.config import SuiteConfig

Item = dict[str, Any]
Row = dict[str, Any]

# GSM8K and titles ask in the words training uses (d2lora_dist.prompts, shared with the
# data registry's SFT records); the version of those words is the suite's prompt version.
GSM8K_PROMPT_VERSION = prompts.GSM8K_PROMPT_VERSION
TITLES_PROMPT_VERSION = prompts.TITLE_PROMPT_VERSION
ARC_PROMPT_VERSION = "arc-loglik-v1"
ARC_SCORER_VERSION = "arc-acc-v1"  # argmax log-likelihood, and per character (acc_norm)
UNRECORDED = "unrecorded"  # a version a result does not say
ARC_PROMPT = "Question: {question}\nAnswer:"  # scored continuations: " " + choice (lm-eval style)


def chat_prompt(tokenizer: Any, text: str) -> str:
    """The text as one user turn in the tokenizer's chat template (with the assistant
    header appended), or the plain text for tokenizers without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=False)


def gsm8k_prompt(item: Item, tokenizer: Any) -> str:
    return chat_prompt(tokenizer, prompts.gsm8k_prompt(item["question"]))


def titles_prompt(item: Item, tokenizer: Any) -> str:
    return chat_prompt(tokenizer, prompts.title_prompt(item["abstract"]))


def arc_prompt(item: Item) -> str:
    # No chat template: continuation scoring asks how likely the answer text is right
    # after "Answer:", which a chat turn boundary would break.
    return ARC_PROMPT.format(question=item["question"].strip())


def _generative_rows(kind: Literal["gsm8k", "titles"], items: Sequence[Item], prompt: Callable[[Item, Any], str],
                     reference_key: str, model: Any, tokenizer: Any, settings: SuiteConfig,
                     progress: bool) -> list[Row]:
    texts = [prompt(item, tokenizer) for item in items]
    completions = generate(model, tokenizer, texts, settings.max_new_tokens, settings.batch_size,
                           desc=kind, progress=progress)
    # gsm8k rows: extracted/correct (headline filter) and extracted_<filter>/correct_<filter>
    # for both filters; titles rows: extracted (the title) and score (ROUGE F1s).
    return [{"id": item["id"], "prompt": text, "completion": completion, "reference": item[reference_key],
             **score_row(kind, completion, item[reference_key], settings.answer_filter)}
            for item, text, completion in zip(items, texts, completions, strict=True)]


def predict_gsm8k(items: Sequence[Item], model: Any, tokenizer: Any, settings: SuiteConfig,
                  progress: bool) -> list[Row]:
    return _generative_rows("gsm8k", items, gsm8k_prompt, "answer", model, tokenizer, settings, progress)


def predict_titles(items: Sequence[Item], model: Any, tokenizer: Any, settings: SuiteConfig,
                   progress: bool) -> list[Row]:
    return _generative_rows("titles", items, titles_prompt, "title", model, tokenizer, settings, progress)


def predict_arc(items: Sequence[Item], model: Any, tokenizer: Any, settings: SuiteConfig,
                progress: bool) -> list[Row]:
    contexts = [arc_prompt(item) for item in items]
    continuations = [[" " + choice for choice in item["choices"]] for item in items]
    # settings.batch_size counts scored sequences (one per choice) per forward pass.
    scored = choice_logliks(model, tokenizer, contexts, continuations, settings.batch_size,
                            desc="arc", progress=progress)
    rows = []
    for item, context, pairs in zip(items, contexts, scored, strict=True):
        logliks = [ll for ll, _ in pairs]
        pred, pred_norm = arc_predictions(logliks, item["choices"])
        gold = item["answer_index"]
        rows.append({"id": item["id"], "prompt": context, "choices": list(item["choices"]),
                     "logliks": logliks, "pred": pred, "pred_norm": pred_norm, "gold": gold,
                     "correct": pred == gold, "correct_norm": pred_norm == gold})
    return rows


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _generation_tokens(prompt: Callable[[Item, Any], str]) -> Callable[[Item, Any, SuiteConfig], int]:
    # The templated prompt + max_new_tokens: an upper bound, most answers stop earlier.
    return lambda item, tokenizer, settings: _tokens(tokenizer, prompt(item, tokenizer)) + settings.max_new_tokens


def arc_tokens(item: Item, tokenizer: Any, settings: SuiteConfig) -> int:
    # The context once, each choice as its continuation (what predict_arc scores).
    return _tokens(tokenizer, arc_prompt(item)) + sum(_tokens(tokenizer, " " + c) for c in item["choices"])


def score_gsm8k_suite(rows: Sequence[Row], settings: SuiteConfig) -> dict[str, float | int]:
    return score_gsm8k(rows, settings.answer_filter)


def gsm8k_labels(settings: SuiteConfig) -> dict[str, str]:
    # Which filter the headline `accuracy` is, and which extraction rules produced it: together
    # they are the scorer (the same rules with the other headline give another `accuracy`).
    answer_extractor(settings.answer_filter)  # a bad name is an error before anything is generated
    return {"answer_filter": settings.answer_filter, "answer_rules": ANSWER_RULES_VERSION,
            "scorer_version": f"{ANSWER_RULES_VERSION}/{settings.answer_filter}", "lm_eval_rules": LM_EVAL_RULES}


def gsm8k_scorer_before_labels(labels: dict[str, str]) -> str:
    # Results from before `scorer_version` recorded the rules and the filter (or nothing).
    if "answer_rules" in labels and "answer_filter" in labels:
        return f"{labels['answer_rules']}/{labels['answer_filter']}"
    return UNRECORDED


def _labels(scorer_version: str) -> Callable[[SuiteConfig], dict[str, str]]:
    return lambda settings: {"scorer_version": scorer_version}


def _constant(version: str) -> Callable[[dict[str, str]], str]:
    return lambda labels: version


@dataclass(frozen=True)
class Suite:
    """One suite kind: what items must hold, how they become rows, how rows become metrics.

    `metrics` are the numeric keys run_suite reports: fractions in [0, 1] plus the item
    count (what result.json and the report read); `score` may compute more (gsm8k's count
    of correct answers, shown by `d2lora score`). `labels` are strings reported next to
    `prompt_version` that say how the numbers were made, `scorer_version` among them.
    `scorer_before_labels` names the scorer of a result written before results recorded
    `scorer_version`, from the labels it has. `table` is what the report shows, (metric,
    label), the plotted one first. `item_tokens` is what one item costs in tokens run
    through the model (`sweep plan`'s estimate). Adding a suite kind is one entry here.
    """

    prompt_version: str
    item_keys: tuple[str, ...]
    predict: Callable[[Sequence[Item], Any, Any, SuiteConfig, bool], list[Row]]
    score: Callable[[Sequence[Row], SuiteConfig], dict[str, float | int]]
    metrics: tuple[str, ...]
    table: tuple[tuple[str, str], ...]
    labels: Callable[[SuiteConfig], dict[str, str]]
    scorer_before_labels: Callable[[dict[str, str]], str]
    item_tokens: Callable[[Item, Any, SuiteConfig], int]


SUITES: dict[str, Suite] = {
    "gsm8k": Suite(GSM8K_PROMPT_VERSION, ("id", "question", "answer"), predict_gsm8k, score_gsm8k_suite,
                   ("accuracy", "strict_accuracy", "flexible_accuracy", "strict_match", "flexible_extract", "items"),
                   (("accuracy", "accuracy"), ("strict_accuracy", "strict accuracy"),
                    ("flexible_accuracy", "flexible accuracy"), ("strict_match", "lm-eval strict-match"),
                    ("flexible_extract", "lm-eval flexible-extract")), gsm8k_labels, gsm8k_scorer_before_labels,
                   _generation_tokens(gsm8k_prompt)),
    "titles": Suite(TITLES_PROMPT_VERSION, ("id", "abstract", "title"), predict_titles,
                    lambda rows, settings: score_titles(rows), ("rouge1", "rouge2", "rougeL", "bare_title", "items"),
                    (("rougeL", "ROUGE-L"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
                     ("bare_title", "bare titles")),
                    _labels(TITLE_RULES_VERSION), _constant("titles-extract-v1"), _generation_tokens(titles_prompt)),
    "arc": Suite(ARC_PROMPT_VERSION, ("id", "question", "choices", "answer_index"), predict_arc,
                 lambda rows, settings: score_arc(rows), ("accuracy", "accuracy_norm", "items"),
                 (("accuracy", "accuracy"),), _labels(ARC_SCORER_VERSION), _constant(ARC_SCORER_VERSION), arc_tokens),
}


def recorded_versions(kind: str | None, labels: dict[str, str]) -> dict[str, str]:
    """The prompt and scorer version a result's labels say (its suite `kind`, None when unknown);
    a result from before `scorer_version` was recorded gets the scorer it was scored with."""
    scorer = labels.get("scorer_version")
    if scorer is None:
        scorer = SUITES[kind].scorer_before_labels(labels) if kind in SUITES else UNRECORDED
    return {"prompt_version": labels.get("prompt_version") or UNRECORDED, "scorer_version": scorer}


def _check_items(kind: str, items: Sequence[Item], keys: tuple[str, ...]) -> None:
    if not items:
        raise InputError(f"suite {kind!r}: no items to evaluate")
    for i, item in enumerate(items):
        missing = [k for k in keys if k not in item]
        if missing:
            raise InputError(f"suite {kind!r}: item {i} (id={item.get('id')!r}) lacks key "
                             f"{missing[0]!r}; items need {list(keys)}")
        if kind == "arc" and not 0 <= item["answer_index"] < len(item["choices"]):
            raise InputError(f"suite 'arc': item {i} (id={item['id']!r}) answer_index "
                             f"{item['answer_index']} is outside its {len(item['choices'])} choices")


def write_jsonl_atomic(path: Path, rows: Sequence[Row]) -> None:
    """Rows as JSONL via a temp file + rename (fileio): readers and reruns see either the
    old file or the complete new one, never a partial file."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def run_suite(kind: str, items: Sequence[Item], model: Any, tokenizer: Any, settings: SuiteConfig,
              out_path: Path, progress: bool = True) -> dict[str, float | int | str]:
    """Evaluate `items` (the first settings.limit of them) sharded over the ranks; rank 0
    writes the predictions JSONL. Every rank returns the same metrics (collective call)."""
    if kind not in SUITES:
        raise ValueError(f"run_suite: unknown suite kind {kind!r} (valid: {sorted(SUITES)})")
    if settings.kind != kind:
        raise ValueError(f"run_suite: settings are for kind {settings.kind!r}, asked to run {kind!r}")
    if settings.limit is not None and settings.limit < 1:
        raise ValueError(f"run_suite: limit must be >= 1 or null (all items), got {settings.limit}")
    suite = SUITES[kind]
    items = list(items)[:settings.limit]  # a slice to None keeps everything
    _check_items(kind, items, suite.item_keys)
    labels = suite.labels(settings)
    rank, world = distributed.rank(), distributed.world_size()
    local = suite.predict(shard(items, rank, world), model, tokenizer, settings, progress and rank == 0)
    rows = gather_in_order(local, rank, world, all_ranks=True)
    assert rows is not None  # all_ranks=True returns the rows on every rank
    scores = suite.score(rows, settings)
    metrics: dict[str, float | int | str] = {key: scores[key] for key in suite.metrics}
    metrics["prompt_version"] = suite.prompt_version
    metrics.update(labels)
    if rank == 0:
        write_jsonl_atomic(Path(out_path), rows)
    return metrics
