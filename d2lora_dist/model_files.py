"""What can be known of the base model before it loads: where its files are, and its module names.

Nothing here loads weights or touches the network: a local directory (or an `asset:`) is read as
it is, a hub id only through the Hugging Face cache (local_files_only). The module names come from
the safetensors headers (a few kilobytes each), so the preflight can refuse a `target_modules`
entry the model does not have without loading an 8B model first.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from d2lora_dist import hub
from d2lora_dist.errors import InputError

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, ./ ../ ~, more than one `/`, or under an
    existing directory."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or name.count("/") > 1:
        return True
    parent = Path(name).parent
    return "/" in name and parent != Path(".") and parent.is_dir()


def model_dir_problem(name: str) -> str | None:
    """Why `model.name_or_path` cannot be loaded here, or None (a hub id that may still be downloaded passes)."""
    from d2lora_dist.assets import resolve_asset_uri

    try:
        path = resolve_asset_uri(name)
    except (InputError, ValueError, OSError) as e:
        return f"model.name_or_path: {e}"
    if Path(path).expanduser().is_dir():
        if not (Path(path).expanduser() / "config.json").is_file():
            return f"model.name_or_path: {path} has no config.json; it is not a Hugging Face model directory"
        return None
    if looks_local(path) or not valid_repo_id(path):
        return f"model.name_or_path: {path!r} is a local path that does not exist (nor is it a hub id)"
    if _cached_file(path, "config.json") is None and hub.offline():
        return (f"model.name_or_path: hub id {path!r} is not in the Hugging Face cache ({cache_dir()}) and "
                f"{hub.why_offline()}; "
                "download it where the hub is reachable into the HF_HOME / HF_HUB_CACHE this machine uses, or give "
                "a local directory")
    return None


def module_names(name: str) -> list[str] | None:
    """Dotted names of the model's weight matrices' modules (e.g. model.layers.0.self_attn.q_proj) from
    its safetensors headers; None when its files are not on this machine or are not safetensors."""
    from d2lora_dist.assets import resolve_asset_uri

    try:
        path = resolve_asset_uri(name)
    except (InputError, ValueError, OSError):
        return None
    shards = _shards(path)
    if not shards:
        return None
    names: dict[str, None] = {}
    for shard in shards:
        for tensor, info in _header(shard).items():
            if tensor.endswith(".weight") and len(info.get("shape", ())) == 2:
                names[tensor.removesuffix(".weight")] = None
    return list(names)


def missing_targets(targets: list[str], modules: list[str]) -> list[str]:
    """The target names no module matches, by PEFT's rule: a module's full name or a dotted suffix of it."""
    return [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]


def short_names(modules: list[str]) -> list[str]:
    """The last part of each module name, once each, sorted (down_proj, k_proj, ...)."""
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def _shards(path: str) -> list[Path]:
    """The safetensors files of a local directory or a cached hub snapshot."""
    root = Path(path).expanduser()
    if root.is_dir():
        index, single = root / _INDEX, root / _SINGLE
        index_file: Path | None = index if index.is_file() else None
        single_file: Path | None = single if single.is_file() else None
    elif valid_repo_id(path):
        index_file, single_file = _cached_file(path, _INDEX), _cached_file(path, _SINGLE)
    else:
        return []
    if index_file is not None:
        files = sorted(set(json.loads(index_file.read_text()).get("weight_map", {}).values()))
        shards = [index_file.parent / f for f in files]
        return shards if all(s.is_file() for s in shards) else []
    return [single_file] if single_file is not None else []


def _header(path: Path) -> dict[str, dict]:
    """A safetensors file's header: tensor name -> dtype, shape, offsets (the first 8 bytes give its size)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def cache_dir() -> str:
    """The hub cache this process reads (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    return Path(cached) if isinstance(cached, str) else None


def valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
