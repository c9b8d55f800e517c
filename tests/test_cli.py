"""manage.py runjob and seed_demo, as a user at a terminal sees them."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import override_settings
from django_q.models import OrmQ

from jobs import services
from jobs.models import Job, Run
from tests.conftest import database_url_for_children, kill_running_with, running_with


def manage(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """manage.py in a real child process, pointed at the test database."""
    env = {**os.environ, "DATABASE_URL": database_url_for_children()}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_manage(*args: str) -> subprocess.Popen[str]:
    """manage.py started in a real child process, pointed at the test
    database, its output piped for the test to read as it goes."""
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url_for_children()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def runjob(*args: str) -> tuple[int, str, str]:
    """call_command("runjob", ...) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("runjob", *args, stdout=out, stderr=err)
    return exited.value.code, out.getvalue(), err.getvalue()


# --- runjob in a real process -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_runjob_exits_with_the_jobs_exit_code_and_records_a_cli_run(make_job):
    job = make_job(
        name="warehouse-export", command='echo "exporting"; echo "table locked" >&2; exit 3'
    )

    result = manage("runjob", "warehouse-export")

    assert result.returncode == 3
    assert "exporting" in result.stdout
    assert "table locked" in result.stdout  # the job's stderr is part of its log
    run = Run.objects.get(job=job)
    assert (run.status, run.trigger, run.exit_code) == (Run.Status.FAILED, Run.Trigger.CLI, 3)
    assert "failed" in result.stderr
    assert f"{settings.SITE_URL}/runs/{run.pk}/" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_runjob_leaves_nothing_a_job_started_with_setsid_behind(make_job):
    marker = f"{5_000_000 + os.getpid()}.{int(time.time() * 1000) % 100_000}"
    make_job(name="daemonizes", command=f"setsid sleep {marker} & sleep 0.5; echo left it")
    try:
        result = manage("runjob", "daemonizes")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "left it\n"
        assert running_with(marker) == [], "a job's setsid daemon outlived runjob"
    finally:
        kill_running_with(marker)


@pytest.mark.django_db(transaction=True)
def test_runjob_that_times_out_exits_124(make_job):
    job = make_job(name="hangs", command="sleep 30", timeout=1)

    result = manage("runjob", "hangs")

    assert result.returncode == 124
    assert Run.objects.get(job=job).status == Run.Status.TIMED_OUT
    assert "timed_out" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_runjob_unknown_slug_exits_2_naming_it_and_suggesting_close_matches(make_job):
    make_job(name="warehouse-export")

    result = manage("runjob", "warehouse-exprot")

    assert result.returncode == 2
    assert 'No job with slug "warehouse-exprot"' in result.stderr
    assert "Did you mean: warehouse-export?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Run.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_ctrl_c_on_runjob_cancels_the_run_and_exits_130(make_job):
    job = make_job(name="long", command='echo "started"; sleep 30', timeout=60)
    proc = start_manage("runjob", "long")
    try:
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()

    assert proc.returncode == 130
    assert "cancelled" in err
    run = Run.objects.get(job=job)
    assert run.status == Run.Status.CANCELLED
    assert Job.objects.get(pk=job.pk).active_run is None


# --- runjob in process ---------------------------------------------------------------


def test_runjob_streams_output_to_stdout_and_exits_0_on_success(make_job):
    job = make_job(name="hello", command='echo "hello from $JOBSITE_JOB"')

    code, out, err = runjob("hello")

    assert code == 0
    assert "hello from hello" in out
    run = Run.objects.get(job=job)
    assert (run.status, run.trigger) == (Run.Status.SUCCEEDED, Run.Trigger.CLI)
    assert "succeeded" in err
    assert f"{settings.SITE_URL}/runs/{run.pk}/" in err


def test_runjob_killed_by_a_signal_exits_128_plus_the_signal(make_job):
    make_job(name="self-kill", command="kill -TERM $$")

    code, _out, err = runjob("self-kill")

    assert code == 128 + 15
    assert "SIGTERM" in err


