"""A person in a real browser: log in, press Run now, watch the run succeed."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from jobs import services
from jobs.models import Job, Run
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


@pytest.mark.parametrize("button", ["Run now", "Rerun"])
def test_a_double_click_starts_one_run_and_opens_its_page(
    live_server, browser, make_user, make_job, monkeypatch, button
):
    make_user("analyst", perms=("jobs.view_job", "jobs.view_run", "jobs.run_job"))
    job = make_job(name="export", overlap="allow")
    first = services.run_create(job=job, trigger=Run.Trigger.MANUAL) if button == "Rerun" else None
    # A busy server: the first click's answer is still on its way at the second click.
    run_create = services.run_create
    monkeypatch.setattr(services, "run_create", lambda **kw: time.sleep(0.7) or run_create(**kw))
    page = browser.new_page()
    browser_login(page, live_server, "analyst", next_url=(first or job).get_absolute_url())

    box = page.get_by_role("button", name=button).bounding_box()
    page.mouse.dblclick(box["x"] + 5, box["y"] + 5, delay=150)

    expect(page.locator(".messages")).to_contain_text("is queued", timeout=10_000)
    started = Run.objects.exclude(pk=first.pk if first else None)
    assert started.count() == 1
    expect(page).to_have_url(f"{live_server.url}{started.get().get_absolute_url()}")


def test_names_and_errors_without_spaces_wrap_instead_of_widening_pages(
    live_server, browser, make_user, make_job
):
    make_user("oncall", perms=("jobs.view_job", "jobs.view_run"))
    job = make_job(
        name="warehouse_export_" + "partner_feed_" * 14,
        slug="long",
        schedule="*/5 * * * *",
        tags="eu," + "partner_feed_" * 10,
        owner="data_platform_" * 10,
    )
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(days=1))  # stale
    now = timezone.now()
    run = Run.objects.create(
        job=job,
        status=Run.Status.FAILED,
        trigger=Run.Trigger.SCHEDULE,
        scheduled_for=now,
        queued_at=now,
        started_at=now,
        finished_at=now,
        exit_code=1,
        error_summary="Upload failed: https://storage.example.com/" + "exports/partner" * 40,
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    browser_login(page, live_server, "oncall")

    for url in ["/", job.get_absolute_url(), run.get_absolute_url(), "/failures/", "/stale/"]:
        page.goto(f"{live_server.url}{url}")
        page.wait_for_load_state("load")
        expect(page.locator("main")).to_contain_text("partner_feed_partner_feed_")
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280, url


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
