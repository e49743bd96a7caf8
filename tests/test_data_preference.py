"""Step-wise preference targets, checked where it matters: the tokenized rows DPOTrainer and
ORPOTrainer really train on (context = no loss, completion = loss), built as train.make_trainer
builds them, on the tiny model and, when the offline assets are there, on SmolLM2's tokenizer."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from d2lora_dist.assets import MARKER, asset_path
from d2lora_dist.config import DatasetRef, experiment_from_dict
from d2lora_dist.data.check import check_dataset
from d2lora_dist.data.loading import normalize
from d2lora_dist.data.normalize import math_step_preference, math_step_sft
from d2lora_dist.data.preference import drop_eos_after_steps, end_of_turn, preference_rows
from d2lora_dist.methods import get_method
from d2lora_dist.modeling import attach_lora, load_base_model
from d2lora_dist.train import Phase, make_trainer
from tests.conftest import chat_pair_rows, math_rows

LN2 = math.log(2)
HEADER = "<|assistant|>\n"  # the tiny chat template's generation prompt


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _records(rows: list[dict], tmp_path: Path, name: str = "math_step_dpo") -> list[dict]:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return list(normalize(DatasetRef(name, data_files=[str(path)]), "preference").records.values())


def _trainer(method: str, rows: list[dict], tokenizer: Any, exp_dict: dict, tmp_path: Path, **extra: Any) -> Any:
    """The trainer as train.py builds it (make_trainer), then the step-EOS fix-up."""
    from datasets import Dataset

    exp = experiment_from_dict(exp_dict)
    settings = replace(exp.methods[method], max_length=1024)
    spec = get_method(method)
    config_cls, _ = spec.classes()
    args = config_cls(output_dir=str(tmp_path / method), per_device_train_batch_size=2, max_steps=1,
                      learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                      bf16=False, include_num_input_tokens_seen="non_padding", dataset_num_proc=None,
                      **spec.extra_args(settings), **extra)
    phase = Phase(name=f"{method}-test", method=method, settings=settings, settings_key=f"methods.{method}",
                  records=rows, out_adapter=tmp_path / "adapter", checkpoint_dir=tmp_path / method, seed=0,
                  lineage={"phase": "adapt"})
    model = attach_lora(load_base_model(exp.model, training=True), exp.lora)
    trainer = make_trainer(phase, model, args, Dataset.from_list(rows), tokenizer)
    drop_eos_after_steps(trainer)
    return trainer


def _masks(trainer: Any) -> list[dict[str, list[int]]]:
    """Per row: the context ids (no loss) and the chosen/rejected ids the loss covers."""
    out = []
    for row in trainer.train_dataset:
        if "chosen_ids" in row:  # DPOTrainer
            out.append({"context": row["prompt_ids"], "chosen": row["chosen_ids"], "rejected": row["rejected_ids"]})
            continue
        sides = {}  # ORPOTrainer: labels are -100 on the context
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            cut = next(i for i, label in enumerate(labels) if label != -100)
            assert all(label == -100 for label in labels[:cut]) and all(label != -100 for label in labels[cut:])
            sides[side], sides[f"{side}_context"] = ids[cut:], ids[:cut]
        assert sides["chosen_context"] == sides["rejected_context"]
        out.append({"context": sides["chosen_context"], "chosen": sides["chosen"], "rejected": sides["rejected"]})
    return out


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _one_bos(tokenizer: Any, text: str) -> str:
    """The prompt text with the single BOS both trainers put in front of it."""
    bos = tokenizer.bos_token
    return text if text.startswith(bos) else bos + text


def _check_context(tokenizer: Any, record: dict, mask: dict, rendered_prompt: str) -> None:
    context = _text(tokenizer, mask["context"])
    assert context == _one_bos(tokenizer, rendered_prompt)
    assert context.endswith(HEADER + record["prefix"])  # the open assistant turn: header, then the steps


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_step_target_trains_the_next_step_alone_after_the_initial_steps(
        method: str, tiny_tokenizer: Any, tiny_experiment: dict, tmp_path: Path) -> None:
    records = _records(math_rows(4), tmp_path)
    rows = preference_rows(records, "step", tiny_tokenizer)
    masks = _masks(_trainer(method, rows, tiny_tokenizer, tiny_experiment, tmp_path))
    assert len(masks) == len(records)
    for record, row, mask in zip(records, rows, masks, strict=True):
        _check_context(tiny_tokenizer, record, mask, row["prompt"])
        for side in ("chosen", "rejected"):
            completion = _text(tiny_tokenizer, mask[side])
            assert completion == record[f"{side}_step"]  # the step, no end of turn after it
            assert mask[side][-1] != tiny_tokenizer.eos_token_id
            assert record["prefix"].strip() not in completion
            assert mask["context"] + mask[side] == tiny_tokenizer(row["prompt"] + row[side])["input_ids"]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_full_target_trains_the_rest_of_the_solution_up_to_the_end_of_turn(
        method: str, tiny_tokenizer: Any, tiny_experiment: dict, tmp_path: Path) -> None:
    raw = math_rows(4)
    records = _records(raw, tmp_path)
    rows = preference_rows(records, "full", tiny_tokenizer)
    masks = _masks(_trainer(method, rows, tiny_tokenizer, tiny_experiment, tmp_path))
    eos = tiny_tokenizer.eos_token_id
    for source, record, row, mask in zip(raw, records, rows, masks, strict=True):
        _check_context(tiny_tokenizer, record, mask, row["prompt"])
        for side in ("chosen", "rejected"):
            completion = _text(tiny_tokenizer, mask[side])
            assert completion == record[f"{side}_full"] + tiny_tokenizer.eos_token
            assert mask[side][-1] == eos and mask[side].count(eos) == 1  # one end of turn, at the end
            assert record["prefix"].strip() not in completion
        assert f"The answer is {source['answer']}." in _text(tiny_tokenizer, mask["chosen"])


@pytest.mark.parametrize("target", ["step", "full"])
def test_first_dpo_loss_is_ln2_with_the_initial_steps_on_the_prompt_side(
        target: str, tiny_tokenizer: Any, tiny_experiment: dict, tmp_path: Path) -> None:
    rows = preference_rows(_records(math_rows(4), tmp_path), target, tiny_tokenizer)
    trainer = _trainer("dpo", rows, tiny_tokenizer, tiny_experiment, tmp_path)
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_reference_log_probs_precomputed_before_the_step_eos_is_dropped_are_refused(
        tiny_tokenizer: Any, tiny_experiment: dict, tmp_path: Path) -> None:
    rows = preference_rows(_records(math_rows(2), tmp_path), "step", tiny_tokenizer)
    with pytest.raises(ValueError, match="precompute_ref_log_probs scored the step responses with TRL's EOS"):
        _trainer("dpo", rows, tiny_tokenizer, tiny_experiment, tmp_path, precompute_ref_log_probs=True)


@pytest.mark.parametrize("target", ["step", "full"])
def test_a_row_without_initial_steps_starts_the_response_at_the_assistant_header(
        target: str, tiny_tokenizer: Any, tiny_experiment: dict, tmp_path: Path) -> None:
    raw = math_rows(2)
    for row in raw:
        row["initial_reason_steps"] = ""
    records = _records(raw, tmp_path)
    rows = preference_rows(records, target, tiny_tokenizer)
    end = tiny_tokenizer.eos_token if target == "full" else ""
    for mask, record in zip(_masks(_trainer("orpo", rows, tiny_tokenizer, tiny_experiment, tmp_path)), records,
                            strict=True):
        assert _text(tiny_tokenizer, mask["context"]).endswith(HEADER)
        assert _text(tiny_tokenizer, mask["chosen"]) == record[f"chosen_{target}"] + end


def test_conversational_preference_records_pass_through_for_either_target(
        tiny_tokenizer: Any, tiny_experiment: dict, tmp_path: Path) -> None:
    records = _records(chat_pair_rows(4), tmp_path, "orpo_dpo_mix")
    assert preference_rows(records, "step", tiny_tokenizer) == records
    assert preference_rows(records, "full", tiny_tokenizer) == records
    for mask, record in zip(_masks(_trainer("dpo", records, tiny_tokenizer, tiny_experiment, tmp_path)), records,
                            strict=True):  # TRL's own chat templating, end of turn included
        assert _text(tiny_tokenizer, mask["chosen"]) == record["chosen"][0]["content"] + "</s>\n"


def test_a_bos_the_template_writes_is_not_doubled(tiny_tokenizer: Any, tiny_experiment: dict,
                                                  tmp_path: Path) -> None:
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)  # adds <s> itself, like Llama 3, whose template also writes it
    tokenizer.chat_template = tokenizer.bos_token + tiny_tokenizer.chat_template
    rows = preference_rows(_records(math_rows(2), tmp_path), "full", tokenizer)
    for method in ("dpo", "orpo"):
        for mask in _masks(_trainer(method, rows, tokenizer, tiny_experiment, tmp_path / method)):
            assert mask["context"][:2].count(tokenizer.bos_token_id) == 1, method


def test_rows_without_full_rejected_are_bad_rows_counted_by_reason(tmp_path: Path) -> None:
    raw = math_rows(5)
    del raw[1]["full_rejected"]
    raw[2]["full_rejected"] = " "
    raw[3]["full_rejected"] = raw[3]["full_chosen"]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    ref = DatasetRef("math_step_dpo", data_files=[str(path)])
    data = normalize(ref, "preference")
    assert sorted(data.records) == [0, 4]
    assert data.bad == {"missing full_rejected": ["row-1"], "empty full_rejected": ["row-2"],
                        "full_chosen == full_rejected": ["row-3"]}
    report = check_dataset(ref)
    assert report["forms"]["preference"]["invalid_rows"] == 3 and report["forms"]["sft"]["valid_rows"] == 5


def test_sft_form_is_the_whole_solution_and_preference_keeps_both_targets() -> None:
    row = math_rows(1)[0]
    assert math_step_sft(row)["completion"] == [{"role": "assistant",
                                                 "content": row["initial_reason_steps"] + row["full_chosen"]}]
    record = math_step_preference(row)
    assert record["prompt"] == [{"role": "user", "content": row["prompt"]}]
    assert record["prefix"] == row["initial_reason_steps"]
    assert (record["chosen_step"], record["rejected_step"]) == (row["chosen"], row["rejected"])
    assert (record["chosen_full"], record["rejected_full"]) == (row["full_chosen"], row["full_rejected"])


def test_unknown_targets_mixed_records_and_a_foreign_end_of_turn_are_refused(tiny_tokenizer: Any) -> None:
    import copy

    step = {"id": "row-0", **math_step_preference(math_rows(1)[0])}
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="preference_target: 'all' is not one of step, full"):
        preference_rows([step], "all", tiny_tokenizer)
    with pytest.raises(ValueError, match="mix step-wise and conversational"):
        preference_rows([step, pair], "step", tiny_tokenizer)
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = other.chat_template.replace("</s>", "<|end|>")
    with pytest.raises(ValueError, match="ends an assistant turn with '<|end|>\\\\n' but tokenizer.eos_token"):
        preference_rows([step], "full", other)
    assert preference_rows([step], "step", other)[0]["chosen"] == step["chosen_step"]  # no end of turn needed


# --- the real SmolLM2 tokenizer (ChatML: <|im_start|>role ... <|im_end|>) on the offline math asset
def _asset(name: str) -> Path:
    path = asset_path(name)
    if not ((path if path.is_dir() else path.parent) / MARKER).exists():
        pytest.skip(f"offline asset {name!r} not fetched ({path}); `d2lora assets` fetches it")
    return path


@pytest.fixture(scope="module")
def smollm2() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_asset("smollm2"))


@pytest.fixture(scope="module")
def asset_records() -> list[dict]:
    rows = [json.loads(line) for line in _asset("math_synthetic").read_text().splitlines()]
    assert all(r.get("full_rejected") for r in rows)  # the asset has both targets
    return [math_step_preference(r) for r in rows]


def test_smollm2_end_of_turn_is_eos_and_no_asset_row_merges_tokens_at_the_seam(
        smollm2: Any, asset_records: list[dict]) -> None:
    assert end_of_turn(smollm2) == "<|im_end|>" == smollm2.eos_token
    for target in ("step", "full"):
        for row in preference_rows(asset_records, target, smollm2):
            prompt = smollm2(row["prompt"])["input_ids"]
            for side in ("chosen", "rejected"):
                assert smollm2(row["prompt"] + row[side])["input_ids"][:len(prompt)] == prompt


@pytest.mark.parametrize("method", ["dpo", "orpo"])
@pytest.mark.parametrize("target", ["step", "full"])
def test_smollm2_masks_put_the_steps_in_the_open_assistant_turn(
        method: str, target: str, smollm2: Any, asset_records: list[dict], tiny_experiment: dict,
        tmp_path: Path) -> None:
    # the tiny model only hosts the trainer: tokenization never looks at the model's vocabulary
    records = asset_records[:4]
    rows = preference_rows(records, target, smollm2)
    masks = _masks(_trainer(method, rows, smollm2, tiny_experiment, tmp_path))
    header = smollm2("<|im_start|>assistant\n")["input_ids"]
    for record, row, mask in zip(records, rows, masks, strict=True):
        context = _text(smollm2, mask["context"])
        assert context == row["prompt"] and context.startswith("<|im_start|>system\n")
        assert context.endswith("<|im_end|>\n<|im_start|>assistant\n" + record["prefix"])
        start = len(mask["context"]) - len(smollm2(record["prefix"])["input_ids"]) - len(header)
        assert mask["context"][start:start + len(header)] == header
        for side in ("chosen", "rejected"):
            completion = _text(smollm2, mask[side])
            if target == "step":
                assert completion == record[f"{side}_step"] and smollm2.eos_token_id not in mask[side]
            else:
                assert completion == record[f"{side}_full"] + "<|im_end|>"
                assert mask[side].count(smollm2.eos_token_id) == 1 and "The answer is: " in completion
            assert "Let's think step by step." not in completion
