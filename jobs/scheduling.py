"""Cron expressions, time zones and fire times.

Debian cron semantics, via cronsim (healthchecks' evaluator) on local wall
clock times, with our own mapping of wall clock times to instants:

* day-of-month and day-of-week both restricted: either one matches;
* a wall clock time that occurs twice (DST fall-back) fires once, at its
  first occurrence - unless the minute or hour field is a wildcard
  ("*/15 * * * *", "0 * * * *"), which keeps firing through the repeated hour;
* a wall clock time that does not exist (spring-forward) fires at the
  transition instant for fixed-time expressions, and is skipped by
  wildcard ones (those minutes simply do not happen that day).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


LOOKAHEAD = timedelta(hours=3)


class ScheduleError(ValueError):
    """A cron expression or time zone a user typed is not valid."""


@dataclass(frozen=True)
class Fire:
    at: datetime  # aware, in the job's time zone
    note: str = ""  # e.g. why a DST gap moved it


def expand(expr: str) -> str:
    """Return the 5-field form of `expr` or raise ScheduleError."""
    text = " ".join(expr.split())
    if not text:
        raise ScheduleError("The schedule is empty.")
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            known = ", ".join(ALIASES)
            raise ScheduleError(f"Unknown alias {text!r}; use one of {known}.")
        return ALIASES[text.lower()]
    fields = text.split(" ")
    if len(fields) != 5:
        raise ScheduleError(
            f"A cron expression has 5 fields (minute hour day-of-month month day-of-week); "
            f"{text!r} has {len(fields)}."
        )
    try:
        CronSim(text, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ScheduleError(f"Bad cron expression {text!r}: {exc}.") from None
    return text


def zone(name: str) -> ZoneInfo:
    try:
        if not name or name not in _zone_names():
            raise ZoneInfoNotFoundError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"Unknown time zone {name!r}; use an IANA name such as 'Europe/Berlin' or 'UTC'."
        ) from None


_ZONES: set[str] = set()


def _zone_names() -> set[str]:
    if not _ZONES:
        _ZONES.update(available_timezones())
        _ZONES.add("UTC")
    return _ZONES


def validate(expr: str, tz_name: str) -> None:
    expand(expr)
    zone(tz_name)


def _fixed_time(cron: str) -> bool:
    """True when minute and hour are both restricted: Debian cron's DST fixups apply."""
    minute, hour = cron.split(" ")[:2]
    return not minute.startswith("*") and not hour.startswith("*")


def _exists(moment: datetime, tz: ZoneInfo) -> bool:
    """False for a wall clock time inside a spring-forward gap."""
    return moment.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == moment.replace(tzinfo=None)


def _instants(naive: datetime, tz: ZoneInfo, fixed: bool) -> list[Fire]:
    """The instants a local wall clock time `naive` stands for."""
    first = naive.replace(tzinfo=tz, fold=0)
    second = naive.replace(tzinfo=tz, fold=1)
    if not _exists(first, tz):
        if not fixed:
            return []
        # Fire at the transition instant: the first real minute after the gap.
        moved = first
        while not _exists(moved, tz):
            moved = (moved.replace(tzinfo=None) + timedelta(minutes=1)).replace(tzinfo=tz)
        return [Fire(moved, f"{naive:%H:%M} does not exist that day (DST); fires at {moved:%H:%M}")]
    if first.utcoffset() == second.utcoffset() or fixed:
        return [Fire(first)]
    return [Fire(first), Fire(second, "repeated hour (DST)")]


def iter_fires(expr: str, tz_name: str, after: datetime) -> Iterator[Fire]:
    """Fires strictly after the instant `after`, in order, for as long as asked.

    Walks local wall clock times with cronsim and maps each to its instants.
    Around a fall-back the wall clock runs backwards, so instants can come
    out of order by up to the DST shift: a heap holds them until the walk is
    three hours past.
    """
    cron = expand(expr)
    tz = zone(tz_name)
    fixed = _fixed_time(cron)
    start = after.astimezone(tz).replace(tzinfo=None, microsecond=0)
    if _transition_near(after, tz):
        start -= LOOKAHEAD
    heap: list[tuple[datetime, int, Fire]] = []
    last: datetime | None = None
    order = itertools.count()
    skipped = 0  # wildcard fire times lost in a spring-forward gap
    for naive in CronSim(cron, start):
        fires = _instants(naive, tz, fixed)
        if not fires:
            if naive.replace(tzinfo=tz).astimezone(UTC) > after:
                skipped += 1
            continue
        if skipped:
            times = "time" if skipped == 1 else "times"
            note = f"{skipped} fire {times} inside the DST gap before this were skipped"
            fires[0] = Fire(fires[0].at, note)
            skipped = 0
        for fire in fires:
            # Compare in UTC: aware datetimes sharing a tzinfo compare by
            # wall clock and ignore `fold`, which would merge a repeated hour.
            instant = fire.at.astimezone(UTC)
            if instant > after:
                heapq.heappush(heap, (instant, next(order), fire))
        # Hold fires back only near a DST change; elsewhere they come in order.
        moment = naive.replace(tzinfo=tz).astimezone(UTC)
        horizon = moment - LOOKAHEAD if _transition_near(moment, tz) else moment
        while heap and heap[0][0] <= horizon:
            instant, _n, fire = heapq.heappop(heap)
            if instant != last:  # two gap times can move to one instant
                last = instant
                yield fire
    while heap:
        instant, _n, fire = heapq.heappop(heap)
        if instant != last:
            last = instant
            yield fire


