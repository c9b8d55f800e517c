"""Our clock: next fires, claims, no duplicates."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import IntegrityError, connection, transaction

from jobs import clock, services
from jobs.models import Job, Run

T0 = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)


def fire_all(now):
    clock.sync(now=now)
    return clock.fire_due(now=now)


def test_new_job_gets_its_next_fire_time_from_the_scheduler(make_job):
    job = make_job(schedule="*/5 * * * *")
    clock.sync(now=T0)
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 12, 5, tzinfo=UTC)


def test_due_fire_creates_one_scheduled_run_for_the_fire_time(make_job):
    job = make_job(schedule="*/5 * * * *")
    clock.sync(now=T0)
    assert fire_all(T0) == []
    runs = fire_all(T0 + timedelta(minutes=5))
    assert len(runs) == 1
    run = runs[0]
    assert run.trigger == Run.Trigger.SCHEDULE
    assert run.scheduled_for == datetime(2026, 6, 1, 12, 5, tzinfo=UTC)
    assert run.status == Run.Status.QUEUED
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 12, 10, tzinfo=UTC)
    assert fire_all(T0 + timedelta(minutes=5)) == []


def test_editing_the_schedule_takes_effect_at_the_next_tick(make_job):
    job = make_job(schedule="0 3 * * *")
    clock.sync(now=T0)
    Job.objects.filter(pk=job.pk).update(schedule="*/10 * * * *")
    clock.sync(now=T0)
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 12, 10, tzinfo=UTC)


def test_editing_the_time_zone_takes_effect_at_the_next_tick(make_job):
    job = make_job(schedule="0 15 * * *")
    clock.sync(now=T0)
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 15, 0, tzinfo=UTC)
    Job.objects.filter(pk=job.pk).update(timezone="America/New_York")
    clock.sync(now=T0)
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 19, 0, tzinfo=UTC)


def test_paused_job_does_not_fire_and_resumes_from_now(make_job):
    job = make_job(schedule="* * * * *")
    clock.sync(now=T0)
    services.job_set_enabled(job=job, enabled=False)
    assert fire_all(T0 + timedelta(minutes=30)) == []
    services.job_set_enabled(job=job, enabled=True)
    later = T0 + timedelta(hours=1)
    clock.sync(now=later)
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 13, 1, tzinfo=UTC)


def test_after_downtime_only_the_latest_missed_fire_runs(make_job):
    job = make_job(schedule="*/10 * * * *")
    clock.sync(now=T0)
    runs = fire_all(T0 + timedelta(minutes=45))
    assert [r.scheduled_for for r in runs] == [datetime(2026, 6, 1, 12, 40, tzinfo=UTC)]
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 12, 50, tzinfo=UTC)


def test_a_scheduler_with_a_stale_view_cannot_fire_the_same_time_again(make_job):
    job = make_job(schedule="*/5 * * * *")
    clock.sync(now=T0)
    snapshot = Job.objects.get(pk=job.pk)
    now = T0 + timedelta(minutes=5)
    assert len(clock.fire(Job.objects.get(pk=job.pk), now)) == 1
    assert clock.fire(snapshot, now) == []
    assert Run.objects.filter(job=job).count() == 1


def test_saving_a_copy_of_a_job_read_before_a_fire_keeps_the_clocks_state(make_job):
    """A full save() of a job read earlier (the admin's, a shell's) writes
    its definition, not the state the clock and the workers keep: it used
    to put next_fire_at back to a fire that had run."""
    job = make_job(schedule="*/5 * * * *")
    clock.sync(now=T0)
    copy = Job.objects.get(pk=job.pk)
    (run,) = fire_all(T0 + timedelta(minutes=5))
    services.run_claim(run_id=run.pk, worker="w:1", now=T0 + timedelta(minutes=5))
    copy.description = "edited"
    copy.save()
    job.refresh_from_db()
    assert job.description == "edited"
    assert job.next_fire_at == datetime(2026, 6, 1, 12, 10, tzinfo=UTC)
    assert job.last_scheduled_for == run.scheduled_for
    assert job.active_run_id == run.pk
    copy.next_fire_at = T0
    copy.save(update_fields=["next_fire_at"])  # named: written
    job.refresh_from_db()
    assert job.next_fire_at == T0


@pytest.mark.parametrize("catchup", ["latest", "all"])
def test_a_fire_time_put_back_after_its_fire_is_passed_over_not_wedged(make_job, catchup):
    """next_fire_at written back to a fire that already has its run: the
    clock used to hit the unique constraint on every tick, never move it
    on, and spin; with catchup=all the job never fired again."""
    job = make_job(schedule="*/5 * * * *", catchup=catchup, overlap=Job.Overlap.ALLOW)
    clock.sync(now=T0)
    (first,) = fire_all(T0 + timedelta(minutes=5))
    Job.objects.filter(pk=job.pk).update(next_fire_at=first.scheduled_for)
    now = T0 + timedelta(minutes=5, seconds=20)
    assert clock.tick(now=now) == []
    assert clock.sleep_seconds(now=now, max_sleep=1.0) == 1.0
    job.refresh_from_db()
    assert job.next_fire_at == datetime(2026, 6, 1, 12, 10, tzinfo=UTC)
    later = T0 + timedelta(hours=1, seconds=5)
    Job.objects.filter(pk=job.pk).update(next_fire_at=first.scheduled_for)
    runs = clock.tick(now=later)
    assert datetime(2026, 6, 1, 13, 0, tzinfo=UTC) in [r.scheduled_for for r in runs]
    assert Run.objects.filter(job=job, scheduled_for=first.scheduled_for).count() == 1


def test_unique_constraint_forbids_a_second_run_for_the_same_fire(make_job):
    job = make_job()
    fields = dict(job=job, trigger="schedule", scheduled_for=T0, queued_at=T0, attempt=1)
    Run.objects.create(**fields)
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.create(**fields)
    # Manual runs for the same logical time are fine.
    Run.objects.create(**{**fields, "trigger": "manual"})


def test_one_bad_schedule_does_not_block_the_others(make_job):
    bad = make_job(schedule="* * * * *")
    good = make_job(schedule="* * * * *")
    clock.sync(now=T0)
    Job.objects.filter(pk=bad.pk).update(schedule="99 * * * *", fire_basis="99 * * * *|UTC")
    runs = fire_all(T0 + timedelta(minutes=1))
    assert [r.job_id for r in runs] == [good.pk]


def test_a_job_that_fails_to_fire_does_not_stop_the_others(make_job, monkeypatch, caplog):
    """Any error firing one job (a bug, a bad row) is logged with the job,
    and the clock goes on with the others."""
    broken = make_job(name="broken", schedule="* * * * *")
    good = make_job(name="good", schedule="* * * * *")
    plan_fires = clock.plan_fires

    def failing_for_broken(job, now):
        if job.pk == broken.pk:
            raise RuntimeError("boom")
        return plan_fires(job, now)

    monkeypatch.setattr(clock, "plan_fires", failing_for_broken)
    clock.sync(now=T0)
    now = T0 + timedelta(minutes=1)
    runs = clock.tick(now=now)
    assert [r.job_id for r in runs] == [good.pk]
    assert "broken" in caplog.text and "boom" in caplog.text
    # Its fire, still due, does not keep the clock awake (a busy loop of
    # tracebacks); it is tried again once its hold-off is over.
    assert clock.sleep_seconds(now=now, max_sleep=1.0) == 1.0
    assert clock.tick(now=now) == []
    assert len([r for r in caplog.records if "firing failed" in r.getMessage()]) == 1
    monkeypatch.setattr(clock, "plan_fires", plan_fires)
    monkeypatch.setitem(clock._holding, broken.pk, 0.0)  # the hold-off is over
    assert [r.job_id for r in clock.tick(now=now)] == [broken.pk]


def test_a_second_fire_while_running_is_skipped_with_reason(make_job):
    make_job(schedule="* * * * *")
    clock.sync(now=T0)
    [first] = fire_all(T0 + timedelta(minutes=1))
    services.run_claim(run_id=first.pk, worker="w:1")
    [second] = fire_all(T0 + timedelta(minutes=2))
    assert second.status == Run.Status.SKIPPED
    assert second.error_summary == f"run #{first.pk} still running"


@pytest.mark.django_db(transaction=True)
def test_concurrent_schedulers_fire_each_job_exactly_once(make_job):
    jobs = [make_job(schedule="* * * * *") for _ in range(15)]
    clock.sync(now=T0)
    now = T0 + timedelta(minutes=1)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def scheduler():
        try:
            barrier.wait()
            clock.fire_due(now=now)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=scheduler) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for job in jobs:
        runs = Run.objects.filter(job=job)
        assert runs.count() == 1
        assert runs.get().scheduled_for == datetime(2026, 6, 1, 12, 1, tzinfo=UTC)


def test_sleep_is_until_the_next_due_fire_but_never_longer_than_the_maximum(make_job):
    make_job(schedule="* * * * *")
    clock.sync(now=T0)
    assert clock.sleep_seconds(now=T0, max_sleep=1.0) == 1.0
    almost = datetime(2026, 6, 1, 12, 0, 59, 750000, tzinfo=UTC)
    assert clock.sleep_seconds(now=almost, max_sleep=1.0) == pytest.approx(0.25)


def test_the_clock_wakes_up_for_a_waiting_retry(make_job):
    job = make_job(schedule="0 3 * * *", retries=1)
    clock.sync(now=T0)
    run = services.run_create(job=job, trigger="manual", here=True, now=T0)
    services.run_claim(run_id=run.pk, worker="w:1", now=T0)
    services.run_finish(run=run, status=Run.Status.FAILED, now=T0)
    retry = Run.objects.get(retry_of=run)
    assert clock.next_due() == retry.not_before
    clock.tick(now=retry.not_before)
    retry.refresh_from_db()
    assert retry.enqueued_at == retry.not_before


def test_the_clock_sleeps_while_a_due_retry_waits_behind_a_running_run(make_job):
    """A retry whose delay has passed but whose job is busy is started by
    the end of the blocking run, not by the clock: the clock used to wake
    for it at once, again and again (a busy loop)."""
    job = make_job(overlap=Job.Overlap.QUEUE, retries=1, retry_delay=30)
    first = services.run_create(job=job, trigger=Run.Trigger.MANUAL, now=T0)
    first = services.run_claim(run_id=first.pk, worker="w:1", now=T0)
    second = services.run_create(job=job, trigger=Run.Trigger.MANUAL, now=T0)
    services.run_finish(run=first, status=Run.Status.FAILED, exit_code=1, now=T0)
    second = services.run_claim(run_id=second.pk, worker="w:2", now=T0)
    retry = Run.objects.get(retry_of=first)
    later = T0 + timedelta(minutes=5)
    Run.objects.filter(pk=second.pk).update(heartbeat_at=later)
    clock.tick(now=later)
    assert clock.next_due() is None
    assert clock.sleep_seconds(now=later, max_sleep=1.0) == 1.0
    services.run_finish(run=second, status=Run.Status.SUCCEEDED, exit_code=0, now=later)
    retry.refresh_from_db()
    assert retry.enqueued_at == later


def test_a_fire_notes_its_time_for_staleness_in_the_claim_itself(make_job):
    """Job.last_scheduled_for (what staleness reads) is written by the same
    UPDATE that claims the fire: one write of the job row per fire, not two
    (100 jobs due at once made 100 more round trips). A manual run does not
    count: it does not prove the schedule works."""
    from django.test.utils import CaptureQueriesContext

    job = make_job(schedule="*/5 * * * *")
    clock.sync(now=T0)
    clock.sync(now=T0 + timedelta(minutes=5))
    with CaptureQueriesContext(connection) as captured:
        (run,) = clock.fire_due(now=T0 + timedelta(minutes=5))
    job_writes = [q["sql"] for q in captured if q["sql"].startswith('UPDATE "jobs_job"')]
    assert len(job_writes) == 1, job_writes
    job.refresh_from_db()
    assert job.last_scheduled_for == run.scheduled_for == datetime(2026, 6, 1, 12, 5, tzinfo=UTC)
    services.run_create(job=job, trigger=Run.Trigger.MANUAL, now=T0 + timedelta(minutes=7))
    job.refresh_from_db()
    assert job.last_scheduled_for == datetime(2026, 6, 1, 12, 5, tzinfo=UTC)
    assert job.stale_reason(now=T0 + timedelta(minutes=7)) is None


def test_catching_up_notes_the_latest_fire_it_ran(make_job):
    job = make_job(schedule="*/10 * * * *", catchup=Job.Catchup.ALL, overlap=Job.Overlap.QUEUE)
    clock.sync(now=T0)
    runs = fire_all(T0 + timedelta(minutes=45))
    assert len(runs) > 1
    job.refresh_from_db()
    assert job.last_scheduled_for == max(r.scheduled_for for r in runs)
    assert job.last_scheduled_for == datetime(2026, 6, 1, 12, 40, tzinfo=UTC)


def test_a_fire_claim_is_refused_when_read_stale_and_never_notes_backwards(make_job):
    """services.claim_fire, the clock's written-out claim: it moves
    next_fire_at on only from the value read, and the noted latest fire
    only forwards."""
    job = make_job(schedule="*/5 * * * *")
    clock.sync(now=T0)
    job.refresh_from_db()
    due, following = job.next_fire_at, job.next_fire_at + timedelta(minutes=5)
    later = due + timedelta(hours=1)
    Job.objects.filter(pk=job.pk).update(last_scheduled_for=later)

    assert services.claim_fire(job, following=following, latest=due)
    fresh = Job.objects.get(pk=job.pk)
    assert fresh.next_fire_at == following
    assert fresh.last_scheduled_for == later, "an older fire moved the note backwards"

    assert not services.claim_fire(job, following=following, latest=due), "claimed twice"
    Job.objects.filter(pk=job.pk).update(last_scheduled_for=None)
    assert services.claim_fire(fresh, following=following + timedelta(minutes=5), latest=None)
    assert Job.objects.get(pk=job.pk).last_scheduled_for is None  # missed fires note nothing


def test_the_scheduler_command_outlives_an_error_in_a_tick(monkeypatch, caplog):
    """A bug in one part of a tick (the sweep, a digest) is logged and the
    clock goes on: a scheduler that stops is the failure nobody sees."""
    from django.core.management import call_command

    from jobs.management.commands import scheduler

    ticks = []

    def failing_tick():
        ticks.append(1)
        raise RuntimeError("sweep exploded")

    monkeypatch.setattr(clock, "tick", failing_tick)
    assert scheduler.Command().tick(max_sleep=1.0) == scheduler.ERROR_PAUSE
    assert "scheduler tick failed" in caplog.text and "sweep exploded" in caplog.text
    call_command("scheduler", "--once")  # returns: the error did not end the process badly
    assert len(ticks) == 2
