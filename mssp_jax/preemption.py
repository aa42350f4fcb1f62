"""Stop requests: SIGTERM (preemption, `kill`, schedulers) and SIGINT (Ctrl-C) during training.

The loop asks `StopSignals.reached(step)` after every step; when it is True the loop saves a
checkpoint at that step and exits with `train.INTERRUPTED`, and the same command resumes there.

* One process: Python handlers record the signal; the loop stops after the step in progress.
* Several processes (`jax.distributed`): a signal may reach only some of them, yet every process
  must save the same step (orbax saves collectively). JAX's preemption service, started by
  `jax.distributed.initialize`, catches SIGTERM itself, tells the other processes, and they agree
  on a step (the largest step any of them has reached, plus one);
  `multihost_utils.reached_preemption_sync_point(step)` is True at that step on every process.
  SIGINT is forwarded to the service as SIGTERM.

A second signal of the same kind acts as it would without us (SIGINT raises KeyboardInterrupt,
SIGTERM on one process terminates it), for when a step hangs.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context that turns SIGTERM / SIGINT into a request to stop at an agreed step."""

    def __init__(self):
        self.received: signal.Signals | None = None  # the first signal this process got
        self._synced = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; nothing to catch here
        for sig in (signal.SIGINT,) if self._synced else SIGNALS:  # SIGTERM: JAX's service
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.received = self.received or sig
        signal.signal(sig, self._previous.pop(sig))  # a second one acts as without us
        if self._synced:
            signal.raise_signal(signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (call once per step, every process, same steps)."""
        if self._synced:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def describe(self) -> str:
        """Which signal stopped the run, as seen by this process."""
        if self.received is not None:
            return self.received.name
        return "SIGTERM (preemption notice to this or another process)"
