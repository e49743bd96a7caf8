"""Residual LoRA inits (PiSSA, OLoRA): the starting factors, computed once and cached, and the residual base.

PEFT computes PiSSA/OLoRA inside the model: under ZeRO-3 every rank gathers each weight and runs its
own SVD/QR (a randomised SVD draws from each rank's RNG, so ranks can disagree), and every phase of a
sweep would decompose the same weights again. Here the main process computes the factors B0, A0 once
per key (base model, dtype, r, alpha, target modules, init, and the seed for seeded inits), one target
weight at a time straight from the base model's safetensors files, with PEFT's own LoRA layer on a
plain Linear, and writes them as an artifact `<run_dir>/lora_inits/<init>-r<r>-<digest>/`. Every rank
of every phase with that key loads that file, puts B0, A0 into its adapter and replaces each target
weight W by W - s B0 A0 (s = alpha / r), as PEFT does: in float32 from the unrounded factors, cast back
to W's dtype, while the adapter holds the factors rounded to W's dtype.

An adapter trained on a residual base belongs to it: its manifest names the artifact
(`lora_init.residual`: key, factors checksum, path), and a warm start or an evaluation rebuilds the
same residual from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2lora_dist import distributed
from d2lora_dist.adapters import lora_init_of
from d2lora_dist.config import Experiment, LoraConfig
from d2lora_dist.errors import InputError
from d2lora_dist.fileio import exclusive, publish_dir, sha256_file, temporary_dir
from d2lora_dist.lora_inits import lora_init_spec
from d2lora_dist.modeling import DTYPES, local_model_dir, peft_lora_config

FACTORS = "factors.safetensors"
MANIFEST = "manifest.json"
FORMAT = "d2lora-lora-init/1"
ADAPTER = "default"


class ResidualError(InputError):
    """Residual factors that are missing, corrupted, or made for another key."""


@dataclass(frozen=True)
class Residual:
    """The factors of one residual base, as every rank holds them."""

    ref: dict[str, Any]  # {"key", "factors_sha256", "path"}: what an adapter's manifest records
    factors: dict[str, torch.Tensor]  # float32 B0, A0 in PEFT's adapter naming (...q_proj.lora_A.weight)


# ---- the key and the artifact ---------------------------------------------------------------
def factors_key(base: dict[str, str], dtype: str, lora: LoraConfig, lora_init: str, seed: int) -> dict[str, Any]:
    """What the factors depend on; the seed only for seeded inits (randomised SVD)."""
    return {"base_model": {k: base[k] for k in ("config_sha256", "weights_fingerprint")}, "dtype": dtype,
            "r": lora.r, "alpha": lora.alpha, "target_modules": sorted(lora.target_modules), "lora_init": lora_init,
            "seed": seed if lora_init_spec(lora_init).seeded else None}


def artifact_dir(run_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(run_dir) / "lora_inits" / f"{key['lora_init']}-r{key['r']}-{digest}"


def ensure_factors(exp: Experiment, key: dict[str, Any]) -> dict[str, Any]:
    """The artifact for `key` (main process): reused and verified, or computed and written once. A lock per key:
    a warm-up and a vanilla cell that run at once in two slots compute the factors once, the second waits."""
    out = artifact_dir(exp.run_dir, key)
    with (nullcontext() if out.exists() else  # reuse takes no lock
          exclusive(Path(exp.run_dir) / ".locks" / f"lora_init-{out.name}.lock", f"[lora_init] {out.name}")):
        if out.exists():
            print(f"[lora_init] {key['lora_init']}: reusing the factors in {out}", flush=True)
        else:
            start = time.time()
            factors = compute_factors(local_model_dir(exp.model), exp.model.dtype, exp.lora, key["lora_init"],
                                      key["seed"] or 0)
            _write(out, key, factors)
            print(f"[lora_init] {key['lora_init']}: factors of {len(factors) // 2} modules computed in "
                  f"{time.time() - start:.1f}s, saved to {out}", flush=True)
    return {"key": key, "factors_sha256": verify_factors(out, key)["factors_sha256"], "path": str(out)}


def _write(out: Path, key: dict[str, Any], factors: dict[str, torch.Tensor]) -> None:
    """Temporary sibling, then rename; a concurrent writer of the same key may win (its copy is used)."""
    from safetensors.torch import save_file

    tmp = temporary_dir(out)
    try:
        save_file(factors, str(tmp / FACTORS), metadata={"format": "pt"})
        manifest = {"format": FORMAT, "key": key, "factors_sha256": sha256_file(tmp / FACTORS),
                    "tensors": {k: list(v.shape) for k, v in sorted(factors.items())},
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            publish_dir(tmp, out)
        except OSError:
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_factors(directory: Path, key: dict[str, Any], sha256: str | None = None) -> dict[str, Any]:
    """The artifact's manifest, after checking its file's checksum, its key and (if given) the expected checksum."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ResidualError(f"{path}: missing; {directory} is not a LoRA-init factors artifact")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResidualError(f"{path}: not valid JSON ({e})") from e
    factors = Path(directory) / FACTORS
    if not factors.is_file():
        raise ResidualError(f"{factors}: the residual factors are missing")
    actual = sha256_file(factors)
    if actual != manifest["factors_sha256"] or (sha256 is not None and actual != sha256):
        raise ResidualError(f"{factors}: checksum {actual[:12]}… differs from the recorded "
                            f"{(sha256 or manifest['factors_sha256'])[:12]}…; the factors were changed or corrupted")
    if manifest["key"] != key:
        raise ResidualError(f"{path}: factors made for {manifest['key']}, expected {key}")
    return manifest


