"""Retries, overlap policies, cancel, leases, dependencies, catch-up (in process).

The same behaviours with real worker and scheduler processes are in
test_faults.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings

from jobs import clock, runlog, services
from jobs.models import Job, MissedFires, Run

quiet = {"echo": lambda text: None}
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def start(job: Job, **kw) -> Run:
    """A run of `job` claimed by a (pretend) worker: status running."""
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True, **kw)
    assert services.run_claim(run_id=run.pk, worker="host:1") is not None
    run.refresh_from_db()
    return run


def finish(run: Run, status: str = Run.Status.SUCCEEDED, **kw) -> None:
    assert services.run_finish(run=run, status=status, **kw)


# --- Retries ---------------------------------------------------------------------


def test_failed_run_is_retried_with_backoff_keeping_its_logical_time(make_job):
    job = make_job(command="exit 1", retries=2, retry_delay=10, retry_backoff=3)
    first = services.run_foreground(job=job, **quiet)
    assert first.status == Run.Status.FAILED
    retry = Run.objects.get(retry_of=first)
    assert retry.trigger == Run.Trigger.RETRY
    assert retry.attempt == 2
    assert retry.status == Run.Status.QUEUED and retry.enqueued_at is None
    assert retry.scheduled_for == first.scheduled_for
    delay = (retry.not_before - first.finished_at).total_seconds()
    assert 10 <= delay <= 11.01  # base delay + up to 10% jitter


def test_retry_waits_for_its_delay_then_runs_and_knows_its_attempt(
    make_job, q_sync, django_capture_on_commit_callbacks
):
    job = make_job(command='echo "attempt $JOBSITE_ATTEMPT"; exit 1', retries=1, retry_delay=30)
    first = services.run_foreground(job=job, **quiet)
    retry = Run.objects.get(retry_of=first)
    assert services.dispatch_waiting(now=retry.not_before - timedelta(seconds=1)) == 0
    with django_capture_on_commit_callbacks(execute=True):
        assert services.dispatch_waiting(now=retry.not_before) == 1  # q_sync: runs inline
    retry.refresh_from_db()
    assert retry.status == Run.Status.FAILED
    assert runlog.read_log(retry).startswith("attempt 2\n")
    # retries=1: no third attempt.
    assert not Run.objects.filter(attempt=3).exists()


def test_backoff_is_exponential_and_capped(make_job):
    job = make_job(retry_delay=10, retry_backoff=2, retry_max_delay=60)
    delays = [services.retry_delay(job, attempt, jitter=0) for attempt in range(1, 6)]
    assert delays == [10, 20, 40, 60, 60]


def test_a_huge_backoff_waits_the_longest_delay_instead_of_failing(make_job):
    """The delay grew past a float (OverflowError): the run's end, or the
    sweeper in the scheduler, failed with it. Job.clean now bounds the
    backoff; a row stored before that bound still must not break a run."""
    job = make_job(retries=20, retry_delay=10, retry_backoff=2, retry_max_delay=600)
    Job.objects.filter(pk=job.pk).update(retry_backoff=1e20)
    job.refresh_from_db()
    assert services.retry_delay(job, 20, jitter=0) == 600
    lost = start(job)
    Run.objects.filter(pk=lost.pk).update(heartbeat_at=T0, attempt=20)
    assert services.sweep_lost(now=T0 + timedelta(hours=1)) == 1
    retry = Run.objects.get(retry_of=lost)
    assert retry.not_before >= T0 + timedelta(hours=1, seconds=600)


def test_timeouts_and_lost_runs_are_retried_but_cancelled_runs_are_not(make_job):
    job = make_job(command="sleep 30", timeout=1, retries=1)
    timed_out = services.run_foreground(job=job, **quiet)
    assert timed_out.status == Run.Status.TIMED_OUT
    assert Run.objects.filter(retry_of=timed_out).count() == 1

    other = make_job(retries=3)
    run = start(other)
    services.run_cancel(run=run, by=None)
    finish(run, Run.Status.CANCELLED)
    assert not Run.objects.filter(retry_of=run).exists()


def test_a_retry_is_scheduled_once_even_if_two_processes_finish_the_run(make_job):
    job = make_job(retries=1)
    run = start(job)
    finish(run, Run.Status.FAILED)
    assert not services.run_finish(run=run, status=Run.Status.FAILED)
    assert services._schedule_retry(run, now=T0) is None  # unique constraint
    assert Run.objects.filter(retry_of=run).count() == 1


# --- Overlap policies ------------------------------------------------------------------


def test_queue_policy_waits_for_the_running_run_then_starts(make_job):
    job = make_job(overlap=Job.Overlap.QUEUE)
    running = start(job)
    waiting = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE)
    assert waiting.status == Run.Status.QUEUED
    waiting.refresh_from_db()
    assert waiting.enqueued_at is None, "dispatched while another run was running"
    finish(running)
    waiting.refresh_from_db()
    assert waiting.enqueued_at is not None


def test_queue_policy_keeps_at_most_one_waiting(make_job):
    job = make_job(overlap=Job.Overlap.QUEUE)
    start(job)
    waiting = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE)
    third = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE)
    assert third.status == Run.Status.SKIPPED
    assert third.error_summary == f"run #{waiting.pk} is already waiting"


def test_allow_policy_runs_side_by_side(make_job):
    job = make_job(overlap=Job.Overlap.ALLOW)
    start(job)
    second = start(job)
    assert second.status == Run.Status.RUNNING


def test_replace_policy_cancels_the_running_run_and_starts_after_it(make_job):
    job = make_job(overlap=Job.Overlap.REPLACE)
    old = start(job)
    new = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE)
    old.refresh_from_db()
    assert old.cancel_requested_at is not None
    assert old.error_summary == f"Replaced by run #{new.pk}"
    new.refresh_from_db()
    assert new.enqueued_at is None  # waits for the old process group to go
    finish(old, Run.Status.CANCELLED, summary=old.error_summary)
    new.refresh_from_db()
    assert new.enqueued_at is not None


def test_a_claim_that_finds_the_slot_taken_goes_back_to_waiting_under_queue(make_job):
    job = make_job(overlap=Job.Overlap.QUEUE)
    running = start(job)
    sneaky = Run.objects.create(
        job=job, trigger="manual", scheduled_for=T0, queued_at=T0, enqueued_at=T0
    )
    assert services.run_claim(run_id=sneaky.pk, worker="host:2") is None
    sneaky.refresh_from_db()
    assert sneaky.status == Run.Status.QUEUED and sneaky.enqueued_at is None
    finish(running)
    sneaky.refresh_from_db()
    assert sneaky.enqueued_at is not None


# --- Pause ----------------------------------------------------------------------


def test_pausing_a_job_skips_its_waiting_retry(make_job):
    """A user pauses a broken job to stop it: its pending retry must not run."""
    job = make_job(retries=2, retry_delay=60)
    failed = start(job)
    finish(failed, Run.Status.FAILED, exit_code=1)
    retry = Run.objects.get(retry_of=failed)
    services.job_set_enabled(job=job, enabled=False)
    clock.tick(now=retry.not_before + timedelta(minutes=1))
    retry.refresh_from_db()
    assert (retry.status, retry.error_summary) == (Run.Status.SKIPPED, "paused")
    assert retry.enqueued_at is None


def test_a_run_waiting_behind_another_is_skipped_once_its_job_is_paused_by_an_edit(make_job):
    job = make_job(overlap=Job.Overlap.QUEUE)
    running = start(job)
    waiting = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE)
    job.enabled = False
    job.save()  # the admin's change form, not the Pause button
    finish(running)
    waiting.refresh_from_db()
    assert (waiting.status, waiting.error_summary) == (Run.Status.SKIPPED, "paused")
    assert waiting.enqueued_at is None


def test_a_run_sent_to_the_workers_before_a_pause_is_skipped_when_claimed(make_job):
    job = make_job(overlap=Job.Overlap.QUEUE)
    sent = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE)
    assert sent.enqueued_at is not None
    Job.objects.filter(pk=job.pk).update(enabled=False)
    assert services.run_claim(run_id=sent.pk, worker="host:1") is None
    sent.refresh_from_db()
    assert (sent.status, sent.error_summary) == (Run.Status.SKIPPED, "paused")
    job.refresh_from_db()
    assert job.active_run_id is None
    # "Run now" of a paused job still runs: a user asked for it.
    manual = start(job)
    assert manual.status == Run.Status.RUNNING


# --- Cancel ----------------------------------------------------------------------


def test_cancelling_a_queued_run_is_immediate_and_records_who(make_job, make_user):
    job = make_job()
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    user = make_user("oncall")
    assert services.run_cancel(run=run, by=user) == "cancelled"
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    assert run.cancelled_by == user
    assert run.error_summary == "Cancelled by oncall"
    job.refresh_from_db()
    assert (job.last_end_status, job.last_end_run_id) == (Run.Status.CANCELLED, run.pk)


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_running_run_kills_its_process_group(make_job, make_user):
    import threading
    import time

    from django.db import connection

    job = make_job(command="sleep 1000 & sleep 1000")
    result: dict = {}

    def worker():
        try:
            result["run"] = services.run_foreground(job=job, **quiet)
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    deadline = time.monotonic() + 10
    while not Run.objects.filter(job=job, status="running", pid__isnull=False).exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run = Run.objects.get(job=job)
    assert services.run_cancel(run=run, by=make_user("oncall")) == "cancelling"
    thread.join(10)
    assert not thread.is_alive()
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    assert run.error_summary == "Cancelled by oncall"
    from tests.conftest import group_alive

    assert not group_alive(run.pid)


def test_cancelling_a_finished_run_says_so(make_job):
    run = services.run_foreground(job=make_job(), **quiet)
    assert services.run_cancel(run=run, by=None) == "finished"


# --- Leases and the sweeper ------------------------------------------------------------


@override_settings(JOBSITE_LEASE_SECONDS=60)
def test_a_run_whose_heartbeat_stopped_is_lost_and_retried(make_job):
    job = make_job(retries=1)
    run = start(job)
    Run.objects.filter(pk=run.pk).update(heartbeat_at=T0)
    assert services.sweep_lost(now=T0 + timedelta(seconds=59)) == 0
    assert services.sweep_lost(now=T0 + timedelta(seconds=61)) == 1
    run.refresh_from_db()
    assert run.status == Run.Status.LOST
    assert "stopped heartbeating" in run.error_summary
    job.refresh_from_db()
    assert job.active_run_id is None, "slot still held"
    assert (job.last_end_status, job.last_end_run_id) == (Run.Status.LOST, run.pk)
    assert Run.objects.get(retry_of=run).attempt == 2


@override_settings(JOBSITE_LEASE_SECONDS=60)
def test_the_sweeper_kills_a_lost_runs_group_but_not_a_process_that_took_its_number(make_job):
    """Pids wrap round within a lease (pid_max is often 32768): the number a
    lost run's group had may lead another run's group by the time the sweeper
    comes. It kills the run's own leftovers, and only those."""
    import os
    import socket
    import subprocess

    def group(env: dict) -> subprocess.Popen:
        return subprocess.Popen(
            ["sleep", "30"], start_new_session=True, env={"PATH": os.environ["PATH"], **env}
        )

    job = make_job()
    own, stranger = start(job), start(make_job())
    own_group = group({"JOBSITE_RUN_ID": str(own.pk)})
    other_run = group({"JOBSITE_RUN_ID": str(own.pk + 1000)})  # has the stranger's number
    try:
        for run, proc in ((own, own_group), (stranger, other_run)):
            Run.objects.filter(pk=run.pk).update(
                heartbeat_at=T0, pid=proc.pid, worker=f"{socket.gethostname()}:1"
            )
        assert services.sweep_lost(now=T0 + timedelta(seconds=61)) == 2
        assert own_group.wait(timeout=5) == -9
        assert other_run.poll() is None, "the sweeper killed another run's processes"
    finally:
        for proc in (own_group, other_run):
            proc.kill()
            proc.wait()


