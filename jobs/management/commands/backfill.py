"""manage.py backfill SLUG --from ISO --to ISO [--dry-run]: run a job for each
of its scheduled fires in a past range, each with its fire as logical time
($JOBSITE_SCHEDULED_FOR), one after another."""

from __future__ import annotations

import sys
from datetime import date, datetime, time, timedelta

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from jobs import scheduling, services
from jobs.models import Job
from jobs.templatetags.jobs_tags import counted

EXIT_USAGE = 2


class Command(BaseCommand):
    help = (
        "Queue one run of the job for each of its scheduled fires from --from to --to "
        "(both included), oldest first, trigger 'backfill'. The workers run them one "
        "after another (together if the job allows overlap), each judged by its "
        "upstreams for its own logical time."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="The job's slug.")
        parser.add_argument(
            "--from",
            dest="start",
            required=True,
            metavar="ISO",
            help="First logical time: an ISO 8601 date or time; without an offset it is "
            "in the job's time zone (a date means its midnight).",
        )
        parser.add_argument(
            "--to",
            dest="end",
            required=True,
            metavar="ISO",
            help="Last logical time, included (a date means the whole of that day).",
        )
        parser.add_argument("--dry-run", action="store_true", help="List the fires; queue nothing.")

    def handle(self, *args, slug: str, start: str, end: str, dry_run: bool, **options) -> None:
        job = Job.objects.filter(slug=slug).first()
        if job is None:
            self.stderr.write(f"backfill: no job with slug {slug!r}.")
            sys.exit(EXIT_USAGE)
        try:
            tz = scheduling.zone(job.timezone)
            first = parse_moment(start, tz, option="--from", end_of_day=False)
            last = parse_moment(end, tz, option="--to", end_of_day=True)
            if dry_run:
                fires = services.backfill_fires(job, start=first, end=last)
            else:
                runs = services.run_backfill(
                    job=job, start=first, end=last, by=None, now=timezone.now()
                )
                fires = [run.scheduled_for for run in runs]
        except (scheduling.ScheduleError, services.BackfillError) as exc:
            self.stderr.write(f"backfill: {exc}")
            sys.exit(EXIT_USAGE)
        for fire in fires:
            self.stdout.write(timezone.localtime(fire, tz).isoformat())
        what = "would queue" if dry_run else "queued"
        self.stderr.write(
            f"{job.name}: {what} {counted(len(fires), 'backfill run')}, "
            f"oldest first. {settings.SITE_URL}{job.get_absolute_url()}"
        )


def parse_moment(value: str, tz, *, option: str, end_of_day: bool) -> datetime:
    """An ISO 8601 time or date; naive ones are in `tz`. A date is its
    midnight, or with `end_of_day` the last moment of that day."""
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day, time(), tzinfo=tz)
            return moment + timedelta(days=1, microseconds=-1) if end_of_day else moment
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise scheduling.ScheduleError(
            f"{option} {value!r} is not an ISO 8601 date or time; use e.g. 2026-11-01 "
            "or 2026-11-01T02:00."
        ) from None
    return moment.replace(tzinfo=tz) if timezone.is_naive(moment) else moment
