"""The Django admin: job list, Run now / Pause / Resume, read-only runs with Rerun and
Cancel, reliability and dependency settings, missed fires, permissions, validation
messages, masked secrets and flat query counts."""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from jobs import runlog, services
from jobs.models import (
    SECRET_MASK,
    AlertFlip,
    Job,
    JobDailyStats,
    MissedFires,
    Notification,
    Run,
)

RUN_ONLY = ("jobs.view_job", "jobs.view_run", "jobs.run_job")
VIEW_ONLY = ("jobs.view_job", "jobs.view_run")


def job_url(name: str, job: Job) -> str:
    return reverse(f"admin:jobs_job_{name}", args=[job.pk])


def run_url(name: str, run: Run) -> str:
    return reverse(f"admin:jobs_run_{name}", args=[run.pk])


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def make_run(job: Job, status: str = Run.Status.SUCCEEDED, **fields) -> Run:
    now = timezone.now()
    fields.setdefault("trigger", Run.Trigger.SCHEDULE)
    fields.setdefault("scheduled_for", now)
    fields.setdefault("queued_at", now)
    if status != Run.Status.QUEUED:
        fields.setdefault("started_at", now)
    return Run.objects.create(job=job, status=status, **fields)


@pytest.fixture
def run_only_client(make_user):
    client = Client()
    client.force_login(make_user("analyst", perms=RUN_ONLY))
    return client


@pytest.fixture
def view_only_client(make_user):
    client = Client()
    client.force_login(make_user("viewer", perms=VIEW_ONLY))
    return client


# --- Job list ---------------------------------------------------------------------


def test_job_list_shows_schedule_last_status_and_next_run(admin_client, make_job):
    job = make_job(name="nightly-export", schedule="15 2 * * *", owner="data-team")
    next_fire = datetime(2031, 3, 4, 2, 15, tzinfo=UTC)
    Job.objects.filter(pk=job.pk).update(next_fire_at=next_fire)
    make_run(job, Run.Status.SUCCEEDED)
    make_run(job, Run.Status.FAILED)
    make_job(name="paused-job", schedule="@daily", enabled=False)

    response = admin_client.get(reverse("admin:jobs_job_changelist"))

    assert response.status_code == 200
    rows = response.context["cl"].result_list
    by_name = {j.name: j for j in rows}
    assert by_name["nightly-export"].last_status == Run.Status.FAILED
    assert by_name["paused-job"].last_status is None
    text = response.content.decode()
    assert job.describe_schedule() in text
    assert ">Failed</a>" in text
    assert "2031" in text  # the next fire time
    assert "Paused" in text
    assert "data-team" in text


def test_job_list_filters_by_last_run_status(admin_client, make_job):
    failing = make_job(name="failing-job")
    make_run(failing, Run.Status.FAILED)
    healthy = make_job(name="healthy-job")
    make_run(healthy, Run.Status.FAILED)
    make_run(healthy, Run.Status.SUCCEEDED)
    make_job(name="never-ran")

    changelist = reverse("admin:jobs_job_changelist")
    failed = admin_client.get(changelist, {"last_status": "failed"})
    never = admin_client.get(changelist, {"last_status": "never"})

    assert [j.name for j in failed.context["cl"].result_list] == ["failing-job"]
    assert [j.name for j in never.context["cl"].result_list] == ["never-ran"]


def test_job_list_search_finds_jobs_by_command(admin_client, make_job):
    make_job(name="export", command="python3 /srv/etl/export.py")
    make_job(name="cleanup", command="find /tmp -delete")

    response = admin_client.get(reverse("admin:jobs_job_changelist"), {"q": "etl/export"})

    assert [j.name for j in response.context["cl"].result_list] == ["export"]


def test_job_changelist_query_count_does_not_grow_with_rows(
    admin_client, make_job, django_assert_max_num_queries
):
    for n in range(20):
        job = make_job(name=f"job-q{n}", schedule="*/5 * * * *")
        make_run(job, Run.Status.FAILED)
        make_run(job, Run.Status.SUCCEEDED)

    with django_assert_max_num_queries(8):
        response = admin_client.get(reverse("admin:jobs_job_changelist"))

    assert len(response.context["cl"].result_list) == 20


def test_run_changelist_query_count_does_not_grow_with_rows(
    admin_client, make_job, make_user, django_assert_max_num_queries
):
    someone = make_user("someone")
    for n in range(10):
        job = make_job(name=f"job-r{n}")
        make_run(job, Run.Status.SUCCEEDED)
        make_run(job, Run.Status.FAILED, trigger=Run.Trigger.MANUAL, triggered_by=someone)

    with django_assert_max_num_queries(8):
        response = admin_client.get(reverse("admin:jobs_run_changelist"))

    assert len(response.context["cl"].result_list) == 20
    assert "someone" in response.content.decode()


@pytest.mark.parametrize("model", [Job, Run])
def test_list_checkboxes_are_the_markup_django_renders(admin_client, make_job, model):
    """The change lists build their action checkboxes as strings (a widget
    template per row was a fifth of the list's time): the markup, and so
    the select-all and the actions, stay as Django's."""
    from django.contrib import admin

    job = make_job(name="Nightly <export>", slug="nightly-export")
    obj = make_run(job, Run.Status.SUCCEEDED) if model is Run else job
    model_admin = admin.site._registry[model]
    assert model_admin.action_checkbox(obj) == admin.ModelAdmin.action_checkbox(model_admin, obj)
    url = reverse(f"admin:jobs_{model._meta.model_name}_changelist")
    page = admin_client.get(url).content.decode()
    assert model_admin.action_checkbox(obj) in page


def test_the_web_workers_keep_their_startup_objects_out_of_the_collectors_way():
    """jobsite.wsgi (what gunicorn loads) freezes what is alive at startup,
    so a full collection no longer walks all of Django on a page request."""
    import subprocess
    import sys

    code = "import gc, jobsite.wsgi; print(gc.get_freeze_count())"
    frozen = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert int(frozen) > 20_000


# --- Run now -------------------------------------------------------------------------


def test_run_now_refuses_get(admin_client, make_job):
    job = make_job()

    response = admin_client.get(job_url("run", job))

    assert response.status_code == 405
    assert not Run.objects.exists()


def test_run_now_needs_the_run_permission(view_only_client, make_job):
    job = make_job()

    response = view_only_client.post(job_url("run", job))

    assert response.status_code == 403
    assert not Run.objects.exists()


def test_run_now_button_is_shown_only_with_the_run_permission(
    view_only_client, run_only_client, make_job
):
    job = make_job()

    hidden = view_only_client.get(job_url("change", job))
    assert hidden.status_code == 200
    assert job_url("run", job) not in hidden.content.decode()

    shown = run_only_client.get(job_url("change", job))
    text = shown.content.decode()
    assert f'method="post" action="{job_url("run", job)}"' in text
    assert "csrfmiddlewaretoken" in text.split(job_url("run", job))[1].split("</form>")[0]


def test_run_now_creates_a_manual_run_and_redirects_to_its_page(admin_client, make_job):
    job = make_job()

    response = admin_client.post(job_url("run", job))

    run = Run.objects.get()
    assert run.job == job
    assert run.trigger == Run.Trigger.MANUAL
    assert run.triggered_by.username == "boss"
    assert run.status == Run.Status.QUEUED
    assert response.status_code == 302
    assert response.url == reverse("jobs-run-detail", args=[run.pk])
    assert f"run #{run.pk}" in messages_of(response)[0]


@pytest.mark.django_db(transaction=True)
def test_run_now_executes_the_job_on_a_worker(admin_client, make_job, q_sync):
    job = make_job(command="echo hello from the admin")

    response = admin_client.post(job_url("run", job))

    run = Run.objects.get()
    assert response.url == reverse("jobs-run-detail", args=[run.pk])
    assert run.status == Run.Status.SUCCEEDED
    assert run.exit_code == 0
    assert "hello from the admin" in runlog.read_log(run)


