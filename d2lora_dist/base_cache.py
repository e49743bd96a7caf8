"""Where a phase gets its tokenizer and frozen base model: loaded fresh, or shared by the cells of one worker.

`FreshBase` (every launch, the default) loads both for each phase, as one process per cell always
did. `SharedBase` (the local executor's cell worker, d2lora_dist/sweep/worker.py) loads them once
per model config and lends the model to one phase at a time. A phase attaches its own LoRA to the
lent model; when the phase ends, whether it succeeded or failed, the model is handed back pristine:

- every PEFT layer is replaced by the layer it wrapped;
- base weights a phase rewrote in place (a residual LoRA init: PiSSA, OLoRA) get back the copies taken
  just before the rewrite (`before_overwrite`);
- gradient checkpointing is off; hooks added since load are removed (the input-embedding grad hook
  TRL/PEFT add, once per call); attributes a module gained since load are deleted (PEFT's
  `peft_config`, the Trainer's `model_tags`, TRL's fused-loss `forward` set on the instance);
- every parameter is frozen again, the model is in eval mode, `use_cache` is the next phase's;
- `config` and `generation_config` get back the values they had at load (TRL writes pad/eos ids);
- then it is checked against what was recorded at load (a checksum of every weight and buffer, the
  module tree, hooks, attributes, configs). Anything different raises BaseChanged and the copy is
  dropped, so the next phase loads a fresh one: a cell can fail, the base cannot drift.

Tokenizers are handed out as deep copies (TRL sets pad/eos tokens on the one it is given).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from d2lora_dist.config import ModelConfig
from d2lora_dist.modeling import load_base_model, load_tokenizer


class BaseChanged(RuntimeError):
    """The shared base model differs from what was loaded after a phase gave it back (a bug)."""


class FreshBase:
    """Load the tokenizer and the base model for every phase (one process per cell; every multi-rank launch)."""

    shared = False

    def tokenizer(self, cfg: ModelConfig) -> Any:
        return load_tokenizer(cfg)

    @contextmanager
    def base(self, cfg: ModelConfig, training: bool) -> Iterator[Any]:
        yield load_base_model(cfg, training=training)

    def before_overwrite(self, params: list[torch.nn.Parameter]) -> None:
        """The phase is about to change these base weights in place; a fresh base is never lent again."""


@dataclass
class _Pristine:
    """What the base model looked like right after loading, to compare with each time it comes back."""

    weights: str
    modules: tuple[str, ...]
    hooks: dict[str, frozenset[int]]
    attributes: dict[str, frozenset[str]]
    config: dict[str, Any]
    generation: dict[str, Any]

    @classmethod
    def of(cls, model: Any) -> _Pristine:
        return cls(weights_checksum(model), tuple(n for n, _ in model.named_modules()), _hook_ids(model),
                   _attributes(model), copy.deepcopy(vars(model.config)), _generation_vars(model))

    def differences(self, model: Any) -> list[str]:
        found = []
        if tuple(n for n, _ in model.named_modules()) != self.modules:
            found.append("its module tree changed (a PEFT layer left behind?)")
        if _hook_ids(model) != self.hooks:
            found.append(f"its hooks differ from those at load ({sorted(set(_hook_ids(model)) ^ set(self.hooks))[:3]})")
        now = _attributes(model)
        if now != self.attributes:
            found.append(f"attributes differ from those at load on {sorted(k for k in now if now[k] != self.attributes.get(k))[:3]}")
        if vars(model.config) != self.config:
            found.append(f"config differs at {sorted(_changed(vars(model.config), self.config))[:5]}")
        if _generation_vars(model) != self.generation:
            found.append(f"generation_config differs at {sorted(_changed(_generation_vars(model), self.generation))[:5]}")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if trainable:
            found.append(f"parameters left trainable: {trainable[:3]}")
        if model.training:
            found.append("it is in training mode")
        checksum = weights_checksum(model)
        if checksum != self.weights:
            found.append(f"its weights changed (checksum {checksum[:12]}…, {self.weights[:12]}… at load)")
        return found


class SharedBase(FreshBase):
    """One tokenizer and one base model per model config, lent to one phase at a time (one plain process)."""

    shared = True

    def __init__(self) -> None:
        self.loads = 0  # base model loads, for the log and the tests
        self._key: str | None = None
        self._model: Any = None
        self._pristine: _Pristine | None = None
        self._tokenizers: dict[str, Any] = {}
        self._overwritten: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (weight, its bits at load)

    def tokenizer(self, cfg: ModelConfig) -> Any:
        key = _key(cfg)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(cfg)
        return copy.deepcopy(self._tokenizers[key])

    @contextmanager
    def base(self, cfg: ModelConfig, training: bool) -> Iterator[Any]:
        from d2lora_dist import distributed

        if distributed.world_size() > 1 or distributed.zero3_enabled():
            raise RuntimeError("SharedBase lends one whole model in one plain process; a multi-rank or ZeRO-3 "
                               "launch loads its own (FreshBase)")
        model = self._get(cfg)
        model.config.use_cache = not training
        try:
            yield model
        finally:
            self._give_back(model)

    def before_overwrite(self, params: list[torch.nn.Parameter]) -> None:
        """Copy the weights (on the CPU: no second copy on the device) to put back when the phase ends."""
        held = {id(p) for p, _ in self._overwritten}
        self._overwritten += [(p, p.detach().to("cpu", copy=True)) for p in params if id(p) not in held]

    def _get(self, cfg: ModelConfig) -> Any:
        key = _key(cfg)
        if self._key != key:
            self.drop()
            from d2lora_dist import distributed

            # On the device the Trainer and evaluation move it to, before its fingerprint is taken: a
            # device change would otherwise read as changed weights at the first hand-back (GPU runs).
            self._model = load_base_model(cfg, training=False).to(distributed.device())
            self._key, self._pristine = key, _Pristine.of(self._model)
            self.loads += 1
        return self._model

    def drop(self) -> None:
        self._key, self._model, self._pristine = None, None, None
        self._overwritten = []
        _free_memory()

    def _give_back(self, model: Any) -> None:
        assert self._pristine is not None
        try:
            restore(model, self._pristine, self._overwritten)
        except BaseException:
            self.drop()  # half restored: never lend it again
            raise
        self._overwritten = []
        _free_memory()
        problems = self._pristine.differences(model)
        if problems:
            self.drop()
            raise BaseChanged("the shared base model came back changed: " + "; ".join(problems) +
                              ". Dropped it (the next cell loads a fresh copy); a bug in base_cache.restore")


def restore(model: Any, pristine: _Pristine,
            overwritten: Sequence[tuple[torch.nn.Parameter, torch.Tensor]] = ()) -> None:
    """Undo what a phase (PEFT, TRL, the Trainer) did to the base model; see the module docstring."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    with torch.no_grad():
        for weight, saved in overwritten:
            weight.copy_(saved)
    if _checkpointing_on(model):
        _checkpointing_off(model)
    _remove_added_hooks(model, pristine.hooks)  # the input-embedding grad hook, once per enable call
    for name, m in model.named_modules():  # peft_config, model_tags, TRL's fused `forward`, hook records
        for added in frozenset(vars(m)) - pristine.attributes.get(name, frozenset()):
            delattr(m, added)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    model.eval()
    _restore_vars(model.config, pristine.config)
    if getattr(model, "generation_config", None) is not None:
        _restore_vars(model.generation_config, pristine.generation)


