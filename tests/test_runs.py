"""The run lifecycle against the real database."""

from __future__ import annotations

import time

import pytest
from django.conf import settings
from django.test import override_settings

from jobs import runlog, services
from jobs.models import SECRET_MASK, Job, Run, RunLogChunk

quiet = {"echo": lambda text: None}


def test_foreground_run_records_status_exit_code_worker_and_log(make_job):
    job = make_job(command="echo out; echo err >&2; exit 3")
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.FAILED
    assert run.exit_code == 3
    # The summary adds the last line the job printed: usually the error.
    assert run.error_summary == "Exit code 3: err"
    assert run.trigger == Run.Trigger.CLI
    assert run.worker.endswith(f":{__import__('os').getpid()}")
    assert run.started_at and run.finished_at and run.finished_at >= run.started_at
    assert runlog.read_log(run) == "out\nerr\n[jobsite] Exit code 3\n"


@pytest.mark.parametrize(
    ("command", "summary"),
    [
        # The error a script prints last says more than its exit code.
        (
            'echo "connecting"; echo "error:  table orders is locked  " >&2; exit 3',
            "Exit code 3: error: table orders is locked",
        ),
        (
            'echo "token $TOKEN refused"; echo; echo "   "; exit 4',
            "Exit code 4: token •••••• refused",
        ),
        ("exit 5", "Exit code 5"),
        ("python3 -c \"print('x' * 5000)\"; exit 6", "Exit code 6: " + "x" * 199 + "…"),
    ],
)
def test_a_failed_shell_runs_summary_quotes_its_last_line(make_job, command, summary):
    job = make_job(command=command, environment={"TOKEN": "tok-7c1d"}, secret_keys=["TOKEN"])
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.FAILED
    assert run.error_summary == summary
    # The log's own note stays the bare exit code: the line is just above it.
    assert runlog.read_log(run).endswith(f"[jobsite] {summary.split(':')[0]}\n")


def test_child_gets_its_run_context_in_the_environment(make_job):
    job = make_job(
        name="ctx",
        command='echo "$JOBSITE_RUN_ID|$JOBSITE_JOB|$JOBSITE_SCHEDULED_FOR|'
        '$JOBSITE_ATTEMPT|$TARGET"',
        environment={"TARGET": "reports"},
    )
    run = services.run_foreground(job=job, **quiet)
    assert runlog.read_log(run) == (f"{run.pk}|ctx|{run.scheduled_for.isoformat()}|1|reports\n")
    assert run.environment["JOBSITE_RUN_ID"] == str(run.pk)
    assert run.environment["TARGET"] == "reports"


def test_secret_values_are_masked_in_the_stored_environment_and_redacted_from_the_log(
    make_job, monkeypatch
):
    monkeypatch.setenv("API_TOKEN", "tok-9f8e7d6c")
    job = make_job(
        command='echo "token is $TOKEN"',
        environment={"TOKEN": "${API_TOKEN}"},
        secret_keys=["TOKEN"],
    )
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.SUCCEEDED
    assert run.environment["TOKEN"] == "••••••"
    assert "tok-9f8e7d6c" not in runlog.read_log(run)
    assert runlog.read_log(run) == "token is ••••••\n"


def test_a_secret_in_a_progress_message_or_printed_without_its_newline_is_masked(make_job):
    """The run page shows the progress message, so it is masked as the log
    is; and a value ending in a newline is also masked as `$(...)` prints it."""
    job = make_job(
        command='printf \'{"message": "token is %s"}\\n\' "$TOKEN"'
        ' > "/dev/fd/$JOBSITE_PROGRESS_FD"; printf "[%s]\\n" "$(printenv KEY)"',
        environment={"TOKEN": "tok-1a2b3c4d", "KEY": "key-5e6f7a8b\n"},
        secret_keys=["TOKEN", "KEY"],
    )
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.SUCCEEDED
    assert run.progress_message == "token is ••••••"
    assert runlog.read_log(run) == "[••••••]\n"


def test_a_secret_printed_url_encoded_json_escaped_or_in_base64_is_masked(make_job):
    """Jobs print passwords inside URLs (percent-encoded), JSON (escaped) and
    as base64; each form is the secret all the same."""
    secret = 'p@ss w/rd:"x"'
    job = make_job(
        command=(
            "python3 -c \"import json, os, urllib.parse as u; t = os.environ['DB_PASSWORD'];"
            " print('postgres://etl:' + u.quote(t, safe='') + '@db/x');"
            " print('q=' + u.quote_plus(t)); print(json.dumps({'password': t}))\";"
            ' printf %s "$DB_PASSWORD" | base64'
        ),
        environment={"DB_PASSWORD": secret},
        secret_keys=["DB_PASSWORD"],
    )
    run = services.run_foreground(job=job, **quiet)

    log = runlog.read_log(run)
    assert run.status == Run.Status.SUCCEEDED, log
    assert log == ('postgres://etl:••••••@db/x\nq=••••••\n{"password": "••••••"}\n••••••\n')