def test_run_now_while_a_run_is_active_records_a_skip_and_says_why(admin_client, make_job):
    job = make_job()
    running = make_run(job, Run.Status.RUNNING)

    response = admin_client.post(job_url("run", job))

    skipped = Run.objects.exclude(pk=running.pk).get()
    assert skipped.status == Run.Status.SKIPPED
    assert f"run #{running.pk} still running" in " ".join(messages_of(response))


def test_bulk_run_now_runs_each_selected_job(admin_client, make_job):
    first, second, untouched = make_job(), make_job(), make_job()

    response = admin_client.post(
        reverse("admin:jobs_job_changelist"),
        {"action": "run_now", "_selected_action": [first.pk, second.pk]},
    )

    assert response.status_code == 302
    runs = Run.objects.all()
    assert {r.job_id for r in runs} == {first.pk, second.pk}
    assert all(r.trigger == Run.Trigger.MANUAL for r in runs)
    assert not untouched.runs.exists()
    assert "Queued 2 runs" in messages_of(response)[0]


def test_bulk_actions_are_not_offered_without_the_run_permission(view_only_client, make_job):
    job = make_job()
    changelist = reverse("admin:jobs_job_changelist")

    page = view_only_client.get(changelist)
    view_only_client.post(changelist, {"action": "run_now", "_selected_action": [job.pk]})
    view_only_client.post(changelist, {"action": "pause", "_selected_action": [job.pk]})

    assert 'value="run_now"' not in page.content.decode()
    assert not Run.objects.exists()
    job.refresh_from_db()
    assert job.enabled


# --- Pause / Resume ---------------------------------------------------------------------


def test_pause_and_resume_buttons_toggle_enabled(run_only_client, make_job):
    job = make_job(schedule="@hourly")

    paused = run_only_client.post(job_url("pause", job))
    job.refresh_from_db()
    assert not job.enabled
    assert paused.url == job_url("change", job)
    assert messages_of(paused) == [f"Paused 1 job: {job.name}."]
    page = run_only_client.get(job_url("change", job)).content.decode()
    assert job_url("resume", job) in page
    assert job_url("pause", job) not in page

    resumed = run_only_client.post(job_url("resume", job))
    job.refresh_from_db()
    assert job.enabled
    assert resumed.url == job_url("change", job)


def test_pause_refuses_get_and_users_without_run_permission(
    admin_client, view_only_client, make_job
):
    job = make_job()

    assert view_only_client.post(job_url("pause", job)).status_code == 403
    assert admin_client.get(job_url("pause", job)).status_code == 405
    job.refresh_from_db()
    assert job.enabled


def test_bulk_pause_and_resume(admin_client, make_job):
    first, second = make_job(), make_job()
    changelist = reverse("admin:jobs_job_changelist")
    selected = [first.pk, second.pk]

    admin_client.post(changelist, {"action": "pause", "_selected_action": selected})
    assert not Job.objects.filter(enabled=True).exists()

    admin_client.post(changelist, {"action": "resume", "_selected_action": [first.pk]})
    assert list(Job.objects.filter(enabled=True)) == [first]


# --- Who may edit ----------------------------------------------------------------------


def test_run_only_user_can_view_and_run_but_not_edit(run_only_client, make_job):
    job = make_job(command="echo original")

    page = run_only_client.get(job_url("change", job))
    edit = run_only_client.post(
        job_url("change", job),
        {
            "name": job.name,
            "slug": job.slug,
            "kind": "shell",
            "command": "rm -rf /",
            "environment": "{}",
            "secret_keys": "[]",
            "timezone": "UTC",
            "timeout": "30",
            "overlap": "skip",
        },
    )
    run = run_only_client.post(job_url("run", job))

    assert page.status_code == 200
    assert edit.status_code == 403
    job.refresh_from_db()
    assert job.command == "echo original"
    assert run.status_code == 302
    assert Run.objects.get().triggered_by.username == "analyst"


def test_job_loaded_from_a_file_says_so(admin_client, make_job):
    job = make_job(source="/srv/jobs.toml")

    response = admin_client.get(job_url("change", job))

    assert "Loaded from /srv/jobs.toml" in response.content.decode()


# --- Validation ----------------------------------------------------------------------


def add_form(**overrides) -> dict[str, str]:
    data = {
        "name": "new-job",
        "slug": "new-job",
        "kind": "shell",
        "command": "echo hi",
        "kwargs": "{}",
        "environment": "{}",
        "secret_keys": "[]",
        "deliver_passive": "on",
        "deliver_timeout": "30",
        "deliver_retries": "2",
        "schedule": "*/5 * * * *",
        "timezone": "UTC",
        "enabled": "on",
        "timeout": "60",
        "overlap": "skip",
        "retries": "0",
        "retry_delay": "30",
        "retry_backoff": "2.0",
        "retry_max_delay": "3600",
        "catchup": "latest",
        "alert_emails": "",
        "alert_after": "1",
        "webhook_url": "",
        "grace": "",
    }
    return {**data, **overrides}


def change_form(job: Job, **overrides) -> dict:
    """The change form as the admin would post it back for `job`, unchanged."""
    data = add_form(
        name=job.name,
        slug=job.slug,
        kind=job.kind,
        command=job.command,
        callable=job.callable,
        kwargs=json.dumps(job.kwargs),
        database=job.database,
        sql=job.sql,
        statement_timeout="" if job.statement_timeout is None else str(job.statement_timeout),
        deliver_url=job.deliver_url,
        deliver_timeout=str(job.deliver_timeout),
        deliver_retries=str(job.deliver_retries),
        schedule=job.schedule,
        timezone=job.timezone,
        timeout=str(job.timeout),
        overlap=job.overlap,
        retries=str(job.retries),
        retry_delay=str(job.retry_delay),
        retry_backoff=str(job.retry_backoff),
        retry_max_delay=str(job.retry_max_delay),
        catchup=job.catchup,
        description=job.description,
        upstreams=[str(up.pk) for up in job.upstreams.all()],
        alert_emails="\n".join(job.alert_emails),
        alert_after=str(job.alert_after),
        webhook_url=job.webhook_url,
        grace="" if job.grace is None else str(job.grace),
        environment=json.dumps(job.masked_environment()),
        secret_keys=json.dumps(job.secret_keys),
    )
    if job.trigger_on_upstream:
        data["trigger_on_upstream"] = "on"
    if not job.deliver_passive:
        del data["deliver_passive"]
    return {**data, **overrides}


def form_errors(response) -> dict[str, list[str]]:
    return {field: list(errs) for field, errs in response.context["adminform"].form.errors.items()}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schedule", "61 * * * *", "61"),
        ("schedule", "* * * *", "has 4"),
        ("timezone", "Mars/Olympus_Mons", "Mars/Olympus_Mons"),
        ("timeout", "0", "The timeout must be more than 0 seconds."),
        ("environment", '{"N": 1}', "Use a JSON object of strings"),
        ("retries", "21", "At most 20 retries"),
        ("retry_backoff", "0.5", "The backoff factor must be from 1 to 10"),
        ("retry_max_delay", "10", "at least the first delay (30 s)"),
        ("trigger_on_upstream", "on", "Choose at least one upstream job"),
        ("alert_emails", "ops@example.com\noncall@", "Not an email address: “oncall@”"),
        ("alert_emails", "ops@example, dba@example.com", "Not an email address: “ops@example”"),
        ("alert_after", "0", "Alert after at least 1 failure"),
        ("webhook_url", "ftp://hooks.example.com/x", "Enter an http:// or https:// URL."),
        ("webhook_url", "http://", "Enter an http:// or https:// URL."),
        ("grace", "-1", "greater than or equal to 0"),
        ("grace", "2592001", "At most 30 days (2592000 seconds)."),
        ("retry_max_delay", "2592001", "At most 30 days"),
        ("deliver_timeout", "2592001", "At most 30 days"),
        ("retry_backoff", "11", "The backoff factor must be from 1 to 10"),
        ("environment", '{"A=B": "x"}', "Not an environment variable name: “A=B”"),
        ("environment", '{"A": "x\\u0000y"}', "A NUL character (\\u0000) cannot be stored"),
        ("environment", '{"A\\u0000": "x"}', "remove it from A\\u0000."),
        ("secret_keys", '["A\\u0000"]', "A NUL character (\\u0000) cannot be stored"),
        ("secret_keys", '["TOKEN"]', "Not a key of the environment: “TOKEN”"),
    ],
)
def test_add_form_shows_the_validation_message_on_the_field(admin_client, field, value, message):
    response = admin_client.post(reverse("admin:jobs_job_add"), add_form(**{field: value}))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == [field]
    assert message in errors[field][0]
    assert message in response.content.decode()
    assert not Job.objects.exists()


