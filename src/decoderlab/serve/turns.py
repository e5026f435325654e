"""Requests take turns on the model, first come first served, behind a bounded queue; and a watch on each client.

The model is not thread-safe and one generation keeps it busy, so one request generates at a time (a FIFO
asyncio lock). At most `max_queue` requests wait behind it: one more is refused at once (429) with a
`Retry-After` estimated from recent turns, and one that has waited `queue_timeout` seconds is refused (503). A
client that leaves while waiting leaves the queue. `ClientWatch` notices a client leaving (ASGI's
`http.disconnect`), which the generation loop checks between two decode steps. `close` (shutdown) refuses new
turns and tells running generations to stop at their next step.
"""

from __future__ import annotations

import asyncio
import math
import time

from starlette.types import Receive

from .errors import APIError


class ClientLeft(Exception):
    """The client disconnected: nobody is listening for the answer."""


class ClientWatch:
    """Watches one request's ASGI receive channel (after its body was read) for the client leaving."""

    def __init__(self, receive: Receive) -> None:
        self.left = asyncio.Event()
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left.set()

    def stop(self) -> None:
        self._task.cancel()


class Turns:
    def __init__(self, max_queue: int, queue_timeout: float | None) -> None:
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.waiting = 0
        self.closed = False
        self._lock = asyncio.Lock()
        self._turn_seconds = 1.0  # a moving average of how long a turn lasts, for Retry-After

    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, min(60, math.ceil(self._turn_seconds))))}

    def close(self) -> None:
        """Shutdown: refuse new turns; generations see `closed` and stop at their next step. A plain flag, so a
        signal handler may call it."""
        self.closed = True

    def _shutting_down(self) -> APIError:
        return APIError(503, "the server is shutting down", "server_error", code="shutting_down")

    async def acquire(self, watch: ClientWatch) -> Turn:
        """Wait for the model; raises APIError (queue full, waited too long, shutting down) or ClientLeft."""
        if self.closed:
            raise self._shutting_down()
        if self._lock.locked() and self.waiting >= self.max_queue:
            raise APIError(429, f"the server is busy: {self.waiting} request(s) already wait for the model "
                                f"(--max-queue {self.max_queue}); retry later", "rate_limit_error",
                           code="queue_full", headers=self.retry_after())
        self.waiting += 1
        got = asyncio.ensure_future(self._lock.acquire())
        left = asyncio.ensure_future(watch.left.wait())
        try:
            done, _ = await asyncio.wait({got, left}, timeout=self.queue_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(got)
            raise
        finally:
            self.waiting -= 1
            left.cancel()
        if got not in done:
            self._abandon(got)
            if watch.left.is_set():
                raise ClientLeft()
            raise APIError(503, f"waited {self.queue_timeout:g} s for the model (--queue-timeout); retry later",
                           "server_error", code="queue_timeout", headers=self.retry_after())
        if self.closed:
            self._lock.release()
            raise self._shutting_down()
        return Turn(self)

    def _abandon(self, got: asyncio.Future) -> None:
        if got.done() and not got.cancelled() and got.exception() is None:
            self._lock.release()  # acquired just as we gave up
        else:
            got.cancel()  # asyncio.Lock passes the turn on to the next waiter

    def _finished(self, seconds: float) -> None:
        self._turn_seconds = 0.8 * self._turn_seconds + 0.2 * seconds
        self._lock.release()


class Turn:
    """A request's hold on the model; `release` (idempotent) passes it on."""

    def __init__(self, turns: Turns) -> None:
        self._turns, self._start, self._held = turns, time.monotonic(), True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._turns._finished(time.monotonic() - self._start)
