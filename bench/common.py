"""Shared helpers for the bench/ scripts.

- a fresh database (SQLite file or PostgreSQL database) migrated for Jobsite;
- real `manage.py` processes (qcluster, scheduler) with logs, stopped the
  way DESIGN.md says (SIGTERM to the main process only, bounded wait);
- the machine header (cores, Python, database, load) and percentile tables;
- django-q2 task functions for the baselines (importable by a qcluster,
  whose working directory is the project root).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

DEFAULT_PG_URL = "postgres://postgres@127.0.0.1:5432/"


# --- Output directory, databases -------------------------------------------------


def recreate_database(url: str) -> None:
    """Drop and create the database named in `url` (SQLite: delete its files)."""
    parsed = urlparse(url)
    if parsed.scheme.startswith("sqlite"):
        for suffix in ("", "-wal", "-shm"):
            Path(parsed.path + suffix).unlink(missing_ok=True)
        return
    import psycopg2

    name = parsed.path.lstrip("/")
    admin = psycopg2.connect(
        host=parsed.hostname,
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        dbname="postgres",
    )
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()


def out_dir(name: str, given: str | None = None) -> Path:
    path = (
        Path(given)
        if given
        else BASE_DIR / "bench" / "out" / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_database(kind: str, name: str, *, directory: Path, pg_url: str = DEFAULT_PG_URL) -> str:
    """Create an empty database and return its DATABASE_URL (dropping any old one)."""
    if kind == "sqlite":
        path = directory / f"{name}.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{path}{suffix}").unlink()
        return f"sqlite:///{path}"
    if kind != "postgres":
        raise ValueError(f"unknown database kind {kind!r}")
    parsed = urlparse(pg_url)
    auth = parsed.username or "postgres"
    if parsed.password:
        auth += f":{parsed.password}"
    url = f"postgres://{auth}@{parsed.hostname or '127.0.0.1'}:{parsed.port or 5432}/{name}"
    recreate_database(url)
    return url


def child_env(database_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        DJANGO_SETTINGS_MODULE="jobsite.settings",
        PYTHONUNBUFFERED="1",
        # No daily digest e-mails in the middle of a measurement.
        JOBSITE_DIGEST_TIME="",
    )
    env.update(extra)
    return env


def migrate(env: dict[str, str]) -> None:
    for args in (("migrate", "-v0"), ("createcachetable",)):
        subprocess.run(
            [sys.executable, str(BASE_DIR / "manage.py"), *args], env=env, check=True, cwd=BASE_DIR
        )


def setup_django(database_url: str) -> None:
    """Point this process at the benchmark database and set Django up."""
    os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "jobsite.settings"
    os.environ["JOBSITE_DIGEST_TIME"] = ""
    # Not one "Enqueued" line per task in the report.
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()


# --- Processes ------------------------------------------------------------------------


class Processes:
    """Real manage.py processes with their output in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(
            [sys.executable, str(BASE_DIR / "manage.py"), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=BASE_DIR,
        )
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see {self.directory / name}.log"
                )

    def stop_all(self, wait: float = 20.0) -> None:
        # SIGTERM to django-q2's main process only (a signal to its whole
        # group can hang it), bounded wait, then SIGKILL the group.
        for _name, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + wait
        for _name, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.25,
    procs: Processes | None = None,
    what: str = "condition",
):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if procs is not None:
            procs.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


# --- Machine header and tables ---------------------------------------------------------


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min)"


def database_text() -> str:
    from django.db import connection

    if connection.vendor == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version} (WAL, IMMEDIATE)"
    max_age = connection.settings_dict["CONN_MAX_AGE"]
    return f"PostgreSQL {connection.pg_version // 10000} (CONN_MAX_AGE {max_age})"


