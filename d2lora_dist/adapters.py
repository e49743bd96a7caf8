"""The adapter artifact: gathered save, manifest with checksums and lineage, verify, load, broadcast.

An artifact directory holds `adapter_model.safetensors`, `adapter_config.json` and
`manifest.json`. It is written to a temporary sibling and renamed into place, so a
directory that exists is complete; an existing artifact is never overwritten.

Tensors are saved in float32 under every launch: the fp32 master values when a DeepSpeed
optimizer holds them (a bf16 run's parameters are rounded copies), else the parameters'
values upcast. The manifest's `precision` says which (see gathered_adapter).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from d2lora_dist import distributed
from d2lora_dist.errors import InputError
from d2lora_dist.fileio import DiskFull, publish_dir, sha256_file, temporary_dir, writing

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
FORMAT = "d2lora-adapter/1"
_VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "datasets")


class AdapterError(InputError):
    """An adapter that is missing, corrupted, empty, or made for another base model."""


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def gathered_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The trainable adapter's float32 weights in PEFT's file naming, complete on every rank.

    Collective under ZeRO-3 (every rank must call it); see gathered_adapter.
    """
    return gathered_adapter(model)[0]


def gathered_adapter(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state, precision): the adapter in float32, and where its values came from.

    Collective under ZeRO-3: every rank must call it. A plain `save_pretrained` there writes
    shape-(0,) tensors (trl 4416, peft 2892), so the values are gathered first: the fp32
    masters when a DeepSpeed optimizer holds them, else the parameters
    (distributed.fp32_values). `precision` = {"saved_dtype", "parameter_dtype", "values"}.
    """
    from peft import get_peft_model_state_dict

    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and ".default." in n]
    values, source = distributed.fp32_values([p for _, p in named])
    full = dict(zip([n for n, _ in named], values, strict=True))
    state = get_peft_model_state_dict(model, state_dict=full, adapter_name="default")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in named})
    precision = {"saved_dtype": "float32", "parameter_dtype": ",".join(dtypes), "values": source}
    return state, precision


def restore_fp32_masters(model: Any, state: dict[str, torch.Tensor]) -> str | None:
    """Set the optimizer's fp32 masters of the trainable adapter to `state` (a float32 adapter in PEFT's
    file naming, the one the phase was warm-started from). Call once the optimizer exists, before the
    first step; None where no DeepSpeed optimizer keeps masters. Why: distributed.set_fp32_masters."""
    from peft import get_peft_model_state_dict

    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and ".default." in n]
    by_file_name = get_peft_model_state_dict(model, state_dict=dict(named), adapter_name="default")
    file_name = {id(p): k for k, p in by_file_name.items()}
    missing = sorted({file_name.get(id(p), n) for n, p in named} - set(state))
    if missing:
        raise AdapterError(f"the starting adapter has no {missing[:3]} for the model's trainable LoRA weights")
    return distributed.set_fp32_masters([p for _, p in named], [state[file_name[id(p)]] for _, p in named])


def save_adapter(model: Any, out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Gather (all ranks), write + verify on the main process, then wait for everyone.

    `manifest` carries lineage (base_model, lora, lora_init, parent, data, phase, hyperparameters);
    checksums, shapes, library versions and `precision` (float32 tensors, the parameters'
    training dtype, fp32 masters or parameters) are added here. Returns the final manifest on
    the main process, None elsewhere.
    """
    state, precision = gathered_adapter(model)
    written, error = None, None
    if distributed.is_main_process():
        try:
            written = _write_artifact(model, state, Path(out_dir), {**manifest, "precision": precision})
        except (AdapterError, DiskFull) as e:
            error = (isinstance(e, DiskFull), str(e))
    error = distributed.broadcast_object(error)  # doubles as the barrier; every rank fails together
    if error is not None:
        disk_full, message = error
        raise DiskFull(message) if disk_full else AdapterError(message)
    return written