def _transition_near(moment: datetime, tz: ZoneInfo) -> bool:
    """Does the zone's UTC offset change within four hours of `moment`?"""
    window = timedelta(hours=4)
    return (moment - window).astimezone(tz).utcoffset() != (moment + window).astimezone(
        tz
    ).utcoffset()


def previous_fires(expr: str, tz_name: str, before: datetime, count: int = 1) -> list[datetime]:
    """The latest `count` fires at or before the instant `before`, newest first.

    Remembered per schedule as a span: the answer is the same for every
    `before` from its newest fire up to (not including) the fire after it.
    So judging staleness of 1,000 jobs on every page view walks a cron
    expression again only once one of its fires has passed, not per request
    (`before` is `now`, different every time).
    """
    key = (expr, tz_name, count)
    moment = before.astimezone(UTC)
    spans = _SPANS.get(key, ())
    for span in spans:
        if span.start <= moment < span.end:
            return list(span.fires)
    fires = _previous_fires(expr, tz_name, before, count)
    if len(fires) == count:
        after = next_fire_after(expr, tz_name, fires[0])
        span = _Span(fires[0].astimezone(UTC), after.astimezone(UTC) if after else None, fires)
        # Only a span that holds `before` is kept, whatever the DST walk did.
        if span.end is not None and span.start <= moment < span.end:
            _remember(key, span, spans)
    return list(fires)


@dataclass(frozen=True)
class _Span:
    start: datetime  # UTC: the newest of `fires`
    end: datetime | None  # UTC: the fire after it
    fires: tuple[datetime, ...]


SPANS_PER_SCHEDULE = 4  # `now` and `now - grace` can fall in different spans
SPANS_MAX = 8192  # schedules remembered
_SPANS: dict[tuple[str, str, int], tuple[_Span, ...]] = {}
_SPANS_LOCK = threading.Lock()


def _remember(key: tuple[str, str, int], span: _Span, spans: tuple[_Span, ...]) -> None:
    # Readers take no lock: they see the old tuple or the new one, both right.
    with _SPANS_LOCK:
        if key not in _SPANS and len(_SPANS) >= SPANS_MAX:
            del _SPANS[next(iter(_SPANS))]  # the schedule remembered first
        _SPANS[key] = (span, *spans[: SPANS_PER_SCHEDULE - 1])


def _previous_fires(expr: str, tz_name: str, before: datetime, count: int) -> tuple[datetime, ...]:
    """previous_fires by walking the cron expression backwards from `before`."""
    cron = expand(expr)
    tz = zone(tz_name)
    fixed = _fixed_time(cron)
    local = before.astimezone(tz).replace(tzinfo=None, microsecond=0)
    shifting = _transition_near(before, tz)
    start = local + LOOKAHEAD if shifting else local + timedelta(minutes=1)
    kept: list[datetime] = []
    for naive in CronSim(cron, start, reverse=True):
        for fire in _instants(naive, tz, fixed):
            instant = fire.at.astimezone(UTC)
            if instant <= before and instant not in kept:
                kept.append(instant)
                kept.sort(reverse=True)
        # Near a fall-back instants come out of order: an earlier wall clock
        # time's second occurrence can be newer than a later time's first.
        # No wall clock time before `naive` is newer than its last occurrence.
        if len(kept) >= count and kept[count - 1] >= _last_occurrence(naive, tz):
            break
    return tuple(moment.astimezone(tz) for moment in kept[:count])


def _last_occurrence(naive: datetime, tz: ZoneInfo) -> datetime:
    """The later instant of a wall clock time (the only one, but in a fall-back)."""
    return naive.replace(tzinfo=tz, fold=1).astimezone(UTC)


def next_fires(expr: str, tz_name: str, after: datetime, count: int = 1) -> list[Fire]:
    """The next `count` fires strictly after the instant `after`."""
    return list(itertools.islice(iter_fires(expr, tz_name, after), count))


def next_fire_after(expr: str, tz_name: str, after: datetime) -> datetime | None:
    fires = next_fires(expr, tz_name, after, 1)
    return fires[0].at if fires else None


def fires_between(
    expr: str, tz_name: str, start: datetime, end: datetime, limit: int = 1000
) -> list[datetime]:
    """Fires in (start, end], oldest first: the latest `limit` of them."""
    return fires_counted(expr, tz_name, start, end, keep=limit)[0]


def fires_counted(
    expr: str, tz_name: str, start: datetime, end: datetime, keep: int
) -> tuple[list[datetime], int]:
    """(the latest `keep` fires in (start, end], how many there were in all)."""
    kept: deque[datetime] = deque(maxlen=keep)
    total = 0
    for fire in iter_fires(expr, tz_name, start):
        if fire.at > end:
            break
        kept.append(fire.at)
        total += 1
    return list(kept), total


@functools.lru_cache(maxsize=4096)
def describe(expr: str, tz_name: str) -> str:
    """The schedule in words, e.g. 'At 02:15 (Europe/Berlin)'."""
    from cron_descriptor import ExpressionDescriptor, Options

    try:
        cron = expand(expr)
    except ScheduleError:
        return f"Invalid schedule {expr!r}"
    options = Options()
    options.use_24hour_time_format = True
    options.verbose = False
    try:
        words = ExpressionDescriptor(cron, options).get_description()
    except Exception:  # cron-descriptor raises many types; words are cosmetic
        words = cron
    return words if tz_name == "UTC" else f"{words} ({tz_name})"
