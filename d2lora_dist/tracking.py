"""Weights & Biases: one run per phase (warm-up, cell, eval), grouped by experiment.

Offline by default: without credentials the runs are written into the run directory
(`runs/<experiment>/wandb/offline-run-*`) and uploaded later with `wandb sync`.
Only the global main process talks to W&B; every other rank gets `None` back, and every
function here accepts `None` as "no tracking" so callers need no rank checks of their own.

Training code wiring (HF/TRL trainers):
  - `report_to=["wandb"]` and `run_name=<the name given to start_run>`: the trainer's
    WandbCallback reuses the run `start_run` opened (it only calls `wandb.init` when
    `wandb.run` is None) and logs loss, learning_rate, grad_norm and the DPO/ORPO
    rewards/margins/accuracies under `train/`.
  - `include_num_input_tokens_seen="non_padding"` (or "all") so `ThroughputCallback`
    can report tokens per second; it stops with an error when the setting is "no".
  - `add_throughput_callback(trainer)`: puts `ThroughputCallback` before the reporting
    callbacks, so its values reach W&B in the same `on_log` call.
"""

from __future__ import annotations

import functools
import hashlib
import netrc
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from d2lora_dist.config import Experiment, TrackingConfig
from d2lora_dist.errors import InputError
from d2lora_dist.layout import RunLayout

if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback

Mode = Literal["online", "offline", "disabled"]
JobType = Literal["warmup", "adapt", "eval"]
ADAPTER_TYPE = "lora-adapter"
REDACTED = "<redacted>"
_ENV_MODES: dict[str, Mode] = {"online": "online", "run": "online", "offline": "offline",
                               "dryrun": "offline", "disabled": "disabled"}
# Config keys whose values are credentials (api_key, hf_token, hub_token, secret, password).
_SECRET_KEY = re.compile(r"(?:^|[_-])(?:api[_-]?key|token|secret|password|passwd)$", re.IGNORECASE)
_DEFAULT_HOST = "https://api.wandb.ai"


# ---- mode and credentials -------------------------------------------------------------

def resolve_mode(cfg: TrackingConfig) -> Mode:
    """WANDB_MODE wins; `auto` = online when credentials exist, else offline."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _ENV_MODES:
            raise InputError(f"WANDB_MODE={env!r} is not one of {sorted(_ENV_MODES)}; unset it or pick one")
        return _ENV_MODES[env]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if _api_key() else "offline"


def _api_key() -> str | None:
    """The API key wandb would use: WANDB_API_KEY, else the netrc entry for the W&B host."""
    if key := os.environ.get("WANDB_API_KEY", "").strip():
        return key
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_HOST).netloc
    try:
        creds = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return creds[2] if creds and creds[2] else None


def scrub(value: Any, secrets: tuple[str, ...] | None = None) -> Any:
    """Copy of plain data with secret-looking keys and any occurrence of the API key redacted."""
    if secrets is None:
        secrets = tuple(s for s in (_api_key(),) if s)
    if isinstance(value, Mapping):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and value[k] else scrub(v, secrets)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
    return value


# ---- names and ids -------------------------------------------------------------------

def _slug(text: str, allowed: str = r"A-Za-z0-9_.-") -> str:
    return re.sub(rf"[^{allowed}]+", "-", text).strip("-.") or "x"


def run_id(experiment: str, name: str) -> str:
    """Stable W&B run id for (experiment, run name): a requeued cell resumes the same run."""
    digest = hashlib.sha256(f"{experiment}\0{name}".encode()).hexdigest()[:10]
    return f"{_slug(f'{experiment}-{name}', r'A-Za-z0-9_-')[:53]}-{digest}"


def artifact_name(experiment: str, what: str) -> str:
    """Valid artifact name (letters, digits, `-_.`, at most 128) for `warmup` or a cell id."""
    return _slug(f"{experiment}-{what}")[:128]


def _check_artifact_name(name: str) -> None:
    if not name or len(name) > 128 or _slug(name) != name:
        raise ValueError(f"artifact name {name!r} is not valid (letters, digits, '-', '_', '.'; at most 128); "
                         f"build it with artifact_name(experiment, 'warmup' | cell_id)")


def _sha_alias(sha256: str) -> str:
    return f"sha256-{sha256[:16]}"


def project_and_entity(cfg: TrackingConfig) -> tuple[str, str | None]:
    return (os.environ.get("WANDB_PROJECT") or cfg.project,
            os.environ.get("WANDB_ENTITY") or cfg.entity)


# ---- runs -----------------------------------------------------------------------------

def start_run(exp: Experiment, layout: RunLayout, job_type: JobType, name: str,
              config: dict[str, Any], tags: list[str]) -> Any | None:
    """Open (or resume) the W&B run of one phase on the main process; None elsewhere or disabled.

    Runs are written below `layout.wandb_dir` (wandb adds the `wandb/` part to `dir`, so
    `dir` is the run directory itself). The run config is the resolved experiment plus
    this run's parameters under `cell`, with secrets redacted.
    """
    from d2lora_dist.distributed import is_main_process  # the one rank door; imports torch

    if not is_main_process():
        return None
    mode = resolve_mode(exp.tracking)
    if mode == "disabled":
        return None
    import wandb

    layout.wandb_dir.mkdir(parents=True, exist_ok=True)
    project, entity = project_and_entity(exp.tracking)
    run_config = scrub({"experiment": exp.to_dict(), "cell": config})
    return wandb.init(
        project=project, entity=entity, group=exp.name, job_type=job_type, name=name,
        id=run_id(exp.name, name), resume="allow", dir=str(layout.wandb_dir.parent),
        config=run_config, tags=list(tags), mode=mode, reinit="finish_previous",
    )


def finish_run(run: Any | None, summary: Mapping[str, Any], exit_code: int = 0) -> None:
    """Write metrics into the summary (nested dicts flattened to `a/b`) and finish the run.

    Evaluation runs pass `{"eval": result["metrics"]}`: the W&B report reads
    `eval/<suite>/<metric>` from their summaries.
    """
    if run is None:
        return
    run.summary.update(flatten(scrub(dict(summary))))
    run.finish(exit_code=exit_code)


def finish_open_run(exit_code: int) -> None:
    """Finish a run a failed phase left open (a cell worker goes on in the same process; a process of
    its own would have ended it with its exit code). No-op when none is open or W&B was never used."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=exit_code)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


