"""Process group and rank helpers; every CPU/gloo/DeepSpeed workaround lives here.

The same code runs as one plain process, under `accelerate launch` with NCCL on GPUs,
and with gloo on CPU ranks (the test suite). Each workaround says why and when it can go.

Three launch modes, told apart from the environment `accelerate launch` (or torchrun) sets:
  single     one plain process (WORLD_SIZE unset or 1)
  deepspeed  ACCELERATE_USE_DEEPSPEED=true (an accelerate config with distributed_type DEEPSPEED)
  ddp        any other multi-process launch (distributed_type MULTI_GPU; gloo on CPU ranks)

Settings read from the environment (documented in docs/distributed.md):
  D2LORA_PG_TIMEOUT_S              process-group timeout in seconds (default 1800): a rank
                                   stuck in a collective because a peer died gives up after it
  D2LORA_TEST_CRASH_RANK_AT_STEP   tests only, "RANK:STEP": that rank raises at that step
  D2LORA_TEST_STEP_DELAY_S         tests only, seconds every optimizer step waits: a tiny model's
                                   steps are otherwise over before a test's signal arrives
  D2LORA_TEST_CPU_BF16             tests only, "1": a multi-rank DeepSpeed launch on CPU ranks may
                                   train in bf16 (a DeepSpeed config with bf16.enabled true: the
                                   tests write zero3_cpu_test.json with bf16 on), so the bf16 save
                                   path runs without a GPU; see cpu_bf16_test_launch
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from d2lora_dist.schema import ConfigError
from d2lora_dist.shipped import find_file, shipped_names

TIMEOUT_ENV = "D2LORA_PG_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800
CRASH_ENV = "D2LORA_TEST_CRASH_RANK_AT_STEP"
STEP_DELAY_ENV = "D2LORA_TEST_STEP_DELAY_S"
CPU_BF16_ENV = "D2LORA_TEST_CPU_BF16"


class LaunchError(ConfigError):
    """A launch that cannot work as configured; each problem names the setting to change."""

    def __init__(self, problems: list[str] | str, source: str = "launch"):
        super().__init__([problems] if isinstance(problems, str) else problems, source)


# ---- ranks ----------------------------------------------------------------------------------
def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def launch_mode() -> str:
    """single | deepspeed | ddp (see the module docstring)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not _deepspeed_launch():
        return "single"
    return "deepspeed" if _deepspeed_launch() else "ddp"


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def check_single_process_gpus() -> None:
    """Refuse one plain process that sees several GPUs.

    Outside a distributed launch, transformers sets n_gpu to every visible CUDA device, wraps the
    model in nn.DataParallel and multiplies the per-device batch by that count: a schedule planned
    for one rank would train on n_gpu times its batch. Refused rather than pinned to one GPU:
    CUDA_VISIBLE_DEVICES only takes effect before CUDA counts its devices, which torch may already
    have done, and the user who gave a node 8 GPUs most likely meant to use them (see
    docs/distributed.md). Launches that set CUDA_VISIBLE_DEVICES to one device (a `sweep run`
    slot, a Slurm cell of one GPU) see one and pass.
    """
    if launch_mode() != "single" or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if count > 1:
        raise LaunchError(
            f"this one process (no accelerate launch or torchrun) sees {count} GPUs: transformers would train "
            f"with DataParallel on {count}x the planned batch. Launch one rank per GPU, e.g. `accelerate launch "
            f"--config_file launch/accelerate/ddp.yaml --num_processes {count} --main_process_port 0 -m "
            "d2lora_dist.cli ...` (launch/accelerate/1node_8gpu_zero3.yaml for ZeRO-3; `d2lora sweep plan` "
            "shows the launch each cell needs), or run on one GPU with CUDA_VISIBLE_DEVICES=0")


# ---- process group ----------------------------------------------------------------------------
def process_group_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise LaunchError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds "
                          f"(default {DEFAULT_TIMEOUT_S})")
    return timedelta(seconds=seconds)


