"""Shared fixtures: small factories, no JSON fixtures."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection

from jobs.models import Job

BASE_DIR = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


@pytest.fixture
def make_job(db):
    def make(**fields) -> Job:
        n = next(_names)
        fields.setdefault("name", f"job-{n}")
        fields.setdefault("slug", fields["name"].lower().replace(" ", "-"))
        fields.setdefault("command", "echo hello")
        fields.setdefault("timeout", 30)
        job = Job(**fields)
        job.full_clean()
        job.save()
        return job

    return make


@pytest.fixture
def make_user(db):
    def make(username: str = "", *, superuser: bool = False, perms: tuple[str, ...] = ()) -> User:
        username = username or f"user{next(_names)}"
        if superuser:
            return User.objects.create_superuser(username, f"{username}@example.com", "pw-secret-1")
        user = User.objects.create_user(username, f"{username}@example.com", "pw-secret-1")
        user.is_staff = True
        user.save()
        for perm in perms:
            app, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app, codename=codename)
            )
        return user

    return make


@pytest.fixture
def admin_client(client, make_user):
    client.force_login(make_user("boss", superuser=True))
    return client


@pytest.fixture(autouse=True)
def _clock_holds_off_nothing():
    """The clock's hold-off of jobs whose fire raised lives in the process:
    a job id of one test must not be held off in the next."""
    from jobs import clock

    clock._holding.clear()
    yield
    clock._holding.clear()


@pytest.fixture
def q_sync():
    """Run django-q2 tasks inline (Q_CLUSTER is read once at import, so
    switch Conf, not settings)."""
    from django_q.conf import Conf

    old = Conf.SYNC
    Conf.SYNC = True
    yield
    Conf.SYNC = old


def database_url_for_children() -> str:
    """A DATABASE_URL that points child processes at the test database."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    host = s.get("HOST") or "127.0.0.1"
    port = s.get("PORT") or 5432
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    return f"postgres://{s['USER']}{password}@{host}:{port}/{s['NAME']}"


def chromium_path() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )


requires_postgres = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")),
    reason="needs PostgreSQL: set DATABASE_URL=postgres://... (CI does)",
)


class Processes:
    """Real manage.py processes (qcluster, scheduler, ...) on the test database."""

    def __init__(self, tmp_path) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.tmp_path = tmp_path

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=database_url_for_children(),
            DJANGO_SETTINGS_MODULE="jobsite.settings",
            Q_WORKERS="2",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start(self, *args: str, **extra_env: str) -> subprocess.Popen:
        name = args[0]
        log = open(self.tmp_path / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, str(BASE_DIR / "manage.py"), *args],
            env=self.env(**extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=BASE_DIR,
        )
        self.procs.append((name, proc))
        return proc

    def output(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.tmp_path.glob("*.log"))
        )

    def stop_all(self) -> None:
        # SIGTERM to django-q2's main process only (a signal to its whole
        # group can hang it), bounded wait, then SIGKILL the group.
        for _name, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        for _name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = ""):
    """Poll until predicate() is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(message or f"condition not met within {timeout}s")


def group_alive(pgid: int, wait: float = 2.0) -> bool:
    """True while a process of the group is still running (zombies waiting
    for their new parent to reap them do not count)."""
    deadline = time.monotonic() + wait
    while True:
        alive = [pid for pid in _group_members(pgid) if _state(pid) not in ("Z", "X", "")]
        if not alive or time.monotonic() > deadline:
            return bool(alive)
        time.sleep(0.05)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
    return members


def running_with(marker: str, wait: float = 2.0) -> list[str]:
    """Command lines of live processes (not zombies) that contain `marker`,
    after waiting up to `wait` seconds for them to go."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _state(int(entry)) not in ("Z", "X", ""):
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if marker in cmdline:
                    found.append(f"{entry}: {cmdline.strip()}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def kill_running_with(marker: str) -> None:
    for line in running_with(marker, wait=0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser(monkeypatch):
    """Headless Debian Chromium driven by Playwright (skips when missing)."""
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop; ORM calls in the test are plain sync code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from django.db import connections

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield instance
        # ORM calls made under Playwright's loop get their own connection:
        # close it here, inside that context, or PostgreSQL cannot drop the
        # test database.
        connections.close_all()
        instance.close()


def browser_login(page, live_server, username: str, next_url: str = "/") -> None:
    page.goto(f"{live_server.url}/accounts/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", "pw-secret-1")
    page.click("button[type=submit]")
