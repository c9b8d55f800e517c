"""Run-lifecycle semantics an analyst relies on: upstream gates by logical
time, retries and reruns of upstreams, triggered fan-in, retries of a job
edited or paused meanwhile.

In process against the real database; the same with real worker and
scheduler processes where the timing matters is at the end.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from jobs import clock, services
from jobs.models import AlertFlip, Job, Run
from tests.conftest import wait_for
from tests.test_faults import FAST, finished

DAY = timedelta(days=1)
# 02:00 UTC on a day: the upstream's fire; its downstream's at 02:30.
LOAD_AT = datetime(2026, 6, 2, 2, 0, tzinfo=UTC)


def start(job: Job, **kw) -> Run:
    """A run of `job` claimed by a (pretend) worker: status running."""
    kw.setdefault("trigger", Run.Trigger.MANUAL)
    run = services.run_create(job=job, here=True, **kw)
    assert services.run_claim(run_id=run.pk, worker="host:1") is not None
    run.refresh_from_db()
    return run


def finish(run: Run, status: str = Run.Status.SUCCEEDED) -> None:
    exit_code = 0 if status == Run.Status.SUCCEEDED else 1
    assert services.run_finish(run=run, status=status, exit_code=exit_code)


def ran(job: Job, at: datetime, status: str = Run.Status.SUCCEEDED) -> Run:
    """A finished scheduled run of `job` for the logical time `at`."""
    run = start(job, trigger=Run.Trigger.SCHEDULE, scheduled_for=at)
    finish(run, status)
    return run


def rerun(run: Run, status: str = Run.Status.SUCCEEDED) -> Run:
    again = services.run_rerun(run=run, by=None)
    assert services.run_claim(run_id=again.pk, worker="host:1") is not None
    again.refresh_from_db()
    finish(again, status)
    return again


def load_and_export(make_job, **export) -> tuple[Job, Job]:
    load = make_job(name="warehouse-load", schedule="0 2 * * *")
    export.setdefault("schedule", "30 2 * * *")
    export = make_job(name="warehouse-export", **export)
    export.upstreams.add(load)
    return load, export


# --- The upstream gate -----------------------------------------------------------


def test_a_downstream_is_skipped_while_its_upstreams_run_waits_for_a_worker(make_job):
    """The load's 02:00 run is still queued at 02:30 (no worker free): the
    export must not publish yesterday's data as today's."""
    load, export = load_and_export(make_job)
    ran(load, LOAD_AT - DAY)
    clock.sync(now=LOAD_AT - timedelta(minutes=1))
    [waiting] = clock.fire_due(now=LOAD_AT + timedelta(seconds=1))
    assert waiting.job == load and waiting.status == Run.Status.QUEUED
    [run] = clock.fire_due(now=LOAD_AT + timedelta(minutes=30, seconds=1))
    assert run.job == export
    assert run.status == Run.Status.SKIPPED
    assert run.error_summary == f"waiting on warehouse-load: run #{waiting.pk} still queued"
    assert run.enqueued_at is None


def test_a_rerun_of_an_old_upstream_run_does_not_clear_todays_failure(make_job):
    """Today's load failed; someone reran last week's load, which succeeded
    and finished last. Today's export must still wait on today's load."""
    load, export = load_and_export(make_job)
    last_week = ran(load, LOAD_AT - 7 * DAY)
    ran(load, LOAD_AT, Run.Status.FAILED)
    rerun(last_week)
    run = services.run_create(
        job=export, trigger=Run.Trigger.SCHEDULE, scheduled_for=LOAD_AT + timedelta(minutes=30)
    )
    assert run.status == Run.Status.SKIPPED
    assert run.error_summary.startswith("waiting on warehouse-load: failed at ")


def test_a_successful_rerun_of_the_failed_upstream_run_lets_the_downstream_run(make_job):
    load, export = load_and_export(make_job)
    failed = ran(load, LOAD_AT, Run.Status.FAILED)
    rerun(failed)
    run = services.run_create(
        job=export, trigger=Run.Trigger.SCHEDULE, scheduled_for=LOAD_AT + timedelta(minutes=30)
    )
    assert (run.status, run.error_summary) == (Run.Status.QUEUED, "")


def test_a_rerun_of_last_weeks_export_is_judged_by_last_weeks_load(make_job):
    """Today's load failed; last week's export is rerun (it is idempotent,
    keyed on its logical time): last week's load succeeded, so it runs."""
    load, export = load_and_export(make_job)
    ran(load, LOAD_AT - 7 * DAY)
    old_export = ran(export, LOAD_AT - 7 * DAY + timedelta(minutes=30))
    ran(load, LOAD_AT, Run.Status.FAILED)
    again = services.run_rerun(run=old_export, by=None)
    assert (again.status, again.error_summary) == (Run.Status.QUEUED, "")
    # While a run of today's export is still gated on today's failure.
    today = services.run_create(job=export, trigger=Run.Trigger.MANUAL)
    assert today.status == Run.Status.SKIPPED