def _write_artifact(model: Any, state: dict[str, torch.Tensor], out_dir: Path,
                    manifest: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    if out_dir.exists():
        raise AdapterError(f"{out_dir} already exists; refusing to overwrite an adapter artifact")
    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state or empty:
        raise AdapterError(f"refusing to save an empty adapter (empty tensors: {empty[:5]})")
    non_finite = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if non_finite:
        raise AdapterError(f"refusing to save an adapter with NaN/inf values in {len(non_finite)} tensors "
                           f"(first: {non_finite[0]}): training diverged")
    not_fp32 = sorted(k for k, v in state.items() if v.dtype != torch.float32)
    if not_fp32:
        raise AdapterError(f"refusing to save non-float32 adapter tensors {not_fp32[:3]}; gathered_adapter "
                           "saves float32 (a bf16 copy loses updates below its resolution)")
    tmp = temporary_dir(out_dir)
    needs = sum(v.numel() * v.element_size() for v in state.values())
    try:
        with writing(out_dir, needs):  # a full disk names the adapter; the temporary copy goes below
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
            model.peft_config["default"].save_pretrained(str(tmp))
            files = {name: sha256_file(tmp / name) for name in (WEIGHTS, CONFIG)}
            full = {**manifest, "format": FORMAT, "adapter_sha256": files[WEIGHTS], "files": files,
                    "tensors": {k: list(v.shape) for k, v in sorted(state.items())},
                    "versions": library_versions(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
            verify_adapter(tmp)
            publish_dir(tmp, out_dir)  # readable as the umask says, like every other file of the run
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return full


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {MANIFEST}; not an adapter artifact (or an unfinished one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: manifest is not valid JSON ({e})") from e


def verify_adapter(adapter_dir: Path, expected_base: dict[str, str] | None = None,
                   expected_lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checksums, non-empty tensors with the recorded shapes, LoRA shape and base model."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    for name, expected in manifest.get("files", {}).items():
        path = adapter_dir / name
        if not path.is_file():
            raise AdapterError(f"{adapter_dir}: {name} listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise AdapterError(f"{path}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…); "
                               "the file is corrupted or was changed after saving")
    shapes = manifest.get("tensors", {})
    rank = manifest.get("lora", {}).get("r")
    with safe_open(str(adapter_dir / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(shapes):
            raise AdapterError(f"{adapter_dir}: tensors differ from the manifest "
                               f"(extra {sorted(keys - set(shapes))[:3]}, missing {sorted(set(shapes) - keys)[:3]})")
        for key in sorted(keys):
            shape = list(f.get_slice(key).get_shape())
            if shape != shapes[key] or 0 in shape:
                raise AdapterError(f"{adapter_dir}: tensor {key} has shape {shape}, expected {shapes[key]} "
                                   "(an empty shard saved under ZeRO-3?)")
            if rank is not None and rank not in shape:
                raise AdapterError(f"{adapter_dir}: tensor {key} shape {shape} does not have LoRA rank {rank}")
    if expected_base is not None:
        _check_same("base model", manifest.get("base_model", {}), expected_base, adapter_dir)
    if expected_lora is not None:
        _check_same("LoRA config", manifest.get("lora", {}), expected_lora, adapter_dir)
    return manifest


def lora_init_of(manifest: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(LoRA init name, residual reference or None) an adapter was trained from; manifests written before
    the field existed read as the default init on the base itself."""
    from d2lora_dist.lora_inits import DEFAULT_LORA_INIT

    entry = manifest.get("lora_init")
    if entry is None:
        return DEFAULT_LORA_INIT, None
    residual = entry.get("residual")
    if residual is not None and not {"key", "factors_sha256", "path"} <= set(residual):
        raise AdapterError(f"manifest lora_init.residual {residual!r} lacks key, factors_sha256 or path")
    return entry["name"], residual


def _check_same(what: str, recorded: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    diffs = [f"{k}: adapter has {recorded.get(k)!r}, this run has {v!r}" for k, v in expected.items()
             if recorded.get(k) != v]
    if diffs:
        raise AdapterError(f"{where}: adapter was made for a different {what}; " + "; ".join(diffs))


def load_adapter_state(adapter_dir: Path, expected_base: dict[str, str] | None = None,
                       expected_lora: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Main process reads and verifies once, then broadcasts: every rank starts bit-identical."""
    from safetensors.torch import load_file

    payload: tuple[dict, dict] | None = None
    error: str | None = None
    if distributed.is_main_process():
        try:
            manifest = verify_adapter(adapter_dir, expected_base, expected_lora)
            payload = (load_file(str(Path(adapter_dir) / WEIGHTS)), manifest)
        except AdapterError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise AdapterError(error)
    return distributed.broadcast_object(payload)


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """Order-independent checksum of tensors (to prove ranks hold identical weights), any dtype
    (numpy has no bfloat16, so the raw bytes are hashed)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
