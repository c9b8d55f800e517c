"""Retention: old finished runs go, in short batches; the daily rollups stay.

`manage.py prune_runs --older-than 90d` and the clock's daily prune
(JOBSITE_PRUNE_TIME, JOBSITE_RETENTION_DAYS) call prune_runs(). Each batch
is its own short transaction, so a prune of a million runs never holds the
database (SQLite's single write lock, PostgreSQL row locks) for long; the
runs' JobDailyStats rows are kept, so charts and rates still show the past.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from jobs import artifacts
from jobs.models import AlertFlip, Artifact, Job, Run, RunLogChunk

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 90


@dataclass
class PruneReport:
    """What a prune did so far (passed to `progress` after every batch)."""

    cutoff: datetime
    batches: int = 0
    runs: int = 0
    log_chunks: int = 0
    artifacts: int = 0
    # Files of runs deleted some other way (job.delete() in a shell), swept at the end.
    orphaned_files: int = 0
    elapsed: float = 0.0  # seconds
    last_batch: float = 0.0  # seconds: the latest delete transaction
    longest_batch: float = 0.0  # seconds: the longest delete transaction

    @property
    def runs_per_second(self) -> float:
        return self.runs / self.elapsed if self.elapsed else 0.0


def prunable(*, older_than: timedelta, now: datetime | None = None) -> QuerySet[Run]:
    """Finished runs that finished before now - older_than (never queued or running)."""
    cutoff = (now or timezone.now()) - older_than
    return Run.objects.filter(status__in=Run.FINISHED, finished_at__lt=cutoff)


def prune_runs(
    *,
    older_than: timedelta,
    batch: int = 1000,
    now: datetime | None = None,
    progress: Callable[[PruneReport], None] | None = None,
) -> PruneReport:
    """Delete finished runs older than `older_than`, `batch` runs at a time.

    1. Outside any transaction (a read takes no write lock), the next `batch`
       ids in id order after the previous batch: one forward walk over the
       primary key for the whole prune.
    2. The batch's artifact files are deleted before their rows: a file
       without a row would never be found again; a row without a file (the
       transaction failed) is retried by the next prune.
    3. One short transaction: delete the runs' log chunks and artifact rows,
       set reruns, retries, alert flips and job slots that point at the runs
       to NULL, and delete the runs, re-checking that they are still
       finished and old.
    4. Files left behind by runs deleted another way (a shell's
       job.delete(): the cascade deletes rows only) are removed.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    started = time.monotonic()
    candidates = prunable(older_than=older_than, now=now)
    report = PruneReport(cutoff=(now or timezone.now()) - older_than)
    after = 0
    while True:
        ids = list(
            candidates.filter(pk__gt=after).order_by("pk").values_list("pk", flat=True)[:batch]
        )
        if not ids:
            break
        after = ids[-1]
        _delete_batch(candidates.filter(pk__gte=ids[0], pk__lte=after), report)
        report.elapsed = time.monotonic() - started
        if progress:
            progress(report)
        if len(ids) < batch:
            break
    report.orphaned_files = artifacts.delete_orphaned_files()
    report.elapsed = time.monotonic() - started
    return report


def _delete_batch(runs: QuerySet[Run], report: PruneReport) -> None:
    # Between the batch's first and last id every prunable run is in the
    # batch (ids were taken in order), so the batch is a range plus the
    # prunable conditions: a subquery in each statement, no list of ids
    # (SQLite allows 999 or 32766 parameters, depending on its build), and
    # seven statements per batch whatever its size. Django's collector would
    # load every run and delete them 100 ids at a time: 3x longer locks.
    artifacts.delete_files(runs)
    began = time.monotonic()
    batch = runs.values("pk")
    with transaction.atomic():
        chunks, _ = RunLogChunk.objects.filter(run__in=batch).delete()
        files, _ = Artifact.objects.filter(run__in=batch).delete()
        # SET_NULL references, nulled here so the runs can go in one statement.
        Run.objects.filter(rerun_of__in=batch).update(rerun_of=None)
        Run.objects.filter(retry_of__in=batch).update(retry_of=None)
        AlertFlip.objects.filter(run__in=batch).update(run=None)
        Job.objects.filter(active_run__in=batch).update(active_run=None)
        # Nothing refers to these runs any more (the foreign keys would fail
        # the commit otherwise: test_prune_handles_every_relation_to_run).
        deleted = runs._raw_delete(runs.db)
    report.last_batch = time.monotonic() - began
    report.longest_batch = max(report.longest_batch, report.last_batch)
    report.batches += 1
    report.runs += deleted
    report.log_chunks += chunks
    report.artifacts += files


# --- The daily prune --------------------------------------------------------------


def retention_days() -> int:
    return int(getattr(settings, "JOBSITE_RETENTION_DAYS", DEFAULT_RETENTION_DAYS))


def prune_clock() -> tuple[int, int] | None:
    """JOBSITE_PRUNE_TIME as (hour, minute) in TIME_ZONE; None when empty (no daily prune)."""
    value = str(getattr(settings, "JOBSITE_PRUNE_TIME", "")).strip()
    if not value:
        return None
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value)
    if not match:
        raise ImproperlyConfigured(
            f'JOBSITE_PRUNE_TIME must be HH:MM (e.g. "03:30") or empty, not "{value}".'
        )
    return int(match.group(1)), int(match.group(2))


def _done_key(now: datetime) -> str:
    day = now.astimezone(ZoneInfo(settings.TIME_ZONE)).date()
    return f"jobsite:prune:done:{day.isoformat()}"


def prune_due(*, now: datetime) -> bool:
    """True once today's JOBSITE_PRUNE_TIME (in TIME_ZONE) has passed and
    today's prune has not been started yet."""
    clock = prune_clock()
    if clock is None or retention_days() <= 0:
        return False
    local = now.astimezone(ZoneInfo(settings.TIME_ZONE))
    if (local.hour, local.minute) < clock:
        return False
    return not cache.get(_done_key(now))


def prune_daily(*, now: datetime) -> bool:
    """For the clock's tick: start today's prune, once. True when it was
    handed to the workers.

    The prune runs as a django-q2 task, not in the tick: deleting a backlog
    of a million runs takes minutes, and the clock must keep firing jobs on
    time meanwhile. cache.add claims the day, so a second scheduler does not
    start it again (if it did, no harm: each batch re-checks its runs).
    """
    if not prune_due(now=now):
        return False
    if not cache.add(_done_key(now), now.isoformat(), timeout=3 * 86400):
        return False
    from django_q.tasks import async_task

    async_task(
        "jobs.retention.prune_task",
        retention_days(),
        now.isoformat(),
        q_options={"task_name": f"prune_runs {_done_key(now).rsplit(':', 1)[1]}"},
    )
    return True


def prune_task(days: int, now_iso: str) -> str:
    """django-q2 entry point of the daily prune (thin)."""
    report = prune_runs(older_than=timedelta(days=days), now=datetime.fromisoformat(now_iso))
    summary = (
        f"pruned {report.runs} runs finished before {report.cutoff.isoformat()} "
        f"({report.log_chunks} log chunks, {report.artifacts} artifacts; "
        f"{report.orphaned_files} files of runs deleted another way) in "
        f"{report.elapsed:.1f}s, {report.batches} batches, longest {report.longest_batch:.3f}s"
    )
    log.info(summary)
    return summary
