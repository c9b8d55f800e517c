"""What alert and digest emails say: subject, plain text and HTML, rendered
from templates/emails/. Sending and recording live in notify.py."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string

from jobs import execution, runlog
from jobs.models import SECRET_MASK, AlertFlip, Job, Run

log = logging.getLogger(__name__)

LOG_LINES = 30


@dataclass(frozen=True)
class Email:
    subject: str
    text: str
    html: str


def render(*, template: str, subject: str, context: dict) -> Email:
    """templates/emails/<template>.txt and .html with the same context."""
    context = {"subject": subject, "site_url": settings.SITE_URL, **context}
    return Email(
        subject=" ".join(subject.split())[:250],
        text=render_to_string(f"emails/{template}.txt", context),
        html=render_to_string(f"emails/{template}.html", context),
    )


def send(*, email: Email, to: str) -> str:
    """Send to one address; '' when it went out, else the error (never raises)."""
    message = EmailMultiAlternatives(
        subject=email.subject, body=email.text, from_email=settings.DEFAULT_FROM_EMAIL, to=[to]
    )
    message.attach_alternative(email.html, "text/html")
    try:
        message.send()
    except Exception as exc:  # any transport error is recorded, not raised
        log.warning("email to %s failed: %s", to, exc)
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ""


def link(path: str) -> str:
    return f"{settings.SITE_URL}{path}"


def secret_values(job: Job) -> list[str]:
    """The values of the job's secret keys as a run would see them: ${NAME}
    resolved from this process's environment where it can be, else as written.
    Logs are redacted when stored; this guards what else an email quotes."""
    values: list[str] = []
    raws = [(key, job.environment.get(key)) for key in job.secret_keys]
    # A delivery password (SQL/upload jobs) is a secret too, whatever its key.
    raws.append(("deliver_password", getattr(job, "deliver_password", "")))
    for key, raw in raws:
        if not raw:
            continue
        try:
            values.append(execution.resolve_references({key: raw}, os.environ)[key])
        except execution.UnresolvedReference:
            pass
        values.append(raw)
    # Longest first, so a secret containing another is masked whole; very
    # short values would mask half the text and protect nothing.
    forms = execution.secret_forms(values)
    return sorted({v for v in forms if len(v) >= 3}, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, SECRET_MASK)
    return text


def humanize(span: timedelta | None) -> str:
    """'<1 s', '45 s', '12 min', '3 h 5 min', '2 days 4 h'."""
    if span is None:
        return "an unknown time"
    if timedelta(0) < span < timedelta(seconds=0.5):
        return "<1 s"
    seconds = max(0, round(span.total_seconds()))
    minutes = round(seconds / 60)
    if seconds < 120:
        return f"{seconds} s"
    if minutes < 120:
        return f"{minutes} min"
    if minutes < 2 * 1440:
        return f"{minutes // 60} h {minutes % 60} min"
    hours = round(seconds / 3600)
    return f"{hours // 24} days {hours % 24} h"


# --- Alert emails ----------------------------------------------------------------


def flip_email(*, flip: AlertFlip, now: datetime) -> Email:
    """The email for a flip: failing, stale, or fixed (back to ok)."""
    job = flip.job
    secrets = secret_values(job)
    context = {
        "job": job,
        "job_url": link(job.get_absolute_url()),
        "flip": flip,
        "reason": redact(flip.reason, secrets),
    }
    if flip.new_state == Job.AlertState.OK:
        broken_for = broken_duration(flip)
        context.update(broken_for=humanize(broken_for) if broken_for else "")
        context.update(_run_context(flip.run, secrets, with_log=False))
        what = f"was {flip.get_old_state_display().lower()}"
        subject = f"[Jobsite] Fixed: {job.name} ({what} for {context['broken_for']})"
        if not broken_for:
            subject = f"[Jobsite] Fixed: {job.name} ({what})"
        return render(template="recovery", subject=subject, context=context)
    # Each flip is its own task, so with several workers "Failing" can go out
    # after the "Fixed" that followed it: then it says so, in the subject too.
    since = AlertFlip.objects.filter(job_id=flip.job_id, pk__gt=flip.pk).order_by("pk").first()
    context["since"] = since
    late = f" (now {since.get_new_state_display()})" if since else ""
    if flip.new_state == Job.AlertState.STALE:
        stale = job.stale_reason(now) or job.stale_reason(flip.at)
        last_run = job.runs.order_by("-id").first()
        context.update(
            stale=stale,
            overdue=humanize(stale.overdue) if stale else "",
            grace=humanize(job.effective_grace(now)) if job.schedule else "",
            last_run=last_run,
            last_run_url=link(last_run.get_absolute_url()) if last_run else "",
        )
        overdue = f": overdue by {context['overdue']}" if stale else ""
        subject = f"[Jobsite] Stale{late}: {job.name}{overdue}"
        return render(template="stale", subject=subject, context=context)
    context.update(_run_context(flip.run, secrets, with_log=True))
    summary = context.get("error_summary") or context["reason"] or "failed"
    subject = f"[Jobsite] Failing{late}: {job.name}: {summary.splitlines()[0][:120]}"
    return render(template="failing", subject=subject, context=context)


def broken_duration(flip: AlertFlip) -> timedelta | None:
    """How long the job was in the state this flip left: since the flip into it."""
    previous = (
        AlertFlip.objects.filter(job_id=flip.job_id, new_state=flip.old_state, at__lte=flip.at)
        .exclude(pk=flip.pk)
        .order_by("-at", "-id")
        .only("at")
        .first()
    )
    return flip.at - previous.at if previous else None


# A log's last lines in an email: each line and the whole kept short, so a
# job that prints one 3 MB line sends a readable email (mail clients clip
# long messages, and the links come after the log).
LOG_LINE_CHARS = 500
LOG_CHARS = 16_000


def _capped(text: str) -> str:
    lines = [
        line
        if len(line) <= LOG_LINE_CHARS
        else f"{line[:LOG_LINE_CHARS]}… ({len(line):,} characters)"
        for line in text.split("\n")
    ]
    while len(lines) > 1 and sum(len(line) + 1 for line in lines) > LOG_CHARS:
        lines.pop(0)
    return "\n".join(lines)


def _run_context(run: Run | None, secrets: list[str], *, with_log: bool) -> dict:
    if run is None:
        return {"run": None}
    context = {
        "run": run,
        "run_url": link(run.get_absolute_url()),
        "error_summary": redact(run.error_summary, secrets),
        "duration": humanize(run.duration()) if run.started_at and run.finished_at else "",
    }
    if with_log:
        context["log_lines"] = _capped(redact(runlog.last_lines(run, LOG_LINES), secrets))
        context["log_lines_count"] = LOG_LINES
    return context
