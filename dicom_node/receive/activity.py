"""What the SCP did lately, for health and status: counts and recent refusals, in memory.

One `ReceiveActivity` per SCP (``server.activity``), updated by the association threads.
It holds statuses, reasons (our own words, never received values) and times only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

RECENT_REFUSALS_KEPT = 1000


@dataclass(frozen=True)
class Refusal:
    at: float  # time.time()
    status: int  # the DIMSE status sent
    reason: str


class ReceiveActivity:
    """Thread-safe counters of stored and refused C-STOREs, and the latest refusals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stored = 0
        self.refused = 0
        self._recent: deque[Refusal] = deque(maxlen=RECENT_REFUSALS_KEPT)

    def record_stored(self) -> None:
        with self._lock:
            self.stored += 1

    def record_refused(self, status: int, reason: str) -> None:
        with self._lock:
            self.refused += 1
            self._recent.append(Refusal(time.time(), int(status), reason))

    def refusals_since(self, seconds: float) -> list[Refusal]:
        """Refusals of the last `seconds` (at most RECENT_REFUSALS_KEPT), oldest first."""
        cutoff = time.time() - seconds
        with self._lock:
            return [refusal for refusal in self._recent if refusal.at >= cutoff]
