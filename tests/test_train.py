"""The training pipeline on the tiny model: warm-up, warm start, DPO reference, ORPO, SFT masking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from d2lora_dist import adapters
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.data.selection import task_records
from d2lora_dist.layout import RunLayout
from d2lora_dist.methods import get_method
from d2lora_dist.modeling import attach_lora, load_base_model, load_tokenizer
from d2lora_dist.schedule import plan_schedule
from d2lora_dist.train import Phase, make_trainer, train_phase, training_arguments, training_rows
from d2lora_dist.warmup import run_warmup
from tests.closeness import StartAndGradients, assert_close_in_norm, assert_same_update, train_with_sgd

LN2 = math.log(2)


@pytest.fixture
def warmed(tiny_experiment: dict):
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    result = run_warmup(exp, layout)
    return exp, layout, result


def _phase(exp, layout, method: str, init_adapter: Path | None, n: int = 4, **settings) -> Phase:
    s = exp.methods[method]
    for key, value in settings.items():
        setattr(s, key, value)
    records, subset = task_records(exp, "math", get_method(method).form, n, 0)
    name = f"{method}-{'d2lora' if init_adapter else 'lora'}"
    return Phase(name=name, method=method, settings=s, settings_key=f"methods.{method}", records=records,
                 out_adapter=layout.root / name / "adapter",
                 checkpoint_dir=layout.root / name / "ckpt", seed=0, lineage={"phase": "adapt"},
                 init_adapter=init_adapter)


def test_warmup_writes_a_verified_adapter_with_lineage(warmed) -> None:
    exp, layout, result = warmed
    manifest = adapters.verify_adapter(layout.warmup_adapter)
    assert result["adapter"]["sha256"] == manifest["adapter_sha256"]
    assert manifest["phase"] == "warmup" and manifest["parent"] is None and manifest["method"] == "sft"
    assert manifest["data"]["n"] == 8 and manifest["data"]["dataset"] == "orpo_dpo_mix"
    assert manifest["hyperparameters"]["learning_rate"] == exp.warmup.train.learning_rate
    assert manifest["base_model"]["name"] == exp.model.name_or_path
    assert result["train"]["steps"] == 4 and not (layout.warmup_dir / "checkpoints" / "checkpoint-1").exists()
    again = run_warmup(exp, layout)  # done: returns the recorded result, trains nothing
    assert again == result


@pytest.mark.parametrize("init", ["lora", "d2lora"])
def test_first_dpo_loss_is_ln2_with_the_starting_policy_as_reference(warmed, init: str) -> None:
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "dpo", layout.warmup_adapter if init == "d2lora" else None, reference="init")
    outcome = train_phase(exp, phase)
    first = next(h for h in outcome.log_history if "loss" in h)
    # policy and reference are the same weights (two adapters, two forward passes): their log-ratios agree to
    # float32 rounding (~1e-7), so the loss is ln 2 and the margin 0 far inside these bounds on any CPU
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    manifest = adapters.verify_adapter(phase.out_adapter)
    if init == "d2lora":
        assert manifest["parent"]["adapter_sha256"] == adapters.read_manifest(layout.warmup_adapter)["adapter_sha256"]
    else:
        assert manifest["parent"] is None
    assert not (phase.out_adapter / "ref").exists()  # only the trained adapter is published


def test_base_reference_drops_the_frozen_copy_and_differs_from_ln2(warmed) -> None:
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "dpo", layout.warmup_adapter, reference="base")
    args = training_arguments(exp, phase, None, plan_schedule(phase.settings, len(phase.records), 1))
    state, _ = adapters.load_adapter_state(layout.warmup_adapter)
    model = attach_lora(load_base_model(exp.model, training=True), exp.lora, state)
    from datasets import Dataset

    tokenizer = load_tokenizer(exp.model)
    trainer = make_trainer(phase, model, args, Dataset.from_list(training_rows(phase, tokenizer)), tokenizer)
    assert "ref" not in trainer.model.peft_config and trainer.ref_model is None
    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert abs(first["loss"] - LN2) > 1e-4  # the warm-up adapter already moved the policy away from base


def test_warm_start_equals_peft_loading_the_artifact(warmed) -> None:
    from peft import PeftModel

    exp, layout, _ = warmed
    state, _ = adapters.load_adapter_state(layout.warmup_adapter)
    ours = attach_lora(load_base_model(exp.model, training=False), exp.lora, state).eval()
    reference = PeftModel.from_pretrained(load_base_model(exp.model, training=False), str(layout.warmup_adapter)).eval()
    batch = load_tokenizer(exp.model)(["Sam has 3 apples and buys 4 more."], return_tensors="pt")
    with torch.no_grad():  # the same tensors in the same PEFT modules: the same forward, bit for bit
        assert torch.equal(ours(**batch).logits, reference(**batch).logits)
        base = load_base_model(exp.model, training=False)(**batch).logits
    assert not torch.allclose(ours(**batch).logits, base, atol=1e-4)  # the adapter does something
    assert all(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)


def test_orpo_trains_without_a_reference_and_publishes_an_adapter(warmed) -> None:
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "orpo", layout.warmup_adapter)
    outcome = train_phase(exp, phase)
    assert outcome.steps == 2 and math.isfinite(outcome.final_loss)
    assert any("odds_ratio" in k or "log_odds" in k for h in outcome.log_history for k in h)
    adapters.verify_adapter(phase.out_adapter)


def test_a_finished_phase_frees_its_trainer_before_returning(warmed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer (and with it the engine, optimizer states and gradients) sits in reference cycles;
    evaluation loads right after the phase, so they must be gone then, not when the collector runs."""
    import gc
    import weakref

    from d2lora_dist import train

    exp, layout, _ = warmed
    made: list[weakref.ref] = []
    original = train.make_trainer

    def remembering(*args, **kwargs):
        trainer = original(*args, **kwargs)
        made.append(weakref.ref(trainer))
        return trainer

    monkeypatch.setattr(train, "make_trainer", remembering)
    gc.disable()  # only train_phase's own collection may free it
    try:
        train_phase(exp, _phase(exp, layout, "sft", layout.warmup_adapter))
        assert len(made) == 1 and made[0]() is None, "the trainer outlived its phase"
    finally:
        gc.enable()


