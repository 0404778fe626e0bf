"""Riding out a database outage in a loop: one log event when it starts, one when it ends.

The node's loops (worker claim loop, scheduler, delivery loop) poll the queue every
fraction of a second. When the database is away (locked past the busy timeout, disk
full, an I/O error) every poll fails the same way; logging each would bury the one line
that matters. An `Outage` per loop logs `database_unavailable` at the first failure and
`database_available` (with the duration and the failed tries) at the first success
after, and spaces the tries out: first_wait, doubling, at most max_wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from dicom_node.errors import QueueUnavailable
from dicom_node.log import get_logger

log = get_logger("dicom_node.queue")

T = TypeVar("T")


class Outage:
    """One loop's view of the job database: available, or away since when. Thread-safe."""

    def __init__(self, component: str, *, first_wait: float = 0.5, max_wait: float = 10.0, logger=log):
        self.component = component
        self.first_wait = first_wait
        self.max_wait = max_wait
        self._log = logger
        self._lock = threading.Lock()
        self._since: float | None = None  # time.monotonic() of the first failure
        self._failures = 0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, error: QueueUnavailable) -> float:
        """Note a failed call; returns how long to wait before the next try."""
        with self._lock:
            self._failures += 1
            if self._since is None:
                self._since = time.monotonic()
                self._log.error(
                    "database_unavailable", component=self.component, error=str(error), kind=error.kind
                )
            return min(self.first_wait * 2 ** min(self._failures - 1, 20), self.max_wait)

    def ok(self) -> None:
        """Note a successful call; ends the outage (logged) if there was one."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._since is None:
                return
            self._log.warning(
                "database_available", component=self.component, failed_tries=self._failures,
                outage_seconds=round(time.monotonic() - self._since, 1),
            )
            self._since, self._failures = None, 0

    def call(self, operation: Callable[[], T], *, stop) -> T:
        """`operation()`, tried again after each QueueUnavailable until it succeeds.

        `stop` (a threading.Event or the worker pool's StopFlag) ends the waiting: the
        last QueueUnavailable is raised then.
        """
        while True:
            try:
                result = operation()
            except QueueUnavailable as error:
                if stop.wait(self.failed(error)):
                    raise
                continue
            self.ok()
            return result
