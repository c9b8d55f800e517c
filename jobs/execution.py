"""Running a child process: own session, streamed output, timeouts, no orphans.

Pure process handling; nothing here touches the database. services.py
connects it to runs.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

# Variables the child inherits from the server's environment; everything
# else it gets comes from the job's definition and the JOBSITE_* variables,
# so a run behaves the same whoever started it.
PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class UnresolvedReference(ValueError):
    """A ${NAME} in a job's environment names nothing in the server's environment."""


@dataclass(frozen=True)
class Outcome:
    returncode: int | None
    timed_out: bool = False
    cancelled: bool = False

    @property
    def signal_name(self) -> str:
        if self.returncode is not None and self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return f"signal {-self.returncode}"
        return ""


def resolve_references(values: Mapping[str, str], server_env: Mapping[str, str]) -> dict[str, str]:
    """Replace ${NAME} with the server's value; raise when NAME is not set."""
    resolved: dict[str, str] = {}
    for key, value in values.items():

        def lookup(match: re.Match[str], key: str = key) -> str:
            name = match.group(1)
            if name not in server_env:
                raise UnresolvedReference(
                    f"{key} refers to ${{{name}}}, which is not set in the server's environment."
                )
            return server_env[name]

        resolved[key] = _REFERENCE.sub(lookup, str(value))
    return resolved


def secret_forms(values: list[str]) -> list[str]:
    """Each secret as a job may print it: as is, without its surrounding
    blanks (a shell's "$(cat key)" or "$TOKEN" loses the trailing newline),
    percent-encoded (in a URL: postgres://user:p%40ss@db/), JSON-escaped,
    and base64-encoded (`printf %s "$TOKEN" | base64`). Only the value alone:
    a secret inside a longer encoded text cannot be recognised."""
    forms: list[str] = []
    for value in values:
        for text in {value, value.strip()}:
            if not text:
                continue
            raw = text.encode()
            forms += [
                text,
                quote(text, safe=""),
                quote_plus(text, safe=""),
                json.dumps(text)[1:-1],
                base64.b64encode(raw).decode(),
                base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="),
            ]
    return list(dict.fromkeys(forms))


