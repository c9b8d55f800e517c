"""Email digests: per recipient, what happened to the jobs they follow in a
period - failures, stale jobs, failure rates, slowest and most-late jobs.

Each (recipient, period) is sent at most once: a DigestSent row is inserted
before sending, and its unique constraint turns a second attempt (a second
scheduler, the command run twice) into a skip.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import Count, DurationField, ExpressionWrapper, F, Max, Q
from django.urls import reverse
from django.utils import timezone

from jobs import emails, notify, stats
from jobs.models import DigestSent, Job, JobDailyStats, Notification, Run, Stale
from jobs.templatetags.jobs_tags import counted

log = logging.getLogger(__name__)

MAX_LISTED_FAILURES = 50
MAX_RATE_ROWS = 50
TOP = 5


# --- When --------------------------------------------------------------------------


def digest_clock() -> tuple[int, int] | None:
    """JOBSITE_DIGEST_TIME as (hour, minute); None when empty (no daily digest)."""
    value = settings.JOBSITE_DIGEST_TIME.strip()
    if not value:
        return None
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value)
    if not match:
        raise ImproperlyConfigured(
            f'JOBSITE_DIGEST_TIME must be HH:MM (e.g. "08:00") or empty, not "{value}".'
        )
    return int(match.group(1)), int(match.group(2))


def _local_at(day: date, clock: tuple[int, int]) -> datetime:
    zone = ZoneInfo(settings.TIME_ZONE)
    return datetime.combine(day, time(*clock), tzinfo=zone).astimezone(ZoneInfo("UTC"))


def digest_period_due(*, now: datetime) -> tuple[datetime, datetime] | None:
    """The built-in daily digest's period once today's JOBSITE_DIGEST_TIME
    (in TIME_ZONE) has passed: from yesterday's digest time to today's (23 or
    25 hours across a DST change). None before that time, or with no time set."""
    clock = digest_clock()
    if clock is None:
        return None
    today = now.astimezone(ZoneInfo(settings.TIME_ZONE)).date()
    end = _local_at(today, clock)
    if now < end:
        return None
    return _local_at(today - timedelta(days=1), clock), end


def default_period_end(*, now: datetime) -> datetime:
    """The latest daily boundary at or before `now`: the digest time (today's
    or yesterday's), or local midnight with no digest time. The command uses
    it so that running it twice names the same period, and a manual digest
    does not repeat the scheduled one."""
    clock = digest_clock() or (0, 0)
    today = now.astimezone(ZoneInfo(settings.TIME_ZONE)).date()
    end = _local_at(today, clock)
    return end if end <= now else _local_at(today - timedelta(days=1), clock)


def send_due_digests(*, now: datetime) -> bool:
    """For the scheduler's tick: hand the daily digests to the workers once
    they are due; True when it did. Not in the tick itself: a slow or hung
    mail server would hold up every job's start meanwhile. A cache mark
    keeps later ticks from handing them again; DigestSent still guards each
    recipient if the mark is lost."""
    from django_q.tasks import async_task

    period = digest_period_due(now=now)
    if period is None:
        return False
    start, end = period
    if not cache.add(done_mark(end), True, timeout=3 * 86400):
        return False
    try:
        async_task(
            "jobs.digests.digest_task",
            end.isoformat(),
            (end - start).total_seconds(),
            now.isoformat(),
            q_options={"task_name": f"digest {end.isoformat()}"},
        )
    except Exception:
        cache.delete(done_mark(end))  # the next tick tries again
        raise
    return True


def digest_task(period_end_iso: str, period_seconds: float, now_iso: str) -> str:
    """django-q2 entry point of the daily digest (thin)."""
    report = send_digests(
        period_end=datetime.fromisoformat(period_end_iso),
        period=timedelta(seconds=period_seconds),
        now=datetime.fromisoformat(now_iso),
    )
    return (
        f"sent {len(report.sent)}, failed {len(report.failed)}, skipped {len(report.skipped_empty)}"
    )


def done_mark(period_end: datetime) -> str:
    """The cache key saying the daily digests ending then were handled."""
    return f"jobsite:digest:done:{period_end.isoformat()}"


# --- What --------------------------------------------------------------------------


@dataclass
class JobPeriod:
    """One job's numbers for a period."""

    job: Job
    succeeded: int = 0
    failures: int = 0
    cancelled: int = 0
    skipped: int = 0
    duration_max: float = 0.0  # seconds
    lateness_max: float = 0.0  # seconds

    @property
    def runs(self) -> int:
        return self.succeeded + self.failures + self.cancelled

    @property
    def failure_percent(self) -> float | None:
        counted = self.succeeded + self.failures
        return 100.0 * self.failures / counted if counted else None

    @property
    def duration(self) -> str:
        return emails.humanize(timedelta(seconds=self.duration_max))

    @property
    def lateness(self) -> str:
        return emails.humanize(timedelta(seconds=self.lateness_max))


@dataclass
class Digest:
    recipient: str
    period_start: datetime
    period_end: datetime
    jobs: list[Job]
    failures: list[Run]  # the most recent, at most MAX_LISTED_FAILURES
    failures_total: int
    stale: list[tuple[Job, Stale]]
    rates: list[JobPeriod]  # jobs that ran, worst first
    rates_more: int
    slowest: list[JobPeriod]
    latest: list[JobPeriod]
    runs_total: int

    @property
    def all_good(self) -> bool:
        return not self.failures_total and not self.stale

    @property
    def failures_more(self) -> int:
        return self.failures_total - len(self.failures)

    @property
    def headline(self) -> str:
        if self.all_good:
            return (
                f"All good: {counted(len(self.jobs), 'job')}, {counted(self.runs_total, 'run')}, "
                "no failures"
            )
        parts = []
        if self.failures_total:
            parts.append(counted(self.failures_total, "failure"))
        if self.stale:
            parts.append(counted(len(self.stale), "stale job"))
        return (
            f"{', '.join(parts)} ({counted(len(self.jobs), 'job')}, "
            f"{counted(self.runs_total, 'run')})"
        )


def followers(*, to: list[str] | None = None) -> dict[str, list[Job]]:
    """recipient -> the jobs their digest covers. With `to`: every job, for
    each of those addresses. Otherwise each address in a job's alert_emails
    or its owner (when the owner is an email address)."""
    jobs = list(Job.objects.order_by("name"))
    if to:
        return {address: jobs for address in _unique(to)}
    result: dict[str, list[Job]] = {}
    for job in jobs:
        addresses = list(job.alert_emails or [])
        if _is_address(job.owner):
            addresses.append(job.owner)
        for address in _unique(addresses):
            result.setdefault(address, []).append(job)
    return dict(sorted(result.items()))


def _is_address(text: str) -> bool:
    """An owner is free text ("Data team"); only a plain address gets a digest."""
    try:
        validate_email(text.strip())
    except ValidationError:
        return False
    return True


def _unique(addresses: list[str]) -> list[str]:
    """Stripped, lower-cased, in order, once each (one digest per mailbox)."""
    return list(dict.fromkeys(a.strip().lower() for a in addresses if str(a).strip()))


def period_numbers(*, jobs: list[Job], start: datetime, end: datetime) -> dict[int, JobPeriod]:
    """Per job, runs finished in [start, end): whole local days from the daily
    rollups, the partial days at either end from the runs themselves - so a
    30-day digest reads 30 rollup rows per job, not 30 days of runs."""
    numbers = {job.pk: JobPeriod(job=job) for job in jobs}
    first_day, last_day = _whole_days(start, end)
    if first_day < last_day:
        rows = JobDailyStats.objects.filter(
            job_id__in=numbers, day__gte=first_day, day__lt=last_day
        )
        for row in rows:
            _add_rollup(numbers[row.job_id], row)
        edges = [(start, _midnight(first_day)), (_midnight(last_day), end)]
    else:
        edges = [(start, end)]
    for edge_start, edge_end in edges:
        if edge_start < edge_end:
            _add_runs(numbers, edge_start, edge_end)
    return numbers


def _midnight(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time()), timezone.get_current_timezone())


