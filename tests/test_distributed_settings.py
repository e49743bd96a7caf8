"""Launch settings without launching: every shipped DeepSpeed and accelerate config, the checks
made before any model loads, the process-group timeout, the test hook, attention choice and
leaving ZeRO-3 (fast; the multi-rank runs are in the other tests/test_distributed_*.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from d2lora_dist import distributed
from d2lora_dist.config import TrainSettings
from d2lora_dist.distributed import LaunchError, launch_problems
from d2lora_dist.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
DS = {p.name: p for p in sorted((REPO / "ds_configs").glob("*.json"))}
ACCELERATE = {p.name: p for p in sorted((REPO / "launch" / "accelerate").glob("*.yaml"))}
SETTINGS = TrainSettings(learning_rate=1e-3, epochs=1, per_device_batch_size=2, global_batch_size=16)


def test_the_four_deepspeed_configs_leave_batch_and_clipping_to_the_experiment() -> None:
    assert sorted(DS) == ["zero2.json", "zero3_bf16.json", "zero3_cpu_test.json", "zero3_offload.json"]
    for name, path in DS.items():
        ds = json.loads(path.read_text())
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                    "gradient_clipping"):
            assert ds[key] == "auto", (name, key)
        assert launch_problems(SETTINGS, "warmup.train", str(path), world=8, bf16_ok=True) == [], name
    stage = {name: json.loads(p.read_text())["zero_optimization"]["stage"] for name, p in DS.items()}
    assert stage == {"zero2.json": 2, "zero3_bf16.json": 3, "zero3_cpu_test.json": 3, "zero3_offload.json": 3}
    cpu = json.loads(DS["zero3_cpu_test.json"].read_text())
    zero = cpu["zero_optimization"]
    # with the default thresholds a tiny model stays gathered after the first forward pass,
    # which would hide the empty-shard save bug the tests look for
    assert zero["stage3_param_persistence_threshold"] == 0 and zero["stage3_model_persistence_threshold"] == 0
    assert cpu["bf16"]["enabled"] is False and zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = json.loads(DS["zero3_offload.json"].read_text())
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "optimizer" in offload


def test_a_bf16_config_on_a_machine_without_bf16_is_refused_by_name() -> None:
    for name, path in DS.items():
        problems = launch_problems(SETTINGS, "warmup.train", str(path), world=2, bf16_ok=False)
        assert (problems != []) == (name == "zero3_bf16.json"), name
    assert "bf16.enabled=true" in launch_problems(SETTINGS, "x", str(DS["zero3_bf16.json"]), 2, False)[0]


def _accelerate_config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(ACCELERATE[name]))


def test_the_accelerate_configs_load_and_point_at_shipped_deepspeed_configs() -> None:
    assert sorted(ACCELERATE) == ["1node_8gpu_zero3.yaml", "cpu_2proc_ddp.yaml", "cpu_2proc_zero3.yaml", "ddp.yaml",
                                  "deepspeed.yaml", "multinode_zero3.yaml"]
    expected = {"1node_8gpu_zero3.yaml": ("DEEPSPEED", 8, "zero3_bf16.json"),
                # launch.strategy's two: its JSON and rank count come on the command line
                "deepspeed.yaml": ("DEEPSPEED", 8, "zero3_bf16.json"), "ddp.yaml": ("MULTI_GPU", 8, None),
                "multinode_zero3.yaml": ("DEEPSPEED", 16, "zero3_bf16.json"),
                "cpu_2proc_zero3.yaml": ("DEEPSPEED", 2, "zero3_cpu_test.json"),
                "cpu_2proc_ddp.yaml": ("MULTI_GPU", 2, None)}
    for name, (kind, processes, ds_file) in expected.items():
        config = _accelerate_config(name)
        raw = yaml.safe_load(ACCELERATE[name].read_text())
        assert (str(config.distributed_type).split(".")[-1], config.num_processes) == (kind, processes), name
        if ds_file is not None:
            assert raw["deepspeed_config"]["deepspeed_config_file"] == f"ds_configs/{ds_file}"
            # accelerate rejects mixed_precision next to a deepspeed_config_file (the JSON decides)
            assert "mixed_precision" not in raw, name
    assert _accelerate_config("multinode_zero3.yaml").deepspeed_config["deepspeed_multinode_launcher"] == "standard"


def test_fixed_deepspeed_batch_settings_must_match_the_experiment(tmp_path: Path) -> None:
    ds = json.loads(DS["zero3_cpu_test.json"].read_text())
    ds.update(train_batch_size=3, train_micro_batch_size_per_gpu=4, gradient_clipping=0.5)
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(ds))
    problems = launch_problems(SETTINGS, "methods.dpo", str(path), world=2, bf16_ok=False)
    assert len(problems) == 3
    assert problems[0].startswith("train_micro_batch_size_per_gpu=4 in the DeepSpeed config but "
                                  "methods.dpo.per_device_batch_size = 2")
    assert "train_batch_size=3 in the DeepSpeed config but methods.dpo.global_batch_size = 16" in problems[1]
    assert "world size 2 x micro-batch 2 does not divide 3" in problems[1]
    assert "methods.dpo.max_grad_norm = 1.0" in problems[2]
    ds.update(train_batch_size=16, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4,
              gradient_clipping=1.0)
    path.write_text(json.dumps(ds))
    assert launch_problems(SETTINGS, "methods.dpo", str(path), world=2, bf16_ok=False) == []


def test_offload_without_an_optimizer_section_and_unreadable_configs(tmp_path: Path) -> None:
    ds = json.loads(DS["zero3_offload.json"].read_text())
    del ds["optimizer"]
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(ds))
    assert "needs an \"optimizer\" section" in launch_problems(SETTINGS, "k", str(path), 2, True)[0]
    path.write_text("{not json")
    assert "cannot be read as JSON" in launch_problems(SETTINGS, "k", str(path), 2, True)[0]


def test_check_launch_raises_a_config_error_the_cli_reports(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_batch_size": 5}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train_batch_size=5"):
        distributed.check_launch(SETTINGS, "warmup.train", str(path))
    distributed.check_launch(SETTINGS, "warmup.train", None)  # no DeepSpeed: nothing to check


def test_process_group_timeout_setting(monkeypatch) -> None:
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.process_group_timeout().total_seconds() == 1800
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "60")
    assert distributed.process_group_timeout().total_seconds() == 60
    assert distributed.trainer_kwargs(None)["ddp_timeout"] == 60
    for bad in ("abc", "0", "-5"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(LaunchError, match=distributed.TIMEOUT_ENV):
            distributed.process_group_timeout()


def test_launch_mode_follows_the_launcher_environment(monkeypatch) -> None:
    for key in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.launch_mode() == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launch_mode() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed.launch_mode() == "deepspeed"


def test_deepspeed_config_paths_resolve_from_the_repository(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert distributed.deepspeed_config_file("ds_configs/zero2.json") is None  # not a DeepSpeed launch
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero3_cpu_test.json")
    assert distributed.deepspeed_config_file(None) == str(DS["zero3_cpu_test.json"])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/nope.json")
    with pytest.raises(LaunchError, match="nope.json' not found"):
        distributed.deepspeed_config_file(None)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    with pytest.raises(LaunchError, match="no DeepSpeed config"):
        distributed.deepspeed_config_file(None)


def test_the_crash_hook_is_off_unless_a_test_sets_it(monkeypatch) -> None:
    monkeypatch.delenv(distributed.CRASH_ENV, raising=False)
    assert distributed.test_callbacks() == []
    monkeypatch.setenv(distributed.CRASH_ENV, "1:3")
    (hook,) = distributed.test_callbacks()
    from types import SimpleNamespace

    monkeypatch.setenv("RANK", "0")
    hook.on_step_end(None, SimpleNamespace(global_step=3), None)  # another rank: nothing happens
    monkeypatch.setenv("RANK", "1")
    hook.on_step_end(None, SimpleNamespace(global_step=2), None)
    with pytest.raises(RuntimeError, match="rank 1 crashes at step 3"):
        hook.on_step_end(None, SimpleNamespace(global_step=3), None)
    for bad in ("3", "a:b", "1:3:explode", "1:3:hang:x"):
        monkeypatch.setenv(distributed.CRASH_ENV, bad)
        with pytest.raises(LaunchError, match="RANK:STEP"):
            distributed.test_callbacks()


def test_attention_is_flash_only_when_installed_on_cuda_in_bf16_or_fp16(monkeypatch, caplog) -> None:
    import importlib.util

    import torch

    from d2lora_dist.modeling import ModelError, attention_implementation

    caplog.set_level(logging.INFO, logger="d2lora_dist.modeling")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert attention_implementation("auto", "bfloat16") == "flash_attention_2"
    assert "attention implementation: flash_attention_2 (requested auto, dtype bfloat16" in caplog.text
    # flash-attention has no float32 kernels: float32 runs sdpa even where flash-attn is importable
    assert attention_implementation("auto", "float32") == "sdpa"
    with pytest.raises(ModelError, match="model.dtype is float32"):
        attention_implementation("flash_attention_2", "float32")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    assert attention_implementation("auto", "bfloat16") == "sdpa"  # CUDA without flash-attn installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_implementation("auto", "float32") == "sdpa"
    assert "attention implementation: sdpa (requested auto, dtype float32, flash-attn not installed)" in caplog.text
    with pytest.raises(ModelError, match="flash_attention_2 needs CUDA"):
        attention_implementation("flash_attention_2", "bfloat16")


def test_leaving_zero3_makes_the_next_load_whole(tiny_experiment: dict) -> None:
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from d2lora_dist.config import experiment_from_dict
    from d2lora_dist.modeling import load_base_model

    config = HfDeepSpeedConfig(json.loads(DS["zero3_cpu_test.json"].read_text()))  # what a ZeRO-3 trainer leaves
    assert distributed.zero3_enabled() and distributed.peft_model_kwargs() == {"autocast_adapter_dtype": False}
    distributed.release_training_state()  # what train_phase calls after its trainer is done
    assert not distributed.zero3_enabled() and distributed.peft_model_kwargs() == {}
    model = load_base_model(experiment_from_dict(tiny_experiment).model, training=False)
    assert all(p.numel() > 0 and not hasattr(p, "ds_id") for p in model.parameters())
    del config


def _fake_gpus(monkeypatch, count: int) -> None:
    """What torch reports on a node with `count` visible GPUs (this machine has none)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("command", ["warmup", "adapt"])
def test_one_plain_process_seeing_several_gpus_is_refused_with_the_launch_that_fits(
        command: str, tiny_experiment: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    from d2lora_dist.cli import main
    from tests.conftest import write_experiment

    for var in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    _fake_gpus(monkeypatch, 8)
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    extra = ["--task", "math", "--method", "sft", "--init", "lora", "--n", "4", "--seed", "0"] * (command == "adapt")
    assert main([command, "-c", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert "sees 8 GPUs" in err and "8x the planned batch" in err
    assert "accelerate launch --config_file launch/accelerate/ddp.yaml --num_processes 8" in err
    assert "CUDA_VISIBLE_DEVICES=0" in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_one_gpu_or_a_distributed_launch_passes(monkeypatch) -> None:
    for var in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    _fake_gpus(monkeypatch, 1)  # a sweep-run slot or a Slurm cell: CUDA_VISIBLE_DEVICES names one GPU
    distributed.check_single_process_gpus()
    _fake_gpus(monkeypatch, 8)
    monkeypatch.setenv("WORLD_SIZE", "8")  # one rank of an accelerate launch: it uses its own GPU
    distributed.check_single_process_gpus()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(LaunchError, match="sees 8 GPUs"):
        distributed.check_single_process_gpus()
