#!/usr/bin/env python
"""Soak test: the real thing for minutes, with faults.

Two `qcluster` processes and two `scheduler` processes on one PostgreSQL
database run N jobs every minute (each sleeps 0-24 s) while this script
SIGKILLs workers in the middle of runs and restarts PostgreSQL once. At the
end it prints what a user would care about:

    fires expected, runs created, duplicates, missed, overlaps, stuck, orphans

Usage (PostgreSQL must be local; the script needs root to restart it):

    .venv/bin/python bench/faults.py --minutes 5 --jobs 20 --kills 8

It creates (and drops first) the database named in --database-url.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import recreate_database  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=8, help="worker SIGKILLs spread over the run")
    parser.add_argument("--no-restart", action="store_true", help="skip the PostgreSQL restart")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/jobsite_soak")
    return parser.parse_args()


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), *args], env=env, check=True, cwd=BASE_DIR
    )


def start(env: dict[str, str], name: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 (lives as long as the process)
    cmd = name.split("-")[0]
    return subprocess.Popen(
        [sys.executable, str(BASE_DIR / "manage.py"), cmd],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=BASE_DIR,
    )


def stop(procs: list[subprocess.Popen], wait: float = 30.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()  # the main process only (DESIGN.md)
    deadline = time.monotonic() + wait
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def restart_postgres() -> float:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    started = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True
    )
    return time.monotonic() - started


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries this soak's marker."""
    found = []
    needle = f"SOAK_MARKER={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                            found.append(int(entry))
        except OSError:
            continue
    return found


def main() -> None:
    args = parse_args()
    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")
    marker = uuid.uuid4().hex[:12]
    env = dict(
        os.environ,
        JOBSITE_LEASE_SECONDS="15",
        JOBSITE_HEARTBEAT_SECONDS="2",
        JOBSITE_SWEEP_SECONDS="2",
        JOBSITE_REQUEUE_SECONDS="60",
        Q_WORKERS="6",
        PYTHONUNBUFFERED="1",
    )
    log_dir = BASE_DIR / "bench" / "out" / f"faults-{datetime.now():%Y%m%d-%H%M%S}"
    log_dir.mkdir(parents=True, exist_ok=True)

    print(f"database {args.database_url}: recreating and migrating …", flush=True)
    recreate_database(args.database_url)
    manage(env, "migrate", "-v0")
    manage(env, "createcachetable")

    import django

    django.setup()
    from django.db import connections

    from jobs.models import Job, MissedFires, Run

    for i in range(args.jobs):
        Job.objects.create(
            name=f"soak-{i:03d}",
            slug=f"soak-{i:03d}",
            command=f"sleep $(( (JOBSITE_RUN_ID * 7 + {i}) % 25 )); echo ok",
            schedule="* * * * *",
            environment={"SOAK_MARKER": marker},
            retries=1,
            retry_delay=5,
            timeout=120,
        )
    connections.close_all()

    procs = {
        name: start(env, name, log_dir)
        for name in ("qcluster-a", "qcluster-b", "scheduler-a", "scheduler-b")
    }
    began = datetime.now(UTC)
    duration = args.minutes * 60
    kill_times = sorted(random.uniform(30, duration - 10) for _ in range(args.kills))
    restart_at = None if args.no_restart else duration / 2
    kills, restart_seconds = 0, None
    print(
        f"running {args.minutes} min: {args.jobs} jobs every minute, logs in {log_dir}", flush=True
    )
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < duration:
        if kill_times and elapsed >= kill_times[0] and kill_a_worker():
            kill_times.pop(0)  # else: nothing running right now, try again shortly
            kills += 1
        if restart_at is not None and elapsed >= restart_at:
            restart_at = None
            restart_seconds = restart_postgres()
            print(f"  {elapsed:5.0f}s restarted PostgreSQL ({restart_seconds:.1f}s)", flush=True)
        time.sleep(0.5)

    stop([procs["scheduler-a"], procs["scheduler-b"]])
    stopped = datetime.now(UTC)
    # Drain: no more fires (jobs disabled), but a scheduler keeps sweeping so
    # runs killed at the very end are marked lost and retried.
    Job.objects.update(enabled=False)
    finisher = start(env, "scheduler-drain", log_dir)
    print("schedulers stopped; draining …", flush=True)
    drain_deadline = time.monotonic() + 180
    while time.monotonic() < drain_deadline:
        try:
            if not Run.objects.filter(status__in=Run.ACTIVE).exists():
                break
        except Exception:
            connections.close_all()
        time.sleep(2)
    stop([finisher, procs["qcluster-a"], procs["qcluster-b"]])
    time.sleep(1)

    report(
        args=args,
        began=began,
        stopped=stopped,
        kills=kills,
        restart_seconds=restart_seconds,
        orphans=marked_processes(marker),
        Job=Job,
        Run=Run,
        MissedFires=MissedFires,
    )