def test_runjob_while_a_run_is_active_is_skipped_with_exit_75(make_job):
    job = make_job(name="busy")
    blocker = Run.objects.create(
        job=job,
        trigger=Run.Trigger.SCHEDULE,
        scheduled_for="2025-01-01T00:00Z",
        queued_at="2025-01-01T00:00Z",
    )

    code, out, err = runjob("busy")

    assert code == 75
    assert f"skipped: run #{blocker.pk} still queued" in err
    assert out == ""
    skipped = Run.objects.exclude(pk=blocker.pk).get()
    assert (skipped.status, skipped.trigger) == (Run.Status.SKIPPED, Run.Trigger.CLI)


def running_run(job: Job) -> Run:
    """A run of `job` that a worker elsewhere is executing."""
    run = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE, here=True)
    return services.run_claim(run_id=run.pk, worker="elsewhere:1")


def test_runjob_under_overlap_queue_waits_behind_the_running_run_with_exit_75(make_job):
    job = make_job(name="nightly", overlap=Job.Overlap.QUEUE)
    blocker = running_run(job)

    code, out, err = runjob("nightly")

    assert code == 75
    assert out == ""
    waiting = Run.objects.exclude(pk=blocker.pk).get()
    assert (waiting.status, waiting.trigger) == (Run.Status.QUEUED, Run.Trigger.CLI)
    assert err == (
        f"waiting: queued behind run #{blocker.pk}; the workers will start it when that "
        f"run ends ({settings.SITE_URL}/runs/{waiting.pk}/)\n"
    )
    assert "Traceback" not in err
    # The promise holds: when the running run ends, the waiting one is sent.
    services.run_finish(run=blocker, status=Run.Status.SUCCEEDED, exit_code=0)
    assert Run.objects.get(pk=waiting.pk).enqueued_at is not None


def test_runjob_under_overlap_queue_with_one_already_waiting_is_skipped(make_job):
    job = make_job(name="nightly", overlap=Job.Overlap.QUEUE)
    running_run(job)
    runjob("nightly")
    waiting = Run.objects.get(status=Run.Status.QUEUED)

    code, _out, err = runjob("nightly")

    assert code == 75
    assert f"skipped: run #{waiting.pk} is already waiting" in err


def test_runjob_under_overlap_replace_cancels_the_running_run_and_waits(make_job):
    job = make_job(name="nightly", overlap=Job.Overlap.REPLACE)
    blocker = running_run(job)

    code, out, err = runjob("nightly")

    assert code == 75
    assert out == ""
    blocker.refresh_from_db()
    assert blocker.cancel_requested_at is not None
    assert f"waiting: replacing run #{blocker.pk}, which is being cancelled" in err
    assert Run.objects.exclude(pk=blocker.pk).get().status == Run.Status.QUEUED


def test_runjob_enqueue_under_overlap_queue_says_it_waits(make_job):
    job = make_job(name="nightly", overlap=Job.Overlap.QUEUE)
    blocker = running_run(job)
    out, err = io.StringIO(), io.StringIO()

    call_command("runjob", "nightly", "--enqueue", stdout=out, stderr=err)

    waiting = Run.objects.exclude(pk=blocker.pk).get()
    assert out.getvalue().strip() == f"{settings.SITE_URL}/runs/{waiting.pk}/"
    assert f"waiting: queued behind run #{blocker.pk}" in err.getvalue()


def test_runjob_enqueue_prints_the_run_url_and_hands_a_queued_cli_run_to_the_broker(
    make_job, django_capture_on_commit_callbacks
):
    make_job(name="later", command="echo later")
    out = io.StringIO()

    with django_capture_on_commit_callbacks(execute=True):
        call_command("runjob", "later", "--enqueue", stdout=out)

    run = Run.objects.get()
    assert (run.status, run.trigger) == (Run.Status.QUEUED, Run.Trigger.CLI)
    assert out.getvalue().strip() == f"{settings.SITE_URL}/runs/{run.pk}/"
    assert OrmQ.objects.count() == 1  # waiting for a qcluster worker