def test_add_form_saves_a_valid_job(admin_client):
    response = admin_client.post(reverse("admin:jobs_job_add"), add_form())

    assert response.status_code == 302
    assert Job.objects.get().schedule == "*/5 * * * *"


@pytest.mark.parametrize("grace", ["999999999999", "9223372036854775807"])
def test_a_huge_grace_is_refused_and_the_form_shown_again(admin_client, grace):
    response = admin_client.post(reverse("admin:jobs_job_add"), add_form(grace=grace))

    assert response.status_code == 200
    assert list(form_errors(response)) == ["grace"]
    assert not Job.objects.exists()


@pytest.mark.parametrize("kwargs", ['{"x": NaN}', '{"x": [Infinity]}', '{"x": 1e999}'])
def test_a_number_json_cannot_hold_in_kwargs_is_refused(admin_client, kwargs):
    data = add_form(kind="python", command="", callable="os.getcwd", kwargs=kwargs)

    response = admin_client.post(reverse("admin:jobs_job_add"), data)

    assert response.status_code == 200
    assert "use a finite number" in form_errors(response)["kwargs"][0]
    assert not Job.objects.exists()


def test_a_nul_character_in_kwargs_is_refused(admin_client):
    data = add_form(kind="python", command="", callable="os.getcwd", kwargs='{"a\\u0000": 1}')

    response = admin_client.post(reverse("admin:jobs_job_add"), data)

    assert "remove it from a\\u0000." in form_errors(response)["kwargs"][0]


def test_a_secret_key_in_another_case_than_the_env_key_is_refused(admin_client):
    data = add_form(environment='{"API_TOKEN": "tok-abc123"}', secret_keys='["api_token"]')

    response = admin_client.post(reverse("admin:jobs_job_add"), data)

    assert form_errors(response) == {
        "secret_keys": ["Not a key of the environment: “api_token” (keys are case-sensitive)."]
    }


def test_a_multiline_command_typed_in_the_admin_runs_line_by_line(admin_client, tmp_path):
    # What a browser posts for a two-line <textarea>.
    data = add_form(command=f"cd {tmp_path}\r\npwd\r\n", description="one\r\ntwo\rthree")

    response = admin_client.post(reverse("admin:jobs_job_add"), data)

    assert response.status_code == 302, form_errors(response)
    job = Job.objects.get()
    assert (job.command, job.description) == (f"cd {tmp_path}\npwd", "one\ntwo\nthree")
    lines: list[str] = []
    run = services.run_foreground(job=job, trigger=Run.Trigger.MANUAL, echo=lines.append)
    assert run.status == Run.Status.SUCCEEDED
    assert "".join(lines).strip() == str(tmp_path)


def test_resaving_a_multiline_command_is_not_logged_as_a_change(admin_client, make_job):
    job = make_job(command="cd /tmp\npwd", sql="", description="one\ntwo")

    admin_client.post(
        job_url("change", job),
        change_form(job, command="cd /tmp\r\npwd", description="one\r\ntwo", owner="ops"),
    )

    assert "Command" not in LogEntry.objects.get().get_change_message()


# --- Secrets ----------------------------------------------------------------------------


def test_secret_value_is_masked_on_the_read_only_job_page(run_only_client, make_job):
    job = make_job(
        environment={"API_TOKEN": "tok-9f8e7d6c", "TARGET": "reports"},
        secret_keys=["API_TOKEN"],
    )

    text = run_only_client.get(job_url("change", job)).content.decode()

    assert "tok-9f8e7d6c" not in text
    assert f"API_TOKEN={SECRET_MASK}" in text
    assert "TARGET=reports" in text


def test_secret_value_never_appears_on_the_run_admin_page(admin_client, make_job):
    job = make_job(
        command='echo "token is $API_TOKEN"',
        environment={"API_TOKEN": "tok-9f8e7d6c", "TARGET": "reports"},
        secret_keys=["API_TOKEN"],
    )
    run = services.run_foreground(job=job, trigger=Run.Trigger.MANUAL, echo=lambda _text: None)
    assert run.status == Run.Status.SUCCEEDED

    text = admin_client.get(run_url("change", run)).content.decode()

    assert "tok-9f8e7d6c" not in text
    assert f"token is {SECRET_MASK}" in text  # the log, redacted
    assert f"API_TOKEN={SECRET_MASK}" in text  # the environment, masked
    assert "TARGET=reports" in text


def make_secretive(make_job) -> Job:
    return make_job(
        environment={"API_TOKEN": "tok-9f8e7d6c", "TARGET": "reports"},
        secret_keys=["API_TOKEN"],
    )


def test_secret_value_is_masked_in_the_editors_change_form(admin_client, make_job):
    job = make_secretive(make_job)

    text = admin_client.get(job_url("change", job)).content.decode()

    assert "tok-9f8e7d6c" not in text
    assert SECRET_MASK in text
    assert "reports" in text


def test_saving_a_masked_secret_keeps_its_stored_value(admin_client, make_job):
    job = make_secretive(make_job)

    response = admin_client.post(
        job_url("change", job),
        change_form(job, environment=json.dumps({"API_TOKEN": SECRET_MASK, "TARGET": "other"})),
    )

    assert response.status_code == 302, form_errors(response)
    job.refresh_from_db()
    assert job.environment == {"API_TOKEN": "tok-9f8e7d6c", "TARGET": "other"}


def test_a_secret_typed_over_the_mask_replaces_it_and_is_never_shown(admin_client, make_job):
    job = make_secretive(make_job)

    admin_client.post(
        job_url("change", job),
        change_form(job, environment=json.dumps({"API_TOKEN": "new-secret-1", "TARGET": "x"})),
    )
    job.refresh_from_db()
    history = admin_client.get(job_url("history", job)).content.decode()
    page = admin_client.get(job_url("change", job)).content.decode()

    assert job.environment["API_TOKEN"] == "new-secret-1"
    assert "new-secret-1" not in history and "tok-9f8e7d6c" not in history
    assert "new-secret-1" not in page


def test_an_invalid_edit_shows_secrets_masked(admin_client, make_job):
    job = make_secretive(make_job)

    response = admin_client.post(
        job_url("change", job),
        change_form(
            job,
            timeout="0",
            environment=json.dumps({"API_TOKEN": SECRET_MASK, "NEW_KEY": "typed-secret"}),
            secret_keys='["API_TOKEN", "NEW_KEY"]',
        ),
    )

    assert list(form_errors(response)) == ["timeout"]
    text = response.content.decode()
    assert "tok-9f8e7d6c" not in text
    assert "typed-secret" not in text


