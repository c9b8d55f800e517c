"""Python and SQL jobs, artifacts, FTP delivery, secrets by reference: real
child processes, real databases, a real FTP server (pyftpdlib)."""

from __future__ import annotations

import csv
import io
import os
import threading
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import override_settings

from jobs import runlog, services
from jobs.models import Artifact, Job, Run
from tests.conftest import requires_postgres

quiet = {"echo": lambda text: None}


@pytest.fixture(autouse=True)
def media(tmp_path, settings):
    settings.MEDIA_ROOT = str(tmp_path / "media")


def run(job: Job) -> Run:
    return services.run_foreground(job=job, **quiet)


def artifact_text(run: Run, name: str) -> str:
    artifact = Artifact.objects.get(run=run, name=name)
    with artifact.file.open("rb") as f:
        return f.read().decode()


# --- Python jobs --------------------------------------------------------------------


def test_python_job_captures_print_logging_warnings_and_progress(make_job):
    job = make_job(kind="python", callable="jobs.demo.count_to", kwargs={"n": 3, "pause": 0})
    done = run(job)
    log = runlog.read_log(done)
    assert done.status == Run.Status.SUCCEEDED, log
    assert f"counting to 3 for run {done.pk} (attempt 1)" in log
    assert "INFO jobs.demo: reached 3" in log
    assert "UserWarning: demo warning: counting is done" in log
    assert "returned 3" in log
    assert (done.progress_done, done.progress_total, done.progress_message) == (3, 3, "counted 3")
    assert done.command == 'jobs.demo.count_to(**{"n": 3, "pause": 0})'


def test_python_exception_fails_with_the_traceback_and_its_last_line(make_job):
    job = make_job(kind="python", callable="jobs.demo.fail", kwargs={"message": "bad input"})
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert done.error_summary == "ValueError: bad input"
    log = runlog.read_log(done)
    assert "Traceback (most recent call last)" in log and "raise ValueError(message)" in log


def test_python_sys_exit_ends_the_run_as_it_would_end_python(make_job):
    """sys.exit() is success, sys.exit(3) exit code 3, sys.exit("message")
    prints the message and is a failure that says it."""

    def exit_with(status):
        job = make_job(kind="python", callable="tests.sample_jobs.exit_with", kwargs=status)
        return run(job)

    done = exit_with({})
    assert (done.status, done.exit_code) == (Run.Status.SUCCEEDED, 0), done.error_summary
    done = exit_with({"status": 3})
    assert (done.status, done.exit_code, done.error_summary) == ("failed", 3, "Exit code 3")
    done = exit_with({"status": "fatal: /etc/x is missing"})
    assert (done.status, done.exit_code) == (Run.Status.FAILED, 1)
    assert done.error_summary == "fatal: /etc/x is missing"
    assert "fatal: /etc/x is missing" in runlog.read_log(done)


def test_a_python_job_that_exits_by_itself_is_not_summed_up_by_its_last_print(make_job):
    job = make_job(
        kind="python",
        callable="tests.sample_jobs.print_then_exit",
        kwargs={"message": "all rows loaded", "code": 4},
    )
    done = run(job)
    assert (done.status, done.exit_code) == (Run.Status.FAILED, 4)
    assert done.error_summary == "Exit code 4"


def test_python_job_times_out_like_any_other(make_job):
    job = make_job(
        kind="python", callable="jobs.demo.count_to", kwargs={"n": 100, "pause": 1}, timeout=1
    )
    done = run(job)
    assert done.status == Run.Status.TIMED_OUT


def test_python_job_writes_artifacts(make_job):
    job = make_job(kind="python", callable="jobs.demo.write_report", kwargs={"rows": 2})
    done = run(job)
    assert done.status == Run.Status.SUCCEEDED, runlog.read_log(done)
    assert artifact_text(done, "report.csv") == "n,square\n0,0\n1,1\n"


def test_a_callable_that_cannot_be_imported_is_rejected_when_saved(make_job):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        make_job(kind="python", callable="jobs.demo.no_such_function")
    assert "jobs.demo has no attribute 'no_such_function'" in str(info.value)
    with pytest.raises(ValidationError) as info:
        make_job(kind="python", callable="nowhere.at_all")
    assert "Cannot import nowhere" in str(info.value)


# --- Shell jobs: artifacts and progress -----------------------------------------------------


