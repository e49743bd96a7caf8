"""The local executor: warm-up if needed, then every unfinished cell, each as its own launch.

Each phase runs in a fresh process (`accelerate launch` with the experiment's config, or
one plain Python process) so memory is returned between cells and a crash stops the sweep
with the failing cell named.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from d2lora_dist.config import Experiment
from d2lora_dist.layout import RunLayout
from d2lora_dist.shipped import for_command
from d2lora_dist.strategy import Launch, cell_launch, warmup_launch
from d2lora_dist.sweep.grid import Cell, needs_warmup


class LaunchFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(exp: Experiment, launch: Launch, cli_args: list[str]) -> list[str]:
    """`accelerate launch ... -m d2lora_dist.cli ARGS`, or plain Python for one process."""
    module = ["-m", "d2lora_dist.cli", *cli_args]
    if launch.accelerate_config is None:
        return [sys.executable, *module]
    port = exp.launch.main_process_port or free_port()
    config = for_command(launch.accelerate_config)  # the user's file as given, else the shipped copy
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *launch.accelerate_flags(),
            "--num_processes", str(launch.num_processes), "--main_process_port", str(port), *module]


def run_launch(exp: Experiment, launch: Launch, cli_args: list[str], what: str) -> None:
    command = launch_command(exp, launch, cli_args)
    print(f"[launch] {what}: {launch.describe()}", flush=True)
    print(f"$ {' '.join(command)}", flush=True)
    code = subprocess.call(command, env=os.environ.copy())
    if code != 0:
        raise LaunchFailed(f"{what} failed with exit code {code} (command: {' '.join(command)})")


def run_sweep(exp: Experiment, layout: RunLayout, cells: list[Cell], experiment_file: Path) -> list[str]:
    """Run what is not done; returns the ids of cells that failed (the sweep goes on past them)."""
    config = ["-c", str(experiment_file)]
    if needs_warmup(cells) and not layout.warmup_result.is_file():
        run_launch(exp, warmup_launch(exp), ["warmup", *config], "warm-up")
    todo = [c for c in cells if not layout.cell_result(c.id).is_file()]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells done; running {len(todo)}", flush=True)
    failed = []
    for i, cell in enumerate(todo, 1):
        print(f"=== cell {i}/{len(todo)}: {cell.id}", flush=True)
        try:
            run_launch(exp, cell_launch(exp, [cell.method], packed=False), ["sweep", "cell", *config, "--cell", cell.id],
                       f"cell {cell.id}")
        except LaunchFailed as e:
            print(f"!!! {e}", flush=True)
            failed.append(cell.id)
    return failed
