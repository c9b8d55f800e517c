"""Jobsite's clock: next fire times, claiming due fires, catch-up, the sweeper.

`manage.py scheduler` calls tick() in a loop. Several schedulers may run at
once: every fire is claimed with a conditional UPDATE that advances the job's
next_fire_at from the value read, and a unique constraint on (job,
scheduled_for, attempt) for scheduled runs is the final guard.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import Exists, Min, OuterRef, Q, Value
from django.db.models.functions import Concat
from django.utils import timezone

from jobs import alerts, notify, scheduling, services
from jobs.models import Job, MissedFires, Run

log = logging.getLogger(__name__)

TICK_KEY = "jobsite:scheduler:last-tick"
SWEEP_KEY = "jobsite:scheduler:last-sweep"


def sync(*, now: datetime) -> int:
    """Recompute next_fire_at for jobs whose schedule or time zone changed
    (or that were just created or resumed), noting since when the schedule
    applies (staleness); clear it for paused and manual jobs. Returns how
    many jobs changed."""
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
        ).update(next_fire_at=nxt, fire_basis=job.current_fire_basis, schedule_since=now)
    return changed


def fire_due(*, now: datetime) -> list[Run]:
    """Claim every due fire and create its runs."""
    runs: list[Run] = []
    due = Job.objects.filter(enabled=True, next_fire_at__lte=now).exclude(schedule="")
    for job in upstreams_first(list(due.exclude(pk__in=_held_off()))):
        try:
            runs.extend(fire(job, now))
        except scheduling.ScheduleError as exc:
            log.error("job %s: %s", job.slug, exc)
        except Exception:
            # One job must never stop the clock for the others; nor, failing
            # at every try, keep it awake: it is tried again in a while.
            log.exception("job %s: firing failed, trying again in %.0f s", job.slug, HOLD_OFF)
            _holding[job.pk] = time.monotonic() + HOLD_OFF
    return runs


def upstreams_first(jobs: list[Job]) -> list[Job]:
    """`jobs` (in name order) with each job after its upstreams among them.

    A load and its export due in the same tick: fired export first, the
    export would be judged by the load's previous run (yesterday's success)
    and publish yesterday's data; fired after it, it sees today's load
    queued and waits its turn as a skip with the reason."""
    if len(jobs) < 2:
        return jobs
    ids = {job.pk for job in jobs}
    edges = Job.upstreams.through.objects.filter(from_job__in=ids, to_job__in=ids)
    waits_on: dict[int, set[int]] = {}
    for downstream, upstream in edges.values_list("from_job_id", "to_job_id"):
        waits_on.setdefault(downstream, set()).add(upstream)
    ordered: list[Job] = []
    placed: set[int] = set()
    pending = jobs
    while pending:  # a cycle (refused when saved) would just keep name order
        ready = [job for job in pending if waits_on.get(job.pk, set()) <= placed]
        ready = ready or pending
        ordered += ready
        placed |= {job.pk for job in ready}
        pending = [job for job in pending if job.pk not in placed]
    return ordered


# Jobs whose fire raised, and until when (monotonic) the clock leaves them be.
HOLD_OFF = 30.0
_holding: dict[int, float] = {}


def _held_off() -> list[int]:
    now = time.monotonic()
    for pk in [pk for pk, until in _holding.items() if until <= now]:
        del _holding[pk]
    return list(_holding)


@dataclass(frozen=True)
class Gap:
    """Fires not run: the first and last of them and how many."""

    first: datetime
    last: datetime
    count: int


def plan_fires(job: Job, now: datetime) -> tuple[list[datetime], Gap | None]:
    """(fires to run, fires missed and not run) among the job's fires from
    next_fire_at up to now, per its catch-up policy.

    A fire is missed when it is older than JOBSITE_MISFIRE_GRACE: no
    scheduler was running at the time. Fires within the grace just run.
    """
    cap = settings.JOBSITE_CATCHUP_MAX
    first = job.next_fire_at
    cut = now - timedelta(seconds=settings.JOBSITE_MISFIRE_GRACE)
    before_cut = cut - timedelta(microseconds=1)  # fires_counted takes (start, end]
    if first >= cut:
        return [first, *scheduling.fires_between(job.schedule, job.timezone, first, now)], None
    on_time = scheduling.fires_between(job.schedule, job.timezone, before_cut, now)
    # Missed: `first` and the fires after it before the cut. Only the latest
    # cap + 1 are kept (enough for the runs and the newest fire not run),
    # with the count of them all.
    later, later_total = scheduling.fires_counted(
        job.schedule, job.timezone, first, before_cut, keep=cap + 1
    )
    missed = ([first] if later_total == len(later) else []) + later
    missed_total = 1 + later_total
    if job.catchup == Job.Catchup.ALL:
        run = missed[-cap:] if cap else []
        skipped = missed_total - len(run)
        gap = Gap(first, missed[-len(run) - 1], skipped) if skipped else None
        return run + on_time, gap
    if job.catchup == Job.Catchup.LATEST and not on_time:
        gap = Gap(first, missed[-2], missed_total - 1) if missed_total > 1 else None
        return missed[-1:], gap
    return on_time, Gap(first, missed[-1], missed_total)


def fire(job: Job, now: datetime) -> list[Run]:
    """Claim the job's due fires (one conditional UPDATE) and create their runs."""
    to_run, gap = plan_fires(job, now)
    nxt = scheduling.next_fire_after(job.schedule, job.timezone, now)
    try:
        return _claim_and_create(job, to_run, gap, following=nxt, now=now)
    except IntegrityError:
        pass
    # A scheduled run exists for one of these fires. Another scheduler made
    # it, and then moved next_fire_at on too; or next_fire_at was put back
    # after the fire (an UPDATE from a copy of the job read before). Then
    # every tick would fail alike with the clock spinning: claim the fires
    # again, without those that have their run.
    if not Job.objects.filter(
        pk=job.pk, next_fire_at=job.next_fire_at, fire_basis=job.fire_basis
    ).exists():
        return []
    done = list(
        Run.objects.filter(
            job=job, trigger=Run.Trigger.SCHEDULE, attempt=1, scheduled_for__in=to_run
        ).values_list("scheduled_for", flat=True)
    )
    to_run = [at for at in to_run if at not in done]
    try:
        return _claim_and_create(job, to_run, gap, following=nxt, now=now)
    except IntegrityError:
        return []


