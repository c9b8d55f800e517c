"""The run lifecycle: create, enqueue, claim, execute, finish; and the clock.

Admin actions, pages, the CLI, the scheduler and django-q2 tasks all call
these functions: one code path for starting a run, whoever starts it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Min, Q, Value
from django.db.models.functions import Concat
from django.utils import timezone

from jobs import execution, scheduling
from jobs.models import SECRET_MASK, Job, Run
from jobs.runlog import RunLogWriter

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- Creating runs ------------------------------------------------------------


def run_create(
    *,
    job: Job,
    trigger: str,
    by: AbstractBaseUser | None = None,
    scheduled_for: datetime | None = None,
    rerun_of: Run | None = None,
    attempt: int = 1,
    enqueue: bool = True,
    now: datetime | None = None,
) -> Run:
    """Record a run for `job` and hand it to the workers.

    Under the `skip` overlap policy a job that still has a queued or running
    run gets a `skipped` run instead, saying which run is in the way.
    """
    now = now or timezone.now()
    fields = dict(
        job=job,
        trigger=trigger,
        triggered_by=by if by is not None and by.is_authenticated else None,
        scheduled_for=scheduled_for or now,
        queued_at=now,
        rerun_of=rerun_of,
        attempt=attempt,
    )
    with transaction.atomic():
        blocker = _overlapping_run(job)
        if blocker is not None:
            return Run.objects.create(
                **fields,
                status=Run.Status.SKIPPED,
                finished_at=now,
                error_summary=f"run #{blocker.pk} still {blocker.status}",
            )
        run = Run.objects.create(**fields, status=Run.Status.QUEUED)
        if enqueue:
            transaction.on_commit(lambda: run_enqueue(run))
    return run


def _overlapping_run(job: Job) -> Run | None:
    if job.overlap != Job.Overlap.SKIP:
        return None
    return Run.objects.filter(job=job, status__in=Run.ACTIVE).order_by("id").first()


def run_enqueue(run: Run) -> None:
    """Hand a queued run to django-q2. Safe to repeat: the worker's claim
    makes a second delivery a no-op."""
    from django_q.tasks import async_task

    job = run.job
    options: dict = {
        "task_name": f"{job.slug}#{run.pk}",
        # Outer bound only: we kill the job's process group at job.timeout.
        "timeout": job.timeout + settings.JOBSITE_KILL_GRACE + 60,
    }
    if job.queue:
        options["cluster"] = job.queue
    async_task("jobs.tasks.execute_run", run.pk, q_options=options)


def run_rerun(*, run: Run, by: AbstractBaseUser | None) -> Run:
    """A new run of the same job for the same logical time."""
    return run_create(
        job=run.job,
        trigger=Run.Trigger.RERUN,
        by=by,
        scheduled_for=run.scheduled_for,
        rerun_of=run,
    )


# --- Claiming, executing, finishing ------------------------------------------------


def run_claim(*, run_id: int, worker: str, now: datetime | None = None) -> Run | None:
    """queued -> running, or None when another worker (or nobody) has it.

    A redelivered or duplicated django-q2 task finds nothing to claim. Under
    `skip` the run must also take its job's slot; if another run holds it,
    this one is recorded as skipped.
    """
    now = now or timezone.now()
    with transaction.atomic():
        claimed = Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(
            status=Run.Status.RUNNING, started_at=now, heartbeat_at=now, worker=worker
        )
        if not claimed:
            return None
        run = Run.objects.select_related("job").get(pk=run_id)
        job = run.job
        if job.overlap == Job.Overlap.SKIP and not _take_slot(job, run):
            holder = Job.objects.values_list("active_run_id", flat=True).get(pk=job.pk)
            Run.objects.filter(pk=run_id).update(
                status=Run.Status.SKIPPED,
                finished_at=now,
                error_summary=f"run #{holder} still running",
            )
            return None
    return run


def _take_slot(job: Job, run: Run) -> bool:
    free = Q(active_run__isnull=True) | Q(active_run=run) | ~Q(active_run__status__in=Run.ACTIVE)
    return bool(Job.objects.filter(pk=job.pk).filter(free).update(active_run=run))


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


def masked(env: dict[str, str], secret_keys: list[str]) -> dict[str, str]:
    secret = set(secret_keys)
    return {k: (SECRET_MASK if k in secret else v) for k, v in sorted(env.items())}


def run_execute(run: Run, *, echo: Callable[[str], None] | None = None) -> Run:
    """Run a claimed run's command to the end and record the outcome."""
    job = run.job
    try:
        env = child_environment(run)
    except execution.UnresolvedReference as exc:
        run_finish(run=run, status=Run.Status.FAILED, summary=f"Not started: {exc}")
        return _reload(run)
    Run.objects.filter(pk=run.pk).update(
        command=job.command, environment=masked(env, job.secret_keys)
    )
    secrets = [env[k] for k in job.secret_keys if k in env]
    writer = RunLogWriter(run, redact=secrets, echo=echo)
    heartbeat = _Heartbeat(run)
    try:
        outcome = execution.run_process(
            ["/bin/sh", "-c", job.command],
            env=env,
            timeout=job.timeout,
            kill_grace=settings.JOBSITE_KILL_GRACE,
            on_start=lambda pgid: Run.objects.filter(pk=run.pk).update(pid=pgid),
            on_output=writer.feed,
            on_tick=lambda: writer.tick() or heartbeat.beat(),
        )
    except Exception as exc:
        log.exception("run %s: execution failed", run.pk)
        writer.close(f"[jobsite] execution failed: {exc}")
        run_finish(run=run, status=Run.Status.FAILED, summary=f"Jobsite error: {exc}")
        return _reload(run)
    status, summary = _judge(outcome, job, writer)
    writer.close(f"[jobsite] {summary}" if status != Run.Status.SUCCEEDED else "")
    run_finish(run=run, status=status, exit_code=outcome.returncode, summary=summary)
    return _reload(run)