def test_a_python_jobs_summary_is_its_last_line_even_with_secrets(make_job):
    """The last characters of output are held back until the output ends, in
    case they begin a secret; the failure's summary still sees them."""
    job = make_job(
        kind=Job.Kind.PYTHON,
        command="",
        callable="jobs.demo.fail",
        kwargs={"message": "bad input"},
        environment={"TOKEN": "a-rather-long-secret-value-1234"},
        secret_keys=["TOKEN"],
    )
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.FAILED
    assert run.error_summary == "ValueError: bad input"


def test_a_job_that_redirects_its_own_output_runs_to_its_end(make_job):
    """`exec >file 2>&1` closes the pipe Jobsite reads; the job goes on
    running and is waited for, not killed."""
    job = make_job(command="echo start; exec >/dev/null 2>&1; sleep 1; exit 3")
    run = services.run_foreground(job=job, **quiet)
    assert (run.status, run.exit_code) == (Run.Status.FAILED, 3)
    assert run.duration().total_seconds() >= 1
    assert runlog.read_log(run).startswith("start\n")


def test_a_flood_on_the_progress_fd_does_not_hold_off_the_timeout(make_job):
    job = make_job(command='yes \'{"done": 1}\' > "/dev/fd/$JOBSITE_PROGRESS_FD"', timeout=1)
    started = time.monotonic()
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.TIMED_OUT
    assert time.monotonic() - started < 1 + settings.JOBSITE_KILL_GRACE + 2
    assert run.progress_done == 1


def test_a_progress_line_nested_too_deep_is_ignored(make_job):
    job = make_job(
        command='python3 -c "print(\'[\' * 50000)" > "/dev/fd/$JOBSITE_PROGRESS_FD";'
        " echo still-here"
    )
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.SUCCEEDED, run.error_summary
    assert runlog.read_log(run) == "still-here\n"


def test_after_a_flood_the_tail_keeps_about_its_cap(make_job):
    """The tail is trimmed by whole chunks; a flood's one big chunk must not
    go at once and leave only the last lines before a failure."""
    job = make_job(command='seq 1 300000; sleep 1.2; echo "FATAL: disk full"; exit 1')
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.FAILED
    tail = sum(RunLogChunk.objects.filter(run=run, is_head=False).values_list("size", flat=True))
    cap, piece = settings.JOBSITE_LOG_TAIL_BYTES, settings.JOBSITE_LOG_FLUSH_BYTES
    assert cap - piece <= tail <= cap
    ending = "299999\n300000\nFATAL: disk full\n[jobsite] Exit code 1\n"
    assert runlog.read_log(run).endswith(ending)


def test_unresolved_reference_fails_the_run_before_it_starts(make_job):
    job = make_job(command="echo should-not-run", environment={"PW": "${NOPE_NOT_SET}"})
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.FAILED
    assert "PW refers to ${NOPE_NOT_SET}" in run.error_summary
    assert "should-not-run" not in runlog.read_log(run)


def test_timeout_marks_the_run_timed_out(make_job):
    job = make_job(command="sleep 30", timeout=1)
    run = services.run_foreground(job=job, **quiet)
    assert run.status == Run.Status.TIMED_OUT
    assert "Timed out after 1s" in run.error_summary


def test_overlapping_run_is_skipped_with_reason(make_job):
    job = make_job()
    first = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    second = services.run_create(job=job, trigger=Run.Trigger.SCHEDULE, here=True)
    assert second.status == Run.Status.SKIPPED
    assert second.error_summary == f"run #{first.pk} still queued"


def test_claim_under_skip_takes_the_slot_and_a_second_claim_is_skipped(make_job):
    job = make_job()
    first = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    assert services.run_claim(run_id=first.pk, worker="w:1") is not None
    # A run that got past the creation check (e.g. created by a race).
    sneaky = Run.objects.create(
        job=job, trigger="manual", scheduled_for=first.scheduled_for, queued_at=first.queued_at
    )
    assert services.run_claim(run_id=sneaky.pk, worker="w:2") is None
    sneaky.refresh_from_db()
    assert sneaky.status == Run.Status.SKIPPED
    assert sneaky.error_summary == f"run #{first.pk} still running"


