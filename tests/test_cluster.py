"""End to end with real processes: `manage.py scheduler` + `manage.py qcluster`."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import runlog
from jobs.models import Job, Run
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_scheduled_job_runs_on_time_through_the_scheduler_and_a_real_cluster(make_job, processes):
    job = make_job(name="e2e", command='echo "ran attempt $JOBSITE_ATTEMPT"', schedule="* * * * *")
    work = processes.tmp_path / "work"
    work.mkdir()
    processes.start("qcluster", JOBSITE_WORK_DIR=str(work))
    # Make the next fire a few seconds away instead of waiting for a minute.
    fire_at = (timezone.now() + timedelta(seconds=4)).replace(microsecond=0)
    Job.objects.filter(pk=job.pk).update(next_fire_at=fire_at, fire_basis=job.current_fire_basis)
    processes.start("scheduler")

    run = wait_for(
        lambda: Run.objects.filter(job=job, status__in=Run.FINISHED).first(),
        timeout=60,
        message="no finished run:\n" + processes.output(),
    )
    assert run.status == Run.Status.SUCCEEDED, processes.output()
    assert run.trigger == Run.Trigger.SCHEDULE
    assert run.scheduled_for == fire_at
    assert run.started_at >= fire_at
    assert runlog.read_log(run) == "ran attempt 1\n"
    host_pid = run.worker.rsplit(":", 1)
    assert host_pid[1].isdigit() and int(host_pid[1]) != os.getpid()
    job.refresh_from_db()
    assert job.next_fire_at > fire_at, "the scheduler did not advance the job's next fire"
    assert job.active_run_id is None
    # A worker keeps its empty scratch directory for its next run (a second
    # worker may have one too, if the next minute's fire came already), and
    # removes it when the cluster stops.
    assert 1 <= len(list(work.iterdir())) <= 2
    processes.stop_all()
    assert not list(work.iterdir()), processes.output()
