"""Alert notifications: email through a real SMTP server, webhooks against a
real HTTP server, each send recorded."""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import time_machine
from aiosmtpd.controller import Controller
from django.conf import settings
from django.test import override_settings

from jobs import alerts, notify, services
from jobs.models import AlertFlip, Job, Notification

quiet = {"echo": lambda text: None}
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SmtpServer:
    """A real SMTP server on 127.0.0.1 that keeps what it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[list[str], email.message.EmailMessage]] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd hook)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.received.append((list(envelope.rcpt_tos), message))
        return "250 Message accepted"

    @property
    def messages(self) -> list[email.message.EmailMessage]:
        return [message for _to, message in self.received]

    def settings(self):
        return override_settings(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=self.port,
            EMAIL_HOST_USER="",
            EMAIL_HOST_PASSWORD="",
            EMAIL_USE_TLS=False,
            EMAIL_USE_SSL=False,
            EMAIL_TIMEOUT=5,
        )


@pytest.fixture
def smtp_server():
    server = SmtpServer()
    server.controller.start()
    try:
        with server.settings():
            yield server
    finally:
        server.controller.stop()


def parts(message: email.message.EmailMessage) -> tuple[str, str]:
    """(plain text, HTML) of a received multipart/alternative email."""
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    return text, html


def outbox_parts(message) -> tuple[str, str]:
    """(plain text, HTML) of a message in Django's locmem outbox."""
    [(html, mimetype)] = message.alternatives
    assert mimetype == "text/html"
    return message.body, html