def test_on_postgresql_a_claim_is_one_statement_and_takes_the_slot(make_job):
    """PostgreSQL: the run's claim, its job's slot and the read of both are one
    round trip (it was five: SELECT, BEGIN, UPDATE, UPDATE, COMMIT). The
    claimed run and job are what the ORM would load."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's data-modifying WITH; SQLite claims in one short transaction")
    job = make_job()
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    with CaptureQueriesContext(connection) as captured:
        claimed = services.run_claim(run_id=run.pk, worker="w:1")
    assert [q["sql"][:16] for q in captured] == ["WITH claimed AS "]
    loaded = Run.objects.select_related("job").get(pk=run.pk)
    assert loaded.status == claimed.status == Run.Status.RUNNING
    for field in Run._meta.concrete_fields:
        assert getattr(claimed, field.attname) == getattr(loaded, field.attname), field.name
    for field in Job._meta.concrete_fields:
        if field.attname != "active_run_id":  # read as it was before the claim took it
            assert getattr(claimed.job, field.attname) == getattr(loaded.job, field.attname)
    assert loaded.job.active_run_id == run.pk
    assert services.run_claim(run_id=run.pk, worker="w:2") is None


def test_a_redelivered_task_finds_nothing_to_claim(make_job):
    job = make_job()
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    assert services.run_claim(run_id=run.pk, worker="w:1") is not None
    assert services.run_claim(run_id=run.pk, worker="w:2") is None
    run.refresh_from_db()
    assert run.worker == "w:1"


def test_finishing_frees_the_slot_for_the_next_run(make_job):
    job = make_job()
    run = services.run_foreground(job=job, **quiet)
    assert Job.objects.get(pk=job.pk).active_run_id is None
    again = services.run_foreground(job=job, **quiet)
    assert again.status == Run.Status.SUCCEEDED and again.pk != run.pk


def test_the_job_keeps_the_outcome_of_its_newest_ended_run(make_job):
    """The overview reads a job's health off the job row: the status of
    its newest run (by id, as in the run strip) that ran to an end."""
    job = make_job(overlap=Job.Overlap.ALLOW)
    oldest, older, newest = (
        services.run_claim(
            run_id=services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True).pk,
            worker="w:1",
        )
        for _ in range(3)
    )
    services.run_finish(run=newest, status=Run.Status.SUCCEEDED, exit_code=0)
    job.refresh_from_db()
    assert (job.last_end_status, job.last_end_run_id) == (Run.Status.SUCCEEDED, newest.pk)

    # Older runs end last: the newest run's outcome stands, whether the
    # job row is written by the success path or by the alerts' path.
    services.run_finish(run=older, status=Run.Status.SUCCEEDED, exit_code=0)
    job.refresh_from_db()
    assert (job.last_end_status, job.last_end_run_id) == (Run.Status.SUCCEEDED, newest.pk)
    services.run_finish(run=oldest, status=Run.Status.FAILED, exit_code=1)
    job.refresh_from_db()
    assert (job.last_end_status, job.last_end_run_id) == (Run.Status.SUCCEEDED, newest.pk)
    assert job.alert_state == Job.AlertState.FAILING  # the failure still counted

    # A skip says nothing about health; the next run that ends does.
    job.overlap = Job.Overlap.SKIP
    job.save()
    running = services.run_claim(
        run_id=services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True).pk,
        worker="w:1",
    )
    skipped = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    assert skipped.status == Run.Status.SKIPPED
    job.refresh_from_db()
    assert job.last_end_run_id == newest.pk
    services.run_finish(run=running, status=Run.Status.SUCCEEDED, exit_code=0)
    job.refresh_from_db()
    assert (job.last_end_status, job.last_end_run_id) == (Run.Status.SUCCEEDED, running.pk)
    assert job.alert_state == Job.AlertState.OK


def test_the_migration_fills_in_each_jobs_latest_outcome(make_job):
    import importlib

    from django.apps import apps

    backfill = importlib.import_module("jobs.migrations.0006_job_last_end").backfill
    job, idle = make_job(name="busy"), make_job(name="idle")
    at = job.created_at
    runs = {
        status: Run.objects.create(
            job=job, trigger="manual", scheduled_for=at, queued_at=at, status=status
        )
        for status in (Run.Status.FAILED, Run.Status.SUCCEEDED, Run.Status.SKIPPED, "queued")
    }

    backfill(apps, None)

    job.refresh_from_db()
    idle.refresh_from_db()
    succeeded = runs[Run.Status.SUCCEEDED].pk
    assert (job.last_end_status, job.last_end_run_id) == (Run.Status.SUCCEEDED, succeeded)
    assert (idle.last_end_status, idle.last_end_run_id) == ("", None)


def test_the_claim_reads_the_run_and_its_job_as_the_orm_does(make_job):
    """The claim's SELECT is compiled once per process (services._queued_run):
    every field of the run and of its job comes back as the ORM loads it,
    JSON, booleans and aware datetimes included."""
    job = make_job(
        environment={"TARGET": "reports", "N": "1"},
        secret_keys=["N"],
        tags="nightly, billing",
        overlap=Job.Overlap.ALLOW,
        enabled=True,
    )
    queued = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    expected_run = Run.objects.get(pk=queued.pk)
    expected_job = Job.objects.get(pk=job.pk)

    claimed = services.run_claim(run_id=queued.pk, worker="w:1")

    for field in Run._meta.concrete_fields:
        if field.name not in ("status", "started_at", "heartbeat_at", "worker"):
            name = field.attname
            assert getattr(claimed, name) == getattr(expected_run, name), name
    for field in Job._meta.concrete_fields:
        name = field.attname
        assert getattr(claimed.job, name) == getattr(expected_job, name), name
    assert claimed.job.environment == {"TARGET": "reports", "N": "1"}
    assert claimed.queued_at.tzinfo is not None and claimed.job.enabled is True
    assert not claimed._state.adding and claimed.job._state.db == "default"
    assert services.run_claim(run_id=queued.pk, worker="w:2") is None  # no longer queued


def test_a_created_run_is_stored_as_the_orm_would_store_it(make_job, make_user):
    """run_create's INSERT is written out (services._insert_run): every field
    reads back as the instance it returned holds it, for a dispatched run
    and a skipped one, user, aware datetimes and JSON included."""
    from datetime import UTC, datetime

    job = make_job(overlap=Job.Overlap.SKIP)
    user = make_user()
    at = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)
    queued = services.run_create(job=job, trigger=Run.Trigger.MANUAL, by=user, scheduled_for=at)
    skipped = services.run_create(job=job, trigger=Run.Trigger.MANUAL, rerun_of=queued)
    assert skipped.status == Run.Status.SKIPPED and f"#{queued.pk}" in skipped.error_summary
    for made in (queued, skipped):
        stored = Run.objects.get(pk=made.pk)
        for field in Run._meta.concrete_fields:
            name = field.attname
            assert getattr(stored, name) == getattr(made, name), name
        assert not made._state.adding and made._state.db == "default"
    stored = Run.objects.get(pk=queued.pk)
    assert stored.scheduled_for == at and stored.triggered_by == user
    assert stored.environment == {} and stored.enqueue_count == 1 and stored.attempt == 1
    assert Run.objects.get(pk=skipped.pk).rerun_of == queued


@override_settings(TIME_ZONE="Europe/Berlin")
def test_a_naive_time_is_stored_as_the_orm_stores_it(make_job):
    """The written-out INSERT takes a naive datetime in TIME_ZONE, with
    Django's warning, as the ORM does, not as UTC."""
    from datetime import UTC, datetime

    job = make_job()
    noon = datetime(2026, 1, 15, 12, 0)
    with pytest.warns(RuntimeWarning, match="naive datetime"):
        ours = services.run_create(job=job, trigger=Run.Trigger.MANUAL, scheduled_for=noon)
    with pytest.warns(RuntimeWarning, match="naive datetime"):
        orms = Run.objects.create(
            job=job, trigger=Run.Trigger.MANUAL, scheduled_for=noon, queued_at=ours.queued_at
        )
    stored = Run.objects.get(pk=ours.pk).scheduled_for
    assert stored == Run.objects.get(pk=orms.pk).scheduled_for
    assert stored.astimezone(UTC).hour == 11


