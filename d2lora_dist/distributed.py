"""Process group and rank helpers; every CPU/gloo/DeepSpeed workaround lives here.

The same code runs as one plain process, under `accelerate launch` with NCCL on GPUs,
and with gloo on CPU ranks (the test suite). Each workaround says why and when it can go.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch


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


def deepspeed_config_file(default: str | None) -> str | None:
    """The DeepSpeed JSON of this launch: accelerate's env when launched with it, else the experiment's."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or default
    return None


def init_process_group() -> None:
    """Create the process group before any model loads.

    Workaround: on CPU, accelerate would pick a backend DeepSpeed cannot use and, without an
    explicit gloo group, every rank believes it is rank 0 of 1 (DeepSpeed then fails on
    `train_batch_size`). A PartialState with backend="gloo" fixes it; on CUDA the default
    (NCCL) is right. Goes away when accelerate defaults to gloo for CPU DeepSpeed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState

    PartialState(backend=None if torch.cuda.is_available() else "gloo")


def trainer_kwargs(ds_config: str | None) -> dict[str, Any]:
    """Extra TrainingArguments so HF/TRL trainers reuse our process group and ZeRO settings.

    Workarounds: (1) `use_configured_state` makes the trainer adopt the gloo PartialState
    above instead of building its own; (2) TRL configs default to bf16=True, which CPUs
    cannot run; (3) ACCELERATE_USE_DEEPSPEED must be set and the arguments must exist
    before `from_pretrained`, so that zero.Init partitions the weights while they load.
    ACCELERATE_USE_CPU is never set: it silently turns a DeepSpeed run into plain DDP.
    """
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"bf16": on_gpu and torch.cuda.is_bf16_supported(), "fp16": False}
    if world_size() > 1:
        kwargs["accelerator_config"] = {"use_configured_state": True}
        kwargs["ddp_backend"] = None if on_gpu else "gloo"
    if ds_config:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        kwargs["deepspeed"] = ds_config
    return kwargs


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
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Temporarily gather ZeRO-3 partitioned parameters (no-op without ZeRO-3)."""
    if zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object (e.g. an adapter state dict) from `src` to every rank."""
    if world_size() <= 1 or not torch.distributed.is_initialized():
        return obj
    holder = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if world_size() <= 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


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
