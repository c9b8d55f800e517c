"""The run lifecycle: create, dispatch, claim, execute, finish, retry, cancel.

Admin actions, pages, the CLI, the clock and django-q2 tasks all call these
functions: one code path for starting a run, whoever starts it.

A run's way through: run_create (upstream gate, overlap policy) -> dispatch
(enqueued_at set, handed to django-q2 after commit) -> run_claim on a worker
(queued -> running, takes the job's slot) -> run_execute -> run_finish (frees
the slot, schedules a retry, dispatches the next waiting run, triggers
downstream jobs). Every step is a conditional UPDATE, so a duplicated task,
a second scheduler or a racing sweeper finds nothing to do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import DatabaseError, IntegrityError, connection, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import BigIntegerField, Case, CharField, F, Q, QuerySet, Value, When
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from jobs import alerts, artifacts, delivery, execution, kinds, scratch, stats
from jobs.models import SECRET_MASK, Artifact, Job, MissedFires, Run, RunLogChunk
from jobs.runlog import RunLogWriter

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- Creating and dispatching runs ------------------------------------------------


def run_create(
    *,
    job: Job,
    trigger: str,
    by: AbstractBaseUser | None = None,
    scheduled_for: datetime | None = None,
    rerun_of: Run | None = None,
    here: bool = False,
    now: datetime | None = None,
    plan: tuple[str | None, bool] | None = None,
    noted: bool = False,
) -> Run:
    """Record a run for `job` and hand it to the workers.

    1. Upstream gate: if an upstream's latest run did not succeed (or one is
       running), the run is recorded as skipped, saying which and why.
    2. Overlap policy, against the job's queued and running runs:
       skip -> skipped with the blocking run; queue -> waits (at most one
       waiting); replace -> the running run is cancelled, this one waits for
       it to end; allow -> no check.
    3. Otherwise the run is dispatched. `here=True` means the caller claims
       and executes it itself (manage.py runjob): it is marked dispatched but
       not sent to django-q2.

    A scheduled run notes its time on the job (staleness reads it), unless
    the caller did (`noted`: the clock does it in the UPDATE that claims the
    fire).

    Steps 1 and 2 only read (`plan`, if the caller read them already), and
    are done before the transaction: on SQLite it holds the one write lock
    every worker waits for. A run created meanwhile by someone else cannot
    make two runs of a job execute at once: the job's slot, taken at claim
    time, still decides (run_claim).
    """
    now = now or timezone.now()
    triggered = trigger == Run.Trigger.UPSTREAM
    at = now if triggered else scheduled_for  # as gate_time()
    reason, wait = plan if plan is not None else run_plan(job, now=now, at=at, triggered=triggered)
    fields = dict(
        job=job,
        trigger=trigger,
        triggered_by=by if by is not None and by.is_authenticated else None,
        scheduled_for=scheduled_for or now,
        queued_at=now,
        rerun_of=rerun_of,
    )
    with transaction.atomic():
        if trigger == Run.Trigger.SCHEDULE and not noted:
            _note_fire(job, fields["scheduled_for"])
        if reason is not None:
            skipped = _insert_run(
                **fields, status=Run.Status.SKIPPED, finished_at=now, error_summary=reason
            )
            stats.record_finished(skipped)
            return skipped
        if not wait:  # dispatched as it is created: one INSERT, no UPDATE after it
            fields.update(enqueued_at=now, enqueue_count=1)
        run = _insert_run(**fields, status=Run.Status.QUEUED)
        if job.overlap == Job.Overlap.REPLACE:
            _replace_others(job, run, now=now)
        if not wait and not here:
            _send(run)
    return run


def _insert_run(**fields) -> Run:
    """Run.objects.create(**fields), with the INSERT written out once per
    database: the ORM spent more CPU building it and preparing its 30
    values than the database spent storing the row, on every run."""
    run = Run(**fields)
    sql, columns, returning = _run_insert(connection.vendor)
    params = [_prepared(field, kind, getattr(run, field.attname)) for field, kind in columns]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        run.pk = cursor.fetchone()[0] if returning else cursor.lastrowid
    run._state.adding = False
    run._state.db = connection.alias
    return run


def _update_run(run_id: int, fields: dict, *, status: str) -> int:
    """Run.objects.filter(pk=run_id, status=status).update(**fields)."""
    return _execute(*_run_update_sql(run_id, fields, status=status))


def _run_update_sql(run_id: int, fields: dict, *, status: str) -> tuple[str, list]:
    """(SQL, params) of the run's UPDATE (fields) if it has `status`, written
    out as _insert_run is: the outcome's UPDATE, which every run pays for
    inside the write transaction. Expressions (F()) go the ORM's way."""
    columns = _run_columns(connection.vendor)
    if any(name not in columns or hasattr(v, "resolve_expression") for name, v in fields.items()):
        query = Run.objects.filter(pk=run_id, status=status).query.chain(UpdateQuery)
        query.add_update_values(fields)
        return query.get_compiler(connection.alias).as_sql()
    sets, params = [], []
    for name, value in fields.items():
        column, field, kind = columns[name]
        sets.append(f"{column} = %s")
        params.append(_prepared(field, kind, value))
    table = connection.ops.quote_name(Run._meta.db_table)
    sql = f"UPDATE {table} SET {', '.join(sets)} WHERE id = %s AND status = %s"
    return sql, [*params, run_id, status]


def _prepared(field, kind: str, value):
    if kind == "datetime":
        # As the ORM does: a naive datetime is taken in TIME_ZONE (with its warning).
        return field.get_db_prep_value(value, connection)
    if kind == "prepare":
        return field.get_db_prep_save(value, connection)
    return value


@functools.lru_cache(maxsize=4)
def _run_columns(vendor: str) -> dict[str, tuple]:
    """A run's fields by name (relations by attname, e.g. job_id): (quoted
    column, field, how its value is prepared: passed as it is, adapted as
    a datetime, or (JSON, anything not plain) prepared by the field as the
    ORM does)."""
    columns = {}
    for field in Run._meta.concrete_fields:
        columns[field.name if not field.is_relation else field.attname] = (
            connection.ops.quote_name(field.column),
            field,
            _value_kind(field),
        )
    return columns


# Django's own field classes whose value goes to the driver as it is. Only
# these exact classes: a subclass may prepare its value (encrypt, normalise).
_PLAIN_FIELDS = (
    models.CharField,
    models.TextField,
    models.BooleanField,
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveBigIntegerField,
    models.PositiveSmallIntegerField,
    models.AutoField,
    models.BigAutoField,
    models.SmallAutoField,
)


def _value_kind(field) -> str:
    """How _prepared treats the field's value: "datetime", "as is", or
    "prepare" (by the field, as the ORM does)."""
    if type(field) is models.DateTimeField:
        return "datetime"
    if type(field.target_field if field.is_relation else field) in _PLAIN_FIELDS:
        return "as is"
    return "prepare"


@functools.lru_cache(maxsize=4)
def _run_insert(vendor: str) -> tuple[str, list[tuple], bool]:
    """(INSERT of a run's columns but its id, each column's (field, how its
    value is prepared; see _run_columns), whether the INSERT returns the new id)."""
    qn = connection.ops.quote_name
    inserted = [c for c in _run_columns(vendor).values() if not c[1].primary_key]
    columns = [(field, kind) for _column, field, kind in inserted]
    names = ", ".join(column for column, _field, _kind in inserted)
    marks = ", ".join(["%s"] * len(inserted))
    sql = f"INSERT INTO {qn(Run._meta.db_table)} ({names}) VALUES ({marks})"
    returning = connection.features.can_return_columns_from_insert
    if returning:
        sql += f" RETURNING {qn(Run._meta.pk.column)}"
    return sql, columns, returning


def run_plan(
    job: Job, *, now: datetime, at: datetime | None = None, triggered: bool = False
) -> tuple[str | None, bool]:
    """(skip reason, must wait) for a new run of `job` for the logical time
    `at` (default: now): its upstream gate, then its overlap policy. Reads
    only. `triggered`: the run is started by its upstreams' success."""
    reason = upstream_blocker(job, now=now, at=at, triggered=triggered)
    if reason is not None:
        return reason, False
    return _apply_overlap(job, now=now)


def claim_fire(job: Job, *, following: datetime | None, latest: datetime | None) -> bool:
    """The clock's claim of `job`'s due fires, as read: next_fire_at moves to
    `following`, and `latest` (if any) is noted as _note_fire() does. One
    UPDATE, written out (the ORM spent 0.8 ms of the clock's CPU per fire
    building it). False if another scheduler claimed them first."""
    if job.next_fire_at is None:  # not due; "= NULL" would match nothing either
        return False
    adapt = connection.ops.adapt_datetimefield_value
    claimed = [job.pk, adapt(job.next_fire_at), job.fire_basis]
    if latest is None:
        return bool(_execute(_sql(connection.vendor, "claim_fire"), [adapt(following), *claimed]))
    noted = [adapt(following), adapt(latest), adapt(latest), *claimed]
    return bool(_execute(_sql(connection.vendor, "claim_fire_noted"), noted))