def test_only_djangos_own_plain_fields_skip_their_preparation():
    """A field class that prepares its value (a subclass of a plain one)
    goes through get_db_prep_save, as with the ORM."""
    from django.db import models

    class Upper(models.CharField):
        def get_prep_value(self, value):
            return super().get_prep_value(value).upper()

    assert services._value_kind(models.CharField(max_length=5)) == "as is"
    assert services._value_kind(Upper(max_length=5)) == "prepare"
    assert services._value_kind(models.DateTimeField()) == "datetime"
    assert services._value_kind(models.JSONField()) == "prepare"
    assert services._value_kind(Run._meta.get_field("job")) == "as is"


def test_rerun_keeps_the_logical_time_and_links_the_original(make_job, make_user):
    job = make_job()
    original = services.run_foreground(job=job, **quiet)
    user = make_user()
    rerun = services.run_rerun(run=original, by=user)
    assert rerun.trigger == Run.Trigger.RERUN
    assert rerun.rerun_of == original
    assert rerun.scheduled_for == original.scheduled_for
    assert rerun.triggered_by == user


def test_enqueued_run_executes_through_django_q(
    make_job, q_sync, django_capture_on_commit_callbacks
):
    job = make_job(command="echo via-django-q")
    with django_capture_on_commit_callbacks(execute=True):
        run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert runlog.read_log(run) == "via-django-q\n"


