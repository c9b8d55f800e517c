"""bench/seed_history.py and bench/pages.py: a smoke run with tiny sizes, and
the pages' query counts, which must not grow with the run history (no N+1,
no per-run work). Timings are never asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django_q.models import Task

from bench import pages, seed_history
from jobs.models import Job, JobDailyStats, Run, RunLogChunk
from jobs.stats import recount
from tests.conftest import BASE_DIR

PAGE_LABELS = [
    "/",
    "job page (busiest job)",
    "run page",
    "/failures/",
    "/stale/",
    "admin Run list",
    "admin Job list",
    pages.BASELINE,
]


def test_pages_benchmark_prints_its_table_for_two_tiny_sqlite_histories(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(BASE_DIR / "bench" / "pages.py"),
            "--small-url",
            f"sqlite:///{tmp_path / 'small.sqlite3'}",
            "--big-url",
            f"sqlite:///{tmp_path / 'big.sqlite3'}",
            "--jobs",
            "5",
            "--small-runs",
            "100",
            "--big-runs",
            "500",
            "--requests",
            "5",
        ],
        capture_output=True,
        text=True,
        cwd=BASE_DIR,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "500 runs over" in out and "rows/s" in out  # the seeder's report
    assert "page" in out and "100 p95" in out and "500 p95" in out and "target met" in out
    for label in PAGE_LABELS:
        assert label in out
    assert "(baseline)" in out


@pytest.mark.django_db
def test_seeded_history_is_consistent_with_its_rollups():
    seeded = seed_history.seed(jobs=5, runs=300, out=None)
    assert Run.objects.count() == 300
    assert Task.objects.filter(success=True).count() == 300
    assert RunLogChunk.objects.exists()
    statuses = set(Run.objects.values_list("status", flat=True))
    assert {"succeeded", "running"} <= statuses
    for job in Job.objects.all():
        rows = {
            row.day: (row.succeeded, row.failures, row.skipped, row.executed)
            for row in JobDailyStats.objects.filter(job=job)
        }
        expected = {
            day: (
                c["succeeded"],
                c["failed"] + c["timed_out"] + c["lost"],
                c["skipped"],
                c["executed"],
            )
            for day, c in recount(job).items()
        }
        assert rows == expected
        last = job.runs.order_by("-scheduled_for").first()
        if last:
            assert job.last_scheduled_for == last.scheduled_for
    # Every fire is on the minute, and a started run starts 0-2 s late.
    run = Run.objects.exclude(started_at=None).first()
    assert run.scheduled_for.second == 0
    assert 0 <= (run.started_at - run.scheduled_for).total_seconds() <= 2
    assert seeded.runs == 300


def _query_counts(client) -> dict[str, int]:
    # /stale/ reads the latest runs of stale jobs only when there are some:
    # make the every-minute job stale in both histories, whatever the time of day.
    Job.objects.filter(schedule="* * * * *").update(last_scheduled_for=None)
    client.force_login(pages.bench_user())
    return {label: pages.count_queries(client, url) for label, url in pages.resolve_pages()}


@pytest.mark.django_db
def test_page_query_counts_do_not_grow_from_100_to_1000_runs(client):
    seed_history.seed(jobs=5, runs=100, out=None)
    small = _query_counts(client)
    Job.objects.all().delete()
    Task.objects.all().delete()
    seed_history.seed(jobs=5, runs=1000, out=None)
    assert Run.objects.count() == 1000
    big = _query_counts(client)
    assert set(small) == set(PAGE_LABELS)
    assert big == small
