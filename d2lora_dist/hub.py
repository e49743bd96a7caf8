"""Whether this process may reach the Hugging Face hub, decided once, before any hub lookup.

Every lookup that may touch the hub (a dataset without `data_files`, a model given by hub id)
asks `offline()` first. HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: offline, nothing probed.
Otherwise one short connection attempt to the hub's host (HF_ENDPOINT, default huggingface.co)
decides, and the answer holds for the rest of the process. Why: without it, huggingface_hub
retries each request five times with back-off, so a login node without hub access printed ~40
retry warnings and waited about two minutes before the first clear message. Offline, every lookup
runs as HF_HUB_OFFLINE=1 would make it: from the local cache, failing at once when a file is not
there.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_decided: bool | None = None  # this process's answer, once probed


def offline_by_setting() -> bool:
    """Downloads switched off by the user (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), read when asked."""
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def offline() -> bool:
    """True when hub lookups must stay in the local cache: set so, or the hub did not answer the probe."""
    global _decided
    if _decided:  # probed offline (HF_HUB_OFFLINE is set from then on, by go_offline)
        return True
    if offline_by_setting():
        return True
    if _decided is None:
        _decided = not _reachable(endpoint(), PROBE_TIMEOUT_S)
        if _decided and os.environ.get("RANK", "0") == "0":  # said once per launch, not by every rank
            print(f"d2lora: the Hugging Face hub ({endpoint()}) is not reachable from here: hub datasets and "
                  "models are looked up in the local cache only (as with HF_HUB_OFFLINE=1)", file=sys.stderr,
                  flush=True)
        if _decided:
            go_offline()
    return _decided


def why_offline() -> str:
    """Why lookups stay in the cache, for messages that say how to fix it."""
    return "the hub is not reachable from here" if _decided else "downloads are off (HF_HUB_OFFLINE)"


def go_offline() -> None:
    """HF_HUB_OFFLINE=1 for this process and its children.

    Workaround: huggingface_hub and datasets read HF_HUB_OFFLINE once, when they are imported
    (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE), so setting the
    variable later reaches only modules not imported yet and subprocesses; the copies already read
    are set too. Goes away if huggingface_hub offers a runtime switch for offline mode.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            setattr(sys.modules[module], name, True)


def _reachable(url: str, timeout: float) -> bool:
    """Can a TCP connection to the endpoint's host be opened within `timeout` seconds? Name resolution
    has no timeout of its own, so the attempt runs in a thread that is given up on after `timeout`."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def reset() -> None:
    """Forget the probe's answer (tests; a long-lived process whose network changed)."""
    global _decided
    _decided = None