def test_shell_job_files_in_the_artifacts_dir_are_collected(make_job):
    job = make_job(
        command='echo "a,b" > "$JOBSITE_ARTIFACTS_DIR/out.csv"; mkdir "$JOBSITE_ARTIFACTS_DIR/sub";'
        ' printf x > "$JOBSITE_ARTIFACTS_DIR/sub/x.txt"'
    )
    done = run(job)
    assert sorted(Artifact.objects.filter(run=done).values_list("name", "size")) == [
        ("out.csv", 4),
        ("sub/x.txt", 1),
    ]


def test_files_with_names_storage_refuses_are_kept_under_their_own_names(make_job):
    """Django's storage refuses "@@@" and "€", and a name that is not UTF-8
    cannot be stored in the database: the files are stored under made-up
    names, the run shows the real ones."""
    job = make_job(
        command='cd "$JOBSITE_ARTIFACTS_DIR"; printf 1 > @@@; printf 22 > €.txt;'
        " printf 333 > \"$(printf '\\377.csv')\""
    )
    done = run(job)
    assert done.status == Run.Status.SUCCEEDED, done.error_summary
    assert sorted(Artifact.objects.filter(run=done).values_list("name", "size")) == [
        ("@@@", 1),
        ("€.txt", 2),
        ("\ufffd.csv", 3),
    ]
    assert artifact_text(done, "\ufffd.csv") == "333"


def test_a_file_that_cannot_be_stored_fails_the_run_with_the_reason(make_job, monkeypatch):
    from django.core.files.storage import FileSystemStorage

    def broken(self, name, content):
        raise RuntimeError("storage is read-only")

    monkeypatch.setattr(FileSystemStorage, "_save", broken)
    done = run(make_job(command='echo a > "$JOBSITE_ARTIFACTS_DIR/a.txt"; echo done'))
    assert done.status == Run.Status.FAILED
    assert (
        done.error_summary == "Could not store the run's files: RuntimeError: storage is read-only"
    )
    assert "done" in runlog.read_log(done)


@pytest.mark.django_db(transaction=True)
@override_settings(JOBSITE_LEASE_SECONDS=2, JOBSITE_HEARTBEAT_SECONDS=0.5)
def test_storing_files_for_longer_than_the_lease_keeps_the_run_alive(make_job, monkeypatch):
    import time

    from django.core.files.storage import FileSystemStorage
    from django.utils import timezone

    save = FileSystemStorage._save

    def slow(self, name, content):  # a big file on a slow disk
        time.sleep(1.0)
        return save(self, name, content)

    monkeypatch.setattr(FileSystemStorage, "_save", slow)
    job = make_job(
        command='for i in 1 2 3 4; do echo $i > "$JOBSITE_ARTIFACTS_DIR/f$i"; done', retries=1
    )
    stop = threading.Event()

    def sweeper() -> None:
        try:
            while not stop.wait(0.3):
                services.sweep_lost(now=timezone.now())
        finally:
            connection.close()

    thread = threading.Thread(target=sweeper)
    thread.start()
    try:
        done = run(job)
    finally:
        stop.set()
        thread.join()
    assert done.status == Run.Status.SUCCEEDED, done.error_summary
    assert list(Run.objects.filter(job=job).values_list("status", flat=True)) == ["succeeded"]


