"""manage.py nextfires "EXPR" [--tz ZONE] [--from ISO] [-n N]: check a schedule
before saving it, with the same function the scheduler uses."""

from __future__ import annotations

import sys
from datetime import datetime

from django.core.management.base import BaseCommand
from django.utils import timezone

from jobs import scheduling

EXIT_USAGE = 2
MAX_COUNT = 1000


class Command(BaseCommand):
    help = (
        "Print the next fire times of a cron expression as ISO 8601 with UTC offsets, "
        "one per line. A fire that a DST change moves says so after the time "
        '("  # ..."), so the first 25 characters of a line are always the time.'
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "expression", help='Cron expression ("15 2 * * *") or alias ("@daily"); quote it.'
        )
        parser.add_argument("--tz", default="UTC", help="IANA time zone (default: UTC).")
        parser.add_argument(
            "--from",
            dest="start",
            metavar="ISO",
            help="List fires strictly after this ISO 8601 time; without an offset it is "
            "in --tz (default: now).",
        )
        parser.add_argument(
            "-n", "--count", type=int, default=5, help="How many fire times (default: 5)."
        )

    def handle(
        self, *args, expression: str, tz: str, start: str | None, count: int, **options
    ) -> None:
        try:
            lines = fire_lines(expression, tz, start, count)
        except scheduling.ScheduleError as exc:
            self.stderr.write(f"nextfires: {exc}")
            sys.exit(EXIT_USAGE)
        for line in lines:
            self.stdout.write(line)


def fire_lines(expression: str, tz_name: str, start: str | None, count: int) -> list[str]:
    """The output lines; ScheduleError says what is wrong with the input."""
    scheduling.expand(expression)
    tz = scheduling.zone(tz_name)
    if not 1 <= count <= MAX_COUNT:
        raise scheduling.ScheduleError(f"-n must be from 1 to {MAX_COUNT}; got {count}.")
    after = parse_start(start, tz) if start is not None else timezone.now()
    try:
        fires = scheduling.next_fires(expression, tz_name, after, count)
    except OverflowError:  # e.g. --from 9999-12-31T23:59: the next fire is past year 9999
        raise scheduling.ScheduleError(
            f"--from {start!r}: the fire times around it are outside the dates this can "
            "compute (years 1 to 9999)."
        ) from None
    return [
        f"{fire.at.isoformat()}  # {fire.note}" if fire.note else fire.at.isoformat()
        for fire in fires
    ]


def parse_start(value: str, tz) -> datetime:
    """An ISO 8601 time; a naive one is a wall clock time in `tz`."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise scheduling.ScheduleError(
            f"--from {value!r} is not an ISO 8601 time; use e.g. 2027-03-28T01:30 "
            "or 2027-03-28T01:30:00+01:00."
        ) from None
    return moment.replace(tzinfo=tz) if timezone.is_naive(moment) else moment