def test_a_waiting_retry_is_skipped_when_its_upstreams_run_was_rerun_and_failed(make_job):
    """The export failed and waits to retry; meanwhile the load's run for the
    same day was rerun and failed. The retry must not publish, and the
    export's failure is its last attempt: it alerts."""
    load, export = load_and_export(make_job, retries=1, retry_delay=60)
    todays_load = ran(load, LOAD_AT)
    first = ran(export, LOAD_AT + timedelta(minutes=30), Run.Status.FAILED)
    retry = Run.objects.get(retry_of=first)
    rerun(todays_load, Run.Status.FAILED)
    assert services.dispatch_waiting(now=retry.not_before + timedelta(seconds=1)) == 0
    retry.refresh_from_db()
    assert retry.status == Run.Status.SKIPPED
    assert retry.error_summary.startswith("waiting on warehouse-load: failed at ")
    assert retry.enqueued_at is None
    export.refresh_from_db()
    assert export.alert_state == Job.AlertState.FAILING
    assert AlertFlip.objects.filter(job=export, new_state="failing", run=first).exists()


def test_a_run_waiting_behind_another_is_gated_again_when_its_turn_comes(make_job):
    load, export = load_and_export(make_job, overlap=Job.Overlap.QUEUE)
    todays_load = ran(load, LOAD_AT)
    running = start(export, scheduled_for=LOAD_AT + timedelta(minutes=30))
    waiting = services.run_create(
        job=export, trigger=Run.Trigger.MANUAL, scheduled_for=LOAD_AT + timedelta(minutes=40)
    )
    assert waiting.status == Run.Status.QUEUED and waiting.enqueued_at is None
    # Today's load is rerun meanwhile, and still runs when the turn comes.
    again = services.run_rerun(run=todays_load, by=None)
    assert services.run_claim(run_id=again.pk, worker="host:1") is not None
    finish(running)
    waiting.refresh_from_db()
    assert waiting.status == Run.Status.SKIPPED
    assert waiting.error_summary == f"waiting on warehouse-load: run #{again.pk} still running"


# --- Triggered by upstream success -------------------------------------------------------


def test_a_fan_in_still_triggers_after_a_run_now_of_it_was_skipped(make_job, q_sync):
    """report waits for extract and clean. A "Run now" of report while clean
    still runs is skipped; when clean succeeds, report must still be
    triggered, not wait for both upstreams to succeed once more."""
    extract, clean = make_job(name="extract"), make_job(name="clean")
    report = make_job(name="report", trigger_on_upstream=True)
    report.upstreams.add(extract, clean)
    finish(start(extract))
    cleaning = start(clean)
    early = services.run_create(job=report, trigger=Run.Trigger.MANUAL)
    assert early.status == Run.Status.SKIPPED
    finish(cleaning)
    triggered = Run.objects.filter(job=report, trigger=Run.Trigger.UPSTREAM)
    assert triggered.count() == 1
    # And once only.
    finish(start(clean))
    assert triggered.count() == 1


