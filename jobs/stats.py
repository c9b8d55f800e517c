"""Daily rollups per job, kept as runs reach a final state, and the numbers
pages and digests read from them (never a scan of the run history)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.db import IntegrityError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from jobs.models import Job, JobDailyStats, Run

COUNTED = {
    Run.Status.SUCCEEDED,
    Run.Status.FAILED,
    Run.Status.TIMED_OUT,
    Run.Status.LOST,
    Run.Status.CANCELLED,
    Run.Status.SKIPPED,
}


def record_finished(run: Run, *, tried: bool = False) -> None:
    """Add a run that reached a final state to its job's row for that day.
    `tried`: the caller ran rollup_statement() already and it found no row."""
    if run.status not in COUNTED or run.finished_at is None:
        return
    sql, params = rollup_statement(run)
    with transaction.atomic(savepoint=False):  # the caller's transaction, if any, suffices
        if not tried:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                if cursor.rowcount:
                    return
        try:
            with transaction.atomic():
                JobDailyStats.objects.create(
                    job_id=run.job_id, day=timezone.localdate(run.finished_at)
                )
        except IntegrityError:
            pass  # created meanwhile by another process
        with connection.cursor() as cursor:
            cursor.execute(sql, params)


def rollup_statement(run: Run) -> tuple[str, list]:
    """The UPDATE that adds a finished run (a status of COUNTED) to its job's
    row for the day, and its parameters. It changes no row when that row
    does not exist yet (record_finished creates it)."""
    params: list = []
    if run.started_at is not None:
        duration = max(0.0, (run.finished_at - run.started_at).total_seconds())
        lateness = max(0.0, (run.started_at - run.scheduled_for).total_seconds())
        if run.trigger in Run.CARRIED_OVER:  # late on purpose: not the clock's lateness
            lateness = 0.0
        params = [duration, duration, duration, lateness, lateness, lateness]
    sql = _rollup_sql(connection.vendor, run.status, executed=bool(params))
    day = timezone.localdate(run.finished_at)
    return sql, [*params, run.job_id, connection.ops.adapt_datefield_value(day)]


@functools.lru_cache(maxsize=64)
def _rollup_sql(vendor: str, status: str, *, executed: bool) -> str:
    """The rollup UPDATE for one finished run, written out: every run pays
    for it, and building it with F() and Greatest() cost ten times the
    statement itself (1.0 ms of CPU against 0.1). Parameters: duration x3,
    lateness x3 (when `executed`), job id, day."""
    qn = connection.ops.quote_name
    meta = JobDailyStats._meta

    def col(name: str) -> str:
        return qn(meta.get_field(name).column)

    counted = col(status)  # status is one of COUNTED: a field of the model
    sets = [f"{counted} = {counted} + 1"]
    if executed:
        sets.append(f"{col('executed')} = {col('executed')} + 1")
        for kind in ("duration", "lateness"):
            total, most = col(f"{kind}_total"), col(f"{kind}_max")
            sets.append(f"{total} = {total} + %s")
            sets.append(f"{most} = CASE WHEN {most} < %s THEN %s ELSE {most} END")
    return (
        f"UPDATE {qn(meta.db_table)} SET {', '.join(sets)} "
        f"WHERE {col('job')} = %s AND {col('day')} = %s"
    )


@dataclass(frozen=True)
class Rate:
    succeeded: int
    failures: int

    @property
    def total(self) -> int:
        return self.succeeded + self.failures

    @property
    def percent(self) -> float | None:
        """Success rate in percent, None when nothing ran."""
        return None if not self.total else 100.0 * self.succeeded / self.total


def _rate_from_rows(rows) -> Rate:
    agg = rows.aggregate(s=Sum("succeeded"), f=Sum("failed"), t=Sum("timed_out"), lost=Sum("lost"))
    return Rate(agg["s"] or 0, (agg["f"] or 0) + (agg["t"] or 0) + (agg["lost"] or 0))


def success_rates(job: Job, now: datetime) -> dict[str, Rate]:
    """Success rate over the last 24 h (from runs: at most a day of them) and
    over 7 and 30 days (from rollups)."""
    today = timezone.localdate(now)
    recent = Run.objects.filter(job=job, finished_at__gte=now - timedelta(hours=24))
    counts = {s: 0 for s in Run.FAILURES}
    counts[Run.Status.SUCCEEDED] = 0
    for status in recent.filter(status__in=[Run.Status.SUCCEEDED, *Run.FAILURES]).values_list(
        "status", flat=True
    ):
        counts[status] += 1
    day_rate = Rate(counts[Run.Status.SUCCEEDED], sum(counts[s] for s in Run.FAILURES))
    rows = JobDailyStats.objects.filter(job=job)
    return {
        "24h": day_rate,
        "7d": _rate_from_rows(rows.filter(day__gt=today - timedelta(days=7))),
        "30d": _rate_from_rows(rows.filter(day__gt=today - timedelta(days=30))),
    }


def rates_by_job(jobs: list[Job], now: datetime, days: int = 7) -> dict[int, Rate]:
    """One query: each job's success rate over the last `days` days."""
    since = timezone.localdate(now) - timedelta(days=days)
    rows = (
        JobDailyStats.objects.filter(job__in=jobs, day__gt=since)
        .values("job_id")
        .annotate(s=Sum("succeeded"), f=Sum("failed"), t=Sum("timed_out"), lost=Sum("lost"))
    )
    return {r["job_id"]: Rate(r["s"], r["f"] + r["t"] + r["lost"]) for r in rows}


def daily_failure_rates(job: Job, now: datetime, days: int = 30) -> list[tuple[date, Rate]]:
    """(day, rate) for each of the last `days` days, oldest first, zeros included."""
    today = timezone.localdate(now)
    first = today - timedelta(days=days - 1)
    rows = {
        row.day: row
        for row in JobDailyStats.objects.filter(job=job, day__gte=first, day__lte=today)
    }
    result = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        row = rows.get(day)
        result.append((day, Rate(row.succeeded, row.failures) if row else Rate(0, 0)))
    return result


def recent_durations(job: Job, count: int = 100) -> list[Run]:
    """The last `count` runs that started and finished, oldest first."""
    runs = list(
        Run.objects.filter(job=job, started_at__isnull=False, finished_at__isnull=False)
        .only("id", "status", "started_at", "finished_at", "scheduled_for")
        .order_by("-id")[:count]
    )
    runs.reverse()
    return runs


def recount(job: Job) -> dict[date, dict[str, int]]:
    """Full recount from the run history (for tests and repairs)."""
    result: dict[date, dict[str, int]] = {}
    for run in Run.objects.filter(job=job, status__in=COUNTED, finished_at__isnull=False):
        day = timezone.localdate(run.finished_at)
        counts = result.setdefault(day, {s: 0 for s in COUNTED} | {"executed": 0})
        counts[run.status] += 1
        counts["executed"] += run.started_at is not None
    return result
