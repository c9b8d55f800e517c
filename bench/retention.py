#!/usr/bin/env python
"""Retention benchmark: delete 1,000,000 old runs with prune_runs.

Seeds (with INSERT ... SELECT, seconds not hours) N old finished runs spread
over a year, R recent runs that must stay, a few old queued/running runs,
log chunks for a sample of runs, reruns and alert flips pointing at old runs
and a daily-stats row per job and day; then times prune_runs. While it runs,
a separate probe process writes one row every 20 ms in its own transaction
(what a worker storing a log chunk does) and records how long each write
waited: the lock a prune batch holds is what other writers feel.

Prints: total time, runs/s, batch transaction time min/median/p99/max, the
probe's write latency, and checks (old runs gone, active/recent runs and all
daily stats kept).

    .venv/bin/python bench/retention.py                       # SQLite, 1 M runs
    .venv/bin/python bench/retention.py --database-url postgres://postgres@127.0.0.1:5432/bench3h
    .venv/bin/python bench/retention.py --runs 2000 --recent 500   # smoke size

The database named in --database-url is dropped and created again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from bench.common import recreate_database  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="old runs to delete")
    parser.add_argument("--recent", type=int, default=100_000, help="recent runs to keep")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10, help="every Nth run has log chunks")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--database-url", default="sqlite:////tmp/bench3-retention.sqlite3")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()


# --- Seeding ------------------------------------------------------------------------

# Every NOT NULL column of jobs_run, as an SQL expression of x (1..n), the
# finish time `fin` and the job id `jid`. A new NOT NULL column fails the seed
# loudly (see check_columns) instead of silently breaking it.
RUN_COLUMNS = {
    "job_id": "{jid}",
    "status": "CASE WHEN x %% 20 = 0 THEN 'failed' WHEN x %% 20 = 1 THEN 'skipped' "
    "ELSE 'succeeded' END",
    "trigger": "'schedule'",
    "attempt": "1",
    "scheduled_for": "{fin_minus_10}",
    "queued_at": "{fin_minus_10}",
    "started_at": "{fin_minus_10}",
    "finished_at": "{fin}",
    "exit_code": "CASE WHEN x %% 20 = 0 THEN 1 ELSE 0 END",
    "worker": "'bench-host:4242'",
    "error_summary": "CASE WHEN x %% 20 = 0 THEN 'Exit code 1' ELSE '' END",
    "command": "'python3 /srv/etl/export.py --day \"$JOBSITE_SCHEDULED_FOR\"'",
    "environment": '\'{{"TARGET": "reports", "TOKEN": "******"}}\'',
    "log_bytes": "2400",
    "log_dropped_bytes": "0",
    "enqueue_count": "1",
    "progress_message": "''",
}


def check_columns(connection) -> None:
    with connection.cursor() as cur:
        described = connection.introspection.get_table_description(cur, "jobs_run")
    required = {c.name for c in described if not c.null_ok and c.name != "id"}
    missing = required - set(RUN_COLUMNS)
    if missing:
        raise SystemExit(f"bench/retention.py: jobs_run has new NOT NULL columns: {missing}")


def insert_runs(connection, *, count: int, jobs: list[int], first_finish, step: float) -> None:
    """count runs of the jobs round robin, finishing `step` seconds apart from first_finish."""
    if count <= 0:
        return
    sqlite = connection.vendor == "sqlite"
    if sqlite:
        series = (
            "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < %s) "
            "SELECT {cols} FROM s"
        )
        fin = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', %s, '+' || (x * {step}) || ' seconds')"
        fin10 = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', %s, '+' || (x * {step} - 10) || ' seconds')"
        base = first_finish.replace(tzinfo=None).isoformat(sep=" ")
    else:
        series = "SELECT {cols} FROM generate_series(1, %s) AS s(x)"
        fin = "(%s::timestamptz + x * interval '{step} seconds')"
        fin10 = "(%s::timestamptz + (x * {step} - 10) * interval '1 second')"
        base = first_finish.isoformat()
    jid = f"(CASE x %% {len(jobs)} " + " ".join(f"WHEN {i} THEN {j}" for i, j in enumerate(jobs))
    jid += f" ELSE {jobs[0]} END)"
    exprs, params = [], []
    for _name, expr in RUN_COLUMNS.items():
        if "{fin}" in expr:
            params.append(base)
        if "{fin_minus_10}" in expr:
            params.append(base)
        exprs.append(
            expr.format(jid=jid, fin=fin.format(step=step), fin_minus_10=fin10.format(step=step))
        )
    cols = ", ".join(exprs)
    names = ", ".join(f'"{n}"' for n in RUN_COLUMNS)
    # Parameters appear in column order; the series bound comes first in SQLite's CTE.
    sql = f"INSERT INTO jobs_run ({names}) " + series.format(cols=cols)
    params = [count, *params] if sqlite else [*params, count]
    with connection.cursor() as cur:
        cur.execute(sql, params)


def seed(args: argparse.Namespace) -> dict:
    from django.db import connection, transaction
    from django.utils import timezone

    from jobs.models import AlertFlip, Job, JobDailyStats, Run

    check_columns(connection)
    now = timezone.now()
    jobs = Job.objects.bulk_create(
        Job(name=f"bench-job-{i}", slug=f"bench-job-{i}", command="true") for i in range(args.jobs)
    )
    job_ids = [j.pk for j in jobs]
    # Old runs: finished between ~465 and 100 days ago; recent: the last 30 days.
    old_span = timedelta(days=365).total_seconds()
    old_step = old_span / max(args.runs, 1)
    recent_step = timedelta(days=30).total_seconds() / max(args.recent, 1)
    started = time.monotonic()
    with transaction.atomic():
        insert_runs(
            connection,
            count=args.runs,
            jobs=job_ids,
            first_finish=now - timedelta(days=100, seconds=old_span),
            step=round(old_step, 3),
        )
    last_old = Run.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    with transaction.atomic():
        insert_runs(
            connection,
            count=args.recent,
            jobs=job_ids,
            first_finish=now - timedelta(days=30),
            step=round(recent_step, 3),
        )
        # Runs that are old but still queued or running must survive.
        for status in (Run.Status.QUEUED, Run.Status.RUNNING):
            Run.objects.filter(pk__in=[1, 2] if status == "queued" else [3]).update(
                status=status, finished_at=None
            )
        _seed_logs(connection, args.log_every)
        # Recent reruns and alert flips pointing at old runs (SET_NULL on delete).
        recent = list(Run.objects.filter(pk__gt=last_old).values_list("pk", flat=True)[:100])
        for i, pk in enumerate(recent):
            Run.objects.filter(pk=pk).update(rerun_of_id=10 + (i * 7919) % (last_old - 10))
        AlertFlip.objects.bulk_create(
            AlertFlip(job_id=job_ids[0], old_state="ok", new_state="failing", at=now, run_id=pk)
            for pk in range(10, last_old, max(1, last_old // 100))
        )
        _seed_stats(job_ids, now)
    seconds = time.monotonic() - started
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("ANALYZE")
    return {
        "seed_seconds": seconds,
        "last_old": last_old,
        "stats_rows": JobDailyStats.objects.count(),
        "runs": Run.objects.count(),
    }


def _seed_logs(connection, every: int) -> None:
    if every <= 0:
        return
    text = "repeat('x', 2000)" if connection.vendor == "postgresql" else "hex(zeroblob(1000))"
    true = "true" if connection.vendor == "postgresql" else "1"
    false = "false" if connection.vendor == "postgresql" else "0"
    with connection.cursor() as cur:
        for seq, head in ((1, true), (2, false)):
            cur.execute(
                "INSERT INTO jobs_runlogchunk (run_id, seq, is_head, data, size) "
                f"SELECT id, {seq}, {head}, {text}, 2000 FROM jobs_run WHERE id % {every} = 0"
            )


def _seed_stats(job_ids: list[int], now) -> None:
    from jobs.models import JobDailyStats

    today = now.date()
    JobDailyStats.objects.bulk_create(
        (
            JobDailyStats(job_id=j, day=today - timedelta(days=d), succeeded=20, executed=20)
            for j in job_ids
            for d in range(470)
        ),
        batch_size=2000,
    )


# --- The lock probe -----------------------------------------------------------------


def probe(database_url: str) -> None:
    """Write one row every 20 ms until stdin closes; print the waits as JSON."""
    setup_django(database_url)
    import threading

    from django.db import transaction

    from jobs.models import Job

    job = Job.objects.order_by("pk").first()
    waits: list[float] = []
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    n = 0
    while not stop.is_set():
        began = time.monotonic()
        with transaction.atomic():
            Job.objects.filter(pk=job.pk).update(description=f"probe {n}")
        waits.append(time.monotonic() - began)
        n += 1
        time.sleep(0.02)
    print(json.dumps(waits), flush=True)


# --- Measuring ------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def machine_line(connection) -> str:
    with connection.cursor() as cur:
        if connection.vendor == "sqlite":
            cur.execute("select sqlite_version()")
            db = f"SQLite {cur.fetchone()[0]} (WAL, IMMEDIATE)"
        else:
            cur.execute("show server_version")
            db = f"PostgreSQL {cur.fetchone()[0]}"
    return f"{os.cpu_count()} cores, Python {platform.python_version()}, {db}"


def main() -> None:
    args = parse_args()
    if args.probe:
        probe(args.database_url)
        return
    load_start = os.getloadavg()
    recreate_database(args.database_url)
    setup_django(args.database_url)
    from django.core.management import call_command
    from django.db import connection

    from jobs import retention
    from jobs.models import JobDailyStats, Run

    call_command("migrate", verbosity=0)
    seeded = seed(args)
    print(
        f"seeded {seeded['runs']:,} runs ({args.runs:,} old, {args.recent:,} recent) "
        f"and {seeded['stats_rows']:,} daily stats rows in {seeded['seed_seconds']:.1f}s",
        flush=True,
    )

    prober = subprocess.Popen(
        [sys.executable, __file__, "--probe", "--database-url", args.database_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=BASE_DIR,
    )
    assert prober.stdout.readline().strip() == "ready"
    batch_times: list[float] = []
    walls: list[float] = []
    last = [0.0]

    def progress(report: retention.PruneReport) -> None:
        batch_times.append(report.last_batch)
        walls.append(report.elapsed - last[0])
        last[0] = report.elapsed
        if report.batches % 20 == 0:
            print(
                f"  batch {report.batches}: {report.runs:,} runs, {report.elapsed:.1f}s",
                flush=True,
            )

    report = retention.prune_runs(
        older_than=timedelta(days=90), batch=args.batch, progress=progress
    )
    out, _ = prober.communicate("", timeout=60)
    waits = json.loads(out.strip().splitlines()[-1])

    left_old = Run.objects.filter(pk__lte=seeded["last_old"]).count()
    kept = Run.objects.count()
    stats_kept = JobDailyStats.objects.count()
    load_end = os.getloadavg()

    def ms(v: float) -> str:
        return f"{v * 1000:,.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"

    rows = [
        ("runs deleted", f"{report.runs:,} (+{report.log_chunks:,} log chunks)"),
        ("total time", f"{report.elapsed:.1f} s"),
        ("runs/s", f"{report.runs_per_second:,.0f}"),
        ("batches", f"{report.batches:,} of {args.batch:,}"),
        (
            "batch transaction min / median / p99 / max",
            " / ".join(
                ms(v)
                for v in (
                    min(batch_times, default=0),
                    statistics.median(batch_times) if batch_times else 0,
                    quantile(batch_times, 0.99),
                    max(batch_times, default=0),
                )
            ),
        ),
        (
            "batch wall (select + files + tx) median / max",
            f"{ms(statistics.median(walls) if walls else 0)} / {ms(max(walls, default=0))}",
        ),
        (
            f"probe write wait p50 / p99 / max ({len(waits):,} writes)",
            f"{ms(quantile(waits, 0.5))} / {ms(quantile(waits, 0.99))} / {ms(max(waits))}",
        ),
        ("old runs left (must be 3: 2 queued, 1 running)", f"{left_old:,}"),
        ("runs kept", f"{kept:,}"),
        ("daily stats kept", f"{stats_kept:,} of {seeded['stats_rows']:,}"),
    ]
    print()
    print(f"Retention: prune_runs --older-than 90d   [{machine_line(connection)}]")
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    ok = left_old == 3 and stats_kept == seeded["stats_rows"] and kept == args.recent + 3
    print("checks:", "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