def _whole_days(start: datetime, end: datetime) -> tuple[date, date]:
    """[first, last) local days that lie entirely inside [start, end)."""
    first = timezone.localdate(start)
    if _midnight(first) < start:
        first += timedelta(days=1)
    return first, timezone.localdate(end)


def _add_rollup(numbers: JobPeriod, row: JobDailyStats) -> None:
    numbers.succeeded += row.succeeded
    numbers.failures += row.failures
    numbers.cancelled += row.cancelled
    numbers.skipped += row.skipped
    numbers.duration_max = max(numbers.duration_max, row.duration_max)
    numbers.lateness_max = max(numbers.lateness_max, row.lateness_max)


def _add_runs(numbers: dict[int, JobPeriod], start: datetime, end: datetime) -> None:
    """Two grouped queries over the runs finished in [start, end) (at most a
    day at each end of the period)."""
    finished = Run.objects.filter(
        job_id__in=numbers,
        status__in=stats.COUNTED,
        finished_at__gte=start,
        finished_at__lt=end,
    )
    for row in finished.values("job_id", "status").annotate(n=Count("id")).order_by():
        target = numbers[row["job_id"]]
        if row["status"] == Run.Status.SUCCEEDED:
            target.succeeded += row["n"]
        elif row["status"] in Run.FAILURES:
            target.failures += row["n"]
        elif row["status"] == Run.Status.CANCELLED:
            target.cancelled += row["n"]
        else:
            target.skipped += row["n"]
    timings = (
        finished.filter(started_at__isnull=False)
        .values("job_id")
        .annotate(
            duration=Max(
                ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
            ),
            lateness=Max(
                ExpressionWrapper(
                    F("started_at") - F("scheduled_for"), output_field=DurationField()
                ),
                filter=~Q(trigger__in=Run.CARRIED_OVER),  # late on purpose
            ),
        )
        .order_by()
    )
    for row in timings:
        target = numbers[row["job_id"]]
        if row["duration"] is not None:
            target.duration_max = max(target.duration_max, row["duration"].total_seconds())
        if row["lateness"] is not None:
            target.lateness_max = max(target.lateness_max, row["lateness"].total_seconds())