@pytest.mark.parametrize("link", ["directory", "file", "subdirectory"])
def test_symlinks_in_the_artifacts_dir_are_not_followed(make_job, tmp_path, link):
    """A job can point its artifacts directory, or anything in it, at files
    it should not hand out (the worker's own)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    command = {
        "directory": f'rmdir "$JOBSITE_ARTIFACTS_DIR" && ln -s {outside} "$JOBSITE_ARTIFACTS_DIR"',
        "file": f'ln -s {outside}/passwd "$JOBSITE_ARTIFACTS_DIR/passwd"',
        "subdirectory": f'ln -s {outside} "$JOBSITE_ARTIFACTS_DIR/sub"',
    }[link]
    done = run(make_job(command=command))
    assert done.status == Run.Status.SUCCEEDED, done.error_summary
    assert not Artifact.objects.filter(run=done).exists()
    if link == "directory":
        assert "$JOBSITE_ARTIFACTS_DIR is no longer a directory" in runlog.read_log(done)


@pytest.fixture
def work_dir(tmp_path, settings) -> Path:
    """JOBSITE_WORK_DIR, empty, for the tests of kept scratch directories."""
    path = tmp_path / "work"
    path.mkdir()
    settings.JOBSITE_WORK_DIR = str(path)
    return path


def test_a_run_never_sees_the_files_of_the_run_before(make_job, work_dir):
    """Scratch directories are kept per worker process between runs (jobs.scratch):
    one that a run left files in is never handed to the next."""
    writer = make_job(
        name="writer",
        command='echo one > "$JOBSITE_ARTIFACTS_DIR/one.txt";'
        ' echo left > "$JOBSITE_ARTIFACTS_DIR/../left.txt"',
    )
    lister = make_job(
        name="lister", command='ls -A "$JOBSITE_ARTIFACTS_DIR" "$JOBSITE_ARTIFACTS_DIR/.."'
    )
    first = run(writer)
    second = run(lister)
    assert Artifact.objects.filter(run=first).count() == 1
    assert second.status == Run.Status.SUCCEEDED
    assert runlog.read_log(second).split() == [
        f"{second.environment['JOBSITE_ARTIFACTS_DIR']}:",
        f"{second.environment['JOBSITE_ARTIFACTS_DIR']}/..:",
        "artifacts",
    ]
    assert not Artifact.objects.filter(run=second).exists()


def test_the_work_dir_does_not_fill_up_with_scratch_directories(make_job, work_dir):
    quiet_job = make_job(name="quiet", command="true")
    noisy_job = make_job(name="noisy", command='echo x > "$JOBSITE_ARTIFACTS_DIR/x.txt"')
    for job in (quiet_job, noisy_job, quiet_job, noisy_job, quiet_job):
        assert run(job).status == Run.Status.SUCCEEDED
    # At most the one empty directory this process keeps for its next run.
    left = list(work_dir.iterdir())
    assert len(left) <= 1
    assert all(sorted(p.name for p in d.rglob("*")) == ["artifacts"] for d in left)


def test_a_process_a_run_left_behind_cannot_write_into_the_next_runs_artifacts(make_job, work_dir):
    """A process that escaped its run's group (setsid) writes to the run's
    artifacts directory after the run ended. The kept scratch directory has
    a new name by then, so the write fails instead of landing in the next
    run's artifacts."""
    leaver = make_job(
        name="leaver",
        command="setsid sh -c 'sleep 0.5; echo late > \"$JOBSITE_ARTIFACTS_DIR/late.txt\"'"
        " </dev/null >/dev/null 2>&1 &",
    )
    sleeper = make_job(name="sleeper", command="sleep 1.5")
    assert run(leaver).status == Run.Status.SUCCEEDED
    second = run(sleeper)
    assert second.status == Run.Status.SUCCEEDED
    assert not Artifact.objects.exists()
    assert not list(work_dir.rglob("late.txt"))


@pytest.mark.parametrize(
    "change",
    [
        'rmdir "$JOBSITE_ARTIFACTS_DIR" && ln -s "$TRAP" "$JOBSITE_ARTIFACTS_DIR"',
        'chmod 755 "$JOBSITE_ARTIFACTS_DIR/.."',
    ],
    ids=["artifacts replaced by a link", "scratch directory opened to others"],
)
def test_a_scratch_directory_a_run_changed_is_not_handed_on(make_job, work_dir, tmp_path, change):
    """Empty is not enough: a link in place of artifacts/ would send the next
    run's files elsewhere, and a directory opened to others would show them
    (an SQL job's connection file). Such a directory is removed, not kept."""
    trap = tmp_path / "trap"
    trap.mkdir()
    changer = make_job(name="changer", command=change, environment={"TRAP": str(trap)})
    writer = make_job(
        name="writer",
        command='echo b > "$JOBSITE_ARTIFACTS_DIR/b.txt"; stat -c %a "$JOBSITE_ARTIFACTS_DIR/.."',
    )
    assert run(changer).status == Run.Status.SUCCEEDED
    second = run(writer)
    assert second.status == Run.Status.SUCCEEDED
    assert artifact_text(second, "b.txt") == "b\n"
    assert not list(trap.iterdir())
    assert runlog.read_log(second) == "700\n"


