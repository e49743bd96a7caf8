"""Base-model accuracy of SmolLM2-135M-Instruct on reasoning-gym's seeded math generators.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/math_task_search.py \
        --k 40 --out docs/results/math-task-search/items.json

Finds a math task the base model answers partly right (the DPO study wants about 15-70 %): for each
setting (a generator and its difficulty knobs) it draws K seeded problems from the reasoning-gym
wheel the offline assets download (run in a child interpreter, benchmarks/_reasoning_gym_child.py),
asks the model each one in the project's GSM8K words (d2lora_dist.prompts.gsm8k_prompt: step by
step, a last line "The answer is N") inside the tokenizer's chat template, decodes greedily with the
project's generation code, extracts the answer with the project's GSM8K filters
(d2lora_dist.evaluate.answers) and scores it with the generator's own `score_answer` (correct = 1.0).

Prints one table row per setting: accuracy (flexible filter) with its 95 % Wilson interval, the
strict filter's accuracy, mean completion length in tokens, the share cut at --max-new-tokens and
seconds. --out writes every item (question, reference, completion, extractions, score) as JSON,
rewritten after each setting so an interrupted run keeps what it finished; --table writes the
table as markdown. Item i of a setting is the generator's item i at --seed (reasoning-gym seeds
item i with seed + i), so a rerun with the same arguments asks the same questions.

--setting GENERATOR[:KNOB=VALUE,...] (repeatable) replaces the default settings, e.g.
    --setting chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2
Values are JSON (numbers, true/false, ["+","-"]) or else strings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2lora_dist.errors import InputError

CHILD = Path(__file__).with_name("_reasoning_gym_child.py")
WHEEL_PACKAGE = "reasoning_gym/"
Z95 = 1.959963984540054

# The search's starting points: each family at an easy setting, a couple a step harder, and
# gsm_symbolic (the GSM8K-like generator the math_synthetic asset uses) as the near-zero reference.
DEFAULT_SETTINGS = (
    "chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1",
    "chain_sum:min_terms=2,max_terms=2,min_digits=2,max_digits=2",
    "chain_sum:min_terms=3,max_terms=3,min_digits=1,max_digits=2",
    "products:min_terms=2,max_terms=2,min_digits=1,max_digits=1",
    "products:min_terms=2,max_terms=2,min_digits=1,max_digits=2",
    "basic_arithmetic:min_terms=2,max_terms=3,min_digits=1,max_digits=1,allow_parentheses=false,"
    "allow_negation=false",
    "leg_counting:min_animals=1,max_animals=2,min_instances=1,max_instances=3",
    "gcd:min_value=1,max_value=20",
    "lcm:min_value=1,max_value=12",
    "decimal_chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1,min_decimal_places=1,max_decimal_places=1",
    "gsm_symbolic",
)


@dataclass(frozen=True)
class Setting:
    generator: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        knobs = ",".join(f"{k}={json.dumps(v)}" for k, v in self.config.items())
        return f"{self.generator}:{knobs}" if knobs else self.generator


def parse_setting(text: str) -> Setting:
    """`GENERATOR[:KNOB=VALUE,...]` -> Setting; a value is JSON when it parses, else a string."""
    name, _, knobs = text.partition(":")
    name = name.strip()
    if not name:
        raise InputError(f"--setting {text!r}: no generator name before ':'")
    config: dict[str, Any] = {}
    for part in _split_knobs(knobs):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--setting {text!r}: {part!r} is not KNOB=VALUE")
        try:
            config[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            config[key.strip()] = value.strip()
    return Setting(name, config)


def _split_knobs(knobs: str) -> list[str]:
    """Split on commas outside brackets, so `operators=["+","-"]` stays one knob."""
    parts, depth, current = [], 0, ""
    for ch in knobs:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Generators:
    """reasoning-gym problems and scores from the pinned wheel, through the child interpreter."""

    def __init__(self, wheel: Path, work: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(work, [m for m in zf.namelist() if m.startswith(WHEEL_PACKAGE) and m.endswith(".py")])
        self.root = work

    def run(self, setting: Setting, seed: int, size: int, answers: Sequence[str | None] | None = None
            ) -> dict[str, Any]:
        request = {"generator": setting.generator, "config": setting.config, "seed": seed, "size": size,
                   "answers": None if answers is None else list(answers)}
        result = subprocess.run([sys.executable, "-I", str(CHILD), str(self.root)], input=json.dumps(request),
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise InputError(f"--setting {setting.label}: the reasoning-gym generator failed "
                             f"(exit {result.returncode}):\n{result.stderr[-1500:]}")
        return json.loads(result.stdout)


def score_completions(setting: Setting, generators: Generators, seed: int, completions: Sequence[str]
                      ) -> list[dict[str, Any]]:
    """Per completion: both GSM8K extractions and whether the generator's own scorer gives each
    full credit. Only 1.0 counts as correct: reasoning-gym's default scorer gives partial credit
    when the reference is a substring of the answer ("2" in "12") and gsm_symbolic 0.01 for any answer."""
    from d2lora_dist.evaluate.answers import extract_flexible, extract_strict

    strict = [extract_strict(c) for c in completions]
    flexible = [extract_flexible(c) for c in completions]
    scored_strict = generators.run(setting, seed, len(completions), strict)["scores"]
    reply = generators.run(setting, seed, len(completions), flexible)
    return [{"index": i, "question": item["question"], "reference": item["answer"], "completion": completion,
             "strict": s, "flexible": f, "score": score, "correct": score == 1.0,
             "correct_strict": score_strict == 1.0}
            for i, (item, completion, s, f, score, score_strict)
            in enumerate(zip(reply["items"], completions, strict, flexible, reply["scores"], scored_strict,
                             strict=True))]


def known_generators() -> list[str]:
    """The generator names the child knows, read from its source (it is never imported here)."""
    import ast

    tree = ast.parse(CHILD.read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "GENERATORS":
            return [k.value for k in node.value.keys]  # type: ignore[union-attr]
    raise RuntimeError(f"{CHILD} defines no GENERATORS")


def evaluate_setting(setting: Setting, generators: Generators, model: Any, tokenizer: Any,
                     args: argparse.Namespace) -> dict[str, Any]:
    from d2lora_dist import prompts
    from d2lora_dist.evaluate.generation import generate
    from d2lora_dist.evaluate.suites import chat_prompt

    start = time.perf_counter()
    items = generators.run(setting, args.seed, args.k)["items"]
    texts = [chat_prompt(tokenizer, prompts.gsm8k_prompt(item["question"])) for item in items]
    completions = generate(model, tokenizer, texts, args.max_new_tokens, args.batch_size,
                           desc=setting.generator, progress=not args.quiet)
    rows = score_completions(setting, generators, args.seed, completions)
    for row in rows:
        row["tokens"] = len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
    return {"setting": setting.label, "generator": setting.generator, "config": setting.config,
            "summary": summarize(rows, args.max_new_tokens, time.perf_counter() - start), "items": rows}


def summarize(rows: Sequence[dict[str, Any]], max_new_tokens: int, seconds: float) -> dict[str, Any]:
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [low, high],
            "accuracy_strict": sum(r["correct_strict"] for r in rows) / n if n else 0.0,
            "mean_tokens": sum(r["tokens"] for r in rows) / n if n else 0.0,
            "cut_share": sum(r["tokens"] >= max_new_tokens for r in rows) / n if n else 0.0,
            "seconds": round(seconds, 1)}


TABLE_HEAD = ("| generator | config | accuracy (flexible) | 95 % CI | strict | mean tokens | cut at max | s |\n"
              "|---|---|---|---|---|---|---|---|")


def table_row(result: dict[str, Any]) -> str:
    s = result["summary"]
    config = ", ".join(f"{k}={json.dumps(v)}" for k, v in result["config"].items()) or "(defaults)"
    return (f"| {result['generator']} | {config} | {s['correct']}/{s['n']} = {s['accuracy']:.0%} | "
            f"{s['ci95'][0]:.0%}–{s['ci95'][1]:.0%} | {s['accuracy_strict']:.0%} | {s['mean_tokens']:.0f} | "
            f"{s['cut_share']:.0%} | {s['seconds']:.0f} |")


def load_model() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the offline asset, float32, as the evaluation loads it."""
    from d2lora_dist.config import ModelConfig
    from d2lora_dist.modeling import load_base_model, load_tokenizer

    cfg = ModelConfig(name_or_path="asset:smollm2", dtype="float32")
    return load_base_model(cfg, training=False), load_tokenizer(cfg)