# --- seed_demo ---------------------------------------------------------------------


def test_seed_demo_creates_the_login_and_demo_jobs_once(db, monkeypatch):
    monkeypatch.delenv("JOBSITE_DEMO_PASSWORD", raising=False)
    first, second = io.StringIO(), io.StringIO()

    call_command("seed_demo", stdout=first)
    updated_at = dict(Job.objects.values_list("slug", "updated_at"))
    call_command("seed_demo", stdout=second)

    assert "http://127.0.0.1:8000/" in first.getvalue()
    assert "username: admin" in first.getvalue()
    assert "password: jobsite-demo" in first.getvalue()
    assert User.objects.get(username="admin").check_password("jobsite-demo")
    assert set(updated_at) == {
        "heartbeat",
        "flaky-export",
        "slow-report",
        "publish-report",
        "say-hello",
        "sales-summary",
        "count-to-twenty",
    }
    assert Job.objects.get(slug="say-hello").schedule == ""
    assert [j.slug for j in Job.objects.get(slug="publish-report").upstreams.all()] == [
        "slow-report"
    ]
    assert "already exists" in second.getvalue()
    assert "jobsite-demo" not in second.getvalue()
    assert "0 created, 0 updated, 7 unchanged" in second.getvalue()
    assert dict(Job.objects.values_list("slug", "updated_at")) == updated_at
    assert User.objects.count() == 1


def test_seed_demo_takes_the_password_from_the_environment_and_never_resets_it(db, monkeypatch):
    monkeypatch.setenv("JOBSITE_DEMO_PASSWORD", "from-env-pw")
    call_command("seed_demo", stdout=io.StringIO())
    monkeypatch.setenv("JOBSITE_DEMO_PASSWORD", "another-pw")
    call_command("seed_demo", stdout=io.StringIO())

    assert User.objects.get(username="admin").check_password("from-env-pw")


def test_demo_failing_job_fails_with_its_exit_code(db):
    call_command("seed_demo", stdout=io.StringIO())

    code, out, _err = runjob("flaky-export")

    assert code == 3
    assert "error: table orders is locked" in out
    retry = Run.objects.get(trigger=Run.Trigger.RETRY)
    assert (retry.status, retry.attempt) == (Run.Status.QUEUED, 2)


def test_demo_sql_job_exports_a_csv_with_no_setup(db, tmp_path):
    call_command("seed_demo", stdout=io.StringIO())

    with override_settings(MEDIA_ROOT=str(tmp_path / "media")):
        code, out, err = runjob("sales-summary")
        run = Run.objects.get(job__slug="sales-summary")
        artifact = run.artifacts.get()
        with artifact.file.open("rb") as f:
            csv_text = f.read().decode()

    assert code == 0, out + err
    assert (run.status, run.rows) == (Run.Status.SUCCEEDED, 3)
    assert artifact.name == "sales-summary.csv"
    assert csv_text.splitlines() == [
        "region,orders,total",
        "east,1,60",
        "north,2,165",
        "south,2,95",
    ]


@pytest.mark.django_db(transaction=True)
def test_runjob_whose_job_is_deleted_while_it_runs_stops_and_says_so(make_job):
    # As deleting a job in the admin or a shell does: the run goes with it.
    job = make_job(name="doomed", command='echo "started"; sleep 30; : doomed-run', timeout=60)
    proc = start_manage("runjob", "doomed")
    try:
        assert proc.stdout.readline() == "started\n"
        Job.objects.filter(pk=job.pk).delete()
        _out, err = proc.communicate(timeout=30)  # not two minutes of retries
    finally:
        proc.kill()

    assert proc.returncode == 130
    assert "Stopped: the run was deleted" in err
    assert "Traceback" not in err
    assert not running_with("doomed-run", wait=5)
