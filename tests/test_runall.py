"""manage.py runall (what `make run` ends with), as a newcomer at a terminal sees it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from django.conf import settings

from jobs import services
from jobs.models import Job, Run
from tests.conftest import database_url_for_children, kill_running_with, running_with, wait_for

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_runall(tmp_path, **env: str) -> tuple[subprocess.Popen, object]:
    log = open(tmp_path / "runall.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runall"],
        cwd=settings.BASE_DIR,
        env={
            **os.environ,
            "DATABASE_URL": database_url_for_children(),
            "Q_WORKERS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    """A test that failed half-way: let runall stop its children (each in
    its own session, so killing runall alone would orphan them)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def served(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_busy_port_is_named_with_the_way_out_before_anything_starts(transactional_db, tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc, log = start_runall(tmp_path, PORT=str(port))
        try:
            code = proc.wait(30)
        finally:
            stop(proc)
    log.seek(0)
    output = log.read()

    assert code != 0
    assert f"Port {port} on 127.0.0.1 is already in use" in output
    assert f"PORT={port + 1} make run" in output
    assert "Jobsite is running" not in output
    assert "Traceback" not in output


def test_port_picks_where_it_serves_and_ctrl_c_stops_everything_cleanly(transactional_db, tmp_path):
    port = free_port()
    proc, log = start_runall(tmp_path, PORT=str(port))
    try:
        wait_for(
            lambda: served(f"http://127.0.0.1:{port}/health/?scope=web"),
            timeout=60,
            message="runall never served /health/ on PORT",
        )
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        code = proc.wait(60)
    finally:
        stop(proc)
    log.seek(0)
    output = log.read()

    assert code == 0, output
    assert f"Jobsite is running on http://127.0.0.1:{port}/" in output
    assert output.rstrip().endswith("Stopped."), output
    assert "Traceback" not in output
    assert not served(f"http://127.0.0.1:{port}/health/")


def test_the_printed_login_url_follows_port(transactional_db):
    result = subprocess.run(
        [sys.executable, "manage.py", "seed_demo"],
        cwd=settings.BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url_for_children(), "PORT": "8765"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "Log in at http://127.0.0.1:8765/" in result.stdout


def test_ctrl_c_says_it_waits_for_a_running_job_and_a_second_one_stops_it(
    transactional_db, tmp_path
):
    marker = f"runall-ctrl-c-{os.getpid()}"
    job = Job(name="long-job", slug="long-job", command=f"sleep 300 # {marker}", timeout=600)
    job.full_clean()
    job.save()
    port = free_port()
    proc, log = start_runall(tmp_path, PORT=str(port))

    def output() -> str:
        log.seek(0)
        return log.read()

    try:
        wait_for(lambda: served(f"http://127.0.0.1:{port}/health/"), timeout=60)
        run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
        wait_for(lambda: running_with(marker, wait=0), timeout=60, message="the job never ran")

        os.killpg(proc.pid, signal.SIGINT)
        wait_for(lambda: "press Ctrl-C again" in output(), timeout=30, message=output())
        assert proc.poll() is None  # still waiting for the job
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    finally:
        stop(proc)
        kill_running_with(marker)
    text = output()

    assert code == 0, text
    assert "Waiting up to 20s for running jobs to finish" in text
    assert "Killing workers now (a second Ctrl-C)" in text
    assert text.rstrip().endswith("Stopped."), text
    assert "Traceback" not in text
    assert not running_with(marker)  # the job's process died with its worker
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING  # until the lease runs out: then lost
