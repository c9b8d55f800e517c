"""Fault tests with real processes: killed workers, hung jobs, several
schedulers and clusters on one database. Bounded in time."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import runlog, services
from jobs.models import Job, Run
from tests.conftest import group_alive, kill_running_with, running_with, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FAST = {
    "JOBSITE_LEASE_SECONDS": "3",
    "JOBSITE_HEARTBEAT_SECONDS": "1",
    "JOBSITE_SWEEP_SECONDS": "0.5",
    "JOBSITE_KILL_GRACE": "1",
}


def finished(job: Job, count: int = 1):
    def check():
        runs = list(Run.objects.filter(job=job, status__in=Run.FINISHED).order_by("id"))
        return runs if len(runs) >= count else None

    return check


def test_sigkilled_worker_leaves_no_orphan_and_its_run_is_lost_then_retried(make_job, processes):
    job = make_job(
        name="fragile",
        command=(
            'if [ "$JOBSITE_ATTEMPT" = 1 ]; then sleep 1000 & sleep 1000; '
            'else echo "recovered on attempt $JOBSITE_ATTEMPT"; fi'
        ),
        retries=1,
        retry_delay=1,
        timeout=600,
    )
    processes.start("qcluster", **FAST)
    processes.start("scheduler", **FAST)
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    running = wait_for(
        lambda: Run.objects.filter(pk=run.pk, status="running", pid__isnull=False).first(),
        timeout=30,
        message="run never started:\n" + processes.output(),
    )
    worker_pid = int(running.worker.rsplit(":", 1)[1])
    os.kill(worker_pid, signal.SIGKILL)

    lost = wait_for(
        lambda: Run.objects.filter(pk=run.pk, status=Run.Status.LOST).first(),
        timeout=20,
        message="run not marked lost:\n" + processes.output(),
    )
    assert "stopped heartbeating" in lost.error_summary
    assert not group_alive(running.pid), "the job's processes outlived their worker"
    retry = wait_for(
        lambda: Run.objects.filter(retry_of=run, status__in=Run.FINISHED).first(),
        timeout=30,
        message="no retry finished:\n" + processes.output(),
    )
    assert retry.status == Run.Status.SUCCEEDED
    assert runlog.read_log(retry) == "recovered on attempt 2\n"


def test_hung_job_ignoring_sigterm_is_timed_out_and_its_tree_is_gone(make_job, processes):
    job = make_job(
        name="hung",
        command="trap '' TERM; (trap '' TERM; sleep 1000) & sleep 1000",
        timeout=2,
    )
    processes.start("qcluster", **FAST)
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    [done] = wait_for(finished(job), timeout=30, message=processes.output())
    assert done.pk == run.pk
    assert done.status == Run.Status.TIMED_OUT
    assert (done.finished_at - done.started_at).total_seconds() < 2 + 1 + 2
    assert not group_alive(done.pid)


def test_queue_policy_runs_the_second_run_after_the_first(make_job, processes):
    job = make_job(name="serial", command="sleep 1; echo done", overlap=Job.Overlap.QUEUE)
    processes.start("qcluster", **FAST)
    first = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    wait_for(lambda: Run.objects.filter(pk=first.pk, status="running").exists(), timeout=30)
    second = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    a, b = wait_for(finished(job, 2), timeout=30, message=processes.output())
    assert [a.pk, b.pk] == [first.pk, second.pk]
    assert a.status == b.status == Run.Status.SUCCEEDED
    assert b.started_at >= a.finished_at, "queued run overlapped the running one"


def test_replace_policy_cancels_the_running_run_and_starts_the_new_one(make_job, processes):
    job = make_job(
        name="replaceable",
        command='[ "$JOBSITE_TRIGGER" = schedule ] && echo fresh || sleep 1000',
        overlap=Job.Overlap.REPLACE,
    )
    processes.start("qcluster", **FAST)
    old = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    running = wait_for(
        lambda: Run.objects.filter(pk=old.pk, status="running", pid__isnull=False).first(),
        timeout=30,
    )
    new = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE)
    a, b = wait_for(finished(job, 2), timeout=30, message=processes.output())
    assert (a.pk, a.status) == (old.pk, Run.Status.CANCELLED)
    assert a.error_summary == f"Replaced by run #{new.pk}"
    assert (b.pk, b.status) == (new.pk, Run.Status.SUCCEEDED)
    assert b.started_at >= a.finished_at
    assert not group_alive(running.pid)


def test_upstream_success_triggers_the_downstream_and_failure_gates_it(make_job, processes):
    load = make_job(name="load", command="echo loaded")
    export = make_job(name="export", command="echo exported", trigger_on_upstream=True)
    export.upstreams.add(load)
    processes.start("qcluster", **FAST)
    services.run_create(job=load, trigger=Run.Trigger.MANUAL)
    [down] = wait_for(finished(export), timeout=30, message=processes.output())
    assert down.trigger == Run.Trigger.UPSTREAM
    assert down.status == Run.Status.SUCCEEDED

    Job.objects.filter(pk=load.pk).update(command="exit 4")
    services.run_create(job=load, trigger=Run.Trigger.MANUAL)
    wait_for(finished(load, 2), timeout=30)
    gated = services.run_create(job=export, trigger=Run.Trigger.SCHEDULE)
    assert gated.status == Run.Status.SKIPPED
    assert gated.error_summary.startswith("waiting on load: failed at ")


def test_two_schedulers_and_two_clusters_fire_every_job_exactly_once(make_job, processes):
    jobs = [make_job(name=f"busy-{i}", command="sleep 0.2", schedule="* * * * *") for i in range(8)]
    fire_at = (timezone.now() + timedelta(seconds=3)).replace(microsecond=0)
    for job in jobs:
        Job.objects.filter(pk=job.pk).update(
            next_fire_at=fire_at, fire_basis=job.current_fire_basis
        )
    for _ in range(2):
        processes.start("qcluster", **FAST)
        processes.start("scheduler", **FAST)

    def all_done():
        return Run.objects.filter(scheduled_for=fire_at, status__in=Run.FINISHED).count() >= 8

    wait_for(all_done, timeout=60, message=processes.output())
    for job in jobs:
        runs = list(Run.objects.filter(job=job, scheduled_for=fire_at))
        assert len(runs) == 1, f"{job.name}: {len(runs)} runs for one fire"
        assert runs[0].status == Run.Status.SUCCEEDED
    assert not Run.objects.filter(status=Run.Status.SKIPPED).exists()


@pytest.mark.skipif(
    os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="SQLite-specific load test"
)
def test_sqlite_under_load_loses_no_run_and_shows_no_lock_error(make_job, processes, admin_client):
    jobs = [
        make_job(name=f"load-{i}", command="echo $JOBSITE_RUN_ID; sleep 0.1", overlap="allow")
        for i in range(6)
    ]
    processes.start("qcluster", Q_WORKERS="4", **FAST)
    processes.start("scheduler", **FAST)
    created = [
        services.run_create(job=job, trigger=Run.Trigger.MANUAL) for _ in range(10) for job in jobs
    ]
    # The web, meanwhile: every page a user would look at must answer.
    pages = 0
    while Run.objects.filter(status__in=Run.ACTIVE).exists():
        for url in ["/", f"/jobs/{jobs[pages % 6].slug}/", f"/runs/{created[pages % 60].pk}/"]:
            assert admin_client.get(url).status_code == 200
        pages += 1
        assert pages < 2000, processes.output()
    statuses = {r.status for r in Run.objects.filter(pk__in=[r.pk for r in created])}
    assert statuses == {Run.Status.SUCCEEDED}
    assert "database is locked" not in processes.output()
    for run in created:
        assert runlog.read_log(Run.objects.get(pk=run.pk)) == f"{run.pk}\n"


def test_what_jobs_start_with_setsid_dies_with_their_runs_in_a_real_worker(make_job, processes):
    """A daemon a job starts with `setsid` leaves the run's process group; the
    worker adopts it when its parent exits and kills it with the run, whether
    the job ended by itself or timed out."""
    marker = f"{4_000_000 + os.getpid()}.{int(time.time() * 1000) % 100_000}"
    done_job = make_job(
        name="daemonizes", command=f"setsid sleep {marker}1 & sleep 0.5; echo left it"
    )
    hung_job = make_job(
        name="daemonizes-and-hangs",
        command=f"trap '' TERM; setsid sh -c 'sleep {marker}2 & sleep {marker}3' & sleep 1000",
        timeout=2,
    )
    processes.start("qcluster", **FAST)
    try:
        services.run_create(job=done_job, trigger=Run.Trigger.MANUAL)
        services.run_create(job=hung_job, trigger=Run.Trigger.MANUAL)
        [done] = wait_for(finished(done_job), timeout=30, message=processes.output())
        [hung] = wait_for(finished(hung_job), timeout=30, message=processes.output())
        assert done.status == Run.Status.SUCCEEDED
        assert runlog.read_log(done) == "left it\n"
        assert hung.status == Run.Status.TIMED_OUT
        assert running_with(marker) == [], "a job's setsid daemon outlived its run"
    finally:
        kill_running_with(marker)