def load_residual(ref: dict[str, Any], run_dir: Path) -> Residual:
    """The factors `ref` names, checked against it; collective (the main process reads, every rank gets them).

    The recorded path first; else the same artifact under this run directory (a copied run)."""
    from safetensors.torch import load_file

    def read() -> dict[str, torch.Tensor]:
        recorded = Path(ref["path"])
        directory = recorded if recorded.is_dir() else Path(run_dir) / "lora_inits" / recorded.name
        if not directory.is_dir():
            raise ResidualError(f"{recorded / FACTORS}: the residual factors this adapter was trained on are "
                                f"missing (also not under {Path(run_dir) / 'lora_inits'})")
        verify_factors(directory, ref["key"], ref["factors_sha256"])
        return load_file(str(directory / FACTORS))

    return Residual(ref, distributed.on_main_then_broadcast(read))


def prepare_residual(exp: Experiment, lora_init: str, seed: int, base: dict[str, str]) -> Residual | None:
    """The residual base a fresh adapter with `lora_init` starts on (None: the base itself); collective.

    The main process computes or verifies the cached factors, the others wait; every rank then
    loads the same file."""
    if not lora_init_spec(lora_init).residual:
        return None
    key = factors_key(base, exp.model.dtype, exp.lora, lora_init, seed)
    ref = distributed.on_main_then_broadcast(lambda: ensure_factors(exp, key))
    return load_residual(ref, exp.run_dir)


def adapter_residual(exp: Experiment, manifest: dict[str, Any]) -> Residual | None:
    """The residual base an adapter was trained on, from its manifest (None: the base itself); collective."""
    _, ref = lora_init_of(manifest)
    return None if ref is None else load_residual(ref, exp.run_dir)


def manifest_entry(lora_init: str, residual: Residual | None) -> dict[str, Any]:
    return {"name": lora_init, "residual": None if residual is None else residual.ref}