class Webhook:
    """A real HTTP server on 127.0.0.1. Each request takes the next scripted
    answer: a status code, or ("sleep", seconds) before answering 200."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server hook)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                answer = hook.script.pop(0) if hook.script else 200
                if isinstance(answer, tuple):
                    time.sleep(answer[1])
                    answer = 200
                try:
                    self.send_response(answer)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    self.wfile.write(b"ok" if answer < 300 else b"no")
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def payloads(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]


@pytest.fixture
def webhook():
    servers: list[Webhook] = []

    def start(*script) -> Webhook:
        server = Webhook(list(script))
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.server.shutdown()
        server.server.server_close()


def failing_job(make_job, **fields) -> Job:
    fields.setdefault("command", "echo working; echo 'disk full' >&2; exit 3")
    fields.setdefault("alert_emails", ["oncall@example.com"])
    return make_job(**fields)


def failure_flip(job: Job) -> AlertFlip:
    """A real failing run; its flip (ok -> failing) is returned unsent."""
    run = services.run_foreground(job=job, **quiet)
    return AlertFlip.objects.get(job=job, run=run, new_state=Job.AlertState.FAILING)


# --- Email ---------------------------------------------------------------------------


def test_one_flip_sends_one_email_through_smtp_however_often_it_is_notified(
    make_job, smtp_server, q_sync, django_capture_on_commit_callbacks
):
    job = failing_job(make_job, name="nightly-export")
    with django_capture_on_commit_callbacks(execute=True):
        run = services.run_foreground(job=job, **quiet)
    flip = AlertFlip.objects.get(job=job)

    assert len(smtp_server.received) == 1
    recipients, message = smtp_server.received[0]
    assert recipients == ["oncall@example.com"]
    assert message["Subject"].startswith("[Jobsite] Failing: nightly-export")
    text, html = parts(message)
    assert f"{settings.SITE_URL}/runs/{run.pk}/" in text
    assert f'href="{settings.SITE_URL}/runs/{run.pk}/"' in html

    assert notify.notify_flip(flip_id=flip.pk) == "already notified"
    with django_capture_on_commit_callbacks(execute=True):
        services.run_foreground(job=job, **quiet)  # still failing: no new flip, no email
    assert len(smtp_server.received) == 1
    [sent] = Notification.objects.filter(job=job)
    assert (sent.kind, sent.channel, sent.target, sent.ok) == (
        "alert",
        "email",
        "oncall@example.com",
        True,
    )
    assert sent.flip == flip


def test_every_recipient_gets_an_email_and_a_notification_row(make_job, mailoutbox):
    job = failing_job(make_job, alert_emails=["a@example.com", "b@example.com"])
    notify.notify_flip(flip_id=failure_flip(job).pk)
    assert sorted(m.to[0] for m in mailoutbox) == ["a@example.com", "b@example.com"]
    assert sorted(
        Notification.objects.filter(job=job, ok=True).values_list("target", flat=True)
    ) == [
        "a@example.com",
        "b@example.com",
    ]


def test_failure_email_names_job_run_error_and_last_log_lines_without_secret_values(
    make_job, mailoutbox, monkeypatch
):
    monkeypatch.setenv("NOTIFY_TEST_TOKEN", "tok-5ecr3t-77")
    job = failing_job(
        make_job,
        name="warehouse-export",
        command='for i in $(seq 1 40); do echo "line-$i"; done; echo "token=$TOKEN"; exit 2',
        environment={"TOKEN": "${NOTIFY_TEST_TOKEN}", "TARGET": "reports"},
        secret_keys=["TOKEN"],
    )
    run = services.run_foreground(job=job, **quiet)
    # A reason quoting the secret (e.g. from an error message) must not leak either.
    AlertFlip.objects.filter(job=job).update(reason="upload refused for tok-5ecr3t-77")
    notify.notify_flip(flip_id=AlertFlip.objects.get(job=job).pk)

    [message] = mailoutbox
    assert message.subject == "[Jobsite] Failing: warehouse-export: Exit code 2: token=••••••"
    text, html = outbox_parts(message)
    for body in (text, html):
        assert "warehouse-export" in body
        assert f"#{run.pk}" in body
        assert f"{settings.SITE_URL}/runs/{run.pk}/" in body
        assert f"{settings.SITE_URL}/jobs/{job.slug}/" in body
        assert "Exit code 2" in body
        assert "line-40" in body and "line-13" in body  # the last 30 lines ...
        assert "line-12\n" not in body  # ... and not more
        assert "token=••••••" in body
        assert "tok-5ecr3t-77" not in body
    assert "tok-5ecr3t-77" not in message.subject


def test_a_job_printing_one_huge_line_gets_a_short_readable_email(make_job, mailoutbox):
    job = failing_job(
        make_job, command="head -c 3000000 /dev/zero | tr '\\0' x; echo; echo 'disk full'; exit 3"
    )
    notify.notify_flip(flip_id=failure_flip(job).pk)
    [message] = mailoutbox
    text, html = outbox_parts(message)
    for body in (text, html):
        assert len(body) < 40_000
        assert "x" * 500 + "… (" in body and "x" * 501 not in body
        assert "disk full" in body


def test_recovery_email_says_it_is_fixed_and_how_long_it_was_broken(
    make_job, mailoutbox, q_sync, django_capture_on_commit_callbacks
):
    job = failing_job(make_job, name="billing-sync", command='test -e "$FLAG"')
    job.environment = {"FLAG": "/nonexistent/flag"}
    job.save()
    with time_machine.travel(T0, tick=False), django_capture_on_commit_callbacks(execute=True):
        services.run_foreground(job=job, **quiet)
    Job.objects.filter(pk=job.pk).update(environment={"FLAG": "/"})
    job.refresh_from_db()
    later = T0 + timedelta(hours=2, minutes=5)
    with time_machine.travel(later, tick=False), django_capture_on_commit_callbacks(execute=True):
        run = services.run_foreground(job=job, **quiet)

    assert len(mailoutbox) == 2
    fixed = mailoutbox[1]
    assert fixed.subject == "[Jobsite] Fixed: billing-sync (was failing for 2 h 5 min)"
    text, html = outbox_parts(fixed)
    for body in (text, html):
        assert "billing-sync is OK again after being" in body
        assert "failing for 2 h 5 min" in body
        assert f"{settings.SITE_URL}/runs/{run.pk}/" in body
    assert Notification.objects.filter(job=job, kind="recovery", ok=True).count() == 1


def test_stale_email_says_how_overdue_and_why(make_job, mailoutbox):
    job = make_job(
        name="hourly-import", schedule="0 * * * *", grace=300, alert_emails=["x@example.com"]
    )
    Job.objects.filter(pk=job.pk).update(created_at=T0 - timedelta(days=1))
    now = T0 + timedelta(minutes=20)  # the 12:00 fire never ran; grace ended 12:05
    with time_machine.travel(now, tick=False):
        assert alerts.check_stale(now=now) == 1
        notify.notify_flip(flip_id=AlertFlip.objects.get(job=job).pk)

    [message] = mailoutbox
    assert message.subject == "[Jobsite] Stale: hourly-import: overdue by 15 min"
    text, html = outbox_parts(message)
    for body in (text, html):
        assert "overdue by 15 min" in body
        assert "no run for the fire at 2026-06-01 12:00" in body
        assert "manage.py scheduler" in body
        assert f"{settings.SITE_URL}/jobs/hourly-import/" in body


def test_an_unreachable_mail_server_is_recorded_as_a_failed_notification(make_job):
    job = failing_job(make_job)
    flip = failure_flip(job)
    with override_settings(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=free_port(),  # nothing listens there
        EMAIL_TIMEOUT=2,
    ):
        assert notify.notify_flip(flip_id=flip.pk) == "sent 0, failed 1"
    [record] = Notification.objects.filter(job=job)
    assert record.ok is False
    assert "Connection refused" in record.error or "ConnectionRefused" in record.error


# --- Failed sends, tried again ------------------------------------------------------


def mail_server_down():
    return override_settings(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=free_port(),  # nothing listens there
        EMAIL_TIMEOUT=2,
    )


def test_an_alert_the_mail_server_refused_is_sent_when_it_is_back(make_job, smtp_server, q_sync):
    job = failing_job(make_job, name="nightly-export")
    flip = failure_flip(job)
    with mail_server_down():
        assert notify.notify_flip(flip_id=flip.pk) == "sent 0, failed 1"
    [failed] = Notification.objects.filter(job=job)
    # The server is back (smtp_server). Not retried before its pause is over,
    assert notify.retry_failed(now=failed.sent_at + timedelta(minutes=1)) == 0
    assert smtp_server.received == []
    # then once, however many sweepers look.
    later = failed.sent_at + timedelta(minutes=3)
    assert notify.retry_failed(now=later) == 1
    assert notify.retry_failed(now=later) == 0
    [(recipients, message)] = smtp_server.received
    assert recipients == ["oncall@example.com"]
    assert message["Subject"].startswith("[Jobsite] Failing: nightly-export")
    retried = Notification.objects.get(job=job, ok=True)
    assert (retried.flip, retried.tries, retried.target) == (flip, 2, "oncall@example.com")


def test_failed_sends_are_tried_four_more_times_then_given_up(make_job, q_sync):
    job = failing_job(make_job)
    flip = failure_flip(job)
    with mail_server_down():
        notify.notify_flip(flip_id=flip.pk)
        now = Notification.objects.get(job=job).sent_at
        for _ in range(10):
            now += timedelta(hours=3)
            with time_machine.travel(now, tick=False):
                notify.retry_failed(now=now)
    tries = list(Notification.objects.filter(job=job).order_by("tries"))
    assert [(n.tries, n.ok) for n in tries] == [
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (5, False),
    ]
    assert "Connection refused" in tries[-1].error or "ConnectionRefused" in tries[-1].error


def test_a_fresh_failure_is_tried_again_on_time_behind_many_older_ones(make_job, monkeypatch):
    """Older failures on their 4th try (a 2-hour pause) must not fill the
    sweep's batch and hold up a 2-minute retry."""
    from django_q import tasks

    job = failing_job(make_job)
    flip = failure_flip(job)
    now = flip.at + timedelta(hours=1)
    Notification.objects.bulk_create(
        Notification(
            job=job,
            flip=flip,
            kind="alert",
            channel="email",
            target=f"old{i}@example.com",
            sent_at=now - timedelta(minutes=30),
            tries=4,
        )
        for i in range(120)
    )
    fresh = Notification.objects.create(
        job=job,
        flip=flip,
        kind="alert",
        channel="email",
        target="new@example.com",
        sent_at=now - timedelta(minutes=5),
    )
    queued = []
    monkeypatch.setattr(tasks, "async_task", lambda *args, **kwargs: queued.append(args))
    assert notify.retry_failed(now=now) == 1
    assert queued == [("jobs.tasks.retry_notification", fresh.pk)]


