"""Periodic tasks: `@task(every=30)` and `@task(cron="*/5 * * * *")`, and the due times they make.

A schedule is a pure function of the wall clock: its due times are the same in every process (an
`every` schedule is aligned to the Unix epoch, a cron schedule is the cron's own), so whichever worker
leads (magne.leader) computes the same due times, and a tick's message id, `<task>@<due, ISO 8601 UTC>`,
names one due time fleet-wide: a duplicate (a network partition can make one, docs/schedules.md) is
detectable by id. Cron expressions are parsed by `cronsim` (standard 5 fields, plus the usual
@hourly/@daily...), in the schedule's time zone (UTC unless `timezone=` names another).

Nothing here touches the broker: magne.leader publishes the ticks, magne.testing fires them on its
simulated clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

UTC = dt.UTC
MIN_EVERY = 0.1  # seconds: below this the leader's publishing, not the schedule, sets the pace
MAX_EVERY = 366 * 86400.0  # seconds: a due time must stay a datetime (every=1e12 crashed every leader's turn)


class ScheduleError(ValueError):
    """A schedule that can never fire (registry turns it into a RegistryError at import)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When one task runs by itself. `name` is the task's name (one schedule per task). Immutable, shared."""

    name: str
    every: float | None = None
    cron: str | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ScheduleError("give either every= (seconds) or cron= (a 5-field cron expression), not both")
        if self.every is not None:
            if isinstance(self.every, bool) or not isinstance(self.every, int | float) or not math.isfinite(self.every) \
                    or not MIN_EVERY <= self.every <= MAX_EVERY:
                raise ScheduleError(f"every= must be a number of seconds from {MIN_EVERY} to {MAX_EVERY:.0f} (366 days; "
                                    f"cron= for anything rarer), got {self.every!r}")
        try:
            zone = ZoneInfo(self.timezone) if isinstance(self.timezone, str) else None
        except (ZoneInfoNotFoundError, ValueError):
            zone = None
        if zone is None:
            raise ScheduleError(f"timezone= must be an IANA time zone name such as 'Europe/Paris', got {self.timezone!r}")
        object.__setattr__(self, "_zone", zone)
        if self.cron is not None:
            if not isinstance(self.cron, str):
                raise ScheduleError(f"cron= must be a string, got {type(self.cron).__name__}")
            try:
                CronSim(self.cron, dt.datetime.now(zone))
            except CronSimError as exc:
                raise ScheduleError(f"cron={self.cron!r} is not a valid cron expression: {exc}") from None

    @property
    def zone(self) -> ZoneInfo:
        return self._zone  # type: ignore[attr-defined, no-any-return]

    def describe(self) -> str:
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron!r}" + ("" if self.timezone == "UTC" else f" ({self.timezone})")

    def next_after(self, when: dt.datetime) -> dt.datetime:
        """The first due time strictly after `when` (an aware datetime), in UTC."""
        if self.every is not None:
            ts = when.timestamp()
            k = math.floor(ts / self.every + 1e-9) + 1
            return dt.datetime.fromtimestamp(round(k * self.every, 6), UTC)
        it = CronSim(self.cron or "", when.astimezone(self.zone))
        return next(it).astimezone(UTC)

    def due_between(self, after: dt.datetime, until: dt.datetime) -> Iterator[dt.datetime]:
        """Due times d with after < d <= until, in order."""
        d = self.next_after(after)
        while d <= until:
            yield d
            d = self.next_after(d)

    def period(self, around: dt.datetime) -> float:
        """Seconds between two due times near `around` (how far back a new leader looks for the last tick)."""
        if self.every is not None:
            return float(self.every)
        a = self.next_after(around)
        return (self.next_after(a) - a).total_seconds()


def tick_id(name: str, due: dt.datetime) -> str:
    """A tick's message id: the schedule (task) name and the due time, ISO 8601 in UTC to the microsecond."""
    return f"{name}@{due.astimezone(UTC).isoformat(timespec='microseconds')}"


def parse_tick_id(mid: str) -> tuple[str, dt.datetime] | None:
    """(name, due) of a tick's message id, or None for anything else (a marker, a foreign message)."""
    name, sep, when = mid.rpartition("@")
    if not sep or not name:
        return None
    try:
        due = dt.datetime.fromisoformat(when)
    except ValueError:
        return None
    return (name, due) if due.tzinfo is not None else None


def schedule_of(name: str, every: float | None, cron: str | None, timezone: str | None) -> Schedule | None:
    """The registry's check: None when the task has no schedule; ScheduleError for a bad one."""
    if timezone is not None and cron is None:
        raise ScheduleError("timezone= needs cron= (an every= schedule does not depend on a time zone)")
    if every is None and cron is None:
        return None
    return Schedule(name, every, cron, timezone or "UTC")