def test_nul_bytes_and_huge_numbers_from_a_job_do_not_break_its_run(make_job):
    """PostgreSQL stores no NUL in text, and a progress count must fit a
    BIGINT: output and progress are stored with a NUL shown as U+FFFD, and a
    count too large is ignored, on every database."""
    job = make_job(
        command="printf 'a\\000b\\n'; printf '%s\\n' "
        '\'{"message": "m\\u0000n", "done": 100000000000000000000, "total": 5}\' '
        '> "/dev/fd/$JOBSITE_PROGRESS_FD"'
    )
    done = run(job)
    assert done.status == Run.Status.SUCCEEDED, done.error_summary
    assert runlog.read_log(done) == "a\ufffdb\n"
    assert (done.progress_message, done.progress_done, done.progress_total) == (
        "m\ufffdn",
        None,
        5,
    )


def test_shell_job_reports_progress_on_its_fd(make_job):
    # /dev/fd/N works in every shell (dash's ">&N" takes one digit only).
    job = make_job(
        command='echo \'{"done": 7, "total": 9, "message": "loading"}\' '
        '> "/dev/fd/$JOBSITE_PROGRESS_FD"'
    )
    done = run(job)
    assert (done.progress_done, done.progress_total, done.progress_message) == (7, 9, "loading")


# --- SQL jobs ---------------------------------------------------------------------------------

TEMP_TABLE_SQL = """
-- build a temp table, then export from it: needs one session
CREATE TEMP TABLE recent AS SELECT 1 AS id, 'alpha' AS name UNION ALL SELECT 2, 'beta, "quoted"';
INSERT INTO recent VALUES (3, 'gamma');
SELECT id, name FROM recent ORDER BY id;
"""


def test_sql_temp_table_survives_between_statements_and_becomes_a_csv(make_job):
    job = make_job(name="partner-export", kind="sql", database="default", sql=TEMP_TABLE_SQL)
    done = run(job)
    assert done.status == Run.Status.SUCCEEDED, runlog.read_log(done)
    assert done.rows == 3
    rows = list(csv.reader(io.StringIO(artifact_text(done, "partner-export.csv"))))
    assert rows == [["id", "name"], ["1", "alpha"], ["2", 'beta, "quoted"'], ["3", "gamma"]]
    assert "wrote 3 rows to partner-export.csv" in runlog.read_log(done)


def test_sql_jobs_connection_file_is_gone_after_the_run(make_job, work_dir):
    job = make_job(name="partner-export", kind="sql", database="default", sql="SELECT 1 AS one")
    assert run(job).status == Run.Status.SUCCEEDED
    assert not list(work_dir.rglob("sql-job.json"))


def test_sql_error_fails_with_the_databases_message_and_the_statement(make_job):
    job = make_job(
        kind="sql",
        database="default",
        sql="CREATE TEMP TABLE t AS SELECT 1 AS x;\nSELECT nope FROM t;",
    )
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert done.error_summary.startswith("SQL error in statement 2:")
    assert "nope" in done.error_summary
    assert "SELECT nope FROM t" in runlog.read_log(done)


def test_sql_job_on_a_url_from_the_environment(make_job, tmp_path, monkeypatch):
    import sqlite3

    path = tmp_path / "warehouse.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE orders (id INTEGER, total REAL)")
        db.executemany("INSERT INTO orders VALUES (?, ?)", [(1, 9.5), (2, 20.0)])
    monkeypatch.setenv("WAREHOUSE_URL", f"sqlite:///{path}")
    job = make_job(
        name="orders", kind="sql", database="WAREHOUSE_URL", sql="SELECT id, total FROM orders"
    )
    done = run(job)
    assert artifact_text(done, "orders.csv") == "id,total\r\n1,9.5\r\n2,20.0\r\n"


def test_sql_job_with_an_unknown_database_fails_before_it_starts(make_job):
    job = make_job(kind="sql", database="NOT_SET_URL", sql="SELECT 1")
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert "'NOT_SET_URL' is neither a DATABASES alias nor set" in done.error_summary


