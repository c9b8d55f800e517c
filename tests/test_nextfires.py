"""manage.py nextfires: checking a schedule before saving it."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import UTC, datetime

import pytest
import time_machine
from django.conf import settings
from django.core.management import call_command


def nextfires(*args: str) -> tuple[int, list[str], str]:
    """call_command("nextfires", ...) -> (exit code, stdout lines, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("nextfires", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        return exc.code, out.getvalue().splitlines(), err.getvalue()
    return 0, out.getvalue().splitlines(), err.getvalue()


def test_prints_the_next_five_fires_in_utc_by_default():
    code, lines, _err = nextfires("*/15 * * * *", "--from", "2027-01-01T00:00:00+00:00")

    assert code == 0
    assert lines == [
        "2027-01-01T00:15:00+00:00",
        "2027-01-01T00:30:00+00:00",
        "2027-01-01T00:45:00+00:00",
        "2027-01-01T01:00:00+00:00",
        "2027-01-01T01:15:00+00:00",
    ]


def test_spring_forward_fire_moves_to_the_transition_and_says_why():
    code, lines, _err = nextfires(
        "30 2 * * *", "--tz", "Europe/Berlin", "--from", "2027-03-26T12:00", "-n", "3"
    )

    assert code == 0
    assert lines == [
        "2027-03-27T02:30:00+01:00",
        "2027-03-28T03:00:00+02:00  # 02:30 does not exist that day (DST); fires at 03:00",
        "2027-03-29T02:30:00+02:00",
    ]


def test_fall_back_fixed_time_fires_once_at_its_first_occurrence():
    code, lines, _err = nextfires(
        "30 2 * * *", "--tz", "Europe/Berlin", "--from", "2027-10-30T12:00", "-n", "2"
    )

    assert code == 0
    assert lines == ["2027-10-31T02:30:00+02:00", "2027-11-01T02:30:00+01:00"]


def test_fall_back_hourly_keeps_firing_through_the_repeated_hour():
    code, lines, _err = nextfires(
        "30 * * * *", "--tz", "Europe/Berlin", "--from", "2027-10-31T01:00", "-n", "3"
    )

    assert code == 0
    assert lines == [
        "2027-10-31T01:30:00+02:00",
        "2027-10-31T02:30:00+02:00",
        "2027-10-31T02:30:00+01:00  # repeated hour (DST)",
    ]
    assert [datetime.fromisoformat(line[:25]) for line in lines] == sorted(
        datetime.fromisoformat(line[:25]) for line in lines
    )


@pytest.mark.parametrize(
    ("expression", "first"),
    [
        ("@daily", "2027-01-02T00:00:00+01:00"),
        ("@midnight", "2027-01-02T00:00:00+01:00"),
        ("@hourly", "2027-01-01T02:00:00+01:00"),
        ("@weekly", "2027-01-03T00:00:00+01:00"),  # a Sunday
        ("@monthly", "2027-02-01T00:00:00+01:00"),
        ("@yearly", "2028-01-01T00:00:00+01:00"),
    ],
)
def test_aliases_fire_like_their_cron_lines(expression, first):
    # 00:30 UTC is 01:30 in Berlin: an offset in --from is honoured.
    code, lines, _err = nextfires(
        expression, "--tz", "Europe/Berlin", "--from", "2027-01-01T00:30:00Z", "-n", "1"
    )

    assert code == 0
    assert lines == [first]


def test_without_from_it_starts_now():
    with time_machine.travel(datetime(2027, 3, 28, 0, 0, tzinfo=UTC), tick=False):
        code, lines, _err = nextfires("30 2 * * *", "--tz", "Europe/Berlin", "-n", "1")

    assert code == 0
    assert lines == [
        "2027-03-28T03:00:00+02:00  # 02:30 does not exist that day (DST); fires at 03:00"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["61 * * * *"], "nextfires: Bad cron expression '61 * * * *'"),
        (["* * * *"], "nextfires: A cron expression has 5 fields"),
        (["@fortnightly"], "nextfires: Unknown alias '@fortnightly'; use one of @yearly"),
        (["* * * * *", "--tz", "Mars/Olympus"], "nextfires: Unknown time zone 'Mars/Olympus'"),
        (["* * * * *", "--from", "yesterday"], "nextfires: --from 'yesterday' is not an ISO 8601"),
        (["* * * * *", "-n", "0"], "nextfires: -n must be from 1 to 1000; got 0."),
        # The next fire would be after year 9999, or the DST look-back before year 1.
        (["* * * * *", "--from", "9999-12-31T23:59"], "nextfires: --from '9999-12-31T23:59': "),
        (["0 0 1 1 *", "--from", "9999-06-01T00:00"], "nextfires: --from '9999-06-01T00:00': "),
        (
            ["* * * * *", "--from", "0001-01-01T00:00", "--tz", "Pacific/Kiritimati"],
            "nextfires: --from '0001-01-01T00:00': the fire times around it are outside",
        ),
    ],
)
def test_bad_input_is_a_one_line_error_and_exit_2(args, message):
    code, lines, err = nextfires(*args)

    assert code == 2
    assert lines == []
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_bad_expression_from_the_shell_exits_2_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "manage.py", "nextfires", "0 25 * * *", "--tz", "Europe/Berlin"],
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("nextfires: Bad cron expression '0 25 * * *'")
    assert "Traceback" not in result.stderr
