"""The one backoff: exponential with full jitter, capped.

Used for reconnecting the consuming connection, reopening the publishing link,
consuming a cancelled queue again, and restarting a crashed worker process.
"""

from __future__ import annotations

import random


class Backoff:
    """Not thread-safe: each user owns its own (each runs on one thread)."""

    __slots__ = ("base", "cap", "attempt", "jitter")

    def __init__(self, base: float = 0.5, cap: float = 30.0, jitter: bool = True) -> None:
        self.base, self.cap, self.attempt, self.jitter = base, cap, 0, jitter

    def next(self) -> float:
        """The delay before the next attempt; each call counts one more failed attempt."""
        self.attempt += 1
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 32))
        return random.uniform(self.base, ceiling) if self.jitter else ceiling

    def reset(self) -> None:
        self.attempt = 0
