"""The files that ship with the package (sbatch templates, DeepSpeed and accelerate configs):
found through d2lora_dist/shipped.py in this (editable) install, resolved working directory
first, and carried by a real wheel so that a plain `pip install` can submit a sweep from any
directory (the wheel test builds, installs with --target and runs the CLI from an empty
directory, ~20 s)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from d2lora_dist import shipped
from d2lora_dist.errors import MissingInput
from tests.conftest import REPO, tiny_experiment_dict, write_experiment

# what each kind ships: every such file in its top-level directory
PATTERNS = {"slurm": ("*.sbatch", "*.sh"), "ds_configs": ("*.json",), "accelerate": ("*.yaml",)}
ACCELERATE = "launch/accelerate/1node_8gpu_zero3.yaml"
DEEPSPEED = "ds_configs/zero3_bf16.json"


def repo_files(kind: str) -> dict[str, Path]:
    top = REPO / shipped.KINDS[kind]
    return {p.name: p for pattern in PATTERNS[kind] for p in sorted(top.glob(pattern))}


# ---- this install (editable, or a checkout) ----------------------------------------------------
def test_shipped_path_finds_every_shipped_file() -> None:
    for kind in shipped.KINDS:
        files = repo_files(kind)
        assert files, kind
        assert shipped.shipped_names(kind) == sorted(files), kind
        for name, source in files.items():
            assert shipped.shipped_path(kind, name).read_bytes() == source.read_bytes(), (kind, name)


def test_a_missing_shipped_file_is_named_with_what_ships() -> None:
    with pytest.raises(MissingInput, match=r"shipped file slurm/nope\.sbatch not found.*cell_array\.sbatch"):
        shipped.shipped_path("slurm", "nope.sbatch")
    with pytest.raises(MissingInput, match=r"launch/accelerate/nope\.yaml not found.*1node_8gpu_zero3\.yaml"):
        shipped.shipped_path("accelerate", "nope.yaml")
    with pytest.raises(ValueError, match="unknown kind of shipped file 'templates'"):
        shipped.shipped_path("templates", "x")


def test_relative_launch_files_resolve_working_directory_first_then_shipped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert shipped.find_file(DEEPSPEED) == shipped.shipped_path("ds_configs", "zero3_bf16.json")
    assert shipped.find_file(f"./{ACCELERATE}") == shipped.shipped_path("accelerate", "1node_8gpu_zero3.yaml")
    assert shipped.for_command(ACCELERATE) == str(shipped.shipped_path("accelerate", "1node_8gpu_zero3.yaml"))
    for missing in ("ds_configs/nope.json", "zero3_bf16.json", "other/ds_configs/zero3_bf16.json",
                    str(tmp_path / DEEPSPEED)):
        assert shipped.find_file(missing) is None, missing
        assert shipped.for_command(missing) == missing  # left to the preflight to report
    own = tmp_path / DEEPSPEED  # the user's own file wins, and stays as given on command lines
    own.parent.mkdir()
    own.write_text("{}")
    assert shipped.find_file(DEEPSPEED) == Path(DEEPSPEED)
    assert shipped.for_command(DEEPSPEED) == DEEPSPEED


def test_pyproject_ships_every_kind_and_lists_every_subpackage() -> None:
    """`packages` is an explicit list (a mapped data package rules out `find`): nothing may fall out."""
    from setuptools import find_namespace_packages

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = find_namespace_packages(where=str(REPO), include=["d2lora_dist", "d2lora_dist.*"])
    missing = sorted(set(code) - set(tool["packages"]) - {p for p in code if "__pycache__" in p})
    assert missing == [], f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    for kind, top in shipped.KINDS.items():
        package = f"d2lora_dist.{shipped.PACKAGED}.{kind}"
        assert package in tool["packages"] and tool["package-dir"][package] == top, kind
        assert tuple(tool["package-data"][package]) == PATTERNS[kind], kind


# ---- a regular wheel, installed elsewhere ------------------------------------------------------
_SKIP = {".git", ".venv", "build", "dist", "runs", "wandb", ".pytest_cache", ".ruff_cache", "__pycache__"}


def _source_copy(dest: Path) -> Path:
    """The working tree without caches and build output: a stale build/lib would hide a wheel
    that lost its package data, and the build writes into the tree it builds."""
    shutil.copytree(REPO, dest, ignore=lambda _d, names: [n for n in names if n in _SKIP
                                                          or n.endswith(".egg-info")])
    return dest


def _wheel_experiment(model_dir: Path, tiny_data: dict[str, str], root: Path) -> Path:
    exp = tiny_experiment_dict(model_dir, tiny_data, root)  # submit loads no model, but its preflight reads its files
    exp["launch"] = {"accelerate_config": ACCELERATE, "num_processes": 8, "deepspeed_config": DEEPSPEED}
    exp["slurm"] = {"gpus_per_node": 8, "partition": "gpu"}
    for settings in (exp["warmup"]["train"], *exp["methods"].values()):
        settings["global_batch_size"] = 16  # 8 ranks x 2
    return write_experiment(exp, root / "experiment.yaml")


_PROBE = """
import json, os, sys
import d2lora_dist
from d2lora_dist import distributed, shipped
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
print(json.dumps({"package": d2lora_dist.__file__,
                  "names": {kind: shipped.shipped_names(kind) for kind in shipped.KINDS},
                  "deepspeed": distributed.deepspeed_config_file(sys.argv[1]),
                  "accelerate": shipped.for_command(sys.argv[2])}))
"""


def test_a_wheel_installed_elsewhere_submits_a_sweep_from_an_empty_directory(tiny_model_dir: Path, tiny_data,
                                                                            tmp_path: Path) -> None:
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    source = _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("d2lora_dist-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path, timeout=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    probe = run("-c", _PROBE, DEEPSPEED, ACCELERATE)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).parent == target / "d2lora_dist"  # the wheel, not the repository
    packaged = target / "d2lora_dist" / shipped.PACKAGED
    assert found["names"] == {kind: sorted(repo_files(kind)) for kind in shipped.KINDS}
    assert found["deepspeed"] == str((packaged / "ds_configs" / "zero3_bf16.json").resolve())
    assert Path(found["accelerate"]).resolve() == (packaged / "accelerate" / "1node_8gpu_zero3.yaml").resolve()
    # the shipped accelerate config's own deepspeed_config_file resolves to the packaged JSON too
    ds_in_accelerate = yaml.safe_load(Path(found["accelerate"]).read_text())["deepspeed_config"]
    assert ds_in_accelerate["deepspeed_config_file"] == DEEPSPEED

    experiment = _wheel_experiment(tiny_model_dir, tiny_data, work)
    proc = run("-m", "d2lora_dist.cli", "sweep", "submit", "--dry-run", "-c", str(experiment))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("#SBATCH --job-name=d2lora-tiny-warmup", "#SBATCH --job-name=d2lora-tiny-cells",
                 "#SBATCH --job-name=d2lora-tiny-report", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", f"--config_file {found['accelerate']} --num_machines 1 --num_processes 8",
                 "--dependency=afterok:<warmup-job-id>"):
        assert line in out, line
    assert out.count(f"--config_file {found['accelerate']} ") == 2  # warm-up and cell array
    assert str(REPO) not in out
    assert not (work / "runs").exists()  # a dry run writes nothing
