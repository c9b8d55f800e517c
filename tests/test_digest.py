"""Email digests: content per recipient, at most once per period, the daily
schedule, and manage.py send_digest (also as a real process through SMTP)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from jobs import digests, services
from jobs.models import DigestSent, Job, Notification, Run
from tests.conftest import BASE_DIR, database_url_for_children
from tests.test_notify import SmtpServer, outbox_parts, parts

quiet = {"echo": lambda text: None}
DAY = timedelta(hours=24)


def run_now(job: Job, *, scheduled_for: datetime | None = None) -> Run:
    """A real run in this process; `scheduled_for` in the past makes it late."""
    if scheduled_for is None:
        return services.run_foreground(job=job, **quiet)
    run = services.run_create(
        job=job, trigger=Run.Trigger.MANUAL, scheduled_for=scheduled_for, here=True
    )
    claimed = services.run_claim(run_id=run.pk, worker=services.worker_name())
    return services.run_execute(claimed, echo=quiet["echo"])


def soon() -> datetime:
    """A period end just after the runs a test makes."""
    return timezone.now() + timedelta(minutes=1)


def test_digest_for_a_follower_of_two_jobs_lists_failures_stale_rates_slowest_and_late(
    make_job, mailoutbox
):
    export = make_job(
        name="warehouse-export",
        command="echo 'no space left' >&2; exit 4",
        alert_emails=["Ana@example.com"],
    )
    load = make_job(name="warehouse-load", owner="ana@example.com", schedule="0 * * * *", grace=60)
    Job.objects.filter(pk=load.pk).update(created_at=timezone.now() - 2 * DAY)  # never ran
    other = make_job(name="partner-upload", command="exit 1", alert_emails=["bob@example.com"])
    failed = run_now(export)
    Job.objects.filter(pk=export.pk).update(command="sleep 1.2")
    export.refresh_from_db()
    run_now(export, scheduled_for=timezone.now() - timedelta(minutes=10))
    run_now(other)

    report = digests.send_digests(period_end=soon(), period=DAY)

    assert sorted(report.sent) == ["ana@example.com", "bob@example.com"]
    [digest] = [m for m in mailoutbox if m.to == ["ana@example.com"]]
    assert digest.subject.endswith(": 1 failure, 1 stale job (2 jobs, 2 runs)")
    text, html = outbox_parts(digest)
    run_url = f"{settings.SITE_URL}/runs/{failed.pk}/"
    assert f"warehouse-export #{failed.pk} failed: Exit code 4: no space left\n  {run_url}" in text
    assert f'<a href="{run_url}">#{failed.pk}</a> failed' in html
    assert "- warehouse-load: overdue by" in text
    assert ">warehouse-load</a>: overdue by" in html
    assert "no run for the fire at" in text and "no run for the fire at" in html
    assert "- warehouse-export: 50% failed (1 of 2)" in text
    assert "50%</td>" in html
    assert "SLOWEST (longest run)\n- warehouse-export: 1 s\n" in text
    assert ">warehouse-export</a>: 1 s</li>" in html
    assert "- warehouse-export: 10 min late" in text
    assert ">warehouse-export</a>: started 10 min late</li>" in html
    for body in (text, html):
        assert "partner-upload" not in body  # Ana does not follow it
        assert "All good" not in body


def test_a_rerun_of_an_old_run_is_not_reported_as_a_late_start(make_job, mailoutbox):
    """A rerun keeps its original's logical time (a week ago): it starts
    late on purpose, and must not top the digest's "most late" list nor
    the daily rollup the admin shows."""
    job = make_job(name="weekly-export", command="true", alert_emails=["ana@example.com"])
    week_ago = timezone.now() - timedelta(days=7)
    old = Run.objects.create(
        job=job, status=Run.Status.FAILED, trigger=Run.Trigger.SCHEDULE, scheduled_for=week_ago,
        queued_at=week_ago, started_at=week_ago, finished_at=week_ago, exit_code=1,
    )  # fmt: skip
    again = services.run_rerun(run=old, by=None)
    claimed = services.run_claim(run_id=again.pk, worker=services.worker_name())
    assert services.run_execute(claimed, echo=quiet["echo"]).status == Run.Status.SUCCEEDED
    # Bad news as well, so the digest is the whole one, not "All good".
    run_now(make_job(name="partner-upload", command="exit 1", alert_emails=["ana@example.com"]))

    digests.send_digests(period_end=soon())

    [digest] = mailoutbox
    for body in outbox_parts(digest):
        assert "partner-upload" in body and "weekly-export" in body
        assert " late" not in body, body
    rollup = job.daily_stats.get(day=timezone.localdate())
    assert (rollup.executed, rollup.lateness_max) == (1, 0.0)


def test_quiet_period_is_one_all_good_line(make_job, mailoutbox):
    job = make_job(name="refresh-stats", command="true", alert_emails=["ana@example.com"])
    run_now(job)
    run_now(job)
    digests.send_digests(period_end=soon())
    [digest] = mailoutbox
    assert digest.subject.endswith(": All good: 1 job, 2 runs, no failures")
    text, html = outbox_parts(digest)
    assert "All good: 1 job, 2 runs, no failures" in text
    assert "All good: 1 job, 2 runs, no failures" in html
    assert "FAILURE RATES" not in text


@override_settings(JOBSITE_DIGEST_SKIP_EMPTY=True)
def test_skip_empty_sends_no_all_good_digest_but_still_sends_bad_news(make_job, mailoutbox):
    calm = make_job(command="true", alert_emails=["calm@example.com"])
    busy = make_job(command="exit 1", alert_emails=["busy@example.com"])
    run_now(calm)
    run_now(busy)
    report = digests.send_digests(period_end=soon())
    assert [m.to for m in mailoutbox] == [["busy@example.com"]]
    assert report.skipped_empty == ["calm@example.com"]
    assert not DigestSent.objects.filter(recipient="calm@example.com").exists()


def test_a_period_is_sent_once_however_often_it_is_asked_for(make_job, mailoutbox):
    job = make_job(command="exit 1", alert_emails=["ana@example.com"])
    run_now(job)
    end = soon()
    first = digests.send_digests(period_end=end)
    second = digests.send_digests(period_end=end)
    assert len(mailoutbox) == 1
    assert list(first.sent) == ["ana@example.com"]
    assert (second.sent, second.already_sent) == ({}, ["ana@example.com"])
    [record] = Notification.objects.filter(kind="digest")
    assert (record.job, record.target, record.ok) == (None, "ana@example.com", True)

    digests.send_digests(period_end=end + timedelta(hours=1))  # another period
    assert len(mailoutbox) == 2


def test_to_sends_every_job_to_those_addresses_only(make_job, mailoutbox):
    followed = make_job(name="followed", command="exit 1", alert_emails=["ana@example.com"])
    unfollowed = make_job(name="unfollowed", command="exit 1")
    run_now(followed)
    run_now(unfollowed)
    digests.send_digests(period_end=soon(), to=["boss@example.com"])
    [digest] = mailoutbox
    assert digest.to == ["boss@example.com"]
    text, html = outbox_parts(digest)
    for body in (text, html):
        assert "followed" in body and "unfollowed" in body
    assert "2 failures" in digest.subject


@override_settings(TIME_ZONE="Europe/Berlin")
def test_a_week_counts_whole_days_and_the_partial_days_at_its_ends(make_job, mailoutbox):
    berlin = ZoneInfo("Europe/Berlin")
    end = datetime(2026, 6, 10, 12, 0, tzinfo=berlin)
    job = make_job(
        name="weekly-check", command='test "$RESULT" = ok', alert_emails=["a@example.com"]
    )

    def run_at(when: datetime, result: str) -> Run:
        Job.objects.filter(pk=job.pk).update(environment={"RESULT": result})
        job.refresh_from_db()
        with time_machine.travel(when, tick=False):
            return run_now(job)

    run_at(end - timedelta(days=8), "bad")  # before the period
    run_at(end - timedelta(days=7, hours=3), "bad")  # same day as the start, before it
    run_at(end - timedelta(days=7) + timedelta(hours=3), "ok")  # partial first day
    inside = run_at(end - timedelta(days=5), "bad")  # whole days
    run_at(end - timedelta(days=3), "ok")
    run_at(end - timedelta(hours=3), "ok")  # partial last day

    with time_machine.travel(end, tick=False):
        report = digests.send_digests(period_end=end, period=timedelta(days=7))
    assert report.sent == {"a@example.com": "1 failure (1 job, 4 runs)"}
    text, html = outbox_parts(mailoutbox[0])
    assert "- weekly-check: 25% failed (1 of 4)" in text
    assert f"#{inside.pk} failed" in text
    assert f"#{inside.pk}</a> failed" in html
    assert text.count(" failed: ") == 1  # the runs before the period are not listed


@override_settings(TIME_ZONE="Europe/Berlin", JOBSITE_DIGEST_TIME="08:00")
def test_daily_digest_is_due_after_its_time_and_spans_a_local_day():
    berlin = ZoneInfo("Europe/Berlin")
    assert digests.digest_period_due(now=datetime(2026, 6, 10, 7, 59, tzinfo=berlin)) is None
    start, end = digests.digest_period_due(now=datetime(2026, 6, 10, 8, 0, 5, tzinfo=berlin))
    assert (start, end) == (
        datetime(2026, 6, 9, 6, 0, tzinfo=UTC),
        datetime(2026, 6, 10, 6, 0, tzinfo=UTC),
    )
    # The night clocks go forward the day is 23 hours long.
    start, end = digests.digest_period_due(now=datetime(2026, 3, 29, 9, 0, tzinfo=berlin))
    assert end - start == timedelta(hours=23)
    with override_settings(JOBSITE_DIGEST_TIME=""):
        assert digests.digest_period_due(now=datetime(2026, 6, 10, 9, 0, tzinfo=berlin)) is None
    with override_settings(JOBSITE_DIGEST_TIME="8am"), pytest.raises(ImproperlyConfigured):
        digests.digest_period_due(now=datetime(2026, 6, 10, 9, 0, tzinfo=berlin))


@override_settings(JOBSITE_DIGEST_TIME="08:00")
def test_scheduler_ticks_send_the_daily_digest_once(make_job, mailoutbox, q_sync):
    make_job(command="true", alert_emails=["ana@example.com"])
    morning = datetime(2026, 6, 10, 8, 0, 1, tzinfo=UTC)
    cache.delete(digests.done_mark(morning.replace(second=0)))  # a shared cache may keep it
    assert digests.send_due_digests(now=morning - timedelta(minutes=1)) is False
    assert digests.send_due_digests(now=morning) is True  # handed to a worker (inline here)
    for seconds in (1, 2, 3):
        assert digests.send_due_digests(now=morning + timedelta(seconds=seconds)) is False
    assert [m.to for m in mailoutbox] == [["ana@example.com"]]


@override_settings(
    JOBSITE_DIGEST_TIME="08:00",
    EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
    EMAIL_HOST="127.0.0.1",
    EMAIL_TIMEOUT=30,
)
def test_the_clock_hands_the_digest_to_the_workers_and_never_waits_for_the_mail_server(make_job):
    """A mail server that accepts and never answers must not hold up the
    clock (which would start no job meanwhile): the tick only queues it."""
    from django_q.models import OrmQ

    from jobs import clock

    make_job(command="true", alert_emails=["ana@example.com"])
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        morning = datetime(2026, 6, 10, 8, 0, 1, tzinfo=UTC)
        cache.delete(digests.done_mark(morning.replace(second=0)))
        with override_settings(EMAIL_PORT=hung.getsockname()[1]):
            clock.tick(now=morning)
    assert not Notification.objects.exists(), "the tick itself tried to send the digest"
    assert [t.name() for t in OrmQ.objects.all() if t.name().startswith("digest")] == [
        f"digest {morning.replace(second=0).isoformat()}"
    ]


def test_a_digest_the_mail_server_refused_is_sent_again_when_it_is_back(make_job, q_sync):
    from jobs import notify
    from tests.test_notify import mail_server_down

    make_job(command="true", alert_emails=["ana@example.com"])
    end = soon()
    with mail_server_down():
        report = digests.send_digests(period_end=end)
    assert list(report.failed) == ["ana@example.com"]
    [failed] = Notification.objects.all()
    server = SmtpServer()
    server.controller.start()
    try:
        with server.settings():
            assert notify.retry_failed(now=failed.sent_at + timedelta(minutes=3)) == 1
    finally:
        server.controller.stop()
    [(recipients, message)] = server.received
    assert recipients == ["ana@example.com"]
    assert message["Subject"].strip().startswith("[Jobsite] Digest")
    assert Notification.objects.get(tries=2).ok is True
    # and the period's claim still stands: the command does not send it a third time
    assert digests.send_digests(period_end=end).already_sent == ["ana@example.com"]


def test_a_failed_digest_is_not_tried_again_for_someone_who_follows_no_job_now(
    make_job, mailoutbox, q_sync
):
    """Tried again, it would report on every job (an address that follows
    none was the --to case): someone taken off the alert list since would
    read about jobs that are none of their business."""
    from jobs import notify
    from tests.test_notify import mail_server_down

    followed = make_job(name="warehouse-load", command="true", alert_emails=["ana@example.com"])
    make_job(name="payroll-export", command="exit 1", alert_emails=["hr@example.com"])
    end = soon()
    with mail_server_down():
        digests.send_digests(period_end=end, to=None)
    failed = Notification.objects.get(target="ana@example.com")
    Job.objects.filter(pk=followed.pk).update(alert_emails=[])
    assert notify.retry(notification_id=failed.pk) == (
        "not tried again: ana@example.com follows no job now"
    )
    assert mailoutbox == []


@override_settings(JOBSITE_DIGEST_TIME="08:00")
def test_a_digest_the_queue_refused_is_handed_on_at_the_next_tick(
    make_job, mailoutbox, q_sync, monkeypatch
):
    from django.db import OperationalError
    from django_q import tasks

    make_job(command="true", alert_emails=["ana@example.com"])
    morning = datetime(2026, 6, 10, 8, 0, 1, tzinfo=UTC)
    cache.delete(digests.done_mark(morning.replace(second=0)))
    real = tasks.async_task

    def locked(*args, **kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(tasks, "async_task", locked)
    with pytest.raises(OperationalError):
        digests.send_due_digests(now=morning)
    monkeypatch.setattr(tasks, "async_task", real)
    assert digests.send_due_digests(now=morning + timedelta(seconds=1)) is True
    assert [m.to for m in mailoutbox] == [["ana@example.com"]]


def test_an_owner_that_is_not_one_plain_address_gets_no_digest(make_job):
    make_job(owner="@data-team")
    make_job(owner="Data team (data@example.com, bob@example.com)")
    make_job(owner="Lead@Example.com")
    assert list(digests.followers()) == ["lead@example.com"]


def test_send_digest_command_twice_sends_once_and_says_so(make_job, mailoutbox):
    job = make_job(command="exit 1", alert_emails=["ana@example.com"])
    run_now(job)
    end = soon().isoformat()
    first, second = io.StringIO(), io.StringIO()
    call_command("send_digest", "--period", "24h", "--end", end, stdout=first)
    call_command("send_digest", "--period", "24h", "--end", end, stdout=second)
    assert "sent to ana@example.com: 1 failure (1 job, 1 run)" in first.getvalue()
    assert "ana@example.com: already sent for this period, not sent again" in second.getvalue()
    assert "Nothing sent." in second.getvalue()
    assert len(mailoutbox) == 1


def test_send_digest_command_names_the_same_period_without_end(make_job, mailoutbox):
    make_job(command="true", alert_emails=["ana@example.com"])
    first, second = io.StringIO(), io.StringIO()
    call_command("send_digest", "--period", "7d", stdout=first)
    call_command("send_digest", "--period", "7d", stdout=second)
    assert "sent to ana@example.com" in first.getvalue()
    assert "already sent" in second.getvalue()
    assert first.getvalue().splitlines()[0] == second.getvalue().splitlines()[0]
    assert len(mailoutbox) == 1


def test_send_digest_rejects_a_period_it_cannot_read(db):
    with pytest.raises(Exception, match='Period "a day" is not like 24h, 7d or 30m'):
        call_command("send_digest", "--period", "a day", stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_send_digest_process_mails_through_the_smtp_server_in_email_url(make_job):
    job = make_job(name="nightly-export", command="exit 5", alert_emails=["ana@example.com"])
    failed = run_now(job)
    server = SmtpServer()
    server.controller.start()
    try:
        command = [
            sys.executable,
            str(BASE_DIR / "manage.py"),
            "send_digest",
            "--period",
            "24h",
            "--end",
            soon().isoformat(),
        ]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "DATABASE_URL": database_url_for_children(),
            "DJANGO_SETTINGS_MODULE": "jobsite.settings",
            "EMAIL_URL": f"smtp://127.0.0.1:{server.port}",
            "SITE_URL": "https://jobs.example.com",
        }
        first = subprocess.run(command, env=env, cwd=BASE_DIR, capture_output=True, text=True)
        second = subprocess.run(command, env=env, cwd=BASE_DIR, capture_output=True, text=True)
    finally:
        server.controller.stop()

    assert first.returncode == 0, first.stderr
    assert "sent to ana@example.com: 1 failure (1 job, 1 run)" in first.stdout
    assert second.returncode == 0, second.stderr
    assert "already sent for this period" in second.stdout
    [(recipients, message)] = server.received
    assert recipients == ["ana@example.com"]
    text, html = parts(message)
    assert f"nightly-export #{failed.pk} failed: Exit code 5" in text
    assert f"https://jobs.example.com/runs/{failed.pk}/" in text
    assert f'href="https://jobs.example.com/runs/{failed.pk}/"' in html
