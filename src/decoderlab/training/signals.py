"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM finish the optimizer step under way, then the run saves a
snapshot and stops with `TrainingInterrupted` (exit code 130 for SIGINT, 143 for SIGTERM at the command line).

The handlers only set a flag: the loop checks it between steps, so a snapshot never holds half-updated weights
(e.g. AdamW stepped, Muon not). Further signals while the run finishes its step and saves are acknowledged and
otherwise ignored; SIGKILL stays safe, since the previous snapshot is complete until the new one's manifest lands.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after finishing a step and saving a snapshot to resume from."""

    def __init__(self, signum: int, step: int, snapshot: str | None) -> None:
        self.signum, self.step, self.snapshot = signum, step, snapshot
        super().__init__(f"{signal.Signals(signum).name} at step {step}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class StopRequests:
    """While entered (in the main thread), SIGINT and SIGTERM set `signum` instead of interrupting."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _say(self, text: str) -> None:
        if self.announce:
            # os.write, not print: a handler can run inside a print, and buffered streams are not reentrant.
            try:
                os.write(2, text.encode())
            except OSError:
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            self._say(f"\n{name}: finishing the current step, then saving a snapshot to resume from\n")
        else:
            self._say(f"\n{name}: already stopping; the snapshot is being written (kill -9 is safe: the previous "
                      "snapshot stays valid until the new one is complete)\n")

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
