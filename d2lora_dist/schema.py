"""Turn plain YAML data into typed dataclasses, collecting every problem before failing.

Each problem names the dotted key and the file, so a user fixing a config sees all of
them at once (litgpt-style `validate_args`), and unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from d2lora_dist.config_source import ConfigSource
from d2lora_dist.errors import InputError


class ConfigError(InputError):
    """A configuration problem; the message lists every problem found, one per line."""

    def __init__(self, problems: list[str], source: str | ConfigSource = "<config>"):
        self.problems = problems
        self.source = str(source)
        lines = "\n".join(f"  - {_located(p, source)}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def _located(problem: str, source: str | ConfigSource) -> str:
    """The problem with where its key was written (a YAML line, a `--set` argument) in front, when known."""
    where = source.where(problem) if isinstance(source, ConfigSource) else None
    return f"{where}: {problem}" if where else problem


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_describe(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: report X's own problems, with their keys
            return _convert(candidates[0], value, key, problems)
        for arg in candidates:
            trial: list[str] = []
            converted = _convert(arg, value, key, trial)
            if not trial:
                return converted
        problems.append(f"{key}: expected {_describe(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{key}: {value!r} is not one of {_describe(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return _build(tp, value, key, problems)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return {_convert(key_tp, k, key, problems): _convert(val_tp, v, f"{key}.{k}", problems)
                for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-6" as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    problems.append(f"{key}: expected {_describe(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for unknown in sorted(set(data) - set(fields)):
        valid = ", ".join(sorted(fields))
        problems.append(f"{_join(prefix, unknown)}: unknown key (valid keys: {valid})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required key is missing")
    # Build what we can even with problems, so that later checks still run.
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    for name in missing:
        kwargs[name] = None
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build(cls: type, data: dict[str, Any], source: str) -> tuple[Any, list[str]]:
    """Build `cls` from `data` as far as possible; return it with every problem found."""
    if not isinstance(data, dict):
        raise ConfigError([f"top level: expected a mapping, got {type(data).__name__}"], source)
    problems: list[str] = []
    return _build(cls, data, "", problems), problems


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain data (for freezing the resolved experiment and W&B config)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