def test_a_failed_alert_is_not_sent_late_once_the_job_flipped_again(make_job, mailoutbox, q_sync):
    job = failing_job(make_job)
    flip = failure_flip(job)
    with mail_server_down():
        notify.notify_flip(flip_id=flip.pk)
    alerts.flip(
        job=job,
        old=Job.AlertState.FAILING,
        new=Job.AlertState.OK,
        now=flip.at + timedelta(seconds=1),
    )
    [failed] = Notification.objects.filter(job=job)
    assert notify.retry_failed(now=failed.sent_at + timedelta(minutes=5)) == 0
    assert mailoutbox == []


def test_a_webhook_that_was_down_is_tried_again(make_job, webhook, q_sync):
    hook = webhook(503, 503, 503, 200)
    job = failing_job(make_job, alert_emails=[], webhook_url=hook.url)
    flip = failure_flip(job)
    with override_settings(JOBSITE_WEBHOOK_TRIES=3):
        assert notify.notify_flip(flip_id=flip.pk) == "sent 0, failed 1"
        [failed] = Notification.objects.filter(job=job)
        assert notify.retry_failed(now=failed.sent_at + timedelta(minutes=3)) == 1
    assert len(hook.requests) == 4
    assert Notification.objects.get(job=job, tries=2).ok is True