def build_environment(
    *,
    job_environment: Mapping[str, str],
    jobsite_variables: Mapping[str, str],
    server_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The child's whole environment. The one function every trigger uses."""
    server_env = os.environ if server_env is None else server_env
    env = {name: server_env[name] for name in PASSED_THROUGH if name in server_env}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(resolve_references(job_environment, server_env))
    env.update(jobsite_variables)
    return env


# The child gets SIGKILL if the worker that started it dies. A launcher sets
# that and execs the command, which spares a preexec_fn: that forces a full
# fork() of the (large) worker process instead of vfork(), 80 % of starting a
# run. jobsite-pdeathsig (jobs/native/pdeathsig.c, built by `make install`)
# costs half of what setpriv (util-linux) does; setpriv is the fallback.
def _launcher(name: str) -> str | None:
    """`name` beside this Python (the virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if os.access(beside, os.X_OK) else shutil.which(name)


PDEATHSIG = _launcher("jobsite-pdeathsig")
SETPRIV = shutil.which("setpriv")


def with_parent_death_signal(argv: list[str]) -> list[str]:
    if PDEATHSIG:
        return [PDEATHSIG, str(os.getpid()), *argv]
    if SETPRIV:
        return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    return argv


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL if the worker that started us dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


# Set by adopt_orphans() in a process whose children are all job processes.
_adopting = False


def adopt_orphans() -> bool:
    """Make this process the one a job's orphans are reparented to.

    A process a job started with `setsid` leaves the run's group, so the
    group kill misses it, and it outlives its parent's death signal. As a
    child subreaper (Linux 3.4+) this process inherits it when its parent
    exits, and run_process kills and reaps whatever it inherited once the
    run is over. Only for a process that starts nothing but jobs, one at a
    time (a django-q2 worker, `manage.py runjob`): every child left after a
    run is that run's. False where the kernel does not allow it."""
    global _adopting
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _adopting = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        _adopting = False
    return _adopting


def adopting() -> bool:
    return _adopting


def _children() -> list[int]:
    """This process's children, zombies included (/proc/self/task/*/children)."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids.extend(int(pid) for pid in f.read().split())
        except OSError:
            continue
    return pids


def _kill_adopted(wait: float = 2.0) -> int:
    """Kill and reap every child this process has left: after a run, in an
    adopting process, they are what the run left behind. Killing a child
    orphans its own children, which are then ours too, so this goes round
    until none is left (or `wait` runs out). Returns how many were reaped."""
    own_group = os.getpgrp()
    reaped = 0
    deadline = time.monotonic() + wait
    while (pids := _children()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                pgid = os.getpgid(pid)
                if pgid != own_group:
                    os.killpg(pgid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
            except ChildProcessError:
                pass
        time.sleep(0.001)  # a killed process takes a moment to become a zombie
    return reaped


def kill_run_group(pgid: int, *, run_id: int) -> bool:
    """SIGKILL what is left of a lost run's process group, unless its number
    now belongs to another process: a lease runs out a minute after the
    worker died, time enough for pids to wrap round (pid_max is often 32768)
    and for another run's child to lead a group of that number.

    While a process of the group lives, its number cannot be given to a new
    process; so if a process of that number exists, it is the run's only if
    it is the run's own leader (its JOBSITE_RUN_ID says so)."""
    try:
        with open(f"/proc/{pgid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except FileNotFoundError:  # the leader is gone: the group, if any, is the run's
        return kill_group(pgid, signal.SIGKILL)
    except OSError:
        return False  # not ours to read, so not ours to kill
    if f"JOBSITE_RUN_ID={run_id}".encode() not in environ:
        return False
    return kill_group(pgid, signal.SIGKILL)


def kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when nothing is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def run_process(
    argv: list[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    kill_grace: float,
    on_start: Callable[[int], None],
    on_output: Callable[[bytes], None],
    on_tick: Callable[[], bool],
    on_progress: Callable[[dict], None] | None = None,
    cwd: str | None = None,
    tick_seconds: float = 0.2,
) -> Outcome:
    """Run argv in a new session and stream its output until it and its group are gone.

    1. The child starts in its own session (process group = its pid) and gets
       SIGKILL if this process dies.
    2. Output (stdout and stderr merged) goes to `on_output` as it arrives.
    3. `on_tick` is called about every `tick_seconds`; returning True cancels.
    4. At the deadline or on cancel: SIGTERM to the group, SIGKILL to it after
       `kill_grace` seconds.
    5. When the child exits, whatever it left in its group is killed too:
       nothing a job spawns outlives its run. In a process that adopts
       orphans (adopt_orphans), so is what left the group with `setsid`.
    """
    env = dict(env)
    progress = _ProgressPipe(on_progress) if on_progress else None
    if progress:
        env["JOBSITE_PROGRESS_FD"] = str(progress.write_fd)
    try:
        proc = subprocess.Popen(
            with_parent_death_signal(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=None if PDEATHSIG or SETPRIV else _die_with_parent,
            pass_fds=(progress.write_fd,) if progress else (),
        )
    finally:
        if progress:
            progress.close_write_end()
    pgid = proc.pid
    on_start(pgid)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    if progress:
        selector.register(progress.read_fd, selectors.EVENT_READ)
    # Readable when the child exits: a job may close or redirect its output
    # (`exec >file 2>&1`) and go on running; its end is then waited for here.
    exited = _exit_notice(proc.pid)
    if exited is not None:
        selector.register(exited, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    stop_reason = ""  # "timeout" or "cancel"
    terminated_at: float | None = None
    drain_until: float | None = None
    eof = False
    try:
        while True:
            for key, _events in selector.select(tick_seconds):
                if progress and key.fd == progress.read_fd:
                    if progress.read():
                        selector.unregister(progress.read_fd)
                elif key.fd == fd:
                    eof = _read_available(fd, on_output)
                    if eof:
                        selector.unregister(fd)
            now = time.monotonic()
            if not stop_reason:
                if on_tick():
                    stop_reason = "cancel"
                elif now >= deadline:
                    stop_reason = "timeout"
            if stop_reason and terminated_at is None:
                kill_group(pgid, signal.SIGTERM)
                terminated_at = now
            if terminated_at is not None and now - terminated_at >= kill_grace:
                kill_group(pgid, signal.SIGKILL)
            if proc.poll() is not None and drain_until is None:
                # The child is gone; its leftovers (a backgrounded grandchild
                # holding our pipe) would keep it open forever.
                kill_group(pgid, signal.SIGKILL)
                if _adopting:
                    _kill_adopted()
                drain_until = now + 2.0
                if exited is not None:
                    selector.unregister(exited)  # readable from now on
            if drain_until is not None and (eof or now >= drain_until):
                break
    finally:
        selector.close()
        if exited is not None:
            os.close(exited)
        proc.stdout.close()
        if progress:
            progress.read()
            progress.close()
        if proc.poll() is None:
            kill_group(pgid, signal.SIGKILL)
        proc.wait()
        kill_group(pgid, signal.SIGKILL)
        if _adopting:
            _kill_adopted()
    return Outcome(
        returncode=proc.returncode,
        timed_out=stop_reason == "timeout",
        cancelled=stop_reason == "cancel",
    )


def _exit_notice(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` exits (Linux 5.3+), or
    None: the loop then notices the exit at its next tick."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


# Reads of 64 KiB per turn of run_process's loop, for the output and the
# progress pipe alike: a flood on either must not keep the loop from its
# deadline and cancel checks.
_READS_PER_TURN = 16


class _ProgressPipe:
    """A pipe the child writes JSON lines to ($JOBSITE_PROGRESS_FD)."""

    def __init__(self, on_progress: Callable[[dict], None]) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.on_progress = on_progress
        self.partial = b""
        self.closed = False

    def close_write_end(self) -> None:
        os.close(self.write_fd)

    def read(self) -> bool:
        """Handle complete lines; True at end of file."""
        if self.closed:
            return True
        for _ in range(_READS_PER_TURN):
            try:
                data = os.read(self.read_fd, 65536)
            except BlockingIOError:
                return False
            if not data:
                return True
            *lines, self.partial = (self.partial + data).split(b"\n")
            for line in lines:
                try:
                    payload = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # not JSON (or nested too deep): ignore, the job goes on
                if isinstance(payload, dict):
                    self.on_progress(payload)
            self.partial = self.partial[-65536:]
        return False

    def close(self) -> None:
        if not self.closed:
            os.close(self.read_fd)
            self.closed = True


def _read_available(fd: int, on_output: Callable[[bytes], None]) -> bool:
    """Read what the pipe holds now (bounded, so a flood cannot starve the
    deadline checks); True at end of file."""
    for _ in range(_READS_PER_TURN):
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not data:
            return True
        on_output(data)
    return False
