"""KTO, the fourth adaptation method: its rows come from the preference pairs (chosen -> desirable, rejected ->
undesirable), it warm-starts like DPO and compares against the starting adapter or the base model."""

from __future__ import annotations

import pytest

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.data.preference import preference_rows
from d2lora_dist.data.selection import task_records
from d2lora_dist.layout import RunLayout
from d2lora_dist.modeling import load_tokenizer
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.grid import plan_cells
from d2lora_dist.train import Phase, train_phase, training_rows
from d2lora_dist.warmup import run_warmup

# TRL's KTO loss, 1 - sigmoid(beta * (log-ratio - KL)) for a desirable example and 1 - sigmoid(beta * (KL - log-ratio))
# for an undesirable one, is 1 - sigmoid(0) = 1/2 for both while the policy is its reference (log-ratio and KL 0).
HALF = 0.5


@pytest.fixture
def kto_experiment(tiny_experiment: dict) -> dict:
    tiny_experiment["methods"]["kto"] = {**tiny_experiment["methods"]["dpo"]}
    tiny_experiment["grid"][0]["methods"] = ["sft", "kto"]
    return tiny_experiment


def kto_phase(exp, layout, init_adapter=None, reference: str = "init") -> Phase:
    exp.methods["kto"].reference = reference
    records, _ = task_records(exp, "math", "preference", 4, 0)
    name = f"kto-{reference}-{'d2lora' if init_adapter else 'lora'}"
    return Phase(name=name, method="kto", settings=exp.methods["kto"], settings_key="methods.kto", records=records,
                 out_adapter=layout.root / name / "adapter", checkpoint_dir=layout.root / name / "ckpt", seed=0,
                 lineage={"phase": "adapt"}, init_adapter=init_adapter)


def test_each_pair_gives_its_chosen_as_desirable_and_its_rejected_as_undesirable(kto_experiment: dict) -> None:
    exp = experiment_from_dict(kto_experiment)
    phase = kto_phase(exp, RunLayout(exp.run_dir))
    tokenizer = load_tokenizer(exp.model)
    pairs = preference_rows(phase.records, exp.methods["kto"].preference_target, tokenizer)
    rows = training_rows(phase, tokenizer)
    assert len(rows) == 2 * len(pairs) == 8
    assert sorted((r["prompt"], r["completion"]) for r in rows if r["label"] is True) == sorted(
        (p["prompt"], p["chosen"]) for p in pairs)
    assert sorted((r["prompt"], r["completion"]) for r in rows if r["label"] is False) == sorted(
        (p["prompt"], p["rejected"]) for p in pairs)
    assert all("chosen" not in r and "rejected" not in r for r in rows)
    # read in order by TRL (its KL baseline pairs a row with its neighbour's response): neighbours differ in prompt
    assert all(a["prompt"] != b["prompt"] for a, b in zip(rows, rows[1:], strict=False))


def test_kto_is_planned_and_needs_two_rows_per_micro_batch(kto_experiment: dict) -> None:
    assert {"math-kto-lora-n4-s0", "math-kto-d2lora-n4-s0"} <= {c.id for c in plan_cells(
        experiment_from_dict(kto_experiment))}
    kto_experiment["methods"]["kto"] |= {"per_device_batch_size": 1}
    with pytest.raises(ConfigError, match=r"methods\.kto\.per_device_batch_size: kto needs at least 2 rows per "
                                          r"micro-batch, got 1"):
        experiment_from_dict(kto_experiment)


def test_first_kto_loss_is_half_from_the_warmup_with_itself_as_reference_and_not_against_base(
        kto_experiment: dict) -> None:
    kto_experiment["warmup"]["n"] = 4
    kto_experiment["methods"]["kto"] |= {"max_steps": 1}  # the first loss is under test
    exp = experiment_from_dict(kto_experiment)
    layout = RunLayout(exp.run_dir)
    run_warmup(exp, layout)
    init = train_phase(exp, kto_phase(exp, layout, layout.warmup_adapter, "init"))
    first = next(h for h in init.log_history if "loss" in h)
    # one micro-batch holds a desirable and an undesirable example (the rows' order): both halves of the loss ran
    assert first["loss"] == pytest.approx(HALF, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert init.steps == 1 and init.manifest["reference"] == "init (starting adapter)"
    assert init.manifest["parent"]["path"] == str(layout.warmup_adapter)
    base = train_phase(exp, kto_phase(exp, layout, layout.warmup_adapter, "base"))
    assert abs(next(h for h in base.log_history if "loss" in h)["loss"] - HALF) > 1e-4  # the warm-up moved the policy
    assert base.manifest["reference"] == "base (adapters disabled)"