# --- Retries of a job edited or paused meanwhile ---------------------------------------


def test_a_failure_after_the_retries_were_turned_off_is_not_retried_and_alerts(make_job):
    job = make_job(name="flaky", retries=2)
    run = start(job)
    assert run.job.retries == 2  # the worker read the job when it claimed the run
    Job.objects.filter(pk=job.pk).update(retries=0)  # edited while it runs
    finish(run, Run.Status.FAILED)
    assert not Run.objects.filter(retry_of=run).exists()
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.FAILING


def test_a_failure_after_the_job_was_paused_alerts_instead_of_leaving_a_dead_retry(make_job):
    job = make_job(name="flaky", retries=2)
    run = start(job)
    assert run.job.enabled  # the worker read the job when it claimed the run
    services.job_set_enabled(job=Job.objects.get(pk=job.pk), enabled=False)
    finish(run, Run.Status.FAILED)
    assert not Run.objects.filter(retry_of=run).exists()
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.FAILING


def test_pausing_a_job_whose_retry_waits_counts_the_failure(make_job):
    """The retry will not run: the failure before it was the last attempt."""
    job = make_job(name="flaky", retries=2, retry_delay=60)
    failed = start(job)
    finish(failed, Run.Status.FAILED)
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.OK  # a retry is coming
    services.job_set_enabled(job=job, enabled=False)
    retry = Run.objects.get(retry_of=failed)
    assert (retry.status, retry.error_summary) == (Run.Status.SKIPPED, "paused")
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.FAILING
    assert job.consecutive_failures == 1


# --- With real workers ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_diamond_runs_its_fan_in_once_after_both_branches(make_job, processes):
    """A -> B, A -> C, B + C -> D, all triggered by their upstreams, on a
    real cluster with two workers: D runs once, after B and C ended, for
    A's logical time."""
    a = make_job(name="a", command="echo a")
    b = make_job(name="b", command="sleep 0.5", trigger_on_upstream=True)
    c = make_job(name="c", command="sleep 1", trigger_on_upstream=True)
    d = make_job(name="d", command="echo d", trigger_on_upstream=True)
    b.upstreams.add(a)
    c.upstreams.add(a)
    d.upstreams.add(b, c)
    processes.start("qcluster", **FAST)
    first = services.run_create(job=a, trigger=Run.Trigger.MANUAL)
    [down] = wait_for(finished(d), timeout=60, message=processes.output())
    [b_run], [c_run] = Run.objects.filter(job=b), Run.objects.filter(job=c)
    assert down.status == Run.Status.SUCCEEDED and down.trigger == Run.Trigger.UPSTREAM
    assert down.started_at >= max(b_run.finished_at, c_run.finished_at)
    assert down.scheduled_for == first.scheduled_for
    assert Run.objects.filter(job=d).count() == 1

    # A fails: nothing downstream runs, and a run of D by hand is gated.
    Job.objects.filter(pk=a.pk).update(command="exit 3")
    services.run_create(job=a, trigger=Run.Trigger.MANUAL)
    wait_for(finished(a, 2), timeout=30, message=processes.output())
    assert Run.objects.filter(job=b).count() == 1 and Run.objects.filter(job=c).count() == 1
    gated = services.run_create(job=b, trigger=Run.Trigger.MANUAL)
    assert gated.status == Run.Status.SKIPPED
    assert gated.error_summary.startswith("waiting on a: failed at ")


