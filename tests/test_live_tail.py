"""The run page's live tail (jobs/static/jobs/tail.js) in a real browser:
what someone watching a running job's log sees."""

from __future__ import annotations

import re

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone
from playwright.sync_api import expect

from jobs import runlog
from jobs.models import Run, RunLogChunk
from tests.conftest import browser_login
from tests.test_pages import MARKER, NumberedOutput, fill_markers, running_run_with_chunks

pytestmark = [pytest.mark.browser]


@pytest.fixture
def watch(live_server, browser, make_user):
    """A logged-in page on a run's page, tailing its log."""
    make_user("oncall", perms=("jobs.view_job", "jobs.view_run"))

    def open_run(run: Run):
        page = browser.new_page()
        browser_login(page, live_server, "oncall", next_url=run.get_absolute_url())
        expect(page.locator("#run-status .badge")).to_have_attribute("data-status", run.status)
        return page

    return open_run


def finish(run: Run) -> None:
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.SUCCEEDED, finished_at=timezone.now(), exit_code=0
    )


@override_settings(JOBSITE_LOG_FLUSH_BYTES=100)
def test_live_tail_of_a_flood_marks_each_drop_and_nothing_else_is_lost(watch, make_job):
    job_output = NumberedOutput(make_job(name="flood"))
    job_output.emit(10)
    page = watch(job_output.run)
    log = page.locator("#run-log")
    expect(log).to_have_text(job_output.output)

    for burst in range(3):
        # More than the tail keeps, seen whole or not at all: what the page
        # saw last is gone by its next look.
        with transaction.atomic():
            job_output.emit(60)
        expect(log).to_contain_text(f"line {10 + 60 * (burst + 1):05d}\n", timeout=10_000)

    shown = log.text_content()
    assert len(MARKER.findall(shown)) == 3
    assert fill_markers(shown, job_output.output) == job_output.output

    finish(job_output.run)
    expect(page.locator("#run-status .badge")).to_have_text("Succeeded", timeout=10_000)
    expect(log).not_to_have_attribute("data-tail-url", re.compile(".*"))
    assert log.text_content() == runlog.read_log(Run.objects.get(pk=job_output.run.pk))


def test_live_tail_keeps_the_newline_that_new_output_starts_with(watch, make_job):
    run = running_run_with_chunks(make_job(name="dots"), ["Downloading..."])
    page = watch(run)
    log = page.locator("#run-log")
    expect(log).to_have_text("Downloading...")

    RunLogChunk.objects.create(run=run, seq=2, is_head=True, data="\ndone\n", size=6)

    expect(log).to_have_text("Downloading...\ndone\n", timeout=10_000)


def test_live_tail_says_when_the_session_has_ended_and_how_to_log_in(watch, make_job):
    run = running_run_with_chunks(make_job(name="long"), ["working\n"])
    page = watch(run)

    page.context.clear_cookies()

    notice = page.locator("#tail-notice")
    expect(notice).to_contain_text("your session has ended", timeout=10_000)
    notice.get_by_role("link", name="Log in again").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/runs/\d+/$"))


def test_live_tail_says_when_the_run_was_deleted(watch, make_job):
    run = running_run_with_chunks(make_job(name="gone"), ["working\n"])
    page = watch(run)

    Run.objects.filter(pk=run.pk).delete()

    expect(page.locator("#tail-notice")).to_have_text(
        "Live updates stopped: this run no longer exists.", timeout=10_000
    )


def test_live_tail_rides_out_server_errors(watch, make_job):
    run = running_run_with_chunks(make_job(name="flaky"), ["one\n"])
    page = watch(run)
    failing = "**/runs/*/log/?*"
    page.route(failing, lambda route: route.fulfill(status=502, body="Bad Gateway"))

    notice = page.locator("#tail-notice")
    expect(notice).to_contain_text("the server answered 502); trying again", timeout=10_000)
    RunLogChunk.objects.create(run=run, seq=2, is_head=True, data="two\n", size=4)
    page.unroute(failing)

    expect(page.locator("#run-log")).to_have_text("one\ntwo\n", timeout=15_000)
    expect(notice).to_be_hidden()


def test_a_queued_run_that_starts_shows_when_and_where_it_started(watch, make_job):
    now = timezone.now()
    run = Run.objects.create(
        job=make_job(name="waits"),
        status=Run.Status.QUEUED,
        trigger=Run.Trigger.MANUAL,
        scheduled_for=now,
        queued_at=now,
    )
    page = watch(run)
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text("Worker—")

    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.RUNNING,
        started_at=timezone.now(),
        worker="worker-7:4242",
        environment={"JOBSITE_JOB": "waits"},
    )

    expect(facts).to_contain_text("Workerworker-7:4242", timeout=10_000)
    expect(page.locator("table.env")).to_contain_text("JOBSITE_JOB")
    expect(page.locator("#run-status .badge")).to_have_text("Running")


def test_a_cancel_asked_for_elsewhere_shows_stopping_on_a_watching_page(watch, make_job):
    """Someone else (or the admin) cancels the run: the page watching it
    says "stopping…" and no longer offers Cancel, before the run ends."""
    run = running_run_with_chunks(make_job(name="slow"), ["working\n"])
    page = watch(run)
    expect(page.get_by_text("stopping…")).to_have_count(0)

    Run.objects.filter(pk=run.pk).update(cancel_requested_at=timezone.now())

    expect(page.get_by_text("stopping…")).to_be_visible(timeout=10_000)
    expect(page.locator("#run-status .badge")).to_have_attribute("data-status", "running")
