"""The frozen plan: experiment.yaml and plan.json written once; array index i is cell i."""

from __future__ import annotations

import json
import re

import pytest

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.plan import PlanError, cell_at, freeze_plan, load_plan


def test_the_plan_is_frozen_once_and_maps_array_indices_to_cells(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    assert load_plan(layout) == cells and cell_at(layout, 2) == cells[2]
    assert json.loads(layout.plan_file.read_text())["cells"][0]["id"] == cells[0].id
    assert freeze_plan(exp, layout) == cells  # the same experiment: idempotent
    with pytest.raises(PlanError, match=f"array index {len(cells)} outside the frozen plan of {len(cells)} cells"):
        cell_at(layout, len(cells))


def test_a_changed_experiment_cannot_reuse_a_frozen_run_directory(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    freeze_plan(exp, layout)
    frozen = layout.experiment_file.read_text()
    tiny_experiment["methods"]["sft"]["learning_rate"] = 0.5
    with pytest.raises(PlanError, match=r"methods.sft.learning_rate: 0.001 -> 0.5"):
        freeze_plan(experiment_from_dict(tiny_experiment), layout)
    assert layout.experiment_file.read_text() == frozen  # nothing overwritten


def test_a_run_directory_frozen_before_a_setting_existed_resumes_only_with_what_it_ran(
        tiny_experiment: dict) -> None:
    import yaml

    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    freeze_plan(exp, layout)
    older = yaml.safe_load(layout.experiment_file.read_text())  # as written before batching and block suites
    for settings in [older["warmup"]["train"], *older["methods"].values()]:
        del settings["batching"]
    for block in older["grid"]:
        del block["suites"]
    layout.experiment_file.write_text(yaml.safe_dump(older, sort_keys=False))
    # its jobs load it as its runs ran (padded), not with today's default (auto)
    from d2lora_dist.config import load_experiment

    jobs_see = load_experiment(layout.experiment_file)
    assert {s.batching for s in [jobs_see.warmup.train, *jobs_see.methods.values()]} == {"padded"}
    # today's default (auto) would train those cells differently from how they ran (padded): refused
    with pytest.raises(PlanError, match=r"methods.sft.batching: 'padded' -> 'auto'.*set those keys back"):
        freeze_plan(exp, layout)
    for settings in [tiny_experiment["warmup"]["train"], *tiny_experiment["methods"].values()]:
        settings["batching"] = "padded"
    freeze_plan(experiment_from_dict(tiny_experiment), layout)  # what the frozen runs did: resumes
    tiny_experiment["grid"][0]["suites"] = ["gsm8k"]  # a newer setting asked with another value than it ran
    with pytest.raises(PlanError, match=r"grid\[0\].suites: None -> \['gsm8k'\]"):
        freeze_plan(experiment_from_dict(tiny_experiment), layout)


def test_the_token_estimate_counts_every_token_of_prompt_and_response(tiny_experiment: dict) -> None:
    """Against a count by pieces: the chat template's four special tokens, then each text piece
    between them (special tokens split the text, so the pieces' counts add up)."""
    from d2lora_dist.data.loading import normalize
    from d2lora_dist.modeling import load_tokenizer
    from d2lora_dist.sweep.plan import measure_workload

    tiny_experiment["grid"] = [{"task": "titles", "methods": ["sft"], "n": [4]}]
    tiny_experiment["methods"]["sft"]["max_length"] = 512
    exp = experiment_from_dict(tiny_experiment)
    work = measure_workload(exp)
    tokenizer = load_tokenizer(exp.model)

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    records = list(normalize(exp.tasks["titles"].dataset, "sft").records.values())
    by_pieces = [4 + n("\n" + r["prompt"][0]["content"]) + n("\n") + n("\n" + r["completion"][0]["content"]) + n("\n")
                 for r in records]
    assert max(by_pieces) < exp.methods["sft"].max_length  # nothing cut
    assert work.train_tokens_per_example == {("titles", "sft"): sum(by_pieces) / len(by_pieces)}
    assert work.train_tokens_per_example[("titles", "sft")] > 20  # not 2 per example
    assert work.eval_items == {"gsm8k": 4, "arc_easy": 4, "titles": 4}


# ---- the real SmolLM2 tokenizer: trained tokens against apply_chat_template(tokenize=True) -------------
def _smollm2_experiment(tiny_experiment: dict) -> dict:
    from d2lora_dist.assets import MARKER, asset_path

    path = asset_path("smollm2")
    if not (path / MARKER).exists():
        pytest.skip(f"offline asset 'smollm2' not fetched ({path}); `d2lora assets` fetches it")
    tiny_experiment["model"]["name_or_path"] = "asset:smollm2"
    tiny_experiment["methods"]["dpo"]["preference_target"] = "step"
    for method in ("sft", "dpo"):
        tiny_experiment["methods"][method]["max_length"] = 256
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft", "dpo"], "inits": ["lora"], "n": [0, 4]}]
    return tiny_experiment


def test_trained_tokens_match_a_hand_count_with_the_smollm2_chat_template(tiny_experiment: dict) -> None:
    from transformers import AutoTokenizer

    from d2lora_dist.data.loading import normalize
    from d2lora_dist.sweep.plan import Throughput, estimate, measure_workload

    exp = experiment_from_dict(_smollm2_experiment(tiny_experiment))
    tokenizer = AutoTokenizer.from_pretrained(model_dir(exp))
    data = exp.tasks["math"].dataset

    def chat_tokens(messages: list[dict], **kw: object) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))

    sft = [chat_tokens(r["prompt"] + r["completion"]) for r in normalize(data, "sft").records.values()]
    # DPO, step target: the solution's first steps open the assistant turn, then chosen or rejected next step
    dpo = [sum(chat_tokens(r["prompt"] + [{"role": "assistant", "content": r["prefix"] + r[side]}],
                           continue_final_message=True) for side in ("chosen_step", "rejected_step"))
           for r in normalize(data, "preference").records.values()]
    assert min(sft) > 40 and max(sft + dpo) < 256  # max_length cuts nothing (DPO: both sides together)
    work = measure_workload(exp)
    assert work.train_tokens_per_example[("math", "sft")] == pytest.approx(sum(sft) / len(sft))
    assert work.train_tokens_per_example[("math", "dpo")] == pytest.approx(sum(dpo) / len(dpo))

    rows = {r.cell.id: r for r in estimate(exp, RunLayout(exp.run_dir), work, Throughput(100.0, 50.0))}
    cell = rows["math-sft-lora-n4-s0"]  # 4 examples, 1 epoch
    assert (cell.train_examples, cell.train_tokens) == (4, round(4 * sum(sft) / len(sft)))
    assert cell.gpu_hours == pytest.approx((cell.train_tokens / 100 + cell.eval_tokens / 50) / 3600)
    assert rows["math-none-lora-n0-s0"].train_tokens == 0 and rows["math-none-lora-n0-s0"].eval_tokens > 0

    prompts = [chat_tokens(r["prompt"], add_generation_prompt=True) for r in normalize(data, "sft").records.values()]
    cut = min(sft) - 5
    assert max(prompts) < cut
    exp.methods["sft"].max_length = cut  # every SFT row loses its end: `cut` tokens each
    assert measure_workload(exp).train_tokens_per_example[("math", "sft")] == cut
    exp.methods["sft"].max_length = min(prompts)  # a prompt that fills max_length: TRL drops the row
    assert measure_workload(exp).train_tokens_per_example[("math", "sft")] < cut * (len(sft) - 1) / len(sft)