def test_a_secret_typed_into_a_form_with_an_error_must_be_typed_again_not_lost(
    admin_client, make_job
):
    """It is not shown back, and resubmitting what is shown must not quietly
    keep the old value: the editor believes the token was rotated."""
    job = make_secretive(make_job)  # API_TOKEN = tok-9f8e7d6c
    rotated = {"API_TOKEN": "NEW-rotated", "TARGET": "reports"}
    first = admin_client.post(
        job_url("change", job), change_form(job, timeout="0", environment=json.dumps(rotated))
    )
    assert list(form_errors(first)) == ["timeout"]
    assert "NEW-rotated" not in first.content.decode()
    shown = re.search(
        r'<textarea[^>]*name="environment"[^>]*>(.*?)</textarea>', first.content.decode(), re.S
    )[1]
    again = admin_client.post(
        job_url("change", job), change_form(job, environment=html.unescape(shown))
    )
    assert "Type the new value of API_TOKEN again" in str(form_errors(again)["environment"])
    job.refresh_from_db()
    assert job.environment["API_TOKEN"] == "tok-9f8e7d6c"  # unchanged, and the editor was told
    retyped = admin_client.post(
        job_url("change", job), change_form(job, environment=json.dumps(rotated))
    )
    assert retyped.status_code == 302
    job.refresh_from_db()
    assert job.environment["API_TOKEN"] == "NEW-rotated"


def test_an_upstream_that_is_not_a_job_id_is_a_form_error_not_a_server_error(admin_client):
    response = admin_client.post(reverse("admin:jobs_job_add"), add_form(upstreams="abc"))
    assert response.status_code == 200
    assert "upstreams" in form_errors(response)


def test_the_mask_as_the_value_of_a_new_key_is_refused(admin_client, make_job):
    job = make_secretive(make_job)

    response = admin_client.post(
        job_url("change", job),
        change_form(job, environment=json.dumps({"RENAMED": SECRET_MASK})),
    )

    assert "Type the value of RENAMED" in form_errors(response)["environment"][0]


def test_an_unchanged_masked_environment_is_not_logged_as_a_change(admin_client, make_job):
    job = make_secretive(make_job)

    # The form's hidden "initial-" copy (environment has a callable default), as a browser posts it.
    page = admin_client.get(job_url("change", job)).content.decode()
    initial = html.unescape(re.search(r'name="initial-environment" value="([^"]*)"', page)[1])
    assert json.loads(initial) == job.masked_environment()

    admin_client.post(
        job_url("change", job),
        {**change_form(job, owner="data-team"), "initial-environment": initial},
    )

    entry = LogEntry.objects.get()
    assert "Owner" in entry.get_change_message()
    assert "Environment" not in entry.get_change_message()


# --- Python and SQL jobs, delivery -------------------------------------------------------


def test_add_form_saves_a_python_job(admin_client):
    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        add_form(
            kind="python",
            command="",
            callable="tests.sample_jobs.refresh_stats",
            kwargs='{"days": 3, "tables": ["orders"]}',
        ),
    )

    assert response.status_code == 302, form_errors(response)
    job = Job.objects.get()
    assert (job.kind, job.callable) == ("python", "tests.sample_jobs.refresh_stats")
    assert job.kwargs == {"days": 3, "tables": ["orders"]}


def test_add_form_saves_an_sql_job_with_delivery(admin_client):
    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        add_form(
            kind="sql",
            command="",
            database="default",
            sql="CREATE TEMP TABLE t AS SELECT 1 AS n;\nSELECT n FROM t;",
            statement_timeout="120",
            deliver_url="ftp://reports@ftp.example.com/incoming",
            deliver_password="${FTP_PASSWORD}",
            deliver_timeout="45",
            deliver_retries="1",
        ),
    )

    assert response.status_code == 302, form_errors(response)
    job = Job.objects.get()
    assert (job.kind, job.database, job.statement_timeout) == ("sql", "default", 120)
    assert job.sql.startswith("CREATE TEMP TABLE t")
    assert (job.deliver_url, job.deliver_password) == (
        "ftp://reports@ftp.example.com/incoming",
        "${FTP_PASSWORD}",
    )
    assert (job.deliver_timeout, job.deliver_retries) == (45, 1)
    # A reference: no warning about a password stored in the database.
    assert len(messages_of(response)) == 1


PYTHON = {"kind": "python", "command": "", "callable": "tests.sample_jobs.refresh_stats"}
SQL = {"kind": "sql", "command": "", "database": "default", "sql": "SELECT 1"}


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (PYTHON | {"callable": ""}, "callable", "Give a dotted path to a function"),
        (
            PYTHON | {"callable": "tests.sample_jobs.no_such_function"},
            "callable",
            "tests.sample_jobs has no attribute 'no_such_function'",
        ),
        (
            PYTHON | {"callable": "no_such_package.jobs.refresh"},
            "callable",
            "Cannot import no_such_package.jobs",
        ),
        (
            PYTHON | {"callable": "tests.sample_jobs.NOT_CALLABLE"},
            "callable",
            "tests.sample_jobs.NOT_CALLABLE is not callable",
        ),
        (PYTHON | {"kwargs": "[7]"}, "kwargs", 'Use a JSON object, e.g. {"days": 7}.'),
        (PYTHON | {"command": "echo hi"}, "command", "Only shell jobs use this"),
        (SQL | {"sql": "  "}, "sql", "The SQL script is empty."),
        (SQL | {"database": "warehouse db"}, "database", "Name a DATABASES alias (default"),
        (SQL | {"database": ""}, "database", "Name a DATABASES alias"),
        (SQL | {"statement_timeout": "0"}, "statement_timeout", "Give more than 0 seconds"),
        (SQL | {"callable": "jobs.demo.count_to"}, "callable", "Only Python jobs use this"),
        ({"sql": "SELECT 1"}, "sql", "Only SQL jobs use this: clear it, or choose the kind"),
        ({"command": ""}, "command", "The command is empty."),
        (
            {"deliver_url": "https://reports.example.com/in"},
            "deliver_url",
            "Use ftp://user@host[:port]/directory",
        ),
        (
            {"deliver_url": "ftp://reports:hunter2@ftp.example.com/in"},
            "deliver_url",
            "Do not put the password in the URL",
        ),
    ],
)
def test_kind_and_delivery_errors_are_shown_on_their_field(admin_client, overrides, field, message):
    response = admin_client.post(reverse("admin:jobs_job_add"), add_form(**overrides))

    assert response.status_code == 200
    errors = form_errors(response)
    assert list(errors) == [field]
    assert message in errors[field][0]
    assert not Job.objects.exists()


def make_delivering_job(make_job, password: str) -> Job:
    return make_job(
        name="partner-export",
        deliver_url="ftp://reports@ftp.example.com/incoming",
        deliver_password=password,
    )


def test_change_page_never_shows_the_delivery_password(admin_client, make_job):
    job = make_delivering_job(make_job, "hunter2-literal")

    text = admin_client.get(job_url("change", job)).content.decode()

    assert "hunter2-literal" not in text
    assert 'name="deliver_password"' in text  # the field is there, empty
    assert "Leave empty to keep the current one." in text


@pytest.mark.parametrize(
    ("password", "status"),
    [("hunter2-literal", "set"), ("${FTP_PASSWORD}", "set from ${FTP_PASSWORD}"), ("", "not set")],
)
def test_read_only_job_page_says_only_whether_a_delivery_password_is_set(
    view_only_client, make_job, password, status
):
    job = make_delivering_job(make_job, password)

    response = view_only_client.get(job_url("change", job))

    text = response.content.decode()
    assert response.status_code == 200
    assert "hunter2-literal" not in text
    assert 'name="deliver_password"' not in text
    assert f'<div class="readonly">{status}</div>' in text


