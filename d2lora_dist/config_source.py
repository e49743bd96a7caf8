"""Where each value of an experiment came from: a line of the YAML file, or a `--set` argument.

Problems name a dotted key (`lora.r`, `grid[0].n`, `methods.dpo.beta=...`); a `ConfigSource`
turns that key into "line 12" or "--set lora.r=0", so a message points at the text to fix. It also
carries the field problems validation found, which the preflight reports in the same round as its
own data and launch checks (config.read_experiment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

# The dotted key a problem starts with: names joined by `.`, list items as `[i]`.
_LEADING_KEY = re.compile(r"^[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*")
_KEY_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


@dataclass(frozen=True)
class ConfigSource:
    """The experiment file as read. `str()` is its path, so it stands wherever a source name is printed."""

    path: str
    lines: dict[str, int] = field(default_factory=dict)  # dotted key -> 1-based line in the file
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> the `--set` argument that set it
    problems: tuple[str, ...] = ()  # field problems still to report (with the preflight's own)

    def __str__(self) -> str:
        return self.path

    def where(self, problem: str) -> str | None:
        """"line N" or "--set K=V" for the key a problem names (or its nearest ancestor); None if unknown."""
        match = _LEADING_KEY.match(problem)
        if not match:
            return None
        key = match.group(0)
        ancestors = [key, *_ancestors(key)]
        for k in ancestors:  # an override covers everything under its key
            if k in self.overrides:
                return self.overrides[k]
        for k in ancestors:
            if k in self.lines:
                return f"line {self.lines[k]}"
        return None


def held_problems(source: str | ConfigSource) -> list[str]:
    """The field problems a source still holds for the preflight (none for a plain name)."""
    return list(source.problems) if isinstance(source, ConfigSource) else []


def key_parts(dotted: str) -> list[str | int]:
    """`grid[0].n` or `grid.0.n` -> ["grid", 0, "n"] (a bare number indexes a list)."""
    parts: list[str | int] = []
    for index, name in _KEY_PART.findall(dotted):
        parts.append(int(index) if index else int(name) if name.isdigit() else name)
    return parts


def dotted_key(parts: list[str | int]) -> str:
    """The spelling problems use: ["grid", 0, "n"] -> `grid[0].n`."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def key_lines(text: str) -> dict[str, int]:
    """Every key of a YAML document -> the line it is on (1-based); {} when the text does not parse."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    _walk(root, [], lines)
    return lines


def _walk(node: yaml.Node | None, parts: list[str | int], lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            child = [*parts, str(key_node.value)]
            lines[dotted_key(child)] = key_node.start_mark.line + 1
            _walk(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = [*parts, i]
            lines[dotted_key(child)] = item.start_mark.line + 1
            _walk(item, child, lines)


def _ancestors(key: str) -> list[str]:
    parts = key_parts(key)
    return [dotted_key(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
