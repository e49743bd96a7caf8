"""The launch strategy: the fastest that fits, refused when it cannot fit, and wired into the launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.config import experiment_from_dict, load_experiment
from d2lora_dist.errors import InputError
from d2lora_dist.schema import ConfigError
from d2lora_dist.shipped import shipped_path
from d2lora_dist.strategy import (
    DDP_ACCELERATE,
    DEEPSPEED_ACCELERATE,
    STRATEGIES,
    cell_launch,
    running_strategy,
    warmup_launch,
)
from d2lora_dist.sweep.local import launch_command
from tests.conftest import REPO

PAPER = REPO / "launch/experiments/paper_math.yaml"


def paper(*overrides: str):
    return load_experiment(PAPER, list(overrides))


def test_8b_lora_fits_one_80_gib_gpu_so_auto_picks_ddp_on_one() -> None:
    exp = paper()
    assert exp.launch.strategy == "auto"
    for method in ("sft", "dpo", "orpo"):
        launch = cell_launch(exp, [method], packed=True)
        assert (launch.choice.strategy, launch.num_processes) == ("ddp", 1), method
        assert launch.accelerate_config is None  # one GPU: one plain process
        assert "ddp on 1 GPU(s)" in launch.describe() and "of 80 GiB" in launch.describe()
    # a local sweep or a whole node takes every rank: DDP over 8 GPUs, still no sharding
    whole = cell_launch(exp, ["sft"], packed=False)
    assert (whole.choice.strategy, whole.num_processes, whole.accelerate_config) == ("ddp", 8, DDP_ACCELERATE)


def test_8b_on_24_gib_gpus_shards_the_weights_with_zero3() -> None:
    small = ["launch.gpu_memory_gib=24", "methods.sft.per_device_batch_size=2", "methods.sft.max_length=2048"]
    launch = cell_launch(paper(*small), ["sft"], packed=True)
    assert launch.choice.strategy == "zero3" and launch.num_processes > 1
    assert (launch.accelerate_config, launch.deepspeed_config) == (DEEPSPEED_ACCELERATE, "ds_configs/zero3_bf16.json")
    assert launch.choice.estimate.total <= 24 * 1024**3
    assert "ddp needs" in launch.describe() and "zero2 needs" in launch.describe()  # why not the faster ones
    # with one GPU per cell, only offloading fits
    one = cell_launch(paper(*small, "launch.num_processes=1"), ["sft"], packed=True)
    assert (one.choice.strategy, one.num_processes) == ("zero3_offload", 1)


def test_evaluation_holds_the_whole_model_on_every_gpu_so_zero3_cannot_rescue_small_gpus() -> None:
    """Every cell ends with evaluation on unsharded weights (16 GB of bf16 for 8B): 12 GiB GPUs cannot
    hold it under any strategy, and the error says that evaluation is why."""
    small = ["launch.gpu_memory_gib=12", "methods.sft.per_device_batch_size=1", "methods.sft.max_length=1024"]
    with pytest.raises(InputError, match=r"\(methods.sft, evaluation\).*evaluation loads the whole model on every GPU"):
        cell_launch(paper(*small), ["sft"], packed=True)


def test_an_explicit_strategy_that_cannot_fit_names_the_key_and_the_value() -> None:
    with pytest.raises(InputError, match=r"launch.strategy: 'ddp' does not fit launch.gpu_memory_gib=12 "
                                         r"\(methods.sft, evaluation\).*or use auto"):
        cell_launch(paper("launch.strategy=ddp", "launch.gpu_memory_gib=12"), ["sft"], packed=True)
    with pytest.raises(InputError, match=r"launch.strategy: 'auto' does not fit launch.gpu_memory_gib=4"):
        cell_launch(paper("launch.gpu_memory_gib=4"), ["dpo"], packed=True)


def test_unknown_strategy_and_a_strategy_beside_named_files_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"launch.strategy: 'zero4' is not one of 'auto' \| 'ddp'") as err:
        paper("launch.strategy=zero4")
    assert "keep one of them" not in str(err.value)
    with pytest.raises(ConfigError, match=r"launch.strategy: 'zero2' chooses .* but launch.accelerate_config names"):
        paper("launch.strategy=zero2", "launch.accelerate_config=launch/accelerate/1node_8gpu_zero3.yaml")


def test_named_files_without_a_strategy_launch_as_before() -> None:
    exp = paper("launch.strategy=null", "launch.accelerate_config=launch/accelerate/1node_8gpu_zero3.yaml",
                "launch.deepspeed_config=ds_configs/zero3_bf16.json")
    launch = cell_launch(exp, ["sft"], packed=True)
    assert launch.choice is None and launch.num_processes == 8
    command = launch_command(exp, launch, ["sweep", "cell"])
    assert "--deepspeed_config_file" not in command
    assert command[command.index("--config_file") + 1].endswith("launch/accelerate/1node_8gpu_zero3.yaml")


def test_the_chosen_strategy_is_the_deepspeed_config_accelerate_gets() -> None:
    exp = paper("launch.strategy=zero2")
    launch = cell_launch(exp, ["dpo"], packed=False)
    command = launch_command(exp, launch, ["sweep", "cell", "--cell", "x"])
    def given(flag: str) -> Path:  # as found from the working directory, else the shipped copy
        return Path(command[command.index(flag) + 1]).resolve()

    assert given("--config_file") == shipped_path("accelerate", "deepspeed.yaml").resolve()
    assert given("--deepspeed_config_file") == shipped_path("ds_configs", "zero2.json").resolve()
    assert command[command.index("--num_processes") + 1] == "8"
    assert warmup_launch(exp).deepspeed_config == "ds_configs/zero2.json"


@pytest.mark.parametrize("name", [n for n in STRATEGIES if STRATEGIES[n].deepspeed_config])
def test_each_strategy_json_reads_back_as_that_strategy(name: str) -> None:
    """What the manifest records is read from the running launch's JSON, so it matches the choice."""
    path = Path(STRATEGIES[name].deepspeed_config)
    ds = json.loads(shipped_path("ds_configs", path.name).read_text())
    assert running_strategy("deepspeed", ds) == name
    assert running_strategy("single", None) == running_strategy("ddp", None) == "ddp"


def test_the_tiny_experiment_without_named_files_stays_one_process(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)  # nothing named, no strategy: auto, as documented
    launch = cell_launch(exp, ["sft"], packed=False)
    assert launch.choice.strategy == "ddp" and launch.accelerate_config is None
    assert launch_command(exp, launch, ["warmup"])[1:] == ["-m", "d2lora_dist.cli", "warmup"]