# ---- adapter artifacts ----------------------------------------------------------------

def log_adapter_artifact(run: Any | None, adapter_dir: Path, name: str, manifest: Mapping[str, Any]) -> Any:
    """Log the adapter directory as a `lora-adapter` artifact; metadata carries the manifest.

    Aliases: `latest` and `sha256-<first 16 hex>`, so a cell can pin the exact warm-up
    adapter it trained from. Files are referenced in place (policy immutable): the
    adapter directory is write-once, so nothing is copied into wandb's staging area.
    """
    if run is None:
        return None
    import wandb

    sha = manifest.get("adapter_sha256") if isinstance(manifest, Mapping) else None
    if not sha:
        raise ValueError(f"manifest of {adapter_dir} has no 'adapter_sha256'; log only verified adapters")
    _check_artifact_name(name)
    artifact = wandb.Artifact(name=name, type=ADAPTER_TYPE, description=f"LoRA adapter {name} (sha256 {sha})",
                              metadata={"adapter_sha256": sha, "manifest": scrub(dict(manifest))})
    artifact.add_dir(str(adapter_dir), policy="immutable")
    return run.log_artifact(artifact, aliases=["latest", _sha_alias(sha)])


def use_adapter_artifact(run: Any | None, name: str, sha256: str | None = None) -> str | None:
    """Declare the adapter artifact `name` an input of `run` (W&B lineage: warm-up -> cells).

    Online: `run.use_artifact` on `name:sha256-…` (or `name:latest`). wandb cannot declare
    inputs of offline runs (`use_artifact` raises in offline mode, and used-artifact records
    are not uploaded by `wandb sync`), so offline the reference is stored in the run config
    (`inputs.adapter_artifact`, recorded online too) and `link_inputs` declares it after
    `wandb sync` (`d2lora report --wandb-report` runs it when online).
    Returns the reference used, or None without a run.
    """
    if run is None:
        return None
    _check_artifact_name(name)
    ref = f"{name}:{_sha_alias(sha256) if sha256 else 'latest'}"
    run.config.update({"inputs": {"adapter_artifact": ref, "adapter_type": ADAPTER_TYPE}},
                      allow_val_change=True)
    if not run.offline:
        run.use_artifact(ref, type=ADAPTER_TYPE)
    return ref


def link_inputs(exp: Experiment) -> list[str]:
    """After `wandb sync` of offline runs: declare each run's recorded input adapter (online only).

    Returns `run-path <- artifact` lines for what was linked.
    """
    import wandb

    project, entity = project_and_entity(exp.tracking)
    api = wandb.Api()
    path = f"{entity or api.default_entity}/{project}"
    linked = []
    for remote in api.runs(path, filters={"group": exp.name}):
        ref = (remote.config.get("inputs") or {}).get("adapter_artifact")
        if not ref:
            continue
        used = {a.qualified_name for a in remote.used_artifacts()}
        artifact = api.artifact(f"{path}/{ref}", type=ADAPTER_TYPE)
        if artifact.qualified_name not in used:
            remote.use_artifact(artifact)
            linked.append(f"{'/'.join(remote.path)} <- {artifact.qualified_name}")
    return linked


# ---- throughput -----------------------------------------------------------------------

def add_throughput_callback(trainer: Trainer) -> TrainerCallback:
    """Insert `ThroughputCallback` first, so reporting callbacks (W&B) see its values."""
    callback = _throughput_callback_class()()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def __getattr__(name: str) -> Any:  # PEP 562: `ThroughputCallback` without importing torch up front
    if name == "ThroughputCallback":
        return _throughput_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _throughput_callback_class() -> type:
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        """Adds `tokens_per_s` and `step_time_s` (seconds per optimizer step) to each training log.

        Both are measured over the interval since the previous log. Needs
        `include_num_input_tokens_seen` != "no" in the TrainingArguments.
        """

        def __init__(self) -> None:
            self._time = 0.0
            self._step = 0
            self._tokens = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if args.include_num_input_tokens_seen in ("no", False):
                raise ValueError("ThroughputCallback needs TrainingArguments(include_num_input_tokens_seen="
                                 "'non_padding') (or 'all'); it is 'no', so tokens/s cannot be measured")
            self._mark(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
                   **kwargs: Any) -> None:
            steps = state.global_step - self._step
            elapsed = time.perf_counter() - self._time
            if logs is None or steps <= 0 or elapsed <= 0:
                return  # an eval or end-of-training log at the same step
            logs["tokens_per_s"] = (state.num_input_tokens_seen - self._tokens) / elapsed
            logs["step_time_s"] = elapsed / steps
            self._mark(state)

        def _mark(self, state: Any) -> None:
            self._time = time.perf_counter()
            self._step = state.global_step
            self._tokens = state.num_input_tokens_seen

    return ThroughputCallback
