"""Hub access decided once per process: an unreachable hub makes every lookup cache-only, so a machine
without hub access gets its problems within seconds, each once, instead of minutes of retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2lora_dist import hub

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once, no network needed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh_probe(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # restored afterwards, also when go_offline set it
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules and hasattr(sys.modules[module], name):  # what go_offline may change
            monkeypatch.setattr(sys.modules[module], name, getattr(sys.modules[module], name))
    hub.reset()
    yield
    hub.reset()


def test_the_probe_tells_a_listening_endpoint_from_a_closed_one(fresh_probe, monkeypatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.offline() is False
        assert "HF_HUB_OFFLINE" not in os.environ
    hub.reset()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert hub.offline() is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # children and later imports stay offline too
    assert hub.why_offline() == "the hub is not reachable from here"


def test_hf_hub_offline_is_honoured_without_probing(fresh_probe, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_reachable", lambda *a: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert hub.offline() is True
    assert hub.why_offline() == "downloads are off (HF_HUB_OFFLINE)"


def test_sweep_plan_without_hub_access_fails_within_seconds_naming_each_problem_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                              "HF_DATASETS_OFFLINE", "HF_HUB_CACHE",
                                                              "HF_DATASETS_CACHE")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf"),
            "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "d2lora_dist.cli", "sweep", "plan", "-c",
                           str(REPO / "launch/experiments/paper_math.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert took < 30, f"{took:.0f} s before the error"
    err = done.stderr
    assert "Retry" not in err
    assert "is not reachable from here" in err
    for name in ("xinlai/Math-Step-DPO-10K", "openai/gsm8k", "allenai/ai2_arc", "meta-llama/Llama-3.1-8B-Instruct"):
        assert err.count(name) == 1, (name, err)
    assert err.count("set `data_files` to local copies") == 3
    assert str(tmp_path / "hf") in err  # the cache it looked in
    assert not (tmp_path / "runs").exists()
