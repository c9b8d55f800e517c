#!/usr/bin/env python
"""Pages with history: server time of the dashboard and admin pages with a
small and a big run history, against django-q2's admin Success list.

For each database (seeded by bench/seed_history.py unless --no-seed) a
separate process logs in a superuser with Django's test Client (in
process, DEBUG off), requests each page a few times to warm up, counts its
queries once, then times `--requests` requests: p50 and p95 of the time
from request to response. The table compares the big history with the
small one.

    .venv/bin/python bench/pages.py                      # 1,000 jobs; 20 k and 2 M runs
    .venv/bin/python bench/pages.py --no-seed            # measure the seeded databases again
    .venv/bin/python bench/pages.py --no-seed --pages /,/stale/   # only these pages
    .venv/bin/python bench/pages.py --small-url sqlite:////tmp/s.sqlite3 \\
        --big-url sqlite:////tmp/b.sqlite3 --jobs 5 --small-runs 100 --big-runs 500 --requests 5

Targets (issue 6): p95 <= 150 ms with the big history, and <= 1.3x the
small history's p95.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

SMALL_URL = "postgres://postgres@127.0.0.1:5432/jobsite_pages_small"
BIG_URL = "postgres://postgres@127.0.0.1:5432/jobsite_pages"
TARGET_MS = 150.0
TARGET_RATIO = 1.3
WARMUP = 3
BLOCK = 5  # requests in a turn, before the other history's turn
BASELINE = "baseline: q2 admin Success"


def resolve_pages() -> list[tuple[str, str]]:
    """(label, URL) of every measured page, found in the seeded database."""
    from django.db.models import F, Sum
    from django.urls import reverse

    from jobs.models import Job, JobDailyStats, Run, RunLogChunk

    busiest = (
        JobDailyStats.objects.values("job_id")
        .annotate(n=Sum(F("executed") + F("skipped")))
        .order_by("-n")
        .values_list("job_id", flat=True)
        .first()
    )
    job = Job.objects.get(pk=busiest) if busiest else Job.objects.order_by("pk").first()
    # A finished run with a stored log (the page reads its chunks).
    run_id = (
        RunLogChunk.objects.filter(run__job=job)
        .order_by("-run_id")
        .values_list("run_id", flat=True)
        .first()
    ) or Run.objects.filter(job=job).order_by("-id").values_list("id", flat=True).first()
    return [
        ("/", reverse("jobs-overview")),
        ("job page (busiest job)", reverse("jobs-job-detail", args=[job.slug])),
        ("run page", reverse("jobs-run-detail", args=[run_id])),
        ("/failures/", reverse("jobs-failures")),
        ("/stale/", reverse("jobs-stale")),
        ("admin Run list", reverse("admin:jobs_run_changelist")),
        ("admin Job list", reverse("admin:jobs_job_changelist")),
        (BASELINE, reverse("admin:django_q_success_changelist")),
    ]


def get_ok(client, url: str):
    response = client.get(url)
    if response.status_code != 200:
        raise RuntimeError(f"GET {url}: HTTP {response.status_code}")
    return response


def count_queries(client, url: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        get_ok(client, url)
    return len(captured.captured_queries)


def time_page(client, url: str, requests: int, budget: float = math.inf) -> list[float]:
    """Milliseconds from request to response, `requests` times, or fewer
    once `budget` seconds are spent (a page taking seconds is measured enough)."""
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < requests and (not times or time.perf_counter() < deadline):
        started = time.perf_counter()
        get_ok(client, url)
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def bench_user():
    from django.contrib.auth.models import User

    from bench.seed_history import BENCH_USER

    user, _ = User.objects.get_or_create(
        username=BENCH_USER, defaults={"is_staff": True, "is_superuser": True}
    )
    return user


def logged_in_client():
    from django.test import Client

    client = Client()
    client.force_login(bench_user())
    return client


def setup(database_url: str) -> None:
    """In this process: Django on `database_url`, as a web worker runs it."""
    os.environ["DATABASE_URL"] = database_url
    os.environ["DEBUG"] = "False"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")
    # WhiteNoise warns about a missing STATIC_ROOT (collectstatic not run): irrelevant here.
    warnings.filterwarnings("ignore", message="No directory at")
    from django.conf import settings
    from django.test.utils import setup_test_environment

    # Set up as gunicorn's workers are (`manage.py runall`): jobsite.wsgi
    # also moves the startup objects out of the garbage collector's way.
    import jobsite.wsgi  # noqa: F401

    setup_test_environment(debug=False)  # lets the test Client's host in
    assert not settings.DEBUG


def describe_database() -> dict:
    from django.db import connection

    from jobs.models import Job, Run

    if connection.vendor == "postgresql":
        database = f"PostgreSQL {connection.pg_version // 10000}"
    else:
        import sqlite3

        database = f"SQLite {sqlite3.sqlite_version}"
    last = Run.objects.order_by("-id").values_list("id", flat=True).first() or 0
    first = Run.objects.order_by("id").values_list("id", flat=True).first() or 0
    return {
        "database": database,
        "jobs": Job.objects.count(),
        "runs": last - first + 1 if last else 0,  # ids are dense: no COUNT(*) needed
    }


def serve(database_url: str) -> None:
    """The child: one database per process (settings are read once). It
    answers the parent's commands on stdin, one JSON line each on stdout:
    `warm LABEL` (query count, then warm-up requests), `time LABEL N`
    (milliseconds of N requests), `quit`."""
    setup(database_url)
    client = logged_in_client()
    pages = dict(resolve_pages())
    answer = sys.stdout
    sys.stdout = sys.stderr  # only answers on the real stdout
    answer.write(json.dumps({**describe_database(), "labels": list(pages)}) + "\n")
    answer.flush()
    for line in sys.stdin:
        command, _, rest = line.rstrip("\n").partition(" ")
        if command == "quit":
            return
        if command == "warm":
            queries = count_queries(client, pages[rest])  # also the first warm-up request
            time_page(client, pages[rest], WARMUP - 1)
            reply: object = queries
        else:  # time
            label, _, n = rest.rpartition(" ")
            reply = time_page(client, pages[label], int(n))
        answer.write(json.dumps(reply) + "\n")
        answer.flush()


class Child:
    """A `serve` process for one database."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", url],
            cwd=BASE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._answer()

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the measuring process stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait()


