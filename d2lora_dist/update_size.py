"""The size of a LoRA update: how far one training phase moved the model.

A LoRA module adds s·B A to its frozen weight W (s = alpha / r; B is (out, r), A is (r, in)).
For every adapted module this measures, between the adapter at the start of a phase and at
its end:

- `phase_rel` = ||s·(B_end A_end − B_start A_start)||_F / ||W||_F: how much THIS phase changed
  the effective weight;
- `total_rel` = ||s·B_end A_end||_F / ||W||_F: the whole adapter's effect so far (warm-up plus
  this phase, for a D2LoRA cell);
- per tensor (lora_A, lora_B): ||θ_end − θ_start|| / ||θ_start||, or the absolute norm when the
  start is all zeros (a fresh B), and whether the tensor is bit-identical to its start (every
  element equal; a start and end of different dtypes are compared by value).

Why relative to the frozen weight: what changes a model's outputs is the change of its
effective weights, and the same ||ΔW|| means little on a large W and much on a small one.
Relative numbers compare modules, models and precisions: bf16 weights resolve about 2^-8 ≈
3.9e-3 relative, so a phase whose phase_rel is far below that leaves the outputs of a bf16
model (nearly) unchanged. The adapter tensors themselves say nothing about this: A and B can
move a lot while their product barely does.

Norms of the rank-r products are computed from r×r (or 2r×2r) Gram matrices in float64,
never forming the (out × in) matrix: ||B A||_F² = sum((BᵀB) ∘ (A Aᵀ)). Base weight norms are
read one tensor (and one block of rows) at a time from the model's safetensors.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2lora_dist.errors import InputError

PEFT_PREFIX = "base_model.model."
_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_BLOCK_ELEMENTS = 1 << 24  # elements per block when reading a base weight (64 MiB in float32)
BF16_RESOLUTION = 2.0 ** -8


class UpdateSizeError(InputError):
    """Adapter states or base weights that cannot be compared (missing keys, shapes that differ)."""


# ---------------------------------------------------------------- keys


def lora_scaling(alpha: float, r: int) -> float:
    """PEFT's LoRA scaling s = alpha / r (no rsLoRA)."""
    if r <= 0:
        raise UpdateSizeError(f"LoRA rank must be positive, got r={r}")
    return alpha / r


def adapted_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names (`model.layers.0.self_attn.q_proj`) of a LoRA state dict in PEFT's file naming."""
    modules, unknown = set(), []
    for key in state:
        module = _module_of(key)
        if module is None:
            unknown.append(key)
        else:
            modules.add(module)
    if unknown:
        raise UpdateSizeError(f"LoRA state has keys that are not lora_A/lora_B weights of a linear module: "
                              f"{unknown[:3]} (embedding adapters, DoRA and biases are not measured)")
    if not modules:
        raise UpdateSizeError("LoRA state is empty: no lora_A/lora_B tensors to measure")
    return sorted(modules)


def _module_of(key: str) -> str | None:
    for suffix in _SUFFIXES.values():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
    return None


def _lora_key(module: str, kind: str) -> str:
    return f"{PEFT_PREFIX}{module}{_SUFFIXES[kind]}"


# ---------------------------------------------------------------- base weights


def base_weight_norms(model_dir: str | Path, module_keys: Iterable[str]) -> dict[str, float]:
    """||W||_F (float32 blocks, float64 sum) of `<module>.weight` for each module, read lazily.

    `model_dir` is a local HF model directory with `model.safetensors` or a sharded
    `model.safetensors.index.json`. One block of rows is in memory at a time.
    """
    from safetensors import safe_open

    root = Path(model_dir)
    files = _weight_files(root, [f"{m}.weight" for m in module_keys])
    norms: dict[str, float] = {}
    for path, keys in files.items():
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise UpdateSizeError(f"{path}: no tensor {key} (frozen weight of an adapted module); "
                                          "is this the base model the adapter was trained on?")
                tensor_slice = f.get_slice(key)
                if len(tensor_slice.get_shape()) != 2:
                    raise UpdateSizeError(f"{path}: {key} has shape {tensor_slice.get_shape()}; LoRA update "
                                          "sizes are measured for 2-D linear weights only")
                norms[key[: -len(".weight")]] = _sliced_norm(tensor_slice)
    return norms


def _weight_files(root: Path, keys: list[str]) -> dict[Path, list[str]]:
    """Which safetensors file holds each key (single file or sharded index)."""
    if (root / _INDEX_FILE).is_file():
        index_path = root / _INDEX_FILE
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UpdateSizeError(f"{index_path}: not a safetensors index with a weight_map ({e})") from e
        missing = [k for k in keys if k not in weight_map]
        if missing:
            raise UpdateSizeError(f"{index_path}: no tensor {missing[0]} in the weight_map "
                                  f"({len(missing)} adapted-module weights missing); "
                                  "is this the base model the adapter was trained on?")
        files: dict[Path, list[str]] = {}
        for key in keys:
            files.setdefault(root / weight_map[key], []).append(key)
        return files
    if (root / _SINGLE_FILE).is_file():
        return {root / _SINGLE_FILE: list(keys)}
    raise UpdateSizeError(f"{root}: neither {_SINGLE_FILE} nor {_INDEX_FILE}; base weight norms are read "
                          "from a local safetensors model directory")