def kill_a_worker() -> int:
    from django.db import connections

    from jobs.models import Run

    try:
        running = list(Run.objects.filter(status=Run.Status.RUNNING).exclude(worker=""))
    except Exception:
        connections.close_all()
        return 0
    if not running:
        return 0
    victim = random.choice(running)
    pid = int(victim.worker.rsplit(":", 1)[1])
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    print(f"  SIGKILLed worker {pid} running run #{victim.pk} ({victim.job_id})", flush=True)
    return 1


def expected_fires(job, began: datetime, stopped: datetime) -> set[datetime]:
    """Minute boundaries after the schedulers' first sync and before they stopped."""
    first = (began + timedelta(seconds=65)).replace(second=0, microsecond=0)
    fires, moment = set(), first
    while moment <= stopped - timedelta(seconds=2):
        fires.add(moment)
        moment += timedelta(minutes=1)
    return fires


def report(*, args, began, stopped, kills, restart_seconds, orphans, Job, Run, MissedFires):
    from django.db import connection

    jobs = list(Job.objects.all())
    scheduled = list(Run.objects.filter(trigger="schedule"))
    by_fire = Counter((r.job_id, r.scheduled_for) for r in scheduled)
    expected = {(job.pk, at) for job in jobs for at in expected_fires(job, began, stopped)}
    duplicates = sum(1 for count in by_fire.values() if count > 1)
    fired = set(by_fire)
    missed = expected - fired
    recorded_missed = sum(m.count for m in MissedFires.objects.all())
    executed: dict[int, list] = defaultdict(list)
    for run in Run.objects.exclude(started_at=None).order_by("started_at"):
        executed[run.job_id].append(run)
    overlaps = 0
    for runs in executed.values():
        for before, after in zip(runs, runs[1:], strict=False):
            if before.finished_at is None or after.started_at < before.finished_at:
                overlaps += 1
    stuck = Run.objects.filter(status__in=Run.ACTIVE).count()
    statuses = Counter(Run.objects.values_list("status", flat=True))
    retries = Run.objects.filter(trigger="retry").count()

    print()
    print(
        f"machine     {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"PostgreSQL {connection.pg_version // 10000}"
    )
    print(
        f"workload    {args.jobs} jobs every minute for {args.minutes} min, "
        f"2 qclusters x 6 workers, 2 schedulers, lease 15 s"
    )
    print(
        f"faults      {kills} worker SIGKILLs, PostgreSQL restart: "
        + (f"{restart_seconds:.1f} s" if restart_seconds else "none")
    )
    print()
    rows = [
        ("fires expected", len(expected)),
        ("scheduled runs created", len(scheduled)),
        ("duplicates (job, fire) with >1 run", duplicates),
        ("missed (expected fire without a run)", len(missed)),
        ("  of which recorded as missed fires", recorded_missed),
        ("overlapping executions of one job", overlaps),
        ("stuck (queued/running at the end)", stuck),
        ("orphan processes left running", len(orphans)),
        ("retries created", retries),
    ]
    for label, value in rows:
        print(f"{label:<40} {value:>6}")
    print("runs by status:", ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    if missed:
        sample = sorted(missed, key=lambda m: m[1])[:5]
        print("missed sample:", [(j, at.isoformat()) for j, at in sample])


if __name__ == "__main__":
    main()