def _checkpointing_on(model: Any) -> bool:
    """transformers 5 renamed gradient to activation checkpointing (the old names warn, and go in v6)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _checkpointing_off(model: Any) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def weights_checksum(model: Any) -> str:
    """Every parameter and buffer, bit for bit: two integer sums of its raw bits (plain and position-weighted,
    int64 wrap-around), hashed with names, dtypes and shapes. On the model's device, in chunks (no copy of
    the weights); a changed bit changes the sums."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type}".encode())
        digest.update(_bit_sums(t.detach()).encode())
    return digest.hexdigest()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24


def _bit_sums(t: torch.Tensor) -> str:
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return "empty"
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if t.dtype != torch.bool else flat.to(torch.uint8)
    plain = torch.zeros((), dtype=torch.int64, device=t.device)
    weighted = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start:start + _CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
        plain += chunk.sum()
        weighted += (chunk * position).sum()
    return f"{plain.item()}:{weighted.item()}"


def _key(cfg: ModelConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_EXTRAS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _attributes(model: Any) -> dict[str, frozenset[str]]:
    return {name: frozenset(vars(m)) for name, m in model.named_modules()}


def _hook_ids(model: Any) -> dict[str, frozenset[int]]:
    """The hooks on every module, by handle id (PEFT/TRL add hooks: transformers' enable_input_require_grads
    forgets the handle of an earlier call, so disable_input_require_grads cannot remove it)."""
    return {f"{name}|{kind}": frozenset(getattr(m, kind)) for name, m in model.named_modules() for kind in _HOOKS
            if getattr(m, kind, None)}


def _remove_added_hooks(model: Any, recorded: dict[str, frozenset[int]]) -> None:
    for name, m in model.named_modules():
        for kind in _HOOKS:
            for hook_id in set(getattr(m, kind, {})) - recorded.get(f"{name}|{kind}", frozenset()):
                for table in (kind, *_HOOK_EXTRAS):
                    getattr(m, table, {}).pop(hook_id, None)


def _generation_vars(model: Any) -> dict[str, Any]:
    config = getattr(model, "generation_config", None)
    return copy.deepcopy(vars(config)) if config is not None else {}


def _changed(now: dict[str, Any], then: dict[str, Any]) -> set[str]:
    return {k for k in set(now) | set(then) if now.get(k, "<absent>") != then.get(k, "<absent>")}


def _restore_vars(obj: Any, saved: dict[str, Any]) -> None:
    """Put back the attribute values `obj` had, in place (modules keep references to the config object;
    a nested config, e.g. a text config, is restored in place too)."""
    for key in [k for k in vars(obj) if k not in saved]:
        delattr(obj, key)
    for key, value in saved.items():
        current = vars(obj).get(key)
        if hasattr(value, "__dict__") and type(current) is type(value) and current is not None:
            _restore_vars(current, vars(value))
        elif current != value:
            vars(obj)[key] = copy.deepcopy(value)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