@override_settings(JOBSITE_REQUEUE_SECONDS=300, JOBSITE_MAX_DELIVERIES=2)
def test_a_queued_run_the_broker_lost_is_sent_again_then_given_up(make_job):
    job = make_job()
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True, now=T0)
    assert services.sweep_queued(now=T0 + timedelta(seconds=200)) == 0
    assert services.sweep_queued(now=T0 + timedelta(seconds=301)) == 1
    run.refresh_from_db()
    assert run.enqueue_count == 2 and run.status == Run.Status.QUEUED
    services.sweep_queued(now=T0 + timedelta(seconds=700))
    run.refresh_from_db()
    assert run.status == Run.Status.LOST
    assert "no worker picked it up after 2 deliveries" in run.error_summary
    assert Job.objects.get(pk=job.pk).last_end_status == Run.Status.LOST


def test_a_stale_worker_notices_it_lost_its_run_and_stops(make_job):
    job = make_job()
    run = start(job)
    watch = services._Watch(run)
    watch.last_check -= 10
    assert watch.should_stop() is False
    Run.objects.filter(pk=run.pk).update(status=Run.Status.LOST)
    watch.last_check -= 10
    assert watch.should_stop() is True


# --- Dependencies ---------------------------------------------------------------------


def test_a_job_whose_upstream_failed_is_skipped_with_the_reason(make_job):
    load = make_job(name="warehouse-load", command="exit 1")
    export = make_job(name="warehouse-export")
    export.upstreams.add(load)
    services.run_foreground(job=load, **quiet)
    run = services.run_create(job=export, trigger=Run.Trigger.SCHEDULE)
    assert run.status == Run.Status.SKIPPED
    assert run.error_summary.startswith("waiting on warehouse-load: failed at ")