# ---- computing the factors ------------------------------------------------------------------
def compute_factors(model_dir: Path, dtype: str, lora: LoraConfig, lora_init: str,
                    seed: int) -> dict[str, torch.Tensor]:
    """B0, A0 of every target weight in float32, by PEFT's own LoRA layer (its pissa/olora init) on a
    plain Linear holding the weight as the model loads it (in `dtype`); one weight in memory at a time, on
    this rank's device (an 8B model's SVDs take minutes on a GPU, hours on a CPU; cached, so done once).
    Seeded inits draw from a generator seeded with `seed` (the caller's RNG is left as it was)."""
    config = peft_lora_config(lora, lora_init)
    device = distributed.device()
    factors: dict[str, torch.Tensor] = {}
    with _seeded(seed, device):
        for module, weight in target_weights(model_dir, config):
            b, a = _peft_factors(weight.to(device, DTYPES[dtype]), lora, lora_init)
            factors[f"base_model.model.{module}.lora_A.weight"] = a
            factors[f"base_model.model.{module}.lora_B.weight"] = b
    if not factors:
        raise ResidualError(f"{model_dir}: no weight matches lora.target_modules {sorted(lora.target_modules)}")
    return factors


def target_weights(model_dir: Path, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, weight) of every 2-D weight PEFT's target matching selects, file by file, in a fixed order."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ResidualError(f"{model_dir}: no *.safetensors files; residual LoRA inits read the base weights there")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                module = key.removesuffix(".weight")
                if (key.endswith(".weight") and check_target_module_exists(config, module)
                        and len(f.get_slice(key).get_shape()) == 2):
                    yield module, f.get_tensor(key)


def _peft_factors(weight: torch.Tensor, lora: LoraConfig, lora_init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) as PEFT's init computes them on this weight (it works in float32 and rounds nothing when the
    layer is float32; the in-model init rounds the factors it stores to the weight's dtype)."""
    import peft

    holder = torch.nn.Module()
    holder.layer = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias=False,
                                            device=weight.device)
    holder.layer.weight = torch.nn.Parameter(weight.to(torch.float32, copy=True), requires_grad=False)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=["layer"], init_lora_weights=lora_init)
    peft.inject_adapter_in_model(config, holder)
    return _cpu(holder.layer.lora_B[ADAPTER].weight), _cpu(holder.layer.lora_A[ADAPTER].weight)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32, copy=True).contiguous()


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---- the residual base in a model -----------------------------------------------------------
def apply_residual(peft_model: Any, residual: Residual,
                   before_overwrite: Callable[[list[torch.nn.Parameter]], None] | None = None) -> None:
    """B0, A0 into the adapter (rounded to each base weight's dtype) and W -> W - s B0 A0 in place, computed
    on the CPU (a worker's base on the GPU and a fresh process's on the CPU get the same residual).

    Collective under ZeRO-3: every rank gathers each weight, rank 0's result is kept. `before_overwrite`
    sees the weights before any of them changes (a shared base keeps copies to put back)."""
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    expected = {f"{n}.lora_{m}.weight" for n, _ in layers for m in ("A", "B")}
    if expected != set(residual.factors):
        raise ResidualError(f"{residual.ref['path']}: factors do not fit the model's LoRA layers (missing "
                            f"{sorted(expected - set(residual.factors))[:3]}, extra {sorted(set(residual.factors) - expected)[:3]})")
    weights = [m.get_base_layer().weight for _, m in layers]
    if before_overwrite is not None:
        before_overwrite(weights)
    start = {}
    for (name, layer), weight in zip(layers, weights, strict=True):
        a, b = (residual.factors[f"{name}.lora_{m}.weight"] for m in ("A", "B"))
        start.update({f"{name}.lora_A.weight": a.to(weight.dtype), f"{name}.lora_B.weight": b.to(weight.dtype)})
        with distributed.gathered([weight], modifier_rank=0), torch.no_grad():
            w = weight.data  # PEFT's expression, on the CPU wherever the model is: the same bits on any launch
            w.copy_((w.to("cpu", torch.float32) - layer.scaling[ADAPTER] * b @ a).to(w.dtype))
    set_peft_model_state_dict(peft_model, start, adapter_name=ADAPTER)