@override_settings(
    JOBSITE_LOG_HEAD_BYTES=1000, JOBSITE_LOG_TAIL_BYTES=3000, JOBSITE_LOG_FLUSH_BYTES=500
)
def test_log_is_capped_keeping_head_and_tail_with_a_marker(make_job):
    job = make_job(command="seq 1 20000")  # 108,894 bytes
    run = services.run_foreground(job=job, **quiet)
    text = runlog.read_log(run)
    assert run.log_bytes == 108894
    stored = sum(RunLogChunk.objects.filter(run=run).values_list("size", flat=True))
    assert stored <= 1000 + 3000
    assert run.log_dropped_bytes == 108894 - stored
    assert text.startswith("1\n2\n3\n")
    assert text.endswith("19999\n20000\n")
    assert f"[… {run.log_dropped_bytes:,} bytes of output dropped here (log cap) …]" in text


@override_settings(
    JOBSITE_LOG_HEAD_BYTES=1000, JOBSITE_LOG_TAIL_BYTES=3000, JOBSITE_LOG_FLUSH_BYTES=500
)
def test_a_capped_log_of_multibyte_text_accounts_for_every_byte(make_job):
    """Past the head, a flood is trimmed in memory piece by piece: the bytes
    dropped plus the bytes stored are exactly the bytes printed."""
    job = make_job(command="seq 1 20000 | sed 's/^/grüße /'")
    run = services.run_foreground(job=job, **quiet)
    printed = sum(len(f"grüße {n}\n".encode()) for n in range(1, 20001))
    run.refresh_from_db()
    assert run.log_bytes == printed
    stored = sum(RunLogChunk.objects.filter(run=run).values_list("size", flat=True))
    assert stored <= 1000 + 3000
    assert run.log_dropped_bytes == printed - stored
    text = runlog.read_log(run)
    assert text.startswith("grüße 1\ngrüße 2\n")
    assert text.endswith("grüße 19999\ngrüße 20000\n")


def test_multibyte_characters_split_across_reads_survive(make_job):
    job = make_job(command="printf 'gr\\303'; sleep 0.2; printf '\\274\\303\\237e\\n'")
    run = services.run_foreground(job=job, **quiet)
    assert runlog.read_log(run) == "grüße\n"


@pytest.mark.parametrize("bad", [{"schedule": "every day"}, {"timezone": "Berlin"}, {"timeout": 0}])
def test_job_validation_names_the_field(make_job, bad):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        make_job(**bad)
    assert list(info.value.message_dict) == list(bad)


# --- What every run costs the database (issue 6: throughput) ---------------------

_BOOKKEEPING = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK")


def _statements(captured) -> list[str]:
    """The data statements of a capture, without transaction bookkeeping."""
    sqls = [q["sql"] for q in captured.captured_queries]
    return [s for s in sqls if not s.upper().startswith(_BOOKKEEPING)]