def _note_fire(job: Job, latest: datetime) -> None:
    """Job.last_scheduled_for := `latest`, unless a later fire was noted
    already. Only clock fires count: a manual run does not prove that the
    schedule works (and skipping the write spares the job row a lock on
    every manual run). The clock notes in its claim instead (claim_fire)."""
    at = connection.ops.adapt_datetimefield_value(latest)
    _execute(_sql(connection.vendor, "note_fire"), [at, at, job.pk])


def _apply_overlap(job: Job, *, now: datetime) -> tuple[str | None, bool]:
    """(skip reason, must wait) for a new run under the job's overlap policy."""
    if job.overlap == Job.Overlap.ALLOW:
        return None, False
    # (id, status) pairs, written out: every fire of the clock asks this,
    # and the ORM took longer to build the SELECT than the database to run it.
    active = _fetch(_sql(connection.vendor, "active_runs"), [job.pk, *Run.ACTIVE])
    if job.overlap == Job.Overlap.SKIP:
        if active:
            return f"run #{active[0][0]} still {active[0][1]}", False
        return None, False
    running = [pk for pk, status in active if status == Run.Status.RUNNING]
    if job.overlap == Job.Overlap.QUEUE:
        waiting = [pk for pk, status in active if status == Run.Status.QUEUED]
        if waiting:
            return f"run #{waiting[0]} is already waiting", False
        return None, bool(running)
    return None, bool(running)  # replace: wait for the cancelled run to end


def _replace_others(job: Job, run: Run, *, now: datetime) -> None:
    for other in Run.objects.filter(job=job, status__in=Run.ACTIVE).exclude(pk=run.pk):
        run_cancel(run=other, by=None, reason=f"Replaced by run #{run.pk}", now=now)


def _send(run: Run) -> None:
    """Hand a run created or dispatched in this transaction to django-q2.

    With the ORM broker on this database the task row is written in the
    same transaction: one commit instead of two, and no moment where the run
    is marked dispatched but its task not yet written. Otherwise (Redis, or
    tasks run inline) it is sent once the transaction commits, so a worker
    never looks for a run it cannot see yet.
    """
    from django_q.conf import Conf

    if Run.objects.db == Conf.ORM and not Conf.SYNC and connection.in_atomic_block:
        run_enqueue(run)
    else:
        transaction.on_commit(lambda: run_enqueue(run))


def run_enqueue(run: Run) -> None:
    """Send a run to django-q2. Safe to repeat: the worker's claim makes a
    second delivery a no-op."""
    from django_q.tasks import async_task

    job = run.job
    options: dict = {
        "task_name": f"{job.slug}#{run.pk}",
        # Outer bound only: we kill the job's process group at job.timeout.
        "timeout": job.timeout + settings.JOBSITE_KILL_GRACE + 60,
    }
    if job.queue:
        options["cluster"] = job.queue
    options["broker"] = _broker(job.queue or None)
    async_task("jobs.tasks.execute_run", run.pk, q_options=options)


_brokers: dict[tuple[int, str | None], object] = {}


def _broker(cluster: str | None):
    """django-q2's broker for `cluster` (None: the default queue), made once
    per process: async_task otherwise builds one for every task (with the
    ORM broker about a fifth of the enqueue's CPU; with Redis a new client)."""
    from django_q.brokers import get_broker

    key = (os.getpid(), cluster)
    if key not in _brokers:
        _brokers[key] = get_broker(cluster)
    return _brokers[key]


def dispatch_waiting(*, now: datetime, job: Job | None = None, asked: bool = False) -> int:
    """Send waiting runs (retries whose delay has passed, runs queued behind
    another, catch-up runs) to the workers when their job is free.
    `asked`: the caller already knows that something of `job` waits."""
    waiting = (
        Run.objects.filter(status=Run.Status.QUEUED, enqueued_at__isnull=True)
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .select_related("job")
        .order_by("id")
    )
    if job is not None:
        # After every run of a job that does not allow overlap: nearly
        # always nothing waits. A pk-only question first, written out, since
        # compiling the run-and-job SELECT below (2.7 ms of CPU) or even the
        # question (0.7 ms) costs more than the query, inside the finishing
        # run's transaction.
        if not asked and not _fetch(
            _sql(connection.vendor, "waiting"), [job.pk, Run.Status.QUEUED]
        ):
            return 0
        waiting = waiting.filter(job=job)
    sent = 0
    busy: set[int] = set()
    for run in waiting[:500]:
        if _paused(run):
            with transaction.atomic():
                _skip_paused(run, now=now)
            continue
        if run.job_id in busy:
            continue
        if run.job.overlap != Job.Overlap.ALLOW:
            busy.add(run.job_id)
            if _job_busy(run):
                continue
        # Gated again as it starts, not only when it was created: a retry
        # (or a run that waited its turn) must not run after an upstream's
        # run for its logical time failed or while one is under way.
        blocked = upstream_blocker(
            run.job,
            now=now,
            at=gate_time(run, now=now),
            triggered=run.trigger == Run.Trigger.UPSTREAM,
        )
        if blocked is not None:
            with transaction.atomic():
                _skip_blocked(run, reason=blocked, now=now)
            busy.discard(run.job_id)  # the job's next waiting run may go
            continue
        with transaction.atomic():
            if Run.objects.filter(pk=run.pk, enqueued_at__isnull=True).update(
                enqueued_at=now, enqueue_count=1
            ):
                _send(run)
                sent += 1
    return sent


# What a pause stops: the runs the clock, a retry or an upstream started
# (a user pauses a broken job to stop it). A run a user asked for (Run now,
# rerun, runjob) runs even while its job is paused.
PAUSABLE = (Run.Trigger.SCHEDULE, Run.Trigger.RETRY, Run.Trigger.UPSTREAM)


def _paused(run: Run) -> bool:
    return not run.job.enabled and run.trigger in PAUSABLE


def _skip_paused(run: Run, *, now: datetime, was: str = Run.Status.QUEUED) -> bool:
    """Skip a pending run of a paused job, if it still is `was`. In the
    caller's transaction."""
    if not Run.objects.filter(pk=run.pk, status=was).update(
        status=Run.Status.SKIPPED,
        finished_at=now,
        started_at=None,
        heartbeat_at=None,
        worker="",
        error_summary="paused",
    ):
        return False
    run.status, run.finished_at, run.started_at = Run.Status.SKIPPED, now, None
    run.error_summary = "paused"
    stats.record_finished(run)
    alerts.on_retry_dropped(run, now=now)  # the failure it was to retry counts
    return True


def _skip_blocked(run: Run, *, reason: str, now: datetime) -> bool:
    """Skip a waiting run whose upstreams say no, if it still waits. In the
    caller's transaction."""
    if not Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED, enqueued_at=None).update(
        status=Run.Status.SKIPPED, finished_at=now, error_summary=reason
    ):
        return False
    run.status, run.finished_at, run.error_summary = Run.Status.SKIPPED, now, reason
    stats.record_finished(run)
    alerts.on_retry_dropped(run, now=now)  # the failure it was to retry counts
    return True


# A run that holds or is about to take its job's slot: the job is busy.
BUSY = Q(status=Run.Status.RUNNING) | Q(status=Run.Status.QUEUED, enqueued_at__isnull=False)


def _job_busy(run: Run) -> bool:
    return Run.objects.filter(BUSY, job_id=run.job_id).exclude(pk=run.pk).exists()


# Fires one backfill may run: a slip of the year in a range must not
# queue thousands of runs.
BACKFILL_MAX = 1000


class BackfillError(ValueError):
    """A backfill that cannot be done as asked, with the reason."""


def backfill_fires(job: Job, *, start: datetime, end: datetime) -> list[datetime]:
    """The job's scheduled fires from `start` to `end`, both included, oldest
    first; BackfillError when there is no schedule, none, or too many."""
    from jobs import scheduling

    if not job.schedule:
        raise BackfillError(f"{job.name} has no schedule: there are no fires to backfill.")
    if end < start:
        raise BackfillError("The range ends before it begins.")
    try:
        fires, total = scheduling.fires_counted(
            job.schedule, job.timezone, start - timedelta(microseconds=1), end, keep=BACKFILL_MAX
        )
    except scheduling.ScheduleError as exc:
        raise BackfillError(str(exc)) from exc
    if total > BACKFILL_MAX:
        raise BackfillError(
            f"{total} fires in that range; a backfill runs at most {BACKFILL_MAX}. "
            "Ask for a shorter range."
        )
    if not fires:
        raise BackfillError(f"{job.name} has no fire in that range ({job.describe_schedule()}).")
    return fires