def test_sft_loss_covers_only_the_response_and_every_adapter_weight_moves(warmed) -> None:
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "sft", None, learning_rate=1e-2)
    args = training_arguments(exp, phase, None, plan_schedule(phase.settings, len(phase.records), 1))
    model = attach_lora(load_base_model(exp.model, training=True), exp.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    from datasets import Dataset

    trainer = make_trainer(phase, model, args, Dataset.from_list(phase.records), load_tokenizer(exp.model))
    row = trainer.train_dataset[0]
    labels = row["labels"]
    prompt_len = next(i for i, label in enumerate(labels) if label != -100)
    assert 0 < prompt_len < len(labels) and labels[prompt_len:] == row["input_ids"][prompt_len:]
    tokenizer = load_tokenizer(exp.model)
    assert phase.records[0]["completion"][0]["content"] in tokenizer.decode(row["input_ids"][prompt_len:])
    assert phase.records[0]["prompt"][0]["content"] in tokenizer.decode(row["input_ids"][:prompt_len])
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, unchanged


def test_micro_batches_and_accumulation_give_the_same_update(tiny_experiment: dict,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """4 x 1 and 2 x 2 (micro-batch x accumulation) take the same optimizer step: the same gradient and
    update up to summation order (norm-relative, tests/closeness.py), under SGD: Adam's first step is
    ~lr * sign(g), so a near-zero gradient component that two summation orders round to opposite signs
    would move by a full step on some CPUs. Clipping off: a clipped gradient hides its scale (the mean
    over micro-batches)."""
    train_with_sgd(monkeypatch)
    results = []
    for micro, accum in ((4, 1), (2, 2)):
        exp = experiment_from_dict(tiny_experiment)
        layout = RunLayout(exp.run_dir / f"{micro}x{accum}")
        phase = _phase(exp, layout, "dpo", None, per_device_batch_size=micro, global_batch_size=micro * accum,
                       max_steps=1, max_grad_norm=1e9)
        recorded = StartAndGradients()
        phase.callbacks.append(recorded)
        train_phase(exp, phase)
        state, _ = adapters.load_adapter_state(phase.out_adapter)
        assert len(recorded.gradients) == 1
        results.append((recorded, state))
    (whole, whole_end), (accumulated, accumulated_end) = results
    assert_close_in_norm(accumulated.start, whole.start, rtol=0.0, what="start")  # one seed: the same fresh LoRA
    assert_close_in_norm(accumulated.gradients[0], whole.gradients[0], what="gradient")
    assert_same_update(accumulated_end, whole_end, whole.start, steps=1)


def test_rows_all_truncated_away_stop_with_the_setting_to_change(warmed) -> None:
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "dpo", None, max_length=8)
    with pytest.raises(ValueError, match=r"all 4 training rows have a prompt that fills max_length=8 tokens.*"
                                         r"raise methods.dpo.max_length"):
        train_phase(exp, phase)


def test_a_phase_records_its_schedule_tokens_truncation_and_update_size(warmed) -> None:
    exp, layout, result = warmed
    manifest = adapters.read_manifest(layout.warmup_adapter)
    assert manifest["schedule"] == {"examples": 8, "world_size": 1, "per_device_batch_size": 2,
                                    "gradient_accumulation_steps": 1, "global_batch_size": 2, "steps_per_epoch": 4,
                                    "optimizer_steps": 4, "epochs": 1.0, "raised_to_min_steps": False}
    assert manifest["tokens_seen"] > 8 and manifest["truncation"]["rows"] == 8
    # the launch that really ran (one process) and its memory estimate at the phase's batch and length
    launch = manifest["launch"]
    assert (launch["strategy"], launch["world_size"], launch["fits"]) == ("ddp", 1, True)
    assert launch["estimate"]["devices"] == 1 and launch["estimate"]["total"] > launch["estimate"]["weights"] > 0
    update = manifest["update"]
    assert update["summary"]["phase_rel_max"] > exp.update_warning_below and update["warning"] is None
    assert set(update["modules"]) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    train = result["train"]
    assert (train["world_size"], train["global_batch_size"], train["optimizer_steps"]) == (1, 2, 4)
    assert train["tokens_seen"] == manifest["tokens_seen"] and train["truncation"] == manifest["truncation"]


def test_a_phase_too_small_to_change_the_outputs_says_so(warmed, capsys: pytest.CaptureFixture) -> None:
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "sft", None, learning_rate=1e-9)
    outcome = train_phase(exp, phase)
    out = capsys.readouterr().out
    assert "WARNING: this phase changed the frozen weights by at most" in out and "raise the learning rate" in out
    assert outcome.update["warning"] and outcome.summary()["update"]["phase_rel_max"] < 1e-6
    assert adapters.read_manifest(phase.out_adapter)["update"]["warning"] == outcome.update["warning"]