def reasoning_gym_wheel() -> Path:
    """The reasoning-gym wheel the assets pin, downloaded and checked if the cache lacks it."""
    from d2lora_dist.assets.cache import cache_root
    from d2lora_dist.assets.pypi import ARCHIVES, fetch_archive

    return fetch_archive(ARCHIVES["reasoning-gym"], cache_root(os.environ.get("D2LORA_ASSETS")), progress=False)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", default=None,
                        help="GENERATOR[:KNOB=VALUE,...]; repeatable; default: the DEFAULT_SETTINGS list")
    parser.add_argument("--k", type=int, default=40, help="problems per setting (default 40)")
    parser.add_argument("--seed", type=int, default=10_000,
                        help="reasoning-gym seed: item i uses seed + i (default 10000, apart from the "
                             "math_synthetic asset's seed 0 and its 1500 rows)")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="generation budget (default 192)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--out", type=Path, help="per-item results as JSON (refused if the file exists)")
    parser.add_argument("--table", type=Path, help="the summary table as markdown (refused if the file exists)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                        help="print the table of earlier --out files (no model, nothing generated)")
    args = parser.parse_args(argv)
    if args.k < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise InputError(f"--k, --max-new-tokens and --batch-size must be >= 1, got {args.k}, "
                         f"{args.max_new_tokens}, {args.batch_size}")
    for path in (args.out, args.table):
        if path is not None and path.exists():
            raise InputError(f"{path} exists; choose another path or move it away (it is not overwritten)")
    settings = [parse_setting(s) for s in (args.setting or DEFAULT_SETTINGS)]
    unknown = sorted({s.generator for s in settings} - set(known_generators()))
    if unknown:
        raise InputError(f"unknown generator(s) {unknown}; known: {', '.join(known_generators())}")
    args.settings = settings
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from d2lora_dist import prompts
    from d2lora_dist.evaluate.answers import ANSWER_RULES_VERSION

    generators = Generators(reasoning_gym_wheel(), Path(tempfile.mkdtemp(prefix="rg-wheel-")))
    # Every setting's problems are drawn before the model loads: a bad knob stops at once.
    for setting in args.settings:
        generators.run(setting, args.seed, 1)
    model, tokenizer = load_model()
    meta = {"model": "asset:smollm2 (SmolLM2-135M-Instruct, float32)", "reasoning_gym": "0.1.25",
            "prompt_version": prompts.GSM8K_PROMPT_VERSION, "answer_rules": ANSWER_RULES_VERSION,
            "seed": args.seed, "k": args.k, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
            "correct": "generator's score_answer(flexible extraction) == 1.0"}
    results: list[dict[str, Any]] = []
    print(TABLE_HEAD, flush=True)
    for setting in args.settings:
        results.append(evaluate_setting(setting, generators, model, tokenizer, args))
        print(table_row(results[-1]), flush=True)
        if args.out is not None:
            _write(args.out, json.dumps({"meta": meta, "settings": results}, indent=1) + "\n")
    if args.table is not None:
        _write(args.table, "\n".join([TABLE_HEAD, *map(table_row, results)]) + "\n")
    return results


def _write(path: Path, text: str) -> None:
    from d2lora_dist.fileio import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def summarize_files(paths: Sequence[Path]) -> str:
    """The markdown table of earlier --out files, their settings in file order."""
    rows = [TABLE_HEAD]
    for path in paths:
        try:
            rows += [table_row(result) for result in json.loads(path.read_text())["settings"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"--summarize {path}: not a math_task_search --out file ({error!r})") from None
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.summarize:
            print(summarize_files(args.summarize))
            return 0
        run(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