def run_backfill(
    *, job: Job, start: datetime, end: datetime, by: AbstractBaseUser | None, now: datetime
) -> list[Run]:
    """Runs of `job` for its fires from `start` to `end` (trigger backfill,
    each with its fire as logical time), oldest first. They wait and are
    started one after another (together when the job allows overlap), each
    gated on its upstreams for its own logical time, like catch-up runs.
    A paused job's backfill still runs: a person asked for it."""
    fires = backfill_fires(job, start=start, end=end)
    user = by if by is not None and by.is_authenticated else None
    with transaction.atomic():
        runs = Run.objects.bulk_create(
            Run(
                job=job,
                trigger=Run.Trigger.BACKFILL,
                triggered_by=user,
                scheduled_for=at,
                queued_at=now,
                status=Run.Status.QUEUED,
            )
            for at in fires
        )
    if not connection.features.can_return_rows_from_bulk_insert:  # SQLite < 3.35
        runs = list(Run.objects.filter(job=job, trigger=Run.Trigger.BACKFILL, queued_at=now))
    dispatch_waiting(now=now, job=job, asked=True)
    return runs


def missed_fires_backfill(
    *, gap: MissedFires, by: AbstractBaseUser | None, now: datetime
) -> list[Run]:
    """Run the fires of a gap the scheduler missed after all, once: the gap
    is claimed (backfilled_at, a conditional UPDATE) so that a second press
    or a second person queues nothing. [] when it was claimed already."""
    if not MissedFires.objects.filter(pk=gap.pk, backfilled_at__isnull=True).update(
        backfilled_at=now
    ):
        return []
    try:
        return run_backfill(job=gap.job, start=gap.first, end=gap.last, by=by, now=now)
    except BackfillError:
        MissedFires.objects.filter(pk=gap.pk).update(backfilled_at=None)
        raise


def run_rerun(*, run: Run, by: AbstractBaseUser | None) -> Run:
    """A new run of the same job for the same logical time."""
    return run_create(
        job=run.job,
        trigger=Run.Trigger.RERUN,
        by=by,
        scheduled_for=run.scheduled_for,
        rerun_of=run,
    )


# --- Dependencies -------------------------------------------------------------------


def upstream_blocker(
    job: Job, *, now: datetime, at: datetime | None = None, triggered: bool = False
) -> str | None:
    """Why `job` may not run now for the logical time `at` (default: now)
    because of its upstreams, or None.

    Each upstream is judged by its run for the latest logical time up to
    `at`, the newest attempt of it (a rerun or retry has the original's
    time): that must have succeeded, and no run for that time may be queued
    or running. Not by which run finished last: a rerun of last week's run
    that succeeds after today's run failed says nothing about today's data,
    and a run still queued has not produced it yet. Nor may a scheduled
    upstream have a fire up to `at` with no run (it is paused, or no clock
    fired it): its last success is older data. Except for a run its
    upstreams' success started (`triggered`): that success is the news.
    """
    # Most jobs have none: ask the link table alone, written out (no join,
    # no model instances; building it with the ORM was a quarter of
    # run_create's CPU), since every run and every fire pays for this question.
    if not _fetch(_sql(connection.vendor, "has_upstreams"), [job.pk]):
        return None
    at = at or now
    for upstream in job.upstreams.all():
        deciding = upstream_run(upstream, at=at)
        if deciding is None:
            return f"waiting on {upstream.name}: it has not run yet"
        if deciding.status in Run.ACTIVE:
            return f"waiting on {upstream.name}: run #{deciding.pk} still {deciding.status}"
        if deciding.status != Run.Status.SUCCEEDED:
            when = timezone.localtime(deciding.finished_at or deciding.queued_at, _tz(job))
            status = deciding.status.replace("_", " ")
            return f"waiting on {upstream.name}: {status} at {when:%Y-%m-%d %H:%M %Z}"
        if not triggered and (fire := unrun_fire(upstream, deciding, at=at)):
            when = f"{timezone.localtime(fire, _tz(job)):%Y-%m-%d %H:%M %Z}"
            paused = "" if upstream.enabled else " (it is paused)"
            return f"waiting on {upstream.name}: no run for its fire at {when}{paused}"
        other = Run.objects.filter(
            job=upstream, scheduled_for=deciding.scheduled_for, status__in=Run.ACTIVE
        ).first()
        if other is not None:  # e.g. the original, still running beside its rerun
            return f"waiting on {upstream.name}: run #{other.pk} still {other.status}"
    return None


def upstream_run(upstream: Job, *, at: datetime) -> Run | None:
    """The run of `upstream` that decides for a downstream's logical time
    `at`: of its runs for the latest logical time up to `at`, the newest."""
    # run_job_logical_idx (job, -scheduled_for, -id).
    return (
        Run.objects.filter(job=upstream, scheduled_for__lte=at)
        .order_by("-scheduled_for", "-id")
        .first()
    )


def unrun_fire(upstream: Job, deciding: Run, *, at: datetime) -> datetime | None:
    """The upstream's latest scheduled fire up to `at`, if the run that
    decides for it (`upstream_run`) is for an earlier time: that fire has
    not run. Fires from before its schedule began (`schedule_since`, set on
    resume and on a schedule edit) do not count."""
    from jobs import scheduling

    if not upstream.schedule:
        return None
    try:
        fires = scheduling.previous_fires(upstream.schedule, upstream.timezone, at, 1)
    except scheduling.ScheduleError:
        return None
    since = upstream.schedule_since or upstream.created_at
    if not fires or fires[0] < since or deciding.scheduled_for >= fires[0]:
        return None
    return fires[0]


def gate_time(run: Run, *, now: datetime) -> datetime:
    """The logical time a run's upstreams are judged at: its own, but for a
    run an upstream's success started (its upstreams' own times may differ:
    a fan-in of jobs on other schedules), judged as of now."""
    return now if run.trigger == Run.Trigger.UPSTREAM else run.scheduled_for


def latest_finished(job: Job) -> Run | None:
    """The run of `job` that finished last (by finish time: a run skipped
    while a long one ran finishes before it)."""
    return (
        Run.objects.filter(job=job, status__in=Run.FINISHED).order_by("-finished_at", "-id").first()
    )


def _tz(job: Job):
    from jobs import scheduling

    try:
        return scheduling.zone(job.timezone)
    except scheduling.ScheduleError:
        return timezone.get_current_timezone()


def dependency_cycle(job: Job | None, upstream_ids: list[int]) -> list[str] | None:
    """The names along a cycle that giving `job` these upstreams would make, or None."""
    if job is None or job.pk is None:
        return None
    edges: dict[int, list[int]] = {}
    for down, up in Job.upstreams.through.objects.values_list("from_job_id", "to_job_id"):
        edges.setdefault(down, []).append(up)
    edges[job.pk] = list(upstream_ids)
    path = _find_path(edges, start=job.pk)
    if path is None:
        return None
    names = dict(Job.objects.filter(pk__in=path).values_list("pk", "name"))
    return [names[pk] for pk in path]


def _find_path(edges: dict[int, list[int]], *, start: int) -> list[int] | None:
    """A path start -> ... -> start following upstream edges (DFS), or None."""
    stack = [(start, [start])]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        for nxt in edges.get(node, []):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def _trigger_downstreams(run: Run, *, now: datetime, downstreams: list[int] | None = None) -> None:
    """After a success: start each upstream-triggered downstream job whose
    upstreams have all succeeded since its own last run. `downstreams`: the
    linked jobs' ids, when the caller has asked already."""
    if downstreams is None:  # most jobs have none
        downstreams = [pk for (pk,) in _fetch(_sql(connection.vendor, "downstreams"), [run.job_id])]
    for pk in downstreams:
        with transaction.atomic():
            # Serialize with other finishing upstreams of the same job.
            down = Job.objects.select_for_update().get(pk=pk)
            if not (down.enabled and down.trigger_on_upstream):
                continue
            # Its last run that was not skipped: a skipped run (Run now
            # while an upstream still ran) used none of the upstreams'
            # successes, and counting it would leave the job waiting for a
            # success of every upstream again.
            last = (
                Run.objects.filter(job=down)
                .exclude(status=Run.Status.SKIPPED)
                .order_by("-id")
                .first()
            )
            since = last.queued_at if last else None
            if all(_succeeded_since(up, since) for up in down.upstreams.all()):
                run_create(job=down, trigger=Run.Trigger.UPSTREAM, scheduled_for=run.scheduled_for)


