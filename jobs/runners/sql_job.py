"""Run a SQL job's script in one database session (child process).

    python -m jobs.runners.sql_job CONFIG.json

CONFIG holds the connection settings, the script, the statement timeout and
the CSV file name. Statements run in order on one connection (temporary
tables live on); the last statement's rows are streamed into the CSV (a
server-side cursor on PostgreSQL, lazy iteration on SQLite: a million rows
never sit in memory). A database error prints the message and the statement
it came from, and exits 1. Progress and the row count go to
$JOBSITE_PROGRESS_FD.
"""

from __future__ import annotations

import csv
import json
import resource
import sys
import time
from pathlib import Path

import sqlparse

from jobs.context import _send

BATCH = 5000
DEADLINE = {"at": 0.0}  # SQLite: when the running statement must stop


def statements(script: str) -> list[str]:
    """The script's statements, without empty ones and comment-only ones."""
    result = []
    for raw in sqlparse.split(script):
        text = sqlparse.format(raw, strip_comments=True).strip().rstrip(";").strip()
        if text:
            result.append(raw.strip())
    return result


def connect(db: dict, timeout: float | None):
    engine = db["ENGINE"]
    if engine.endswith("sqlite3"):
        import sqlite3

        conn = sqlite3.connect(db["NAME"], timeout=20)
        if timeout:
            # SQLite has no statement timeout: abort from its progress handler.
            def guard() -> int:
                return 1 if DEADLINE["at"] and time.monotonic() > DEADLINE["at"] else 0

            conn.set_progress_handler(guard, 10_000)
        return conn, "sqlite"
    if "postgres" in engine:
        import psycopg2

        conn = psycopg2.connect(
            dbname=db["NAME"],
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
        )
        if timeout:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", [int(timeout * 1000)])
        return conn, "postgres"
    raise SystemExit(f"jobsite: SQL jobs support PostgreSQL and SQLite, not {engine}")


def run(config: dict) -> int:
    script = statements(config["sql"])
    if not script:
        print("jobsite: the SQL script has no statements", file=sys.stderr)
        return 2
    timeout = config.get("statement_timeout")
    conn, flavour = connect(config["db"], timeout)
    total = len(script)
    cursor = None
    for number, statement in enumerate(script, start=1):
        last = number == total
        first_line = statement.splitlines()[0][:100]
        print(f"-- statement {number}/{total}: {first_line}")
        _send({"done": number - 1, "total": total, "message": f"statement {number}/{total}"})
        if flavour == "sqlite" and timeout:
            DEADLINE["at"] = time.monotonic() + timeout
        try:
            cursor = _cursor(conn, flavour, statement, last)
            cursor.execute(statement)
        except Exception as exc:  # the driver's own error types differ
            conn.rollback()
            message = str(exc).strip() or type(exc).__name__
            if flavour == "sqlite" and "interrupted" in message and timeout:
                message = f"statement timeout ({timeout:g} s) exceeded"
            print(f"ERROR in statement {number}: {message}", file=sys.stderr)
            print(f"-- the statement was:\n{statement}", file=sys.stderr)
            print(f"SQL error in statement {number}: {message.splitlines()[0]}", file=sys.stderr)
            return 1
    named = getattr(cursor, "name", None) is not None  # server-side: columns after a fetch
    rows = _export(cursor, Path(config["csv_path"])) if named or cursor.description else None
    conn.commit()
    conn.close()
    print(f"-- peak memory {_peak_rss_mb():.1f} MB")
    if rows is None:
        print("-- the last statement returned no rows: no CSV written")
    else:
        print(f"-- wrote {rows:,} rows to {Path(config['csv_path']).name}")
        _send({"rows": rows, "done": total, "total": total, "message": f"{rows:,} rows"})
    return 0


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux
    carries the high-water mark of the process image replaced by exec (here
    the whole worker) into it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cursor(conn, flavour: str, statement: str, last: bool):
    if last and flavour == "postgres" and sqlparse.parse(statement)[0].get_type() == "SELECT":
        cursor = conn.cursor(name="jobsite_export")  # server-side: streams
        cursor.itersize = BATCH
        return cursor
    return conn.cursor()


def _export(cursor, path: Path) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        first = cursor.fetchmany(BATCH)
        # A server-side cursor knows its columns only after the first fetch.
        writer.writerow([col[0] for col in cursor.description])
        batch = first
        while batch:
            writer.writerows(batch)
            rows += len(batch)
            if rows % (BATCH * 20) == 0:
                _send({"rows": rows, "message": f"{rows:,} rows"})
            batch = cursor.fetchmany(BATCH)
    return rows


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        config = json.load(f)
    return run(config)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main(sys.argv))