def test_the_sweep_hands_a_lost_notification_on_again_only_every_ten_minutes(make_job):
    from django.core.cache import cache
    from django_q.models import OrmQ

    job = failing_job(make_job)
    flip = failure_flip(job)  # its task was never run: notified_at stays empty
    cache.delete(f"jobsite:flip-resent:{flip.pk}")
    before = OrmQ.objects.count()
    now = flip.at + timedelta(minutes=3)
    for _ in range(12):  # a minute of sweeps
        alerts.resend_unnotified(now=now)
        now += timedelta(seconds=5)
    assert OrmQ.objects.count() == before + 1


# --- Webhooks ----------------------------------------------------------------------


def test_webhook_gets_slack_compatible_json(make_job, webhook, mailoutbox):
    hook = webhook(200)
    job = failing_job(make_job, name="nightly-export", webhook_url=hook.url)
    flip = failure_flip(job)
    notify.notify_flip(flip_id=flip.pk)

    [request] = hook.requests
    assert request["headers"]["Content-Type"] == "application/json"
    [payload] = hook.payloads()
    run_url = f"{settings.SITE_URL}/runs/{flip.run_id}/"
    assert payload["text"] == (
        "[Jobsite] nightly-export is failing: Exit code 3: disk full"
        f" (run #{flip.run_id}) {run_url}"
    )
    assert payload["job"] == "nightly-export"
    assert (payload["state"], payload["old_state"]) == ("failing", "ok")
    assert payload["run"] == flip.run_id
    assert payload["url"] == run_url
    assert payload["reason"] == "Exit code 3: disk full"
    record = Notification.objects.get(job=job, channel="webhook")
    assert (record.target, record.ok, record.error) == (hook.url, True, "")
    assert len(mailoutbox) == 1  # email goes out as well


def test_a_webhook_url_token_is_not_shown_on_the_job_page_or_logged(
    make_job, webhook, admin_client, caplog
):
    hook = webhook(500, 500, 500)
    token_url = hook.url + "/T000/B000/s3cr3t-hook-token"
    job = failing_job(make_job, alert_emails=[], webhook_url=token_url)
    notify.notify_flip(flip_id=failure_flip(job).pk)
    page = admin_client.get(f"/jobs/{job.slug}/").content.decode()
    host = hook.url.rsplit("/", 1)[0]
    assert f"{host}/…" in page
    assert "s3cr3t-hook-token" not in page
    assert "s3cr3t-hook-token" not in caplog.text
    assert "webhook http://127.0.0.1" in caplog.text  # the tries are logged, by host


def test_global_webhook_gets_alerts_of_every_job(make_job, webhook):
    hook = webhook(200)
    job = failing_job(make_job, alert_emails=[])
    with override_settings(JOBSITE_WEBHOOK_URL=hook.url):
        notify.notify_flip(flip_id=failure_flip(job).pk)
    assert [p["job"] for p in hook.payloads()] == [job.slug]


