"""Sending what alerts.py and digests decide: email and webhook, each send
recorded as a Notification row."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from jobs.models import AlertFlip, Job, Notification

log = logging.getLogger(__name__)


def notify_flip(*, flip_id: int) -> str:
    """Send a flip's notifications, once: claim it first (notified_at)."""
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
    subject = f"[Jobsite] {job.name}: {record.get_new_state_display().lower()}"
    link = f"{settings.SITE_URL}{job.get_absolute_url()}"
    body = f"{job.name} is {record.new_state}: {record.reason}\n\n{link}\n"
    for address in job.alert_emails:
        try:
            send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [address])
            ok, error = True, ""
        except Exception as exc:  # any transport error is recorded, not raised
            ok, error = False, str(exc)
        Notification.objects.create(
            job=job,
            flip=record,
            kind=kind,
            channel=Notification.Channel.EMAIL,
            target=address,
            subject=subject,
            sent_at=timezone.now(),
            ok=ok,
            error=error,
        )
    return "sent"