def _sliced_norm(tensor_slice: Any) -> float:
    """Frobenius norm of a 2-D safetensors slice, read in blocks of rows.

    Row norms in float32 (torch's fused norm kernel: fast, and accurate over one row), their
    squares summed in float64. `square().sum(dtype=float64)` was 2-8x slower per GB.
    """
    rows, cols = tensor_slice.get_shape()
    step = max(1, _BLOCK_ELEMENTS // max(1, cols))
    total = 0.0
    for start in range(0, rows, step):
        block = tensor_slice[start:start + step].to(torch.float32)
        total += float(torch.linalg.vector_norm(block, dim=1).double().square().sum())
    return math.sqrt(total)


# ---------------------------------------------------------------- norms of low-rank products


def lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F for B (out, k), A (k, in), from k×k Gram matrices in float64."""
    b64, a64 = b.detach().to("cpu", torch.float64), a.detach().to("cpu", torch.float64)
    squared = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    return max(squared, 0.0) ** 0.5


def lowrank_diff_norm(b_end: torch.Tensor, a_end: torch.Tensor,
                      b_start: torch.Tensor, a_start: torch.Tensor) -> float:
    """||B_end A_end − B_start A_start||_F without forming either product.

    Written as (B_end − B_start) A_end + B_start (A_end − A_start) = [ΔB, B_start] [A_end; ΔA]
    (2r × 2r Gram matrices): equal to stacking [B_end, −B_start] [A_end; A_start], but the
    Gram entries are of the size of the change, not of the adapter, so a phase that moves a
    large warm-up adapter by 1e-8 relative is not lost to cancellation.
    """
    b_end64, b_start64 = b_end.detach().to("cpu", torch.float64), b_start.detach().to("cpu", torch.float64)
    a_end64, a_start64 = a_end.detach().to("cpu", torch.float64), a_start.detach().to("cpu", torch.float64)
    b = torch.cat([b_end64 - b_start64, b_start64], dim=1)
    a = torch.cat([a_end64, a_end64 - a_start64], dim=0)
    return lowrank_norm(b, a)


# ---------------------------------------------------------------- per-module rows


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


@dataclass(frozen=True)
class TensorChange:
    """How far one LoRA tensor moved from its start."""

    change: float  # ||end − start|| / ||start||, or ||end − start|| when `relative` is False
    relative: bool  # False when the start was all zeros (fresh lora_B): `change` is absolute
    identical: bool  # every element of end equals start (bit-identical when the dtypes agree)

    def fields(self, kind: str) -> dict[str, Any]:
        name = f"{kind}_rel_change" if self.relative else f"{kind}_abs_change"
        return {name: _sig(self.change), f"{kind}_identical": self.identical}


@dataclass(frozen=True)
class ModuleUpdate:
    module: str
    weight_norm: float  # ||W||_F of the frozen weight
    phase_rel: float
    total_rel: float
    lora_A: TensorChange
    lora_B: TensorChange

    def row(self) -> dict[str, Any]:
        return {"phase_rel": _sig(self.phase_rel), "total_rel": _sig(self.total_rel),
                **self.lora_A.fields("lora_A"), **self.lora_B.fields("lora_B")}


def tensor_change(start: torch.Tensor, end: torch.Tensor) -> TensorChange:
    s64, e64 = start.detach().to("cpu", torch.float64), end.detach().to("cpu", torch.float64)
    identical = torch.equal(s64, e64)
    diff = float(torch.linalg.vector_norm(e64 - s64))
    base = float(torch.linalg.vector_norm(s64))
    if base == 0.0:
        return TensorChange(change=diff, relative=False, identical=identical)
    return TensorChange(change=diff / base, relative=True, identical=identical)


def _module_update(module: str, start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                   scaling: float, weight_norm: float) -> ModuleUpdate:
    a_start, a_end = start[_lora_key(module, "lora_A")], end[_lora_key(module, "lora_A")]
    b_start, b_end = start[_lora_key(module, "lora_B")], end[_lora_key(module, "lora_B")]
    if weight_norm <= 0.0:
        raise UpdateSizeError(f"{module}: frozen weight has norm {weight_norm}; cannot measure relative to it")
    phase = scaling * lowrank_diff_norm(b_end, a_end, b_start, a_start) / weight_norm
    total = scaling * lowrank_norm(b_end, a_end) / weight_norm
    return ModuleUpdate(module=module, weight_norm=weight_norm, phase_rel=phase, total_rel=total,
                        lora_A=tensor_change(a_start, a_end), lora_B=tensor_change(b_start, b_end))


def _check_states(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                  modules: list[str], weight_norms: Mapping[str, float]) -> None:
    """Same keys, same shapes, (out, r) @ (r, in) shapes, a weight norm for every module."""
    if set(start) != set(end):
        raise UpdateSizeError(f"start and end adapters have different tensors: only in start "
                              f"{sorted(set(start) - set(end))[:3]}, only in end {sorted(set(end) - set(start))[:3]}")
    problems = []
    for key in sorted(start):
        if tuple(start[key].shape) != tuple(end[key].shape):
            problems.append(f"{key}: start {tuple(start[key].shape)}, end {tuple(end[key].shape)}")
    for module in modules:
        a_key, b_key = _lora_key(module, "lora_A"), _lora_key(module, "lora_B")
        if a_key not in end or b_key not in end:
            problems.append(f"{module}: needs both {a_key} and {b_key}")
        elif end[a_key].dim() != 2 or end[b_key].dim() != 2 or end[b_key].shape[1] != end[a_key].shape[0]:
            problems.append(f"{module}: lora_B {tuple(end[b_key].shape)} @ lora_A {tuple(end[a_key].shape)} "
                            "is not (out, r) @ (r, in)")
        if module not in weight_norms:
            problems.append(f"{module}: no frozen-weight norm (weight_norms has no key {module!r})")
    if problems:
        raise UpdateSizeError("cannot measure the LoRA update: " + "; ".join(problems[:5]))


# ---------------------------------------------------------------- the result


@dataclass(frozen=True)
class UpdateSize:
    """Per-module update sizes of one phase, and their summary."""

    modules: tuple[ModuleUpdate, ...]

    @property
    def phase_rel_max(self) -> float:
        return max(m.phase_rel for m in self.modules)

    @property
    def phase_rel_median(self) -> float:
        return statistics.median(m.phase_rel for m in self.modules)

    @property
    def phase_rel_max_module(self) -> str:
        return max(self.modules, key=lambda m: m.phase_rel).module

    @property
    def total_rel_max(self) -> float:
        return max(m.total_rel for m in self.modules)

    def identical_count(self, kind: str | None = None) -> int:
        """LoRA tensors bit-identical to their start (of one kind, lora_A or lora_B, or both)."""
        kinds = [kind] if kind else list(_SUFFIXES)
        return sum(getattr(m, k).identical for m in self.modules for k in kinds)

    @property
    def lora_tensors(self) -> int:
        return len(_SUFFIXES) * len(self.modules)

    def summary(self) -> dict[str, Any]:
        return {"phase_rel_max": _sig(self.phase_rel_max), "phase_rel_median": _sig(self.phase_rel_median),
                "phase_rel_max_module": self.phase_rel_max_module, "total_rel_max": _sig(self.total_rel_max),
                "identical_tensors": self.identical_count(), "lora_tensors": self.lora_tensors,
                "modules": len(self.modules)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the summary and one compact row per module (4 significant digits)."""
        return {"summary": self.summary(), "modules": {m.module: m.row() for m in self.modules}}

    def wandb_metrics(self, prefix: str = "update") -> dict[str, float]:
        return {f"{prefix}/phase_rel_max": self.phase_rel_max,
                f"{prefix}/phase_rel_median": self.phase_rel_median,
                f"{prefix}/total_rel_max": self.total_rel_max,
                f"{prefix}/identical_tensors": self.identical_count(),
                f"{prefix}/lora_tensors": self.lora_tensors}

    def describe(self, name: str) -> str:
        return (f"{name}: update size ||ΔW||/||W|| max {self.phase_rel_max:.3g} ({self.phase_rel_max_module}), "
                f"median {self.phase_rel_median:.3g} over {len(self.modules)} modules; whole adapter max "
                f"{self.total_rel_max:.3g}; {self.identical_count()} of {self.lora_tensors} LoRA tensors "
                "bit-identical to their start")

    def warning(self, threshold: float = 1e-3) -> str | None:
        """Why this phase may not have changed the model, or None when it did."""
        problems = []
        if self.phase_rel_max < threshold:
            problems.append(
                f"this phase changed the frozen weights by at most {self.phase_rel_max:.3g} relative "
                f"(||s·ΔBA||/||W||, {self.phase_rel_max_module}), below update_warning_below={threshold:g}; "
                f"bf16 resolves about {BF16_RESOLUTION:.1e} relative, so an update this small is too small "
                "to change the model's outputs: raise the learning rate or train more steps "
                "(epochs, max_steps, min_steps)")
        for kind in _SUFFIXES:
            same = self.identical_count(kind)
            if same:
                problems.append(
                    f"{kind} of {same} of {len(self.modules)} modules is bit-identical to its start "
                    "(the adapter was saved at a precision too coarse for its update, or these "
                    "tensors got no gradient)")
        return "; ".join(problems) if problems else None


def measure_update(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], scaling: float,
                   weight_norms: Mapping[str, float]) -> UpdateSize:
    """Update sizes between two LoRA states (PEFT file naming) of the same adapter.

    `scaling` is alpha / r (`lora_scaling`); `weight_norms` maps each module name
    (`model.layers.0.self_attn.q_proj`) to ||W||_F (`base_weight_norms`).
    """
    if not scaling > 0:
        raise UpdateSizeError(f"LoRA scaling must be positive (alpha / r), got {scaling}")
    modules = adapted_modules(end)
    _check_states(start, end, modules, weight_norms)
    return UpdateSize(tuple(_module_update(m, start, end, scaling, float(weight_norms[m])) for m in modules))
