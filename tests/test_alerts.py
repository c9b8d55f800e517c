"""Staleness maths, rollups and alert flips (in process)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.utils import timezone

from jobs import alerts, clock, services, stats
from jobs.models import AlertFlip, Job, JobDailyStats, Run

quiet = {"echo": lambda text: None}
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def job_created_at(job: Job, when: datetime) -> Job:
    Job.objects.filter(pk=job.pk).update(created_at=when)
    job.refresh_from_db()
    return job


# --- Staleness: pure, plain datetimes -------------------------------------------------


def test_a_job_with_a_run_for_its_last_fire_is_not_stale(make_job):
    job = job_created_at(make_job(schedule="*/10 * * * *"), T0 - timedelta(days=1))
    job.last_scheduled_for = datetime(2026, 6, 1, 11, 50, tzinfo=UTC)
    job.last_success_at = datetime(2026, 6, 1, 11, 50, 5, tzinfo=UTC)
    # 12:00 fire, grace = half the interval (5 min): not due until 12:05.
    assert job.stale_reason(T0 + timedelta(minutes=4)) is None


def test_no_run_for_the_last_fire_after_its_grace_is_stale_with_how_overdue(make_job):
    job = job_created_at(make_job(schedule="*/10 * * * *"), T0 - timedelta(days=1))
    job.last_scheduled_for = datetime(2026, 6, 1, 11, 50, tzinfo=UTC)
    job.last_success_at = datetime(2026, 6, 1, 11, 50, 5, tzinfo=UTC)
    stale = job.stale_reason(T0 + timedelta(minutes=7))
    assert stale is not None
    assert stale.due == T0
    assert stale.overdue == timedelta(minutes=2)
    assert "no run for the fire at 2026-06-01 12:00" in stale.reason


def test_a_scheduler_that_is_down_makes_every_scheduled_job_stale(make_job):
    # Nothing creates runs: last_scheduled_for stays where the scheduler died.
    jobs = [
        job_created_at(make_job(schedule=s), T0 - timedelta(days=3))
        for s in ("* * * * *", "0 * * * *", "30 2 * * *")
    ]
    for job in jobs:
        job.last_scheduled_for = job.last_success_at = T0 - timedelta(days=2)
    later = T0 + timedelta(hours=2)
    assert all(job.stale_reason(later) for job in jobs)


def test_runs_that_never_succeed_make_the_job_stale(make_job):
    job = job_created_at(make_job(schedule="0 * * * *"), T0 - timedelta(days=1))
    job.last_scheduled_for = T0  # runs exist (e.g. skipped: waiting on an upstream)
    job.last_success_at = T0 - timedelta(hours=5)
    stale = job.stale_reason(T0 + timedelta(minutes=45))
    assert stale is not None and "no success since the fire at 2026-06-01 11:00" in stale.reason


def test_paused_manual_and_brand_new_jobs_are_never_stale(make_job):
    paused = job_created_at(make_job(schedule="* * * * *", enabled=False), T0 - timedelta(days=1))
    manual = job_created_at(make_job(), T0 - timedelta(days=1))
    new = job_created_at(make_job(schedule="0 3 * * *"), T0 - timedelta(hours=1))
    later = T0 + timedelta(hours=1)
    assert paused.stale_reason(later) is None
    assert manual.stale_reason(later) is None
    assert new.stale_reason(later) is None


def test_explicit_grace_overrides_the_derived_one(make_job):
    job = job_created_at(make_job(schedule="0 * * * *", grace=3600), T0 - timedelta(days=1))
    job.last_scheduled_for = job.last_success_at = T0 - timedelta(hours=1)
    assert job.stale_reason(T0 + timedelta(minutes=59)) is None
    assert job.stale_reason(T0 + timedelta(minutes=61)) is not None


def test_scheduler_down_is_caught_end_to_end_with_frozen_time(make_job):
    with time_machine.travel(T0 - timedelta(days=1), tick=False):
        job = make_job(schedule="*/5 * * * *")
    # The scheduler ran until now: the 12:00 fire had its run, and it succeeded.
    Job.objects.filter(pk=job.pk).update(last_scheduled_for=T0, last_success_at=T0)
    with time_machine.travel(T0, tick=False):
        clock.tick()
        assert alerts.check_stale(now=timezone.now()) == 0
    # The scheduler dies; half an hour later the sweep (in a surviving
    # scheduler, or /stale/ when none survives) sees the job stale.
    later = T0 + timedelta(minutes=30)
    assert alerts.check_stale(now=later) == 1
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.STALE
    flip = AlertFlip.objects.get(job=job)
    assert "no run for the fire at 2026-06-01 12:25" in flip.reason


def daily_job_that_ran_on_day_one(make_job) -> Job:
    """A 03:00 job a month old whose June 1st fire ran and succeeded."""
    job = job_created_at(make_job(schedule="0 3 * * *"), T0 - timedelta(days=30))
    day1 = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)
    clock.sync(now=day1 - timedelta(minutes=1))
    assert len(clock.fire_due(now=day1)) == 1
    Job.objects.filter(pk=job.pk).update(last_success_at=day1 + timedelta(minutes=5))
    job.refresh_from_db()
    return job


def test_a_resumed_job_is_not_stale_for_the_fires_it_missed_while_paused(make_job):
    job = daily_job_that_ran_on_day_one(make_job)
    paused = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    with time_machine.travel(paused, tick=False):
        services.job_set_enabled(job=job, enabled=False)
    clock.tick(now=paused)
    resumed = datetime(2026, 6, 4, 12, 0, tzinfo=UTC)
    with time_machine.travel(resumed, tick=False):
        services.job_set_enabled(job=job, enabled=True)
    job.refresh_from_db()
    assert job.stale_reason(resumed) is None  # before the clock's next tick too
    clock.tick(now=resumed)
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.OK
    # Its next fire still counts: no run for it, stale.
    stale = job.stale_reason(datetime(2026, 6, 5, 4, 0, tzinfo=UTC))
    assert stale is not None and "no run for the fire at 2026-06-05 03:00" in stale.reason


def test_a_job_resumed_within_one_tick_is_not_stale_either(make_job):
    job = daily_job_that_ran_on_day_one(make_job)
    resumed = datetime(2026, 6, 4, 12, 0, tzinfo=UTC)
    with time_machine.travel(resumed, tick=False):
        services.job_set_enabled(job=job, enabled=False)
        services.job_set_enabled(job=job, enabled=True)
    assert alerts.check_stale(now=resumed) == 0


def test_editing_the_schedule_is_not_stale_for_a_fire_before_the_edit(make_job):
    job = daily_job_that_ran_on_day_one(make_job)
    edit = datetime(2026, 6, 2, 2, 30, tzinfo=UTC)  # 0 3 -> 0 1, before today's 03:00
    Job.objects.filter(pk=job.pk).update(schedule="0 1 * * *")
    clock.tick(now=edit)
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.OK
    assert job.stale_reason(edit + timedelta(hours=1)) is None


# --- Rollups ------------------------------------------------------------------------------


def test_rollups_equal_a_full_recount(make_job):
    job = make_job(command='[ "$JOBSITE_RUN_ID" -ge 0 ] && exit $((JOBSITE_RUN_ID % 3))')
    for _ in range(9):
        services.run_foreground(job=job, **quiet)
    slow = make_job(command="sleep 5", timeout=1)
    services.run_foreground(job=slow, **quiet)
    queued = services.run_create(job=job, trigger="manual", here=True)
    services.run_cancel(run=queued, by=None)
    blocker = services.run_create(job=job, trigger="manual", here=True)
    services.run_create(job=job, trigger="schedule")  # skipped: blocker is queued
    services.run_cancel(run=blocker, by=None)

    for j in (job, slow):
        expected = stats.recount(j)
        rows = {row.day: row for row in JobDailyStats.objects.filter(job=j)}
        assert set(rows) == set(expected)
        for day, counts in expected.items():
            row = rows[day]
            for field, value in counts.items():
                assert getattr(row, field) == value, (j.name, field)
    row = JobDailyStats.objects.get(job=slow)
    assert row.timed_out == 1 and row.duration_max >= 1.0


def test_rollups_keep_the_totals_and_maxima_of_durations_and_lateness(make_job):
    """Three runs of one day: totals add up, maxima keep the largest (the
    rollup UPDATE is written out by hand for speed: this pins what it does)."""
    from jobs.models import Run

    job = make_job()
    day = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    for status, late, took in (
        ("succeeded", 2.0, 30.0),
        ("failed", 5.0, 10.0),
        ("succeeded", 1.0, 20.0),
    ):
        started = day + timedelta(seconds=late)
        run = Run.objects.create(
            job=job,
            status=status,
            scheduled_for=day,
            queued_at=day,
            started_at=started,
            finished_at=started + timedelta(seconds=took),
        )
        stats.record_finished(run)
    stats.record_finished(
        Run.objects.create(
            job=job, status="skipped", scheduled_for=day, queued_at=day, finished_at=day
        )
    )
    row = JobDailyStats.objects.get(job=job)
    assert (row.succeeded, row.failed, row.skipped, row.executed) == (2, 1, 1, 3)
    assert (row.duration_total, row.duration_max) == (60.0, 30.0)
    assert (row.lateness_total, row.lateness_max) == (8.0, 5.0)


def test_rates_come_from_rollups(make_job):
    job = make_job()
    today = timezone.localdate()
    JobDailyStats.objects.create(job=job, day=today, succeeded=3, failed=1)
    JobDailyStats.objects.create(job=job, day=today - timedelta(days=10), succeeded=0, lost=4)
    rates = stats.success_rates(job, timezone.now())
    assert rates["7d"].percent == 75.0
    assert rates["30d"].succeeded == 3 and rates["30d"].failures == 5
    assert stats.rates_by_job([job], timezone.now())[job.pk].total == 4


# --- Flips ------------------------------------------------------------------------------


def failing(make_job, **kw) -> Job:
    return make_job(command="echo boom; exit 2", **kw)


def test_first_failure_flips_to_failing_once_and_not_again(make_job):
    job = failing(make_job)
    services.run_foreground(job=job, **quiet)
    services.run_foreground(job=job, **quiet)
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.FAILING
    assert job.consecutive_failures == 2
    [flip] = AlertFlip.objects.filter(job=job)
    assert (flip.old_state, flip.new_state) == ("ok", "failing")
    assert flip.reason == "Exit code 2: boom"


def test_threshold_alerts_only_after_n_consecutive_failures(make_job):
    job = failing(make_job, alert_after=3)
    for expected_flips in (0, 0, 1, 1):
        services.run_foreground(job=job, **quiet)
        assert AlertFlip.objects.filter(job=job).count() == expected_flips


def test_success_flips_back_to_ok_saying_how_long_it_was_broken(make_job):
    job = failing(make_job)
    with time_machine.travel(T0, tick=False):
        services.run_foreground(job=job, **quiet)
    Job.objects.filter(pk=job.pk).update(command="echo fixed")
    job.refresh_from_db()
    with time_machine.travel(T0 + timedelta(minutes=42), tick=False):
        services.run_foreground(job=job, **quiet)
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.OK and job.consecutive_failures == 0
    recovery = AlertFlip.objects.filter(job=job).first()
    assert (recovery.old_state, recovery.new_state) == ("failing", "ok")
    assert recovery.reason == "succeeded again after 42 min"


def test_a_failure_that_will_be_retried_does_not_alert_yet(make_job):
    job = failing(make_job, retries=1)
    services.run_foreground(job=job, **quiet)
    assert not AlertFlip.objects.filter(job=job).exists()


def test_a_failure_whose_retry_is_replaced_or_cancelled_alerts_after_all(make_job, admin_user):
    """overlap=replace cancels the waiting retry of each failed fire; so can
    a user. The failure it was to retry counts then, as the last attempt."""
    job = failing(make_job, overlap="replace", retries=1, retry_delay=600)
    services.run_foreground(job=job, trigger=Run.Trigger.SCHEDULE, **quiet)
    assert not AlertFlip.objects.filter(job=job).exists()  # its retry waits
    services.run_foreground(job=job, trigger=Run.Trigger.SCHEDULE, **quiet)  # replaces it
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.FAILING
    [flip] = AlertFlip.objects.filter(job=job)
    assert flip.reason == "Exit code 2: boom"

    other = failing(make_job, retries=1, retry_delay=600)
    services.run_foreground(job=other, **quiet)
    retry = Run.objects.get(job=other, trigger=Run.Trigger.RETRY)
    services.run_cancel(run=retry, by=admin_user)
    other.refresh_from_db()
    assert (other.alert_state, other.consecutive_failures) == (Job.AlertState.FAILING, 1)


def test_a_run_by_hand_does_not_clear_a_stale_job_its_schedule_still_misses(make_job):
    job = make_job(name="hourly-import", schedule="0 * * * *", grace=300, command="true")
    job = job_created_at(job, T0 - timedelta(days=1))
    now = T0 + timedelta(minutes=20)  # the 12:00 fire never ran (the scheduler is down)
    with time_machine.travel(now, tick=False):
        assert alerts.check_stale(now=now) == 1
        run = services.run_foreground(job=job, trigger=Run.Trigger.MANUAL, **quiet)
        assert run.status == Run.Status.SUCCEEDED
        assert alerts.check_stale(now=now + timedelta(seconds=5)) == 0
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.STALE
    assert [(f.old_state, f.new_state) for f in AlertFlip.objects.filter(job=job)] == [
        ("ok", "stale")
    ]


def test_a_success_clears_a_job_stale_for_want_of_one_at_once(make_job):
    job = job_created_at(make_job(schedule="0 * * * *", command="true"), T0 - timedelta(days=1))
    Job.objects.filter(pk=job.pk).update(
        last_scheduled_for=T0,
        last_success_at=T0 - timedelta(hours=5),  # runs, none succeeded
    )
    job.refresh_from_db()
    with time_machine.travel(T0 + timedelta(minutes=45), tick=False):
        assert alerts.check_stale(now=timezone.now()) == 1
    with time_machine.travel(T0 + timedelta(minutes=50), tick=False):
        run = services.run_foreground(job=job, trigger=Run.Trigger.MANUAL, **quiet)
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.OK  # not only at the next sweep
    recovery = AlertFlip.objects.filter(job=job).first()
    assert (recovery.new_state, recovery.run) == ("ok", run)
    assert recovery.reason == "succeeded again after 5 min"


def test_cancelling_a_retry_outdated_by_a_later_success_sends_no_alert(make_job, admin_user):
    job = failing(make_job, retries=1, retry_delay=600, overlap="allow")
    services.run_foreground(job=job, **quiet)
    retry = Run.objects.get(job=job, trigger=Run.Trigger.RETRY)
    Job.objects.filter(pk=job.pk).update(command="true")
    job.refresh_from_db()
    services.run_foreground(job=job, **quiet)  # fixed meanwhile
    services.run_cancel(run=retry, by=admin_user)
    job.refresh_from_db()
    assert (job.alert_state, job.consecutive_failures) == (Job.AlertState.OK, 0)
    assert not AlertFlip.objects.filter(job=job).exists()


def test_two_processes_flipping_at_once_record_one_flip(make_job):
    job = make_job()
    stale_copy = Job.objects.get(pk=job.pk)
    assert alerts.flip(job=job, old="ok", new="failing", now=T0) is not None
    assert alerts.flip(job=stale_copy, old="ok", new="failing", now=T0) is None
    assert AlertFlip.objects.filter(job=job).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_flip_is_notified_once_by_email(make_job, q_sync, mailoutbox):
    job = failing(make_job, alert_emails=["oncall@example.com"])
    services.run_foreground(job=job, **quiet)
    services.run_foreground(job=job, **quiet)
    assert len(mailoutbox) == 1
    assert mailoutbox[0].to == ["oncall@example.com"]
    assert job.name in mailoutbox[0].subject