def test_saving_with_an_empty_password_keeps_the_stored_one(admin_client, make_job):
    job = make_delivering_job(make_job, "hunter2-literal")

    response = admin_client.post(
        job_url("change", job), change_form(job, description="edited", deliver_password="")
    )

    assert response.status_code == 302, form_errors(response)
    job.refresh_from_db()
    assert (job.description, job.deliver_password) == ("edited", "hunter2-literal")
    # Nothing typed: no warning about a password written in the database.
    assert not any("stored in the database" in m for m in messages_of(response))


def test_a_typed_password_replaces_the_stored_one(admin_client, make_job):
    job = make_delivering_job(make_job, "hunter2-literal")

    response = admin_client.post(
        job_url("change", job), change_form(job, deliver_password="${PARTNER_FTP_PASSWORD}")
    )

    assert response.status_code == 302, form_errors(response)
    job.refresh_from_db()
    assert job.deliver_password == "${PARTNER_FTP_PASSWORD}"


def test_a_typed_literal_password_is_saved_with_a_warning(admin_client, make_job):
    job = make_delivering_job(make_job, "")

    response = admin_client.post(
        job_url("change", job), change_form(job, deliver_password="s3cret-typed")
    )

    assert response.status_code == 302, form_errors(response)
    job.refresh_from_db()
    assert job.deliver_password == "s3cret-typed"
    assert (
        "The delivery password is stored in the database as typed. A reference like "
        "${PARTNER_EXPORT_FTP_PASSWORD} keeps it in the server's environment instead."
    ) in messages_of(response)


def test_forgetting_the_password_clears_it(admin_client, make_job):
    job = make_delivering_job(make_job, "hunter2-literal")

    response = admin_client.post(
        job_url("change", job), change_form(job, forget_deliver_password="on")
    )

    assert response.status_code == 302, form_errors(response)
    job.refresh_from_db()
    assert job.deliver_password == ""


def test_typing_a_password_and_forgetting_it_at_once_is_refused(admin_client, make_job):
    job = make_delivering_job(make_job, "hunter2-literal")

    response = admin_client.post(
        job_url("change", job),
        change_form(job, forget_deliver_password="on", deliver_password="new-one"),
    )

    assert response.status_code == 200
    assert list(form_errors(response)) == ["forget_deliver_password"]
    assert "new-one" not in response.content.decode()
    job.refresh_from_db()
    assert job.deliver_password == "hunter2-literal"


def test_an_invalid_edit_does_not_echo_a_typed_password(admin_client, make_job):
    job = make_delivering_job(make_job, "")

    response = admin_client.post(
        job_url("change", job), change_form(job, timeout="0", deliver_password="typed-secret")
    )

    assert response.status_code == 200
    assert "typed-secret" not in response.content.decode()


def test_job_page_shows_the_fields_of_every_kind_and_a_delivery_section(admin_client, make_job):
    job = make_job(kind="python", command="", callable="tests.sample_jobs.refresh_stats")

    text = admin_client.get(job_url("change", job)).content.decode()

    for name in ("command", "callable", "kwargs", "database", "sql", "statement_timeout"):
        assert f'name="{name}"' in text
    assert "Delivery" in text
    assert 'name="deliver_url"' in text
    assert "tests.sample_jobs.refresh_stats" in text


def test_job_list_shows_the_kind_and_search_finds_a_callable(admin_client, make_job):
    make_job(name="stats", kind="python", command="", callable="tests.sample_jobs.refresh_stats")
    make_job(name="other")

    response = admin_client.get(reverse("admin:jobs_job_changelist"), {"q": "refresh_stats"})

    assert [job.name for job in response.context["cl"].result_list] == ["stats"]
    assert "Python callable" in response.content.decode()


# --- Runs ---------------------------------------------------------------------------------


def test_run_page_shows_the_log_escaped(admin_client, make_job):
    job = make_job(command="echo '<script>alert(1)</script>'")
    run = services.run_foreground(job=job, echo=lambda _text: None)

    text = admin_client.get(run_url("change", run)).content.decode()

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)" not in text


def test_runs_are_read_only_even_for_a_superuser(admin_client, make_job):
    run = make_run(make_job(), Run.Status.FAILED, exit_code=3)

    assert admin_client.get(reverse("admin:jobs_run_add")).status_code == 403
    assert admin_client.post(run_url("change", run), {"exit_code": "0"}).status_code == 403
    run.refresh_from_db()
    assert run.exit_code == 3


def test_rerun_button_keeps_the_logical_time_and_links_the_original(run_only_client, make_job):
    original = make_run(
        make_job(), Run.Status.FAILED, scheduled_for=datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
    )

    response = run_only_client.post(run_url("rerun", original))

    rerun = Run.objects.exclude(pk=original.pk).get()
    assert rerun.trigger == Run.Trigger.RERUN
    assert rerun.rerun_of == original
    assert rerun.scheduled_for == original.scheduled_for
    assert rerun.triggered_by.username == "analyst"
    assert response.url == reverse("jobs-run-detail", args=[rerun.pk])


def test_rerun_is_post_only_and_needs_the_run_permission(admin_client, view_only_client, make_job):
    original = make_run(make_job(), Run.Status.FAILED)

    page = view_only_client.get(run_url("change", original))
    assert page.status_code == 200
    assert run_url("rerun", original) not in page.content.decode()
    assert view_only_client.post(run_url("rerun", original)).status_code == 403
    assert admin_client.get(run_url("rerun", original)).status_code == 405
    assert Run.objects.count() == 1


def test_bulk_rerun_action_reruns_each_selected_run(admin_client, make_job):
    first = make_run(make_job(), Run.Status.FAILED)
    second = make_run(make_job(), Run.Status.TIMED_OUT)

    response = admin_client.post(
        reverse("admin:jobs_run_changelist"),
        {"action": "rerun", "_selected_action": [first.pk, second.pk]},
    )

    reruns = Run.objects.filter(trigger=Run.Trigger.RERUN)
    assert {r.rerun_of_id for r in reruns} == {first.pk, second.pk}
    assert all(r.status == Run.Status.QUEUED for r in reruns)
    assert len(messages_of(response)) == 2


# --- Reliability and dependencies on the job form ------------------------------------


def test_add_form_saves_reliability_and_dependency_settings(admin_client, make_job):
    load, clean = make_job(name="warehouse-load"), make_job(name="warehouse-clean")

    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        add_form(
            name="warehouse-export",
            slug="warehouse-export",
            schedule="",
            overlap="queue",
            retries="3",
            retry_delay="10",
            retry_backoff="1.5",
            retry_max_delay="600",
            catchup="all",
            upstreams=[str(load.pk), str(clean.pk)],
            trigger_on_upstream="on",
        ),
    )

    assert response.status_code == 302, form_errors(response)
    job = Job.objects.get(name="warehouse-export")
    assert job.overlap == Job.Overlap.QUEUE
    assert (job.retries, job.retry_delay, job.retry_backoff, job.retry_max_delay) == (
        3,
        10,
        1.5,
        600,
    )
    assert job.catchup == Job.Catchup.ALL
    assert set(job.upstreams.all()) == {load, clean}
    assert job.trigger_on_upstream


def test_job_page_shows_reliability_and_dependency_sections(admin_client, make_job):
    job = make_job(name="warehouse-load")

    text = admin_client.get(job_url("change", job)).content.decode()

    for label in ("Reliability", "Dependencies", "Retry backoff", "Catchup", "Upstreams"):
        assert label in text
    assert 'name="trigger_on_upstream"' in text


def test_dependency_cycle_is_refused_on_the_field_and_nothing_is_saved(admin_client, make_job):
    a, b = make_job(name="a"), make_job(name="b")
    b.upstreams.add(a)

    response = admin_client.post(
        job_url("change", a), change_form(a, upstreams=[str(b.pk)], description="edited")
    )

    assert response.status_code == 200
    assert form_errors(response) == {"upstreams": ["Dependency cycle: a → b → a"]}
    assert "Dependency cycle: a → b → a" in response.content.decode()
    a.refresh_from_db()
    assert not a.upstreams.exists()
    assert a.description == ""


