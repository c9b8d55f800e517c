"""The dashboard pages: overview, job page, run page, log tail and download,
/stale/ and /failures/."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connections
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from jobs import alerts, runlog, services, views
from jobs.models import AlertFlip, Job, JobDailyStats, MissedFires, Notification, Run, RunLogChunk
from jobs.templatetags.jobs_tags import duration
from tests.conftest import browser_login, chromium_path


def make_runs(job: Job, statuses: list[str], *, start: datetime | None = None) -> list[Run]:
    """Finished manual runs of `job`, oldest first, one minute apart."""
    start = start or timezone.now() - timedelta(days=1)
    runs = []
    for i, status in enumerate(statuses):
        at = start + timedelta(minutes=i)
        runs.append(
            Run(
                job=job,
                status=status,
                trigger=Run.Trigger.MANUAL,
                scheduled_for=at,
                queued_at=at,
                started_at=at + timedelta(seconds=1),
                finished_at=at + timedelta(seconds=3),
                exit_code=0 if status == Run.Status.SUCCEEDED else 1,
            )
        )
    runs = Run.objects.bulk_create(runs)
    ended = [run for run in runs if run.status not in (*Run.ACTIVE, Run.Status.SKIPPED)]
    if ended:  # what the end of each run records on the job (services)
        job.last_end_run_id, job.last_end_status = ended[-1].pk, ended[-1].status
        job.save(update_fields=["last_end_run_id", "last_end_status"])
    return runs


# Session, user, job, upstreams, downstreams, missed fires, history page;
# success rates (24 h from runs, 7 and 30 d from rollups), daily rollups,
# last 100 durations, flips, notifications.
JOB_PAGE_QUERIES = 14


def text_of(response) -> str:
    return b"".join(response.streaming_content).decode()


# --- Login ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/", "/jobs/x/", "/runs/1/", "/runs/1/log/", "/runs/1/log/download/", "/stale/", "/failures/"],
)
def test_anonymous_visitor_is_sent_to_login(client, db, path):
    response = client.get(path)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


# Pages a visitor reaches without a login: the health check, the way in, and
# the icon (a redirect to a static file, as the CSS and scripts are).
PUBLIC = {"/health/", "/accounts/login/", "/favicon.ico"}


def _every_path(patterns=None, prefix=""):
    """Each URL the project serves, with 1 for each argument (admin excluded:
    its own site sends visitors to its own login)."""
    from django.urls import URLPattern, URLResolver, get_resolver

    for entry in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            if not route.startswith("admin/"):
                yield from _every_path(entry.url_patterns, route)
        elif isinstance(entry, URLPattern):
            yield "/" + re.sub(r"<(?:\w+:)?\w+>", "1", route).lstrip("^").rstrip("$")


def test_every_page_but_health_and_login_needs_a_login(client, db):
    """The brief's rule, over every URL there is, so a page added later (or
    one a contrib app brings along, such as password reset) cannot slip by."""
    paths = set(_every_path())
    assert {"/", "/runs/1/log/", "/metrics", "/accounts/logout/"} <= paths

    for path in sorted(paths - PUBLIC):
        response = client.get(path)
        assert response.status_code in (302, 401, 405), path
        if response.status_code == 302:
            assert response["Location"].startswith("/accounts/login/?next="), path


def test_no_password_reset_by_email_for_visitors(client, db):
    """No page sends mail to an address a visitor types (users are managed by
    an admin; `manage.py changepassword` resets a password)."""
    assert client.get("/accounts/password_reset/").status_code == 404
    assert client.post("/accounts/password_reset/", {"email": "a@x.org"}).status_code == 404


def test_login_page_renders_a_form(client, db):
    response = client.get("/accounts/login/?next=/")

    assert response.status_code == 200
    assert 'name="password"' in response.content.decode()


def test_logout_is_a_post_form(admin_client):
    html = admin_client.get("/").content.decode()

    assert re.search(r'<form[^>]*method="post"[^>]*action="/accounts/logout/"', html)


# --- Overview -------------------------------------------------------------------


def test_overview_shows_each_job_with_status_schedule_and_strip(admin_client, make_job):
    nightly = make_job(name="nightly-export", schedule="15 2 * * *", timezone="Europe/Berlin")
    broken = make_job(name="broken-import", schedule="*/5 * * * *")
    make_job(name="by-hand")
    make_job(name="on-hold", schedule="@daily", enabled=False)
    make_runs(nightly, [Run.Status.FAILED, Run.Status.SUCCEEDED])
    bad = make_runs(broken, [Run.Status.SUCCEEDED, Run.Status.TIMED_OUT])

    html = admin_client.get("/").content.decode()

    rows = dict(re.findall(r'<tr data-job="([^"]+)">(.*?)</tr>', html, re.S))
    assert set(rows) == {"nightly-export", "broken-import", "by-hand", "on-hold"}
    assert 'data-status="succeeded"' in rows["nightly-export"]
    assert "At 02:15 (Europe/Berlin)" in rows["nightly-export"]
    assert 'data-status="timed_out"' in rows["broken-import"]
    assert f'href="/runs/{bad[1].pk}/"' in rows["broken-import"]
    assert rows["broken-import"].count('class="sq ') == 2
    assert 'class="sq tone-bad"' in rows["broken-import"]
    assert "Never run" in rows["by-hand"] and "manual" in rows["by-hand"]
    assert "paused" in rows["on-hold"]
    assert re.search(r"<strong>1</strong> failing", html)
    assert re.search(r"<strong>1</strong> paused", html)


def test_overview_counts_running_jobs(admin_client, make_job):
    job = make_job()
    run = make_runs(job, [Run.Status.SUCCEEDED])[0]
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, finished_at=None)

    html = admin_client.get("/").content.decode()

    assert re.search(r"<strong>1</strong> running", html)
    assert 'data-status="running"' in html


def test_overview_query_count_does_not_grow_with_jobs_or_runs(
    admin_client, make_job, django_assert_max_num_queries
):
    admin_client.get("/")  # session and user lookups warm up
    for _ in range(30):
        make_runs(make_job(schedule="* * * * *"), [Run.Status.SUCCEEDED] * 29 + ["failed"])

    with django_assert_max_num_queries(5):
        html = admin_client.get("/").content.decode()

    # Each strip is capped at the 20 latest runs, newest (the failure) last.
    assert html.count('class="sq ') == 30 * 20
    assert re.search(r"<strong>30</strong> failing", html)


# --- Job page ---------------------------------------------------------------------


def test_job_page_lists_next_five_fires_in_job_zone_with_dst_note(client, make_user, make_job):
    job = make_job(name="berlin", schedule="30 2 * * *", timezone="Europe/Berlin")
    # Log in inside the frozen time, or the session would have expired by then.
    with time_machine.travel(datetime(2027, 3, 26, 12, 0, tzinfo=UTC), tick=False):
        client.force_login(make_user(superuser=True))
        html = client.get(job.get_absolute_url()).content.decode()

    fires = re.findall(r"<time [^>]*>([^<]+)</time>", html)
    assert fires == [
        "Sat 2027-03-27 02:30 CET (+01:00)",
        "Sun 2027-03-28 03:00 CEST (+02:00)",
        "Mon 2027-03-29 02:30 CEST (+02:00)",
        "Tue 2027-03-30 02:30 CEST (+02:00)",
        "Wed 2027-03-31 02:30 CEST (+02:00)",
    ]
    assert "02:30 does not exist that day (DST); fires at 03:00" in html
    assert "<code>30 2 * * *</code> in Europe/Berlin" in html


def test_job_page_shows_definition_with_secret_masked(admin_client, make_job):
    job = make_job(
        name="exporter",
        command="curl -H 'x: $TOKEN' https://example.com",
        environment={"TOKEN": "s3cr3t-value", "TARGET": "reports"},
        secret_keys=["TOKEN"],
        owner="data-team",
        tags="etl, nightly",
    )

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "s3cr3t-value" not in html
    assert "••••••" in html and "reports" in html
    assert "data-team" in html and ">nightly<" in html
    assert "Manual only" in html


def test_job_history_pages_by_id_without_counting(
    admin_client, make_job, django_assert_max_num_queries
):
    job = make_job()
    runs = make_runs(job, [Run.Status.SUCCEEDED] * 60)
    ids = [r.pk for r in reversed(runs)]  # newest first

    def shown(html: str) -> list[int]:
        return [int(n) for n in re.findall(r'<td><a href="/runs/\d+/">#(\d+)</a></td>', html)]

    with django_assert_max_num_queries(JOB_PAGE_QUERIES) as queries:
        first = admin_client.get(job.get_absolute_url()).content.decode()
    assert not any("COUNT(" in q["sql"].upper() for q in queries.captured_queries)
    assert shown(first) == ids[:25]
    assert f"?before={ids[24]}" in first and "Newer" not in first

    second = admin_client.get(f"{job.get_absolute_url()}?before={ids[24]}").content.decode()
    assert shown(second) == ids[25:50]
    third = admin_client.get(f"{job.get_absolute_url()}?before={ids[49]}").content.decode()
    assert shown(third) == ids[50:]
    assert "Older" not in third

    back = admin_client.get(f"{job.get_absolute_url()}?after={ids[25]}").content.decode()
    assert shown(back) == ids[:25]


def test_job_history_filters_by_status(admin_client, make_job):
    job = make_job()
    runs = make_runs(job, [Run.Status.SUCCEEDED, Run.Status.FAILED] * 20)
    failed = [r.pk for r in reversed(runs) if r.status == Run.Status.FAILED]

    html = admin_client.get(f"{job.get_absolute_url()}?status=failed").content.decode()

    shown = [int(n) for n in re.findall(r'<td><a href="/runs/\d+/">#(\d+)</a></td>', html)]
    assert shown == failed
    assert '<option value="failed" selected>' in html


@pytest.mark.parametrize(
    ("query", "message"),
    [("status=exploded", "Unknown status"), ("before=abc", "whole number")],
)
def test_job_page_rejects_bad_filters_with_a_message(admin_client, make_job, query, message):
    job = make_job()

    response = admin_client.get(f"{job.get_absolute_url()}?{query}")

    assert response.status_code == 400
    assert message in response.content.decode()


def test_unknown_job_and_run_are_not_found(admin_client, db):
    assert admin_client.get("/jobs/no-such-job/").status_code == 404
    assert admin_client.get("/runs/999999/").status_code == 404
    assert admin_client.get("/runs/999999/log/").status_code == 404
    assert admin_client.get("/runs/999999/log/download/").status_code == 404
    assert admin_client.post("/jobs/no-such-job/run/").status_code == 404


# --- Run now and rerun ---------------------------------------------------------------


def test_run_now_is_post_only(client, make_job, make_user):
    job = make_job()
    client.force_login(make_user(perms=("jobs.run_job",)))

    response = client.get(reverse("jobs-job-run", args=[job.slug]))

    assert response.status_code == 405
    assert not job.runs.exists()


JOB_BUTTONS = ("jobs-job-run", "jobs-job-pause", "jobs-job-resume", "jobs-job-backfill")


@pytest.mark.parametrize("action", [*JOB_BUTTONS, "jobs-run-rerun", "jobs-run-cancel"])
def test_a_button_pressed_after_the_session_ended_leads_back_to_its_page_after_login(
    client, make_job, make_user, action
):
    job = make_job(slug="nightly")
    run = running_run_with_chunks(job, [])
    make_user("analyst", perms=("jobs.run_job",))
    if action == "jobs-job-backfill":
        gap = MissedFires.objects.create(
            job=job, first=run.queued_at, last=run.queued_at, count=1, policy="latest",
            recorded_at=run.queued_at,
        )  # fmt: skip
        action_url = reverse(action, args=[job.slug, gap.pk])
    else:
        action_url = reverse(action, args=[job.slug if action in JOB_BUTTONS else run.pk])
    button_page = job.get_absolute_url() if action in JOB_BUTTONS else run.get_absolute_url()

    pressed = client.post(action_url)  # the session cookie is gone: no user
    login = client.get(pressed["Location"])
    logged_in = client.post(
        pressed["Location"],
        {"username": "analyst", "password": "pw-secret-1", "next": login.context["next"]},
        follow=True,
    )

    assert logged_in.status_code == 200
    assert logged_in.redirect_chain[-1][0] == button_page
    assert Run.objects.count() == 1 and Run.objects.get().status == Run.Status.RUNNING


def test_run_now_needs_the_run_permission(client, make_job, make_user):
    job = make_job()
    client.force_login(make_user())

    page = client.get(job.get_absolute_url()).content.decode()
    response = client.post(reverse("jobs-job-run", args=[job.slug]))

    assert response.status_code == 403
    assert not job.runs.exists()
    assert reverse("jobs-job-run", args=[job.slug]) not in page
    assert re.search(r"<button[^>]*disabled[^>]*>Run now</button>", page)


def test_run_now_creates_a_manual_run_by_the_user(client, make_job, make_user):
    job = make_job()
    user = make_user(perms=("jobs.run_job",))
    client.force_login(user)

    response = client.post(reverse("jobs-job-run", args=[job.slug]), follow=True)

    run = job.runs.get()
    assert (run.trigger, run.triggered_by, run.status) == ("manual", user, "queued")
    assert response.redirect_chain == [(run.get_absolute_url(), 302)]
    assert f"Run #{run.pk} of {job.name} is queued." in response.content.decode()


def test_rerun_creates_a_run_for_the_same_logical_time(client, make_job, make_user):
    job = make_job()
    original = make_runs(job, [Run.Status.FAILED])[0]
    user = make_user(perms=("jobs.run_job",))
    client.force_login(user)

    assert client.get(reverse("jobs-run-rerun", args=[original.pk])).status_code == 405
    response = client.post(reverse("jobs-run-rerun", args=[original.pk]))

    rerun = job.runs.exclude(pk=original.pk).get()
    assert response["Location"] == rerun.get_absolute_url()
    assert (rerun.trigger, rerun.rerun_of, rerun.triggered_by) == ("rerun", original, user)
    assert rerun.scheduled_for == original.scheduled_for
    html = client.get(rerun.get_absolute_url()).content.decode()
    assert f'rerun of <a href="/runs/{original.pk}/">#{original.pk}</a>' in html
    assert "Followed by" not in html


def test_a_failed_runs_page_says_what_came_of_it(admin_client, make_job):
    """On call, opening the failed run from an alert: was it retried, rerun,
    and how did that go? Links forward, not only back."""
    job = make_job(command="exit 1", retries=1)
    failed = services.run_foreground(job=job, echo=lambda text: None)
    retry = Run.objects.get(retry_of=failed)
    rerun = services.run_rerun(run=failed, by=None)

    html = admin_client.get(failed.get_absolute_url()).content.decode()

    followed = re.search(r'<dd id="followed-by">(.*?)</dd>', html, re.S).group(1)
    assert f'<a href="/runs/{retry.pk}/">#{retry.pk}</a> retry (attempt 2)' in followed
    assert f'<a href="/runs/{rerun.pk}/">#{rerun.pk}</a> rerun' in followed
    # Each with its status: the retry waits; the rerun was skipped behind it.
    assert 'data-status="queued">Queued</span>, <a' in followed
    assert followed.endswith('data-status="skipped">Skipped</span>')


def test_rerun_needs_the_run_permission(client, make_job, make_user):
    original = make_runs(make_job(), [Run.Status.FAILED])[0]
    client.force_login(make_user())

    assert client.post(reverse("jobs-run-rerun", args=[original.pk])).status_code == 403
    assert Run.objects.count() == 1


def test_cancel_stops_a_queued_run_and_needs_the_run_permission(client, make_job, make_user):
    job = make_job()
    now = timezone.now()
    run = Run.objects.create(
        job=job,
        status=Run.Status.QUEUED,
        trigger=Run.Trigger.MANUAL,
        scheduled_for=now,
        queued_at=now,
    )
    url = reverse("jobs-run-cancel", args=[run.pk])
    client.force_login(make_user())
    assert client.post(url).status_code == 403
    user = make_user(perms=("jobs.run_job",))
    client.force_login(user)
    assert "Cancel</button>" in client.get(run.get_absolute_url()).content.decode()

    assert client.get(url).status_code == 405
    response = client.post(url, follow=True)

    run.refresh_from_db()
    assert (run.status, run.cancelled_by) == ("cancelled", user)
    html = response.content.decode()
    assert f"Run #{run.pk} is cancelled." in html
    assert f"cancelled by {user.username}" in html and "Cancel</button>" not in html


def test_job_page_shows_upstreams_and_downstreams_with_their_status(admin_client, make_job):
    load = make_job(name="load", command="exit 2")
    export, report = make_job(name="export"), make_job(name="report")
    export.upstreams.add(load)
    report.upstreams.add(export)
    services.run_foreground(job=load, echo=lambda text: None)

    html = admin_client.get(export.get_absolute_url()).content.decode()

    runs_after = html.split("<dt>Runs after</dt>")[1].split("</dd>")[0]
    assert '<a href="/jobs/load/">load</a>' in runs_after and "Failed" in runs_after
    feeds = html.split("<dt>Feeds</dt>")[1].split("</dd>")[0]
    assert '<a href="/jobs/report/">report</a>' in feeds and "never ran" in feeds


def test_job_page_says_which_fires_were_missed_and_why(admin_client, make_job):
    from jobs.models import MissedFires

    job = make_job(name="nightly", schedule="0 2 * * *", catchup="none", retries=2)
    MissedFires.objects.create(
        job=job,
        first=datetime(2027, 1, 1, 2, tzinfo=UTC),
        last=datetime(2027, 1, 3, 2, tzinfo=UTC),
        count=3,
        policy="none",
        recorded_at=timezone.now(),
    )

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "Missed while no scheduler ran" in html
    assert "<strong>3</strong> fires from" in html
    assert "catch-up “none”" in html
    assert "2 (first after 30 s" in html


# --- Run page -------------------------------------------------------------------------


def test_run_page_shows_timings_lateness_exit_code_and_who(admin_client, make_job, make_user):
    job = make_job(name="late-one")
    alice = make_user("alice")
    scheduled = datetime(2027, 1, 5, 2, 15, tzinfo=UTC)
    run = Run.objects.create(
        job=job,
        status=Run.Status.FAILED,
        trigger=Run.Trigger.MANUAL,
        triggered_by=alice,
        scheduled_for=scheduled,
        queued_at=scheduled,
        started_at=scheduled + timedelta(seconds=74),
        finished_at=scheduled + timedelta(seconds=74 + 184),
        exit_code=3,
        worker="box:123",
        error_summary="Exit code 3",
        command="exit 3",
    )

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "Manual by alice" in html
    assert "1 min 14 s after scheduled time" in html
    assert "3 min 4 s" in html
    assert "<dt>Exit code</dt><dd>3</dd>" in html
    assert "2027-01-05 02:15:00 +00:00" in html
    assert "box:123" in html and "Exit code 3" in html
    assert 'data-status="failed"' in html
    assert "data-tail-url" not in html and "tail.js" not in html


def test_secret_is_masked_on_run_page_and_in_download(admin_client, make_job):
    job = make_job(
        command='echo "token is $TOKEN"',
        environment={"TOKEN": "s3cr3t-value"},
        secret_keys=["TOKEN"],
    )
    run = services.run_foreground(job=job, echo=lambda s: None)
    assert run.status == Run.Status.SUCCEEDED

    html = admin_client.get(run.get_absolute_url()).content.decode()
    download = text_of(admin_client.get(reverse("jobs-run-log-download", args=[run.pk])))

    assert "s3cr3t-value" not in html and "s3cr3t-value" not in download
    assert "token is ••••••" in html
    assert download == "token is ••••••\n"
    assert re.search(r"<th>TOKEN</th><td><code>••••••</code>", html)
    assert "<th>JOBSITE_RUN_ID</th>" in html


@override_settings(JOBSITE_LOG_HEAD_BYTES=100, JOBSITE_LOG_TAIL_BYTES=200)
def test_log_download_is_the_full_stored_log_with_dropped_marker(admin_client, make_job):
    job = make_job(slug="chatty", name="chatty", command="seq 1 5000")
    run = services.run_foreground(job=job, echo=lambda s: None)

    response = admin_client.get(reverse("jobs-run-log-download", args=[run.pk]))
    log = text_of(response)

    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="chatty-run-{run.pk}.log"'
    assert log.startswith("1\n2\n3\n")
    assert log.endswith("4999\n5000\n")
    assert f"{run.log_dropped_bytes:,} bytes of output dropped" in log
    assert run.log_dropped_bytes > 0
    assert "bytes of output dropped" in admin_client.get(run.get_absolute_url()).content.decode()


def test_log_is_shown_escaped(admin_client, make_job):
    job = make_job(command="echo '<script>alert(1)</script>'")
    run = services.run_foreground(job=job, echo=lambda s: None)

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# --- Live tail ---------------------------------------------------------------------------


def running_run_with_chunks(job: Job, texts: list[str]) -> Run:
    now = timezone.now()
    run = Run.objects.create(
        job=job,
        status=Run.Status.RUNNING,
        trigger=Run.Trigger.MANUAL,
        scheduled_for=now - timedelta(seconds=5),
        queued_at=now - timedelta(seconds=5),
        started_at=now - timedelta(seconds=4),
    )
    RunLogChunk.objects.bulk_create(
        RunLogChunk(run=run, seq=i, is_head=True, data=text, size=len(text))
        for i, text in enumerate(texts, start=1)
    )
    return run


def test_running_run_page_tails_its_log(admin_client, make_job):
    run = running_run_with_chunks(make_job(), ["one\n", "two\n"])

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert f'data-tail-url="/runs/{run.pk}/log/"' in html
    assert 'data-last-seq="2" data-tail-end="0">\none\ntwo\n</pre>' in html
    assert "jobs/tail.js" in html


def test_log_fragment_returns_only_chunks_after_the_given_seq(admin_client, make_job):
    run = running_run_with_chunks(make_job(), ["first\n", "second\n", "third <b>\n"])

    response = admin_client.get(reverse("jobs-run-log", args=[run.pk]), {"after": 2})
    html = response.content.decode()

    assert response.status_code == 200
    assert "third &lt;b&gt;" in html
    assert "first" not in html and "second" not in html
    assert 'data-last-seq="3"' in html and 'data-final="0"' in html
    assert 'data-status="running"' in html


def test_log_fragment_says_final_when_run_finished(admin_client, make_job):
    run = running_run_with_chunks(make_job(), ["done\n"])
    services.run_finish(run=run, status=Run.Status.SUCCEEDED, exit_code=0)

    html = admin_client.get(reverse("jobs-run-log", args=[run.pk]), {"after": 1}).content.decode()

    assert 'data-final="1"' in html and 'data-last-seq="1"' in html
    assert 'data-status="succeeded"' in html


MARKER = re.compile(r"\n\[… ([\d,]+) bytes of output dropped here \(log cap\) …\]\n")


def fill_markers(shown: str, output: str) -> str:
    """`shown` with each dropped-bytes marker replaced by as many bytes of
    `output` (ASCII) as it says were dropped there: `output` again, if the
    markers are in the right places with the right counts."""
    filled = ""
    for i, piece in enumerate(MARKER.split(shown)):
        if i % 2:  # a marker's count
            piece = output[len(filled) : len(filled) + int(piece.replace(",", ""))]
        filled += piece
    return filled


def tail_position(html: str) -> dict[str, str]:
    """?after= and ?tail_end= as the page or fragment tells the live tail."""
    found = re.search(r'data-last-seq="(\d+)" data-tail-end="(\d+)"', html)
    return {"after": found[1], "tail_end": found[2]}


def tail_text(html: str) -> str:
    return re.search(r'<pre class="tail-text">\n(.*?)</pre>', html, re.S)[1]


class NumberedOutput:
    """A running run whose output is numbered lines, written by the real
    RunLogWriter with a small head and tail."""

    def __init__(self, job: Job) -> None:
        self.run = running_run_with_chunks(job, [])
        self.writer = runlog.RunLogWriter(self.run, head_cap=200, tail_cap=400)
        self.output = ""

    def emit(self, lines: int) -> None:
        for _ in range(lines):
            line = f"line {self.output.count(chr(10)) + 1:05d}\n"
            self.output += line
            self.writer.feed(line.encode())
            if self.output.count("\n") % 10 == 0:
                self.writer.flush()
        self.writer.flush()


@override_settings(JOBSITE_LOG_FLUSH_BYTES=100)
def test_live_tail_marks_output_dropped_since_it_last_looked(admin_client, make_job):
    job_output = NumberedOutput(make_job())
    job_output.emit(10)  # in the head
    page = admin_client.get(job_output.run.get_absolute_url()).content.decode()
    shown = re.search(r"data-tail-end=\"0\">\n(.*?)</pre>", page, re.S)[1]
    url = reverse("jobs-run-log", args=[job_output.run.pk])

    for _ in range(3):  # each more than the tail keeps: what the tail saw last is gone
        job_output.emit(60)
        fragment = admin_client.get(url, tail_position(page)).content.decode()
        shown += tail_text(fragment)
        page = fragment

    assert len(MARKER.findall(shown)) == 3
    assert fill_markers(shown, job_output.output) == job_output.output
    assert shown.endswith("line 00190\n")


@override_settings(JOBSITE_LOG_FLUSH_BYTES=100)
def test_live_tail_needs_no_marker_while_it_keeps_up(admin_client, make_job):
    job_output = NumberedOutput(make_job())
    job_output.emit(40)  # past the head, nothing dropped yet
    page = admin_client.get(job_output.run.get_absolute_url()).content.decode()
    url = reverse("jobs-run-log", args=[job_output.run.pk])

    job_output.emit(20)  # the tail drops what the reader already has
    fragment = admin_client.get(url, tail_position(page)).content.decode()

    assert Run.objects.get(pk=job_output.run.pk).log_dropped_bytes > 0
    assert tail_text(fragment) == "".join(f"line {n:05d}\n" for n in range(41, 61))


def test_log_fragment_rejects_a_bad_seq(admin_client, make_job):
    run = running_run_with_chunks(make_job(), ["x\n"])

    response = admin_client.get(reverse("jobs-run-log", args=[run.pk]), {"after": "x"})

    assert response.status_code == 400


@pytest.mark.browser
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium found (apt-get install chromium)")
def test_browser_tails_a_running_log_and_reloads_when_it_ends(
    live_server, make_user, make_job, monkeypatch
):
    from playwright.sync_api import expect, sync_playwright

    # Playwright's sync API runs an event loop; our ORM calls here are plain sync code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    make_user("watcher", superuser=True)
    run = running_run_with_chunks(make_job(name="tailed"), ["first line\n"])

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path())
        page = browser.new_page()
        page.goto(f"{live_server.url}/accounts/login/?next=/runs/{run.pk}/")
        page.fill("#id_username", "watcher")
        page.fill("#id_password", "pw-secret-1")
        page.click("button[type=submit]")
        log = page.locator("#run-log")
        expect(log).to_have_text("first line\n")

        RunLogChunk.objects.create(run=run, seq=2, is_head=True, data="second line\n", size=12)
        expect(log).to_have_text("first line\nsecond line\n", timeout=5000)
        expect(page.locator("#run-progress")).to_be_hidden()

        Run.objects.filter(pk=run.pk).update(
            progress_done=5, progress_total=20, progress_message="day 5 of 20"
        )
        progress = page.locator("#run-progress")
        expect(progress.locator(".progress-text")).to_have_text("5 of 20 (25%)", timeout=5000)
        expect(progress.locator(".progress-message")).to_have_text("day 5 of 20")
        expect(progress.locator("progress")).to_have_attribute("value", "5")
        expect(page.locator("#no-progress")).to_have_count(0)

        Run.objects.filter(pk=run.pk).update(
            status=Run.Status.SUCCEEDED, finished_at=timezone.now(), exit_code=0
        )
        expect(page.locator("#run-status .badge")).to_have_text("Succeeded", timeout=5000)
        expect(page.locator("#run-log")).not_to_have_attribute("data-tail-url", re.compile(".*"))
        browser.close()
        # ORM calls under Playwright's event loop get their own connection
        # (asgiref locals are per context): close it, or dropping the test
        # database fails.
        connections.close_all()


# --- Stale jobs --------------------------------------------------------------------------

NOON = datetime(2027, 1, 5, 12, 4, tzinfo=UTC)  # 13:04 in Berlin


def scheduled_job(make_job, *, created: datetime, **fields) -> Job:
    """A scheduled job that has existed since `created` (created_at is auto_now_add)."""
    job = make_job(**fields)
    Job.objects.filter(pk=job.pk).update(created_at=created)
    job.refresh_from_db()
    return job


def stale_rows(html: str) -> dict[str, str]:
    return dict(re.findall(r'<tr data-job="([^"]+)">(.*?)</tr>', html, re.S))


def test_stale_page_lists_a_job_without_a_run_for_its_last_fire(client, make_user, make_job):
    scheduled_job(
        make_job, name="every-five", schedule="*/5 * * * *", created=NOON - timedelta(days=1)
    )
    scheduled_job(make_job, name="by-hand", created=NOON - timedelta(days=1))
    scheduled_job(
        make_job,
        name="paused",
        schedule="*/5 * * * *",
        enabled=False,
        created=NOON - timedelta(days=1),
    )
    with time_machine.travel(NOON, tick=False):
        client.force_login(make_user(superuser=True))
        html = client.get("/stale/").content.decode()

    rows = stale_rows(html)
    assert list(rows) == ["every-five"]
    # 12:00 fire + 2.5 min grace (half the interval) passed at 12:02:30.
    assert "due <time" in rows["every-five"]
    assert ">12:00 UTC</time>, <strong>1 min 30 s</strong> overdue" in rows["every-five"]
    assert "no run for the fire at 2027-01-05 12:00 UTC" in rows["every-five"]
    assert "never ran" in rows["every-five"]
    assert '<a href="/jobs/every-five/">every-five</a>' in rows["every-five"]


def test_a_grace_stored_before_its_bound_breaks_no_page(admin_client, make_job):
    """A row saved before Job.clean bounded grace: datetime minus 99999999 h
    overflowed on every page that checks staleness, for every job."""
    job = make_job(name="nightly", schedule="@daily")
    # SQLite kept 99999999 h; PostgreSQL's integer stops at 68 years.
    grace = 99999999 * 3600 if connections["default"].vendor == "sqlite" else 2**31 - 1
    Job.objects.filter(pk=job.pk).update(grace=grace)

    for url in ["/", "/stale/", "/jobs/nightly/", reverse("admin:jobs_job_change", args=[job.pk])]:
        assert admin_client.get(url).status_code == 200, url
    assert alerts.check_stale(now=timezone.now()) == 0


def test_job_that_ran_and_succeeded_for_its_last_fire_is_not_stale(client, make_user, make_job):
    job = scheduled_job(
        make_job, name="every-five", schedule="*/5 * * * *", created=NOON - timedelta(days=1)
    )
    with time_machine.travel(NOON, tick=True):
        client.force_login(make_user(superuser=True))
        assert "every-five" in stale_rows(client.get("/stale/").content.decode())

        fire = datetime(2027, 1, 5, 12, 0, tzinfo=UTC)
        run = services.run_create(
            job=job, trigger=Run.Trigger.SCHEDULE, scheduled_for=fire, here=True
        )
        claimed = services.run_claim(run_id=run.pk, worker=services.worker_name())
        assert services.run_execute(claimed, echo=lambda s: None).status == "succeeded"

        stale_page = client.get("/stale/").content.decode()
        overview = client.get("/").content.decode()

    assert stale_rows(stale_page) == {}
    assert "Nothing is stale" in stale_page
    assert re.search(r"<strong>0</strong> stale", overview)
    assert 'class="stale"' not in overview


def test_stopped_scheduler_makes_jobs_stale_most_overdue_first(client, make_user, make_job):
    # The scheduler last fired these three days ago, then stopped.
    three_days_ago = NOON - timedelta(days=3)
    nightly = scheduled_job(
        make_job,
        name="nightly",
        schedule="0 2 * * *",
        timezone="Europe/Berlin",
        created=NOON - timedelta(days=30),
    )
    Job.objects.filter(pk=nightly.pk).update(
        last_scheduled_for=three_days_ago, last_success_at=three_days_ago
    )
    last = make_runs(nightly, [Run.Status.SUCCEEDED], start=three_days_ago)[0]
    scheduled_job(
        make_job, name="every-five", schedule="*/5 * * * *", created=NOON - timedelta(days=1)
    )

    with time_machine.travel(NOON, tick=False):
        client.force_login(make_user(superuser=True))
        html = client.get("/stale/").content.decode()

    rows = stale_rows(html)
    assert list(rows) == ["nightly", "every-five"]
    # 02:00 CET = 01:00 UTC, grace 1 h (half a day, capped): overdue since 02:00 UTC.
    assert ">02:00 CET</time>, <strong>10 h 4 min</strong> overdue" in rows["nightly"]
    assert "no run for the fire at 2027-01-05 02:00 CET" in rows["nightly"]
    assert (
        f'href="/runs/{last.pk}/"' in rows["nightly"]
        and 'data-status="succeeded"' in rows["nightly"]
    )
    assert "3\xa0days ago" in rows["nightly"]


def test_overview_counts_stale_jobs_and_marks_their_rows(client, make_user, make_job):
    scheduled_job(
        make_job, name="every-five", schedule="*/5 * * * *", created=NOON - timedelta(days=1)
    )
    scheduled_job(make_job, name="by-hand", created=NOON - timedelta(days=1))
    with time_machine.travel(NOON, tick=False):
        client.force_login(make_user(superuser=True))
        html = client.get("/").content.decode()

    assert re.search(r'<a href="/stale/"><strong>1</strong> stale</a>', html)
    assert '<tr data-job="every-five" class="stale">' in html
    assert '<tr data-job="by-hand">' in html
    assert "Stale · 1 min 30 s overdue" in html


def overview_jobs(html: str) -> list[str]:
    return re.findall(r'<tr data-job="([^"]+)"', html)


@pytest.fixture
def six_jobs(make_job, monkeypatch):
    """Two jobs a page; one of each kind needing attention, on pages 2 and 3."""
    monkeypatch.setattr(views, "JOBS_PAGE_SIZE", 2)
    make_runs(make_job(name="a-fine"), [Run.Status.SUCCEEDED], start=NOON - timedelta(hours=2))
    make_job(name="b-fine")
    make_runs(make_job(name="c-broken"), [Run.Status.FAILED], start=NOON - timedelta(hours=2))
    busy = make_runs(make_job(name="d-busy"), [Run.Status.SUCCEEDED], start=NOON)[0]
    Run.objects.filter(pk=busy.pk).update(status=Run.Status.RUNNING, finished_at=None)
    make_job(name="e-held", schedule="@daily", enabled=False)
    scheduled_job(make_job, name="f-late", schedule="*/5 * * * *", created=NOON - timedelta(days=1))


def get_at_noon(client, user, url: str):
    with time_machine.travel(NOON, tick=False):
        client.force_login(user)
        return client.get(url)


def test_overview_pages_jobs_by_name_with_links_between_pages(client, make_user, six_jobs):
    user = make_user(superuser=True)

    first = get_at_noon(client, user, "/").content.decode()
    second = get_at_noon(client, user, "/?page=2").content.decode()
    past_the_end = get_at_noon(client, user, "/?page=9").content.decode()

    assert overview_jobs(first) == ["a-fine", "b-fine"]
    assert 'href="?show=all&amp;page=2" rel="next"' in first and 'rel="prev"' not in first
    assert "Page 1 of 3: jobs 1–2 of 6" in first
    assert overview_jobs(second) == ["c-broken", "d-busy"]
    assert 'href="?show=all&amp;page=1" rel="prev"' in second
    assert 'href="?show=all&amp;page=3" rel="next"' in second
    assert overview_jobs(past_the_end) == ["e-held", "f-late"]  # the last page


def test_overview_counts_cover_the_jobs_on_other_pages(client, make_user, six_jobs):
    html = get_at_noon(client, make_user(superuser=True), "/").content.decode()

    assert overview_jobs(html) == ["a-fine", "b-fine"]
    assert re.search(r"<strong>1</strong> running", html)
    assert re.search(r"<strong>1</strong> failing", html)
    assert re.search(r"<strong>1</strong> stale", html)
    assert re.search(r"<strong>1</strong> paused", html)
    assert re.search(r'data-filter="all">All jobs <span class="n">6</span>', html)


@pytest.mark.parametrize(
    "show, expected",
    [("failing", "c-broken"), ("running", "d-busy"), ("paused", "e-held"), ("stale", "f-late")],
)
def test_overview_filter_shows_only_the_jobs_needing_attention(
    client, make_user, six_jobs, show, expected
):
    html = get_at_noon(client, make_user(superuser=True), f"/?show={show}").content.decode()

    assert overview_jobs(html) == [expected]
    assert re.search(rf'class="current" aria-current="page" data-filter="{show}"', html)
    # The counts still cover every job.
    assert re.search(r'data-filter="all">All jobs <span class="n">6</span>', html)


def test_overview_filter_with_nothing_to_show_says_so(admin_client, make_job):
    make_job(name="fine")

    html = admin_client.get("/?show=failing").content.decode()

    assert overview_jobs(html) == []
    assert "No failing jobs." in html


@pytest.mark.parametrize(
    "query, message",
    [
        ("page=two", "?page= must be a page number (1, 2, ...), not 'two'."),
        ("page=0", "?page= must be a page number (1, 2, ...), not '0'."),
        ("page=-1", "?page= must be a page number (1, 2, ...), not '-1'."),
        ("show=broken", "Unknown filter ?show='broken'; use one of all, failing, stale"),
    ],
)
def test_overview_rejects_a_bad_page_or_filter_with_a_message(
    admin_client, make_job, query, message
):
    make_job()

    response = admin_client.get(f"/?{query}")

    assert response.status_code == 400
    assert message in response.content.decode()


def test_stale_page_pages_the_jobs_most_overdue_first(client, make_user, make_job, monkeypatch):
    # With the scheduler down every scheduled job is stale at once: paged.
    monkeypatch.setattr(views, "JOBS_PAGE_SIZE", 2)
    for name, schedule in [("daily", "0 3 * * *"), ("five-a", "*/5 * * * *")]:
        scheduled_job(make_job, name=name, schedule=schedule, created=NOON - timedelta(days=2))
    scheduled_job(make_job, name="five-b", schedule="*/5 * * * *", created=NOON - timedelta(days=2))
    user = make_user(superuser=True)

    first = get_at_noon(client, user, "/stale/").content.decode()
    second = get_at_noon(client, user, "/stale/?page=2").content.decode()
    bad = get_at_noon(client, user, "/stale/?page=last")

    assert list(stale_rows(first)) == ["daily", "five-a"]
    assert "Page 1 of 2: jobs 1–2 of 3" in first and 'href="?page=2" rel="next"' in first
    assert list(stale_rows(second)) == ["five-b"]
    assert 'href="?page=1" rel="prev"' in second
    assert bad.status_code == 400
    assert "?page= must be a page number" in bad.content.decode()


def test_stale_page_query_count_does_not_grow_with_jobs(
    client, make_user, make_job, django_assert_max_num_queries
):
    with time_machine.travel(NOON, tick=False):
        client.force_login(make_user(superuser=True))
        client.get("/stale/")
        for i in range(50):
            job = scheduled_job(
                make_job, schedule=f"{i % 5}-59/5 * * * *", created=NOON - timedelta(days=2)
            )
            make_runs(
                job, [Run.Status.SUCCEEDED, Run.Status.FAILED], start=NOON - timedelta(days=1)
            )

        with django_assert_max_num_queries(4):
            html = client.get("/stale/").content.decode()

    assert len(stale_rows(html)) == 50
    assert html.count('data-status="failed"') == 50


# --- Failures -----------------------------------------------------------------------------


def failure_ids(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'<tr data-run="(\d+)">', html)]


def test_failures_page_lists_failed_timed_out_and_lost_runs_across_jobs_newest_first(
    admin_client, make_job
):
    load, export = make_job(name="load"), make_job(name="export")
    mixed = make_runs(load, ["succeeded", "failed", "skipped", "timed_out", "cancelled"])
    mixed += make_runs(export, ["lost", "succeeded", "failed"])
    Run.objects.filter(pk=mixed[1].pk).update(error_summary="Exit code 3: <disk full>")

    html = admin_client.get("/failures/").content.decode()

    expected = [r.pk for r in reversed(mixed) if r.status in Run.FAILURES]
    assert failure_ids(html) == expected
    rows = dict(re.findall(r'<tr data-run="(\d+)">(.*?)</tr>', html, re.S))
    first_failure = rows[str(mixed[1].pk)]
    assert '<a href="/jobs/load/">load</a>' in first_failure
    assert "Exit code 3: &lt;disk full&gt;" in first_failure
    assert 'data-status="failed"' in first_failure
    assert 'data-status="lost"' in rows[str(mixed[5].pk)]
    assert '<a href="/jobs/export/">export</a>' in rows[str(mixed[5].pk)]


def test_failures_page_filters_by_job(admin_client, make_job):
    load, export = make_job(name="load"), make_job(name="export")
    make_runs(load, ["failed"] * 3)
    theirs = make_runs(export, ["failed", "timed_out"])

    html = admin_client.get("/failures/?job=export").content.decode()

    assert failure_ids(html) == [theirs[1].pk, theirs[0].pk]
    assert '<option value="export" selected>' in html
    assert "Failures of export" in html
    assert admin_client.get("/failures/?job=nope").status_code == 404
    # Not a slug at all: a NUL was a database error on PostgreSQL.
    for slug in ["\x00", "é", "exp\x00ort"]:
        assert admin_client.get("/failures/", {"job": slug}).status_code == 404


def test_failures_page_pages_by_id_without_counting(
    admin_client, make_job, django_assert_max_num_queries
):
    job = make_job(name="flaky")
    runs = make_runs(job, ["failed", "succeeded"] * 30)
    ids = [r.pk for r in reversed(runs) if r.status == "failed"]  # 30, newest first
    admin_client.get("/failures/")

    with django_assert_max_num_queries(5) as queries:
        first = admin_client.get("/failures/?job=flaky").content.decode()

    assert not any("COUNT(" in q["sql"].upper() for q in queries.captured_queries)
    assert failure_ids(first) == ids[:25]
    assert f"?job=flaky&amp;before={ids[24]}" in first and "Newer" not in first
    second = admin_client.get(f"/failures/?job=flaky&before={ids[24]}").content.decode()
    assert failure_ids(second) == ids[25:]
    assert "Older" not in second and f"after={ids[25]}" in second
    assert admin_client.get("/failures/?before=abc").status_code == 400


# --- Job page: rates, charts, alerts --------------------------------------------------------


def chart(html: str, name: str) -> str:
    match = re.search(rf'<svg [^>]*class="chart {name}".*?</svg>', html, re.S)
    assert match, f"no {name} on the page"
    return match.group(0)


def rate_box(html: str, window: str) -> str:
    return re.search(rf'data-window="{window}">(.*?)</li>', html, re.S).group(1)


def test_job_page_shows_success_rates_and_daily_failure_chart(admin_client, make_job):
    job = make_job(name="nightly", command="exit 0")
    today = timezone.localdate()
    JobDailyStats.objects.create(job=job, day=today - timedelta(days=1), succeeded=9, failed=1)
    JobDailyStats.objects.create(job=job, day=today - timedelta(days=10), timed_out=10)
    JobDailyStats.objects.create(job=job, day=today - timedelta(days=40), failed=50)
    services.run_foreground(job=job, echo=lambda s: None)
    Job.objects.filter(pk=job.pk).update(command="exit 3")
    job.refresh_from_db()
    services.run_foreground(job=job, echo=lambda s: None)

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "<strong>50%</strong> succeeded in 24 hours" in rate_box(html, "24 hours")
    assert "1 of 2 runs, 1 failed" in rate_box(html, "24 hours")
    assert "<strong>83%</strong>" in rate_box(html, "7 days")  # 10 of 12
    assert "10 of 12 runs, 2 failed" in rate_box(html, "7 days")
    assert "10 of 22 runs, 12 failed" in rate_box(html, "30 days")  # day -40 is outside
    failures = chart(html, "failure-chart")
    assert failures.count('<g class="day"') == 30
    assert failures.count('class="bar fail"') == 3
    assert f"{today - timedelta(days=10):%a %Y-%m-%d}: 10 of 10 runs failed (100%)" in failures
    assert f"{today - timedelta(days=1):%a %Y-%m-%d}: 1 of 10 runs failed (10%)" in failures
    assert f"{today - timedelta(days=2):%a %Y-%m-%d}: no runs" in failures


def test_job_page_duration_chart_has_a_bar_per_run_and_marks_timeouts(admin_client, make_job):
    job = make_job(name="slowpoke")
    runs = make_runs(job, ["succeeded"] * 4 + ["timed_out", "failed", "skipped"])
    Run.objects.filter(pk=runs[4].pk).update(finished_at=runs[4].started_at + timedelta(minutes=5))
    Run.objects.filter(pk=runs[6].pk).update(started_at=None)  # skipped runs never start

    html = admin_client.get(job.get_absolute_url()).content.decode()

    durations = chart(html, "duration-chart")
    assert durations.count('<g class="run"') == 6
    assert durations.count('class="marker timeout"') == 1
    timed_out = re.search(r'<g class="run" data-status="timed_out"[^>]*>(.*?)</g>', durations)
    assert f'href="/runs/{runs[4].pk}/"' in timed_out.group(1)
    assert "timed out · 5 min 0 s" in timed_out.group(1)
    assert ">5 min 0 s</text>" in durations  # the y axis: the longest run
    assert ">timed out</text>" in durations  # the legend
    assert "Duration of the last 6 runs" in html


def test_job_page_shows_alert_state_flips_and_notifications(admin_client, make_job):
    job = make_job(name="fragile", command="echo 'no disk' >&2; exit 3")
    run = services.run_foreground(job=job, echo=lambda s: None)
    for i in range(25):
        Notification.objects.create(
            job=job,
            kind="alert",
            channel="email" if i % 2 else "webhook",
            target=f"ops{i}@example.com" if i % 2 else "https://hooks.example.com/x",
            subject=f"fragile failed #{i}",
            sent_at=timezone.now() - timedelta(minutes=30 - i),
            ok=i != 24,
            error="" if i != 24 else "Connection refused <smtp>",
        )

    html = admin_client.get(job.get_absolute_url()).content.decode()

    health = html.split('id="health"')[1].split("<h2>Runs</h2>")[0]
    assert 'data-alert="failing"' in health
    assert re.search(r"Failing since <span[^>]*>(just now|\d+\xa0minutes? ago)", health)
    flip = AlertFlip.objects.get(job=job)
    assert (flip.old_state, flip.new_state) == ("ok", "failing")
    flips = health.split('class="flips"')[1].split("</table>")[0]
    assert 'data-alert="ok"' in flips and 'data-alert="failing"' in flips
    assert f'<a href="/runs/{run.pk}/">#{run.pk}</a>' in flips and "Exit code 3" in flips
    notes = health.split('class="notifications"')[1].split("</table>")[0]
    assert notes.count("<tr>") == 1 + 20  # header + the latest 20
    assert "fragile failed #24" in notes and "fragile failed #4" not in notes
    assert "failed: Connection refused &lt;smtp&gt;" in notes
    assert "Alert by email" in notes and "ops23@example.com" in notes
    assert "Alert by webhook" in notes and "sent" in notes


def test_stale_job_page_says_so(client, make_user, make_job):
    job = scheduled_job(
        make_job, name="every-five", schedule="*/5 * * * *", created=NOON - timedelta(days=1)
    )
    with time_machine.travel(NOON, tick=False):
        client.force_login(make_user(superuser=True))
        html = client.get(job.get_absolute_url()).content.decode()

    assert (
        "Stale now: no run for the fire at 2027-01-05 12:00 UTC; due 12:00 UTC, 1 min 30 s" in html
    )


def test_job_page_query_count_does_not_grow_with_history(
    admin_client, make_job, django_assert_max_num_queries
):
    job = make_job()
    admin_client.get(job.get_absolute_url())
    make_runs(job, ["succeeded", "failed", "timed_out"] * 70)
    today = timezone.localdate()
    JobDailyStats.objects.bulk_create(
        JobDailyStats(job=job, day=today - timedelta(days=d), succeeded=5, failed=d % 3)
        for d in range(60)
    )
    for i in range(15):
        AlertFlip.objects.create(job=job, old_state="ok", new_state="failing", at=timezone.now())
        Notification.objects.create(
            job=job, kind="alert", channel="email", target=f"a{i}@example.com",
            sent_at=timezone.now(), ok=True,
        )  # fmt: skip

    with django_assert_max_num_queries(JOB_PAGE_QUERIES) as queries:
        html = admin_client.get(job.get_absolute_url()).content.decode()

    assert not any("COUNT(" in q["sql"].upper() for q in queries.captured_queries)
    assert chart(html, "duration-chart").count('<g class="run"') == 100
    assert chart(html, "failure-chart").count('class="bar fail"') == 20


# --- Overview: 7-day rate ---------------------------------------------------------------------


def test_overview_shows_each_jobs_seven_day_success_rate(admin_client, make_job):
    steady, shaky, idle = make_job(name="steady"), make_job(name="shaky"), make_job(name="idle")
    today = timezone.localdate()
    JobDailyStats.objects.create(job=steady, day=today, succeeded=1000)
    JobDailyStats.objects.create(job=shaky, day=today, succeeded=3, failed=1)
    JobDailyStats.objects.create(job=shaky, day=today - timedelta(days=6), succeeded=2, lost=4)
    JobDailyStats.objects.create(job=shaky, day=today - timedelta(days=8), failed=100)
    JobDailyStats.objects.create(job=idle, day=today - timedelta(days=8), succeeded=1)

    html = admin_client.get("/").content.decode()

    rows = dict(re.findall(r'<tr data-job="([^"]+)"[^>]*>(.*?)</tr>', html, re.S))
    assert re.search(r'class="rate tone-text-ok"[^>]*>100%</td>', rows["steady"])
    assert "5 of 10 finished runs succeeded in 7 days" in rows["shaky"]
    assert re.search(r'class="rate tone-text-bad"[^>]*>50%</td>', rows["shaky"])
    assert re.search(r'class="rate tone-text-idle">—</td>', rows["idle"])


# --- Browser: the charts and the stale page render ----------------------------------------------


@pytest.mark.browser
def test_browser_shows_both_charts_and_the_stale_page(
    live_server, browser, make_user, make_job, tmp_path
):
    from playwright.sync_api import expect

    make_user("oncall", perms=("jobs.view_job",))
    job = scheduled_job(
        make_job,
        name="every-five",
        schedule="*/5 * * * *",
        created=timezone.now() - timedelta(days=2),
    )
    make_runs(
        job, ["succeeded"] * 8 + ["timed_out", "failed"], start=timezone.now() - timedelta(hours=3)
    )
    JobDailyStats.objects.create(
        job=job, day=timezone.localdate(), succeeded=8, failed=1, timed_out=1
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    browser_login(page, live_server, "oncall", next_url=job.get_absolute_url())

    failure_chart = page.locator("svg.failure-chart")
    duration_chart = page.locator("svg.duration-chart")
    expect(failure_chart).to_be_visible()
    expect(duration_chart).to_be_visible()
    assert failure_chart.locator("g.day").count() == 30
    expect(failure_chart.locator("rect.bar.fail")).to_be_visible()
    assert duration_chart.locator("g.run").count() == 10
    expect(duration_chart.locator("path.marker.timeout")).to_be_visible()
    box = duration_chart.bounding_box()
    assert box["width"] > 300 and box["height"] > 80  # laid out, not collapsed
    page.screenshot(path=str(tmp_path / "job-charts.png"), full_page=True)
    assert (tmp_path / "job-charts.png").stat().st_size > 0

    page.get_by_role("link", name="Stale").first.click()
    expect(page).to_have_url(f"{live_server.url}/stale/")
    row = page.locator('tr[data-job="every-five"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text("overdue")
    expect(row).to_contain_text("no run for the fire at")
    page.screenshot(path=str(tmp_path / "stale.png"), full_page=True)


# --- Formatting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.01, "< 0.1 s"),
        (0.4, "0.4 s"),
        (1.23, "1.2 s"),
        (184, "3 min 4 s"),
        (7500, "2 h 5 min"),
        (-2, "-2.0 s"),
    ],
)
def test_durations_read_like_a_person_would_say_them(seconds, text):
    assert duration(timedelta(seconds=seconds)) == text


@pytest.mark.parametrize("query", ["after=x", "tail_end=-1", "after=%C2%B2"])
def test_the_live_tail_refuses_a_malformed_position_with_a_plain_message(
    admin_client, make_job, query
):
    [run] = make_runs(make_job(), [Run.Status.RUNNING])
    response = admin_client.get(f"/runs/{run.pk}/log/?{query}")
    assert response.status_code == 400
    assert "must be a whole number" in response.content.decode()


def test_a_job_started_by_its_upstream_is_not_shown_as_manual(admin_client, make_job):
    slow = make_job(name="slow-report", schedule="*/5 * * * *")
    publish = make_job(name="publish-report", trigger_on_upstream=True)
    publish.upstreams.add(slow)
    make_job(name="say-hello")

    overview = admin_client.get("/").content.decode()
    row = overview.split('data-job="publish-report"')[1].split("</tr>")[0]
    page = admin_client.get(publish.get_absolute_url()).content.decode()

    assert "After its upstreams succeed" in row and "after upstream" in row
    assert "Manual only" not in row and ">manual<" not in row
    assert "Manual only" not in page
    assert "After its upstreams succeed" in page
    assert (
        'No clock of its own: runs each time <a href="/jobs/slow-report/">slow-report</a> '
        "has succeeded." in page
    )
    hello = overview.split('data-job="say-hello"')[1].split("</tr>")[0]
    assert "Manual only" in hello and ">manual<" in hello


def test_times_under_a_minute_read_just_now_not_0_minutes(client, make_user, make_job):
    job = make_job(name="heartbeat", schedule="* * * * *")
    with time_machine.travel(datetime(2027, 3, 26, 12, 0, 10, tzinfo=UTC), tick=False):
        client.force_login(make_user(superuser=True))
        services.run_create(job=job, trigger="manual", here=True)
    with time_machine.travel(datetime(2027, 3, 26, 12, 0, 30, tzinfo=UTC), tick=False):
        overview = client.get("/").content.decode()
    with time_machine.travel(datetime(2027, 3, 26, 12, 5, 30, tzinfo=UTC), tick=False):
        later = client.get("/").content.decode()

    row = overview.split('data-job="heartbeat"')[1].split("</tr>")[0]
    assert "0\xa0minutes" not in row and "0 minutes" not in row
    assert "just now" in row  # the last run, 20 s ago
    assert "in under a minute" in row  # the next fire, 30 s away
    later_row = later.split('data-job="heartbeat"')[1].split("</tr>")[0]
    assert "5\xa0minutes ago" in later_row


def test_the_browser_finds_an_icon_without_a_404(client, admin_client):
    response = client.get("/favicon.ico", follow=True)

    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == "/static/jobs/favicon.svg"
    assert 'rel="icon" href="/static/jobs/favicon.svg"' in admin_client.get("/").content.decode()


def test_an_operator_pauses_and_resumes_a_job_from_its_page(client, make_job, make_user):
    job = make_job(name="flaky-export", schedule="*/2 * * * *")
    waiting = services.run_create(job=job, trigger="retry", here=True)
    client.force_login(make_user(perms=("jobs.view_job", "jobs.run_job")))
    page = client.get(job.get_absolute_url()).content.decode()
    assert f'action="/jobs/{job.slug}/pause/"' in page and ">Pause</button>" in page

    assert client.get(f"/jobs/{job.slug}/pause/").status_code == 405
    paused = client.post(f"/jobs/{job.slug}/pause/", follow=True)

    job.refresh_from_db()
    waiting.refresh_from_db()
    assert not job.enabled
    assert (waiting.status, waiting.error_summary) == ("skipped", "paused")
    html = paused.content.decode()
    assert paused.redirect_chain == [(job.get_absolute_url(), 302)]
    assert "flaky-export is paused" in html
    assert 'class="badge tone-warn">Paused</span>' in html and ">Resume</button>" in html

    resumed = client.post(f"/jobs/{job.slug}/resume/", follow=True)

    job.refresh_from_db()
    assert job.enabled
    assert "flaky-export is resumed" in resumed.content.decode()
    assert ">Pause</button>" in resumed.content.decode()


def test_pausing_from_the_page_needs_the_run_permission(client, make_job, make_user):
    job = make_job(schedule="*/2 * * * *")
    client.force_login(make_user(perms=("jobs.view_job",)))

    assert ">Pause</button>" not in client.get(job.get_absolute_url()).content.decode()
    assert client.post(f"/jobs/{job.slug}/pause/").status_code == 403
    job.refresh_from_db()
    assert job.enabled


def test_a_new_job_page_does_not_speak_of_its_last_0_runs(admin_client, make_job):
    html = admin_client.get(make_job(schedule="* * * * *").get_absolute_url()).content.decode()

    assert "last 0 runs" not in html
    assert "<figcaption>Duration of runs</figcaption>" in html
