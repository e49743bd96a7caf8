"""Base model and tokenizer loading (dtype, attention, ZeRO-3-aware) and LoRA attachment."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from d2lora_dist.config import LoraConfig, ModelConfig
from d2lora_dist.errors import InputError
from d2lora_dist.lora_inits import DEFAULT_LORA_INIT, lora_init_spec

if TYPE_CHECKING:
    from d2lora_dist.residual import Residual

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLASH_DTYPES = ("bfloat16", "float16")


class ModelError(InputError):
    """A model/tokenizer that cannot be used as configured."""


def model_path(cfg: ModelConfig) -> str:
    from d2lora_dist.assets import resolve_asset_uri

    return resolve_asset_uri(cfg.name_or_path)


def attention_implementation(requested: str, dtype: str) -> str:
    """flash_attention_2 only when installed, on CUDA and in bf16/fp16 (its kernels have no float32);
    asking for it explicitly where it cannot run stops. `auto` is sdpa otherwise."""
    installed = importlib.util.find_spec("flash_attn") is not None
    flash_ok = torch.cuda.is_available() and installed and dtype in FLASH_DTYPES
    if requested == "flash_attention_2" and not flash_ok:
        why = (f"model.dtype is {dtype} (flash-attention runs in {' or '.join(FLASH_DTYPES)} only)"
               if torch.cuda.is_available() and installed else "flash_attention_2 needs CUDA and the flash-attn "
               "package (docs/performance.md#flash-attention says how to install it)")
        raise ModelError(f"model.attn_implementation: {why}; use auto or sdpa")
    choice = ("flash_attention_2" if flash_ok else "sdpa") if requested == "auto" else requested
    log.info("attention implementation: %s (requested %s, dtype %s, flash-attn %s)", choice, requested, dtype,
             "installed" if installed else "not installed")
    return choice


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ModelError(f"tokenizer of {path} has no chat template; prompts and responses are rendered "
                         "through it (use an instruct model or add one to tokenizer_config.json)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, training: bool) -> Any:
    """Load the frozen base model; under ZeRO-3 (arguments built first) weights load partitioned."""
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available() and cfg.dtype != "float32":
        raise ModelError(f"model.dtype: {cfg.dtype} on CPU is not supported here; use float32")
    model = AutoModelForCausalLM.from_pretrained(
        model_path(cfg), dtype=DTYPES[cfg.dtype],
        attn_implementation=attention_implementation(cfg.attn_implementation, cfg.dtype))
    log.info("attention that runs: %s", model.config._attn_implementation)  # what transformers settled on
    model.config.use_cache = not training
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def peft_lora_config(cfg: LoraConfig, init_lora_weights: bool | str = True) -> Any:
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none",
                           init_lora_weights=init_lora_weights)


def attach_lora(model: Any, cfg: LoraConfig, state_dict: dict[str, torch.Tensor] | None = None,
                lora_init: str = DEFAULT_LORA_INIT, residual: Residual | None = None,
                before_overwrite: Callable[[list[torch.nn.Parameter]], None] | None = None) -> Any:
    """A LoRA adapter on `model`, trainable: fresh (PEFT draws it by `lora_init`; the current seed decides)
    or warm-started from `state_dict`.

    `residual`: the base becomes the residual W - s B0 A0 of those cached factors and the adapter starts
    at B0, A0 (then `state_dict`, if given, replaces them). Needed for a residual `lora_init`: PEFT's own
    in-model PiSSA/OLoRA is never run here (see residual.py). Collective under ZeRO-3.
    """
    import peft

    from d2lora_dist.distributed import peft_model_kwargs
    from d2lora_dist.residual import apply_residual

    if residual is None and lora_init_spec(lora_init).residual:
        raise ModelError(f"lora_init {lora_init!r} rewrites the base weights: attach it with its cached factors "
                         "(residual.prepare_residual)")
    init = False if residual is not None else lora_init_spec(lora_init).peft_value
    peft_model = peft.get_peft_model(model, peft_lora_config(cfg, init), **peft_model_kwargs())
    if residual is not None:
        apply_residual(peft_model, residual, before_overwrite)
    if state_dict is not None:
        result = peft.set_peft_model_state_dict(peft_model, state_dict, adapter_name="default")
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
        if unexpected or missing:
            raise ModelError(f"adapter does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return peft_model


def base_fingerprint(cfg: ModelConfig) -> dict[str, str]:
    """Name, config hash and a cheap weights fingerprint of the base model.

    Weights: size plus the first and last 4 MiB of every weights file, hashed. Reading all of
    an 8B model's 16 GB per check would cost minutes; different checkpoints differ there.
    """
    root = local_model_dir(cfg)
    config = json.loads((root / "config.json").read_text())
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    weights = hashlib.sha256()
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        weights.update(f.name.encode())
        weights.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            weights.update(fh.read(4 << 20))
            fh.seek(max(0, f.stat().st_size - (4 << 20)))
            weights.update(fh.read(4 << 20))
    return {"name": cfg.name_or_path, "config_sha256": config_sha, "weights_fingerprint": weights.hexdigest()}


def local_model_dir(cfg: ModelConfig) -> Path:
    """The base model's files on this machine (a local directory or the HF cache's snapshot)."""
    path = model_path(cfg)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:
        raise ModelError(f"base model {path!r} is neither a local directory nor in the HF cache: {e}") from e