@pytest.mark.parametrize(
    "url",
    [
        "postgres://report:Sup3rS3cretPW@127.0.0.1:notaport/wh",
        "postgres://report:Sup3rS3cretPW@127.0.0.1:99999/wh",
        "postgres://report:Sup3r/S3cretPW@db.internal/wh",  # the port error quoted "Sup3r"
        "postgres://report:Sup3rS3cretPW@[::1/wh",
        "Sup3rS3cretPW is no URL at all",
    ],
)
def test_a_database_url_the_parser_rejects_fails_the_run_without_showing_it(
    make_job, monkeypatch, url
):
    import warnings

    monkeypatch.setenv("WH_URL", url)
    job = make_job(kind="sql", database="WH_URL", sql="SELECT 1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = run(job)
    assert done.status == Run.Status.FAILED
    assert done.error_summary == "Not started: WH_URL is not a valid database URL"
    shown = done.error_summary + runlog.read_log(done) + "".join(str(w.message) for w in caught)
    assert "Sup3r" not in shown


@pytest.fixture
def warehouse(tmp_path, monkeypatch) -> Path:
    """A SQLite database in $WH_URL with a table t holding one row."""
    import sqlite3

    path = tmp_path / "warehouse.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER, v TEXT)")
        db.execute("INSERT INTO t VALUES (1, 'keep')")
    db.close()
    monkeypatch.setenv("WH_URL", f"sqlite:///{path}")
    return path


def test_a_failed_sqlite_script_keeps_none_of_its_changes(make_job, warehouse):
    """Python's sqlite3 commits before DDL unless told otherwise: the DROP
    and the CREATE were kept although the script failed."""
    import sqlite3

    sql = "DROP TABLE t;\nCREATE TABLE t2 AS SELECT 1 AS x;\nSELECT nosuch FROM t2;"
    done = run(make_job(kind="sql", database="WH_URL", sql=sql))
    assert done.status == Run.Status.FAILED
    assert done.error_summary == "SQL error in statement 3: no such column: nosuch"
    with sqlite3.connect(warehouse) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]
        assert db.execute("SELECT v FROM t").fetchall() == [("keep",)]
    db.close()


def test_a_sqlite_url_to_a_missing_file_fails_and_creates_no_database(
    make_job, tmp_path, monkeypatch
):
    missing = tmp_path / "typo.sqlite3"
    monkeypatch.setenv("WH_URL", f"sqlite:///{missing}")
    done = run(make_job(kind="sql", database="WH_URL", sql="SELECT 1 AS one"))
    assert done.status == Run.Status.FAILED
    assert done.error_summary == f"cannot open {missing}: the file does not exist"
    assert not missing.exists()


def test_a_database_that_refuses_the_connection_fails_with_one_line_saying_so(
    make_job, monkeypatch
):
    """Not a traceback ending in libpq's hint "Is the server running...?"."""
    monkeypatch.setenv("WH_URL", "postgres://report:Sup3rS3cretPW@127.0.0.1:1/wh")
    done = run(make_job(kind="sql", database="WH_URL", sql="SELECT 1"))
    assert (done.status, done.exit_code) == (Run.Status.FAILED, 1)
    assert done.error_summary.startswith("cannot connect to 127.0.0.1:1/wh: "), done.error_summary
    assert "refused" in done.error_summary
    log = runlog.read_log(done)
    assert "Traceback" not in log and "Sup3r" not in log + done.error_summary


def test_an_error_while_the_rows_are_fetched_names_the_statement_and_leaves_no_csv(make_job):
    """The last statement's errors can come while its rows stream into the
    CSV (a division by zero at row 60,000, a timeout): half a CSV is no
    result."""
    if connection.vendor == "postgresql":
        last = "SELECT g, 1 / (g - 60000) FROM generate_series(1, 100000) AS g"
        reason = "division by zero"
    else:  # endless rows, stopped by the statement timeout
        last = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
        reason = "statement timeout (1 s) exceeded"
    job = make_job(
        kind="sql", database="default", sql=f"SELECT 1;\n{last}", statement_timeout=1, timeout=30
    )
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert done.error_summary == f"SQL error in statement 2: {reason}"
    assert "Traceback" not in runlog.read_log(done)
    assert not Artifact.objects.filter(run=done).exists()


def test_sql_values_are_written_as_text_not_as_python_sees_them(make_job):
    if connection.vendor == "postgresql":
        sql = (
            "SELECT '\\x00ff'::bytea AS b, '{\"k\": [1, \"é\"]}'::jsonb AS j, ARRAY[1, 2] AS a,"
            " interval '1 day 2 hours 3.5 seconds' AS iv, interval '-90 minutes' AS neg, 1.5 AS n"
        )
        expected = ["\\x00ff", '{"k": [1, "é"]}', "[1, 2]", "P1DT2H3.5S", "-PT1H30M", "1.5"]
    else:
        sql = "SELECT X'00FF' AS b, '{\"k\": [1, \"é\"]}' AS j, 1.5 AS n"
        expected = ["\\x00ff", '{"k": [1, "é"]}', "1.5"]
    done = run(make_job(name="values", kind="sql", database="default", sql=sql))
    assert done.status == Run.Status.SUCCEEDED, done.error_summary
    rows = list(csv.reader(io.StringIO(artifact_text(done, "values.csv"))))
    assert rows[1] == expected