def init_process_group() -> None:
    """Create the process group before any model loads (no-op for one process, idempotent).

    Workarounds (accelerate 1.15, deepspeed 0.19):
    - CPU + DeepSpeed: without an explicit gloo group, every rank believes it is rank 0 of 1
      and DeepSpeed fails on `train_batch_size ... world_size` (the symptom of DeepSpeed 4703
      and 3982; accelerate launch has no backend option, accelerate 2759).
      PartialState(backend="gloo") fixes it. Goes away when accelerate picks gloo for
      DeepSpeed on CPU by itself.
    - CPU + DDP: PartialState() without cpu=True initialises gloo but leaves the distributed
      type at NO, so the Trainer never wraps the model in DDP and the ranks train separate
      copies without syncing gradients, silently (found here, no upstream issue yet; caught by
      tests/test_distributed_ddp.py). cpu=True makes it MULTI_CPU. Goes away when accelerate
      maps LOCAL_RANK without an accelerator to MULTI_CPU (accelerate launch only sets
      ACCELERATE_USE_CPU for its own --cpu path).
    The timeout (D2LORA_PG_TIMEOUT_S) bounds how long a rank waits for a dead peer.
    """
    mode = launch_mode()
    if mode == "single":
        check_single_process_gpus()
        return
    from accelerate import PartialState

    timeout = process_group_timeout()
    if torch.cuda.is_available():
        state = PartialState(timeout=timeout)  # NCCL
    elif mode == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # only silences DeepSpeed's detection warning
        state = PartialState(backend="gloo", timeout=timeout)
    else:
        state = PartialState(cpu=True, backend="gloo", timeout=timeout)
    if state.is_main_process:
        print(f"[distributed] {mode}: {state.num_processes} ranks, backend {state.backend}, "
              f"{state.distributed_type}, process-group timeout {timeout.total_seconds():g}s", flush=True)


