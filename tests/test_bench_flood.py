"""Smoke tests of bench/log_flood.py, bench/timeout_precision.py and
bench/retention.py at tiny sizes: they run, check what they measure and
print their tables. Timings are never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def bench(script: str, *args: str, tmp_path: Path) -> str:
    database = f"sqlite:///{tmp_path / 'bench.sqlite3'}"
    done = subprocess.run(
        [sys.executable, str(BASE_DIR / "bench" / script), "--database-url", database, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BASE_DIR,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_log_flood_bench_keeps_head_and_tail_of_a_flood_larger_than_the_cap(tmp_path):
    out = bench("log_flood.py", "--size", "3M", "--repeat", "1", tmp_path=tmp_path)
    assert "Log flood: 3,000,037 bytes printed" in out
    assert "worker RSS growth (MB)" in out
    assert "capture / baseline (%)" in out
    assert "checks (head and tail intact, bytes accounted, stored <= cap, succeeded): OK" in out


def test_log_flood_bench_checks_a_log_smaller_than_the_cap(tmp_path):
    out = bench("log_flood.py", "--size", "20K", "--repeat", "1", tmp_path=tmp_path)
    assert "checks (head and tail intact, bytes accounted, stored <= cap, succeeded): OK" in out


def test_timeout_precision_bench_sees_the_whole_tree_go(tmp_path):
    out = bench(
        "timeout_precision.py",
        "--timeout",
        "1",
        "--grace",
        "1",
        "--repeat",
        "1",
        tmp_path=tmp_path,
    )
    assert "start -> whole tree gone (s)" in out
    assert "checks (timed out, nothing left, tree seen): OK" in out


def test_retention_bench_prunes_old_runs_and_keeps_the_rest(tmp_path):
    out = bench(
        "retention.py",
        "--runs",
        "3000",
        "--recent",
        "200",
        "--jobs",
        "5",
        "--batch",
        "1000",
        tmp_path=tmp_path,
    )
    assert "runs deleted" in out
    assert "2,997 (+" in out  # 3,000 old runs less 2 queued and 1 running
    assert "daily stats kept" in out
    assert "checks: OK" in out