def test_a_job_runs_when_every_upstream_last_succeeded(make_job):
    a, b = make_job(name="a"), make_job(name="b")
    down = make_job(name="down")
    down.upstreams.add(a, b)
    services.run_foreground(job=a, **quiet)
    assert (
        "waiting on b: it has not run yet"
        in services.run_create(job=down, trigger="schedule").error_summary
    )
    services.run_foreground(job=b, **quiet)
    assert services.run_foreground(job=down, **quiet).status == Run.Status.SUCCEEDED


def test_upstream_triggered_job_runs_once_all_upstreams_succeeded(make_job, q_sync):
    a, b = make_job(name="extract-a"), make_job(name="extract-b")
    report = make_job(name="report", trigger_on_upstream=True, command="echo report")
    report.upstreams.add(a, b)
    first_a = services.run_foreground(job=a, **quiet)
    assert not Run.objects.filter(job=report).exists()
    services.run_foreground(job=b, **quiet)
    [run] = Run.objects.filter(job=report)
    assert run.trigger == Run.Trigger.UPSTREAM
    # Another success of one upstream alone does not trigger again.
    services.run_foreground(job=a, **quiet)
    assert Run.objects.filter(job=report).count() == 1
    assert first_a.status == Run.Status.SUCCEEDED


def test_dependency_cycle_is_found_with_the_names(make_job):
    a, b, c = make_job(name="a"), make_job(name="b"), make_job(name="c")
    b.upstreams.add(a)
    c.upstreams.add(b)
    assert services.dependency_cycle(a, [c.pk]) == ["a", "c", "b", "a"]
    assert services.dependency_cycle(c, [a.pk]) is None