class _Heartbeat:
    """Marks the run alive; tells the caller to stop when the run is no
    longer ours (marked lost or cancelled by someone else)."""

    def __init__(self, run: Run) -> None:
        self.run_id = run.pk
        self.last = time.monotonic()

    def beat(self) -> bool:
        if time.monotonic() - self.last < settings.JOBSITE_HEARTBEAT_SECONDS:
            return False
        self.last = time.monotonic()
        alive = Run.objects.filter(pk=self.run_id, status=Run.Status.RUNNING).update(
            heartbeat_at=timezone.now()
        )
        return not alive


def _judge(outcome: execution.Outcome, job: Job, writer: RunLogWriter) -> tuple[str, str]:
    if outcome.timed_out:
        return Run.Status.TIMED_OUT, (
            f"Timed out after {job.timeout}s: process group sent SIGTERM, "
            f"SIGKILL after {settings.JOBSITE_KILL_GRACE}s"
        )
    if outcome.cancelled:
        return Run.Status.CANCELLED, "Cancelled"
    if outcome.returncode == 0:
        return Run.Status.SUCCEEDED, ""
    if outcome.signal_name:
        return Run.Status.FAILED, f"Killed by {outcome.signal_name}"
    return Run.Status.FAILED, f"Exit code {outcome.returncode}"


def run_finish(
    *,
    run: Run,
    status: str,
    exit_code: int | None = None,
    summary: str = "",
    now: datetime | None = None,
) -> bool:
    """running -> a final status, and free the job's slot. False when the run
    was no longer running (someone else finished it)."""
    now = now or timezone.now()
    with transaction.atomic():
        done = Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(
            status=status, finished_at=now, exit_code=exit_code, error_summary=summary[:2000]
        )
        Job.objects.filter(pk=run.job_id, active_run_id=run.pk).update(active_run=None)
    return bool(done)


def _reload(run: Run) -> Run:
    run.refresh_from_db()
    return run


def run_foreground(*, job: Job, trigger: str = Run.Trigger.CLI, echo=None) -> Run:
    """Create, claim and execute a run in this process (manage.py runjob)."""
    run = run_create(job=job, trigger=trigger, enqueue=False)
    if run.status != Run.Status.QUEUED:
        return run
    claimed = run_claim(run_id=run.pk, worker=worker_name())
    if claimed is None:
        return _reload(run)
    return run_execute(claimed, echo=echo or _stdout_echo)