@pytest.mark.parametrize(
    "statement, streams",
    [
        ("SELECT * FROM t", True),
        ("-- the export\nWITH a AS (SELECT 1) SELECT * FROM a", True),
        ("(SELECT g FROM generate_series(1, 9) g) UNION ALL (SELECT 0)", True),
        ("VALUES (1), (2)", True),
        ("TABLE t", True),
        ("SELECT 1 AS a INTO TEMP newt", False),  # DECLARE refuses it
        ("INSERT INTO t VALUES (1) RETURNING *", False),
        ("WITH a AS (SELECT 1) DELETE FROM t RETURNING *", False),
    ],
)
def test_which_last_statements_stream_from_a_postgresql_cursor(statement, streams):
    from jobs.runners.sql_job import _declarable

    assert _declarable(statement) is streams


@requires_postgres
def test_a_postgresql_script_may_end_with_select_into_or_a_parenthesized_select(make_job):
    done = run(make_job(kind="sql", database="default", sql="SELECT 1 AS a INTO TEMP newt"))
    assert done.status == Run.Status.SUCCEEDED, done.error_summary
    assert "no CSV written" in runlog.read_log(done)
    sql = "(SELECT g FROM generate_series(1, 3) AS g) UNION ALL (SELECT 0) ORDER BY 1"
    done = run(make_job(name="paren", kind="sql", database="default", sql=sql))
    assert done.status == Run.Status.SUCCEEDED, done.error_summary
    assert artifact_text(done, "paren.csv") == "g\r\n0\r\n1\r\n2\r\n3\r\n"


def test_sql_statement_timeout(make_job):
    if connection.vendor == "postgresql":
        sql = "SELECT pg_sleep(5)"
    else:  # a long recursive count
        sql = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        )
    job = make_job(kind="sql", database="default", sql=sql, statement_timeout=1, timeout=30)
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert "statement" in done.error_summary and "timeout" in done.error_summary.lower()


@pytest.mark.slow
def test_a_large_sql_result_streams_with_bounded_memory(make_job):
    """1,000,000 rows go to the CSV without holding them in memory: the
    child's peak RSS stays far below the size of the result."""
    if connection.vendor == "postgresql":
        sql = "SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 1000000) AS g"
    else:
        sql = (
            "WITH RECURSIVE c(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM c WHERE id < 1000000) "
            "SELECT id, hex(randomblob(16)) AS h FROM c"
        )
    job = make_job(
        name="big",
        kind="sql",
        database="default",
        sql=sql,
        timeout=300,
        command="",
    )
    # Measure the child's peak memory with a wrapper that reports it.
    done = run(job)
    assert done.status == Run.Status.SUCCEEDED, runlog.read_log(done)
    assert done.rows == 1_000_000
    artifact = Artifact.objects.get(run=done)
    assert artifact.size > 30_000_000  # ~ 41 bytes a row
    peak = [line for line in runlog.read_log(done).splitlines() if "peak memory" in line]
    assert peak, "the SQL runner did not report its peak memory"
    peak_mb = float(peak[0].split("peak memory ")[1].split(" MB")[0])
    assert peak_mb < 60, f"child peak RSS {peak_mb} MB for a {artifact.size / 1e6:.0f} MB result"


# --- Secrets by reference ---------------------------------------------------------------------


def test_unresolved_secret_fails_the_run_before_it_starts(make_job):
    job = make_job(command="echo started", environment={"PW": "${NOT_THERE_PASSWORD}"})
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert done.error_summary.startswith("Not started: PW refers to ${NOT_THERE_PASSWORD}")
    assert "started" not in runlog.read_log(done)


def test_unresolved_delivery_password_fails_before_it_starts(make_job):
    job = make_job(
        command="echo would-upload",
        deliver_url="ftp://reports@127.0.0.1:2121/incoming",
        deliver_password="${NO_SUCH_FTP_PASSWORD}",
    )
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert "NO_SUCH_FTP_PASSWORD" in done.error_summary
    assert "would-upload" not in runlog.read_log(done)


