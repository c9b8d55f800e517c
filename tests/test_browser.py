"""A person in a real browser: log in, press Run now, watch the run succeed."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from jobs.models import Run
from tests.conftest import browser_login

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_user_runs_a_job_from_its_page_and_sees_it_succeed_with_its_log(
    live_server, browser, processes, make_user, make_job, tmp_path
):
    make_user("analyst", perms=("jobs.view_job", "jobs.view_run", "jobs.run_job"))
    make_job(
        name="nightly-export",
        command='echo "exported 42 rows"; sleep 1; echo "upload done"',
        schedule="15 2 * * *",
    )
    processes.start("qcluster")
    page = browser.new_page()
    browser_login(page, live_server, "analyst")

    page.get_by_role("link", name="nightly-export").first.click()
    expect(page.locator("h1")).to_contain_text("nightly-export")
    page.get_by_role("button", name="Run now").click()

    expect(page).to_have_url(re.compile(r"/runs/\d+/$"))
    expect(page.locator("#run-status")).to_have_text("Succeeded", timeout=30_000)
    expect(page.locator("#run-log")).to_contain_text("exported 42 rows\nupload done")
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    run = Run.objects.get()
    assert run.trigger == Run.Trigger.MANUAL
    assert run.triggered_by.username == "analyst"
    assert page.get_by_text("analyst").count() >= 1


def test_a_run_page_opened_while_queued_shows_what_the_run_got_once_it_starts(
    live_server, browser, processes, make_user, make_job
):
    make_user("analyst", perms=("jobs.view_job", "jobs.view_run", "jobs.run_job"))
    job = make_job(
        name="count-to-twenty",
        kind="python",
        command="",
        callable="jobs.demo.count_to",
        kwargs={"n": 20, "pause": 1},
    )
    page = browser.new_page()
    browser_login(page, live_server, "analyst")
    page.goto(live_server.url + job.get_absolute_url())
    page.get_by_role("button", name="Run now").click()
    expect(page.locator("#run-status")).to_have_text("Queued")
    # Queued: what it will run is already there.
    expect(page.locator("pre.command")).to_have_text('jobs.demo.count_to(**{"n": 20, "pause": 1})')
    expect(page.get_by_text("Recorded when the run starts.")).to_be_visible()

    processes.start("qcluster")

    expect(page.locator("#run-status")).to_have_text("Running", timeout=30_000)
    run = Run.objects.get()
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text(f"Worker{run.worker}", timeout=10_000)
    expect(facts).not_to_contain_text("Started—")
    expect(page.locator("table.env")).to_contain_text("JOBSITE_RUN_ID")
    expect(page.locator("#run-log")).to_contain_text("reached 2", timeout=10_000)