def _stdout_echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --- Job state ------------------------------------------------------------------


def job_set_enabled(*, job: Job, enabled: bool) -> None:
    Job.objects.filter(pk=job.pk).update(enabled=enabled, updated_at=timezone.now())
    job.enabled = enabled


# --- The clock --------------------------------------------------------------------


def scheduler_sync(*, now: datetime) -> int:
    """Recompute next_fire_at for jobs whose schedule or time zone changed
    (or that were just created or resumed); clear it for paused and manual
    jobs. Returns how many jobs changed."""
    changed = (
        Job.objects.filter(Q(enabled=False) | Q(schedule=""))
        .exclude(next_fire_at=None, fire_basis="")
        .update(next_fire_at=None, fire_basis="")
    )
    stale = (
        Job.objects.filter(enabled=True)
        .exclude(schedule="")
        .exclude(fire_basis=Concat("schedule", Value("|"), "timezone"))
    )
    for job in stale:
        try:
            nxt = scheduling.next_fire_after(job.schedule, job.timezone, now)
        except scheduling.ScheduleError as exc:
            # One bad row must not stop the others (django-q2's does).
            log.error("job %s: %s", job.slug, exc)
            nxt = None
        changed += Job.objects.filter(
            pk=job.pk, schedule=job.schedule, timezone=job.timezone, fire_basis=job.fire_basis
        ).update(next_fire_at=nxt, fire_basis=job.current_fire_basis)
    return changed


def scheduler_fire_due(*, now: datetime) -> list[Run]:
    """Claim every due fire and create its run.

    The claim is a conditional UPDATE that advances next_fire_at from the
    value we read: of several schedulers, exactly one wins each fire; the
    unique constraint on (job, scheduled_for, attempt) is the final guard.
    """
    runs = []
    due = Job.objects.filter(enabled=True, next_fire_at__lte=now).exclude(schedule="")
    for job in due:
        try:
            run = _fire(job, now)
        except scheduling.ScheduleError as exc:
            log.error("job %s: %s", job.slug, exc)
            continue
        if run is not None:
            runs.append(run)
    return runs


def _fire(job: Job, now: datetime) -> Run | None:
    fire_at = job.next_fire_at
    # Fires missed while no scheduler ran: run the latest one only.
    missed = scheduling.fires_between(job.schedule, job.timezone, fire_at, now, limit=1)
    scheduled_for = missed[-1] if missed else fire_at
    nxt = scheduling.next_fire_after(job.schedule, job.timezone, now)
    try:
        with transaction.atomic():
            claimed = Job.objects.filter(
                pk=job.pk, next_fire_at=fire_at, fire_basis=job.fire_basis
            ).update(next_fire_at=nxt)
            if not claimed:
                return None
            return run_create(
                job=job, trigger=Run.Trigger.SCHEDULE, scheduled_for=scheduled_for, now=now
            )
    except IntegrityError:
        return None


def scheduler_next_due() -> datetime | None:
    return Job.objects.filter(enabled=True, next_fire_at__isnull=False).aggregate(
        due=Min("next_fire_at")
    )["due"]


SCHEDULER_TICK_KEY = "jobsite:scheduler:last-tick"


def scheduler_tick(*, now: datetime | None = None) -> list[Run]:
    """One pass of the clock: pick up edits, fire what is due, say we are alive."""
    from django.core.cache import cache

    now = now or timezone.now()
    scheduler_sync(now=now)
    runs = scheduler_fire_due(now=now)
    cache.set(SCHEDULER_TICK_KEY, now.isoformat(), timeout=None)
    return runs


def scheduler_sleep_seconds(*, now: datetime, max_sleep: float) -> float:
    """How long the clock may sleep: until the next due fire, at most max_sleep."""
    due = scheduler_next_due()
    if due is None:
        return max_sleep
    return max(0.0, min(max_sleep, (due - now).total_seconds()))