def timeout_every_group() -> int:
    """Give every process group this rank belongs to the configured timeout; returns how many.

    Workaround (deepspeed 0.19.8, torch 2.13): DeepSpeed creates its own groups when its engine is
    built (a clone of the world group for its gradient and parameter collectives, ZeRO++ groups)
    with `new_group()` and no timeout, so they get torch's default (10 minutes for NCCL) instead of
    D2LORA_PG_TIMEOUT_S: a rank waiting there for a dead or slow peer gives up on its own clock.
    Called once the engine exists (engine_callbacks). Goes away when DeepSpeed passes the world
    group's timeout on to the groups it creates.
    """
    if not _group_ready():
        return 0
    from torch.distributed import distributed_c10d as c10d

    timeout = process_group_timeout()
    groups = [g for g in list(c10d._world.pg_map) if not c10d._rank_not_in_group(g)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def gather_only_trainable_on_save(trainer: Any) -> bool:
    """Make the trainer's checkpoints gather only the trainable parameters under ZeRO-3; True if it did.

    Workaround (transformers 5.23, deepspeed 0.19.8): for a PEFT model under ZeRO-3 the Trainer's
    save_model calls the engine's `_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)`,
    which still gathers every module's parameters (the whole frozen base, 16 GB for an 8B model, at
    every checkpoint) and drops the frozen ones only afterwards. The 16-bit adapter it writes is never
    read back (a resume loads DeepSpeed's own checkpoint; the phase's adapter is saved from the fp32
    masters, adapters.save_adapter), so only the trainable parameters are gathered, with the same
    names. Called once the engine exists. Goes away when DeepSpeed skips frozen parameters before
    gathering them.
    """
    engine = getattr(trainer, "deepspeed", None)
    if engine is None or not hasattr(engine, "_zero3_consolidated_16bit_state_dict") or not zero3_enabled():
        return False
    original = engine._zero3_consolidated_16bit_state_dict

    def trainable_only(exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor] | None:
        if not exclude_frozen_parameters:
            return original(exclude_frozen_parameters=False)
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        with gathered([p for _, p in named]):  # collective; the adapter only
            return {n: p.detach().cpu().clone() for n, p in named} if rank() == 0 else None

    engine._zero3_consolidated_16bit_state_dict = trainable_only
    return True


def engine_callbacks(trainer: Any) -> list[Any]:
    """Callbacks every training phase's trainer gets from this module, run once its engine (and
    DeepSpeed's process groups) exist: timeout_every_group, gather_only_trainable_on_save."""
    from transformers import TrainerCallback

    class AfterEngineBuilt(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timeout_every_group()
            gather_only_trainable_on_save(trainer)

    return [AfterEngineBuilt()]


def deepspeed_config_file(default: str | None) -> str | None:
    """The DeepSpeed JSON of this launch (absolute), or None when not launched with DeepSpeed.

    accelerate passes the accelerate config's `deepspeed_config_file` as given; a relative
    path is read from the working directory, else from the shipped copy (d2lora_dist/shipped.py:
    `ds_configs/...` work from any directory, e.g. a Slurm job's, and from a wheel install).
    """
    if not _deepspeed_launch():
        return None
    given = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or default
    if not given:
        raise LaunchError("launched with DeepSpeed but no DeepSpeed config: set deepspeed_config_file in the "
                          "accelerate config (or launch.deepspeed_config in the experiment)")
    found = find_file(given)
    if found is not None:
        resolved = str(found.resolve())
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = resolved
        return resolved
    shipped = ", ".join(f"ds_configs/{name}" for name in shipped_names("ds_configs")) or "none"
    raise LaunchError(f"deepspeed_config_file {given!r} not found (looked in {Path.cwd()} and among the "
                      f"shipped configs: {shipped}); fix deepspeed_config_file in the accelerate config")


# ---- validation before any model loads ----------------------------------------------------------
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def check_launch(settings: Any, settings_key: str, ds_config: str | None) -> None:
    """Launch vs experiment, all problems at once, before any model loads.

    DeepSpeed's own messages for these come after the model has loaded and do not name our
    settings (e.g. "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
    world_size"). `settings` is a config.TrainSettings; `settings_key` its dotted key.
    """
    bf16_ok = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or cpu_bf16_test_launch(ds_config)
    problems = launch_problems(settings, settings_key, ds_config, world_size(), bf16_ok)
    if problems:
        raise LaunchError(problems, ds_config or "launch")


def launch_problems(settings: Any, key: str, ds_config: str | None, world: int, bf16_ok: bool) -> list[str]:
    from d2lora_dist.schedule import batch_problem

    problem = batch_problem(settings, key, world)
    if problem:
        return [problem]
    if ds_config is None:
        return []
    try:
        ds = json.loads(Path(ds_config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"deepspeed_config_file {ds_config}: cannot be read as JSON ({e})"]
    micro = settings.per_device_batch_size
    accum = settings.global_batch_size // (micro * world)
    expected = {"train_micro_batch_size_per_gpu": (micro, f"{key}.per_device_batch_size"),
                "gradient_accumulation_steps": (accum, f"{key}.global_batch_size / (per_device_batch_size x "
                                                       f"world size {world})"),
                "train_batch_size": (settings.global_batch_size, f"{key}.global_batch_size")}
    problems = []
    for name in _BATCH_KEYS:
        value = ds.get(name, "auto")
        want, source = expected[name]
        if value != "auto" and value != want:
            hint = ""
            if name == "train_batch_size" and isinstance(value, int) and value % (micro * world):
                hint = f" (world size {world} x micro-batch {micro} does not divide {value})"
            problems.append(f"{name}={value} in the DeepSpeed config but {source} = {want}{hint}; "
                            f"set it to \"auto\" so the experiment file decides")
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != float(settings.max_grad_norm):
        problems.append(f"gradient_clipping={clip} in the DeepSpeed config but {key}.max_grad_norm = "
                        f"{settings.max_grad_norm}; set it to \"auto\"")
    if (ds.get("bf16") or {}).get("enabled") is True and not bf16_ok:
        problems.append("bf16.enabled=true in the DeepSpeed config, but this machine has no CUDA device with "
                        "bf16; on CPU ranks use ds_configs/zero3_cpu_test.json (or bf16.enabled \"auto\")")
    zero = ds.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", None) and "optimizer" not in ds and ds.get("zero_force_ds_cpu_optimizer", True):
        problems.append(f"zero_optimization.offload_optimizer.device={offload} needs an \"optimizer\" section "
                        "(DeepSpeed then uses its CPU Adam); without it DeepSpeed refuses the Trainer's "
                        "torch AdamW after the model has loaded. See ds_configs/zero3_offload.json")
    return problems


# ---- trainer arguments --------------------------------------------------------------------------
def trainer_kwargs(ds_config: str | None) -> dict[str, Any]:
    """Extra TrainingArguments so HF/TRL trainers reuse our process group and ZeRO settings.

    Workarounds: (1) `use_configured_state` makes the trainer adopt the PartialState of
    init_process_group instead of building its own (which on CPU would be wrong, see there);
    (2) TRL configs default to bf16=True, which CPUs cannot run; (3) ACCELERATE_USE_DEEPSPEED
    must be set and the arguments must exist before `from_pretrained`, so that zero.Init
    partitions the weights while they load. ACCELERATE_USE_CPU is never set: it silently turns
    a DeepSpeed run into plain DDP with no ZeRO at all. (4) `use_cpu` for DDP on CPU ranks,
    matching the MULTI_CPU state. All go when accelerate handles CPU ranks like GPUs.
    (5) Tests only (D2LORA_TEST_CPU_BF16, see cpu_bf16_test_launch): bf16 on CPU ranks.
    (6) DDP: `ddp_find_unused_parameters=False` (transformers' own choice for a PeftModel is True).
    """
    on_gpu = torch.cuda.is_available()
    cpu_bf16 = cpu_bf16_test_launch(ds_config)
    kwargs: dict[str, Any] = {"bf16": (on_gpu and torch.cuda.is_bf16_supported()) or cpu_bf16, "fp16": False,
                              "ddp_timeout": int(process_group_timeout().total_seconds())}
    if cpu_bf16:
        # transformers refuses bf16=True without a bf16 GPU unless use_cpu ("Your setup doesn't
        # support bf16/gpu"); under use_configured_state use_cpu changes nothing else: the
        # trainer adopts the DEEPSPEED state of init_process_group (measured: ZeRO-3, bf16).
        kwargs["use_cpu"] = True
    if world_size() > 1:
        kwargs["accelerator_config"] = {"use_configured_state": True}
        kwargs["ddp_backend"] = None if on_gpu else "gloo"
        if not on_gpu and not ds_config:
            kwargs["use_cpu"] = True
        if not ds_config:
            # every trainable parameter (the active adapter's LoRA) takes part in every forward pass;
            # transformers would pick True for a PeftModel (not a PreTrainedModel): an extra graph
            # traversal per step, and an error with reentrant gradient checkpointing
            kwargs["ddp_find_unused_parameters"] = False
    if ds_config:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        kwargs["deepspeed"] = ds_config
    return kwargs


def cpu_bf16_test_launch(ds_config: str | None) -> bool:
    """Tests only: may this launch train in bf16 on CPU ranks? (D2LORA_TEST_CPU_BF16=1)

    DeepSpeed ZeRO-3 with bf16 runs on 2 CPU ranks over gloo (measured with deepspeed 0.19.8,
    torch 2.13 CPU: the parameters, LoRA included, are bf16 and the optimizer keeps fp32
    masters), which is how the suite checks what a bf16 GPU run saves. Production refuses bf16
    without CUDA (check_launch). Only for multi-rank DeepSpeed launches: there the trainer
    adopts the configured DEEPSPEED state; in one process `use_cpu` would rebuild the state
    without DeepSpeed.
    """
    return (os.environ.get(CPU_BF16_ENV) == "1" and ds_config is not None and world_size() > 1
            and not torch.cuda.is_available())


def import_experimental_trl() -> None:
    """Workaround (trl 1.16): ORPO lives in trl.experimental and warns on every import unless
    TRL_EXPERIMENTAL_SILENCE is set; the warning says nothing the user can act on. Goes away when
    ORPO returns to trl's stable API."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def use_base_model_as_reference(trainer: Any) -> None:
    """DPO's reference = the base model with adapters disabled, also for a warm-started adapter.

    Workaround (trl 1.16): given an already wrapped PeftModel, DPOTrainer adds a frozen copy of the
    starting adapter named "ref" and uses it as the reference (no `ref_adapter_name` option any
    more); deleting that copy makes TRL fall back to disabling the adapters. Goes away if TRL
    offers the reference choice as a setting.
    """
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in unwrapped.peft_config:
        unwrapped.delete_adapter("ref")
        unwrapped.set_adapter("default")


def peft_model_kwargs() -> dict[str, Any]:
    """Workaround (DeepSpeed 8072, trl 6089): PEFT upcasts LoRA weights to fp32 by default;
    ZeRO-3 then gathers mixed bf16/fp32 parameters and fails with a TypeError. Keeping the
    adapter in the base dtype under ZeRO-3 avoids it. Goes away once DeepSpeed PR 8130 lands.
    """
    return {"autocast_adapter_dtype": False} if zero3_enabled() else {}


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def leave_zero3() -> None:
    """Forget the process-wide ZeRO-3 config after training.

    Workaround: transformers keeps a global HfDeepSpeedConfig once a ZeRO-3 trainer existed,
    so a later `from_pretrained` (evaluation in the same process) would load partitioned
    weights, and generation under ZeRO-3 is unusably slow (LLaMA-Factory 5629, trl 3858).
    Goes away when transformers offers a per-load opt-out (transformers 28106, open).
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def release_training_state() -> None:
    """After a phase's trainer is done: forget its accelerate state and the ZeRO-3 config.

    Workarounds: (1) accelerate 1.15 refuses a second Accelerator with a DeepSpeed plugin in
    one process ("You cannot pass in a `deepspeed_plugin` when creating a second
    `Accelerator`", transformers 35073); resetting AcceleratorState (the process group,
    PartialState, stays) lets a later phase build its trainer. Goes away when accelerate
    allows a fresh DeepSpeed plugin per Accelerator. (2) leave_zero3(), so that whatever
    loads next (evaluation) loads whole.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    leave_zero3()


def free_device_memory() -> None:
    """Free a finished phase's training state now. The trainer, its DeepSpeed engine and optimizer
    live in reference cycles (callbacks that hold their trainer, the engine's hooks), which only the
    garbage collector frees, at a time of its choosing: until then their GPU memory (optimizer
    states, gradients, ZeRO-3's gather buffers) stays taken while evaluation loads a whole model.
    `empty_cache` then gives the cached blocks back, for the next load and other processes."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- collectives --------------------------------------------------------------------------------
@contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Temporarily gather ZeRO-3 partitioned parameters (no-op without ZeRO-3)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


FP32_MASTER = "fp32 master"
PARAMETERS = "parameters"


def fp32_values(params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], str]:
    """Full float32 values of trainable parameters on every rank, on the CPU, and where they came from.

    Collective under DeepSpeed: every rank calls it with the same parameters in the same order.
    Source FP32_MASTER: a DeepSpeed optimizer holds the parameters' fp32 master copies, read with
    `deepspeed.utils.safe_get_full_fp32_param` (ZeRO-3: one all_gather of the fp32 partitions per
    parameter; ZeRO-1/2: one all_reduce of the fragments). Source PARAMETERS: the parameters'
    own values, gathered under ZeRO-3 and upcast (one process, DDP, or no optimizer yet).

    Why: under DeepSpeed with bf16 the module parameters are rounded bf16 copies of the fp32
    masters the optimizer updates (the LoRA weights too: ZeRO-3 keeps them in the base dtype,
    see peft_model_kwargs; ZeRO-1/2 cast the whole module). An update smaller than bf16's
    resolution (the paper's warm-up at lr 1e-7: lora_A moves ~3.5e-5 at |A| ~0.016) moves the
    master but not the bf16 copy, so the bf16 copy would save the initial lora_A. Not an
    upstream bug but DeepSpeed's design: its own 16-bit save (stage3_gather_16bit_weights_on_
    model_save) has the same limit; its fp32 route, zero_to_fp32, needs a checkpoint on disk.
    Stays as long as DeepSpeed trains bf16 parameters against fp32 masters.
    """
    masters = [p for p in params if _fp32_master_linked(p)]
    if params and len(masters) == len(params) and _fragments_held(params):
        from deepspeed.utils import safe_get_full_fp32_param

        full = [safe_get_full_fp32_param(p) for p in params]
        if all(v is not None for v in full):
            dtypes = {v.dtype for v in full}
            source = FP32_MASTER if dtypes == {torch.float32} else f"{_short(dtypes.pop())} master"
            return [_cpu_fp32(v) for v in full], source
    with gathered(params):
        return [_cpu_fp32(p) for p in params], PARAMETERS


def set_fp32_masters(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> str | None:
    """Make the optimizer's fp32 masters of `params` equal `values` (full float32 tensors, the same on
    every rank); returns where they went (FP32_MASTER), or None when no DeepSpeed optimizer holds
    masters (one process, DDP: the parameters are the values, nothing to do). Not collective.

    Why: a warm-started phase loads the float32 warm-up adapter into LoRA parameters that are bf16
    under bf16 DeepSpeed (ZeRO-3: peft_model_kwargs; ZeRO-1/2 cast the module), and DeepSpeed builds
    its fp32 masters from those rounded values. At the paper's warm-up rate the warm-up's change of
    lora_A (~3.5e-5) is below half a bf16 step and would be erased before phase 2 starts. Called once
    the optimizer exists and before the first step, and never on a resume (the checkpoint's masters
    are the truth there). The bf16 parameters already are the masters rounded, so they stay.
    Stays as long as DeepSpeed trains bf16 parameters against fp32 masters.
    """
    if not params or not all(_fp32_master_linked(p) for p in params):
        return None
    from deepspeed.utils import safe_set_full_fp32_param

    for p, value in zip(params, values, strict=True):
        value = value.detach().to(torch.float32).reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape)
        if hasattr(p, "ds_id") and p.partition_numel() * _partition_ranks(p) != p.ds_numel:
            _set_padded_z3_master(p, value)  # DeepSpeed's setter assumes no padding in the last partition
        else:
            safe_set_full_fp32_param(p, value)
    return FP32_MASTER


def _partition_ranks(p: torch.nn.Parameter) -> int:
    """How many ranks a ZeRO-3 parameter is split over (its own group: ZeRO++/MiCS may use fewer)."""
    group = getattr(p, "ds_process_group", None)
    return torch.distributed.get_world_size(group=group) if _group_ready() else 1


def _set_padded_z3_master(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """ZeRO-3 master of a parameter whose size the world size does not divide: this rank's slice of
    `value`, shorter than the partition on the last rank (the partition's tail is padding).
    Workaround (deepspeed 0.19.8): stage3's set_full_hp_param narrows a full partition there and fails."""
    optimizer = p._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True)
    start = partition.numel() * optimizer._get_param_partition_rank(p)
    count = max(0, min(partition.numel(), p.ds_numel - start))
    partition.data[:count].copy_(value.flatten()[start:start + count])


def _fp32_master_linked(p: torch.nn.Parameter) -> bool:
    """Did a DeepSpeed optimizer link this parameter to its master? (the same on every rank)"""
    if not p.requires_grad:
        return False
    if hasattr(p, "ds_id"):  # ZeRO-3: set on every module parameter when the optimizer is built
        return getattr(p, "_z3_optimizer", None) is not None
    return hasattr(p, "_hp_mapping") and hasattr(p, "get_full_hp_param")  # ZeRO-1/2, bf16 optimizer


def _fragments_held(params: list[torch.nn.Parameter]) -> bool:
    """ZeRO-1/2: each rank holds fragments of some masters (`_hp_mapping`, None elsewhere), and a
    destroyed optimizer sets them all to None, so the all-reduce would return zeros: check that
    every parameter has its fragments somewhere (one collective). ZeRO-3 needs no check."""
    if all(hasattr(p, "ds_id") for p in params):
        return True
    held = torch.tensor([int(getattr(p, "_hp_mapping", None) is not None) for p in params], device=device())
    if _group_ready():
        torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
    return bool(held.all())


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32, copy=True).contiguous()


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def device() -> torch.device:
    """This rank's device: its GPU (accelerate sets the current device per rank), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _group_ready() -> bool:
    """True when collectives must run; a launch without a process group is a bug, said loudly."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("launched with WORLD_SIZE > 1 but no process group: call "
                           "d2lora_dist.distributed.init_process_group() before any collective")
    return False


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object (e.g. an adapter state dict) from `src` to every rank."""
    if not _group_ready():
        return obj
    holder = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def on_main_then_broadcast(fn: Callable[[], Any]) -> Any:
    """`fn()` on the main process only, its result sent to every rank (e.g. a cache the main process
    fills while the others wait). A failure there fails every rank together: the main process re-raises
    it, the others raise a RuntimeError quoting it, instead of waiting in the broadcast until the timeout."""
    value, failure, message = None, None, None
    if is_main_process():
        try:
            value = fn()
        except Exception as e:
            failure, message = e, f"{type(e).__name__}: {e}"
    message = broadcast_object(message)
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"the main process failed: {message}")
    return broadcast_object(value)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order, on every rank."""
    if not _group_ready():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_objects_to_main(obj: Any) -> list[Any] | None:
    """Every rank's picklable object, in rank order, on the main process (None elsewhere)."""
    if not _group_ready():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main_process() else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank (the flag itself without a process group)."""
    if not _group_ready():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def collective_device() -> torch.device:
    """Where tensors of a collective live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_shard_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters held by this rank, full parameter count), ZeRO-3-aware."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            full += p.ds_numel
            local += p.ds_tensor.numel()
        else:
            full += p.numel()
            local += p.numel()
    return local, full


# ---- test hook ----------------------------------------------------------------------------------
def test_callbacks() -> list[Any]:
    """Callbacks that only tests switch on (empty unless D2LORA_TEST_CRASH_RANK_AT_STEP is set).

    "RANK:STEP" makes that rank raise right after optimizer step STEP (a crashed rank: the
    others must exit, not hang); "RANK:STEP:hang" makes it stop responding there instead (a
    stuck rank: the others must give up after D2LORA_PG_TIMEOUT_S). Either way the run dies
    after its last checkpoint, and a restart must resume from it.
    """
    callbacks = _step_delay_callbacks()
    raw = os.environ.get(CRASH_ENV)
    if not raw:
        return callbacks
    parts = raw.split(":")
    try:
        crash_rank, crash_step, how = int(parts[0]), int(parts[1]), (parts[2:] or ["raise"])[0]
    except (ValueError, IndexError):
        how = ""
    if len(parts) > 3 or how not in ("raise", "hang"):
        raise LaunchError(f"{CRASH_ENV}={raw!r}: expected RANK:STEP or RANK:STEP:hang, e.g. 1:3")
    from transformers import TrainerCallback

    class CrashAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != crash_step or rank() != crash_rank:
                return
            message = f"{CRASH_ENV}: rank {crash_rank} {'hangs' if how == 'hang' else 'crashes'} at step {crash_step}"
            if how == "raise":
                raise RuntimeError(message + " (test hook)")
            print(message + " (test hook)", flush=True)
            time.sleep(24 * 3600)

    return [*callbacks, CrashAtStep()]


def _step_delay_callbacks() -> list[Any]:
    raw = os.environ.get(STEP_DELAY_ENV)
    if not raw:
        return []
    try:
        delay = float(raw)
    except ValueError:
        delay = -1.0
    if delay < 0:
        raise LaunchError(f"{STEP_DELAY_ENV}={raw!r}: expected a number of seconds >= 0")
    from transformers import TrainerCallback

    class DelayEveryStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(delay)

    return [DelayEveryStep()]
