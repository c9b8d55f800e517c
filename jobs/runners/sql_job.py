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

import contextlib
import csv
import json
import re
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import sqlparse

from jobs.context import _send
from jobs.runners import report_failure

BATCH = 5000
DEADLINE = {"at": 0.0}  # SQLite: when the running statement must stop
CONVERTED = (bytes, bytearray, memoryview, dict, list, timedelta)  # see _csv_value


def statements(script: str) -> list[str]:
    """The script's statements, without empty ones and comment-only ones."""
    result = []
    for raw in sqlparse.split(script):
        text = sqlparse.format(raw, strip_comments=True).strip().rstrip(";").strip()
        if text:
            result.append(raw.strip())
    return result


class CannotConnect(Exception):
    """The database could not be opened; the message says which and why."""


def connect(db: dict, timeout: float | None):
    engine = db["ENGINE"] or ""
    if engine.endswith("sqlite3"):
        return _connect_sqlite(db["NAME"], timeout), "sqlite"
    if "postgres" in engine:
        return _connect_postgres(db, timeout), "postgres"
    raise CannotConnect(f"SQL jobs support PostgreSQL and SQLite, not {engine or 'this URL'}")


def _connect_sqlite(path: str, timeout: float | None):
    import sqlite3

    if path == ":memory:":
        conn = sqlite3.connect(path, isolation_level=None)
    elif not Path(path).is_file():
        # sqlite3.connect would create it: a typo in the URL is an empty database.
        raise CannotConnect(f"cannot open {path}: the file does not exist")
    else:
        try:
            conn = sqlite3.connect(
                f"file:{quote(path)}?mode=rw", uri=True, timeout=20, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise CannotConnect(f"cannot open {path}: {exc}") from None
    # Python's sqlite3 commits before DDL in its default mode: a failed
    # script would keep the tables it dropped or created. One explicit
    # transaction, committed or rolled back by run().
    conn.execute("BEGIN")
    if timeout:
        # SQLite has no statement timeout: abort from its progress handler.
        def guard() -> int:
            return 1 if DEADLINE["at"] and time.monotonic() > DEADLINE["at"] else 0

        conn.set_progress_handler(guard, 10_000)
    return conn


def _connect_postgres(db: dict, timeout: float | None):
    import psycopg2

    try:
        conn = psycopg2.connect(
            dbname=db["NAME"],
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
        )
    except psycopg2.Error as exc:
        # libpq's message goes on with hints ("Is the server running..."):
        # its first line is the reason.
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        if db.get("PASSWORD"):
            reason = reason.replace(str(db["PASSWORD"]), "********")
        where = f"{db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}/{db['NAME']}"
        raise CannotConnect(f"cannot connect to {where}: {reason}") from None
    if timeout:
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = %s", [int(timeout * 1000)])
    return conn


def run(config: dict) -> int:
    script = statements(config["sql"])
    if not script:
        return _fail("jobsite: the SQL script has no statements", code=2)
    timeout = config.get("statement_timeout")
    csv_path = Path(config["csv_path"])
    try:
        conn, flavour = connect(config["db"], timeout)
    except CannotConnect as exc:
        return _fail(str(exc))
    total = len(script)
    rows = None
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
            # A server-side cursor knows its columns only after a fetch.
            named = getattr(cursor, "name", None) is not None
            if last and (named or cursor.description):
                rows = _export(cursor, csv_path)  # its rows come now: so can its errors
            if last:
                conn.commit()
        except Exception as exc:  # the driver's own error types differ
            with contextlib.suppress(Exception):  # the connection may be gone with it
                conn.rollback()
            csv_path.unlink(missing_ok=True)  # half a CSV must not pass for the result
            return _statement_failed(number, statement, exc, flavour, timeout)
    conn.close()
    print(f"-- peak memory {_peak_rss_mb():.1f} MB")
    if rows is None:
        print("-- the last statement returned no rows: no CSV written")
    else:
        print(f"-- wrote {rows:,} rows to {csv_path.name}")
        _send({"rows": rows, "done": total, "total": total, "message": f"{rows:,} rows"})
    return 0


def _statement_failed(
    number: int, statement: str, exc: Exception, flavour: str, timeout: float | None
) -> int:
    message = str(exc).strip() or type(exc).__name__
    if flavour == "sqlite" and "interrupted" in message and timeout:
        message = f"statement timeout ({timeout:g} s) exceeded"
    print(f"ERROR in statement {number}: {message}", file=sys.stderr)
    print(f"-- the statement was:\n{statement}", file=sys.stderr)
    return _fail(f"SQL error in statement {number}: {message.splitlines()[0]}")


def _fail(summary: str, *, code: int = 1) -> int:
    print(summary, file=sys.stderr)
    report_failure(summary)
    return code


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
    if last and flavour == "postgres" and _declarable(statement):
        cursor = conn.cursor(name="jobsite_export")  # server-side: streams
        cursor.itersize = BATCH
        return cursor
    return conn.cursor()


def _declarable(statement: str) -> bool:
    """Whether PostgreSQL can declare a cursor for the statement, so its rows
    stream: a SELECT (WITH in front, in parentheses or not), VALUES or
    TABLE; not SELECT ... INTO, which makes a table. INSERT ... RETURNING
    cannot be declared: its rows are fetched at once."""
    text = sqlparse.format(statement, strip_comments=True).lstrip("( \t\r\n")
    parsed = sqlparse.parse(text)[0]
    if parsed.get_type() == "SELECT":
        return "INTO" not in (token.normalized for token in parsed.tokens if token.is_keyword)
    return re.match(r"(VALUES|TABLE)\b", text, re.IGNORECASE) is not None


def _export(cursor, path: Path) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        first = cursor.fetchmany(BATCH)
        # A server-side cursor knows its columns only after the first fetch.
        writer.writerow([col[0] for col in cursor.description])
        batch = first
        while batch:
            writer.writerows(map(_csv_row, batch))
            rows += len(batch)
            if rows % (BATCH * 20) == 0:
                _send({"rows": rows, "message": f"{rows:,} rows"})
            batch = cursor.fetchmany(BATCH)
    return rows


def _csv_row(row: tuple) -> list:
    return [_csv_value(v) if isinstance(v, CONVERTED) else v for v in row]


def _csv_value(value):
    """A value as text a spreadsheet or a loader can read, not Python's repr:
    binary as \\x and hex (PostgreSQL's bytea output), JSON and arrays as
    JSON, an interval as an ISO 8601 duration."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, timedelta):
        return _iso_duration(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _iso_duration(value: timedelta) -> str:
    sign, value = ("-", -value) if value < timedelta(0) else ("", value)
    minutes, seconds = divmod(value.seconds, 60)
    hours, minutes = divmod(minutes, 60)
    second = f"{seconds}.{value.microseconds:06d}".rstrip("0").rstrip(".")
    clock = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n)
    clock += f"{second}S" if seconds or value.microseconds else ""
    day = f"{value.days}D" if value.days else ""
    if not day and not clock:
        return "PT0S"
    return f"{sign}P{day}" + (f"T{clock}" if clock else "")


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        config = json.load(f)
    return run(config)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main(sys.argv))
