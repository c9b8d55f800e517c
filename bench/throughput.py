#!/usr/bin/env python
"""Throughput: runs of `true` per second, end to end, against django-q2 alone.

One fresh database per engine and one real `manage.py qcluster` (Q_WORKERS
workers, Jobsite's Q_CLUSTER settings) serve, one after another, in every repeat:

  floor      bare `subprocess.run(["true"])` in a loop in this process;
  django-q2  --runs `async_task` calls of a function that runs the same
             subprocess, same broker and database; done when the broker's
             queue is empty (every result stored and acknowledged);
  recorded   the same, plus the least any run record costs: the enqueue
             INSERTs a row in the task's transaction, the task claims it
             (one UPDATE), runs the subprocess and stores the outcome (one
             UPDATE); done when every row is finished and the queue is empty.
             What Jobsite could reach at best while keeping a run's history;
  captured   the same, plus the least showing a run's output takes: the
             command starts as Jobsite starts a shell job (its parent-death
             launcher, `/bin/sh -c`, its own session), its output is read from
             a pipe to the end and stored with the outcome;
  Jobsite    --runs `services.run_create` of a shell job `true` with
             overlap=allow (the path "Run now" takes); done when every run is
             finished in the database and the broker's queue is empty.

Each time runs from the first enqueue to the last stored result.

    .venv/bin/python bench/throughput.py                   # 5,000 runs x 3, SQLite and PostgreSQL
    .venv/bin/python bench/throughput.py --database sqlite --runs 20 --repeat 1   # smoke size
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

RAW_FUNC = "bench.common.q2_run_true"
RECORDED_FUNC = "bench.common.q2_recorded_true"
CAPTURED_FUNC = "bench.common.q2_captured_true"
TARGET = 0.70


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--pg-url", default=common.DEFAULT_PG_URL, help="server for postgres")
    parser.add_argument("--runs", type=int, default=5000, help="runs enqueued at once")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="Q_WORKERS of the cluster")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--out", help="directory for logs and the database (default bench/out/...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    directory = common.out_dir("throughput", args.out)
    if args.database == "both":
        # Django reads its settings once: one process per database engine.
        for engine in ("sqlite", "postgres"):
            forwarded = _without_option(list(argv or sys.argv[1:]), "--database")
            forwarded = _without_option(forwarded, "--out")
            forwarded += ["--database", engine, "--out", str(directory / engine)]
            subprocess.run([sys.executable, __file__, *forwarded], check=True)
        return
    measure(args, directory)


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def measure(args: argparse.Namespace, directory: Path) -> None:
    load_at_start = common.load_text()
    url = common.fresh_database(
        args.database, "jobsite_bench_throughput", directory=directory, pg_url=args.pg_url
    )
    env = common.child_env(url, Q_WORKERS=str(args.workers))
    print(f"throughput: {args.database} database, logs in {directory}", flush=True)
    common.migrate(env)
    common.setup_django(url)
    from jobs.models import Job

    job = Job.objects.create(
        name="throughput", slug="throughput", command="true", overlap=Job.Overlap.ALLOW, timeout=60
    )
    common.create_record_table()
    paths = ("django-q2", "recorded", "captured", "jobsite")
    results: dict[str, list[float]] = {name: [] for name in ("floor", *paths)}
    enqueue: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    problems: list[str] = []
    with common.Processes(directory) as procs:
        cluster = procs.start("qcluster", "qcluster", env=env)
        # Warm up: the cluster is up and every path has run once.
        jobsite_batch(job, 1, procs=procs, timeout=120)
        raw_batch(1, procs=procs, timeout=120)
        recorded_batch(1, RECORDED_FUNC, procs=procs, timeout=120)
        recorded_batch(1, CAPTURED_FUNC, procs=procs, timeout=120)
        for repeat in range(1, args.repeat + 1):
            results["floor"].append(floor(args.runs))
            with cpu_per_run(cluster.pid, args.runs, cpu["django-q2"]):
                rate, seconds, trouble = raw_batch(args.runs, procs=procs, timeout=args.timeout)
            results["django-q2"].append(rate)
            enqueue["django-q2"].append(seconds)
            problems += trouble
            for name, func in (("recorded", RECORDED_FUNC), ("captured", CAPTURED_FUNC)):
                with cpu_per_run(cluster.pid, args.runs, cpu[name]):
                    rate, seconds, trouble = recorded_batch(
                        args.runs, func, procs=procs, timeout=args.timeout
                    )
                results[name].append(rate)
                enqueue[name].append(seconds)
                problems += trouble
            with cpu_per_run(cluster.pid, args.runs, cpu["jobsite"]):
                rate, seconds, trouble = jobsite_batch(
                    job, args.runs, procs=procs, timeout=args.timeout
                )
            results["jobsite"].append(rate)
            enqueue["jobsite"].append(seconds)
            problems += trouble
            print(
                f"  repeat {repeat}: floor {results['floor'][-1]:.0f}/s, "
                f"django-q2 {results['django-q2'][-1]:.1f}/s, "
                f"recorded {results['recorded'][-1]:.1f}/s, "
                f"captured {results['captured'][-1]:.1f}/s, "
                f"Jobsite {results['jobsite'][-1]:.1f}/s",
                flush=True,
            )
    report(args, results, enqueue, cpu, problems, load_at_start)
    chart(args, results, directory)


@contextlib.contextmanager
def cpu_per_run(cluster_pid: int, runs: int, into: list[float]):
    """Append the CPU milliseconds per run spent by the cluster's processes
    (workers, pusher, monitor, the jobs' children) and by this one (enqueuing)."""
    before = common.session_cpu_seconds(cluster_pid) + time.process_time()
    yield
    after = common.session_cpu_seconds(cluster_pid) + time.process_time()
    into.append(1000 * (after - before) / runs)


def floor(runs: int) -> float:
    started = time.perf_counter()
    for _ in range(runs):
        subprocess.run(["true"], check=False)
    return runs / (time.perf_counter() - started)


def queue_empty() -> bool:
    from django_q.models import OrmQ

    return not OrmQ.objects.exists()


def raw_batch(runs: int, *, procs: common.Processes, timeout: float) -> tuple[float, float, list]:
    """(runs/s end to end, seconds spent enqueuing, problems)."""
    from django_q.models import Task
    from django_q.tasks import async_task

    failed_before = Task.objects.filter(func=RAW_FUNC, success=False).count()
    started = time.perf_counter()
    for _ in range(runs):
        async_task(RAW_FUNC)
    enqueued = time.perf_counter() - started
    common.wait_until(queue_empty, timeout=timeout, interval=0.1, procs=procs, what="empty queue")
    elapsed = time.perf_counter() - started
    failed = Task.objects.filter(func=RAW_FUNC, success=False).count() - failed_before
    return runs / elapsed, enqueued, [f"django-q2: {failed} failed tasks"] if failed else []


def recorded_batch(
    runs: int, func: str, *, procs: common.Processes, timeout: float
) -> tuple[float, float, list]:
    """(runs/s end to end, seconds spent enqueuing, problems) of a reference
    that keeps a run record (`func`: RECORDED_FUNC or CAPTURED_FUNC)."""
    from django.db import connection, transaction
    from django_q.tasks import async_task

    table = common.RECORD_TABLE
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}")
        after = cursor.fetchone()[0]
    started = time.perf_counter()
    for record_id in range(after + 1, after + runs + 1):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (id, status, queued_at) VALUES (%s, 'queued', %s)",
                [record_id, time.time()],
            )
            async_task(func, record_id)
    enqueued = time.perf_counter() - started

    def unfinished() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT COUNT(*) FROM {table} WHERE id > %s AND finished_at IS NULL", [after]
            )
            return cursor.fetchone()[0]

    common.wait_until(
        lambda: unfinished() == 0 and queue_empty(),
        timeout=timeout,
        interval=0.1,
        procs=procs,
        what="all recorded runs finished",
    )
    elapsed = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*) FROM {table} WHERE id > %s AND status = 'succeeded'", [after]
        )
        succeeded = cursor.fetchone()[0]
    trouble = [f"{func}: {succeeded} of {runs} succeeded"] if succeeded != runs else []
    return runs / elapsed, enqueued, trouble


