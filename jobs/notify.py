"""Sending what alerts.py decides: an email per recipient and a webhook per
target for each flip, each send recorded as a Notification row."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from django.utils.html import escape

from jobs import emails
from jobs.models import AlertFlip, Job, Notification, shown_url

log = logging.getLogger(__name__)

# Pause before the 2nd, 3rd, ... webhook try (the last value repeats).
WEBHOOK_BACKOFF = (0.5, 1.0)


def notify_flip(*, flip_id: int) -> str:
    """Send a flip's notifications at most once.

    1. Claim the flip (notified_at NULL -> now, conditional UPDATE): of
       several workers, or a redelivered task, exactly one goes on.
    2. Email each of the job's alert_emails (text + HTML).
    3. POST to the job's webhook and the global one.
    A crash between 1 and the sends loses the notification rather than
    sending it twice; every send's outcome is a Notification row.
    """
    now = timezone.now()
    if not AlertFlip.objects.filter(pk=flip_id, notified_at__isnull=True).update(notified_at=now):
        return "already notified"
    record = AlertFlip.objects.select_related("job", "run").get(pk=flip_id)
    job = record.job
    kind = (
        Notification.Kind.RECOVERY
        if record.new_state == Job.AlertState.OK
        else Notification.Kind.ALERT
    )
    email = _flip_email(record, now)
    sent = failed = 0
    for address in _addresses(job.alert_emails):
        error = emails.send(email=email, to=address)
        record_send(
            job=job,
            flip=record,
            kind=kind,
            channel=Notification.Channel.EMAIL,
            target=address,
            subject=email.subject,
            error=error,
        )
        sent, failed = sent + (not error), failed + bool(error)
    if webhook_targets(job):
        payload = webhook_payload(flip=record, now=now)
        for url in webhook_targets(job):
            error = post_webhook(url=url, payload=payload)
            record_send(
                job=job,
                flip=record,
                kind=kind,
                channel=Notification.Channel.WEBHOOK,
                target=url,
                subject=payload["text"],
                error=error,
            )
            sent, failed = sent + (not error), failed + bool(error)
    return f"sent {sent}, failed {failed}"


def _flip_email(record: AlertFlip, now: datetime) -> emails.Email:
    try:
        return emails.flip_email(flip=record, now=now)
    except Exception:  # the flip is claimed: a rendering bug must not swallow the alert
        log.exception("flip %s: could not render the email, sending a plain one", record.pk)
        return _plain_email(record)


# --- Failed sends, tried again ------------------------------------------------------

# The pause before each further try of a failed send (a mail server down for
# a deploy, a chat service's outage): four more tries over about 2¾ hours.
RETRY_AFTER = (
    timedelta(minutes=2),
    timedelta(minutes=10),
    timedelta(minutes=30),
    timedelta(hours=2),
)


def retry_failed(*, now: datetime) -> int:
    """For the sweep: hand failed sends whose pause is over to the workers.

    Each failed Notification is claimed (`retried_at`, a conditional UPDATE)
    before its try is queued, so of several sweepers one retries it. An alert
    overtaken by a newer flip of its job is not sent late: "failing" after
    "fixed" would mislead. Returns how many tries were queued."""
    from django_q.tasks import async_task

    queued = 0
    due = Q(tries__gt=len(RETRY_AFTER))  # given up on: claimed and left
    for tries, pause in enumerate(RETRY_AFTER, 1):
        due |= Q(tries=tries, sent_at__lte=now - pause)
    failed = (
        Notification.objects.filter(
            due, ok=False, retried_at__isnull=True, sent_at__gt=now - timedelta(days=1)
        )
        .select_related("flip")  # _overtaken reads its time
        .order_by("sent_at")
    )
    for row in failed[:100]:
        if not Notification.objects.filter(pk=row.pk, retried_at__isnull=True).update(
            retried_at=now
        ):
            continue  # another sweeper has it
        if row.tries > len(RETRY_AFTER) or _overtaken(row):
            continue  # given up: its last error stays on record
        async_task(
            "jobs.tasks.retry_notification", row.pk, q_options={"task_name": f"retry#{row.pk}"}
        )
        queued += 1
    return queued


def _overtaken(row: Notification) -> bool:
    return bool(
        row.flip_id and AlertFlip.objects.filter(job_id=row.job_id, at__gt=row.flip.at).exists()
    )


def retry(*, notification_id: int) -> str:
    """One more try of a failed send, recorded as a new Notification."""
    row = Notification.objects.select_related("flip__job", "flip__run", "digest").get(
        pk=notification_id
    )
    now = timezone.now()
    if row.digest_id:
        from jobs import digests

        resent = digests.resend(row.digest, now=now)
        if resent is None:
            return f"not tried again: {row.target} follows no job now"
        subject, error = resent
    elif row.flip_id and row.channel == Notification.Channel.EMAIL:
        email = _flip_email(row.flip, now)
        subject, error = email.subject, emails.send(email=email, to=row.target)
    elif row.flip_id:
        payload = webhook_payload(flip=row.flip, now=now)
        subject, error = payload["text"], post_webhook(url=row.target, payload=payload)
    else:
        return "nothing to retry"
    record_send(
        job_id=row.job_id,
        flip_id=row.flip_id,
        digest_id=row.digest_id,
        kind=row.kind,
        channel=row.channel,
        target=row.target,
        subject=subject,
        error=error,
        tries=row.tries + 1,
    )
    return f"try {row.tries + 1} to {row.shown_target}: " + (
        f"failed: {error}" if error else "sent"
    )


def _plain_email(flip: AlertFlip) -> emails.Email:
    job = flip.job
    url = emails.link((flip.run or job).get_absolute_url())
    text = f"{job.name} is {flip.new_state} (was {flip.old_state}).\n\n{url}\n"
    return emails.Email(
        subject=f"[Jobsite] {job.name} is {flip.new_state}",
        text=text,
        html=f'<p>{escape(job.name)} is {flip.new_state}.</p><p><a href="{url}">{url}</a></p>',
    )


def _addresses(values: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for value in values or []:
        address = str(value).strip()
        if address:
            seen.setdefault(address.lower(), address)
    return list(seen.values())


def record_send(
    *, kind: str, channel: str, target: str, subject: str, error: str, tries: int = 1, **about
) -> Notification:
    """A send's outcome ("" error: sent) as a Notification row; `about`: the
    job, flip or digest it was for."""
    return Notification.objects.create(
        kind=kind,
        channel=channel,
        target=target[:500],
        subject=subject[:300],
        sent_at=timezone.now(),
        ok=not error,
        error=error,
        tries=tries,
        **about,
    )


# --- Webhooks ---------------------------------------------------------------------


def webhook_targets(job: Job) -> list[str]:
    """The job's own webhook and the global one (JOBSITE_WEBHOOK_URL), once each."""
    urls = [job.webhook_url.strip(), settings.JOBSITE_WEBHOOK_URL.strip()]
    return list(dict.fromkeys(u for u in urls if u))