def measure_interleaved(
    urls: tuple[str, str], requests: int, budget: float, only: list[str] | None
) -> list[dict]:
    """Time every page on both databases in turns of BLOCK requests, small
    history then big, so a slower spell of a shared machine falls on both
    and the ratio compares like with like. A page stops at `budget` seconds
    a database (a page taking seconds is measured enough)."""
    children = [Child(url) for url in urls]
    try:
        labels = children[0].info["labels"]
        if unknown := set(only or ()) - set(labels):
            known = ", ".join(repr(label) for label in labels)
            raise SystemExit(f"unknown page(s) {sorted(unknown)}; the pages are {known}")
        results = [{**c.info, "pages": []} for c in children]
        for label in labels:
            if only and label not in only:
                continue
            queries = [c.ask(f"warm {label}") for c in children]
            times: list[list[float]] = [[], []]
            while any(len(t) < requests and sum(t) < budget * 1000 for t in times):
                for i, child in enumerate(children):
                    if len(times[i]) < requests and sum(times[i]) < budget * 1000:
                        n = min(BLOCK, requests - len(times[i]))
                        times[i] += child.ask(f"time {label} {n}")
            for result, q, t in zip(results, queries, times, strict=True):
                result["pages"].append({"label": label, "queries": q, "times": t})
        return results
    finally:
        for child in children:
            child.close()


