"""The files d2lora-dist ships: sbatch templates, DeepSpeed configs, accelerate configs.

Their one source is the repository's top-level directories (KINDS). A wheel carries them as
package data in d2lora_dist/_shipped/<kind>/ (pyproject.toml maps the data-only packages
d2lora_dist._shipped.<kind> onto those directories). An editable install or a source checkout
has no such directory: setuptools' editable finder cannot import a data-only package mapped
outside the package tree, so there the top-level directories next to the package are read
(only when pyproject.toml sits next to the package, so a wheel install never picks up an
unrelated `slurm/` from site-packages). This module is the only place that knows the layout.

Relative paths in experiment files (launch.accelerate_config, launch.deepspeed_config, an
accelerate config's deepspeed_config_file) are read from the working directory first (a
user's own file wins), then from the shipped copy: `ds_configs/zero3_bf16.json` and
`launch/accelerate/1node_8gpu_zero3.yaml` work from any directory and from a wheel install.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path, PurePath

from d2lora_dist.errors import MissingInput

# kind -> its directory in the repository, which is also how experiment files name its files
KINDS = {"slurm": "slurm", "ds_configs": "ds_configs", "accelerate": "launch/accelerate"}
PACKAGED = "_shipped"  # d2lora_dist/_shipped/<kind>/ in a wheel


def _package_dir() -> Path:
    return Path(str(files("d2lora_dist")))


def _candidates(kind: str) -> list[Path]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of shipped file {kind!r}; kinds: {', '.join(KINDS)}")
    package = _package_dir()
    found = [package / PACKAGED / kind]  # wheel
    if (package.parent / "pyproject.toml").is_file():  # editable install or source checkout
        found.append(package.parent / KINDS[kind])
    return found


def shipped_dir(kind: str) -> Path | None:
    """The directory holding the shipped files of this kind, or None when this install has none."""
    return next((d for d in _candidates(kind) if d.is_dir()), None)


def shipped_names(kind: str) -> list[str]:
    """The names of the shipped files of this kind (empty when this install has none)."""
    where = shipped_dir(kind)
    return sorted(p.name for p in where.iterdir() if p.is_file()) if where else []


def shipped_path(kind: str, name: str) -> Path:
    """The shipped file `name` of this kind; MissingInput naming it and what does ship otherwise."""
    where = shipped_dir(kind)
    if where is None:
        looked = " nor ".join(str(d) for d in _candidates(kind))
        raise MissingInput(f"shipped file {KINDS[kind]}/{name} not found: this install of d2lora_dist has no "
                           f"{KINDS[kind]}/ (neither {looked} exists); reinstall the package "
                           "(`pip install d2lora-dist`, or `pip install -e .` in the repository)")
    path = where / name
    if not path.is_file():
        raise MissingInput(f"shipped file {KINDS[kind]}/{name} not found in {where}; d2lora_dist ships "
                           f"{KINDS[kind]}/: {', '.join(shipped_names(kind)) or '(nothing)'}")
    return path


def _shipped_copy(path: PurePath) -> Path | None:
    parts = path.parts
    for kind, prefix in KINDS.items():
        head = PurePath(prefix).parts
        if len(parts) == len(head) + 1 and parts[:-1] == head:
            where = shipped_dir(kind)
            candidate = where / parts[-1] if where else None
            return candidate if candidate and candidate.is_file() else None
    return None


def find_file(path: str | Path) -> Path | None:
    """A launch file named in an experiment: as given (absolute, or relative to the working
    directory), else the shipped copy of `ds_configs/NAME`, `launch/accelerate/NAME` or
    `slurm/NAME`; None when neither exists."""
    given = Path(path)
    if given.is_file():
        return given
    return None if given.is_absolute() else _shipped_copy(given)


def for_command(path: str) -> str:
    """`path` for a launched command line: as given when it is the user's own file (the job runs in
    the same working directory) or when nothing is found (the preflight reports that), else the
    absolute path of the shipped copy."""
    if Path(path).is_file():
        return path
    found = find_file(path)
    return str(found.absolute()) if found else path