def test_webhook_that_does_not_answer_in_time_is_a_recorded_failure_in_bounded_time(
    make_job, webhook
):
    hook = webhook(("sleep", 3), ("sleep", 3))
    job = failing_job(make_job, alert_emails=[], webhook_url=hook.url)
    flip = failure_flip(job)
    started = time.monotonic()
    with override_settings(JOBSITE_WEBHOOK_TIMEOUT=0.3, JOBSITE_WEBHOOK_TRIES=2):
        assert notify.notify_flip(flip_id=flip.pk) == "sent 0, failed 1"
    elapsed = time.monotonic() - started
    assert elapsed < 2.0  # 2 tries x 0.3 s + 0.5 s pause, not 2 x 3 s
    assert len(hook.requests) == 2
    [record] = Notification.objects.filter(job=job)
    assert record.ok is False
    assert record.error == "Timed out after 0.3 s (after 2 tries)"


def test_webhook_answering_500_is_retried_and_recorded_ok(make_job, webhook):
    hook = webhook(500, 200)
    job = failing_job(make_job, alert_emails=[], webhook_url=hook.url)
    notify.notify_flip(flip_id=failure_flip(job).pk)
    assert len(hook.requests) == 2
    assert hook.payloads()[0] == hook.payloads()[1]
    [record] = Notification.objects.filter(job=job)
    assert (record.ok, record.error) == (True, "")


def test_webhook_answering_4xx_is_not_retried(make_job, webhook):
    hook = webhook(404, 200)
    job = failing_job(make_job, alert_emails=[], webhook_url=hook.url)
    with override_settings(JOBSITE_WEBHOOK_TRIES=3):
        notify.notify_flip(flip_id=failure_flip(job).pk)
    assert len(hook.requests) == 1
    [record] = Notification.objects.filter(job=job)
    assert (record.ok, record.error) == (False, "HTTP 404 Not Found")


def test_refused_webhook_connection_is_retried_then_recorded(make_job):
    url = f"http://127.0.0.1:{free_port()}/hook"
    job = failing_job(make_job, alert_emails=[], webhook_url=url)
    with override_settings(JOBSITE_WEBHOOK_TRIES=2):
        notify.notify_flip(flip_id=failure_flip(job).pk)
    [record] = Notification.objects.filter(job=job)
    assert record.ok is False
    assert record.error.startswith("Connection failed:")
    assert record.error.endswith("(after 2 tries)")


def test_recovery_webhook_says_fixed_and_for_how_long(make_job, webhook):
    hook = webhook(200)
    job = make_job(name="billing-sync", webhook_url=hook.url)
    alerts.flip(job=job, old="ok", new="failing", now=T0, reason="Exit code 1")
    back = alerts.flip(
        job=job, old="failing", new="ok", now=T0 + timedelta(minutes=42), reason="succeeded"
    )
    notify.notify_flip(flip_id=back.pk)
    [payload] = hook.payloads()
    assert payload["text"] == (
        f"[Jobsite] billing-sync is fixed (was failing for 42 min) "
        f"{settings.SITE_URL}/jobs/billing-sync/"
    )
    assert (payload["state"], payload["old_state"], payload["run"]) == ("ok", "failing", None)


def test_an_alert_sent_after_the_job_flipped_back_says_so(make_job, mailoutbox):
    """Each flip is its own task: with several workers, "Failing" can go out
    after the "Fixed" that followed it. Read last in the inbox, it must not
    look like the job is still broken."""
    job = failing_job(make_job)
    failing = failure_flip(job)
    alerts.flip(
        job=job,
        old=Job.AlertState.FAILING,
        new=Job.AlertState.OK,
        now=failing.at + timedelta(seconds=5),
    )
    fixed = AlertFlip.objects.get(job=job, new_state=Job.AlertState.OK)
    notify.notify_flip(flip_id=fixed.pk)  # the later flip's task ran first
    notify.notify_flip(flip_id=failing.pk)

    first, late = mailoutbox
    assert first.subject.startswith(f"[Jobsite] Fixed: {job.name}")
    assert late.subject.startswith(f"[Jobsite] Failing (now OK): {job.name}: ")
    for body in outbox_parts(late):
        assert "Sent late:" in body and "the job is OK." in body

    # In order, nothing is said.
    mailoutbox.clear()
    again = failure_flip(job)
    notify.notify_flip(flip_id=again.pk)
    [message] = mailoutbox
    assert message.subject.startswith(f"[Jobsite] Failing: {job.name}: ")
    assert "Sent late" not in outbox_parts(message)[0]