def test_longer_dependency_cycle_names_every_job_on_it(admin_client, make_job):
    load, clean, export = make_job(name="load"), make_job(name="clean"), make_job(name="export")
    clean.upstreams.add(load)
    export.upstreams.add(clean)

    response = admin_client.post(job_url("change", load), change_form(load, upstreams=[export.pk]))

    assert form_errors(response) == {
        "upstreams": ["Dependency cycle: load → export → clean → load"]
    }
    assert not load.upstreams.exists()


def test_a_job_cannot_depend_on_itself(admin_client, make_job):
    job = make_job(name="selfish")

    response = admin_client.post(job_url("change", job), change_form(job, upstreams=[job.pk]))

    assert form_errors(response) == {"upstreams": ["A job cannot depend on itself."]}
    assert not job.upstreams.exists()


def test_fan_in_without_a_cycle_saves(admin_client, make_job):
    a, b, c = make_job(name="a"), make_job(name="b"), make_job(name="c")
    b.upstreams.add(a)

    response = admin_client.post(job_url("change", c), change_form(c, upstreams=[a.pk, b.pk]))

    assert response.status_code == 302, form_errors(response)
    assert set(c.upstreams.all()) == {a, b}


def test_job_page_lists_downstream_jobs_read_only(admin_client, make_job):
    load = make_job(name="warehouse-load")
    export = make_job(name="warehouse-export", trigger_on_upstream=True)
    export.upstreams.add(load)
    make_job(name="unrelated")

    text = admin_client.get(job_url("change", load)).content.decode()

    assert f'<a href="{job_url("change", export)}">warehouse-export</a>' in text
    assert "(triggered by its upstreams)" in text
    assert "unrelated</a>" not in text
    assert 'name="downstreams"' not in text  # shown, not editable here


def test_job_list_filters_by_catchup_policy(admin_client, make_job):
    make_job(name="catch-all", catchup=Job.Catchup.ALL)
    make_job(name="catch-none", catchup=Job.Catchup.NONE)

    response = admin_client.get(reverse("admin:jobs_job_changelist"), {"catchup__exact": "all"})

    assert [j.name for j in response.context["cl"].result_list] == ["catch-all"]


# --- Cancel -------------------------------------------------------------------------------


def running_run(job: Job) -> Run:
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    claimed = services.run_claim(run_id=run.pk, worker="w:1")
    assert claimed is not None
    return claimed


def test_cancel_button_is_post_only_and_needs_the_run_permission(
    admin_client, view_only_client, make_job
):
    run = make_run(make_job(), Run.Status.QUEUED)

    page = view_only_client.get(run_url("change", run))
    assert page.status_code == 200
    assert run_url("cancel", run) not in page.content.decode()
    assert view_only_client.post(run_url("cancel", run)).status_code == 403
    assert admin_client.get(run_url("cancel", run)).status_code == 405
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED


def test_cancel_button_cancels_a_queued_run_at_once(run_only_client, make_job):
    run = make_run(make_job(), Run.Status.QUEUED)

    page = run_only_client.get(run_url("change", run)).content.decode()
    assert f'method="post" action="{run_url("cancel", run)}"' in page
    response = run_only_client.post(run_url("cancel", run))

    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    assert run.cancelled_by.username == "analyst"
    assert response.status_code == 302
    assert response.url == run_url("change", run)
    assert messages_of(response) == [f"Run #{run.pk} cancelled."]


def test_cancel_button_on_a_running_run_asks_its_worker_to_stop_it(admin_client, make_job):
    run = running_run(make_job())

    response = admin_client.post(run_url("cancel", run))

    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING  # until its worker has killed the group
    assert run.cancel_requested_at is not None
    assert run.cancelled_by.username == "boss"
    assert messages_of(response) == [
        f"Cancelling run #{run.pk}: its process group is being stopped."
    ]
    page = admin_client.get(run_url("change", run)).content.decode()
    assert run_url("cancel", run) not in page  # asked once is enough
    assert "Cancel requested at" in page


def test_cancel_button_is_hidden_for_finished_runs(admin_client, make_job):
    job = make_job()
    for status in Run.FINISHED:
        run = make_run(job, status)
        page = admin_client.get(run_url("change", run)).content.decode()
        assert run_url("cancel", run) not in page, status
        assert run_url("rerun", run) in page


def test_cancel_of_a_run_that_finished_meanwhile_says_so(admin_client, make_job):
    run = make_run(make_job(), Run.Status.SUCCEEDED)

    response = admin_client.post(run_url("cancel", run))

    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED
    assert run.cancelled_by is None
    assert messages_of(response) == [f"Run #{run.pk} had already finished."]


def test_bulk_cancel_cancels_each_selected_run(admin_client, make_job):
    queued = make_run(make_job(), Run.Status.QUEUED)
    running = running_run(make_job())
    finished = make_run(make_job(), Run.Status.FAILED)
    untouched = make_run(make_job(), Run.Status.QUEUED)

    response = admin_client.post(
        reverse("admin:jobs_run_changelist"),
        {"action": "cancel", "_selected_action": [queued.pk, running.pk, finished.pk]},
    )

    for run in (queued, running, finished, untouched):
        run.refresh_from_db()
    assert queued.status == Run.Status.CANCELLED
    assert running.cancel_requested_at is not None
    assert finished.status == Run.Status.FAILED
    assert untouched.status == Run.Status.QUEUED
    assert messages_of(response) == [
        f"Run #{queued.pk} cancelled.",
        f"Cancelling run #{running.pk}: its process group is being stopped.",
        f"Run #{finished.pk} had already finished.",
    ]


def test_bulk_cancel_is_not_offered_without_the_run_permission(view_only_client, make_job):
    run = make_run(make_job(), Run.Status.QUEUED)
    changelist = reverse("admin:jobs_run_changelist")

    page = view_only_client.get(changelist)
    view_only_client.post(changelist, {"action": "cancel", "_selected_action": [run.pk]})

    assert 'value="cancel"' not in page.content.decode()
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED


def test_run_list_shows_who_cancelled(admin_client, make_job, make_user):
    run = make_run(make_job(), Run.Status.QUEUED)
    services.run_cancel(run=run, by=make_user("night-shift"))

    text = admin_client.get(reverse("admin:jobs_run_changelist")).content.decode()

    assert "Cancelled by" in text
    assert "night-shift" in text


def test_retry_page_links_the_first_attempt_and_says_when_it_is_due(admin_client, make_job):
    job = make_job()
    first = make_run(job, Run.Status.FAILED)
    due = datetime(2031, 5, 6, 7, 8, tzinfo=UTC)
    retry = make_run(
        job,
        Run.Status.QUEUED,
        trigger=Run.Trigger.RETRY,
        retry_of=first,
        attempt=2,
        not_before=due,
    )

    text = admin_client.get(run_url("change", retry)).content.decode()

    assert f'href="{run_url("change", first)}"' in text
    assert "(waiting until then)" in text
    assert "2031" in text


# --- Missed fires -------------------------------------------------------------------------


def make_missed(job: Job, count: int = 3, policy: str = Job.Catchup.NONE) -> MissedFires:
    return MissedFires.objects.create(
        job=job,
        first=datetime(2030, 1, 1, 2, 0, tzinfo=UTC),
        last=datetime(2030, 1, 1, 4, 0, tzinfo=UTC),
        count=count,
        policy=policy,
        recorded_at=datetime(2030, 1, 1, 4, 30, tzinfo=UTC),
    )