def machine_lines(database: str, load_at_start: str) -> list[str]:
    from importlib.metadata import version

    return [
        f"machine   {os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}, Django {version('django')}, "
        f"django-q2 {version('django-q2')}",
        f"database  {database}",
        f"load      start {load_at_start}; end {load_text()}",
    ]


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = (len(data) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    if not values:
        return (math.nan, math.nan, math.nan)
    return (min(values), statistics.median(values), max(values))


def fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def fmt_spread(values: Sequence[float], digits: int = 2) -> str:
    return " / ".join(fmt(v, digits) for v in spread(values))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text (and Markdown-compatible) table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


CHART_KEY = "median (bar) and min-max (line)"
BAR_OURS = "#0969da"  # the last bar: what is measured against the others
WHISKER = "#24292f"


def bar_chart_svg(
    title: str,
    bars: Sequence[tuple[str, Sequence[float]]],
    *,
    unit: str,
    line: tuple[float, str] | None = None,
) -> str:
    """A horizontal bar chart as a standalone SVG: one bar per (label,
    values) at the median, a whisker from min to max, the median written at
    its end, and an optional dashed vertical line (value, label), e.g. a
    target. For the docs: people compare bars faster than table rows.
    Drawn with the dashboard's SVG helpers and colours (jobs/charts.py)."""
    from html import escape

    from jobs.charts import COLOURS, _open, _tag, _text

    label_w, chart_w, value_w, row_h, top = 330, 380, 90, 30, 50
    largest = max([max(values) for _, values in bars if values] + [line[0] if line else 0])
    scale = chart_w / (largest or 1)
    height = top + row_h * len(bars) + 26
    svg = _tag(
        "svg",
        xmlns="http://www.w3.org/2000/svg",
        width=label_w + chart_w + value_w,
        height=height,
        font_family="sans-serif",
    )
    parts = [_open(svg), _text(8, 20, title), _text(label_w, top - 8, f"{unit}, {CHART_KEY}")]
    for row, (label, values) in enumerate(bars):
        y = top + row * row_h
        low, median, high = spread(values)
        parts.append(_text(8, y + 19, label))
        if math.isnan(median):
            continue
        colour = COLOURS["axis"] if row < len(bars) - 1 else BAR_OURS
        bar = _tag("rect", x=label_w, y=y + 6, width=median * scale, height=18, fill=colour)
        hint = f"{label}: {low:.0f} / {median:.0f} / {high:.0f} {unit} (min / median / max)"
        parts += [
            f"{_open(bar)}<title>{escape(hint)}</title></rect>",
            _tag(
                "line",
                x1=label_w + low * scale,
                x2=label_w + high * scale,
                y1=y + 15,
                y2=y + 15,
                stroke=WHISKER,
                stroke_width=1.5,
            ),
            _text(label_w + max(median, high) * scale + 6, y + 19, f"{median:.0f}"),
        ]
    if line:
        x = label_w + line[0] * scale
        parts += [
            _tag(
                "line",
                x1=x,
                x2=x,
                y1=top,
                y2=height - 22,
                stroke=COLOURS["fail"],
                stroke_width=1.5,
                stroke_dasharray="5 3",
            ),
            _text(x, height - 8, line[1], anchor="middle"),
        ]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --- django-q2 baseline task functions -----------------------------------------------


def q2_timed_command(command: str, out: str, phase: str, intended: str | None = None) -> float:
    """A django-q2 task that records when it started, runs `command` like a
    Jobsite shell job (/bin/sh -c), and records the time the command printed
    (its own start, from `date +%s.%N`). One JSON line per call in `out`."""
    started = time.time()
    proc = subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE, check=False)
    first = proc.stdout.decode(errors="replace").strip().splitlines()
    child = float(first[0]) if first else None
    line = json.dumps({"phase": phase, "intended": intended, "started": started, "child": child})
    with open(out, "a") as f:
        f.write(line + "\n")
    return started


def q2_run_true() -> int:
    """The raw django-q2 baseline for throughput: the same subprocess, nothing else."""
    return subprocess.run(["true"], check=False).returncode


RECORD_TABLE = "bench_recorded_run"


def create_record_table() -> None:
    """The table of the "recorded" and "captured" throughput references: the
    least a run record can hold (status, three times, exit code, and the
    captured output). Same SQL on both engines."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {RECORD_TABLE} (id INTEGER PRIMARY KEY, "
            "status VARCHAR(10) NOT NULL, queued_at DOUBLE PRECISION NOT NULL, "
            "started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, exit_code INTEGER, "
            "output TEXT)"
        )


def q2_recorded_true(record_id: int) -> int:
    """The "recorded" throughput reference: raw django-q2 plus the least any
    run record costs. Claim the record (queued -> running, one UPDATE), run
    the same subprocess, store the outcome (one UPDATE). The enqueue inserted
    the record in the task's own transaction."""
    return _recorded(record_id, lambda: (subprocess.run(["true"], check=False).returncode, None))


def q2_captured_true(record_id: int) -> int:
    """The "captured" throughput reference: the "recorded" one, plus the
    least a scheduler that shows each run's output must do. The command
    starts the way Jobsite starts a shell job (its parent-death launcher,
    `/bin/sh -c`, a session of its own), its output is read from a pipe to
    the end, and the outcome's UPDATE stores it. No scratch directory, no
    environment of its own, no timeout or cancel watch, no log chunks,
    rollups, slots or alerts."""
    from jobs import execution

    def captured() -> tuple[int, str]:
        proc = subprocess.Popen(
            execution.with_parent_death_signal(["/bin/sh", "-c", "true"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with proc.stdout:
            output = proc.stdout.read()
        return proc.wait(), output.decode(errors="replace")

    return _recorded(record_id, captured)


def _recorded(record_id: int, command: Callable[[], tuple[int, str | None]]) -> int:
    """Claim the record, run `command` ((exit code, output)), store the outcome."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {RECORD_TABLE} SET status = 'running', started_at = %s "
            "WHERE id = %s AND status = 'queued'",
            [time.time(), record_id],
        )
        if cursor.rowcount != 1:
            return -1
        code, output = command()
        cursor.execute(
            f"UPDATE {RECORD_TABLE} SET status = %s, finished_at = %s, exit_code = %s, "
            "output = %s WHERE id = %s",
            ["succeeded" if code == 0 else "failed", time.time(), code, output, record_id],
        )
    return code


def session_cpu_seconds(session_id: int) -> float:
    """CPU seconds (user + system) used so far by the processes of a session
    (a process started with start_new_session=True leads one), including
    their reaped children: workers that were recycled, the jobs' `true`.
    Unlike runs/s this hardly moves when something else loads the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        # After the command name: state ppid pgrp session ... utime(12) stime cutime cstime
        if int(fields[3]) == session_id:
            total += sum(int(value) for value in fields[11:15])
    return total / ticks
