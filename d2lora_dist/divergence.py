"""Stop a phase the moment its loss or gradient norm stops being a number.

A NaN gradient does not stop the Trainer: the optimizer writes NaN into the adapter, later losses
log as 0, and evaluation scores an adapter that generates nothing. Stopping at the first
non-finite log names the step; `adapters.save_adapter` refuses non-finite values as a second line.
"""

from __future__ import annotations

import math
from typing import Any

WATCHED = ("loss", "grad_norm")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


def stop_on_non_finite(phase_name: str) -> Any:
    """A TrainerCallback that raises TrainingDiverged at the first non-finite loss or grad_norm log."""
    from transformers import TrainerCallback  # late: transformers is slow to import

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            bad = {key: logs[key] for key in WATCHED if key in (logs or {}) and not _finite(logs[key])}
            if bad:
                found = ", ".join(f"{key} = {value}" for key, value in bad.items())
                raise TrainingDiverged(
                    f"[{phase_name}] training diverged: {found} at optimizer step {state.global_step}; no adapter "
                    "is saved. Lower the learning rate, or check the rows of this step (an empty response after "
                    "max_length truncation, a response identical to the prompt)")

    return StopOnNonFinite()


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number at all: nothing to judge
