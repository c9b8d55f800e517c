#!/usr/bin/env python
"""Seed a database with a realistic run history, fast.

J jobs (default 1,000) on a mix of schedules (a few every minute, most
hourly, six-hourly or daily) and their last R runs (default 2,000,000,
about 92 days of history for 1,000 jobs), in id order = time order as a
real installation writes them:

- status mix ~93% succeeded, 5% failed, 1% timed out, 0.5% lost,
  0.5% skipped; the latest run of a few jobs running or queued;
- scheduled_for on the minute, lateness 0-2 s, durations 0.1 s-10 min
  (each job has its typical duration);
- a short log (one chunk, a few lines) for 1 run in 50;
- alert flips (and notifications for jobs with recipients) where a job
  went from ok to failing and back; a few upstream dependencies;
- JobDailyStats computed from the runs in SQL (GROUP BY), and each job's
  last_scheduled_for, last_success_at, latest outcome, alert state and
  active run;
- as many rows in django-q2's Success table (django_q_task, success=True)
  as runs, for the baseline.

PostgreSQL: COPY, with the secondary indexes of the two big tables dropped
during the load and rebuilt after, then VACUUM ANALYZE (what autovacuum
would have done on a real installation). SQLite: executemany in large
transactions, no ANALYZE (Django never runs it).

Usage:

    .venv/bin/python bench/seed_history.py --jobs 1000 --runs 2000000
    .venv/bin/python bench/seed_history.py --database-url sqlite:////tmp/h.sqlite3 --runs 20000

It drops and recreates the database named in --database-url (default a
PostgreSQL database jobsite_pages), migrates it, and prints rows/s.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import io
import json
import math
import os
import pickle
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import recreate_database  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/jobsite_pages"
BENCH_USER = "bench"
BATCH = 50_000
LOG_SAMPLE = 50  # one run in LOG_SAMPLE gets a stored log

# (share of the jobs, interval in minutes): ~21,600 runs a day for 1,000 jobs.
TIERS = [(0.005, 1), (0.015, 5), (0.04, 15), (0.20, 60), (0.24, 360), (0.50, 1440)]
# Cumulative probabilities of a finished run's status.
STATUS_MIX = [
    (0.93, "succeeded"),
    (0.98, "failed"),
    (0.99, "timed_out"),
    (0.995, "lost"),
    (1.0, "skipped"),
]
FAILURES = {"failed", "timed_out", "lost"}
TEAMS = ["billing", "warehouse", "reports", "ops", "search", "ml", "crm", "finance"]
VERBS = ["export", "sync", "cleanup", "rollup", "backup", "import", "refresh", "report"]
LOG_LINES = [
    "connecting to upstream",
    "fetched {n} rows",
    "writing batch {n}",
    "uploaded {n} bytes",
    "done in {s:.1f} s",
]


@dataclass
class JobPlan:
    """One seeded job: its schedule and how its runs behave."""

    index: int
    name: str
    schedule: str
    interval: int  # minutes between fires
    offset: int  # fire minutes are offset modulo interval (minutes since the epoch)
    typical: float  # seconds a run usually takes
    timeout: int
    alert_emails: list[str]
    pk: int = 0
    first_fire: int = 0  # minutes since the epoch
    last_fire: int = 0
    # Filled while the runs are generated.
    last_run_id: int | None = None
    last_success_at: datetime | None = None
    failing_since: datetime | None = None
    consecutive_failures: int = 0
    active_run_id: int | None = None
    last_end: tuple[int, str] | None = None  # the latest ended run: (id, status)
    runs: int = 0
    env_json: str = ""
    command: str = ""
    extra: dict = field(default_factory=dict)


def plan_jobs(count: int, rng: random.Random) -> list[JobPlan]:
    plans = []
    for i in range(count):
        share, cumulative, interval = i / count, 0.0, TIERS[-1][1]
        for tier_share, tier_interval in TIERS:
            cumulative += tier_share
            if share < cumulative:
                interval = tier_interval
                break
        minute, hour = rng.randrange(60), rng.randrange(24)
        schedule, offset = {
            1: ("* * * * *", 0),
            5: ("*/5 * * * *", 0),
            15: ("*/15 * * * *", 0),
            60: (f"{minute} * * * *", minute),
            360: (f"{minute} */6 * * *", minute),
            1440: (f"{minute} {hour} * * *", hour * 60 + minute),
        }[interval]
        longest = min(300.0, interval * 60 * 0.5)
        typical = math.exp(rng.uniform(math.log(0.1), math.log(longest)))
        name = f"{TEAMS[i % len(TEAMS)]}-{VERBS[(i // len(TEAMS)) % len(VERBS)]}-{i:04d}"
        plans.append(
            JobPlan(
                index=i,
                name=name,
                schedule=schedule,
                interval=interval,
                offset=offset,
                typical=typical,
                timeout=int(min(600, max(10, typical * 5))),
                alert_emails=[f"{TEAMS[i % len(TEAMS)]}@example.com"] if i % 3 == 0 else [],
            )
        )
    return plans


def _last_fire(plan: JobPlan, end: int) -> int:
    return end - ((end - plan.offset) % plan.interval)


def _fires_in(plan: JobPlan, span: int, end: int) -> int:
    """Fires of the job in the `span` minutes up to and including `end`."""
    last = _last_fire(plan, end)
    start = end - span + 1
    return 0 if last < start else (last - start) // plan.interval + 1


def place_fires(plans: list[JobPlan], runs: int, end: int) -> int:
    """Choose the shortest history span with at least `runs` fires; set each
    job's first and last fire. Returns how many oldest fires to drop."""
    low, high = 1, max(runs, 1)  # job 0 fires every minute: span `runs` is enough
    while low < high:
        mid = (low + high) // 2
        if sum(_fires_in(p, mid, end) for p in plans) >= runs:
            high = mid
        else:
            low = mid + 1
    total = 0
    for plan in plans:
        n = _fires_in(plan, low, end)
        plan.last_fire = _last_fire(plan, end)
        plan.first_fire = plan.last_fire - (n - 1) * plan.interval
        total += n
    return total - runs


