"""A job's alert state: ok -> failing -> ok and ok -> stale -> ok.

Each flip is a conditional UPDATE on the job's state (of several processes
exactly one wins), recorded as an AlertFlip row, and notified once: the
notifier claims the flip's `notified_at` before sending (notify.py).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.core.cache import cache
from django.db import transaction
from django.db.models import F, Q

from jobs.emails import humanize
from jobs.models import AlertFlip, Job, Run

log = logging.getLogger(__name__)

State = Job.AlertState


def flip(
    *, job: Job, old: str, new: str, now: datetime, reason: str = "", run: Run | None = None
) -> AlertFlip | None:
    """Move the job from `old` to `new`; None when it was not in `old`."""
    with transaction.atomic():
        changed = Job.objects.filter(pk=job.pk, alert_state=old).update(
            alert_state=new, alert_state_since=now
        )
        if not changed:
            return None
        record = AlertFlip.objects.create(
            job=job, old_state=old, new_state=new, at=now, run=run, reason=reason[:2000]
        )
        transaction.on_commit(lambda: _send(record))
    job.alert_state, job.alert_state_since = new, now
    return record


def _send(record: AlertFlip) -> None:
    from django_q.tasks import async_task

    async_task("jobs.tasks.notify_flip", record.pk, q_options={"task_name": f"flip#{record.pk}"})


def on_run_finished(
    run: Run, *, now: datetime, retrying: bool, job_updates: dict | None = None
) -> None:
    """Count the run towards the job's alert state.

    A failure that will be retried does not count yet: only the outcome of
    the last attempt does, so a job that recovers on its retry stays quiet.
    `job_updates` (the caller's own changes to the job row) go into the same
    UPDATE: a success of a job that was fine costs one statement.
    """
    job = run.job
    updates = dict(job_updates or {})
    if run.status == Run.Status.SUCCEEDED:
        updates.update(consecutive_failures=0, last_success_at=run.finished_at or now)
        if Job.objects.filter(pk=job.pk, alert_state=State.OK).update(**updates):
            return
        Job.objects.filter(pk=job.pk).update(**updates)
        job.refresh_from_db(fields=["alert_state", "alert_state_since", "last_success_at"])
        if job.alert_state == State.STALE and job.stale_reason(now):
            return  # a run by hand proves nothing about the schedule: check_stale decides
        if job.alert_state != State.OK:
            broken_for = now - job.alert_state_since if job.alert_state_since else None
            flip(
                job=job,
                old=job.alert_state,
                new=State.OK,
                now=now,
                run=run,
                reason=f"succeeded again after {humanize(broken_for)}" if broken_for else "",
            )
        return
    if run.status not in Run.FAILURES or retrying:
        if updates:
            Job.objects.filter(pk=job.pk).update(**updates)
        return
    updates["consecutive_failures"] = F("consecutive_failures") + 1
    Job.objects.filter(pk=job.pk).update(**updates)
    job.refresh_from_db(fields=["consecutive_failures", "alert_state", "alert_after"])
    if job.consecutive_failures >= max(1, job.alert_after) and job.alert_state != State.FAILING:
        flip(
            job=job,
            old=job.alert_state,
            new=State.FAILING,
            now=now,
            run=run,
            reason=run.error_summary or run.get_status_display(),
        )


def on_retry_dropped(retry: Run, *, now: datetime) -> None:
    """A waiting retry that will not run (cancelled, or replaced by a newer
    run): the failure it was to retry is the last attempt after all, and
    counts now. Otherwise a job that keeps failing this way never alerts."""
    if retry.trigger != Run.Trigger.RETRY or retry.retry_of_id is None:
        return
    first = retry.retry_of_id
    previous = (
        Run.objects.filter(Q(pk=first) | Q(retry_of_id=first), attempt=retry.attempt - 1)
        .select_related("job")
        .first()
    )
    if previous is None or previous.status not in Run.FAILURES:
        return
    # Outdated by a run that ended since (a success reset the count): no news.
    later = Run.objects.filter(job_id=previous.job_id, finished_at__gt=previous.finished_at)
    if not later.exclude(pk=retry.pk).exists():
        on_run_finished(previous, now=now, retrying=False)


def check_stale(*, now: datetime) -> int:
    """Flip jobs that went stale (ok -> stale) or came back (stale -> ok).
    Returns how many flipped. A failing job stays failing."""
    flipped = 0
    candidates = Job.objects.filter(
        Q(alert_state=State.STALE) | Q(alert_state=State.OK, enabled=True) & ~Q(schedule="")
    )
    for job in candidates:
        stale = job.stale_reason(now)
        if stale and job.alert_state == State.OK:
            flipped += bool(
                flip(job=job, old=State.OK, new=State.STALE, now=now, reason=stale.reason)
            )
        elif not stale and job.alert_state == State.STALE:
            reason = "paused" if not job.enabled else "runs again"
            flipped += bool(flip(job=job, old=State.STALE, new=State.OK, now=now, reason=reason))
    return flipped


def resend_unnotified(*, now: datetime) -> int:
    """Flips whose notification task never ran (a broker lost it, or the
    workers are down), handed on again at most every 10 minutes each: a
    sweep every few seconds must not pile up copies in the queue."""
    cutoff = now - timedelta(minutes=2)
    pending = AlertFlip.objects.filter(
        notified_at__isnull=True, at__lt=cutoff, at__gt=now - timedelta(days=1)
    )
    count = 0
    for record in pending[:100]:
        if cache.add(f"jobsite:flip-resent:{record.pk}", True, timeout=RESEND_EVERY):
            _send(record)
            count += 1
    return count


RESEND_EVERY = 600  # seconds
