"""The child process: real subprocesses, real signals, no database."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import execution
from tests.conftest import group_alive, kill_running_with, running_with, wait_for


def run(command: str, *, timeout: float = 10, grace: float = 1, cancel_after: float | None = None):
    output: list[bytes] = []
    pgids: list[int] = []
    started = time.monotonic()

    def on_tick() -> bool:
        return cancel_after is not None and time.monotonic() - started > cancel_after

    outcome = execution.run_process(
        ["/bin/sh", "-c", command],
        env={"PATH": os.environ["PATH"], "MARK": "jobsite-test-mark"},
        timeout=timeout,
        kill_grace=grace,
        on_start=pgids.append,
        on_output=output.append,
        on_tick=on_tick,
        tick_seconds=0.05,
    )
    return outcome, b"".join(output).decode(), pgids[0], time.monotonic() - started


def test_stdout_and_stderr_are_captured_in_order_with_exit_code():
    outcome, out, _pgid, _ = run("echo one; echo two >&2; echo three; exit 7")
    assert out == "one\ntwo\nthree\n"
    assert outcome.returncode == 7
    assert not outcome.timed_out


def test_timeout_kills_the_whole_process_group_including_grandchildren():
    outcome, _out, pgid, elapsed = run("sleep 1000 & sleep 1000; echo never", timeout=1, grace=1)
    assert outcome.timed_out
    assert elapsed < 4
    assert not group_alive(pgid), "a grandchild outlived its run"


def test_a_job_ignoring_sigterm_is_killed_after_the_grace_period():
    outcome, out, pgid, elapsed = run(
        "trap 'echo got TERM' TERM; (trap '' TERM; sleep 1000) & while true; do sleep 0.1; done",
        timeout=1,
        grace=1,
    )
    assert outcome.timed_out
    assert "got TERM" in out
    assert 2 <= elapsed < 5
    assert not group_alive(pgid)


def test_background_children_left_behind_by_a_finished_job_are_killed():
    outcome, out, pgid, elapsed = run("sleep 1000 & echo started; exit 0", timeout=30)
    assert outcome.returncode == 0
    assert out == "started\n"
    assert elapsed < 5, "waited for a grandchild holding the pipe"
    assert not group_alive(pgid)


def test_cancel_from_on_tick_stops_the_group():
    outcome, _out, pgid, elapsed = run("sleep 1000", timeout=30, cancel_after=0.3)
    assert outcome.cancelled and not outcome.timed_out
    assert elapsed < 3
    assert not group_alive(pgid)


def test_child_runs_in_its_own_session():
    _outcome, out, pgid, _ = run("ps -o sid= -p $$")
    assert int(out.strip()) == pgid != os.getsid(0)


def test_killed_by_signal_is_reported_by_name():
    outcome, _out, _pgid, _ = run("kill -9 $$")
    assert outcome.returncode == -9
    assert outcome.signal_name == "SIGKILL"


def test_environment_passes_only_the_basics_plus_the_jobs_own_values():
    env = execution.build_environment(
        job_environment={"TARGET": "reports", "TOKEN": "${API_TOKEN}", "URL": "ftp://${HOST}/in"},
        jobsite_variables={"JOBSITE_RUN_ID": "5"},
        server_env={"PATH": "/bin", "API_TOKEN": "t0k", "HOST": "h", "SECRET_KEY": "django"},
    )
    assert env == {
        "PATH": "/bin",
        "TARGET": "reports",
        "TOKEN": "t0k",
        "URL": "ftp://h/in",
        "JOBSITE_RUN_ID": "5",
    }


def test_unresolved_reference_is_an_error_naming_key_and_variable():
    with pytest.raises(execution.UnresolvedReference, match=r"TOKEN refers to \$\{API_TOKEN\}"):
        execution.build_environment(
            job_environment={"TOKEN": "${API_TOKEN}"},
            jobsite_variables={},
            server_env={"PATH": "/bin"},
        )


# --- the parent-death launcher ---------------------------------------------------

WORKER = """
import sys
from jobs import execution
launcher = sys.argv[1]
execution.PDEATHSIG = launcher if launcher.endswith("jobsite-pdeathsig") else None
execution.SETPRIV = launcher if launcher.endswith("setpriv") else None
execution.run_process(
    ["/bin/sh", "-c", "exec sleep 1000"],
    env={"PATH": "/usr/bin:/bin"},
    timeout=600,
    kill_grace=1,
    on_start=lambda pid: print(pid, flush=True),
    on_output=lambda data: None,
    on_tick=lambda: False,
)
"""


def _launchers():
    built = execution._launcher("jobsite-pdeathsig")
    return [
        pytest.param(
            built, marks=pytest.mark.skipif(not built, reason="jobsite-pdeathsig not built (no cc)")
        ),
        pytest.param(
            execution.SETPRIV,
            marks=pytest.mark.skipif(not execution.SETPRIV, reason="no setpriv"),
        ),
    ]


@pytest.mark.parametrize("launcher", _launchers(), ids=["jobsite-pdeathsig", "setpriv"])
def test_the_jobs_process_is_killed_when_its_worker_is_killed(launcher):
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, launcher],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(worker.stdout.readline())
        assert group_alive(pid, wait=0), "the job never started"
        # Kill the worker once the launcher has set the signal and exec'd the
        # job. setpriv, unlike jobsite-pdeathsig, does not notice a worker
        # that died before that; the sweeper kills such a group (lost run).
        wait_for(lambda: _command_name(pid) == "sleep", timeout=5, interval=0.01)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        assert not group_alive(pid, wait=3), "the job outlived its killed worker"
    finally:
        worker.kill()
        worker.wait()


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_make_install_builds_the_fast_launcher_where_there_is_a_c_compiler():
    if not shutil.which("cc"):
        pytest.skip("no C compiler: jobs start through setpriv")
    assert execution.PDEATHSIG, "make install did not build .venv/bin/jobsite-pdeathsig"
    argv = execution.with_parent_death_signal(["/bin/true"])
    assert argv == [execution.PDEATHSIG, str(os.getpid()), "/bin/true"]


@pytest.mark.skipif(not execution.PDEATHSIG, reason="jobsite-pdeathsig not built (no cc)")
def test_the_launcher_reports_a_missing_command_and_refuses_an_orphaned_start(tmp_path):
    missing = subprocess.run(
        [execution.PDEATHSIG, str(os.getpid()), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 127
    assert "nope: No such file or directory" in missing.stderr

    marker = tmp_path / "started"
    not_my_parent = subprocess.run(
        [execution.PDEATHSIG, "1", "/bin/sh", "-c", f"touch {marker}"], capture_output=True
    )
    assert not_my_parent.returncode == 128 + signal.SIGKILL
    assert not marker.exists(), "a command whose worker was gone still started"


_ESCAPING_JOB = """
import sys
from jobs import execution
if sys.argv[2] == "adopt":
    assert execution.adopt_orphans(), "the kernel refused PR_SET_CHILD_SUBREAPER"
