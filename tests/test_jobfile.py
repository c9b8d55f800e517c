"""Job files: manage.py loadjobs FILE [--prune] and manage.py dumpjobs."""

from __future__ import annotations

import io
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from django.core.management import call_command
from django.utils import timezone

from jobs.jobfile import format_duration, parse_duration
from jobs.models import Job

WAREHOUSE = """
[[job]]
name = "warehouse-export"
description = "Nightly export for finance."
owner = "data-ops"
tags = ["etl", "finance"]
command = "python3 /srv/etl/export.py --day \\"$JOBSITE_SCHEDULED_FOR\\""
schedule = "15 2 * * *"
timezone = "Europe/Berlin"
timeout = "45m"
overlap = "skip"
queue = "etl"
env = { FTP_PASSWORD = "${FTP_PASSWORD}", TARGET = "reports" }
secret_env = ["FTP_PASSWORD"]
enabled = false
"""


def write(tmp_path: Path, text: str, name: str = "jobs.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def loadjobs(*args: str) -> tuple[int, str, str]:
    """call_command("loadjobs", ...) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("loadjobs", *map(str, args), stdout=out, stderr=err)
    except SystemExit as exc:
        return exc.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def dumpjobs(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("dumpjobs", *map(str, args), stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


# --- Loading ------------------------------------------------------------------------


def test_loadjobs_creates_jobs_with_the_files_fields(db, tmp_path):
    path = write(tmp_path, WAREHOUSE + '\n[[job]]\nname = "Say Hello"\ncommand = "echo hi"\n')

    code, out, _err = loadjobs(path)

    assert code == 0
    assert "2 created, 0 updated, 0 unchanged, 0 pruned" in out
    job = Job.objects.get(name="warehouse-export")
    assert job.slug == "warehouse-export"
    assert job.description == "Nightly export for finance."
    assert job.owner == "data-ops"
    assert job.tag_list == ["etl", "finance"]
    assert job.command == 'python3 /srv/etl/export.py --day "$JOBSITE_SCHEDULED_FOR"'
    assert (job.schedule, job.timezone) == ("15 2 * * *", "Europe/Berlin")
    assert job.timeout == 45 * 60
    assert job.queue == "etl"
    assert job.environment == {"FTP_PASSWORD": "${FTP_PASSWORD}", "TARGET": "reports"}
    assert job.secret_keys == ["FTP_PASSWORD"]
    assert job.enabled is False
    assert job.source == str(path.resolve())
    hello = Job.objects.get(name="Say Hello")
    assert (hello.slug, hello.schedule, hello.timezone, hello.enabled) == (
        "say-hello",
        "",
        "UTC",
        True,
    )


def test_loading_the_same_file_twice_changes_nothing(db, tmp_path):
    path = write(tmp_path, WAREHOUSE.replace("enabled = false", "enabled = true"))
    loadjobs(path)
    # The scheduler's state, as its next tick would leave it.
    Job.objects.update(next_fire_at=timezone.now(), fire_basis="15 2 * * *|Europe/Berlin")
    before = Job.objects.values("updated_at", "next_fire_at", "fire_basis").get()

    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 0 updated, 1 unchanged, 0 pruned" in out
    assert Job.objects.values("updated_at", "next_fire_at", "fire_basis").get() == before


def test_a_changed_field_updates_the_job_and_says_which_key(db, tmp_path):
    path = write(tmp_path, WAREHOUSE)
    loadjobs(path)
    before = Job.objects.get().updated_at
    write(tmp_path, WAREHOUSE.replace('"45m"', '"2h"').replace("TARGET", "DESTINATION"))

    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 1 updated, 0 unchanged" in out
    assert "warehouse-export (timeout, env)" in out
    job = Job.objects.get()
    assert job.timeout == 7200
    assert job.environment == {"FTP_PASSWORD": "${FTP_PASSWORD}", "DESTINATION": "reports"}
    assert job.updated_at > before


def test_removing_a_key_resets_it_to_its_default(db, tmp_path):
    path = write(tmp_path, WAREHOUSE)
    loadjobs(path)
    write(tmp_path, WAREHOUSE.replace('timezone = "Europe/Berlin"\n', ""))

    loadjobs(path)

    assert Job.objects.get().timezone == "UTC"


def test_unknown_key_names_the_key_and_the_job_and_writes_nothing(db, tmp_path):
    path = write(
        tmp_path, WAREHOUSE + '\n[[job]]\nname = "nightly"\ncommand = "true"\nnotify = 2\n'
    )

    code, out, err = loadjobs(path)

    assert code == 2
    assert 'job "nightly": unknown key "notify"' in err
    assert "Nothing was loaded" in err
    assert out == ""
    assert not Job.objects.exists()


def test_misspelt_key_suggests_the_right_one(db, tmp_path):
    path = write(tmp_path, '[[job]]\nname = "nightly"\ncomand = "true"\n')

    code, _out, err = loadjobs(path)

    assert code == 2
    assert 'job "nightly": unknown key "comand" (did you mean "command"?)' in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('schedule = "61 * * * *"', 'job "nightly": schedule: Bad cron expression'),
        ('schedule = "* * * *"', 'job "nightly": schedule: A cron expression has 5 fields'),
        ('schedule = "@fortnightly"', "job \"nightly\": schedule: Unknown alias '@fortnightly'"),
        (
            'timezone = "Mars/Olympus"',
            "job \"nightly\": timezone: Unknown time zone 'Mars/Olympus'",
        ),
        ('timeout = "45 minutes"', "job \"nightly\": timeout: '45 minutes' is not a duration"),
        ("timeout = 0", 'job "nightly": timeout: The timeout must be more than 0 seconds'),
        ('timeout = "30d"', "job \"nightly\": timeout: '30d' is not a duration"),
        ('tags = "etl"', 'job "nightly": "tags" must be a list of strings'),
        ("env = { PORT = 5432 }", 'job "nightly": env PORT must be a string'),
        ('kind = "python"', 'job "nightly": "command" is a key of shell jobs, not python'),
        ('kind = "python"', 'job "nightly": missing required key "callable"'),
        (
            'kind = "perl"',
            'job "nightly": unknown kind "perl"; use one of "shell", "python", "sql"',
        ),
        ('sql = "SELECT 1"', 'job "nightly": "sql" is a key of sql jobs, not shell'),
        ('database = "default"', 'job "nightly": "database" is a key of sql jobs, not shell'),
        ('callable = "tests.sample_jobs.refresh_stats"', '"callable" is a key of python jobs'),
        ("kwargs = { days = 7 }", 'job "nightly": "kwargs" is a key of python jobs, not shell'),
        ('statement_timeout = "1m"', '"statement_timeout" is a key of sql jobs, not shell'),
        (
            'deliver = "ftp://reports@ftp.example.com/in"',
            'job "nightly": "deliver" must be a table',
        ),
        (
            'deliver = { url = "ftp://reports@ftp.example.com/in", pasive = false }',
            'job "nightly": unknown key "deliver.pasive" (did you mean "deliver.passive"?)',
        ),
        ('deliver = { password = "${FTP_PASSWORD}" }', 'job "nightly": deliver needs "url"'),
        (
            'deliver = { url = "https://reports.example.com/in" }',
            'job "nightly": deliver.url: Use ftp://user@host[:port]/directory',
        ),
        (
            'deliver = { url = "ftp://reports:hunter2@ftp.example.com/in" }',
            'job "nightly": deliver.url: Do not put the password in the URL',
        ),
        (
            'deliver = { url = "ftp://reports@ftp.example.com/in", timeout = "soon" }',
            "job \"nightly\": deliver.timeout: 'soon' is not a duration",
        ),
        (
            'deliver = { url = "ftp://reports@ftp.example.com/in", timeout = 0 }',
            'job "nightly": deliver.timeout: must be more than 0',
        ),
        (
            'deliver = { url = "ftp://reports@ftp.example.com/in", retries = 50 }',
            'job "nightly": deliver.retries: use a whole number from 0 to 20',
        ),
        (
            'deliver = { url = "ftp://reports@ftp.example.com/in", passive = "yes" }',
            'job "nightly": "deliver.passive" must be true or false',
        ),
        (
            'deliver = { url = "ftp://reports@ftp.example.com/in", password = 1234 }',
            'job "nightly": "deliver.password" must be a string',
        ),
        (
            'overlap = "never"',
            'job "nightly": unknown overlap "never"; use one of "skip", "queue", "allow", '
            '"replace"',
        ),
        (
            'catchup = "some"',
            'job "nightly": unknown catchup "some"; use one of "none", "latest", "all"',
        ),
        ("retries = -1", 'job "nightly": retries: use a whole number from 0 to 20'),
        ("retries = 21", 'job "nightly": retries: use a whole number from 0 to 20'),
        ("retries = 2.5", 'job "nightly": "retries" must be a whole number'),
        ('retries = "2"', 'job "nightly": "retries" must be a whole number'),
        ('retry_delay = "5 min"', "job \"nightly\": retry_delay: '5 min' is not a duration"),
        ("retry_delay = -5", 'job "nightly": retry_delay: must not be negative'),
        ('retry_max_delay = "1d"', "job \"nightly\": retry_max_delay: '1d' is not a duration"),
        ("retry_backoff = 0.5", 'job "nightly": retry_backoff: must be from 1 to 10'),
        ("retry_backoff = inf", 'job "nightly": retry_backoff: must be from 1 to 10'),
        ('retry_backoff = "2"', 'job "nightly": "retry_backoff" must be a number'),
        ('depends_on = "fine"', 'job "nightly": "depends_on" must be a list of strings'),
        ('depends_on = ["fine", "fine"]', 'job "nightly": depends_on names "fine" twice'),
        ('trigger = "upstream"', 'job "nightly": trigger = "upstream" needs depends_on'),
        (
            'depends_on = ["fine"]\ntrigger = "schedule"',
            'job "nightly": unknown trigger "schedule"; the only trigger is "upstream"',
        ),
        (
            'secret_env = ["TOKEN"]',
            'job "nightly": secret_env: Not a key of the environment: “TOKEN” '
            "(keys are case-sensitive).",
        ),
        (
            'env = { TOKEN = "x" }\nsecret_env = ["token"]',
            'job "nightly": secret_env: Not a key of the environment: “token”',
        ),
        ('env = { "A=B" = "x" }', 'job "nightly": env: Not an environment variable name: “A=B”'),
        ("retry_backoff = 11", 'job "nightly": retry_backoff: must be from 1 to 10'),
        ("retry_backoff = nan", 'job "nightly": retry_backoff: must be from 1 to 10'),
        (f"retry_backoff = {'9' * 400}", 'job "nightly": retry_backoff: must be from 1 to 10'),
        ('grace = "99999999h"', 'job "nightly": grace: at most 720h (30 days)'),
        ('retry_delay = "721h"', 'job "nightly": retry_delay: at most 720h (30 days)'),
        ('retry_max_delay = "31d"', "job \"nightly\": retry_max_delay: '31d' is not a duration"),
        ('retry_max_delay = "744h"', 'job "nightly": retry_max_delay: at most 720h (30 days)'),
        (
            'deliver = { url = "ftp://reports@ftp.example.com/in", timeout = "744h" }',
            'job "nightly": deliver.timeout: At most 30 days (2592000 seconds).',
        ),
        ('grace = "half an hour"', "job \"nightly\": grace: 'half an hour' is not a duration"),
        ("grace = -60", 'job "nightly": grace: must not be negative'),
        (
            'alert_emails = ["ops@example.com", "oncall@"]',
            'job "nightly": alert_emails: "oncall@" is not an email address',
        ),
        (
            'alert_emails = ["ops at example.com"]',
            'job "nightly": alert_emails: "ops at example.com" is not an email address',
        ),
        ('alert_emails = "ops@example.com"', 'job "nightly": "alert_emails" must be a list'),
        (
            'alert_emails = ["ops@example.com", "OPS@example.com"]',
            'job "nightly": alert_emails names "OPS@example.com" twice',
        ),
        ("alert_after = 0", 'job "nightly": alert_after: use a whole number of at least 1'),
        ("alert_after = -2", 'job "nightly": alert_after: use a whole number of at least 1'),
        ('alert_after = "2"', 'job "nightly": "alert_after" must be a whole number'),
        ("alert_after = 1.5", 'job "nightly": "alert_after" must be a whole number'),
        (
            'webhook_url = "ftp://hooks.example.com/x"',
            'job "nightly": webhook_url: "ftp://hooks.example.com/x" is not an http:// or '
            "https:// URL",
        ),
        (
            'webhook_url = "hooks.example.com/x"',
            'job "nightly": webhook_url: "hooks.example.com/x" is not an http:// or https:// URL',
        ),
        ("webhook_url = 443", 'job "nightly": "webhook_url" must be a string'),
        ('alert_email = ["ops@example.com"]', 'unknown key "alert_email" (did you mean'),
    ],
)
def test_an_invalid_value_is_an_error_naming_the_job_and_writes_nothing(
    db, tmp_path, line, message
):
    ok = '[[job]]\nname = "fine"\ncommand = "true"\n'
    path = write(tmp_path, f'{ok}\n[[job]]\nname = "nightly"\ncommand = "true"\n{line}\n')

    code, _out, err = loadjobs(path)

    assert code == 2
    assert message in err
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('name = "a\\u0000b"\ncommand = "true"', 'job "a\\u0000b": name: a NUL character'),
        ('name = "nightly"\nslug = "n\\u0000"\ncommand = "true"', 'job "nightly": slug: a NUL'),
        ('name = "nightly"\ncommand = "echo \\u0000"', 'job "nightly": command: a NUL'),
        ('name = "nightly"\ncommand = "true"\ntags = ["x\\u0000"]', "tags[0]: a NUL"),
        ('name = "nightly"\ncommand = "true"\ndepends_on = ["x\\u0000"]', "depends_on[0]: a NUL"),
        ('name = "nightly"\ncommand = "true"\nenv = { A = "x\\u0000" }', "env.A: a NUL"),
        ('name = "nightly"\ncommand = "true"\nenv = { "A\\u0000" = "x" }', "env.A\\u0000: a NUL"),
        (
            'name = "nightly"\nkind = "python"\ncallable = "os.getcwd"\n'
            'kwargs = { a = { b = ["\\u0000"] } }',
            'job "nightly": kwargs.a.b[0]: a NUL character (\\u0000) cannot be stored; remove it',
        ),
    ],
)
def test_a_nul_character_anywhere_is_an_error_naming_the_key(db, tmp_path, entry, message):
    # PostgreSQL cannot store (or look up) a NUL; SQLite stored it.
    code, _out, err = loadjobs(write(tmp_path, f"[[job]]\n{entry}\n"))

    assert code == 2
    assert message in err
    assert not Job.objects.exists()


def test_carriage_returns_in_commands_become_newlines_and_load_idempotently(db, tmp_path):
    path = write(
        tmp_path,
        '[[job]]\nname = "nightly"\ncommand = "cd /tmp\\r\\npwd\\r"\n'
        'description = "one\\r\\ntwo"\n',
    )

    assert loadjobs(path)[0] == 0
    _code, out, _err = loadjobs(path)

    job = Job.objects.get()
    assert (job.command, job.description) == ("cd /tmp\npwd\n", "one\ntwo")
    assert "0 created, 0 updated, 1 unchanged" in out


def test_a_job_without_name_or_command_is_an_error(db, tmp_path):
    path = write(tmp_path, '[[job]]\ncommand = "true"\n\n[[job]]\nname = "empty"\n')

    code, _out, err = loadjobs(path)

    assert code == 2
    assert 'job #1: missing required key "name"' in err
    assert 'job "empty": missing required key "command"' in err


def test_duplicate_names_in_the_file_are_an_error(db, tmp_path):
    job = '[[job]]\nname = "nightly"\ncommand = "true"\n'
    path = write(tmp_path, job + "\n" + job)

    code, _out, err = loadjobs(path)

    assert code == 2
    assert 'job "nightly" appears more than once in the file' in err
    assert not Job.objects.exists()


def test_a_slug_taken_by_another_job_is_an_error(make_job, tmp_path):
    make_job(name="Nightly", slug="nightly")
    path = write(tmp_path, '[[job]]\nname = "nightly"\ncommand = "true"\n')

    code, _out, err = loadjobs(path)

    assert code == 2
    assert 'job "nightly": slug "nightly" is already used by job "Nightly"' in err


def test_each_error_names_the_file_and_the_line_of_its_job(db, tmp_path):
    path = write(
        tmp_path,
        "# nightly jobs\n"
        + job_toml("ok")
        + job_toml("bad-cron", 'schedule = "61 * * * *"', 'timezone = "Mars/Base"')
        + job_toml("typo", "retires = 2"),
    )

    code, _out, err = loadjobs(path)

    assert code == 2
    where = path.resolve()
    assert err.splitlines() == [
        f'{where}:13: job "typo": unknown key "retires" (did you mean "retries"?)',
        f"{where}:7: job \"bad-cron\": schedule: Bad cron expression '61 * * * *': Bad minute.",
        f"{where}:7: job \"bad-cron\": timezone: Unknown time zone 'Mars/Base'; use an IANA "
        "name such as 'Europe/Berlin' or 'UTC'.",
        "Nothing was loaded: 3 problem(s).",
    ]
    assert not Job.objects.exists()


def test_a_file_that_is_not_toml_is_an_error(db, tmp_path):
    path = write(tmp_path, '[[job]]\nname = "nightly\n')

    code, _out, err = loadjobs(path)

    assert code == 2
    assert "not valid TOML" in err
    assert "line 2" in err


def test_a_missing_file_is_an_error(db, tmp_path):
    code, _out, err = loadjobs(tmp_path / "nope.toml")

    assert code == 2
    assert "nope.toml: no such file" in err


def test_prune_removes_only_jobs_this_file_no_longer_names(make_job, tmp_path):
    hand_made = make_job(name="hand-made")
    other_file = write(tmp_path, '[[job]]\nname = "other"\ncommand = "true"\n', "other.toml")
    loadjobs(other_file)
    keep_and_drop = (
        '[[job]]\nname = "keep"\ncommand = "true"\n\n[[job]]\nname = "drop"\ncommand = "true"\n'
    )
    path = write(tmp_path, keep_and_drop)
    loadjobs(path)
    write(tmp_path, '[[job]]\nname = "keep"\ncommand = "true"\n')

    code, out, _err = loadjobs(path, "--prune")

    assert code == 0
    assert "0 created, 0 updated, 1 unchanged, 1 pruned" in out
    assert "pruned: drop" in out
    assert set(Job.objects.values_list("name", flat=True)) == {"keep", "other", hand_made.name}


def test_dry_run_says_what_a_load_would_do_and_changes_nothing(db, tmp_path):
    path = write(
        tmp_path,
        '[[job]]\nname = "keep"\ncommand = "true"\n\n[[job]]\nname = "drop"\ncommand = "true"\n',
    )
    loadjobs(path)
    write(
        tmp_path,
        '[[job]]\nname = "keep"\ncommand = "false"\n\n[[job]]\nname = "new"\ncommand = "true"\n',
    )
    before = list(Job.objects.order_by("name").values_list("name", "command", "updated_at"))

    code, out, _err = loadjobs(path, "--prune", "--dry-run")

    assert code == 0
    assert out.startswith("Dry run: nothing was changed. Loading the file would give:\n")
    assert "1 created, 1 updated, 0 unchanged, 1 pruned" in out
    assert "created: new" in out and "updated: keep (command)" in out and "pruned: drop" in out
    assert list(Job.objects.order_by("name").values_list("name", "command", "updated_at")) == (
        before
    )


def test_without_prune_jobs_dropped_from_the_file_stay(db, tmp_path):
    path = write(
        tmp_path, '[[job]]\nname = "a"\ncommand = "true"\n\n[[job]]\nname = "b"\ncommand = "true"\n'
    )
    loadjobs(path)
    write(tmp_path, '[[job]]\nname = "a"\ncommand = "true"\n')

    loadjobs(path)

    assert Job.objects.count() == 2


def test_loading_a_hand_made_job_takes_it_over_without_changing_it(make_job, tmp_path):
    job = make_job(name="nightly", command="true", timeout=3600)
    path = write(tmp_path, '[[job]]\nname = "nightly"\ncommand = "true"\n')

    code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 0 updated, 1 unchanged" in out
    assert "now managed by this file: nightly" in out
    refreshed = Job.objects.get()
    assert refreshed.source == str(path.resolve())
    assert refreshed.updated_at == job.updated_at


# --- Retries, overlap, catch-up and dependencies -----------------------------------


def job_toml(name: str, *lines: str) -> str:
    body = "".join(f"{line}\n" for line in lines)
    return f'\n[[job]]\nname = "{name}"\ncommand = "true"\n{body}'


def upstream_names(name: str) -> list[str]:
    return sorted(Job.objects.get(name=name).upstreams.values_list("name", flat=True))


def test_loadjobs_sets_retries_overlap_and_catchup(db, tmp_path):
    path = write(
        tmp_path,
        job_toml(
            "nightly",
            'overlap = "queue"',
            "retries = 3",
            'retry_delay = "1m"',
            "retry_backoff = 1.5",
            'retry_max_delay = "2h"',
            'catchup = "all"',
        ),
    )

    code, out, _err = loadjobs(path)

    assert code == 0, out
    job = Job.objects.get()
    assert (job.overlap, job.catchup) == (Job.Overlap.QUEUE, Job.Catchup.ALL)
    assert (job.retries, job.retry_delay, job.retry_backoff, job.retry_max_delay) == (
        3,
        60,
        1.5,
        7200,
    )


def test_left_out_reliability_keys_take_the_defaults(db, tmp_path):
    path = write(tmp_path, job_toml("nightly", "retries = 3", 'catchup = "none"'))
    loadjobs(path)
    write(tmp_path, job_toml("nightly"))

    code, out, _err = loadjobs(path)

    assert code == 0
    assert "nightly (catchup, retries)" in out
    job = Job.objects.get()
    assert (job.overlap, job.catchup, job.retries) == ("skip", "latest", 0)
    assert (job.retry_delay, job.retry_backoff, job.retry_max_delay) == (30, 2.0, 3600)


# --- Alert settings ---------------------------------------------------------------------


def test_loadjobs_sets_grace_alert_recipients_threshold_and_webhook(db, tmp_path):
    path = write(
        tmp_path,
        job_toml(
            "nightly",
            'schedule = "15 2 * * *"',
            'grace = "30m"',
            'alert_emails = ["data-ops@example.com", " oncall@example.com "]',
            "alert_after = 2",
            'webhook_url = "https://hooks.example.com/services/T0/B0/x"',
        ),
    )

    code, out, err = loadjobs(path)

    assert code == 0, err
    job = Job.objects.get()
    assert job.grace == 30 * 60
    assert job.alert_emails == ["data-ops@example.com", "oncall@example.com"]
    assert job.alert_after == 2
    assert job.webhook_url == "https://hooks.example.com/services/T0/B0/x"


def test_grace_in_plain_seconds_and_zero_load(db, tmp_path):
    path = write(tmp_path, job_toml("a", "grace = 90") + job_toml("b", "grace = 0"))

    code, _out, err = loadjobs(path)

    assert code == 0, err
    assert dict(Job.objects.values_list("name", "grace")) == {"a": 90, "b": 0}


def test_left_out_alert_keys_take_the_defaults(db, tmp_path):
    path = write(
        tmp_path,
        job_toml(
            "nightly",
            'grace = "5m"',
            'alert_emails = ["ops@example.com"]',
            "alert_after = 3",
            'webhook_url = "http://127.0.0.1:9000/hook"',
        ),
    )
    loadjobs(path)
    write(tmp_path, job_toml("nightly"))

    code, out, _err = loadjobs(path)

    assert code == 0
    assert "nightly (grace, alert_emails, alert_after, webhook_url)" in out
    job = Job.objects.get()
    assert (job.grace, job.alert_emails, job.alert_after, job.webhook_url) == (None, [], 1, "")


def test_loading_alert_settings_twice_changes_nothing(db, tmp_path):
    path = write(
        tmp_path,
        job_toml(
            "nightly", 'grace = "1h"', 'alert_emails = ["ops@example.com"]', "alert_after = 2"
        ),
    )
    loadjobs(path)
    before = Job.objects.get().updated_at

    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 0 updated, 1 unchanged" in out
    assert Job.objects.get().updated_at == before


def test_a_changed_alert_recipient_updates_only_that_key(db, tmp_path):
    path = write(tmp_path, job_toml("nightly", 'alert_emails = ["ops@example.com"]'))
    loadjobs(path)
    write(tmp_path, job_toml("nightly", 'alert_emails = ["ops@example.com", "dba@example.com"]'))

    code, out, _err = loadjobs(path)

    assert code == 0
    assert "nightly (alert_emails)" in out
    assert Job.objects.get().alert_emails == ["ops@example.com", "dba@example.com"]


def test_a_bad_alert_address_names_the_job_and_the_address_and_writes_nothing(db, tmp_path):
    path = write(
        tmp_path,
        job_toml("fine", 'alert_emails = ["ok@example.com"]')
        + job_toml("nightly", 'alert_emails = ["ok@example.com", "oncall@@example.com"]'),
    )

    code, _out, err = loadjobs(path)

    assert code == 2
    assert 'job "nightly": alert_emails: "oncall@@example.com" is not an email address' in err
    assert "fine" not in err
    assert not Job.objects.exists()


@pytest.mark.parametrize("overlap", ["skip", "queue", "allow", "replace"])
def test_every_overlap_policy_loads(db, tmp_path, overlap):
    path = write(tmp_path, job_toml("nightly", f'overlap = "{overlap}"'))

    code, _out, err = loadjobs(path)

    assert code == 0, err
    assert Job.objects.get().overlap == overlap


def test_depends_on_names_jobs_in_the_file_and_in_the_database(make_job, tmp_path):
    make_job(name="warehouse-load")
    path = write(
        tmp_path,
        job_toml("report", 'depends_on = ["extract", "warehouse-load"]', 'trigger = "upstream"')
        + job_toml("extract"),
    )

    code, out, err = loadjobs(path)

    assert code == 0, err
    assert "2 created" in out
    assert upstream_names("report") == ["extract", "warehouse-load"]
    assert Job.objects.get(name="report").trigger_on_upstream is True
    assert Job.objects.get(name="extract").trigger_on_upstream is False
    assert [j.name for j in Job.objects.get(name="extract").downstreams.all()] == ["report"]


def test_loading_a_file_with_upstreams_twice_changes_nothing(db, tmp_path):
    path = write(
        tmp_path,
        job_toml("report", 'depends_on = ["load", "extract"]', 'trigger = "upstream"')
        + job_toml("extract", 'depends_on = ["load"]')
        + job_toml("load"),
    )
    loadjobs(path)
    before = dict(Job.objects.values_list("name", "updated_at"))

    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 0 updated, 3 unchanged, 0 pruned" in out
    assert dict(Job.objects.values_list("name", "updated_at")) == before
    assert upstream_names("report") == ["extract", "load"]


def test_changing_depends_on_updates_the_upstreams_and_says_so(db, tmp_path):
    jobs = job_toml("extract") + job_toml("load")
    path = write(tmp_path, jobs + job_toml("report", 'depends_on = ["extract"]'))
    loadjobs(path)

    write(tmp_path, jobs + job_toml("report", 'depends_on = ["load"]'))
    code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 1 updated, 2 unchanged" in out
    assert "report (depends_on)" in out
    assert upstream_names("report") == ["load"]

    write(tmp_path, jobs + job_toml("report"))
    loadjobs(path)

    assert upstream_names("report") == []


def test_an_unknown_upstream_is_an_error_naming_the_job_and_the_upstream(db, tmp_path):
    path = write(tmp_path, job_toml("extract") + job_toml("report", 'depends_on = ["extrct"]'))

    code, _out, err = loadjobs(path)

    assert code == 2
    assert (
        'job "report": depends_on names "extrct", which is neither in this file nor an '
        "existing job" in err
    )
    assert "Nothing was loaded" in err
    assert not Job.objects.exists()


def test_a_job_that_depends_on_itself_is_an_error(db, tmp_path):
    path = write(tmp_path, job_toml("report", 'depends_on = ["report"]'))

    code, _out, err = loadjobs(path)

    assert code == 2
    assert 'job "report": depends_on: a job cannot depend on itself' in err
    assert "dependency cycle" not in err  # said once, plainly
    assert not Job.objects.exists()


def test_a_dependency_cycle_is_an_error_naming_the_cycle_and_writes_nothing(db, tmp_path):
    path = write(
        tmp_path,
        job_toml("a", 'depends_on = ["b"]') + job_toml("b", 'depends_on = ["c"]') + job_toml("c"),
    )
    loadjobs(path)
    write(
        tmp_path,
        job_toml("a", 'depends_on = ["b"]')
        + job_toml("b", 'depends_on = ["c"]')
        + job_toml("c", 'depends_on = ["a"]', "retries = 2")
        + job_toml("d"),
    )

    code, out, err = loadjobs(path)

    assert code == 2
    assert out == ""
    assert "dependency cycle: a -> b -> c -> a" in err
    assert err.count("dependency cycle") == 1
    assert upstream_names("c") == []
    assert Job.objects.get(name="c").retries == 0
    assert not Job.objects.filter(name="d").exists()


def test_a_cycle_through_an_existing_job_is_an_error(make_job, tmp_path):
    upstream = make_job(name="a")
    hand_made = make_job(name="hand-made")
    hand_made.upstreams.set([upstream])
    path = write(tmp_path, job_toml("a", 'depends_on = ["hand-made"]'))

    code, _out, err = loadjobs(path)

    assert code == 2
    assert "dependency cycle: a -> hand-made -> a" in err
    assert upstream_names("a") == []


def test_the_files_own_edges_replace_a_loaded_jobs_old_ones_when_looking_for_cycles(db, tmp_path):
    path = write(tmp_path, job_toml("a", 'depends_on = ["b"]') + job_toml("b"))
    loadjobs(path)
    # Turned around: b now depends on a, and a no longer on b. No cycle.
    write(tmp_path, job_toml("a") + job_toml("b", 'depends_on = ["a"]'))

    code, _out, err = loadjobs(path)

    assert code == 0, err
    assert (upstream_names("a"), upstream_names("b")) == ([], ["a"])


def test_prune_may_not_delete_an_upstream_the_file_still_needs(db, tmp_path):
    path = write(tmp_path, job_toml("load") + job_toml("report", 'depends_on = ["load"]'))
    loadjobs(path)
    write(tmp_path, job_toml("report", 'depends_on = ["load"]'))

    code, _out, err = loadjobs(path, "--prune")

    assert code == 2
    assert 'job "report": depends_on names "load", which --prune would delete' in err
    assert Job.objects.filter(name="load").exists()


def test_prune_may_not_delete_an_upstream_of_a_job_from_elsewhere(make_job, tmp_path):
    path = write(tmp_path, job_toml("load") + job_toml("other"))
    loadjobs(path)
    hand_made = make_job(name="hand-made")
    hand_made.upstreams.set([Job.objects.get(name="load")])
    write(tmp_path, job_toml("other"))

    code, _out, err = loadjobs(path, "--prune")

    assert code == 2
    assert '--prune would delete job "load", which job "hand-made" depends on' in err
    assert upstream_names("hand-made") == ["load"]


# --- Dumping --------------------------------------------------------------------------


def test_dumpjobs_then_loadjobs_changes_nothing(make_job, tmp_path):
    make_job(
        name="Warehouse Export",
        slug="wh-export",
        description="Nightly.\nSecond line.",
        owner="data-ops",
        tags="etl, finance",
        command='echo "one"\necho "two" >&2\n',
        schedule="15 2 * * *",
        timezone="Europe/Berlin",
        timeout=2700,
        queue="etl",
        environment={"TOKEN": "${API_TOKEN}", "TARGET": "reports", "MY KEY": 'quote " here'},
        secret_keys=["TOKEN"],
        enabled=False,
    )
    make_job(name="plain", command="true", timeout=3600)
    before = dict(Job.objects.values_list("name", "updated_at"))
    path = tmp_path / "dump.toml"

    _out, err = dumpjobs("--output", path)
    code, out, _err = loadjobs(path)

    assert err.startswith("Wrote 2 job(s)")
    assert code == 0
    assert "0 created, 0 updated, 2 unchanged, 0 pruned" in out
    assert dict(Job.objects.values_list("name", "updated_at")) == before


def test_dumpjobs_leaves_out_defaults(make_job):
    make_job(name="plain", command="true", timeout=3600)

    out, _err = dumpjobs()

    assert tomllib.loads(out) == {"job": [{"name": "plain", "command": "true"}]}


def test_dumpjobs_writes_only_the_given_jobs(make_job):
    make_job(name="a")
    make_job(name="b")

    out, _err = dumpjobs("b")

    assert [job["name"] for job in tomllib.loads(out)["job"]] == ["b"]


def test_dumpjobs_unknown_slug_exits_2(make_job):
    make_job(name="a")

    with pytest.raises(SystemExit) as exited:
        dumpjobs("a", "zzz")

    assert exited.value.code == 2


@pytest.mark.parametrize("where", ["missing-dir/jobs.toml", "."])
def test_dumpjobs_to_a_path_it_cannot_write_says_so_and_exits_73(make_job, tmp_path, where):
    make_job(name="a")
    err = io.StringIO()

    with pytest.raises(SystemExit) as exited:
        call_command("dumpjobs", "-o", str(tmp_path / where), stdout=io.StringIO(), stderr=err)

    assert exited.value.code == 73
    assert err.getvalue().startswith(f"Cannot write {tmp_path / where}: ")


def test_dumpjobs_never_prints_a_secret_value(make_job):
    make_job(
        name="nightly",
        environment={"TOKEN": "hunter2-real-token", "FTP": "${FTP_PASSWORD}", "TARGET": "x"},
        secret_keys=["TOKEN", "FTP"],
    )

    out, err = dumpjobs()

    assert "hunter2-real-token" not in out + err
    env = tomllib.loads(out)["job"][0]["env"]
    assert env == {"TOKEN": "${TOKEN}", "FTP": "${FTP_PASSWORD}", "TARGET": "x"}
    assert "secret TOKEN was not exported" in err
    assert "FTP" not in err


def test_dumpjobs_never_prints_a_secret_value_held_inside_another_value(make_job):
    make_job(
        name="nightly",
        environment={"TOKEN": "hunter2-real-token", "URL": "https://bot:hunter2-real-token@h/x"},
        secret_keys=["TOKEN"],
    )

    out, err = dumpjobs()

    assert "hunter2" not in out + err
    env = tomllib.loads(out)["job"][0]["env"]
    assert env == {"TOKEN": "${TOKEN}", "URL": "https://bot:${TOKEN}@h/x"}
    assert "env URL holds the value of secret TOKEN" in err


def test_dumpjobs_writes_reliability_settings_and_sorted_upstreams(make_job):
    zeta, alpha = make_job(name="zeta"), make_job(name="alpha")
    job = make_job(
        name="report",
        command="true",
        timeout=3600,
        overlap="replace",
        retries=2,
        retry_delay=300,
        retry_backoff=3.0,
        retry_max_delay=5400,
        catchup="none",
        trigger_on_upstream=True,
    )
    job.upstreams.set([zeta, alpha])

    out, _err = dumpjobs("report")

    assert tomllib.loads(out)["job"] == [
        {
            "name": "report",
            "command": "true",
            "catchup": "none",
            "depends_on": ["alpha", "zeta"],
            "trigger": "upstream",
            "overlap": "replace",
            "retries": 2,
            "retry_delay": "5m",
            "retry_backoff": 3,
            "retry_max_delay": "90m",
        }
    ]


def test_dumpjobs_then_loadjobs_with_upstreams_and_retries_changes_nothing(make_job, tmp_path):
    load = make_job(name="load", retries=1, retry_backoff=1.5, catchup="all", overlap="queue")
    extract = make_job(name="extract", retry_delay=45, retry_max_delay=600, overlap="allow")
    extract.upstreams.set([load])
    report = make_job(name="report", trigger_on_upstream=True)
    report.upstreams.set([load, extract])
    before = dict(Job.objects.values_list("name", "updated_at"))
    path = tmp_path / "dump.toml"

    dumpjobs("--output", path)
    code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 0 updated, 3 unchanged, 0 pruned" in out
    assert dict(Job.objects.values_list("name", "updated_at")) == before
    assert upstream_names("report") == ["extract", "load"]


def test_dumpjobs_writes_alert_settings(make_job):
    make_job(
        name="nightly",
        command="true",
        timeout=3600,
        grace=1800,
        alert_emails=["data-ops@example.com", "oncall@example.com"],
        alert_after=2,
        webhook_url="https://hooks.example.com/x",
    )
    make_job(name="zero-grace", command="true", timeout=3600, grace=0)

    out, _err = dumpjobs()

    assert tomllib.loads(out)["job"] == [
        {
            "name": "nightly",
            "command": "true",
            "grace": "30m",
            "alert_emails": ["data-ops@example.com", "oncall@example.com"],
            "alert_after": 2,
            "webhook_url": "https://hooks.example.com/x",
        },
        # 0 is a grace that was set (stale as soon as a fire is missed), not the default.
        {"name": "zero-grace", "command": "true", "grace": "0s"},
    ]


def test_dumpjobs_then_loadjobs_with_alert_settings_changes_nothing(make_job, tmp_path):
    make_job(
        name="nightly",
        schedule="15 2 * * *",
        grace=90,
        alert_emails=["data-ops@example.com"],
        alert_after=5,
        webhook_url="http://127.0.0.1:9000/hook?channel=ops",
    )
    make_job(name="zero-grace", grace=0)
    make_job(name="derived")
    before = dict(Job.objects.values_list("name", "updated_at"))
    path = tmp_path / "dump.toml"

    dumpjobs("--output", path)
    code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 0 updated, 3 unchanged, 0 pruned" in out
    assert dict(Job.objects.values_list("name", "updated_at")) == before
    assert dict(Job.objects.values_list("name", "grace")) == {
        "nightly": 90,
        "zero-grace": 0,
        "derived": None,
    }


def test_dumpjobs_warns_about_an_upstream_trigger_without_upstreams(make_job):
    make_job(name="orphan", trigger_on_upstream=True)

    out, err = dumpjobs()

    assert "trigger" not in tomllib.loads(out)["job"][0]
    assert 'job "orphan": trigger on upstream success is set but the job has no upstreams' in err


# --- Python and SQL jobs, delivery ----------------------------------------------------

PARTNER_EXPORT = '''
[[job]]
name = "partner-export"
kind = "sql"
database = "default"
sql = """
CREATE TEMP TABLE recent AS SELECT 1 AS id, 9.5 AS total;
SELECT id, total FROM recent ORDER BY id;
"""
statement_timeout = "10m"

[job.deliver]
url = "ftp://reports@ftp.example.com/incoming"
password = "${FTP_PASSWORD}"
passive = false
timeout = "45s"
retries = 4

[[job]]
name = "refresh-stats"
kind = "python"
callable = "tests.sample_jobs.refresh_stats"
kwargs = { days = 7, tables = ["orders", "refunds"], options = { "dry run" = true, ratio = 0.5 } }
'''


def kind_toml(name: str, kind: str, *lines: str) -> str:
    body = "".join(f"{line}\n" for line in lines)
    return f'\n[[job]]\nname = "{name}"\nkind = "{kind}"\n{body}'


def test_loadjobs_creates_sql_and_python_jobs_with_delivery(db, tmp_path):
    path = write(tmp_path, PARTNER_EXPORT)

    code, out, err = loadjobs(path)

    assert code == 0, err
    assert err == ""  # the password is a reference: nothing to warn about
    assert "2 created" in out
    export = Job.objects.get(name="partner-export")
    assert (export.kind, export.database, export.statement_timeout) == ("sql", "default", 600)
    assert export.sql.startswith("CREATE TEMP TABLE recent")
    assert export.command == ""
    assert (export.deliver_url, export.deliver_password) == (
        "ftp://reports@ftp.example.com/incoming",
        "${FTP_PASSWORD}",
    )
    assert (export.deliver_passive, export.deliver_timeout, export.deliver_retries) == (
        False,
        45,
        4,
    )
    stats = Job.objects.get(name="refresh-stats")
    assert (stats.kind, stats.callable) == ("python", "tests.sample_jobs.refresh_stats")
    assert stats.kwargs == {
        "days": 7,
        "tables": ["orders", "refunds"],
        "options": {"dry run": True, "ratio": 0.5},
    }
    assert (stats.deliver_url, stats.deliver_passive, stats.deliver_timeout) == ("", True, 30)


def test_loading_python_and_sql_jobs_twice_changes_nothing(db, tmp_path):
    path = write(tmp_path, PARTNER_EXPORT)
    loadjobs(path)
    before = dict(Job.objects.values_list("name", "updated_at"))

    with time_machine.travel(timezone.now() + timedelta(hours=1)):
        code, out, _err = loadjobs(path)

    assert code == 0
    assert "0 created, 0 updated, 2 unchanged" in out
    assert dict(Job.objects.values_list("name", "updated_at")) == before


def test_a_changed_delivery_setting_is_reported_by_its_key(db, tmp_path):
    path = write(tmp_path, PARTNER_EXPORT)
    loadjobs(path)
    write(tmp_path, PARTNER_EXPORT.replace("retries = 4", "retries = 1"))

    code, out, _err = loadjobs(path)

    assert code == 0
    assert "partner-export (deliver.retries)" in out
    assert Job.objects.get(name="partner-export").deliver_retries == 1


def test_removing_the_deliver_table_turns_delivery_off(db, tmp_path):
    path = write(tmp_path, PARTNER_EXPORT)
    loadjobs(path)
    head, _deliver, tail = PARTNER_EXPORT.partition("[job.deliver]")
    write(tmp_path, head + tail[tail.index("[[job]]") :])

    code, out, _err = loadjobs(path)

    assert code == 0
    job = Job.objects.get(name="partner-export")
    assert (job.deliver_url, job.deliver_password, job.deliver_passive) == ("", "", True)
    assert "deliver.url" in out


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((), 'job "stats": missing required key "callable" (a python job needs it)'),
        (
            ('callable = "tests.sample_jobs.no_such_function"',),
            "job \"stats\": callable: tests.sample_jobs has no attribute 'no_such_function'",
        ),
        (
            ('callable = "no_such_package.jobs.refresh"',),
            'job "stats": callable: Cannot import no_such_package.jobs: ModuleNotFoundError',
        ),
        (
            ('callable = "tests.sample_jobs.NOT_CALLABLE"',),
            'job "stats": callable: tests.sample_jobs.NOT_CALLABLE is not callable',
        ),
        (('callable = "refresh_stats"',), 'job "stats": callable: Give a dotted path'),
        (
            ('callable = "tests.sample_jobs.refresh_stats"', "kwargs = [7]"),
            'job "stats": "kwargs" must be a table',
        ),
        (
            ('callable = "tests.sample_jobs.refresh_stats"', "kwargs = { since = 2024-01-31 }"),
            'job "stats": kwargs: since is a date or time; write it as a string',
        ),
        (
            ('callable = "tests.sample_jobs.refresh_stats"', "kwargs = { limit = { max = nan } }"),
            'job "stats": kwargs: limit.max = nan: use a finite number',
        ),
        (
            ('callable = "tests.sample_jobs.refresh_stats"', 'command = "true"'),
            'job "stats": "command" is a key of shell jobs, not python',
        ),
        (
            ('callable = "tests.sample_jobs.refresh_stats"', 'sql = "SELECT 1"'),
            'job "stats": "sql" is a key of sql jobs, not python',
        ),
    ],
)
def test_an_invalid_python_job_is_an_error_naming_the_job(db, tmp_path, lines, message):
    path = write(tmp_path, kind_toml("stats", "python", *lines))

    code, _out, err = loadjobs(path)

    assert code == 2
    assert message in err
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (('sql = "SELECT 1"',), 'job "report": missing required key "database"'),
        (('database = "default"',), 'job "report": missing required key "sql"'),
        (('database = "default"', 'sql = "  "'), 'job "report": missing required key "sql"'),
        (
            ('database = "warehouse db"', 'sql = "SELECT 1"'),
            'job "report": database: Name a DATABASES alias (default',
        ),
        (
            ('database = "default"', 'sql = "SELECT 1"', 'statement_timeout = "10 minutes"'),
            "job \"report\": statement_timeout: '10 minutes' is not a duration",
        ),
        (
            ('database = "default"', 'sql = "SELECT 1"', "statement_timeout = 0"),
            'job "report": statement_timeout: must be more than 0',
        ),
        (
            ('database = "default"', 'sql = "SELECT 1"', 'callable = "jobs.demo.count_to"'),
            'job "report": "callable" is a key of python jobs, not sql',
        ),
    ],
)
def test_an_invalid_sql_job_is_an_error_naming_the_job(db, tmp_path, lines, message):
    path = write(tmp_path, kind_toml("report", "sql", *lines))

    code, _out, err = loadjobs(path)

    assert code == 2
    assert message in err
    assert not Job.objects.exists()


def test_a_database_named_by_an_environment_variable_loads(db, tmp_path):
    path = write(
        tmp_path, kind_toml("report", "sql", 'database = "WAREHOUSE_URL"', 'sql = "SELECT 1"')
    )

    code, _out, err = loadjobs(path)

    assert code == 0, err
    assert Job.objects.get().database == "WAREHOUSE_URL"


def test_a_literal_delivery_password_loads_with_a_warning(db, tmp_path):
    path = write(
        tmp_path,
        job_toml(
            "partner-export",
            'deliver = { url = "ftp://reports@ftp.example.com/in", password = "hunter2-literal" }',
        ),
    )

    code, out, err = loadjobs(path)

    assert code == 0
    assert "1 created" in out
    assert Job.objects.get().deliver_password == "hunter2-literal"
    assert (
        f'warning: {path.resolve()}:2: job "partner-export": deliver.password is written in '
        'the file; use ${NAME} (e.g. password = "${PARTNER_EXPORT_FTP_PASSWORD}")' in err
    )


def test_dumpjobs_then_loadjobs_with_python_sql_and_delivery_changes_nothing(db, tmp_path):
    loadjobs(write(tmp_path, PARTNER_EXPORT))
    before = dict(Job.objects.values_list("name", "updated_at"))
    path = tmp_path / "dump.toml"

    _out, err = dumpjobs("--output", path)
    code, out, load_err = loadjobs(path)

    assert "warning" not in err + load_err
    assert code == 0
    assert "0 created, 0 updated, 2 unchanged, 0 pruned" in out
    assert dict(Job.objects.values_list("name", "updated_at")) == before


def test_dumpjobs_writes_the_keys_of_the_jobs_kind_and_leaves_out_defaults(make_job):
    make_job(
        name="report",
        kind="sql",
        command="",
        database="default",
        sql="SELECT 1;\n",
        timeout=3600,
        deliver_url="ftp://reports@ftp.example.com/in",
        deliver_password="${FTP_PASSWORD}",
    )
    make_job(
        name="stats",
        kind="python",
        command="",
        callable="tests.sample_jobs.refresh_stats",
        timeout=3600,
    )

    out, _err = dumpjobs()

    assert tomllib.loads(out)["job"] == [
        {
            "name": "report",
            "kind": "sql",
            "database": "default",
            "sql": "SELECT 1;\n",
            "deliver": {
                "url": "ftp://reports@ftp.example.com/in",
                "password": "${FTP_PASSWORD}",
            },
        },
        {"name": "stats", "kind": "python", "callable": "tests.sample_jobs.refresh_stats"},
    ]


def test_dumpjobs_never_prints_a_literal_delivery_password(make_job):
    make_job(
        name="Partner Export",
        slug="partner-export",
        deliver_url="ftp://reports@ftp.example.com/in",
        deliver_password="hunter2-literal",
    )

    out, err = dumpjobs()

    assert "hunter2-literal" not in out + err
    deliver = tomllib.loads(out)["job"][0]["deliver"]
    assert deliver["password"] == "${PARTNER_EXPORT_FTP_PASSWORD}"
    assert (
        'job "Partner Export": the delivery password was not exported; written as '
        "${PARTNER_EXPORT_FTP_PASSWORD}, so set PARTNER_EXPORT_FTP_PASSWORD in the server's "
        "environment" in err
    )


def test_dumpjobs_warns_about_fields_the_jobs_kind_does_not_use(make_job):
    make_job(name="nightly", command="true", sql="SELECT 1", database="default", timeout=3600)

    out, err = dumpjobs()

    assert tomllib.loads(out)["job"] == [{"name": "nightly", "command": "true"}]
    assert 'job "nightly": database is set but only sql jobs use it' in err
    assert 'job "nightly": sql is set but only sql jobs use it' in err


def test_dumpjobs_leaves_out_null_kwargs_with_a_warning(make_job):
    make_job(
        name="stats",
        kind="python",
        command="",
        callable="tests.sample_jobs.refresh_stats",
        kwargs={"days": 7, "tables": None, "options": {"limit": None, "fast": True}},
    )

    out, err = dumpjobs()

    assert tomllib.loads(out)["job"][0]["kwargs"] == {"days": 7, "options": {"fast": True}}
    assert (
        'job "stats": TOML has no null: kwargs.tables, kwargs.options.limit was not written' in err
    )


# --- Durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"), [(90, 90), ("90", 90), ("30s", 30), ("45m", 2700), ("2h", 7200)]
)
def test_durations_are_seconds_or_suffixed_strings(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["45 minutes", "1.5h", "", True, 2.5])
def test_other_durations_are_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"), [(30, "30s"), (90, "90s"), (2700, "45m"), (7200, "2h")]
)
def test_durations_are_written_in_the_largest_whole_unit(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_the_demo_file_loads_with_an_alerting_flaky_job(db):
    demo = Path(__file__).resolve().parent.parent / "jobs" / "demo_jobs.toml"

    code, _out, err = loadjobs(demo)

    assert code == 0, err
    flaky = Job.objects.get(slug="flaky-export")
    assert (flaky.alert_emails, flaky.alert_after) == (["oncall@example.com"], 2)
    assert Job.objects.exclude(slug="flaky-export").filter(alert_emails=[]).count() == 6
    assert Job.objects.get(slug="sales-summary").kind == Job.Kind.SQL
    assert Job.objects.get(slug="count-to-twenty").kind == Job.Kind.PYTHON


# --- Pruning a job whose run is running; renaming a job ------------------------------------


@pytest.mark.django_db(transaction=True)
def test_prune_keeps_a_job_whose_run_is_running_paused_and_deletes_it_once_the_run_ended(
    tmp_path,
):
    from jobs.models import Run
    from tests.test_cli import start_manage

    gate = tmp_path / "gate"
    slow = job_toml(
        "slow",
        'schedule = "*/5 * * * *"',
    ).replace(
        'command = "true"', f'command = "echo started; until [ -e {gate} ]; do sleep 0.1; done"'
    )
    path = write(tmp_path, slow + job_toml("keep"))
    loadjobs(path)
    runjob = start_manage("runjob", "slow")
    try:
        assert runjob.stdout.readline() == "started\n"
        run = Run.objects.get(job__name="slow")
        write(tmp_path, job_toml("keep"))

        code, out, _err = loadjobs(path, "--prune")

        assert code == 0
        assert f"not pruned yet: slow (run #{run.pk} is running; the job is paused" in out
        assert Job.objects.get(name="slow").enabled is False  # fires no more
        gate.touch()
        _out, err = runjob.communicate(timeout=30)
    finally:
        runjob.kill()
    assert runjob.returncode == 0, err
    assert Run.objects.get(pk=run.pk).status == Run.Status.SUCCEEDED  # recorded, not lost

    code, out, _err = loadjobs(path, "--prune")

    assert "pruned: slow" in out
    assert list(Job.objects.values_list("name", flat=True)) == ["keep"]


def add_run(job: Job):
    from jobs.models import Run

    now = timezone.now()
    return Run.objects.create(
        job=job,
        trigger=Run.Trigger.MANUAL,
        status=Run.Status.SUCCEEDED,
        scheduled_for=now,
        queued_at=now,
        started_at=now,
        finished_at=now,
    )


def test_a_new_name_with_the_same_slug_renames_the_job_and_keeps_its_runs(db, tmp_path):
    path = write(tmp_path, '[[job]]\nname = "Nightly export"\nslug = "export"\ncommand = "true"\n')
    loadjobs(path)
    job = Job.objects.get()
    run = add_run(job)
    write(
        tmp_path, '[[job]]\nname = "Nightly warehouse export"\nslug = "export"\ncommand = "true"\n'
    )

    code, out, err = loadjobs(path, "--prune")

    assert (code, err) == (0, "")
    assert "renamed: Nightly export -> Nightly warehouse export" in out
    assert "0 pruned" in out
    renamed = Job.objects.get()
    assert (renamed.pk, renamed.name, renamed.slug) == (
        job.pk,
        "Nightly warehouse export",
        "export",
    )
    assert list(renamed.runs.all()) == [run]
    assert loadjobs(path, "--prune")[1].startswith(
        f"{path.resolve()}: 0 created, 0 updated, 1 unchanged"
    )


def test_a_name_changed_only_in_case_keeps_its_derived_slug_and_renames_the_job(db, tmp_path):
    path = write(tmp_path, job_toml("Nightly"))
    loadjobs(path)
    job = Job.objects.get()
    write(tmp_path, job_toml("nightly"))

    code, out, _err = loadjobs(path)

    assert code == 0
    assert "renamed: Nightly -> nightly" in out
    assert list(Job.objects.values_list("pk", "name")) == [(job.pk, "nightly")]


def test_a_renamed_jobs_upstreams_and_downstreams_stay(make_job, tmp_path):
    path = write(
        tmp_path,
        job_toml("load") + job_toml("export", 'slug = "export"', 'depends_on = ["load"]'),
    )
    loadjobs(path)
    downstream = make_job(name="hand-made")
    downstream.upstreams.set([Job.objects.get(name="export")])
    write(
        tmp_path,
        job_toml("load") + job_toml("export v2", 'slug = "export"', 'depends_on = ["load"]'),
    )

    code, out, err = loadjobs(path, "--prune")

    assert (code, err) == (0, "")
    assert "renamed: export -> export v2" in out
    assert upstream_names("export v2") == ["load"]
    assert upstream_names("hand-made") == ["export v2"]


def test_depends_on_the_old_name_of_a_renamed_job_says_the_new_name(db, tmp_path):
    path = write(tmp_path, job_toml("load", 'slug = "load"') + job_toml("report"))
    loadjobs(path)
    write(
        tmp_path, job_toml("load v2", 'slug = "load"') + job_toml("report", 'depends_on = ["load"]')
    )

    code, _out, err = loadjobs(path)

    assert code == 2
    assert 'job "report": depends_on names "load", which this file renames to "load v2"' in err
    assert "Traceback" not in err
    assert set(Job.objects.values_list("name", flat=True)) == {"load", "report"}


def test_a_slug_of_a_job_from_elsewhere_says_how_to_take_that_job_over(make_job, tmp_path):
    make_job(name="Old export", slug="export")
    path = write(tmp_path, job_toml("Export", 'slug = "export"'))

    code, _out, err = loadjobs(path, "--prune")

    assert code == 2
    assert 'slug "export" is already used by job "Old export" (not from a job file)' in err
    assert 'give it the name "Old export"' in err


def test_a_rename_that_changes_the_derived_slug_warns_how_to_keep_the_history(db, tmp_path):
    path = write(tmp_path, job_toml("Nightly export"))
    loadjobs(path)
    write(tmp_path, job_toml("Nightly warehouse export"))

    code, out, err = loadjobs(path)

    assert code == 0
    assert "created: Nightly warehouse export" in out
    assert 'job "Nightly export" is no longer in this file, and "Nightly warehouse export"' in err
    assert 'slug = "nightly-export"' in err