def _succeeded_since(job: Job, since: datetime | None) -> bool:
    latest = latest_finished(job)
    if latest is None or latest.status != Run.Status.SUCCEEDED:
        return False
    return since is None or latest.finished_at > since


# --- Claiming, executing, finishing ------------------------------------------------


def run_claim(*, run_id: int, worker: str, now: datetime | None = None) -> Run | None:
    """queued -> running, or None when another worker (or nobody) has it.

    A redelivered or duplicated django-q2 task finds nothing to claim. Unless
    the job allows overlap the run must also take its job's slot; if another
    run holds it, this one is skipped (policy skip) or goes back to waiting
    (queue, replace).
    """
    now = now or timezone.now()
    at = connection.ops.adapt_datetimefield_value(now)
    params = [Run.Status.RUNNING, at, at, worker, run_id, Run.Status.QUEUED]
    query = _queued_run_query(connections[connection.alias])
    statement = _claim_statement(query[0]) if query and connection.vendor == "postgresql" else None
    if statement is not None:
        claimed = _claim_in_one_statement(statement, query, params, run_id=run_id)
        if claimed is None:
            return None
        run, slot_taken = claimed
        if _paused(run):  # rare: checked after the one statement, not before it
            with transaction.atomic():
                _skip_paused(run, now=now, was=Run.Status.RUNNING)
                if slot_taken:
                    Job.objects.filter(pk=run.job_id, active_run=run.pk).update(active_run=None)
            return None
        if run.job.overlap == Job.Overlap.ALLOW or slot_taken:
            return run
        with transaction.atomic():
            return _slot_held(run, now=now)
    # Read first, outside any transaction: on SQLite a transaction holds the
    # one write lock that every worker, the scheduler and django-q2's pusher
    # and monitor queue for, so it should hold nothing but the writes.
    run = _queued_run(run_id, query)
    if run is None:
        return None
    if _paused(run):
        with transaction.atomic():
            _skip_paused(run, now=now)
        return None
    job = run.job
    claim = {"status": Run.Status.RUNNING, "started_at": now, "heartbeat_at": now, "worker": worker}
    with transaction.atomic():
        if not _execute(_sql(connection.vendor, "claim"), params):
            return None
        for name, value in claim.items():
            setattr(run, name, value)
        if job.overlap == Job.Overlap.ALLOW or _take_slot(job, run):
            return run
        return _slot_held(run, now=now)


def _slot_held(run: Run, *, now: datetime) -> None:
    """The run was claimed but another run holds its job's slot: skip it
    (policy skip) or send it back to waiting (queue, replace). In the
    caller's transaction."""
    job, run_id = run.job, run.pk
    holder = Job.objects.values_list("active_run_id", flat=True).get(pk=job.pk)
    if job.overlap == Job.Overlap.SKIP:
        Run.objects.filter(pk=run_id).update(
            status=Run.Status.SKIPPED,
            finished_at=now,
            error_summary=f"run #{holder} still running",
        )
        run.refresh_from_db()
        stats.record_finished(run)
    else:
        Run.objects.filter(pk=run_id).update(
            status=Run.Status.QUEUED, started_at=None, heartbeat_at=None, enqueued_at=None
        )
    return None


def _claim_in_one_statement(
    statement: str, query: tuple, params: list, *, run_id: int
) -> tuple[Run, bool] | None:
    """PostgreSQL: claim the run, take its job's slot (unless the job allows
    overlap) and read run and job back, all in one statement: one round trip
    instead of five (the SELECT, then BEGIN, the claim, the slot, COMMIT).
    On a server that shares the workers' cores each round trip costs a
    context switch both ways. (run, whether the slot was taken), or None
    when the run is not queued (another worker has it)."""
    _select, compiler, converters, split = query
    rows = _fetch(statement, [*params, Job.Overlap.ALLOW, *Run.ACTIVE, run_id])
    if not rows:
        return None
    (row,) = compiler.apply_converters(rows, converters) if converters else rows
    *row, slot_taken = row
    return _run_and_job(row, split), bool(slot_taken)


@functools.lru_cache(maxsize=4)
def _claim_statement(select: str) -> str | None:
    """The claim's UPDATE and the slot's, as data-modifying CTEs in front of
    the compiled run-and-job SELECT (aliased so that its columns still
    resolve). The job's columns are as they were before the slot was taken.
    Params: the claim's six, overlap "allow", the active statuses, run id.
    None if the SELECT is not shaped as expected (the general way then)."""
    qn = connection.ops.quote_name
    jobs, runs = qn(Job._meta.db_table), qn(Run._meta.db_table)
    free = _sql("postgresql", "slot_free").format(run="c.id")
    source = f" FROM {runs} "
    if select.count(source) != 1 or select.count(" WHERE ") != 1:
        return None
    columns, rest = select.split(source)
    joined, _where = rest.split(" WHERE ")
    return (
        f"WITH claimed AS ({_sql('postgresql', 'claim')} RETURNING *),"
        f" slot AS (UPDATE {jobs} SET active_run_id = c.id FROM claimed c"
        f" WHERE {jobs}.id = c.job_id AND {jobs}.overlap <> %s AND {free} RETURNING 1)"
        f"{columns}, (SELECT count(*) FROM slot) FROM claimed AS {runs} {joined}"
        f" WHERE {runs}.id = %s"
    )


@functools.lru_cache(maxsize=16)
def _sql(vendor: str, name: str) -> str:
    """The statements every run pays for, written out. Built by the ORM
    they cost 0.7-1.5 ms of CPU each against 0.05-0.1 ms to run, and most
    run inside a write transaction: on SQLite, time every other worker
    waits at the one write lock. `vendor` keys the cache (quoting)."""
    qn = connection.ops.quote_name
    jobs, runs = qn(Job._meta.db_table), qn(Run._meta.db_table)
    links = qn(Job.upstreams.through._meta.db_table)
    newer = "last_end_run_id IS NULL OR last_end_run_id < %s"
    # Params: job id, queued. / The upstream job's id.
    waiting = f"SELECT 1 FROM {runs} WHERE job_id = %s AND status = %s AND enqueued_at IS NULL"
    downstreams = f"SELECT from_job_id FROM {links} WHERE to_job_id = %s"
    note = (
        "last_scheduled_for = CASE WHEN last_scheduled_for IS NULL"
        " OR last_scheduled_for < %s THEN %s ELSE last_scheduled_for END"
    )
    claimed = "WHERE id = %s AND next_fire_at = %s AND fire_basis = %s"
    return {
        # Params: status, started_at, heartbeat_at, worker, run id, queued.
        "claim": (
            f"UPDATE {runs} SET status = %s, started_at = %s, heartbeat_at = %s, worker = %s"
            " WHERE id = %s AND status = %s"
        ),
        # Params: last_success_at, run id (slot), run id, status, run id x2
        # (latest outcome), job id, alert state ok.
        "end_success": (
            f"UPDATE {jobs} SET consecutive_failures = 0, last_success_at = %s,"
            " active_run_id = CASE WHEN active_run_id = %s THEN NULL ELSE active_run_id END,"
            f" last_end_status = CASE WHEN {newer} THEN %s ELSE last_end_status END,"
            f" last_end_run_id = CASE WHEN {newer} THEN %s ELSE last_end_run_id END"
            " WHERE id = %s AND alert_state = %s"
        ),
        "waiting": f"{waiting} LIMIT 1",
        # The job's queued and running runs as (id, status), oldest first.
        # Params: job id, the active statuses.
        "active_runs": (
            f"SELECT id, status FROM {runs} WHERE job_id = %s"
            f" AND status IN ({', '.join(['%s'] * len(Run.ACTIVE))}) ORDER BY id"
        ),
        # A fire noted on its job (staleness reads it), forward only.
        # Params: latest fire x2, job id.
        "note_fire": f"UPDATE {jobs} SET {note} WHERE id = %s",
        # The clock's claim of a job's due fires: the next fire time moves on
        # from the value read, and (with "_noted") the latest fire is noted
        # as above. Params: next fire[, latest fire x2], job id,
        # next_fire_at as read, fire_basis as read.
        "claim_fire": f"UPDATE {jobs} SET next_fire_at = %s {claimed}",
        "claim_fire_noted": f"UPDATE {jobs} SET next_fire_at = %s, {note} {claimed}",
        "downstreams": downstreams,
        # Params: the downstream job's id.
        "has_upstreams": f"SELECT 1 FROM {links} WHERE from_job_id = %s LIMIT 1",
        # Both questions in one round trip, after a success of a job that
        # does not allow overlap: a row of -1 if a run waits, then the
        # downstream jobs' ids. Params: job id, queued, job id.
        "waiting_and_downstreams": f"SELECT -1 WHERE EXISTS ({waiting}) UNION ALL {downstreams}",
        # The same two as columns (PostgreSQL: a bool and an array), for the
        # outcome's one statement. Params: job id, queued, job id.
        "waiting_and_downstreams_columns": f"EXISTS ({waiting}), ARRAY({downstreams})",
        # Whether the job row's slot (active_run_id) is free for the run
        # `{run}` names: empty, already that run's, or held by a run that is
        # no longer active. Params: the active statuses.
        "slot_free": (
            "(active_run_id IS NULL OR active_run_id = {run} OR NOT EXISTS ("
            f"SELECT 1 FROM {runs} r WHERE r.id = {jobs}.active_run_id"
            f" AND r.status IN ({', '.join(['%s'] * len(Run.ACTIVE))})))"
        ),
    }[name]


