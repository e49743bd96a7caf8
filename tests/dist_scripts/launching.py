"""Helpers the multi-rank tests share: free ports, the environment, `accelerate launch` lines.

Every launch gets its own free port; ranks run single-threaded (the CI machine has 2 cores)
with a short process-group timeout, so a wedged test fails within minutes instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO / "launch" / "accelerate"
DS_CONFIGS = REPO / "ds_configs"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
CLI = ["-m", "d2lora_dist.cli"]
PHASES_SCRIPT = "tests/dist_scripts/phases.py"
PG_TIMEOUT_S = 60


def experiment_dict(tiny_model_dir: Path, tiny_data: dict, root: Path) -> dict:
    """conftest's tiny experiment (one definition) for module-scoped runs; 5 eval items per
    suite, so 2 ranks get uneven shards (3 + 2)."""
    from tests.conftest import tiny_experiment_dict

    data = tiny_experiment_dict(tiny_model_dir, tiny_data, root)
    data["suites"]["gsm8k"]["limit"] = 5
    data["suites"]["arc_easy"]["limit"] = 5
    return two_rank_batches(data)


def two_rank_batches(data: dict) -> dict:
    """Global batch 4: 2 per rank on 2 ranks, 2 x 2 accumulation in one process (same steps)."""
    for settings in [data["warmup"]["train"], *data["methods"].values()]:
        settings["global_batch_size"] = 4
    return data


def bf16_cpu_deepspeed_config(path: Path, shipped: str = "zero3_cpu_test.json") -> Path:
    """A shipped DeepSpeed config with bf16 on, for a launch with D2LORA_TEST_CPU_BF16=1
    (distributed.cpu_bf16_test_launch): DeepSpeed trains bf16 parameters against fp32 masters."""
    ds = json.loads((DS_CONFIGS / shipped).read_text())
    ds["bf16"] = {"enabled": True}
    path.write_text(json.dumps(ds, indent=2))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "D2LORA_PG_TIMEOUT_S": str(PG_TIMEOUT_S),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_CPU", "WORLD_SIZE",
                "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        out.pop(key, None)  # a launch decides these, never the test process
    out.update(extra)
    return out


def launch(config: str, target: list[str], port: int | None = None, extra: list[str] | None = None) -> list[str]:
    """`accelerate launch --config_file launch/accelerate/CONFIG ...` for a module (-m ...) or a script."""
    return [*LAUNCH, "--config_file", str(ACCELERATE_CONFIGS / config),
            "--main_process_port", str(port or free_port()), *(extra or []), *target]


def machine(rank: int, port: int, target: list[str]) -> list[str]:
    """One of two accelerate "machines" on localhost with one rank each (multinode_zero3.yaml
    with the CPU DeepSpeed config), as Slurm runs one launcher per node."""
    return launch("multinode_zero3.yaml", target, port,
                  ["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                   "--main_process_ip", "127.0.0.1",
                   "--deepspeed_config_file", str(DS_CONFIGS / "zero3_cpu_test.json")])


@dataclass
class Result:
    code: int
    log: str
    seconds: float

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


def run(command: list[str], log_file: Path, timeout: float = 300, **env_extra: str) -> Result:
    """Run a launch to completion (own process group, killed whole on timeout), log to a file."""
    start = time.monotonic()
    with log_file.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env(**env_extra), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -9
    return Result(code, log_file.read_text(), time.monotonic() - start)


def run_many(commands: list[list[str]], log_dir: Path, timeout: float = 300, **env_extra: str) -> list[Result]:
    """Start several launches at once (e.g. one per "machine"); each Result's seconds is when
    that launch exited, counted from the common start."""
    start = time.monotonic()
    procs, files, ended = [], [], {}
    for i, command in enumerate(commands):
        files.append((log_dir / f"launch-{i}.log").open("w"))
        procs.append(subprocess.Popen(command, cwd=REPO, env=env(**env_extra), stdout=files[-1],
                                      stderr=subprocess.STDOUT, start_new_session=True))
    while len(ended) < len(procs) and time.monotonic() - start < timeout:
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = (proc.returncode, time.monotonic() - start)
        time.sleep(0.2)
    results = []
    for i, proc in enumerate(procs):
        if i not in ended:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            ended[i] = (-9, time.monotonic() - start)
        files[i].close()
        results.append(Result(ended[i][0], (log_dir / f"launch-{i}.log").read_text(), ended[i][1]))
    return results


def assert_same_predictions(got: list[dict], expected: list[dict], what: str, rtol: float = 1e-5,
                            atol: float = 1e-4) -> None:
    """Item by item: the same ids, completions, choices and correctness; log-likelihoods equal up to
    float reduction order (ranks batch other items together, so padding and sums differ in the last bits).

    A log-likelihood is a float32 sum of log-softmax values over logits up to ~15: another batch shape
    moves it by ~1e-6 per token (measured up to 3.7e-5 on |loglik| 300, under 2% of rtol 1e-5 + atol
    1e-4, on avx2 and ATEN_CPU_CAPABILITY=default; tests/test_evaluate_loglik.py); an absolute 1e-5
    alone was within 4x of the 2.9e-6 measured on short choices. The choices and completions compared
    exactly are argmaxes, which rounding moves only at a near tie, far rarer than these gaps."""
    import math

    assert [r["id"] for r in got] == [r["id"] for r in expected], what
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys(), (what, a["id"])
        for key in a:
            x, y = a[key], b[key]
            if isinstance(x, list) and x and isinstance(x[0], float):
                assert all(math.isclose(u, v, rel_tol=rtol, abs_tol=atol) for u, v in zip(x, y, strict=True)), (
                    what, a["id"], key)
            elif isinstance(x, float):
                assert math.isclose(x, y, rel_tol=rtol, abs_tol=atol), (what, a["id"], key)
            else:
                assert x == y, (what, a["id"], key)