def model_dir(exp) -> str:
    from d2lora_dist.modeling import model_path

    return model_path(exp.model)


def test_sweep_plan_prints_launch_memory_tokens_gpu_hours_and_a_total(tiny_experiment: dict, tmp_path,
                                                                      capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from d2lora_dist.cli import main
    from tests.conftest import write_experiment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine's slots, as a CPU machine

    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    # slow enough that the tiny model's few tokens make hours the table shows to two decimals
    assert main(["sweep", "plan", "-c", str(path), "--train-tokens-per-s", "0.1", "--eval-tokens-per-s", "0.05"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("cell "))
    for column in ("launch", "GiB/GPU", "train ex.", "train tokens", "eval tokens", "GPU-h"):
        assert column in header, column
    assert "GPU-hours at 0.1 training and 0.05 evaluation tokens per GPU-second" in out
    assert "math-sft-lora-n4-s0" in out and "ddp x1" in out
    assert "launch of sft cells: ddp on 1 GPU(s)" in out
    here = next(line for line in out.splitlines() if "`sweep run` here: " in line)  # the local run differs
    assert "slot" in here and "CPU core" in here and "sft: ddp x1" in here
    if "2 slot(s)" in here:  # two slots (two cores, memory for both): the warm-up trains beside the vanilla cells
        assert "the warm-ups in slots beside the cells" in here
    else:
        assert "beside" not in here
    total = out.splitlines()[-1]
    assert total.startswith("total (6 cells not done, 1 warm-up(s) to train): ") and "train tokens" in total
    # the warm-up counts in the total and has a line of its own: 8 examples, one epoch
    warm = next(line for line in out.splitlines() if line.startswith("warm-up warmup: "))
    assert "8 train ex." in warm
    warm_hours = float(re.search(r"([\d.]+) GPU-h$", warm).group(1))
    cell_hours = sum(float(line.split()[-1]) for line in out.splitlines() if line.startswith("math-"))
    assert warm_hours > 0.5 and "warm-ups (1 of 1 to train): " in out
    hours = re.search(r", ([\d.]+) GPU-hours \(([\d.]+) cells \+ ([\d.]+) warm-ups\)$", total)
    assert hours is not None, total
    assert float(hours.group(3)) == pytest.approx(warm_hours, abs=0.06)
    assert float(hours.group(2)) == pytest.approx(cell_hours, abs=0.06 + 0.005 * 6)
    assert float(hours.group(1)) == pytest.approx(cell_hours + warm_hours, abs=0.1 + 0.005 * 6)
    assert main(["sweep", "plan", "-c", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    sft = next(r for r in rows if r["id"] == "math-sft-lora-n4-s0")
    assert sft["strategy"] == "ddp" and sft["gpus"] == 1 and sft["memory_gib_per_device"] > 0
    assert sft["train_tokens"] > 0 and sft["eval_tokens"] > 0 and sft["gpu_hours"] > 0


def test_the_plan_lists_each_warmup_run_with_its_size_init_and_cells(tiny_experiment: dict) -> None:
    from d2lora_dist.sweep.plan import warmup_rows

    warmup = tiny_experiment.pop("warmup")
    tiny_experiment["warmups"] = {"m8": warmup, "m4": {**warmup, "n": 4}}
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 4],
                                "seeds": [0, 1], "lora_inits": ["default", "olora"]},
                               {"task": "math", "methods": ["sft"], "inits": ["d2lora"], "n": [8], "warmups": ["m8"]}]
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    layout.warmup_home("m4").mkdir(parents=True)
    layout.warmup_result_of("m4").write_text("{}")
    rows = {r["key"]: r for r in warmup_rows(exp, layout)}
    assert list(rows) == ["m4", "m4+olora", "m8", "m8+olora"]
    assert (rows["m4"]["m"], rows["m4"]["done"], rows["m4"]["cells"]) == (4, True, 3)  # n0 + 2 seeds at n4
    assert (rows["m8"]["m"], rows["m8"]["done"], rows["m8"]["cells"]) == (8, False, 4)  # + the block at n8
    assert rows["m8+olora"]["lora_init"] == "olora" and rows["m8+olora"]["cells"] == 3


def test_each_warmup_run_is_costed_by_its_size_and_a_done_one_leaves_the_total(tiny_experiment: dict) -> None:
    from d2lora_dist.sweep.plan import Throughput, measure_workload, warmup_estimates

    warmup = tiny_experiment.pop("warmup")
    tiny_experiment["warmups"] = {"m8": warmup, "m4": {**warmup, "n": 4}, "all": {**warmup, "n": None}}
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["d2lora"], "n": [4]}]
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    work = measure_workload(exp)
    rows = {w.key: w for w in warmup_estimates(exp, layout, work, Throughput(10.0, 5.0))}
    assert set(rows) == {"m8", "m4", "all"} and not any(w.done for w in rows.values())
    assert (rows["m4"].train_examples, rows["m8"].train_examples) == (4, 8)
    assert rows["all"].train_examples == work.warmup_rows["all"] > 8  # null m: every row of its dataset
    per_example = work.warmup_tokens_per_example["m8"]
    assert per_example > 0 and rows["m8"].train_tokens == round(8 * per_example)
    assert rows["m8"].gpu_hours == pytest.approx(rows["m8"].train_tokens / 10.0 / 3600)
    layout.warmup_home("m4").mkdir(parents=True)
    layout.warmup_result_of("m4").write_text("{}")
    assert [w.key for w in warmup_estimates(exp, layout, work, Throughput(10.0, 5.0)) if w.done] == ["m4"]


def test_the_eval_estimate_asks_each_suite_kind_for_its_own_item_cost(tiny_experiment: dict,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A suite kind the plan has never heard of is costed by its registry entry, not read as multiple choice."""
    from dataclasses import replace

    from d2lora_dist.evaluate import suites
    from d2lora_dist.sweep.plan import measure_workload

    monkeypatch.setitem(suites.SUITES, "gsm8k_fixed_cost",
                        replace(suites.SUITES["gsm8k"], item_tokens=lambda item, tokenizer, settings: 7))
    tiny_experiment["suites"]["gsm8k"]["kind"] = "gsm8k_fixed_cost"  # items without choices
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "n": [4]}]
    work = measure_workload(experiment_from_dict(tiny_experiment))
    assert work.eval_tokens_per_item["gsm8k"] == 7
    assert work.eval_tokens_per_item["arc_easy"] > 7  # the context and every choice of a multiple-choice item