def test_missed_fires_admin_lists_gaps_and_filters_by_job(admin_client, make_job):
    nightly, hourly = make_job(name="nightly"), make_job(name="hourly")
    make_missed(nightly, count=3)
    make_missed(hourly, count=17)
    changelist = reverse("admin:jobs_missedfires_changelist")

    every = admin_client.get(changelist)
    filtered = admin_client.get(changelist, {"job__id__exact": hourly.pk})

    assert every.status_code == 200
    assert {(m.job.name, m.count) for m in every.context["cl"].result_list} == {
        ("nightly", 3),
        ("hourly", 17),
    }
    assert [m.count for m in filtered.context["cl"].result_list] == [17]
    assert "None: record missed fires, run nothing" in every.content.decode()


def test_missed_fires_are_read_only(admin_client, make_job):
    missed = make_missed(make_job())
    change = reverse("admin:jobs_missedfires_change", args=[missed.pk])

    assert admin_client.get(reverse("admin:jobs_missedfires_add")).status_code == 403
    assert admin_client.post(change, {"count": "0"}).status_code == 403
    missed.refresh_from_db()
    assert missed.count == 3


def test_job_page_links_its_missed_fires(admin_client, make_job):
    job = make_job()
    make_missed(job)

    text = admin_client.get(job_url("change", job)).content.decode()

    assert "1 gap recorded" in text
    assert f"?job__id__exact={job.pk}" in text


def test_superuser_can_still_delete_a_job_with_missed_fires(admin_client, make_job):
    job = make_job()
    make_missed(job)

    response = admin_client.post(job_url("delete", job), {"post": "yes"})

    assert response.status_code == 302
    assert not Job.objects.exists()
    assert not MissedFires.objects.exists()


# --- Alerts ---------------------------------------------------------------------------


def test_add_form_saves_alert_settings(admin_client):
    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        add_form(
            alert_emails="data-ops@example.com\n oncall@example.com, dba@example.com\n",
            alert_after="3",
            webhook_url="https://hooks.example.com/services/T0/B0/x",
            grace="600",
        ),
    )

    assert response.status_code == 302, form_errors(response)
    job = Job.objects.get()
    assert job.alert_emails == ["data-ops@example.com", "oncall@example.com", "dba@example.com"]
    assert (job.alert_after, job.grace) == (3, 600)
    assert job.webhook_url == "https://hooks.example.com/services/T0/B0/x"


def test_change_form_shows_recipients_one_per_line_and_clears_them(admin_client, make_job):
    job = make_job(alert_emails=["a@example.com", "b@example.com"], grace=300)

    page = admin_client.get(job_url("change", job)).content.decode()
    response = admin_client.post(
        job_url("change", job), change_form(job, alert_emails="", grace="")
    )

    assert "a@example.com\nb@example.com</textarea>" in page
    assert response.status_code == 302, form_errors(response)
    job.refresh_from_db()
    assert (job.alert_emails, job.grace) == ([], None)


def test_a_bad_alert_address_on_edit_keeps_the_saved_recipients(admin_client, make_job):
    job = make_job(alert_emails=["ops@example.com"])

    response = admin_client.post(
        job_url("change", job), change_form(job, alert_emails="ops@example.com\nnot-an-address")
    )

    assert response.status_code == 200
    assert form_errors(response) == {"alert_emails": ["Not an email address: “not-an-address”."]}
    job.refresh_from_db()
    assert job.alert_emails == ["ops@example.com"]


def test_job_page_shows_alert_state_failures_and_last_success(admin_client, make_job):
    job = make_job(name="nightly", schedule="*/10 * * * *", alert_after=2)
    since = datetime(2030, 5, 6, 7, 8, tzinfo=UTC)
    Job.objects.filter(pk=job.pk).update(
        alert_state=Job.AlertState.FAILING,
        alert_state_since=since,
        consecutive_failures=4,
        last_success_at=datetime(2030, 5, 5, 23, 0, tzinfo=UTC),
    )

    response = admin_client.get(job_url("change", job))

    text = response.content.decode()
    assert "Alerts" in text
    fields = response.context["adminform"].form.fields
    assert {"alert_emails", "alert_after", "webhook_url", "grace"} <= set(fields)
    assert ">Failing</strong> since" in text
    assert "May 6, 2030" in text
    assert "Consecutive failures" in text
    assert '<div class="readonly">4</div>' in text
    assert "May 5, 2030" in text  # last success
    assert "5 min 0 s (derived: half the interval)" in text
    assert f"/admin/jobs/alertflip/?job__id__exact={job.pk}" in text


def test_job_list_shows_failing_and_stale_prominently_and_filters_by_alert_state(
    admin_client, make_job
):
    failing, stale, ok = make_job(name="failing-job"), make_job(name="stale-job"), make_job()
    Job.objects.filter(pk=failing.pk).update(alert_state=Job.AlertState.FAILING)
    Job.objects.filter(pk=stale.pk).update(alert_state=Job.AlertState.STALE)
    changelist = reverse("admin:jobs_job_changelist")

    every = admin_client.get(changelist).content.decode()
    only_stale = admin_client.get(changelist, {"alert_state__exact": "stale"})

    assert every.count(">Failing</strong>") == 1
    assert every.count(">Stale</strong>") == 1
    assert [j.name for j in only_stale.context["cl"].result_list] == ["stale-job"]
    assert ok.name in every


def make_flip(job: Job, new: str, *, run: Run | None = None, notified: bool = True) -> AlertFlip:
    at = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
    return AlertFlip.objects.create(
        job=job,
        old_state=Job.AlertState.OK if new != Job.AlertState.OK else Job.AlertState.FAILING,
        new_state=new,
        at=at,
        run=run,
        reason=f"{job.name} went {new}",
        notified_at=at if notified else None,
    )


def make_notification(job: Job, *, ok: bool = True, channel: str = "email") -> Notification:
    return Notification.objects.create(
        job=job,
        kind=Notification.Kind.ALERT,
        channel=channel,
        target="ops@example.com" if channel == "email" else "https://hooks.example.com/T0/s3cr3t",
        subject=f"[Jobsite] {job.name}: failing",
        sent_at=datetime(2030, 1, 2, 3, 5, tzinfo=UTC),
        ok=ok,
        error="" if ok else "Connection refused",
    )


def make_stats(job: Job, day: int, **counts) -> JobDailyStats:
    return JobDailyStats.objects.create(job=job, day=datetime(2030, 1, day).date(), **counts)


def test_flip_admin_lists_changes_and_filters_by_new_state_and_job(admin_client, make_job):
    nightly, hourly = make_job(name="nightly"), make_job(name="hourly")
    run = make_run(nightly, Run.Status.FAILED)
    make_flip(nightly, Job.AlertState.FAILING, run=run)
    make_flip(hourly, Job.AlertState.STALE, notified=False)
    changelist = reverse("admin:jobs_alertflip_changelist")

    every = admin_client.get(changelist)
    stale = admin_client.get(changelist, {"new_state__exact": "stale"})
    by_job = admin_client.get(changelist, {"job__id__exact": nightly.pk})

    text = every.content.decode()
    assert every.status_code == 200
    assert "nightly went failing" in text
    assert "OK → <strong" in text
    assert f'href="{run_url("change", run)}">#{run.pk}</a>' in text
    assert [f.job.name for f in stale.context["cl"].result_list] == ["hourly"]
    assert [f.job.name for f in by_job.context["cl"].result_list] == ["nightly"]