def test_a_load_and_its_export_due_in_the_same_minute_fire_load_first(make_job):
    """The export's name sorts before the load's. Fired in name order, the
    export was judged by yesterday's load and published yesterday's data
    while today's load had not even been queued."""
    load = make_job(name="z-warehouse-load", schedule="0 2 * * *")
    export = make_job(name="a-warehouse-export", schedule="0 2 * * *")
    export.upstreams.add(load)
    ran(load, LOAD_AT - DAY)
    clock.sync(now=LOAD_AT - timedelta(minutes=1))

    first, second = clock.fire_due(now=LOAD_AT + timedelta(seconds=1))

    assert (first.job, first.status) == (load, Run.Status.QUEUED)
    assert (second.job, second.status) == (export, Run.Status.SKIPPED)
    assert second.error_summary == f"waiting on z-warehouse-load: run #{first.pk} still queued"


def test_upstreams_first_keeps_name_order_otherwise_and_survives_a_cycle(make_job):
    c = make_job(name="c")
    b = make_job(name="b")
    a = make_job(name="a")
    d = make_job(name="d")
    a.upstreams.add(b)
    b.upstreams.add(c)
    assert [j.name for j in clock.upstreams_first([a, b, c, d])] == ["c", "d", "b", "a"]
    c.upstreams.add(a)  # refused when saved; stored by hand
    assert [j.name for j in clock.upstreams_first([a, b, c, d])] == ["d", "a", "b", "c"]


def test_a_paused_upstream_holds_its_downstream_back(make_job):
    """The load is paused (its source is down): today's export must not
    publish yesterday's load as today's. Resumed, the load is judged from
    its next fire on."""
    load, export = load_and_export(make_job)
    yesterday = ran(load, LOAD_AT - DAY)
    Job.objects.filter(pk=load.pk).update(created_at=yesterday.scheduled_for - DAY)
    with time_machine.travel(LOAD_AT - timedelta(hours=1), tick=False):
        services.job_set_enabled(job=load, enabled=False)
    clock.sync(now=LOAD_AT - timedelta(minutes=1))

    assert clock.fire_due(now=LOAD_AT + timedelta(seconds=1)) == []  # the load: paused
    [run] = clock.fire_due(now=LOAD_AT + timedelta(minutes=30, seconds=1))

    assert (run.job, run.status) == (export, Run.Status.SKIPPED)
    assert run.error_summary == (
        "waiting on warehouse-load: no run for its fire at 2026-06-02 02:00 UTC (it is paused)"
    )
    # A run by hand is held back too, for the same reason.
    by_hand = services.run_create(
        job=export, trigger=Run.Trigger.MANUAL, here=True, now=LOAD_AT + timedelta(hours=1)
    )
    assert by_hand.status == Run.Status.SKIPPED
    assert by_hand.error_summary.endswith("(it is paused)")

    # Resumed: the fires it slept through no longer hold the export back.
    with time_machine.travel(LOAD_AT + timedelta(hours=2), tick=False):
        services.job_set_enabled(job=load, enabled=True)
    again = services.run_create(
        job=export,
        trigger=Run.Trigger.MANUAL,
        here=True,
        now=LOAD_AT + timedelta(hours=2, seconds=1),
    )
    assert again.status == Run.Status.QUEUED


def test_an_upstream_fire_no_clock_ran_holds_its_downstream_back(make_job):
    """Yesterday's load succeeded; today's 02:00 fire never ran (a scheduler
    down, another scheduler firing the export first): the export waits."""
    load, export = load_and_export(make_job)
    yesterday = ran(load, LOAD_AT - DAY)
    Job.objects.filter(pk=load.pk).update(created_at=yesterday.scheduled_for - DAY)

    run = services.run_create(
        job=export,
        trigger=Run.Trigger.SCHEDULE,
        scheduled_for=LOAD_AT + timedelta(minutes=30),
        here=True,
        now=LOAD_AT + timedelta(minutes=30),
    )

    assert run.status == Run.Status.SKIPPED
    assert run.error_summary == (
        "waiting on warehouse-load: no run for its fire at 2026-06-02 02:00 UTC"
    )
    ran(load, LOAD_AT)  # today's load, late but done: the export may go
    rerun = services.run_rerun(run=run, by=None)
    assert rerun.status == Run.Status.QUEUED