def test_a_worker_runs_a_quiet_job_in_seven_statements(make_job):
    """Claim (2), record the process (1), finish with slot, rollup and alert
    counters (4): a silent successful run of a job that allows overlap.
    Before the issue-6 work the same run took 15 statements in 4 transactions."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import tasks

    job = make_job(command="true", overlap=Job.Overlap.ALLOW)
    first = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    tasks.execute_run(first.pk)  # the day's rollup row exists from here on
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    with CaptureQueriesContext(connection) as captured:
        assert tasks.execute_run(run.pk) == Run.Status.SUCCEEDED
    statements = _statements(captured)
    assert len(statements) <= 7, "\n".join(statements)
    run.refresh_from_db()
    assert run.command == "true" and run.pid and run.environment["JOBSITE_RUN_ID"] == str(run.pk)
    job.refresh_from_db()
    assert job.active_run_id is None and job.last_success_at == run.finished_at


def _waiting_behind(run: Run) -> Run:
    """A run of the same job waiting for its slot (queued, not yet sent)."""
    return Run.objects.create(
        job=run.job,
        trigger=Run.Trigger.MANUAL,
        status=Run.Status.QUEUED,
        queued_at=run.queued_at,
        scheduled_for=run.queued_at,
    )


def test_a_success_asks_for_waiting_runs_and_downstreams_in_one_statement(make_job):
    """A job that does not allow overlap must ask, after a success, whether
    a run of it waits and which jobs run after it: one round trip, not two
    (on PostgreSQL every statement is one). Both answers still act."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import tasks

    job = make_job(command="true", overlap=Job.Overlap.QUEUE)
    after = make_job(slug="after", command="true", trigger_on_upstream=True)
    after.upstreams.add(job)
    tasks.execute_run(services.run_create(job=job, trigger=Run.Trigger.MANUAL).pk)
    assert Run.objects.filter(job=after).count() == 1  # triggered once
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    waiting = _waiting_behind(run)
    with CaptureQueriesContext(connection) as captured:
        assert tasks.execute_run(run.pk) == Run.Status.SUCCEEDED
    # The two questions (written out in services._sql; on PostgreSQL part of
    # the outcome's one statement), before anything acts on them.
    asks = [
        s
        for s in _statements(captured)
        if s.startswith(
            ('SELECT 1 FROM "jobs_run"', "SELECT -1 ", "SELECT from_job_id ", "WITH finished")
        )
    ]
    assert len(asks) == 1, asks
    assert "jobs_run" in asks[0] and "jobs_job_upstreams" in asks[0], asks[0]
    waiting.refresh_from_db()
    assert waiting.enqueued_at is not None  # sent to the workers once the slot was free
    assert Run.objects.filter(job=after).count() == 2