# --- FTP delivery ---------------------------------------------------------------------------------


@pytest.fixture
def ftp_server(tmp_path):
    """A real FTP server (pyftpdlib) on 127.0.0.1 with user reports/s3cret-ftp."""
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    root = tmp_path / "ftp"
    (root / "incoming").mkdir(parents=True)
    authorizer = DummyAuthorizer()
    authorizer.add_user("reports", "s3cret-ftp", str(root), perm="elradfmw")

    class Handler(FTPHandler):
        pass

    Handler.authorizer = authorizer
    Handler.passive_ports = range(60000, 60100)
    server = FTPServer(("127.0.0.1", 0), Handler)
    port = server.socket.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        # Closed from this thread only: close_all() from the test's thread
        # pulled the sockets from under a poll still running here (EBADF,
        # an "unhandled thread exception" warning some runs later).
        while not stop.is_set():
            server.serve_forever(timeout=0.1, blocking=False)
        server.close_all()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield {"port": port, "root": root}
    stop.set()
    thread.join()


def test_sql_csv_is_uploaded_to_ftp_and_the_log_says_so(make_job, ftp_server, monkeypatch):
    monkeypatch.setenv("FTP_PASSWORD", "s3cret-ftp")
    job = make_job(
        name="partner-export",
        kind="sql",
        database="default",
        sql=TEMP_TABLE_SQL,
        deliver_url=f"ftp://reports@127.0.0.1:{ftp_server['port']}/incoming",
        deliver_password="${FTP_PASSWORD}",
    )
    done = run(job)
    log = runlog.read_log(done)
    assert done.status == Run.Status.SUCCEEDED, log
    uploaded = ftp_server["root"] / "incoming" / "partner-export.csv"
    assert uploaded.read_text().splitlines()[0] == "id,name"
    assert f"uploaded partner-export.csv ({uploaded.stat().st_size:,} bytes)" in log
    assert "s3cret-ftp" not in log


def test_ftp_failure_fails_the_run_with_the_reason_after_bounded_retries(
    make_job, ftp_server, monkeypatch
):
    monkeypatch.setenv("FTP_PASSWORD", "wrong-password")
    job = make_job(
        command='echo hi > "$JOBSITE_ARTIFACTS_DIR/a.txt"',
        deliver_url=f"ftp://reports@127.0.0.1:{ftp_server['port']}/incoming",
        deliver_password="${FTP_PASSWORD}",
        deliver_retries=1,
        deliver_timeout=5,
    )
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert done.error_summary.startswith(
        f"Upload to ftp://reports@127.0.0.1:{ftp_server['port']}/incoming failed:"
    )
    assert "530" in done.error_summary  # the server's "login incorrect"
    log = runlog.read_log(done)
    assert log.count("upload attempt") == 2
    assert "wrong-password" not in log
    # The file is still there to download.
    assert Artifact.objects.filter(run=done, name="a.txt").exists()


def test_a_job_whose_upstream_failed_never_uploads(make_job, ftp_server, monkeypatch):
    monkeypatch.setenv("FTP_PASSWORD", "s3cret-ftp")
    load = make_job(name="load", command="exit 1")
    export = make_job(
        name="export",
        command='echo data > "$JOBSITE_ARTIFACTS_DIR/data.csv"',
        deliver_url=f"ftp://reports@127.0.0.1:{ftp_server['port']}/incoming",
        deliver_password="${FTP_PASSWORD}",
    )
    export.upstreams.add(load)
    run(load)
    gated = run(export)
    assert gated.status == Run.Status.SKIPPED
    assert not (ftp_server["root"] / "incoming" / "data.csv").exists()