def build_digest(
    *,
    recipient: str,
    jobs: list[Job],
    start: datetime,
    end: datetime,
    numbers: dict[int, JobPeriod],
    stale: dict[int, Stale],
) -> Digest:
    mine = [numbers[job.pk] for job in jobs]
    failures = list(
        Run.objects.filter(
            job_id__in=[job.pk for job in jobs],
            status__in=Run.FAILURES,
            finished_at__gte=start,
            finished_at__lt=end,
        )
        .select_related("job")
        .order_by("-finished_at", "-id")[:MAX_LISTED_FAILURES]
    )
    ran = sorted(
        (n for n in mine if n.runs),
        key=lambda n: (-(n.failure_percent or 0.0), -n.failures, n.job.name),
    )
    return Digest(
        recipient=recipient,
        period_start=start,
        period_end=end,
        jobs=jobs,
        failures=failures,
        failures_total=sum(n.failures for n in mine),
        stale=[(job, stale[job.pk]) for job in jobs if job.pk in stale],
        rates=ran[:MAX_RATE_ROWS],
        rates_more=max(0, len(ran) - MAX_RATE_ROWS),
        slowest=sorted((n for n in mine if n.duration_max > 0), key=lambda n: -n.duration_max)[
            :TOP
        ],
        latest=sorted((n for n in mine if n.lateness_max >= 1), key=lambda n: -n.lateness_max)[
            :TOP
        ],
        runs_total=sum(n.runs for n in mine),
    )