def _execute(sql: str, params: list) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _fetch(sql: str, params: list) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _queued_run(run_id: int, query: tuple | None) -> Run | None:
    """The run, with its job, if it is queued: the claim's first question,
    asked with SQL compiled once per process. The ORM took 1.5-2.5 ms of
    CPU to build this SELECT of 80 columns and its two instances, against
    0.1 ms to run it, on every run (6 ms a claim in a burst, 4 workers on
    2 cores). Rows are converted and instances built as the ORM does.
    `query`: _queued_run_query() of this connection."""
    if query is None:  # not the shape expected: the ORM's way
        return Run.objects.select_related("job").filter(pk=run_id, status=Run.Status.QUEUED).first()
    sql, compiler, converters, split = query
    rows = _fetch(sql, [run_id, Run.Status.QUEUED])
    if not rows:
        return None
    (row,) = compiler.apply_converters(rows, converters) if converters else rows
    return _run_and_job(row, split)


def _run_and_job(row, split: int) -> Run:
    """The run, with its job cached, from a converted row of the claim's
    SELECT (the job's columns start at `split`), built as the ORM does."""
    run = Run.from_db(connection.alias, [f.attname for f in Run._meta.concrete_fields], row[:split])
    job = Job.from_db(connection.alias, [f.attname for f in Job._meta.concrete_fields], row[split:])
    Run.job.field.set_cached_value(run, job)
    return run


@functools.lru_cache(maxsize=8)
def _queued_run_query(wrapper: BaseDatabaseWrapper) -> tuple | None:
    """(SQL, compiler, converters, where the job's columns start) of the
    ORM's select_related SELECT of a queued run, or None when its columns
    are not the run's then the job's (a future Django may differ). Per
    connection object, as the converters are the connection's."""
    alias = wrapper.alias
    queryset = Run.objects.using(alias).select_related("job")
    compiler = queryset.filter(pk=-1, status=Run.Status.QUEUED).query.get_compiler(alias)
    sql, params = compiler.as_sql()
    columns = [col.target for col, _, _ in compiler.select]
    run_fields, job_fields = Run._meta.concrete_fields, Job._meta.concrete_fields
    if list(params) != [-1, Run.Status.QUEUED] or columns != [*run_fields, *job_fields]:
        return None
    converters = compiler.get_converters([col for col, _, _ in compiler.select])
    return sql, compiler, converters, len(run_fields)


def _take_slot(job: Job, run: Run) -> bool:
    """Make `run` the job's active run if the slot is free: empty, already
    this run's, or held by a run that is no longer active.

    Written out: every claim pays for it, and the ORM took 1.0 ms of CPU
    to build this UPDATE (with its join) against 0.05 ms to run it."""
    return _execute(_take_slot_sql(connection.vendor), [run.pk, job.pk, run.pk, *Run.ACTIVE]) > 0


@functools.lru_cache(maxsize=4)
def _take_slot_sql(vendor: str) -> str:
    """Params: run id, job id, run id, the active statuses."""
    free = _sql(vendor, "slot_free").format(run="%s")
    jobs = connection.ops.quote_name(Job._meta.db_table)
    return f"UPDATE {jobs} SET active_run_id = %s WHERE id = %s AND {free}"


def jobsite_variables(run: Run) -> dict[str, str]:
    return {
        "JOBSITE_RUN_ID": str(run.pk),
        "JOBSITE_JOB": run.job.slug,
        "JOBSITE_SCHEDULED_FOR": run.scheduled_for.isoformat(),
        "JOBSITE_ATTEMPT": str(run.attempt),
        "JOBSITE_TRIGGER": run.trigger,
    }


def child_environment(run: Run) -> dict[str, str]:
    """The child's environment: the same for every trigger (raises
    execution.UnresolvedReference for a ${NAME} the server lacks)."""
    return execution.build_environment(
        job_environment=run.job.environment, jobsite_variables=jobsite_variables(run)
    )


def masked(
    env: dict[str, str], secret_keys: list[str], secret_values: list[str] = ()
) -> dict[str, str]:
    """The environment as shown: values of secret keys masked, and any other
    value that contains a secret (e.g. the delivery password) too."""
    secret = set(secret_keys)
    values = [v for v in secret_values if len(v) >= 3]
    return {
        k: (SECRET_MASK if k in secret or any(s in v for s in values) else v)
        for k, v in sorted(env.items())
    }


def run_execute(run: Run, *, echo: Callable[[str], None] | None = None, reload: bool = True) -> Run:
    """Run a claimed run's job to the end and record the outcome.

    1. Resolve the environment and secrets (a missing ${NAME} fails the run
       before anything starts); the run gets a scratch directory (jobs.scratch).
    2. Run the kind's child process: output to the log, progress to the run.
    3. Collect $JOBSITE_ARTIFACTS_DIR, judge the outcome, deliver on success.

    Returns the run as stored (`reload=False`: only its status and outcome
    fields are current; the worker needs no more, and saves a query).
    """
    job = run.job
    workdir = scratch.take()
    try:
        try:
            env, secrets, password = _resolve(run, workdir)
            child = kinds.child_for(run, workdir=workdir, server_env=dict(os.environ))
        except (execution.UnresolvedReference, kinds.KindError) as exc:
            run_finish(run=run, status=Run.Status.FAILED, summary=f"Not started: {exc}")
            return _reload(run) if reload else run
        shown = {"command": what_runs(job), "environment": masked(env, job.secret_keys, secrets)}
        writer = RunLogWriter(run, redact=secrets, echo=echo)
        watch = _Watch(run, shown=shown)
        status, summary, returncode = _supervise(run, child, env, writer, watch)
        if watch.deleted:
            return _deleted(
                run, status=Run.Status.CANCELLED, summary="Stopped: the run was deleted"
            )
        stored, problem = _collect(run, workdir / "artifacts", writer)
        if problem and status == Run.Status.SUCCEEDED:
            status, summary = Run.Status.FAILED, problem
        elif problem:
            writer.line(f"[jobsite] {problem}")
        if status == Run.Status.SUCCEEDED and job.deliver_url:
            status, summary = _deliver(job, stored, password, writer, watch)
        writer.end(f"[jobsite] {summary}" if status != Run.Status.SUCCEEDED else "")
        if job.kind == Job.Kind.SHELL and summary == f"Exit code {returncode}":
            # "Exit code 3" tells the person on call little; the line a script
            # printed last is usually the error ("table orders is locked").
            last = writer.last_line()
            summary = f"{summary}: {last}" if last else summary
        try:
            _retrying_database(
                lambda: run_finish(
                    run=run,
                    status=status,
                    exit_code=returncode,
                    summary=summary,
                    also=watch.unsaved_start(),
                    log=writer,
                )
            )
            return _reload(run) if reload else run
        except (IntegrityError, Run.DoesNotExist):
            # The run (or its job) was deleted while it ran: the log's last
            # chunks refer to a run that is gone. Nothing left to record.
            if Run.objects.filter(pk=run.pk).exists():
                raise
            return _deleted(run, status=status, summary=summary)
    finally:
        scratch.give_back(workdir)


def _deleted(run: Run, *, status: str, summary: str) -> Run:
    """A run deleted while it ran (its process group stopped): nothing to
    record, no files to keep; the outcome only for the caller to show."""
    log.warning("run %s was deleted while it ran; its outcome is not recorded", run.pk)
    run.status, run.error_summary = status, summary
    return run