@pytest.fixture
def silent_ftp(make_job, monkeypatch):
    """A job uploading to a server that accepts the TCP connection and never
    says hello (a hung or firewalled one): make(**delivery fields) -> Job."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    monkeypatch.setenv("FTP_PASSWORD", "x")

    def make(**fields) -> Job:
        return make_job(
            command='echo hi > "$JOBSITE_ARTIFACTS_DIR/a.txt"',
            deliver_url=f"ftp://reports@127.0.0.1:{listener.getsockname()[1]}/",
            deliver_password="${FTP_PASSWORD}",
            **fields,
        )

    yield make
    listener.close()


def test_ftp_server_that_does_not_answer_times_out(silent_ftp):
    import time

    job = silent_ftp(deliver_retries=0, deliver_timeout=1)
    started = time.monotonic()
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert "timed out" in done.error_summary.lower()
    assert time.monotonic() - started < 10


def test_a_delivery_port_out_of_range_is_refused_and_fails_a_stored_job_clearly(make_job):
    with pytest.raises(ValidationError) as refused:
        make_job(deliver_url="ftp://reports@127.0.0.1:99999/incoming")
    assert refused.value.message_dict["deliver_url"] == [
        "The port must be a number from 1 to 65535."
    ]
    job = make_job(command='echo hi > "$JOBSITE_ARTIFACTS_DIR/a.txt"')
    Job.objects.filter(pk=job.pk).update(deliver_url="ftp://reports@127.0.0.1:99999/incoming")
    job.refresh_from_db()
    done = run(job)
    assert done.status == Run.Status.FAILED  # not left "running" until the sweeper calls it lost
    assert done.error_summary == (
        "Cannot upload to ftp://reports@127.0.0.1:99999/incoming: "
        "The port must be a number from 1 to 65535."
    )


def test_a_delivery_password_with_a_line_break_fails_the_run_with_the_reason(
    make_job, ftp_server, monkeypatch
):
    monkeypatch.setenv("FTP_PASSWORD", "s3cret-ftp\n")  # read from a file, newline and all
    job = make_job(
        command='echo hi > "$JOBSITE_ARTIFACTS_DIR/a.txt"',
        deliver_url=f"ftp://reports@127.0.0.1:{ftp_server['port']}/incoming",
        deliver_password="${FTP_PASSWORD}",
        deliver_retries=0,
    )
    done = run(job)
    assert done.status == Run.Status.FAILED
    assert done.error_summary.startswith(
        f"Upload to ftp://reports@127.0.0.1:{ftp_server['port']}/incoming failed: ValueError"
    )
    assert "s3cret-ftp" not in done.error_summary + runlog.read_log(done)


@pytest.mark.django_db(transaction=True)
@override_settings(JOBSITE_LEASE_SECONDS=2, JOBSITE_HEARTBEAT_SECONDS=0.5)
def test_a_slow_upload_keeps_its_run_alive_and_a_cancel_stops_it(silent_ftp):
    """An upload can outlast the lease (a slow or hung server): the run keeps
    heartbeating meanwhile, so the sweeper does not call it lost; a cancel
    asked during the upload stops it."""
    import time

    from django.utils import timezone

    job = silent_ftp(deliver_retries=1, deliver_timeout=2)
    stop = threading.Event()
    cancel_at: list[float] = []

    def sweeper() -> None:
        try:
            while not stop.wait(0.3):
                services.sweep_lost(now=timezone.now())
                if cancel_at and time.monotonic() >= cancel_at[0]:
                    running = Run.objects.filter(job=job, status=Run.Status.RUNNING).first()
                    if running:
                        services.run_cancel(run=running, by=None)
                        cancel_at.clear()
        finally:
            connection.close()

    thread = threading.Thread(target=sweeper)
    thread.start()
    try:
        slow = run(job)  # two tries of 2 s each and a pause: longer than the lease
        cancel_at.append(time.monotonic() + 1.0)
        cancelled = run(job)
    finally:
        stop.set()
        thread.join()
    assert slow.status == Run.Status.FAILED, slow.error_summary
    assert "timed out" in slow.error_summary.lower()
    assert runlog.read_log(slow).count("upload attempt") == 2
    assert cancelled.status == Run.Status.CANCELLED, cancelled.error_summary


@override_settings(JOBSITE_LOG_FLUSH_BYTES=16)
def test_delivery_password_is_redacted_even_if_the_job_prints_it(make_job, monkeypatch):
    monkeypatch.setenv("FTP_PASSWORD", "pw-that-leaks")
    job = make_job(
        command='echo "debug: $FTP_PASSWORD"',
        environment={"FTP_PASSWORD": "${FTP_PASSWORD}"},
        deliver_url="ftp://reports@127.0.0.1:1/",
        deliver_password="${FTP_PASSWORD}",
    )
    done = run(job)
    assert "pw-that-leaks" not in runlog.read_log(done)
    assert "pw-that-leaks" not in str(done.environment)
    assert os.environ["FTP_PASSWORD"] == "pw-that-leaks"
    assert Path  # noqa: B018