def _claim_and_create(
    job: Job, to_run: list[datetime], gap: Gap | None, *, following: datetime | None, now: datetime
) -> list[Run]:
    """The claim and the runs of fire(): one transaction."""
    # The reads of run_create before the transaction: on SQLite it holds the
    # write lock, and 100 jobs due at once kept django-q2's pusher from
    # handing out the first runs for 0.7 s. Catch-up runs wait their turn
    # (_catch_up) but are gated on upstreams as any fire is.
    plan = services.run_plan(job, now=now, at=to_run[0]) if len(to_run) == 1 else None
    if len(to_run) > 1 and (blocked := services.upstream_blocker(job, now=now)):
        plan = (blocked, False)
    with transaction.atomic():
        # The claim notes the latest fire too (staleness reads it): one
        # UPDATE of the job row per fire, not two.
        latest = max(to_run) if to_run else None
        if not services.claim_fire(job, following=following, latest=latest):
            return []
        if gap:
            MissedFires.objects.create(
                job=job,
                first=gap.first,
                last=gap.last,
                count=gap.count,
                policy=job.catchup,
                recorded_at=now,
            )
        if len(to_run) <= 1 or plan is not None:
            return [
                services.run_create(
                    job=job,
                    trigger=Run.Trigger.SCHEDULE,
                    scheduled_for=at,
                    now=now,
                    plan=plan,
                    noted=True,
                )
                for at in to_run
            ]
        return _catch_up(job, to_run, now)


def _catch_up(job: Job, fires: list[datetime], now: datetime) -> list[Run]:
    """Several fires at once (catchup=all): one waiting run each, oldest
    first; the dispatcher starts them one after another (or together when
    the job allows overlap)."""
    runs = [
        Run.objects.create(
            job=job,
            trigger=Run.Trigger.SCHEDULE,
            scheduled_for=at,
            queued_at=now,
            status=Run.Status.QUEUED,
        )
        for at in fires
    ]
    services.dispatch_waiting(now=now, job=job)
    return runs


def next_due() -> datetime | None:
    """The next moment the clock has work: a fire or a waiting retry.

    A retry whose job is busy is left out (as dispatch_waiting leaves it):
    the end of the run it waits for dispatches it, and its delay, long
    past, would have the clock wake at once, again and again."""
    fire = (
        Job.objects.filter(enabled=True, next_fire_at__isnull=False)
        .exclude(pk__in=_held_off())
        .aggregate(due=Min("next_fire_at"))["due"]
    )
    busy = Run.objects.filter(services.BUSY, job=OuterRef("job"))
    retry = (
        Run.objects.filter(
            status=Run.Status.QUEUED, enqueued_at__isnull=True, not_before__isnull=False
        )
        .filter(Q(job__overlap=Job.Overlap.ALLOW) | ~Exists(busy))
        .aggregate(due=Min("not_before"))["due"]
    )
    return min((d for d in (fire, retry) if d is not None), default=None)


def tick(*, now: datetime | None = None) -> list[Run]:
    """One pass of the clock: pick up edits, fire what is due, sweep now and
    then, say we are alive."""
    now = now or timezone.now()
    sync(now=now)
    runs = fire_due(now=now)
    services.dispatch_waiting(now=now)  # retries whose delay has passed start on time
    last_sweep = cache.get(SWEEP_KEY)
    if last_sweep is None or (now.timestamp() - last_sweep) >= settings.JOBSITE_SWEEP_SECONDS:
        cache.set(SWEEP_KEY, now.timestamp(), timeout=None)
        swept = services.sweep(now=now)
        swept["stale flips"] = alerts.check_stale(now=now)
        swept["notifications resent"] = alerts.resend_unnotified(now=now)
        swept["failed sends retried"] = notify.retry_failed(now=now)
        if any(swept.values()):
            log.info("sweep: %s", swept)
    _send_due_digests(now)
    _start_daily_prune(now)
    cache.set(TICK_KEY, now.isoformat(), timeout=None)
    return runs


def _start_daily_prune(now: datetime) -> None:
    """Once a day, hand the prune of old runs to the workers (it can take
    minutes; the clock must not wait for it)."""
    from jobs import retention

    try:
        retention.prune_daily(now=now)
    except Exception:
        log.exception("starting the daily prune failed")


def _send_due_digests(now: datetime) -> None:
    """The built-in daily digest; a mail problem must not stop the clock."""
    from jobs import digests

    try:
        digests.send_due_digests(now=now)
    except Exception:
        log.exception("sending the daily digest failed")


def sleep_seconds(*, now: datetime, max_sleep: float) -> float:
    """How long the clock may sleep: until the next due fire, at most max_sleep."""
    due = next_due()
    if due is None:
        return max_sleep
    return max(0.0, min(max_sleep, (due - now).total_seconds()))