def test_min_steps_repeats_small_data_and_responses_cut_by_max_length_are_counted(warmed) -> None:
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "sft", None, min_steps=5, max_length=40)  # 4 rows at batch 2: 2 steps
    outcome = train_phase(exp, phase)
    assert outcome.steps == 5 and outcome.schedule.raised_to_min_steps and outcome.schedule.epochs == 2.5
    cut = outcome.truncation
    assert cut.rows == 4 and cut.response_cut + cut.prompt_fills > 0 and cut.longest > 40
    assert outcome.summary()["truncation"]["response_cut"] == cut.response_cut


def test_a_preference_row_whose_prompt_fills_max_length_is_dropped_not_trained_into_nan(
        warmed, capsys: pytest.CaptureFixture) -> None:
    """TRL drops such rows for SFT only; an ORPO response left with no token makes the gradient NaN."""
    exp, layout, _ = warmed
    phase = _phase(exp, layout, "orpo", None, max_length=160, logging_steps=1, min_steps=4)
    long_prompt = " ".join(["the adapter learns the title of the abstract"] * 30)
    phase.records[0]["prompt"] = [{"role": "user", "content": long_prompt}]
    outcome = train_phase(exp, phase)
    assert outcome.truncation.prompt_fills == 1 and outcome.truncation.rows == 4
    out = capsys.readouterr().out  # said as what happened: dropped here, not by TRL's trainer
    assert "1 of 4 rows dropped before training" in out and "dropped by the trainer" not in out
    norms = [h["grad_norm"] for h in outcome.log_history if "grad_norm" in h]
    assert len(norms) == 4 and all(math.isfinite(v) for v in norms)
    state, _ = adapters.load_adapter_state(phase.out_adapter)
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


def test_a_diverging_phase_stops_at_the_step_and_saves_no_adapter(warmed) -> None:
    from d2lora_dist.divergence import TrainingDiverged

    exp, layout, _ = warmed
    phase = _phase(exp, layout, "sft", None, learning_rate=float("inf"), logging_steps=1, min_steps=6)
    with pytest.raises(TrainingDiverged, match=r"\[sft-lora\] training diverged: loss = (nan|inf).* "
                                               r"at optimizer step \d"):
        train_phase(exp, phase)
    assert not phase.out_adapter.exists()
