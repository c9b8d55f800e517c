"""Pages for Python and SQL jobs: run files and their download, row counts,
the progress bar (page and live-tail fragment), the job definition by kind,
and delivery settings that never show the password."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.db import connections
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from jobs import services
from jobs.models import Artifact, Job, Run
from tests.conftest import browser_login


@pytest.fixture
def media(tmp_path):
    with override_settings(MEDIA_ROOT=str(tmp_path / "media")):
        yield tmp_path / "media"


def finished_run(job: Job, **fields) -> Run:
    now = timezone.now()
    fields.setdefault("status", Run.Status.SUCCEEDED)
    return Run.objects.create(
        job=job,
        trigger=Run.Trigger.MANUAL,
        scheduled_for=now - timedelta(minutes=1),
        queued_at=now - timedelta(minutes=1),
        started_at=now - timedelta(seconds=50),
        finished_at=None if fields["status"] in Run.ACTIVE else now,
        **fields,
    )


def attach(run: Run, name: str, content: bytes, **fields) -> Artifact:
    artifact = Artifact(run=run, name=name, size=len(content), created_at=timezone.now(), **fields)
    artifact.file.save(Path(name).name, ContentFile(content), save=False)
    artifact.save()
    return artifact


def body_of(response) -> bytes:
    return b"".join(response.streaming_content)


# --- Download --------------------------------------------------------------------


def test_artifact_download_sends_anonymous_visitor_to_login(client, make_job, media):
    run = finished_run(make_job())
    artifact = attach(run, "export.csv", b"id,name\n1,a\n")

    response = client.get(artifact.get_absolute_url())

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={artifact.get_absolute_url()}"


def test_artifact_download_returns_the_file_as_an_attachment(admin_client, make_job, media):
    run = finished_run(make_job(name="partner-export"))
    artifact = attach(run, "partner-export.csv", "id,name\n1,Zoë\n".encode())

    response = admin_client.get(reverse("jobs-artifact-download", args=[run.pk, artifact.pk]))

    assert response.status_code == 200
    assert body_of(response) == "id,name\n1,Zoë\n".encode()
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"] == 'attachment; filename="partner-export.csv"'


def test_artifact_in_a_subdirectory_downloads_under_its_base_name(admin_client, make_job, media):
    run = finished_run(make_job())
    artifact = attach(run, "reports/summary.txt", b"all good\n")

    response = admin_client.get(artifact.get_absolute_url())

    assert body_of(response) == b"all good\n"
    assert response["Content-Disposition"] == 'attachment; filename="summary.txt"'
    assert response["Content-Type"].startswith("text/plain")


def test_artifact_of_another_run_is_not_found(admin_client, make_job, media):
    job = make_job()
    mine, other = finished_run(job), finished_run(job)
    theirs = attach(other, "export.csv", b"id\n1\n")

    response = admin_client.get(reverse("jobs-artifact-download", args=[mine.pk, theirs.pk]))

    assert response.status_code == 404


def test_artifact_whose_file_is_gone_is_not_found(admin_client, make_job, media):
    run = finished_run(make_job())
    artifact = attach(run, "export.csv", b"id\n1\n")
    artifact.file.delete(save=False)

    response = admin_client.get(artifact.get_absolute_url())

    assert response.status_code == 404


def test_media_files_are_not_served_by_url(admin_client, make_job, media):
    run = finished_run(make_job())
    artifact = attach(run, "export.csv", b"id\n1\n")

    response = admin_client.get(f"/media/{artifact.file.name}")

    assert response.status_code == 404


# --- Run page: files, rows, command by kind ------------------------------------------


def test_run_page_lists_files_with_size_delivery_and_download_link(admin_client, make_job, media):
    run = finished_run(make_job(name="exporter"))
    csv_file = attach(run, "exporter.csv", b"x" * 2048, delivered_at=timezone.now())
    attach(run, "notes.txt", b"12 bytes!!!\n")

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "<h2>Files</h2>" in html
    assert f'href="/runs/{run.pk}/artifacts/{csv_file.pk}/"' in html
    assert "exporter.csv" in html and "notes.txt" in html
    assert "2.0\xa0KB" in html and "12\xa0bytes" in html
    # Only the delivered file has a delivery time.
    rows = html.split('<tr data-artifact="')[1:]
    assert len(rows) == 2
    assert rows[0].startswith("exporter.csv") and "muted" not in rows[0]
    assert rows[1].startswith("notes.txt") and "—" in rows[1]


def test_run_page_without_files_says_so(admin_client, make_job):
    run = finished_run(make_job())

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "No files." in html
    assert "rows exported" not in html


def test_sql_run_page_shows_rows_exported_and_the_script(admin_client, make_job, media):
    job = make_job(kind="sql", database="default", sql="SELECT 1 AS id;", command="")
    run = finished_run(job, rows=12345, command="-- on default\nSELECT 1 AS id;")

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "12,345 rows exported" in html
    assert "<h2>SQL</h2>" in html
    assert "SELECT 1 AS id;" in html


def test_one_exported_row_is_singular(admin_client, make_job):
    job = make_job(kind="sql", database="default", sql="SELECT 1;", command="")
    run = finished_run(job, rows=1)

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "1 row exported" in html


def test_python_run_page_labels_the_callable(admin_client, make_job):
    job = make_job(kind="python", callable="json.dumps", kwargs={"obj": 1}, command="")
    run = finished_run(job, command='json.dumps(**{"obj": 1})')

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "<h2>Callable</h2>" in html
    assert "json.dumps(**{&quot;obj&quot;: 1})" in html


# --- Progress ------------------------------------------------------------------------


def test_running_run_page_shows_progress_bar_with_done_total_and_message(admin_client, make_job):
    run = finished_run(
        make_job(),
        status=Run.Status.RUNNING,
        progress_done=30,
        progress_total=120,
        progress_message="loading day 2027-01-05",
    )

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert '<progress max="120" value="30">' in html
    assert "30 of 120 (25%)" in html
    assert "loading day 2027-01-05" in html
    assert 'data-done="30" data-total="120"' in html


def test_running_run_without_progress_keeps_a_hidden_bar_for_the_tail(admin_client, make_job):
    run = finished_run(make_job(), status=Run.Status.RUNNING)

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert 'id="run-progress"' in html and " hidden>" in html
    assert "No progress reported yet." in html


def test_finished_run_keeps_its_last_progress(admin_client, make_job):
    run = finished_run(
        make_job(), progress_done=120, progress_total=120, progress_message="all days done"
    )

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert '<progress max="120" value="120">' in html
    assert "120 of 120 (100%)" in html and "all days done" in html


def test_finished_run_that_never_reported_progress_has_no_bar(admin_client, make_job):
    run = finished_run(make_job())

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "run-progress" not in html and "<progress" not in html


def test_progress_without_a_total_counts_what_is_done(admin_client, make_job):
    run = finished_run(make_job(), status=Run.Status.RUNNING, progress_done=1500)

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert "1,500 done" in html
    assert "<progress>" in html  # indeterminate while running


def test_log_fragment_carries_the_current_progress(admin_client, make_job):
    run = finished_run(
        make_job(),
        status=Run.Status.RUNNING,
        progress_done=7,
        progress_total=10,
        progress_message="table <b>orders</b>",
    )

    html = admin_client.get(reverse("jobs-run-log", args=[run.pk])).content.decode()

    assert 'data-done="7" data-total="10"' in html
    assert '<progress max="10" value="7">' in html
    assert "7 of 10 (70%)" in html
    assert "table &lt;b&gt;orders&lt;/b&gt;" in html


# --- Job page by kind ----------------------------------------------------------------


def test_python_job_page_shows_callable_and_pretty_kwargs(admin_client, make_job):
    job = make_job(
        kind="python",
        command="",
        callable="json.dumps",
        kwargs={"obj": [1, 2], "sort_keys": True},
    )

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "Python callable" in html
    assert '<pre class="command callable">json.dumps</pre>' in html
    assert "{\n  &quot;obj&quot;: [\n    1,\n    2\n  ],\n  &quot;sort_keys&quot;: true\n}" in html


def test_sql_job_page_shows_database_timeout_and_script(admin_client, make_job):
    job = make_job(
        kind="sql",
        command="",
        database="default",
        statement_timeout=90,
        sql="CREATE TEMP TABLE t AS SELECT 1 AS id;\nSELECT id FROM t WHERE id < 5;",
    )

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "SQL script" in html
    assert "<dt>Database</dt><dd><code>default</code></dd>" in html
    assert "<dt>Statement timeout</dt><dd>90 s</dd>" in html
    assert "CREATE TEMP TABLE t AS SELECT 1 AS id;\nSELECT id FROM t WHERE id &lt; 5;</pre>" in html


def test_sql_job_without_statement_timeout_says_the_job_timeout_applies(admin_client, make_job):
    job = make_job(kind="sql", command="", database="default", sql="SELECT 1;", timeout=600)

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "the job’s timeout (600 s)" in html


def test_job_page_shows_delivery_naming_the_password_reference(admin_client, make_job):
    job = make_job(
        kind="sql",
        command="",
        database="default",
        sql="SELECT 1;",
        deliver_url="ftp://reports@ftp.example.com:2121/incoming",
        deliver_password="${FTP_PASSWORD}",
        deliver_passive=False,
        deliver_timeout=15,
        deliver_retries=4,
    )

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "<code>ftp://reports@ftp.example.com:2121/incoming</code>" in html
    assert '<dd id="deliver-password">set (from ${FTP_PASSWORD})</dd>' in html
    assert "<dt>Mode</dt><dd>active</dd>" in html
    assert "<dt>Timeout</dt><dd>15 s</dd>" in html
    assert "<dt>Retries</dt><dd>4</dd>" in html


def test_literal_delivery_password_is_never_shown(admin_client, make_job, media):
    job = make_job(
        deliver_url="ftps://reports@ftp.example.com/incoming",
        deliver_password="hunter2-literal",
    )
    run = finished_run(job)
    attach(run, "out.txt", b"x")

    job_html = admin_client.get(job.get_absolute_url()).content.decode()
    run_html = admin_client.get(run.get_absolute_url()).content.decode()

    assert '<dd id="deliver-password">set</dd>' in job_html
    assert "hunter2" not in job_html and "hunter2" not in run_html


def test_job_without_delivery_has_no_delivery_section(admin_client, make_job):
    job = make_job()

    html = admin_client.get(job.get_absolute_url()).content.decode()

    assert "<h3>Delivery</h3>" not in html
    assert "<h3>Command</h3>" in html and "echo hello" in html


# --- A real SQL run, downloaded in a browser ---------------------------------------

EXPORT_SQL = "CREATE TEMP TABLE t AS SELECT 1 AS id, 'a' AS name; SELECT id, name FROM t;"


@pytest.mark.browser
def test_browser_downloads_the_csv_of_a_finished_sql_run(
    live_server, browser, make_user, make_job, media, tmp_path
):
    make_user("analyst", perms=("jobs.view_job", "jobs.view_run"))
    job = make_job(
        name="partner-export", kind="sql", command="", database="default", sql=EXPORT_SQL
    )
    run = services.run_foreground(job=job, echo=lambda s: None)
    assert run.status == Run.Status.SUCCEEDED, run.error_summary
    page = browser.new_page()
    browser_login(page, live_server, "analyst", next_url=run.get_absolute_url())

    from playwright.sync_api import expect

    expect(page.locator("#rows-exported")).to_have_text("1 row exported")
    with page.expect_download() as info:
        page.locator("#files").get_by_role("link", name="Download").click()
    download = info.value
    saved = tmp_path / "downloaded.csv"
    download.save_as(saved)

    # ORM calls made under Playwright's loop have their own connection: close
    # it here, inside that loop, or PostgreSQL cannot drop the test database.
    connections.close_all()
    assert download.suggested_filename == "partner-export.csv"
    assert list(csv.reader(io.StringIO(saved.read_text(encoding="utf-8")))) == [
        ["id", "name"],
        ["1", "a"],
    ]