def digest_email(digest: Digest) -> emails.Email:
    start = timezone.localtime(digest.period_start)
    end = timezone.localtime(digest.period_end)
    span = f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} {end:%Z}"
    return emails.render(
        template="digest",
        subject=f"[Jobsite] Digest {span}: {digest.headline}",
        context={
            "digest": digest,
            "span": span,
            "overview_url": emails.link(reverse("jobs-overview")),
            "stale": [(job, item, emails.humanize(item.overdue)) for job, item in digest.stale],
        },
    )


# --- Sending -----------------------------------------------------------------------


@dataclass
class DigestReport:
    period_start: datetime
    period_end: datetime
    sent: dict[str, str] = field(default_factory=dict)  # recipient -> headline
    failed: dict[str, str] = field(default_factory=dict)  # recipient -> error
    already_sent: list[str] = field(default_factory=list)
    skipped_empty: list[str] = field(default_factory=list)


def send_digests(
    *,
    period_end: datetime,
    period: timedelta = timedelta(hours=24),
    to: list[str] | None = None,
    now: datetime | None = None,
) -> DigestReport:
    """Send each recipient their digest for [period_end - period, period_end).

    1. Find recipients and their jobs (followers); skip those already sent.
    2. Count the period once for all jobs involved; stale jobs as of `now`.
    3. Per recipient: build; skip an "all good" one under JOBSITE_DIGEST_SKIP_EMPTY;
       claim (insert DigestSent; a duplicate means someone else sent it); send;
       record a Notification. A send that fails keeps its claim: at most once.
    """
    now = now or timezone.now()
    start = period_end - period
    report = DigestReport(period_start=start, period_end=period_end)
    wanted = followers(to=to)
    done = set(
        DigestSent.objects.filter(period_start=start, period_end=period_end).values_list(
            "recipient", flat=True
        )
    )
    report.already_sent = [r for r in wanted if r in done]
    wanted = {r: jobs for r, jobs in wanted.items() if r not in done}
    if not wanted:
        return report
    involved = list({job.pk: job for jobs in wanted.values() for job in jobs}.values())
    numbers = period_numbers(jobs=involved, start=start, end=period_end)
    stale = {job.pk: s for job in involved if (s := job.stale_reason(now))}
    for recipient, jobs in wanted.items():
        digest = build_digest(
            recipient=recipient,
            jobs=jobs,
            start=start,
            end=period_end,
            numbers=numbers,
            stale=stale,
        )
        if digest.all_good and settings.JOBSITE_DIGEST_SKIP_EMPTY:
            report.skipped_empty.append(recipient)
            continue
        claim = _claim(recipient=recipient, start=start, end=period_end, now=now)
        if claim is None:
            report.already_sent.append(recipient)
            continue
        email = digest_email(digest)
        error = emails.send(email=email, to=recipient)
        notify.record_send(
            digest=claim,
            kind=Notification.Kind.DIGEST,
            channel=Notification.Channel.EMAIL,
            target=recipient,
            subject=email.subject,
            error=error,
        )
        if error:
            report.failed[recipient] = error
        else:
            report.sent[recipient] = digest.headline
    return report


def _claim(*, recipient: str, start: datetime, end: datetime, now: datetime) -> DigestSent | None:
    try:
        with transaction.atomic():
            return DigestSent.objects.create(
                recipient=recipient, period_start=start, period_end=end, sent_at=now
            )
    except IntegrityError:
        return None


def resend(sent: DigestSent, *, now: datetime) -> tuple[str, str] | None:
    """A digest whose send failed, built again and sent: (subject, error),
    or None when the recipient follows no job any more (a digest sent with
    --to is not tried again: the command said it failed). For notify.retry;
    the recipient keeps the period's claim throughout."""
    jobs = followers().get(sent.recipient)
    if not jobs:
        return None
    start, end = sent.period_start, sent.period_end
    digest = build_digest(
        recipient=sent.recipient,
        jobs=jobs,
        start=start,
        end=end,
        numbers=period_numbers(jobs=jobs, start=start, end=end),
        stale={job.pk: s for job in jobs if (s := job.stale_reason(now))},
    )
    email = digest_email(digest)
    return email.subject, emails.send(email=email, to=sent.recipient)