def test_on_postgresql_a_success_and_its_consequences_are_one_statement(make_job):
    """PostgreSQL: the log's last chunk, the outcome, the day's rollup, the
    job row and the two questions after a success (a waiting run?
    downstream jobs?) are one statement: one round trip, not five. What
    they decide still happens: counts, slot, the waiting run, the downstream."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import stats, tasks

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's data-modifying WITH")
    job = make_job(command="echo hi", overlap=Job.Overlap.QUEUE)
    after = make_job(slug="after", command="true", trigger_on_upstream=True)
    after.upstreams.add(job)
    first = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    assert tasks.execute_run(first.pk) == Run.Status.SUCCEEDED  # the day's row: created
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    waiting = _waiting_behind(run)
    with CaptureQueriesContext(connection) as captured:
        assert tasks.execute_run(run.pk) == Run.Status.SUCCEEDED
    sqls = _statements(captured)
    outcome = [s for s in sqls if s.startswith("WITH ") and " finished AS (UPDATE" in s]
    assert len(outcome) == 1, sqls
    # The log's last chunk ("hi") is inserted by that same statement.
    assert outcome[0].startswith('WITH logged AS (INSERT INTO "jobs_runlogchunk"'), outcome
    assert not [s for s in sqls if s.startswith('INSERT INTO "jobs_runlogchunk"')], sqls
    rollups = [s for s in sqls if s.startswith('UPDATE "jobs_jobdailystats" SET "succeeded"')]
    assert not rollups, sqls  # (the downstream's own skip is counted apart)
    assert not [s for s in sqls if "consecutive_failures" in s and s.startswith("UPDATE")], sqls
    run.refresh_from_db()
    job.refresh_from_db()
    waiting.refresh_from_db()
    assert runlog.read_log(run) == "hi\n" and run.log_bytes == 3
    assert job.active_run_id is None and job.last_success_at == run.finished_at
    assert job.last_end_run_id == run.pk and job.last_end_status == Run.Status.SUCCEEDED
    assert stats.JobDailyStats.objects.get(job=job).succeeded == 2
    assert waiting.enqueued_at is not None
    assert Run.objects.filter(job=after).count() == 2


def test_a_success_of_a_failing_job_on_a_new_day_is_counted_and_clears_the_alert(make_job):
    """The rare branches of a success (every database): no rollup row for the
    day yet, and a job that was failing flips back to ok."""
    from jobs import stats, tasks

    job = make_job(command="exit 1", overlap=Job.Overlap.ALLOW)
    assert tasks.execute_run(services.run_create(job=job, trigger="manual").pk) == "failed"
    job.refresh_from_db()
    assert job.alert_state == Job.AlertState.FAILING and job.consecutive_failures == 1
    stats.JobDailyStats.objects.filter(job=job).delete()  # as at midnight
    Job.objects.filter(pk=job.pk).update(command="true")
    job.refresh_from_db()
    run = services.run_create(job=job, trigger="manual")
    assert tasks.execute_run(run.pk) == Run.Status.SUCCEEDED
    job.refresh_from_db()
    run.refresh_from_db()
    assert job.alert_state == Job.AlertState.OK and job.consecutive_failures == 0
    assert job.last_success_at == run.finished_at and job.last_end_run_id == run.pk
    day = stats.JobDailyStats.objects.get(job=job)
    assert (day.succeeded, day.failed, day.executed) == (1, 0, 1)


def _outer_transactions(run_pk: int):
    """Run `run_pk` in a worker, noting for each statement the outermost
    transaction it ran in (None: autocommit)."""
    from django.db import connection

    from jobs import tasks

    base = len(connection.atomic_blocks)  # the test's own wrapper, if any
    seen: list[tuple[str, object]] = []  # the block itself: an id() could be reused

    def note(execute, sql, params, many, context):
        blocks = connection.atomic_blocks
        seen.append((sql, blocks[base] if len(blocks) > base else None))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(note):
        status = tasks.execute_run(run_pk)
    return status, [(sql, outer) for sql, outer in seen if not sql.upper().startswith(_BOOKKEEPING)]


def test_a_printing_run_stores_its_last_output_with_its_outcome(make_job):
    """The last chunk of a run's log is written in the outcome's transaction:
    on SQLite one turn at the write lock less for every run that prints."""
    job = make_job(command="echo hi; exit 3", overlap=Job.Overlap.ALLOW)
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    status, statements = _outer_transactions(run.pk)
    assert status == Run.Status.FAILED
    writes = [(sql, outer) for sql, outer in statements if not sql.startswith("SELECT")]
    # Outside a transaction only PostgreSQL's claim, one statement (atomic by itself).
    alone = [sql for sql, outer in writes if outer is None]
    assert all(sql.startswith("WITH claimed AS") for sql in alone), alone
    chunk = next(outer for sql, outer in writes if "jobs_runlogchunk" in sql)
    outcome = next(outer for sql, outer in writes if '"finished_at" =' in sql)
    assert chunk is outcome
    units = {id(outer) for _sql, outer in writes if outer is not None} | set(alone)
    assert len(units) == 2  # the claim; the outcome with its log
    run.refresh_from_db()
    assert runlog.read_log(run) == "hi\n[jobsite] Exit code 3\n"
    assert run.log_bytes == 3 and run.exit_code == 3


def test_an_outcome_the_database_refused_once_is_stored_once_with_its_whole_log(
    transactional_db, make_job, monkeypatch
):
    """The database fails the outcome's transaction (a restart): the worker
    tries again, and the log is neither lost nor doubled."""
    from django.db import OperationalError

    from jobs import stats

    job = make_job(command="echo one; echo two; exit 4", overlap=Job.Overlap.ALLOW)
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    real = stats.record_finished
    failures = []

    def refuse_once(finished):
        if not failures:
            failures.append(finished.pk)
            raise OperationalError("server closed the connection unexpectedly")
        return real(finished)

    monkeypatch.setattr(stats, "record_finished", refuse_once)
    from jobs import tasks

    assert tasks.execute_run(run.pk) == Run.Status.FAILED
    assert failures == [run.pk]
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.error_summary == "Exit code 4: two"
    assert runlog.read_log(run) == "one\ntwo\n[jobsite] Exit code 4\n"
    assert run.log_bytes == len("one\ntwo\n")
    assert list(RunLogChunk.objects.filter(run=run).values_list("seq", flat=True)) == [1]


def test_run_now_writes_the_run_and_its_task_in_one_transaction(make_job):
    """With the ORM broker the task row is part of the run's transaction: a
    rollback leaves neither a run nor a task behind."""
    from django.db import transaction
    from django_q.conf import Conf
    from django_q.models import OrmQ

    if Conf.ORM != "default":
        pytest.skip("the ORM broker is not in use (REDIS_URL is set)")
    job = make_job(command="true", overlap=Job.Overlap.ALLOW)
    tasks_before = OrmQ.objects.count()
    with pytest.raises(RuntimeError), transaction.atomic():
        services.run_create(job=job, trigger=Run.Trigger.MANUAL)
        assert OrmQ.objects.count() == tasks_before + 1  # written inside
        raise RuntimeError("the caller fails after creating the run")
    assert OrmQ.objects.count() == tasks_before
    assert not Run.objects.filter(job=job).exists()
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    assert run.enqueued_at is not None and run.enqueue_count == 1
    assert OrmQ.objects.count() == tasks_before + 1


def test_runs_are_sent_through_one_broker_per_queue(make_job, monkeypatch):
    """async_task builds a broker for every task unless given one (with Redis
    a new client): a process sends every run of a queue through one."""
    import django_q.brokers
    from django_q.conf import Conf
    from django_q.models import OrmQ

    if Conf.ORM != "default":
        pytest.skip("the ORM broker is not in use (REDIS_URL is set)")
    made = []
    real = django_q.brokers.get_broker
    monkeypatch.setattr(
        django_q.brokers, "get_broker", lambda key=None: made.append(key) or real(key)
    )
    monkeypatch.setattr(services, "_brokers", {})
    plain = make_job(command="true", overlap=Job.Overlap.ALLOW)
    etl = make_job(slug="etl-load", command="true", overlap=Job.Overlap.ALLOW, queue="etl")
    for job in (plain, etl, plain, etl, plain):
        services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    assert made == [None, "etl"]
    assert OrmQ.objects.filter(key=Conf.CLUSTER_NAME).count() == 3
    assert OrmQ.objects.filter(key="etl").count() == 2


def test_a_worker_does_not_ping_the_database_before_each_run(
    transactional_db, make_job, monkeypatch
):
    """django-q2 resets Django's connection health check before every task,
    which on PostgreSQL is a SELECT 1 round trip per run. The worker trusts
    its kept connection instead (see the next test for a dropped one)."""
    from django.db import close_old_connections, connection

    from jobs import tasks

    job = make_job(command="true", overlap=Job.Overlap.ALLOW)
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    assert connection.health_check_enabled
    pings = []
    real = connection.is_usable
    monkeypatch.setattr(connection, "is_usable", lambda: pings.append(1) or real())
    close_old_connections()  # what django-q2 does before a task
    assert tasks.execute_run(run.pk) == Run.Status.SUCCEEDED
    assert pings == []


def test_a_worker_whose_connection_the_server_dropped_reconnects_and_runs(
    transactional_db, make_job
):
    """The server ends the worker's connection between two tasks (a restart,
    an idle timeout): the claim fails once, reconnects, and the run runs."""
    import psycopg2
    from django.db import close_old_connections, connection

    from jobs import tasks

    if connection.vendor != "postgresql":
        pytest.skip("needs a database server to drop the connection")
    job = make_job(command="echo ran", overlap=Job.Overlap.ALLOW)
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL)
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    other = psycopg2.connect(**connection.get_connection_params())
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        other.commit()
    finally:
        other.close()
    close_old_connections()  # what django-q2 does before a task
    assert tasks.execute_run(run.pk) == Run.Status.SUCCEEDED
    run.refresh_from_db()
    assert runlog.read_log(run) == "ran\n"
    assert connection.connection.info.backend_pid != pid


def test_a_secret_printed_in_two_pieces_is_still_redacted(make_job):
    """The job prints its secret in two writes, so the worker reads it in two
    pieces (as at a 64 KiB boundary of a long output): the log, the live
    view and the terminal echo see the mask, never the secret or a piece
    of it run together."""
    first, rest = "${TOKEN%????}", "${TOKEN#????}"
    job = make_job(
        command=(
            f"printf 'token: %s' \"{first}\"; sleep 0.3; printf '%s done\\n' \"{rest}\"; exit 3"
        ),
        environment={"TOKEN": "hunter22"},
        secret_keys=["TOKEN"],
    )
    echoed: list[str] = []
    run = services.run_foreground(job=job, trigger=Run.Trigger.MANUAL, echo=echoed.append)
    assert run.status == Run.Status.FAILED
    log = runlog.read_log(run)
    assert log == f"token: {SECRET_MASK} done\n[jobsite] Exit code 3\n"
    assert "".join(echoed) == log  # nothing held back at the end, the note included
    assert run.log_bytes == len("token: hunter22 done\n")


def test_secrets_fed_a_byte_at_a_time_are_masked_and_nothing_else_changes(make_job):
    """The worst split: every byte its own read, with a secret inside another
    and multibyte text around them. What is stored is the whole output with
    each secret masked, as if it had come in one piece."""
    job = make_job()
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    secrets = ["pässwörd-42", "wörd"]
    text = "grüße pässwörd-42 und wörd, dann pässwörd-4 (kein Geheimnis) wö\n"
    writer = runlog.RunLogWriter(run, redact=secrets)
    for byte in text.encode():
        writer.feed(bytes([byte]))
    writer.close()
    run.refresh_from_db()
    expected = text.replace("pässwörd-42", SECRET_MASK).replace("wörd", SECRET_MASK)
    assert runlog.read_log(run) == expected
    assert run.log_bytes == len(text.encode())