output = []
outcome = execution.run_process(
    ["/bin/sh", "-c", sys.argv[1]],
    env={"PATH": "/usr/bin:/bin"},
    timeout=30,
    kill_grace=1,
    on_start=lambda pgid: None,
    on_output=output.append,
    on_tick=lambda: False,
)
print(outcome.returncode, b"".join(output).decode().strip())
"""


@pytest.mark.parametrize("adopt", [False, True], ids=["plain", "adopting"])
def test_what_a_job_starts_with_setsid_dies_with_its_run_in_an_adopting_process(adopt):
    """A setsid child leaves the run's group, so the group kill misses it. A
    process that adopts orphans (a django-q2 worker, runjob) kills it, and
    what it started in turn, once the run is over."""
    marker = f"{3_000_000 + os.getpid()}.{int(time.time() * 1000) % 100_000}"
    command = (
        f"setsid sleep {marker}1 & "
        f"setsid sh -c 'sleep {marker}2 & setsid sleep {marker}3 & sleep {marker}4' & "
        f"(sleep {marker}5 &); sleep 0.5; echo started"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", _ESCAPING_JOB, command, "adopt" if adopt else "plain"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "0 started"
        left = running_with(marker, wait=2.0 if adopt else 0.5)
        if adopt:
            assert left == [], "a process a job started outlived its run"
        else:
            # Without adoption they escape: the gap this closes.
            assert len(left) == 5, left
    finally:
        kill_running_with(marker)
