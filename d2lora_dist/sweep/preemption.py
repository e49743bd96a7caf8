"""Preemption: checkpoint at a step boundary when Slurm says time is up, exit, get requeued.

The chain (tested end to end on a real Slurm cluster in tests/test_sweep_slurm_cluster.py):

1. Slurm sends SIGUSR1 to the batch shell `signal_seconds` before the time limit
   (`--signal=B:USR1@N`) or when an operator runs `scancel --batch --signal=USR1 JOB`.
2. The batch shell (slurm/preemption.sh) forwards it to `srun`, which relays it to every
   process of the step. The launcher (`accelerate launch`, torchrun's agent) was started
   with USR1 ignored: accelerate 1.15 forwards only SIGTERM/SIGINT/SIGHUP/SIGQUIT
   (torch.distributed.elastic, TORCHELASTIC_SIGNALS_TO_HANDLE) and would die of USR1's
   default action. The ranks run in their own sessions (torchrun's start_new_session), so
   they are reached by the step-wide signal of proctrack/cgroup or proctrack/linuxproc,
   not by a process-group kill (proctrack/pgid is not supported).
3. In each rank, `PreemptionWatcher` sets a flag; `PreemptionCallback` asks the trainer to
   save a checkpoint and stop at the next optimizer step, once every rank agrees (one
   all-reduce of a scalar per step: ranks that stopped at different steps would deadlock
   in the next collective).
4. Once that checkpoint is saved the callback writes the marker file named by
   $D2LORA_PREEMPT_MARKER; after `trainer.train()` returns, the caller calls
   `exit_if_preempted(watcher)`, which waits for every rank and exits PREEMPTED_EXIT_CODE.
   The marker exists because accelerate/torchrun report any failed rank as exit 1.
5. The batch shell sees the exit code or the marker and runs `scontrol requeue`; the
   requeued run finds the checkpoint and resumes (Slurm makes it eligible about 2 minutes
   after the requeue).

Usage in a phase entry:

    watcher = PreemptionWatcher()              # installs the SIGUSR1 handler
    trainer.add_callback(PreemptionCallback(watcher))
    trainer.train(resume_from_checkpoint=last_checkpoint_or_none)
    exit_if_preempted(watcher)   # before destroying the process group

The callback also writes the marker once the checkpoint is saved, so a caller that exits
its own way (e.g. returning PREEMPTED_EXIT_CODE from the CLI) is still requeued.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

# EX_TEMPFAIL from sysexits.h: "try again later". Neither accelerate, torchrun nor Python
# exit with it on their own (they use 1, 2 and 128+signal).
PREEMPTED_EXIT_CODE = 75
# Set by the batch script to a per-job path under <run_dir>/slurm/preempted/.
MARKER_ENV = "D2LORA_PREEMPT_MARKER"


class PreemptionWatcher:
    """Turns SIGUSR1 into a flag the training loop polls; chains any previous handler."""

    def __init__(self, signum: int = signal.SIGUSR1, install: bool = True):
        self.signum = signum
        self._preempted = False
        self._previous: Any = None
        self.installed = False
        if install:  # the watcher exists to catch the signal: catching it is the default
            self.install()

    def install(self) -> PreemptionWatcher:
        if self.installed:
            return self
        # Python only lets the main thread set handlers; elsewhere we cannot see the signal.
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionWatcher: not in the main thread, SIGUSR1 is not watched; "
                          "a preempted job will run into its time limit", stacklevel=2)
            return self
        self._previous = signal.signal(self.signum, self._handle)
        self.installed = True
        return self

    def uninstall(self) -> None:
        if self.installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self.installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._preempted = True
        # Chain a Python-level previous handler (not SIG_DFL: USR1's default kills us).
        if callable(self._previous):
            self._previous(signum, frame)

    def request(self) -> None:
        """Mark as preempted without a signal (another rank saw it, or a test)."""
        self._preempted = True

    @property
    def preempted(self) -> bool:
        return self._preempted

    def __enter__(self) -> PreemptionWatcher:
        return self.install()  # a no-op when the constructor installed it

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def exit_if_preempted(watcher: PreemptionWatcher) -> None:
    """After train(): write the marker and exit PREEMPTED_EXIT_CODE when preempted."""
    if not watcher.preempted:
        return
    write_marker()
    _barrier()
    print(f"[d2lora] preempted: checkpoint saved, exiting {PREEMPTED_EXIT_CODE} for requeue",
          file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE)


def write_marker() -> None:
    """Tell the batch shell this step was preempted (file named by $D2LORA_PREEMPT_MARKER).

    Every rank writes the same file, so the copy on the batch host (where rank 0 runs) is
    seen even on shared storage with attribute caching; outside Slurm there is no marker.
    """
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"preempted pid {os.getpid()} rank {os.environ.get('RANK', '0')}\n")


def _barrier() -> None:
    # A rank that exits first makes torchrun kill the others: wait until all are done writing.
    # Without torch imported there is no process group (and no reason to pay for the import).
    if "torch" in sys.modules:
        from d2lora_dist import distributed

        distributed.barrier()


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        """Save a checkpoint and stop at the first step end after the watcher fired."""

        def __init__(self, watcher: PreemptionWatcher):
            self.watcher = watcher
            self.stopped_at_step: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            from d2lora_dist.distributed import any_rank

            if not any_rank(self.watcher.preempted):
                return control
            self.watcher.request()  # so every rank exits as preempted, not only the signalled ones
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the grace period is for the checkpoint, not an eval
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            # The checkpoint is on disk: from here a requeue resumes, however the process
            # exits (accelerate reports a rank's 75 as 1, so the shell also reads the marker).
            if self.stopped_at_step is not None:
                write_marker()
            return control

    return PreemptionCallback


def __getattr__(name: str) -> Any:
    # PEP 562: `sweep submit` and `sweep status` import this module for the exit code;
    # transformers (and torch, about 6 s) load only when the callback is used.
    if name == "PreemptionCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