def _resolve(run: Run, workdir: Path) -> tuple[dict[str, str], list[str], str]:
    """(child environment, secret values to redact, delivery password)."""
    job = run.job
    env = child_environment(run)
    env["JOBSITE_ARTIFACTS_DIR"] = str(workdir / "artifacts")
    secrets = [env[k] for k in job.secret_keys if k in env]
    password = ""
    if job.deliver_url and job.deliver_password:  # no password: anonymous FTP
        password = execution.resolve_references(
            {"delivery password": job.deliver_password}, os.environ
        )["delivery password"]
        secrets.append(password)
    return env, execution.secret_forms(secrets), password


def what_runs(job: Job) -> str:
    """What a run of `job` runs, as its run page shows it."""
    if job.kind == Job.Kind.PYTHON:
        return f"{job.callable}(**{json.dumps(job.kwargs)})"
    if job.kind == Job.Kind.SQL:
        return f"-- on {job.database}\n{job.sql}"
    return job.command


def _supervise(
    run: Run, child: kinds.Child, env: dict[str, str], writer: RunLogWriter, watch: _Watch
) -> tuple[str, str, int | None]:
    """Run the child to its end: (status, summary, return code)."""
    progress = _Progress(run, mask=writer.masked)
    try:
        outcome = execution.run_process(
            child.argv,
            env=env | child.env,
            timeout=run.job.timeout,
            kill_grace=settings.JOBSITE_KILL_GRACE,
            on_start=watch.started,
            on_output=writer.feed,
            on_tick=lambda: writer.tick() or progress.flush() or watch.should_stop(),
            on_progress=progress.update,
        )
    except Exception as exc:
        log.exception("run %s: execution failed", run.pk)
        _retrying_database(lambda: Run.objects.filter(pk=run.pk, command="").update(**watch.shown))
        writer.line(f"[jobsite] execution failed: {exc}")
        return Run.Status.FAILED, f"Jobsite error: {exc}", None
    _retrying_database(lambda: progress.flush(force=True))
    writer.output_done()  # what was held back for masking comes before Jobsite's notes
    status, summary = _judge(outcome, run.job, watch, progress.failure)
    return status, summary, outcome.returncode


class _Progress:
    """The latest progress a job reported; written to the run at most once a second."""

    def __init__(self, run: Run, *, mask: Callable[[str], str]) -> None:
        self.run_id = run.pk
        self.mask = mask  # a message as the log would store it (RunLogWriter.masked)
        self.pending: dict = {}
        self.last = 0.0
        self.failure = ""  # what a python or SQL job's runner says went wrong

    def update(self, payload: dict) -> None:
        if isinstance(payload.get("failure"), str):
            self.failure = self.mask(payload["failure"])[:1000]
        for key, field in (
            ("done", "progress_done"),
            ("total", "progress_total"),
            ("message", "progress_message"),
            ("rows", "rows"),
        ):
            value = payload.get(key)
            if key == "message" and value is not None:
                self.pending[field] = self.mask(str(value))[:300]
            elif isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
                self.pending[field] = value  # a BIGINT column; a larger number is ignored

    def flush(self, force: bool = False) -> None:
        if not self.pending or (not force and time.monotonic() - self.last < 1.0):
            return
        self.last = time.monotonic()
        try:
            Run.objects.filter(pk=self.run_id).update(**self.pending)
        except DatabaseError:
            if force:
                raise
            return  # try again next time
        self.pending = {}


def _collect(run: Run, directory: Path, writer: RunLogWriter) -> tuple[list, str]:
    """Store the run's files: (artifacts, why they could not be, or "").
    The lease is kept meanwhile (a big file can take longer to copy than the
    lease lasts), and whatever breaks fails the run: left running, it would
    be marked lost and retried."""
    # Most runs leave no file: no heartbeat thread for them.
    keep_lease = _heartbeat(run.pk) if _has_entries(directory) else contextlib.nullcontext()
    try:
        with keep_lease:
            stored = _retrying_database(lambda: artifacts.collect(run, directory, note=writer.line))
    except Exception as exc:
        log.exception("run %s: storing its files failed", run.pk)
        return [], writer.masked(f"Could not store the run's files: {type(exc).__name__}: {exc}")
    return stored, ""