def webhook_payload(*, flip: AlertFlip, now: datetime) -> dict:
    """JSON for chat tools: a one-line Slack-compatible `text` plus the facts."""
    job = flip.job
    secrets = emails.secret_values(job)
    reason = emails.redact(flip.reason, secrets)
    url = emails.link((flip.run or job).get_absolute_url())
    if flip.new_state == Job.AlertState.OK:
        broken_for = emails.broken_duration(flip)
        was = flip.get_old_state_display().lower()
        line = f"{job.name} is fixed (was {was}" + (
            f" for {emails.humanize(broken_for)})" if broken_for else ")"
        )
    elif flip.new_state == Job.AlertState.STALE:
        stale = job.stale_reason(now) or job.stale_reason(flip.at)
        overdue = f", overdue by {emails.humanize(stale.overdue)}" if stale else ""
        line = f"{job.name} is stale{overdue}: {reason}"
    else:
        summary = emails.redact(flip.run.error_summary, secrets) if flip.run else ""
        line = f"{job.name} is failing: {summary or reason or 'failed'}"
        if flip.run:
            line += f" (run #{flip.run.pk})"
    text = f"[Jobsite] {_slack_escape(' '.join(line.split()))} {url}"
    return {
        "text": text,
        "job": job.slug,
        "state": flip.new_state,
        "old_state": flip.old_state,
        "run": flip.run_id,
        "url": url,
        "reason": reason,
        "at": flip.at.isoformat(),
    }


def _slack_escape(text: str) -> str:
    """Slack reads <...> as links or mentions; its docs ask for these three."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def post_webhook(*, url: str, payload: dict) -> str:
    """POST `payload` as JSON; '' on a 2xx answer, else the last error.

    Connection errors, timeouts and 5xx answers are tried again, up to
    JOBSITE_WEBHOOK_TRIES tries with a short pause; a 4xx answer is not (the
    request itself is wrong). Each try waits at most JOBSITE_WEBHOOK_TIMEOUT.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        return f"Not an http(s) URL: {url}"
    body = json.dumps(payload).encode()
    tries = max(1, settings.JOBSITE_WEBHOOK_TRIES)
    error = ""
    for attempt in range(1, tries + 1):
        if attempt > 1:
            time.sleep(WEBHOOK_BACKOFF[min(attempt - 2, len(WEBHOOK_BACKOFF) - 1)])
        error, retry = _post_once(url, body)
        if not error:
            return ""
        log.warning("webhook %s try %d/%d: %s", shown_url(url), attempt, tries, error)
        if not retry:
            return error
    return f"{error} (after {tries} tries)" if tries > 1 else error


def _post_once(url: str, body: bytes) -> tuple[str, bool]:
    """(error or '', whether another try may help)."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "Jobsite"},
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.JOBSITE_WEBHOOK_TIMEOUT) as response:
            response.read(64 * 1024)
        return "", False
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}", exc.code >= 500
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return f"Timed out after {settings.JOBSITE_WEBHOOK_TIMEOUT:g} s", True
        return f"Connection failed: {reason}", True
    except TimeoutError:
        return f"Timed out after {settings.JOBSITE_WEBHOOK_TIMEOUT:g} s", True
    except OSError as exc:  # reset, refused, remote closed without answering
        return f"Connection failed: {exc}", True
