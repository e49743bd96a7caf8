"""Shared fixtures: a tiny random Llama saved to disk, small datasets in the hub schemas,
and an experiment factory pointing at them (fast logic tests, no network)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its own hook runs in each worker)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`, as launch/test.sh runs the suite), the Slurm tests share one
    worker, since each worker session would start its own cluster on the same host, and the multi-rank and
    SmolLM2 tests share another, so that two of them never compete for the same cores at once; the
    one-process tests fill both workers around them. Without xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif item.get_closest_marker("distributed") or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("ranks"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.evaluate_fixtures import build_tiny_llama, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def math_rows(count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        a, b = i + 2, 3 * i + 1
        steps = f"Step 1: she has {a} apples.\n"
        rows.append({"dataset": "toy", "prompt": f"Sam has {a} apples and buys {b} more. How many now?",
                     "initial_reason_steps": steps, "chosen": f"Step 2: {a} + {b} = {a + b}.",
                     "rejected": f"Step 2: {a} + {b} = {a + b + 7}.",
                     "full_chosen": f"Step 2: {a} + {b} = {a + b}.\nThe answer is {a + b}.",
                     "full_rejected": f"Step 2: {a} + {b} = {a + b + 7}.\nThe answer is {a + b + 7}.",
                     "answer": str(a + b)})
    return rows


def chat_pair_rows(count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        user = {"role": "user", "content": f"Name a number bigger than {i}."}
        rows.append({"source": "toy", "prompt": user["content"],
                     "chosen": [user, {"role": "assistant", "content": f"{i + 1} is bigger than {i}."}],
                     "rejected": [user, {"role": "assistant", "content": "No."}]})
    return rows


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_data")
    gsm8k = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
             for i in range(1, 9)]
    arc = [{"id": f"arc-{i}", "question": f"Which number is {i}?",
            "choices": {"text": [str(i), str(i + 1), str(i + 2)], "label": ["A", "B", "C"]}, "answerKey": "A"}
           for i in range(8)]
    titles = [{"id": f"paper-{i}", "abstract": f"We study adapters number {i} for small language models.",
               "title": f"Adapters {i} for small models"} for i in range(24)]
    return {"warmup": _write_jsonl(root / "warmup.jsonl", chat_pair_rows(24)),
            "math": _write_jsonl(root / "math.jsonl", math_rows(40)),
            "gsm8k": _write_jsonl(root / "gsm8k.jsonl", gsm8k),
            "arc": _write_jsonl(root / "arc.jsonl", arc),
            "titles": _write_jsonl(root / "titles.jsonl", titles)}


def _train(lr: float = 1e-3, **extra: Any) -> dict[str, Any]:
    return {"learning_rate": lr, "epochs": 1, "per_device_batch_size": 2, "global_batch_size": 2,
            "max_length": 96, "logging_steps": 1, "save_steps": 2, **extra}


@pytest.fixture
def tiny_experiment(tiny_model_dir: Path, tiny_data: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """A complete, valid experiment dict on the tiny model; tests tweak their own copy."""
    return tiny_experiment_dict(tiny_model_dir, tiny_data, tmp_path)


def tiny_experiment_dict(model_dir: Path, data: dict[str, str], root: Path) -> dict[str, Any]:
    tiny_model_dir, tiny_data = model_dir, data
    return copy.deepcopy({
        "name": "tiny", "output_dir": str(root / "runs"), "data_seed": 7,
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "warmup": {"dataset": {"name": "orpo_dpo_mix", "data_files": [tiny_data["warmup"]]}, "n": 8,
                   "train": _train()},
        "tasks": {"math": {"dataset": {"name": "math_step_dpo", "data_files": [tiny_data["math"]]},
                           "suites": ["gsm8k", "arc_easy"]},
                  "titles": {"dataset": {"name": "econ_abstracts", "data_files": [tiny_data["titles"]]},
                             "holdout": 6, "suites": ["titles", "arc_easy"]}},
        "suites": {"gsm8k": {"kind": "gsm8k", "dataset": {"name": "gsm8k", "data_files": [tiny_data["gsm8k"]]},
                             "limit": 4, "batch_size": 4, "max_new_tokens": 8},
                   "arc_easy": {"kind": "arc", "dataset": {"name": "arc_easy", "data_files": [tiny_data["arc"]]},
                                "limit": 4, "batch_size": 4},
                   "titles": {"kind": "titles", "limit": 4, "batch_size": 4, "max_new_tokens": 8}},
        "methods": {"sft": _train(), "dpo": _train(beta=0.1, reference="init"), "orpo": _train(beta=0.1)},
        "grid": [{"task": "math", "methods": ["sft", "dpo"], "inits": ["lora", "d2lora"], "n": [0, 4],
                  "seeds": [0]}],
        "tracking": {"mode": "disabled"},
    })


def write_experiment(data: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's offline asset cache (tests/assets_fixtures.py)."""
    from tests.assets_fixtures import session_cache

    return session_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def data(cache: Path) -> dict[str, Path]:
    """Every data asset, fetched once and verified."""
    from tests.assets_fixtures import fetch_data

    return fetch_data(cache)
