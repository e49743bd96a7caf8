"""DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), the real commands on the tiny model.

One warm-up per module (`d2lora warmup` under accelerate), then phase 2 from it: the probe
script (tests/dist_scripts/phases.py) for what only a rank can see, and `d2lora adapt` for the
command path, whose in-process evaluation must equal a one-process evaluation item by item.
The saved adapter is float32 under every launch: the same warm-up in one process saves the
same tensors, and a bf16 ZeRO-3 warm-up saves the optimizer's fp32 masters.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from d2lora_dist import adapters
from d2lora_dist.config import load_experiment
from d2lora_dist.layout import RunLayout
from tests.closeness import assert_same_update, relative_difference
from tests.conftest import write_experiment
from tests.dist_scripts.launching import (
    CLI,
    PHASES_SCRIPT,
    assert_same_predictions,
    bf16_cpu_deepspeed_config,
    experiment_dict,
    launch,
    read_jsonl,
    run,
)

pytestmark = pytest.mark.distributed
ZERO3 = "cpu_2proc_zero3.yaml"


def plain_lora_model(exp, adapter_dir: Path):
    """The warm-started model as one plain process builds it."""
    from d2lora_dist.modeling import attach_lora, load_base_model

    state, _ = adapters.load_adapter_state(adapter_dir)
    return attach_lora(load_base_model(exp.model, training=False), exp.lora, state).eval()


@pytest.fixture(scope="module")
def z3(tiny_model_dir: Path, tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from d2lora_dist.config import load_experiment

    root = tmp_path_factory.mktemp("zero3")
    data = experiment_dict(tiny_model_dir, tiny_data, root)
    data["model"]["gradient_checkpointing"] = True  # as the paper presets: PEFT + ZeRO-3 + checkpointing
    # A warm-up whose step is linear in the gradient, so that its ZeRO-3 and one-process adapters compare by
    # norm (tests/closeness.py; AdamW's usual step, ~lr * sign(g), would not): gradients clipped to a total
    # norm of 1e-10, far below AdamW's eps (1e-8), make its step lr * m / eps (momentum SGD, within 1%);
    # lr 5 gives steps of ~0.05 in norm, the size of an AdamW step at the default rate here.
    data["warmup"]["train"].update(max_grad_norm=1e-10, learning_rate=5.0)
    path = write_experiment(data, root / "exp.yaml")
    warmup = run(launch(ZERO3, [*CLI, "warmup", "-c", str(path)]), root / "warmup.log")
    exp = load_experiment(path)
    return SimpleNamespace(root=root, config=path, exp=exp, layout=RunLayout(exp.run_dir), warmup=warmup)


def test_warmup_saves_the_gathered_adapter_once(z3) -> None:
    assert z3.warmup.code == 0, z3.warmup.tail()
    log = z3.warmup.log
    assert "[distributed] deepspeed: 2 ranks, backend gloo" in log
    assert "global batch 4 = 2 per device x 1 accumulation x 2 ranks" in log
    assert log.count("attention implementation: sdpa (requested sdpa, dtype float32") == 2  # logged by each rank
    assert log.count("attention that runs: sdpa") == 2
    assert log.count("[warmup] sft:") == 1  # rank-0 output only
    manifest = adapters.verify_adapter(z3.layout.warmup_adapter)
    assert not list(z3.layout.warmup_dir.glob(".adapter.tmp-*"))  # one writer, renamed into place

    # Reload in this plain process: complete tensors, trained, and they fit the base model.
    from safetensors.torch import load_file

    state = load_file(str(z3.layout.warmup_adapter / adapters.WEIGHTS))
    assert {k: list(v.shape) for k, v in state.items()} == manifest["tensors"]
    kv_dim = 2 * (64 // 4)  # tiny Llama: 2 kv heads x head dim 16
    for key, tensor in state.items():
        out_dim = kv_dim if "v_proj" in key else 64
        assert list(tensor.shape) == ([4, 64] if "lora_A" in key else [out_dim, 4]), key
        if "lora_B" in key:
            assert tensor.abs().sum() > 0, f"{key} is still zero: the warm-up did not train it"
    model = plain_lora_model(z3.exp, z3.layout.warmup_adapter)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(state) == 8


def fresh_warmup_adapter(exp) -> dict[str, torch.Tensor]:
    """The fresh LoRA the warm-up starts from, drawn as train.train_phase draws it (its seed, then PEFT)."""
    from transformers import set_seed

    from d2lora_dist.modeling import attach_lora, load_base_model

    model = load_base_model(exp.model, training=True)
    set_seed(exp.warmup.seed)
    return adapters.gathered_state_dict(attach_lora(model, exp.lora))


def saved_state(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / adapters.WEIGHTS))


def test_zero3_and_one_process_save_the_same_warmup_adapter(z3) -> None:
    """Same experiment, same global batch (2 per rank x 2 ranks = 2 x 2 accumulation in one
    process, see two_rank_batches), same seed: the saved adapters took the same update up to
    summation order (over ranks), tensor by tensor, and both are float32."""
    assert z3.warmup.code == 0, "warm-up failed; see test_warmup_saves_the_gathered_adapter_once"
    data = yaml.safe_load(z3.config.read_text())
    data["output_dir"] = str(z3.root / "one-process-runs")
    path = write_experiment(data, z3.root / "one-process.yaml")
    single = run([sys.executable, *CLI, "warmup", "-c", str(path)], z3.root / "one-process-warmup.log")
    assert single.code == 0, single.tail()
    assert "global batch 4 = 2 per device x 2 accumulation x 1 ranks" in single.log
    one_dir = RunLayout(load_experiment(path).run_dir).warmup_adapter
    zero3, one = saved_state(z3.layout.warmup_adapter), saved_state(one_dir)
    assert sorted(zero3) == sorted(one) and len(one) == 8
    for key in sorted(one):
        assert zero3[key].dtype == one[key].dtype == torch.float32, key
    start = fresh_warmup_adapter(z3.exp)
    manifest = adapters.read_manifest(one_dir)
    for module, row in manifest["update"]["modules"].items():  # `start` is where the warm-up began
        key = f"base_model.model.{module}.lora_A.weight"
        assert relative_difference(one[key], start[key]) == pytest.approx(row["lora_A_rel_change"], rel=1e-2), key
    # the fixture's warm-up steps linearly in the gradient: measured at most 1e-6 of each update apart (under
    # 1% of the bound); the values rounded to bf16 would be 15 to 6000 times the bound apart
    assert_same_update(zero3, one, start, steps=manifest["schedule"]["optimizer_steps"])
    recorded = [adapters.read_manifest(d)["precision"] for d in (z3.layout.warmup_adapter, one_dir)]
    assert recorded == [{"saved_dtype": "float32", "parameter_dtype": "float32", "values": "fp32 master"},
                        {"saved_dtype": "float32", "parameter_dtype": "float32", "values": "parameters"}]


def test_cpu_bf16_is_a_test_only_switch_for_multi_rank_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    from d2lora_dist import distributed

    if torch.cuda.is_available():
        pytest.skip("the switch is for CPU ranks")
    ds = "ds_configs/zero3_cpu_test.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # trainer_kwargs sets it; restored after
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(distributed.CPU_BF16_ENV, raising=False)
    assert not distributed.cpu_bf16_test_launch(ds) and distributed.trainer_kwargs(ds)["bf16"] is False
    monkeypatch.setenv(distributed.CPU_BF16_ENV, "1")
    assert distributed.cpu_bf16_test_launch(ds)
    kwargs = distributed.trainer_kwargs(ds)
    assert kwargs["bf16"] is True and kwargs["use_cpu"] is True
    assert kwargs["accelerator_config"] == {"use_configured_state": True}  # the DeepSpeed state is kept
    assert not distributed.cpu_bf16_test_launch(None)  # DDP: no
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.cpu_bf16_test_launch(ds)  # one process: use_cpu would drop DeepSpeed


@pytest.mark.parametrize(("shipped", "phase"), [("zero3_cpu_test.json", "dpo:init"), ("zero2.json", "sft")])
def test_a_bf16_deepspeed_warmup_saves_the_fp32_masters_not_the_stalled_bf16_copy(
        shipped: str, phase: str, tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    """The paper's warm-up rate (1e-7) moves lora_A less than bf16 resolves at |A| ~ 0.06: the
    bf16 parameters keep their initial lora_A, the optimizer's fp32 masters move. The saved
    adapter must be those masters, in float32 (a bf16 save keeps the initial lora_A). ZeRO-3
    all-gathers the masters' partitions, ZeRO-2 all-reduces their fragments.
    Phase 2 (DPO with its `init` reference under ZeRO-3, SFT under ZeRO-2: one phase each keeps the
    test short) must then start from exactly that float32 file: DeepSpeed builds its masters from the
    bf16 parameters, which hold it rounded."""
    data = experiment_dict(tiny_model_dir, tiny_data, tmp_path)
    data["warmup"]["n"] = 16  # 4 optimizer steps at global batch 4
    data["warmup"]["train"].update(learning_rate=1e-7, lr_scheduler="constant")
    path = write_experiment(data, tmp_path / "exp.yaml")
    ds = bf16_cpu_deepspeed_config(tmp_path / f"bf16-{shipped}", shipped)
    out = tmp_path / "probe"
    result = run(launch(ZERO3, [PHASES_SCRIPT, "-c", str(path), "--out", str(out), "--warmup", "--precision",
                                "--phases", phase],
                        extra=["--deepspeed_config_file", str(ds)]), tmp_path / "bf16.log", D2LORA_TEST_CPU_BF16="1")
    assert result.code == 0, result.tail()
    adapter_dir = RunLayout(load_experiment(path).run_dir).warmup_adapter
    saved, rec = saved_state(adapter_dir), torch.load(out / "precision-warmup.pt")
    assert sorted(saved) == sorted(rec["end_master"]) == sorted(rec["begin_params"]) and len(saved) == 8
    for key, tensor in saved.items():
        begin, end_bf16, master = rec["begin_params"][key], rec["end_params"][key], rec["end_master"][key]
        assert begin.dtype == end_bf16.dtype == torch.bfloat16 and master.dtype == tensor.dtype == torch.float32, key
        assert torch.equal(tensor, master), f"{key}: saved values are not the optimizer's fp32 masters"
        if "lora_A" in key:
            # the regime: the bf16 copy stalled (measured: 0-0.4% of elements moved) ...
            assert (end_bf16 != begin).float().mean() < 0.05, f"{key}: bf16 lora_A moved; lr too large for this test"
            # ... while the saved lora_A carries the update (measured: 94-100% of elements moved)
            moved = (tensor != begin.float()).float().mean()
            assert moved > 0.9, f"{key}: only {moved:.1%} of the saved lora_A differs from its initial bf16 value"
    assert adapters.verify_adapter(adapter_dir)["precision"] == {
        "saved_dtype": "float32", "parameter_dtype": "bfloat16", "values": "fp32 master"}
    if shipped.startswith("zero3"):  # its checkpoints (steps 2 and 4) gather the adapter, not the frozen base
        warmup = json.loads((out / "rank-0.json").read_text())["warmup"]
        assert warmup["checkpoints"]["saves"] == 2, warmup
        assert warmup["checkpoints"]["gathered_numel"] == 2 * warmup["trainable_numel"], warmup
    method, _, reference = phase.partition(":")
    start = torch.load(out / f"precision-{method}-{reference or 'default'}.pt")
    assert sorted(start["begin_master"]) == sorted(saved), phase
    for key, tensor in saved.items():
        assert torch.equal(start["begin_master"][key], tensor), f"{phase} {key}: masters start from a rounded copy"
        assert not torch.equal(start["begin_params"][key].float(), tensor), f"{key}: bf16 holds it exactly"


@pytest.fixture(scope="module")
def probe(z3) -> SimpleNamespace:
    assert z3.warmup.code == 0, "warm-up failed; see test_warmup_saves_the_gathered_adapter_once"
    out = z3.root / "probe"
    result = run(launch(ZERO3, [PHASES_SCRIPT, "-c", str(z3.config), "--out", str(out), "--logits",
                                "--phases", "dpo:init,dpo:base,orpo,sft"]), z3.root / "probe.log",
                 D2LORA_PG_TIMEOUT_S="900")  # not torch's default, so that the groups' timeouts say where theirs came from
    assert result.code == 0, result.tail()
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return SimpleNamespace(out=out, ranks=ranks, result=result)


def test_rank0_reads_the_adapter_once_and_every_rank_gets_the_same_tensors(z3, probe) -> None:
    from safetensors.torch import load_file

    on_disk = adapters.state_checksum(load_file(str(z3.layout.warmup_adapter / adapters.WEIGHTS)))
    assert [r["broadcast"]["checksum"] for r in probe.ranks] == [on_disk, on_disk]
    assert adapters.WEIGHTS in probe.ranks[0]["broadcast"]["opened"]
    assert probe.ranks[1]["broadcast"]["opened"] == []  # rank 1 never opened a file of the adapter


def test_every_process_group_deepspeed_made_included_gets_the_configured_timeout(probe) -> None:
    for report in probe.ranks:
        for phase in report["phases"]:
            timeouts = phase["group_timeouts_s"]
            assert len(timeouts) >= 2, f"{phase['phase']}: DeepSpeed made no group of its own? {timeouts}"
            assert timeouts == [900.0] * len(timeouts), f"{phase['phase']}: {timeouts}"


def test_each_rank_holds_half_of_the_base_model(probe) -> None:
    for report in probe.ranks:
        for phase in report["phases"]:
            for key in ("base_at_load", "base_in_training", "model_in_training"):
                local, full = phase[key]
                # ZeRO-3 pads each parameter to a multiple of the world size: at most 1 extra per tensor
                assert full / 2 <= local <= full / 2 + 64, (report["rank"], phase["phase"], key, local, full)


def test_warm_started_logits_under_zero3_equal_a_one_process_load(z3, probe) -> None:
    saved = torch.load(probe.out / "logits.pt")
    model = plain_lora_model(z3.exp, z3.layout.warmup_adapter)
    with torch.no_grad():
        expected = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    # one forward pass over the same weights and the same batch, gathered by ZeRO-3 or whole: the same
    # operations, not another summation order; the bound is far below the adapter's effect checked next
    torch.testing.assert_close(saved["logits"], expected, rtol=1e-5, atol=1e-5)
    from d2lora_dist.modeling import load_base_model

    with torch.no_grad():
        base = load_base_model(z3.exp.model, training=False).eval()(
            input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    assert (base - saved["logits"]).abs().max() > 1e-3  # the adapter really was loaded (peft 2884)


def test_dpo_and_orpo_references_under_zero3(probe) -> None:
    for report in probe.ranks:
        phases = {p["phase"]: p for p in report["phases"]}
        init, base = phases["dpo-init"], phases["dpo-base"]
        assert init["ref_model_is_none"] and base["ref_model_is_none"]  # no second base model
        assert init["adapters"] == ["default", "ref"]  # TRL's frozen copy of the warm-up adapter
        assert base["adapters"] == ["default"]  # reference = adapters disabled = base model
        assert init["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference up to ~1e-7
        assert math.isfinite(base["first_loss"]) and math.isfinite(phases["orpo-default"]["first_loss"])
        for phase in report["phases"]:
            assert phase["steps"] == phase["max_steps"] == 1
    by_phase = [{p["phase"]: p for p in report["phases"]} for report in probe.ranks]
    assert sorted(by_phase[0]) == ["dpo-base", "dpo-init", "orpo-default", "sft-default"]
    for name in by_phase[0]:  # bit for bit: both ranks gather the same partitions, no recomputation
        assert by_phase[0][name]["trained_checksum"] == by_phase[1][name]["trained_checksum"], name
        manifest = adapters.verify_adapter(probe.out / name / "adapter")
        assert manifest["parent"]["phase"] == "warmup"


def test_evaluation_after_zero3_training_loads_whole_weights(probe) -> None:
    for report in probe.ranks:
        assert report["eval_params"] == {"zero3_enabled": False, "partitioned": 0, "empty": 0,
                                         "numel": report["eval_params"]["numel"]}
        assert report["eval_params"]["numel"] == report["phases"][-1]["model_in_training"][1]  # base + LoRA


def test_adapt_command_trains_and_evaluates_like_one_process(z3) -> None:
    assert z3.warmup.code == 0, "warm-up failed; see test_warmup_saves_the_gathered_adapter_once"
    result = run(launch(ZERO3, [*CLI, "adapt", "-c", str(z3.config), "--task", "math", "--method", "dpo",
                                "--init", "d2lora", "--n", "4"]), z3.root / "adapt.log")
    assert result.code == 0, result.tail()
    cell = "math-dpo-d2lora-n4-s0"
    record = json.loads(z3.layout.cell_result(cell).read_text())
    assert record["train"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    warm_sha = adapters.read_manifest(z3.layout.warmup_adapter)["adapter_sha256"]
    assert record["adapter"]["parent_sha256"] == warm_sha

    # The ranks evaluated in the training process (after leave_zero3), each on its shard;
    # one plain process must produce the same predictions, item by item.
    from d2lora_dist.evaluate.adapter_eval import evaluate_suites

    one = z3.root / "one-process"
    metrics = evaluate_suites(z3.exp, "math", ["gsm8k", "arc_easy"], z3.layout.cell_adapter(cell),
                              lambda suite: one / f"{suite}.jsonl", progress=False)
    for suite in ("gsm8k", "arc_easy"):
        two_ranks = read_jsonl(z3.layout.cell_predictions(cell, suite))
        assert len(two_ranks) == 5
        assert_same_predictions(two_ranks, read_jsonl(one / f"{suite}.jsonl"), suite)
    for suite, recorded in record["metrics"].items():
        assert recorded == {k: v for k, v in metrics[suite].items() if k in recorded}, suite