def _has_entries(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except NotADirectoryError:
        return True  # a link or file in its place: collect says what is wrong
    except OSError:
        return False


def _deliver(
    job: Job, stored: list, password: str, writer: RunLogWriter, watch: _Watch
) -> tuple[str, str]:
    """Upload the run's files: (status, summary). The run's lease is kept
    while it lasts (a slow server must not get it marked lost), a cancel
    stops it, and whatever goes wrong fails the run with the reason."""
    if not stored:
        writer.line("[jobsite] nothing to upload: the run produced no files")
        return Run.Status.SUCCEEDED, ""
    try:
        destination = delivery.Destination.from_url(
            job.deliver_url,
            password=password,
            passive=job.deliver_passive,
            timeout=job.deliver_timeout,
        )
        with _heartbeat(watch.run_id):
            delivery.deliver(
                stored,
                destination,
                retries=job.deliver_retries,
                log=writer.line,
                should_stop=watch.should_stop,
            )
    except delivery.DeliveryStopped:
        return Run.Status.CANCELLED, watch.cancel_summary or "Cancelled during the upload"
    except delivery.DeliveryError as exc:
        return Run.Status.FAILED, writer.masked(str(exc))
    except Exception as exc:  # the run must get an outcome whatever broke
        log.exception("run %s: upload failed", watch.run_id)
        return Run.Status.FAILED, writer.masked(f"Upload failed: {type(exc).__name__}: {exc}")
    return Run.Status.SUCCEEDED, ""


def _beat(run_id: int) -> None:
    """Renew a running run's lease."""
    Run.objects.filter(pk=run_id, status=Run.Status.RUNNING).update(heartbeat_at=timezone.now())


@contextlib.contextmanager
def _heartbeat(run_id: int):
    """Heartbeat the run from a thread while the block runs: for work that
    blocks for longer than the lease between the run's own checks."""
    stop = threading.Event()

    def beat() -> None:
        try:
            while not stop.wait(settings.JOBSITE_HEARTBEAT_SECONDS):
                try:
                    _beat(run_id)
                except DatabaseError as exc:
                    log.warning("run %s: heartbeat failed: %s", run_id, exc)
        finally:
            connection.close()  # this thread's own

    thread = threading.Thread(target=beat, name=f"heartbeat-run-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _retrying_database(action: Callable[[], object], *, seconds: float = 120.0):
    """Do `action`, retrying while the database is away (a restart), so a
    finished run's outcome is not lost to a short outage."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except IntegrityError:
            raise  # a broken constraint is no outage: trying again cannot help
        except DatabaseError as exc:
            if time.monotonic() > deadline or connection.in_atomic_block:
                raise
            log.warning("database unavailable, retrying: %s", exc)
            connection.close()
            time.sleep(1.0)


class _Watch:
    """Heartbeats the run (its lease) and says when to stop: on a cancel
    request, or when the run is no longer ours (the sweeper marked it lost).

    What runs (`shown`: the command, the masked environment) and the process
    group id are written with the first check, a second after the start, or
    with the outcome if the run ended sooner: a write less for every short
    run, which on SQLite is a turn less at the database's single write lock.
    Until then a lost worker's children die with it (PR_SET_PDEATHSIG)."""

    CHECK_SECONDS = 1.0

    def __init__(self, run: Run, *, shown: dict | None = None) -> None:
        self.run_id = run.pk
        self.last_check = self.last_beat = time.monotonic()
        self.cancel_summary = ""
        self.shown = shown or {}
        self.start: dict = {}  # written with the next check
        self.start_saved = False
        self.deleted = False  # the run (or its job) was deleted while it ran

    def started(self, pgid: int) -> None:
        self.start = {"pid": pgid, **self.shown}

    def unsaved_start(self) -> dict:
        return {} if self.start_saved else dict(self.start or self.shown)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self.last_check < self.CHECK_SECONDS:
            return False
        self.last_check = now
        try:
            return self._check(now)
        except DatabaseError as exc:
            # Keep the job running through a database restart; if the outage
            # outlasts the lease the sweeper will have marked the run lost,
            # and the next check stops it.
            log.warning("run %s: database unavailable: %s", self.run_id, exc)
            if not connection.in_atomic_block:
                connection.close()
            return False

    def _check(self, now: float) -> bool:
        if self.start and not self.start_saved:
            Run.objects.filter(pk=self.run_id).update(**self.start)
            self.start_saved = True
        if now - self.last_beat >= settings.JOBSITE_HEARTBEAT_SECONDS:
            self.last_beat = now
            _beat(self.run_id)
        row = (
            Run.objects.filter(pk=self.run_id)
            .values("status", "cancel_requested_at", "error_summary")
            .first()
        )
        if row is None:
            self.deleted = True
            return True
        if row["status"] != Run.Status.RUNNING:
            return True
        if row["cancel_requested_at"] is not None:
            self.cancel_summary = row["error_summary"] or "Cancelled"
            return True
        return False


def _judge(outcome: execution.Outcome, job: Job, watch: _Watch, failure: str) -> tuple[str, str]:
    if outcome.timed_out:
        return Run.Status.TIMED_OUT, (
            f"Timed out after {job.timeout}s: process group sent SIGTERM, "
            f"SIGKILL after {settings.JOBSITE_KILL_GRACE}s"
        )
    if outcome.cancelled:
        return Run.Status.CANCELLED, watch.cancel_summary or "Cancelled"
    if outcome.returncode == 0:
        return Run.Status.SUCCEEDED, ""
    if outcome.signal_name:
        return Run.Status.FAILED, f"Killed by {outcome.signal_name}"
    if job.kind != Job.Kind.SHELL and failure:
        # The runner's own account (the exception, the failed statement); not
        # the output's last line, which may be anything the job printed.
        return Run.Status.FAILED, failure
    return Run.Status.FAILED, f"Exit code {outcome.returncode}"


def run_finish(
    *,
    run: Run,
    status: str,
    exit_code: int | None = None,
    summary: str = "",
    now: datetime | None = None,
    also: dict | None = None,
    log: RunLogWriter | None = None,
) -> bool:
    """running -> a final status, then the consequences (see _after_finish).
    False when the run was no longer running (someone else finished it).
    `also`: more fields of the run to write with the outcome. `log`: the
    run's ended log, whose last output is stored in the same transaction
    (on SQLite, one turn at the write lock less for every run that prints)."""
    now = now or timezone.now()
    before = log.snapshot() if log else None
    try:
        with transaction.atomic():
            in_one = status == Run.Status.SUCCEEDED and connection.vendor == "postgresql"
            chunks: list = []  # the log's last chunks, for the one statement to insert
            counts = log.store_last(chunks if in_one else None) if log else {}
            fields = dict(
                status=status,
                finished_at=now,
                exit_code=exit_code,
                error_summary=summary[:2000],
                **(also or {}),
                **counts,
            )
            if in_one:
                done = _finish_success_in_one_statement(run, fields, now=now, chunks=chunks)
            else:
                done = _update_run(run.pk, fields, status=Run.Status.RUNNING)
                if done:
                    run.status, run.finished_at, run.exit_code = status, now, exit_code
                    run.error_summary = summary[:2000]
                    _after_finish(run, now=now)
            if not done and counts:  # finished by someone else (cancelled, lost)
                Run.objects.filter(pk=run.pk).update(**counts)  # keep the log's size
    except BaseException:
        if log:
            log.restore(before)
        raise
    return bool(done)


def _after_finish(run: Run, *, now: datetime) -> None:
    """Free the job's slot, count the run, retry a failure, alert, start
    what waits on this run.

    Few statements, since every run pays them: the slot is freed in the same
    UPDATE of the job row as the alert counters, and a job that allows
    overlap has nothing waiting for its slot (a retry's delay is then left
    to the clock, which dispatches due runs every tick). The common case, a
    success of a job in good standing, is one UPDATE written out.
    """
    stats.record_finished(run)
    retry = None
    if run.status != Run.Status.SUCCEEDED or not _end_success(run, at=run.finished_at or now):
        retry = _schedule_retry(run, now=now) if run.status in Run.FAILURES else None
        alerts.on_run_finished(
            run, now=now, retrying=retry is not None, job_updates=_job_row_at_end(run)
        )
    dispatch = run.job.overlap != Job.Overlap.ALLOW or retry is not None
    if dispatch and run.status == Run.Status.SUCCEEDED:
        # One round trip for both questions (on PostgreSQL each is one).
        params = [run.job_id, Run.Status.QUEUED, run.job_id]
        ids = [pk for (pk,) in _fetch(_sql(connection.vendor, "waiting_and_downstreams"), params)]
        if -1 in ids:
            dispatch_waiting(now=now, job=run.job, asked=True)
        _trigger_downstreams(run, now=now, downstreams=[pk for pk in ids if pk != -1])
        return
    if dispatch:
        dispatch_waiting(now=now, job=run.job)
    if run.status == Run.Status.SUCCEEDED:
        _trigger_downstreams(run, now=now)


def _finish_success_in_one_statement(
    run: Run, fields: dict, *, now: datetime, chunks: list[RunLogChunk]
) -> bool:
    """PostgreSQL: a success and what every success does, in one statement
    (data-modifying WITH): the log's last `chunks`; the run's outcome; then,
    only if it was still running, the day's rollup and the job row (as
    _end_success); and the two questions of _after_finish (a waiting run?
    downstream jobs?). One round trip instead of five. The rare cases
    follow as _after_finish handles them: no rollup row for the day yet, a
    job not in good standing.
    False if the run was no longer running (someone else finished it)."""
    before = (run.status, run.finished_at, run.exit_code, run.error_summary)
    run.status, run.finished_at, run.exit_code = fields["status"], now, fields["exit_code"]
    run.error_summary = fields["error_summary"]  # as stored, for the rollup and alerts
    finish_sql, finish_params = _run_update_sql(run.pk, fields, status=Run.Status.RUNNING)
    rollup_sql, rollup_params = stats.rollup_statement(run)
    job_sql, job_params = _sql("postgresql", "end_success"), _end_success_params(run, at=now)
    then = "AND EXISTS (SELECT 1 FROM finished) RETURNING 1"
    logged, log_params = "", []
    if chunks:  # stored whether or not the run was still running, as run_finish does
        logged = f"logged AS ({_chunks_insert(len(chunks))}), "
        for chunk in chunks:
            log_params += [chunk.run_id, chunk.seq, chunk.is_head, chunk.data, chunk.size]
    sql = (
        f"WITH {logged}finished AS ({finish_sql} RETURNING 1),"
        f" rollup AS ({rollup_sql} {then}), job AS ({job_sql} {then})"
        " SELECT (SELECT count(*) FROM finished), (SELECT count(*) FROM rollup),"
        f" (SELECT count(*) FROM job), {_sql('postgresql', 'waiting_and_downstreams_columns')}"
    )
    params = [*log_params, *finish_params, *rollup_params, *job_params]
    params += [run.job_id, Run.Status.QUEUED, run.job_id]
    ((finished, counted, job_ok, waiting, downstreams),) = _fetch(sql, params)
    if not finished:
        run.status, run.finished_at, run.exit_code, run.error_summary = before
        return False
    if not counted:  # the job's first counted run of the day
        stats.record_finished(run, tried=True)
    if not job_ok:  # the job was failing or stale: alerts flips it back
        alerts.on_run_finished(run, now=now, retrying=False, job_updates=_job_row_at_end(run))
    if waiting and run.job.overlap != Job.Overlap.ALLOW:
        dispatch_waiting(now=now, job=run.job, asked=True)
    _trigger_downstreams(run, now=now, downstreams=list(downstreams))
    return True


@functools.lru_cache(maxsize=4)
def _chunks_insert(count: int) -> str:
    """INSERT of `count` log chunks. Params per chunk: run id, seq, is_head,
    data, size."""
    qn = connection.ops.quote_name
    columns = ", ".join(qn(RunLogChunk._meta.get_field(name).column) for name in _CHUNK_COLUMNS)
    rows = ", ".join(["(%s, %s, %s, %s, %s)"] * count)
    return f"INSERT INTO {qn(RunLogChunk._meta.db_table)} ({columns}) VALUES {rows}"


_CHUNK_COLUMNS = ("run", "seq", "is_head", "data", "size")


def _end_success(run: Run, *, at: datetime) -> bool:
    """The job row after a success, if the job was in alert state ok: failure
    count reset, success noted, slot freed, latest outcome (as _last_end).
    False (nothing written) otherwise: alerts.on_run_finished flips it."""
    return bool(_execute(_sql(connection.vendor, "end_success"), _end_success_params(run, at=at)))


def _end_success_params(run: Run, *, at: datetime) -> list:
    newest = connection.ops.adapt_datetimefield_value(at)
    return [newest, run.pk, run.pk, run.status, run.pk, run.pk, run.job_id, Job.AlertState.OK]


def _job_row_at_end(run: Run) -> dict:
    """The job row's updates when `run` ends (alerts.on_run_finished adds
    its own): the slot freed if this run held it, the latest outcome."""
    free_slot = Case(When(active_run=run.pk, then=None), default=F("active_run"))
    return {"active_run": free_slot, **_last_end(run)}


def _last_end(run: Run) -> dict:
    """The job's latest outcome (Job.last_end_status), for its UPDATE: this
    run's status, unless a newer run of the job has already ended."""
    newer = Q(last_end_run_id__isnull=True) | Q(last_end_run_id__lt=run.pk)
    return {
        name: Case(When(newer, then=Value(value)), default=F(name), output_field=field)
        for name, value, field in (
            ("last_end_status", run.status, CharField()),
            ("last_end_run_id", run.pk, BigIntegerField()),
        )
    }


def retry_delay(job: Job, attempt: int, *, jitter: float | None = None) -> float:
    """Seconds before attempt `attempt + 1`: exponential, capped, +0-10% jitter."""
    try:
        grown = job.retry_delay * job.retry_backoff ** (attempt - 1)
    except OverflowError:  # a huge backoff: past any cap
        grown = job.retry_max_delay if job.retry_delay else 0
    base = min(job.retry_max_delay, grown)
    return base * (1 + (random.uniform(0, 0.1) if jitter is None else jitter))


def _schedule_retry(run: Run, *, now: datetime) -> Run | None:
    job = run.job
    if run.attempt > job.retries or run.cancel_requested_at is not None:
        return None
    # The job as it is now, not as the worker read it when the run started:
    # retries turned down, or the job paused, while the run ran (a paused
    # job's retry would only be skipped, and its failure never counted).
    current = Job.objects.filter(pk=job.pk).values("retries", "enabled").first()
    if current is None or run.attempt > current["retries"] or not current["enabled"]:
        return None
    first = run.retry_of or run
    delay = retry_delay(job, run.attempt)
    try:
        with transaction.atomic():
            return Run.objects.create(
                job=job,
                trigger=Run.Trigger.RETRY,
                attempt=run.attempt + 1,
                retry_of=first,
                scheduled_for=run.scheduled_for,
                queued_at=now,
                not_before=now + timedelta(seconds=delay),
                status=Run.Status.QUEUED,
            )
    except IntegrityError:
        return None  # another process already scheduled this attempt


def run_cancel(
    *, run: Run, by: AbstractBaseUser | None, reason: str = "", now: datetime | None = None
) -> str:
    """Cancel a run: a queued one at once; a running one by asking its
    worker, which kills the process group within about a second. Returns
    what happened: "cancelled", "cancelling" or "finished"."""
    now = now or timezone.now()
    who = by if by is not None and by.is_authenticated else None
    summary = reason or (f"Cancelled by {who.get_username()}" if who else "Cancelled")
    with transaction.atomic():
        if Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED).update(
            status=Run.Status.CANCELLED,
            finished_at=now,
            cancel_requested_at=now,
            cancelled_by=who,
            error_summary=summary,
        ):
            stats.record_finished(_reload(run))
            Job.objects.filter(pk=run.job_id).update(**_last_end(run))
            alerts.on_retry_dropped(run, now=now)
            dispatch_waiting(now=now, job=run.job)
            return "cancelled"
        if Run.objects.filter(
            pk=run.pk, status=Run.Status.RUNNING, cancel_requested_at__isnull=True
        ).update(cancel_requested_at=now, cancelled_by=who, error_summary=summary):
            return "cancelling"
    return "finished"


def _reload(run: Run) -> Run:
    run.refresh_from_db()
    return run


def run_foreground(*, job: Job, trigger: str = Run.Trigger.CLI, echo=None) -> Run:
    """Create, claim and execute a run in this process (manage.py runjob)."""
    run = _reload(run_create(job=job, trigger=trigger, here=True))
    if run.status != Run.Status.QUEUED or run.enqueued_at is None:
        return run  # skipped, or waiting behind a running run (overlap=queue)
    claimed = run_claim(run_id=run.pk, worker=worker_name())
    if claimed is None:
        return _reload(run)
    return run_execute(claimed, echo=echo or _stdout_echo)


def _stdout_echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --- The sweeper: nothing stays queued or running forever ------------------------------


def sweep(*, now: datetime | None = None) -> dict[str, int]:
    """Mark runs whose heartbeat stopped `lost`, re-send runs a broker lost,
    dispatch waiting runs that are due."""
    now = now or timezone.now()
    return {
        "lost": sweep_lost(now=now),
        "requeued": sweep_queued(now=now),
        "dispatched": dispatch_waiting(now=now),
    }


def sweep_lost(*, now: datetime) -> int:
    """Running runs whose lease expired: lost (or cancelled, if that was
    asked), their process group killed when it is on this host, retried."""
    cutoff = now - timedelta(seconds=settings.JOBSITE_LEASE_SECONDS)
    count = 0
    stale = Run.objects.filter(status=Run.Status.RUNNING, heartbeat_at__lt=cutoff)
    for run in stale.select_related("job")[:500]:
        cancelled = run.cancel_requested_at is not None
        status = Run.Status.CANCELLED if cancelled else Run.Status.LOST
        summary = (
            run.error_summary
            if cancelled
            else (
                f"Lost: worker {run.worker} stopped heartbeating "
                f"(last at {run.heartbeat_at:%Y-%m-%d %H:%M:%S %Z})"
            )
        )
        with transaction.atomic():
            if not Run.objects.filter(
                pk=run.pk, status=Run.Status.RUNNING, heartbeat_at=run.heartbeat_at
            ).update(status=status, finished_at=now, error_summary=summary):
                continue
            run.status, run.finished_at, run.error_summary = status, now, summary
            _after_finish(run, now=now)
        _kill_if_local(run)
        count += 1
    return count


def _kill_if_local(run: Run) -> None:
    host = run.worker.rsplit(":", 1)[0]
    if run.pid and host == socket.gethostname():
        execution.kill_run_group(run.pid, run_id=run.pk)


def sweep_queued(*, now: datetime) -> int:
    """Queued runs sent to django-q2 long ago but never claimed: the broker
    lost them (Redis is at-most-once). Send again; after too many tries,
    mark them lost so nothing stays queued forever."""
    cutoff = now - timedelta(seconds=settings.JOBSITE_REQUEUE_SECONDS)
    count = 0
    stale = Run.objects.filter(status=Run.Status.QUEUED, enqueued_at__lt=cutoff)
    for run in stale.select_related("job")[:500]:
        if run.enqueue_count >= settings.JOBSITE_MAX_DELIVERIES:
            with transaction.atomic():
                if Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED).update(
                    status=Run.Status.LOST,
                    finished_at=now,
                    error_summary=(
                        f"Lost: no worker picked it up after {run.enqueue_count} deliveries"
                    ),
                ):
                    run.refresh_from_db()
                    _after_finish(run, now=now)
            continue
        if Run.objects.filter(
            pk=run.pk, status=Run.Status.QUEUED, enqueued_at=run.enqueued_at
        ).update(enqueued_at=now, enqueue_count=run.enqueue_count + 1):
            run_enqueue(run)
            count += 1
    return count


