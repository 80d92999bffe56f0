"""Retry policy: which failures are retried, and after how long."""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 0
    min_backoff: float = 1.0
    max_backoff: float = 300.0
    # None: any Exception the task raises, and time limits. Otherwise only these types
    # (list TimeLimitExceeded here to retry time limits too).
    retry_on: tuple[type[BaseException], ...] | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 0 < self.min_backoff <= self.max_backoff:
            raise ValueError("backoff needs 0 < min_backoff <= max_backoff")

    def should_retry(self, exc: BaseException, retries_done: int) -> bool:
        if retries_done >= self.max_retries:
            return False
        if self.retry_on is None:
            from magne.pool import TimeLimitExceeded

            return isinstance(exc, Exception | TimeLimitExceeded)
        return isinstance(exc, self.retry_on)

    def backoff(self, retries_done: int) -> float:
        """Exponential with equal jitter: between half and all of min * 2^n, capped."""
        ceiling = min(self.max_backoff, self.min_backoff * 2 ** retries_done)
        return ceiling / 2 + random.uniform(0, ceiling / 2)
