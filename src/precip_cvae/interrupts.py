"""How a training process stops early: on a signal, or on a non-finite loss.

Shared by :mod:`precip_cvae.train` (one process) and :mod:`precip_cvae.distributed`
(the DDP launcher and its ranks), so that neither imports the other for them.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal; the resume state of the last complete epoch is on disk."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class NonFiniteLoss(FloatingPointError):
    """The loss was not finite; the message names the epoch and step."""


class SignalFlag:
    """Install handlers for SIGTERM/SIGUSR1 that set a flag; restore on exit."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        log.warning("received signal %d: stopping at the next step", signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
