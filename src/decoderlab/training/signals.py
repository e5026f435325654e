"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM finish the optimizer step under way, then the run saves a
snapshot and stops with `TrainingInterrupted` (exit code 130 for SIGINT, 143 for SIGTERM at the command line).

The handlers only set a flag: the loop checks it between steps, so a snapshot never holds half-updated weights
(e.g. AdamW stepped, Muon not). A second signal while the run finishes its step and saves is acknowledged and
otherwise ignored; a third quits at once without saving. Neither that nor SIGKILL can damage a snapshot: one is
complete only once its manifest, written last, is there.
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
        self.count = 0
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
        self.count += 1
        if self.signum is None:
            self.signum = signum
            self._say(f"\n{name}: finishing the current step, then saving a snapshot to resume from\n")
        elif self.count == 2:
            self._say(f"\n{name}: already stopping, the snapshot is being written; a third signal quits at once "
                      "without it (safe: the previous snapshot stays valid)\n")
        else:
            # A run stuck somewhere (a hung collective, a slow disk) can still be left. Nothing is written after this,
            # and a half-written snapshot has no manifest, so no snapshot can be damaged.
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