# --- Missed fires -------------------------------------------------------------------------


def down_for(job: Job, minutes: int) -> list[Run]:
    clock.sync(now=T0)
    return clock.fire_due(now=T0 + timedelta(minutes=minutes, seconds=1))


@pytest.mark.parametrize(
    ("policy", "ran", "missed"),
    [
        ("none", [], 3),
        ("latest", ["12:30"], 2),
        ("all", ["12:10", "12:20", "12:30"], 0),
    ],
)
def test_catchup_policies_after_the_scheduler_was_down(make_job, policy, ran, missed):
    job = make_job(schedule="*/10 * * * *", catchup=policy, overlap=Job.Overlap.ALLOW)
    runs = down_for(job, 35)
    assert [f"{r.scheduled_for:%H:%M}" for r in runs] == ran
    gaps = list(MissedFires.objects.filter(job=job))
    assert sum(g.count for g in gaps) == missed
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 12, 40, tzinfo=UTC)


def test_catch_up_all_runs_one_after_another_under_skip(make_job):
    job = make_job(schedule="*/10 * * * *", catchup="all")
    runs = down_for(job, 35)
    assert len(runs) == 3
    dispatched = Run.objects.filter(job=job, enqueued_at__isnull=False)
    assert dispatched.count() == 1, "catch-up runs overlapped"
    assert all(r.status == Run.Status.QUEUED for r in Run.objects.filter(job=job))


@override_settings(JOBSITE_CATCHUP_MAX=3)
def test_catch_up_all_after_a_long_downtime_runs_the_latest_and_records_the_rest(make_job):
    """More fires missed than the cap, and one on time: the clock used to
    crash (IndexError) on this, at every restart."""
    job = make_job(schedule="* * * * *", catchup="all", overlap=Job.Overlap.ALLOW)
    clock.sync(now=T0)
    runs = clock.fire_due(now=T0 + timedelta(hours=3, seconds=10))
    assert [f"{r.scheduled_for:%H:%M}" for r in runs] == ["14:57", "14:58", "14:59", "15:00"]
    (gap,) = MissedFires.objects.filter(job=job)
    assert (f"{gap.first:%H:%M}", f"{gap.last:%H:%M}", gap.count) == ("12:01", "14:56", 176)
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 15, 1, tzinfo=UTC)


def test_catch_up_runs_are_skipped_while_an_upstream_failed_like_any_fire(make_job):
    up = make_job(name="up")
    down = make_job(name="down", schedule="*/10 * * * *", catchup="all")
    down.upstreams.add(up)
    # Its run for the logical times caught up (upstreams are judged by those).
    finish(start(up, scheduled_for=T0), Run.Status.FAILED, exit_code=1)
    runs = down_for(down, 35)
    assert len(runs) == 3
    for run in Run.objects.filter(job=down):
        assert run.status == Run.Status.SKIPPED
        assert run.error_summary.startswith("waiting on up: failed at ")
        assert run.enqueued_at is None


def test_a_fire_that_is_only_a_little_late_is_not_missed(make_job):
    job = make_job(schedule="*/10 * * * *", catchup="none")
    clock.sync(now=T0)
    runs = clock.fire_due(now=T0 + timedelta(minutes=10, seconds=20))
    assert len(runs) == 1
    assert not MissedFires.objects.filter(job=job).exists()