def short(n: int) -> str:
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def print_table(small: dict, big: dict, requests: int, load: tuple, out=sys.stdout) -> None:
    s, b = short(small["runs"]), short(big["runs"])
    print(file=out)
    print(
        f"machine   {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{big['database']}; load {load[0]:.2f} -> {os.getloadavg()[0]:.2f}",
        file=out,
    )
    print(
        f"workload  {big['jobs']:,} jobs; {small['runs']:,} runs vs {big['runs']:,} runs "
        f"(as many django-q2 Success rows); {requests} requests per page, "
        f"Django test Client in process, DEBUG off, logged-in superuser; the two histories "
        f"in turns of {BLOCK} requests",
        file=out,
    )
    print(file=out)
    header = (
        f"{'page':<28} {'queries':>8} {s + ' p50':>9} {s + ' p95':>9} "
        f"{b + ' p50':>9} {b + ' p95':>9} {'ratio':>6}  target met"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    baseline_p95 = None
    for sp, bp in zip(small["pages"], big["pages"], strict=True):
        s50, s95 = percentile(sp["times"], 50), percentile(sp["times"], 95)
        b50, b95 = percentile(bp["times"], 50), percentile(bp["times"], 95)
        ratio = b95 / s95 if s95 else float("inf")
        queries = (
            str(bp["queries"])
            if sp["queries"] == bp["queries"]
            else f"{sp['queries']}/{bp['queries']}"
        )
        if sp["label"] == BASELINE:
            met = "(baseline)"
            baseline_p95 = b95
        else:
            met = "yes" if b95 <= TARGET_MS and ratio <= TARGET_RATIO else "NO"
        print(
            f"{sp['label']:<28} {queries:>8} {s50:>9.1f} {s95:>9.1f} "
            f"{b50:>9.1f} {b95:>9.1f} {ratio:>6.2f}  {met}",
            file=out,
        )
    print(file=out)
    print(
        f"times in ms; ratio = p95 at {b} / p95 at {s}; target: p95 <= {TARGET_MS:.0f} ms "
        f"at {b} and ratio <= {TARGET_RATIO}",
        file=out,
    )
    if baseline_p95:
        worst = max(percentile(p["times"], 95) for p in big["pages"] if p["label"] != BASELINE)
        print(
            f"slowest Jobsite page p95 at {b}: {worst:.1f} ms = "
            f"{worst / baseline_p95:.2f}x django-q2's Success list ({baseline_p95:.1f} ms)",
            file=out,
        )
    print(file=out)
    print(
        f"{'page':<28} {'history':>8} {'n':>4} {'min':>8} {'p50':>8} {'p95':>8} {'max':>8}",
        file=out,
    )
    for sp, bp in zip(small["pages"], big["pages"], strict=True):
        for size, page in ((s, sp), (b, bp)):
            t = page["times"]
            print(
                f"{page['label']:<28} {size:>8} {len(t):>4} {min(t):>8.1f} "
                f"{percentile(t, 50):>8.1f} {percentile(t, 95):>8.1f} {max(t):>8.1f}",
                file=out,
            )


def run_child(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=BASE_DIR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-url", default=SMALL_URL)
    parser.add_argument("--big-url", default=BIG_URL)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--small-runs", type=int, default=20_000)
    parser.add_argument("--big-runs", type=int, default=2_000_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument(
        "--budget", type=float, default=30.0, help="seconds of timed requests per page at most"
    )
    parser.add_argument("--no-seed", action="store_true", help="the databases are seeded")
    parser.add_argument(
        "--pages",
        type=lambda text: [label.strip() for label in text.split(",") if label.strip()],
        help='only these pages, by label, comma-separated: e.g. "/,/stale/" (default: all)',
    )
    parser.add_argument("--serve", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        serve(args.serve)
        return

    load = os.getloadavg()
    seeder = str(BASE_DIR / "bench" / "seed_history.py")
    if not args.no_seed:
        for url, runs in ((args.small_url, args.small_runs), (args.big_url, args.big_runs)):
            run_child(seeder, "--database-url", url, "--jobs", str(args.jobs), "--runs", str(runs))
    print(f"measuring {args.small_url} and {args.big_url} in turns …", flush=True)
    results = measure_interleaved(
        (args.small_url, args.big_url), args.requests, args.budget, args.pages
    )
    print_table(*results, requests=args.requests, load=load)


if __name__ == "__main__":
    main()
