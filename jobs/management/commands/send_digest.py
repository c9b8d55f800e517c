"""manage.py send_digest [--period 24h] [--to a@b.c ...] [--end ISO]"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from jobs import digests

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Far more than any retention or digest needs, and far enough from
# datetime's limits that now - period cannot overflow.
MAX_PERIOD = timedelta(days=36500)


def parse_period(value: str) -> timedelta:
    """'24h', '7d', '30m', '1d12h' -> timedelta."""
    text = value.strip().lower()
    parts = re.findall(r"(\d+)\s*([smhdw])", text)
    if not parts or re.sub(r"\s", "", "".join(n + u for n, u in parts)) != re.sub(r"\s", "", text):
        raise CommandError(f'Period "{value}" is not like 24h, 7d or 30m.')
    try:
        period = sum((timedelta(**{_UNITS[u]: int(n)}) for n, u in parts), timedelta())
    except OverflowError:  # more days than a timedelta holds
        period = MAX_PERIOD + timedelta(days=1)
    if period <= timedelta(0):
        raise CommandError("The period must be longer than 0.")
    if period > MAX_PERIOD:
        raise CommandError(f'Period "{value}" is too long: at most {MAX_PERIOD.days}d.')
    return period


def parse_end(value: str) -> datetime:
    """ISO 8601; without an offset it is read in TIME_ZONE. 'now' is now."""
    if value.strip().lower() == "now":
        return timezone.now()
    try:
        end = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise CommandError(f'--end "{value}" is not an ISO 8601 time: {exc}') from exc
    return timezone.make_aware(end) if timezone.is_naive(end) else end


class Command(BaseCommand):
    help = (
        "Email each job's followers (alert_emails and owner) a digest of a period: "
        "failures, stale jobs, failure rates, slowest and most-late jobs. A digest for a "
        "period goes to each recipient at most once, however often this runs."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--period", default="24h", help="Length of the period: 24h (default), 7d, 30m."
        )
        parser.add_argument(
            "--to",
            nargs="+",
            metavar="EMAIL",
            help="Send to these addresses instead, each with every job.",
        )
        parser.add_argument(
            "--end",
            help="End of the period (ISO 8601, or 'now'). Default: the latest daily digest "
            "time (JOBSITE_DIGEST_TIME, or midnight) that has passed, so running this twice "
            "names the same period.",
        )

    def handle(self, *args, period: str, to: list[str] | None, end: str | None, **options):
        length = parse_period(period)
        now = timezone.now()
        period_end = parse_end(end) if end else digests.default_period_end(now=now)
        report = digests.send_digests(period_end=period_end, period=length, to=to, now=now)
        start = timezone.localtime(report.period_start)
        stop = timezone.localtime(report.period_end)
        self.stdout.write(f"Digest for {start:%Y-%m-%d %H:%M} – {stop:%Y-%m-%d %H:%M %Z}")
        for recipient, headline in report.sent.items():
            self.stdout.write(f"  sent to {recipient}: {headline}")
        for recipient in report.already_sent:
            self.stdout.write(f"  {recipient}: already sent for this period, not sent again")
        for recipient in report.skipped_empty:
            self.stdout.write(
                f"  {recipient}: nothing to report, skipped (JOBSITE_DIGEST_SKIP_EMPTY)"
            )
        for recipient, error in report.failed.items():
            self.stderr.write(f"  {recipient}: FAILED: {error}")
        if not (report.sent or report.already_sent or report.skipped_empty or report.failed):
            self.stdout.write(
                "  no recipients: no job has alert_emails or an owner email address (use --to)"
            )
        elif not report.sent and not report.failed:
            self.stdout.write("Nothing sent.")
        if report.failed:
            raise CommandError(f"{len(report.failed)} digest(s) could not be sent.")
