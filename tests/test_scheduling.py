"""Cron and time zone maths: pure functions, plain datetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobs import scheduling
from jobs.scheduling import ScheduleError, next_fires


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def iso(fires) -> list[str]:
    return [f.at.isoformat() for f in fires]


def test_every_minute_fires_at_each_following_minute():
    fires = next_fires("* * * * *", "UTC", utc(2026, 5, 1, 10, 0, 30), 3)
    assert iso(fires) == [
        "2026-05-01T10:01:00+00:00",
        "2026-05-01T10:02:00+00:00",
        "2026-05-01T10:03:00+00:00",
    ]


def test_fire_exactly_at_after_is_not_repeated():
    fires = next_fires("0 * * * *", "UTC", utc(2026, 5, 1, 10, 0, 0), 1)
    assert iso(fires) == ["2026-05-01T11:00:00+00:00"]


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("@daily", "2026-05-02T00:00:00+00:00"),
        ("@midnight", "2026-05-02T00:00:00+00:00"),
        ("@hourly", "2026-05-01T11:00:00+00:00"),
        ("@weekly", "2026-05-03T00:00:00+00:00"),  # next Sunday
        ("@monthly", "2026-06-01T00:00:00+00:00"),
        ("@yearly", "2027-01-01T00:00:00+00:00"),
        ("@annually", "2027-01-01T00:00:00+00:00"),
    ],
)
def test_aliases_expand_to_their_cron_meaning(alias, expected):
    assert iso(next_fires(alias, "UTC", utc(2026, 5, 1, 10, 30), 1)) == [expected]


def test_schedule_is_computed_in_the_jobs_time_zone():
    fires = next_fires("15 2 * * *", "Europe/Berlin", utc(2026, 7, 1, 12), 2)
    assert iso(fires) == ["2026-07-02T02:15:00+02:00", "2026-07-03T02:15:00+02:00"]
    assert fires[0].at.astimezone(UTC) == utc(2026, 7, 2, 0, 15)


def test_day_of_month_and_day_of_week_both_restricted_means_either():
    # Vixie/Debian cron: "on the 13th, and on every Friday".
    fires = next_fires("0 0 13 * 5", "UTC", utc(2026, 1, 1), 4)
    assert iso(fires) == [
        "2026-01-02T00:00:00+00:00",  # Friday
        "2026-01-09T00:00:00+00:00",  # Friday
        "2026-01-13T00:00:00+00:00",  # the 13th, a Tuesday
        "2026-01-16T00:00:00+00:00",  # Friday
    ]


def test_spring_forward_gap_fires_at_the_transition_and_says_so():
    # 2027-03-28: Berlin clocks jump from 02:00 to 03:00; 02:30 does not exist.
    fires = next_fires("30 2 * * *", "Europe/Berlin", utc(2027, 3, 27, 12), 2)
    assert iso(fires) == ["2027-03-28T03:00:00+02:00", "2027-03-29T02:30:00+02:00"]
    assert "does not exist" in fires[0].note
    assert fires[1].note == ""


def test_fall_back_repeated_time_fires_once_for_fixed_time_jobs():
    # 2027-10-31: Berlin clocks go from 03:00 back to 02:00; 02:30 happens twice.
    fires = next_fires("30 2 * * *", "Europe/Berlin", utc(2027, 10, 30, 12), 2)
    assert iso(fires) == ["2027-10-31T02:30:00+02:00", "2027-11-01T02:30:00+01:00"]


def test_fall_back_keeps_firing_through_the_repeated_hour_for_wildcard_hours():
    fires = next_fires("*/30 * * * *", "Europe/Berlin", utc(2027, 10, 30, 23, 0), 5)
    instants = [f.at.astimezone(UTC).strftime("%H:%M") for f in fires]
    # 01:30+02, 02:00+02, 02:30+02, then the repeated 02:00+01, 02:30+01.
    assert instants == ["23:30", "00:00", "00:30", "01:00", "01:30"]
    assert fires[3].note == "repeated hour (DST)"


def test_wildcard_minutes_inside_a_spring_forward_gap_are_skipped():
    fires = next_fires("*/30 * * * *", "Europe/Berlin", utc(2027, 3, 28, 0, 0), 3)
    assert iso(fires) == [
        "2027-03-28T01:30:00+01:00",
        "2027-03-28T03:00:00+02:00",
        "2027-03-28T03:30:00+02:00",
    ]
    # The job page's next-fires list says what was skipped.
    assert fires[1].note == "2 fire times inside the DST gap before this were skipped"


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * *", "has 3"),
        ("0 0 * * * *", "has 6"),
        ("61 * * * *", "minute"),
        ("* 25 * * *", "hour"),
        ("@reboot", "Unknown alias"),
        ("", "empty"),
        ("0 0 31 2 *", "day-of-month"),
    ],
)
def test_bad_expressions_raise_a_message_naming_the_problem(expr, message):
    with pytest.raises(ScheduleError, match=message):
        scheduling.expand(expr)


def test_unknown_time_zone_is_rejected():
    with pytest.raises(ScheduleError, match="Unknown time zone 'Mars/Olympus'"):
        scheduling.zone("Mars/Olympus")


def test_fires_between_lists_missed_fires_oldest_first():
    fires = scheduling.fires_between(
        "*/10 * * * *", "UTC", utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 35)
    )
    assert [f.minute for f in fires] == [10, 20, 30]


def test_describe_says_the_schedule_in_words_with_the_zone():
    assert scheduling.describe("15 2 * * *", "Europe/Berlin") == "At 02:15 (Europe/Berlin)"
    assert scheduling.describe("*/5 * * * *", "UTC") == "Every 5 minutes"


@pytest.mark.parametrize(
    "expr, tz_name, day",
    [
        ("30 2 * * *", "Europe/Berlin", datetime(2027, 3, 27, 20, tzinfo=UTC)),  # gap
        ("15 1 * * *", "America/New_York", datetime(2027, 11, 6, 20, tzinfo=UTC)),  # repeat
        ("*/15 * * * *", "Europe/Berlin", datetime(2027, 10, 30, 20, tzinfo=UTC)),
        ("*/20 1-3 * * *", "Europe/London", datetime(2027, 3, 27, 20, tzinfo=UTC)),
        ("30 1 * * *", "Australia/Lord_Howe", datetime(2027, 4, 3, 10, tzinfo=UTC)),
        ("7 */6 * * *", "Asia/Kolkata", datetime(2027, 1, 5, 0, tzinfo=UTC)),
    ],
)
def test_remembered_previous_fires_equal_a_fresh_walk_around_every_fire(expr, tz_name, day):
    # previous_fires answers from a remembered span [newest fire, next fire);
    # just before, at and just after each fire, across DST changes, it must
    # say what walking the expression backwards says.
    scheduling._SPANS.clear()
    moments = []
    for fire in scheduling.fires_between(expr, tz_name, day, day + timedelta(hours=16)):
        moments += [fire - timedelta(microseconds=1), fire, fire + timedelta(seconds=59)]
    in_utc = lambda fires: [fire.astimezone(UTC) for fire in fires]  # noqa: E731 (fold-safe)
    for moment in moments + moments[::-1]:
        for count in (1, 2):
            walked = scheduling._previous_fires(expr, tz_name, moment, count)
            assert in_utc(scheduling.previous_fires(expr, tz_name, moment, count)) == in_utc(walked)
    assert scheduling._SPANS  # spans were remembered, so later answers came from them


def test_previous_fires_after_a_fall_back_include_the_repeated_hour():
    # 2026-10-25: Berlin goes from 03:00 back to 02:00; "*/30 2" fires at
    # 02:00 and 02:30 twice. At 05:35 the newest two are the second 02:30
    # and the second 02:00, though 02:00 is the earlier wall clock time.
    fires = scheduling.previous_fires("*/30 2 * * *", "Europe/Berlin", utc(2026, 10, 25, 4, 35), 2)
    assert [f"{f.astimezone(UTC):%H:%M}" for f in fires] == ["01:30", "01:00"]


@pytest.mark.parametrize(
    "expr, tz_name, day",
    [
        ("*/30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 18, tzinfo=UTC)),
        ("*/20 1 * * *", "America/New_York", datetime(2026, 10, 31, 22, tzinfo=UTC)),
        ("*/15 1 * * *", "Australia/Lord_Howe", datetime(2026, 4, 4, 8, tzinfo=UTC)),
        ("*/30 * * * *", "Antarctica/Troll", datetime(2026, 10, 24, 18, tzinfo=UTC)),
        ("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 18, tzinfo=UTC)),
    ],
)
def test_previous_fires_are_the_newest_of_the_forward_fires_across_dst(expr, tz_name, day):
    forward = [
        f.astimezone(UTC)
        for f in scheduling.fires_between(
            expr, tz_name, day - timedelta(days=2), day + timedelta(days=2)
        )
    ]
    moment = day
    while moment < day + timedelta(hours=16):
        expected = [f for f in forward if f <= moment][::-1][:2]
        walked = scheduling._previous_fires(expr, tz_name, moment, 2)
        assert [f.astimezone(UTC) for f in walked] == expected, moment
        moment += timedelta(minutes=7, seconds=13)
