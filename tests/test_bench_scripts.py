"""The bench/ scripts run end to end at tiny sizes and print their tables.

Timings are never asserted here (DESIGN.md): only that each script finishes
with real processes and reports every figure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BASE_DIR = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, str(BASE_DIR / "bench" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BASE_DIR,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_throughput_script_reports_runs_per_second_against_both_baselines(tmp_path):
    out = run_script(
        "throughput.py",
        *("--database", "sqlite", "--runs", "20", "--repeat", "1", "--out", str(tmp_path)),
        timeout=90,
    )
    assert "## Throughput" in out
    assert "machine   " in out and "Python" in out
    assert "load      start" in out
    labels = (
        "bare subprocess.run",
        "raw django-q2 async_task",
        "run record",
        "output captured",
        "Jobsite run_create",
    )
    for label in labels:
        assert label in out
    assert "ratio to raw django-q2" in out
    assert "target    Jobsite >= 70% of raw django-q2" in out
    assert "reference the least a run record costs" in out
    assert "reference the least a run whose output is stored costs" in out
    assert "PROBLEM" not in out, out
    chart = (tmp_path / "throughput.svg").read_text()
    assert chart.startswith("<svg") and chart.count("<rect") == 4
    for label in ("raw django-q2", "+ run record", "+ output captured", "Jobsite"):
        assert f">{label}" in chart
    assert "target: 70% of raw django-q2" in chart


def test_lateness_script_reports_both_phases_for_jobsite_and_django_q2(tmp_path):
    out = run_script(
        "lateness.py",
        *("--minutes", "1", "--burst-jobs", "5", "--burst-minutes", "1"),
        *("--first-fire-in", "3", "--out", str(tmp_path)),
        timeout=150,
    )
    assert "## Start lateness" in out
    assert "load      start" in out
    for phase in ("(a) one job every minute", "(b) jobs due in the same minute"):
        assert phase in out
    table_rows = [line for line in out.splitlines() if line.startswith("| ")]
    for system in ("Jobsite", "django-q2 CRON"):
        for figure in ("run started", "process started"):
            rows = [r for r in table_rows if f"| {system} " in r and f"| {figure} " in r]
            assert len(rows) == 2, out  # one per phase
    assert "not succeeded" not in out


def test_pipe_floor_script_reports_every_reader_against_dev_null():
    out = run_script("pipe_floor.py", "--size", "2M", "--repeat", "1", timeout=60)
    assert "## Pipe floor" in out
    assert "load      start" in out
    for reader in ("/dev/null", "| cat ", "python 64 KiB", "python 1 MiB", "python splice"):
        assert reader in out, out
    for reader in ("| file ", "| file + punch "):
        assert reader in out, out
    assert "% of /dev/null" in out