def test_notification_admin_lists_sends_with_their_result_and_filters_failures(
    admin_client, make_job
):
    job = make_job(name="nightly")
    make_notification(job, ok=True)
    make_notification(job, ok=False, channel="webhook")
    changelist = reverse("admin:jobs_notification_changelist")

    every = admin_client.get(changelist)
    failed = admin_client.get(changelist, {"ok__exact": "0"})

    text = every.content.decode()
    assert "ops@example.com" in text
    assert "https://hooks.example.com/…" in text
    assert "Connection refused" in text
    assert [(n.channel, n.error) for n in failed.context["cl"].result_list] == [
        ("webhook", "Connection refused")
    ]
    hook = Notification.objects.get(channel="webhook")
    detail = admin_client.get(reverse("admin:jobs_notification_change", args=[hook.pk]))
    assert "https://hooks.example.com/…" in detail.content.decode()
    for page in (text, detail.content.decode()):
        assert "s3cr3t" not in page  # a webhook URL's path is often its token


def test_daily_stats_admin_lists_days_with_failures(admin_client, make_job):
    job = make_job(name="nightly")
    make_stats(job, 1, succeeded=5, failed=2, timed_out=1, executed=8, duration_total=80.0)
    make_stats(job, 2, succeeded=1, executed=1, duration_total=3.5, duration_max=3.5)

    response = admin_client.get(reverse("admin:jobs_jobdailystats_changelist"))

    rows = response.context["cl"].result_list
    assert [(r.day.day, r.succeeded, r.failures) for r in rows] == [(2, 1, 0), (1, 5, 3)]
    text = response.content.decode()
    assert "10.0 s" in text  # mean duration of day 1: 80 s over 8 runs
    assert "3.5 s" in text


@pytest.mark.parametrize("model", ["alertflip", "notification", "jobdailystats"])
def test_alert_history_is_read_only_even_for_a_superuser(admin_client, make_job, model):
    job = make_job()
    row = {
        "alertflip": lambda: make_flip(job, Job.AlertState.FAILING),
        "notification": lambda: make_notification(job),
        "jobdailystats": lambda: make_stats(job, 1, succeeded=1),
    }[model]()
    change = reverse(f"admin:jobs_{model}_change", args=[row.pk])

    assert admin_client.get(reverse(f"admin:jobs_{model}_add")).status_code == 403
    assert admin_client.post(change, {"reason": "edited", "target": "x"}).status_code == 403
    page = admin_client.get(change)
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()


def _changelist_queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


@pytest.mark.parametrize("model", ["alertflip", "notification", "jobdailystats"])
def test_alert_history_changelist_query_count_does_not_grow_with_rows(
    admin_client, make_job, model
):
    url = reverse(f"admin:jobs_{model}_changelist")

    def add_rows(start: int, count: int) -> None:
        for n in range(start, start + count):
            job = make_job(name=f"{model}-{n}")
            run = make_run(job, Run.Status.FAILED)
            make_flip(job, Job.AlertState.FAILING, run=run)
            make_notification(job)
            make_stats(job, 1 + n % 28, succeeded=1, executed=1, duration_total=1.0)

    add_rows(0, 2)
    few = _changelist_queries(admin_client, url)
    add_rows(2, 20)
    many = _changelist_queries(admin_client, url)

    assert many == few


def test_run_list_filters_by_a_job_offering_those_that_need_attention(admin_client, make_job):
    """The job filter lists failing/stale jobs (and the chosen one), not every job."""
    broken = make_job(name="broken-export")
    Job.objects.filter(pk=broken.pk).update(alert_state=Job.AlertState.FAILING)
    fine = make_job(name="fine-report")
    make_run(broken, Run.Status.FAILED)
    make_run(fine, Run.Status.SUCCEEDED)
    changelist = reverse("admin:jobs_run_changelist")

    every = admin_client.get(changelist).content.decode()
    only_fine = admin_client.get(changelist, {"job": fine.pk})

    assert f"?job={broken.pk}" in every and f"?job={fine.pk}" not in every
    assert [r.job.name for r in only_fine.context["cl"].result_list] == ["fine-report"]
    assert f"?job={fine.pk}" in only_fine.content.decode()  # the chosen job is offered
    assert admin_client.get(changelist, {"job": "nope"}).status_code == 200


def test_run_list_ignores_a_job_filter_that_is_not_a_number(admin_client, make_job):
    make_run(make_job(name="nightly"), Run.Status.FAILED)
    changelist = reverse("admin:jobs_run_changelist")

    response = admin_client.get(changelist, {"job": "²"})  # "²".isdigit(), but not int()

    assert response.status_code == 200
    assert [r.job.name for r in response.context["cl"].result_list] == ["nightly"]


# --- Change list filters: only the sidebar's --------------------------------------


@pytest.mark.parametrize(
    "lookup",
    [
        {"environment__API_TOKEN__startswith": "tok-9"},
        {"environment__API_TOKEN": "tok-9f8e7d6c"},
        {"deliver_password__startswith": "hun"},
        {"deliver_password": "hunter2"},
    ],
)
def test_view_only_user_cannot_probe_secrets_through_list_filters(
    view_only_client, make_job, lookup
):
    make_job(
        name="secretive",
        environment={"API_TOKEN": "tok-9f8e7d6c"},
        secret_keys=["API_TOKEN"],
        deliver_url="ftp://reports@ftp.example.com/in",
        deliver_password="hunter2",
    )

    response = view_only_client.get(reverse("admin:jobs_job_changelist"), lookup)

    assert response.status_code == 400
    assert "cl" not in (response.context or {})


@pytest.mark.parametrize(
    "model, lookup",
    [
        ("job", {"tags__regex": "("}),  # PostgreSQL: invalid regular expression
        ("job", {"timezone": "\x00"}),  # PostgreSQL: no NUL in a string literal
        ("job", {"command__contains": "etl"}),
        ("run", {"command__startswith": "echo"}),
        ("run", {"environment__TOKEN": "x"}),
        ("run", {"job__name": "nightly"}),
        ("notification", {"target__startswith": "ops"}),
        ("alertflip", {"reason__contains": "went"}),
        ("missedfires", {"count__gt": "1"}),
        ("jobdailystats", {"failed__gt": "1"}),
    ],
)
def test_change_lists_refuse_lookups_their_filters_do_not_offer(
    admin_client, make_job, model, lookup
):
    make_run(make_job(name="nightly"), Run.Status.FAILED)

    response = admin_client.get(reverse(f"admin:jobs_{model}_changelist"), lookup)

    assert response.status_code == 400


def test_every_filter_and_date_link_in_the_change_lists_still_works(admin_client, make_job):
    job = make_job(name="nightly", schedule="@daily", timezone="Europe/Berlin", tags="etl")
    Job.objects.filter(pk=job.pk).update(alert_state=Job.AlertState.FAILING)
    run = make_run(job, Run.Status.FAILED)
    make_missed(job, count=3)
    make_flip(job, Job.AlertState.FAILING, run=run)
    make_notification(job, ok=False)
    make_stats(job, 1, failed=1, executed=1)

    checked = 0
    for model in ["job", "run", "missedfires", "alertflip", "notification", "jobdailystats"]:
        changelist = reverse(f"admin:jobs_{model}_changelist")
        cl = admin_client.get(changelist).context["cl"]
        links = [choice["query_string"] for spec in cl.filter_specs for choice in spec.choices(cl)]
        if cl.date_hierarchy:
            day = f"{cl.date_hierarchy}__year=2030&{cl.date_hierarchy}__month=1"
            links += [f"?{day}", f"?{day}&{cl.date_hierarchy}__day=2"]
        for link in links:
            assert admin_client.get(changelist + link).status_code == 200, (model, link)
            checked += 1

    assert checked > 40


def test_an_overlong_search_is_refused_with_a_message_not_a_database_error(admin_client, make_job):
    make_job(name="nightly")

    response = admin_client.get(reverse("admin:jobs_job_changelist"), {"q": "x" * 100_000})

    assert response.status_code == 200
    assert [j.name for j in response.context["cl"].result_list] == ["nightly"]
    assert any("at most 200 characters" in m for m in messages_of(response))