def fires_in_order(plans: list[JobPlan], skip: int) -> Iterator[tuple[int, int]]:
    """(minute, job index) of every fire, oldest first, without the first `skip`."""

    def fires(plan: JobPlan) -> Iterator[tuple[int, int]]:
        for minute in range(plan.first_fire, plan.last_fire + 1, plan.interval):
            yield minute, plan.index

    merged = heapq.merge(*(fires(p) for p in plans if p.first_fire <= p.last_fire))
    for _ in range(skip):
        next(merged)
    yield from merged


# --- Loading rows ------------------------------------------------------------------


def _pg_text(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _converter(internal_type: str, vendor: str) -> Callable:
    if vendor == "postgresql":
        if internal_type == "DateTimeField":
            return datetime.isoformat
        if internal_type == "JSONField":
            return lambda v: _pg_text(json.dumps(v))
        if internal_type == "BooleanField":
            return lambda v: "t" if v else "f"
        if internal_type in ("CharField", "TextField", "SlugField", "URLField", "EmailField"):
            return _pg_text
        return str
    if internal_type == "DateTimeField":
        return lambda v: v.astimezone(UTC).replace(tzinfo=None).isoformat(" ")
    if internal_type == "JSONField":
        return json.dumps
    if internal_type == "BooleanField":
        return int
    return lambda v: v


class Loader:
    """Buffers rows for one table and writes them in big batches: COPY on
    PostgreSQL, executemany in one transaction per batch on SQLite. Fields
    not listed get their model default."""

    def __init__(self, model, names: list[str], connection) -> None:
        from django.db import models

        opts = model._meta
        listed = [opts.get_field(n) for n in names]
        constant = [
            f
            for f in opts.concrete_fields
            if f.name not in names and not isinstance(f, models.AutoField)
        ]
        constant = [f for f in constant if f.has_default() or not f.null]
        self.connection = connection
        self.vendor = connection.vendor
        self.table = opts.db_table
        self.columns = [f.column for f in listed + constant]
        self.convert = [_converter(f.get_internal_type(), self.vendor) for f in listed]
        const_convert = [_converter(f.get_internal_type(), self.vendor) for f in constant]
        const_values = [f.get_default() for f in constant]
        if self.vendor == "postgresql":
            self.suffix = "".join(
                "\t" + (r"\N" if v is None else c(v))
                for c, v in zip(const_convert, const_values, strict=True)
            )
        else:
            self.suffix = tuple(
                None if v is None else c(v)
                for c, v in zip(const_convert, const_values, strict=True)
            )
        self.rows: list[tuple] = []
        self.written = 0
        self.seconds = 0.0

    def add(self, *values) -> None:
        self.rows.append(values)
        if len(self.rows) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        started = time.perf_counter()
        convert = self.convert
        with self.connection.cursor() as cursor:
            if self.vendor == "postgresql":
                lines = [
                    "\t".join(
                        [r"\N" if v is None else c(v) for c, v in zip(convert, row, strict=True)]
                    )
                    + self.suffix
                    for row in self.rows
                ]
                data = io.StringIO("\n".join(lines) + "\n")
                cursor.copy_expert(
                    f'COPY "{self.table}" ({", ".join(self.columns)}) FROM STDIN', data
                )
            else:
                placeholders = ", ".join(["%s"] * len(self.columns))
                cursor.executemany(
                    f'INSERT INTO "{self.table}" ({", ".join(self.columns)}) '
                    f"VALUES ({placeholders})",
                    [
                        tuple(
                            None if v is None else c(v) for c, v in zip(convert, row, strict=True)
                        )
                        + self.suffix
                        for row in self.rows
                    ],
                )
        self.written += len(self.rows)
        self.rows = []
        self.seconds += time.perf_counter() - started


# --- The history ---------------------------------------------------------------------


def _dbsafe_pickle(value) -> str:
    """What django-q2's PickledObjectField stores: base64 of the pickle."""
    return base64.b64encode(pickle.dumps(value, protocol=-1)).decode()


@dataclass
class Seeded:
    jobs: int
    runs: int
    rows: dict[str, int]
    seconds: float
    first_run_id: int
    days: float


def seed(*, jobs: int, runs: int, seed: int = 1, out=sys.stdout) -> Seeded:
    """Insert the jobs and their history into the default database."""
    from django.contrib.auth.models import User
    from django.db import connection, transaction

    from jobs.models import AlertFlip, Notification, Run, RunLogChunk

    rng = random.Random(seed)
    t0 = time.perf_counter()
    now = datetime.now(UTC)
    end = int(now.timestamp() // 60) - 1
    user, _ = User.objects.get_or_create(
        username=BENCH_USER,
        defaults={"is_staff": True, "is_superuser": True, "email": "bench@example.com"},
    )
    plans = plan_jobs(jobs, rng)
    skip = place_fires(plans, runs, end)
    _create_jobs(plans, rng)

    first_run_id = (Run.objects.order_by("-id").values_list("id", flat=True).first() or 0) + 1
    first_flip_id = AlertFlip.objects.order_by("-id").values_list("id", flat=True).first() or 0
    run_rows = Loader(
        Run,
        [
            "id",
            "job",
            "status",
            "trigger",
            "triggered_by",
            "scheduled_for",
            "queued_at",
            "enqueued_at",
            "started_at",
            "finished_at",
            "heartbeat_at",
            "enqueue_count",
            "exit_code",
            "worker",
            "pid",
            "error_summary",
            "command",
            "environment",
            "log_bytes",
        ],
        connection,
    )
    from django_q.models import Task

    task_rows = Loader(
        Task,
        [
            "id",
            "name",
            "func",
            "args",
            "kwargs",
            "result",
            "cluster",
            "started",
            "stopped",
            "success",
            "attempt_count",
        ],
        connection,
    )
    chunk_rows = Loader(RunLogChunk, ["run", "seq", "is_head", "data", "size"], connection)
    flip_rows = Loader(
        AlertFlip,
        ["id", "job", "old_state", "new_state", "at", "run", "reason", "notified_at"],
        connection,
    )
    note_rows = Loader(
        Notification,
        ["job", "flip", "kind", "channel", "target", "subject", "sent_at", "ok"],
        connection,
    )
    tables = [run_rows, task_rows, chunk_rows, flip_rows, note_rows]
    active = _active_last_runs(plans)
    kwargs_pickle, result_pickle = _dbsafe_pickle({}), _dbsafe_pickle(None)
    flip_id = first_flip_id
    run_id = first_run_id - 1
    report_every = max(runs // 10, 1)
    first_minute = None
    with transaction.atomic():
        for minute, index in fires_in_order(plans, skip):
            run_id += 1
            plan = plans[index]
            plan.runs += 1
            first_minute = minute if first_minute is None else first_minute
            run = _one_run(
                plan,
                run_id,
                minute,
                rng,
                now,
                active.get(index) if minute == plan.last_fire else None,
            )
            status, started, finished = run["status"], run["started_at"], run["finished_at"]
            manual = rng.random() < 0.005
            run_rows.add(
                run_id,
                plan.pk,
                status,
                "manual" if manual else "schedule",
                user.pk if manual else None,
                run["scheduled_for"],
                run["queued_at"],
                run["queued_at"] if status != "skipped" else None,
                started,
                finished,
                run["heartbeat_at"],
                0 if status == "skipped" else 1,
                run["exit_code"],
                run["worker"],
                run["pid"],
                run["error_summary"],
                plan.command,
                plan.extra["environment"],
                run["log_bytes"],
            )
            if run["log"]:
                chunk_rows.add(run_id, 1, True, run["log"], run["log_bytes"])
            # One django-q2 result per run, so the baseline holds as many rows.
            task_rows.add(
                f"{rng.getrandbits(128):032x}",
                f"{plan.name[:60]}-{run_id}",
                "jobs.tasks.execute_run",
                _dbsafe_pickle((run_id,)),
                kwargs_pickle,
                result_pickle,
                "jobsite",
                started or run["queued_at"],
                finished or started or run["queued_at"],
                True,
                1,
            )
            flip_id = _track_alerts(plan, run_id, run, flip_id, flip_rows, note_rows)
            if out is not None and run_id % report_every == 0:
                print(f"  {run_id - first_run_id + 1:>10,} runs generated", file=out, flush=True)
        for table in tables:
            table.flush()
        _reset_sequences(connection, [Run, AlertFlip])
        _upstreams(plans, rng)
        _finish_jobs(plans, end)
        stats_rows = compute_daily_stats(plans[0].pk, plans[-1].pk)
    seconds = time.perf_counter() - t0
    rows = {t.table: t.written for t in tables}
    rows["jobs_jobdailystats"] = stats_rows
    days = (end - (first_minute or end)) / 1440
    return Seeded(jobs, runs, rows, seconds, first_run_id, days)


def _create_jobs(plans: list[JobPlan], rng: random.Random) -> None:
    from django.utils.text import slugify

    from jobs.models import Job

    objs = []
    for plan in plans:
        plan.command = f'python3 /srv/jobs/{plan.name}.py --day "$JOBSITE_SCHEDULED_FOR"'
        environment = {"TARGET": plan.name.split("-")[0], "API_TOKEN": "${API_TOKEN}"}
        plan.extra["environment"] = {"TARGET": environment["TARGET"], "API_TOKEN": "••••••"}
        objs.append(
            Job(
                name=plan.name,
                slug=slugify(plan.name),
                description=f"Seeded by bench/seed_history.py ({plan.schedule}).",
                owner=plan.name.split("-")[0],
                tags="bench," + plan.name.split("-")[1],
                command=plan.command,
                environment=environment,
                secret_keys=["API_TOKEN"],
                schedule=plan.schedule,
                timezone="UTC",
                timeout=plan.timeout,
                retries=0,
                alert_emails=plan.alert_emails,
            )
        )
    created = Job.objects.bulk_create(objs, batch_size=500)
    if created[0].pk is None:  # a backend that does not return ids
        by_name = dict(
            Job.objects.filter(name__in=[p.name for p in plans]).values_list("name", "pk")
        )
        for plan in plans:
            plan.pk = by_name[plan.name]
    else:
        for plan, job in zip(plans, created, strict=True):
            plan.pk = job.pk


def _active_last_runs(plans: list[JobPlan]) -> dict[int, str]:
    """The latest run of a few jobs is still running, of a couple still queued."""
    running = max(1, len(plans) // 200)
    queued = max(1, len(plans) // 500)
    busy_first = sorted(plans, key=lambda p: p.interval)
    active = {p.index: "running" for p in busy_first[1 : 1 + running]}
    active.update({p.index: "queued" for p in busy_first[1 + running : 1 + running + queued]})
    return active


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _one_run(plan, run_id, minute, rng, now, active: str | None) -> dict:
    scheduled = minute * 60.0
    queued = scheduled + rng.uniform(0.0, 0.05)
    started = scheduled + rng.uniform(0.0, 2.0)
    duration = min(600.0, max(0.1, plan.typical * rng.lognormvariate(0.0, 0.35)))
    if active:
        status = active
    else:
        roll = rng.random()
        status = next(s for limit, s in STATUS_MIX if roll < limit)
    run = {
        "status": status,
        "scheduled_for": _at(scheduled),
        "queued_at": _at(queued),
        "started_at": _at(started),
        "finished_at": None,
        "heartbeat_at": None,
        "exit_code": None,
        "worker": f"worker-{run_id % 3 + 1}:{1000 + run_id % 30000}",
        "pid": 1000 + run_id % 30000,
        "error_summary": "",
        "log": "",
        "log_bytes": 0,
    }
    if status == "queued":
        run.update(started_at=None, worker="", pid=None)
    elif status == "running":
        run.update(heartbeat_at=now)
    elif status == "skipped":
        run.update(
            started_at=None,
            finished_at=_at(queued),
            worker="",
            pid=None,
            error_summary=f"overlap: run #{plan.last_run_id or run_id - 1} is still running",
        )
    elif status == "succeeded":
        run.update(finished_at=_at(started + duration), exit_code=0)
    elif status == "failed":
        code = rng.choice([1, 1, 1, 2, 127])
        run.update(
            finished_at=_at(started + duration),
            exit_code=code,
            error_summary=f"exit code {code}: ConnectionError: upstream refused the connection",
        )
    elif status == "timed_out":
        run.update(
            finished_at=_at(started + plan.timeout),
            exit_code=-15,
            error_summary=f"timed out after {plan.timeout} s (SIGTERM to the process group)",
        )
    elif status == "lost":
        run.update(
            finished_at=_at(started + duration + 60),
            heartbeat_at=_at(started + duration),
            error_summary="lost: no heartbeat for 60 s (worker died)",
        )
    if run_id % LOG_SAMPLE == 0 and status not in ("queued", "skipped"):
        lines = [
            line.format(n=rng.randrange(1, 100_000), s=duration)
            for line in LOG_LINES[: rng.randint(3, 5)]
        ]
        if status == "failed":
            lines.append("ConnectionError: upstream refused the connection")
        run["log"] = "\n".join(lines) + "\n"
        run["log_bytes"] = len(run["log"].encode())
    if status == "running":
        plan.active_run_id = run_id
    elif status not in ("queued", "skipped"):
        plan.last_end = (run_id, status)
    plan.last_run_id = run_id
    return run


def _track_alerts(plan: JobPlan, run_id: int, run: dict, flip_id: int, flips, notes) -> int:
    """Alert flips as alerts.py would record them (alert_after=1)."""
    status, finished = run["status"], run["finished_at"]
    if status in FAILURES:
        plan.consecutive_failures += 1
        if plan.failing_since is None:
            plan.failing_since = finished
            flip_id += 1
            reason = run["error_summary"]
            flips.add(flip_id, plan.pk, "ok", "failing", finished, run_id, reason, finished)
            _notify(plan, flip_id, "alert", f"{plan.name} is failing", finished, notes)
    elif status == "succeeded":
        plan.consecutive_failures = 0
        plan.last_success_at = finished
        if plan.failing_since is not None:
            plan.failing_since = None
            flip_id += 1
            flips.add(flip_id, plan.pk, "failing", "ok", finished, run_id, "", finished)
            _notify(plan, flip_id, "recovery", f"{plan.name} is ok again", finished, notes)
    return flip_id


def _notify(plan: JobPlan, flip_id: int, kind: str, subject: str, at, notes) -> None:
    for target in plan.alert_emails:
        notes.add(plan.pk, flip_id, kind, "email", target, subject, at, True)


def _reset_sequences(connection, models) -> None:
    from django.core.management.color import no_style

    statements = connection.ops.sequence_reset_sql(no_style(), models)
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


def _upstreams(plans: list[JobPlan], rng: random.Random) -> None:
    """One job in 20 waits for another (an earlier, busier one)."""
    from jobs.models import Job

    through = Job.upstreams.through
    links = [
        through(from_job_id=plan.pk, to_job_id=plans[rng.randrange(plan.index)].pk)
        for plan in plans[1:]
        if plan.index % 20 == 0
    ]
    through.objects.bulk_create(links)


def _finish_jobs(plans: list[JobPlan], end: int) -> None:
    from jobs.models import Job

    jobs = Job.objects.in_bulk([p.pk for p in plans])
    for plan in plans:
        job = jobs[plan.pk]
        job.last_scheduled_for = _at(plan.last_fire * 60.0) if plan.runs else None
        job.last_success_at = plan.last_success_at
        job.consecutive_failures = plan.consecutive_failures
        job.alert_state = "failing" if plan.failing_since else "ok"
        job.alert_state_since = plan.failing_since
        job.active_run_id = plan.active_run_id
        job.last_end_run_id, job.last_end_status = plan.last_end or (None, "")
        job.next_fire_at = _at((_last_fire(plan, end) + plan.interval) * 60.0)
        job.fire_basis = job.current_fire_basis
    fields = [
        "last_scheduled_for",
        "last_success_at",
        "consecutive_failures",
        "alert_state",
        "alert_state_since",
        "active_run",
        "last_end_run_id",
        "last_end_status",
        "next_fire_at",
        "fire_basis",
    ]
    Job.objects.bulk_update(jobs.values(), fields, batch_size=250)
    # History starts before the first fire, or staleness would ignore it.
    first = min((p.first_fire for p in plans if p.runs), default=end)
    Job.objects.filter(pk__in=jobs).update(created_at=_at(first * 60.0 - 3600))


def compute_daily_stats(first_job: int, last_job: int) -> int:
    """JobDailyStats from the runs, in one INSERT ... SELECT ... GROUP BY."""
    from django.conf import settings
    from django.db import connection

    from jobs.stats import COUNTED

    if connection.vendor == "postgresql":
        day = "(finished_at AT TIME ZONE %s)::date"
        day_params = [settings.TIME_ZONE]
        seconds = "EXTRACT(EPOCH FROM ({a} - {b}))"
        clamp = "GREATEST({x}, 0)"
    else:
        day = "django_datetime_cast_date(finished_at, %s, %s)"
        day_params = [settings.TIME_ZONE, "UTC"]
        seconds = "((julianday({a}) - julianday({b})) * 86400.0)"
        clamp = "MAX({x}, 0)"
    duration = clamp.format(x=seconds.format(a="finished_at", b="started_at"))
    lateness = clamp.format(x=seconds.format(a="started_at", b="scheduled_for"))
    counts = ",\n".join(
        f"SUM(CASE WHEN status = '{s}' THEN 1 ELSE 0 END)"
        for s in ("succeeded", "failed", "timed_out", "lost", "cancelled", "skipped")
    )
    executed = "CASE WHEN started_at IS NOT NULL THEN {x} END"
    statuses = ", ".join(f"'{s}'" for s in sorted(COUNTED))
    sql = f"""
        INSERT INTO jobs_jobdailystats
            (job_id, day, succeeded, failed, timed_out, lost, cancelled, skipped, executed,
             duration_total, duration_max, lateness_total, lateness_max)
        SELECT job_id, {day}, {counts},
            SUM(CASE WHEN started_at IS NOT NULL THEN 1 ELSE 0 END),
            COALESCE(SUM({executed.format(x=duration)}), 0),
            COALESCE(MAX({executed.format(x=duration)}), 0),
            COALESCE(SUM({executed.format(x=lateness)}), 0),
            COALESCE(MAX({executed.format(x=lateness)}), 0)
        FROM jobs_run
        WHERE finished_at IS NOT NULL AND status IN ({statuses})
            AND job_id BETWEEN %s AND %s
        GROUP BY 1, 2
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [*day_params, first_job, last_job])
        return cursor.rowcount


# --- Command line ----------------------------------------------------------------------


def migrate(url: str) -> None:
    env = dict(os.environ, DATABASE_URL=url, DJANGO_SETTINGS_MODULE="jobsite.settings")
    for args in (["migrate", "-v0"], ["createcachetable"]):
        subprocess.run(
            [sys.executable, str(BASE_DIR / "manage.py"), *args], env=env, check=True, cwd=BASE_DIR
        )


BIG_TABLES = ["jobs_run", "django_q_task"]


def drop_secondary_indexes(connection) -> list[str]:
    """PostgreSQL: drop the big tables' indexes that back no constraint (a
    bulk load is several times faster without them); return how to rebuild."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT i.relname, pg_get_indexdef(x.indexrelid)
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_class t ON t.oid = x.indrelid
            WHERE t.relname = ANY(%s) AND NOT x.indisprimary
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
            """,
            [BIG_TABLES],
        )
        found = cursor.fetchall()
        for name, _definition in found:
            cursor.execute(f'DROP INDEX "{name}"')
    return [definition for _name, definition in found]


def rebuild(connection, definitions: list[str]) -> float:
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '256MB'")
        for definition in definitions:
            cursor.execute(definition)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> Seeded:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    print(f"database {args.database_url}: recreating and migrating …", flush=True)
    recreate_database(args.database_url)
    migrate(args.database_url)
    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")
    import django

    django.setup()
    from django.db import connection

    definitions: list[str] = []
    if connection.vendor == "postgresql":
        definitions = drop_secondary_indexes(connection)
        with connection.cursor() as cursor:
            # No per-row foreign-key triggers during the load; ids are consistent by construction.
            cursor.execute("SET session_replication_role = replica")
    print(f"seeding {args.jobs:,} jobs, {args.runs:,} runs …", flush=True)
    result = seed(jobs=args.jobs, runs=args.runs, seed=args.seed)
    post = 0.0
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = DEFAULT")
        post = rebuild(connection, definitions)
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
        vacuum = time.perf_counter() - started
        print(f"rebuilt {len(definitions)} indexes in {post:.1f} s, VACUUM ANALYZE {vacuum:.1f} s")
        post += vacuum
    total = result.seconds + post
    print()
    print(f"{'table':<22} {'rows':>12}")
    for table, count in result.rows.items():
        print(f"{table:<22} {count:>12,}")
    all_rows = sum(result.rows.values())
    print(
        f"{args.jobs:,} jobs, {result.runs:,} runs over {result.days:.1f} days: "
        f"{all_rows:,} rows in {total:.1f} s = {all_rows / total:,.0f} rows/s "
        f"({result.runs / total:,.0f} runs/s)",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