def jobsite_batch(job, runs: int, *, procs: common.Processes, timeout: float):
    """(runs/s end to end, seconds spent enqueuing, problems)."""
    from collections import Counter

    from jobs import services
    from jobs.models import Run

    after = Run.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    started = time.perf_counter()
    for _ in range(runs):
        services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    enqueued = time.perf_counter() - started
    batch = Run.objects.filter(job=job, pk__gt=after)
    common.wait_until(
        lambda: not batch.filter(status__in=Run.ACTIVE).exists() and queue_empty(),
        timeout=timeout,
        interval=0.1,
        procs=procs,
        what="all runs finished",
    )
    elapsed = time.perf_counter() - started
    statuses = Counter(batch.values_list("status", flat=True))
    trouble = []
    if statuses.get(Run.Status.SUCCEEDED, 0) != runs:
        trouble.append(f"Jobsite: expected {runs} succeeded runs, got {dict(statuses)}")
    return runs / elapsed, enqueued, trouble


def report(args, results, enqueue, cpu, problems, load_at_start) -> None:
    raw = results["django-q2"]
    ratios = {
        name: [ours / base for ours, base in zip(values, raw, strict=True)]
        for name, values in results.items()
    }
    print()
    print("## Throughput")
    for line in common.machine_lines(common.database_text(), load_at_start):
        print(line)
    print(
        f"workload  {args.runs} runs of `true` enqueued at once, end to end (enqueue -> "
        f"stored), Q_WORKERS={args.workers}, {args.repeat} repeat(s)"
    )
    print()
    labels = {
        "floor": 'bare subprocess.run(["true"]) loop (floor)',
        "django-q2": "raw django-q2 async_task -> same subprocess",
        "recorded": "django-q2 + run record (INSERT, claim, outcome)",
        "captured": "... + output captured (launcher, sh, pipe, stored)",
        "jobsite": "Jobsite run_create -> run finished (shell `true`)",
    }
    rows = [
        [
            labels[name],
            common.fmt_spread(values, 1),
            common.fmt_spread(enqueue[name], 1) if name in enqueue else "-",
            common.fmt_spread(cpu[name], 1) if name in cpu else "-",
            common.fmt_spread(ratios[name], 2),
        ]
        for name, values in results.items()
    ]
    header = [
        "figure",
        "runs/s min / median / max",
        "enqueue s min/med/max",
        "CPU ms/run min/med/max",
        "ratio to raw django-q2",
    ]
    print(common.table(header, rows))
    median_ratio = common.spread(ratios["jobsite"])[1]
    verdict = "met" if median_ratio >= TARGET else "MISSED"
    print()
    print(
        f"target    Jobsite >= {TARGET:.0%} of raw django-q2 "
        f"(median ratio {median_ratio:.0%}): {verdict}"
    )

    def median_against(base: str) -> float:
        pairs = zip(results["jobsite"], results[base], strict=True)
        return common.spread([ours / theirs for ours, theirs in pairs])[1]

    recorded = common.spread(ratios["recorded"])[1]
    print(
        f"reference the least a run record costs keeps django-q2 at {recorded:.0%} of itself; "
        f"Jobsite runs at {median_against('recorded'):.0%} of that reference"
    )
    captured = common.spread(ratios["captured"])[1]
    print(
        f"reference the least a run whose output is stored costs keeps django-q2 at "
        f"{captured:.0%} of itself ({100 * (captured - TARGET):+.0f} points from the target "
        f"for everything else a run does); Jobsite runs at {median_against('captured'):.0%} of it"
    )
    for problem in problems:
        print(f"PROBLEM   {problem}")


def chart(args, results, directory: Path) -> None:
    """throughput.svg beside the logs: each path's runs/s against the target."""
    labels = {
        "django-q2": "raw django-q2",
        "recorded": "+ run record",
        "captured": "+ output captured (launcher, sh, pipe)",
        "jobsite": "Jobsite",
    }
    target = TARGET * common.spread(results["django-q2"])[1]
    path = directory / "throughput.svg"
    path.write_text(
        common.bar_chart_svg(
            f"Throughput on {common.database_text().split(' (')[0]}: {args.runs} runs of `true`, "
            f"{args.repeat} repeat(s)",
            [(label, results[name]) for name, label in labels.items()],
            unit="runs/s",
            line=(target, f"target: {TARGET:.0%} of raw django-q2"),
        )
    )
    print(f"chart     {path}")


if __name__ == "__main__":
    main()