# --- Job state ------------------------------------------------------------------


def job_set_enabled(*, job: Job, enabled: bool) -> None:
    """Pause or resume. A pause also skips the job's pending runs at once
    (a retry waiting for its delay, runs sent to the workers); the
    dispatcher and the claim skip those of a job paused another way."""
    now = timezone.now()
    if enabled:
        # Resumed: owes nothing for the fires while paused (staleness), also
        # before the clock's next tick.
        Job.objects.filter(pk=job.pk).update(enabled=True, updated_at=now, schedule_since=now)
        job.enabled, job.schedule_since = True, now
        return
    Job.objects.filter(pk=job.pk).update(enabled=False, updated_at=now)
    job.enabled = False
    pending = Run.objects.filter(job=job, status=Run.Status.QUEUED, trigger__in=PAUSABLE)
    for run in pending.select_related("job"):
        with transaction.atomic():
            _skip_paused(run, now=now)


def jobs_delete(*, jobs: QuerySet[Job]) -> int:
    """Delete these jobs with their runs, logs and history. Their runs'
    artifact files go once the deletion commits (a rollback keeps both):
    the database's cascade knows nothing of files. Returns how many jobs.
    (Deletions made another way, e.g. job.delete() in a shell, leave files
    that the retention sweep removes: artifacts.delete_orphaned_files.)"""
    with transaction.atomic():
        artifacts.delete_files_on_commit(Artifact.objects.filter(run__job__in=jobs))
        _count, per_model = jobs.delete()
    return per_model.get(Job._meta.label, 0)


def runs_delete(*, runs: QuerySet[Run]) -> int:
    """Delete these runs with their logs, and their artifact files once the
    deletion commits. Returns how many runs."""
    with transaction.atomic():
        artifacts.delete_files_on_commit(Artifact.objects.filter(run__in=runs))
        _count, per_model = runs.delete()
    return per_model.get(Run._meta.label, 0)
