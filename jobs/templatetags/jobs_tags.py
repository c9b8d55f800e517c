"""Small formatting helpers for the dashboard: durations, times, rates, badges."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo

from django import template
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe
from django.utils.timesince import timesince, timeuntil

from jobs import scheduling
from jobs.models import Job, Run

register = template.Library()

# Status -> colour family (the CSS classes in jobs/static/jobs/jobsite.css).
STATUS_TONES = {
    Run.Status.SUCCEEDED: "ok",
    Run.Status.FAILED: "bad",
    Run.Status.TIMED_OUT: "bad",
    Run.Status.LOST: "bad",
    Run.Status.RUNNING: "busy",
    Run.Status.QUEUED: "idle",
    Run.Status.SKIPPED: "warn",
    Run.Status.CANCELLED: "warn",
}


ALERT_TONES = {Job.AlertState.OK: "ok", Job.AlertState.FAILING: "bad", Job.AlertState.STALE: "warn"}


STATUS_LABELS = {value: str(label) for value, label in Run.Status.choices}


def status_label(status: str) -> str:
    # A plain dict: the Choices lookups cost half a second on a 1,000-job overview.
    return STATUS_LABELS.get(status) or ("Never run" if status == "never" else status)


def counted(n: int, noun: str) -> str:
    """ "1 run", "2 runs": counts in messages read as sentences."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@register.filter
def duration(value: timedelta | None) -> str:
    """'< 0.1 s', '0.4 s', '12.0 s', '3 min 4 s', '2 h 5 min', '3 d 4 h'; '' for None."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if 0 < seconds < 0.05:
        return "< 0.1 s"
    if seconds < 60:
        return f"{sign}{seconds:.1f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days} d {hours} h"
    if hours:
        return f"{sign}{hours} h {minutes} min"
    return f"{sign}{minutes} min {secs} s"


def _offset(moment: datetime) -> str:
    offset = moment.utcoffset() or timedelta()
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}"


@register.filter
def stamp(value: datetime | None) -> str:
    """A moment in the site's TIME_ZONE with its offset: '2027-03-28 03:00:05 +02:00'."""
    if value is None:
        return ""
    return _stamp_in(value, timezone.get_current_timezone())


def _stamp_in(value: datetime, tz: tzinfo) -> str:
    local = value.astimezone(tz)
    text = local.isoformat(" ", "seconds")  # '2027-03-28 03:00:05+02:00': 3x faster
    if len(text) == 25:  # else an offset with seconds (old LMT): say it as _offset does
        return f"{text[:19]} {text[19:]}"
    return f"{local:%Y-%m-%d %H:%M:%S} {_offset(local)}"


@register.filter
def in_zone(value: datetime | None, zone_name: str) -> str:
    """A moment in a job's own time zone: 'Sun 2027-03-28 03:00 CEST (+02:00)'."""
    if value is None:
        return ""
    local = value.astimezone(scheduling.zone(zone_name))
    return f"{local:%a %Y-%m-%d %H:%M} {local.tzname()} ({_offset(local)})"


@register.simple_tag
def status_badge(status: str) -> SafeString:
    return format_html(
        '<span class="badge tone-{}" data-status="{}">{}</span>',
        STATUS_TONES.get(status, "idle"),
        status,
        status_label(status),
    )


def _runs_prefix() -> str:
    """ "/runs/" as routed: reversing once per square cost a second on an
    overview of 1,000 jobs x 20 squares."""
    global _RUNS_PREFIX
    if _RUNS_PREFIX is None:
        _RUNS_PREFIX = reverse("jobs-run-detail", args=[0]).removesuffix("0/")
    return _RUNS_PREFIX


_RUNS_PREFIX: str | None = None


@register.simple_tag
def run_strip(runs: list[Run]) -> SafeString:
    """Runs as small coloured squares linking to them; each title says what and when.

    One tag per strip, not per square: a page of 100 jobs has 2,000 squares,
    and a template tag call plus a time zone lookup each cost more than the
    square itself (55 ms of a 2,000-square page vs 10 ms like this).
    """
    tz = timezone.get_current_timezone()
    prefix = _runs_prefix()
    # Built directly: every part is ours - a tone from a dict, an integer,
    # a status label, a formatted time.
    return mark_safe(
        "".join(
            f'<a class="sq tone-{STATUS_TONES.get(run.status, "idle")}" '
            f'href="{prefix}{run.pk}/" title="{_square_title(run, tz)}"></a>'
            for run in runs
        )
    )


def _square_title(run: Run, tz: tzinfo) -> str:
    # Only the label can hold markup (an unknown status is shown as stored).
    label = escape(status_label(run.status))
    return f"#{run.pk} {label} · {_stamp_in(run.started_at or run.queued_at, tz)}"


@register.simple_tag
def alert_badge(state: str) -> SafeString:
    label = Job.AlertState(state).label if state in Job.AlertState.values else state
    return format_html(
        '<span class="badge tone-{}" data-alert="{}">{}</span>',
        ALERT_TONES.get(state, "idle"),
        state,
        label,
    )


@register.filter
def short_in_zone(value: datetime | None, zone_name: str) -> str:
    """'02:15 CET' when it is today in the job's zone, else 'Mon 01-04 02:15 CET'."""
    if value is None:
        return ""
    local = value.astimezone(scheduling.zone(zone_name))
    today = timezone.now().astimezone(local.tzinfo).date()
    if local.date() == today:
        return f"{local:%H:%M} {local.tzname()}"
    return f"{local:%a %m-%d %H:%M} {local.tzname()}"


@register.filter
def percent(rate) -> str:
    """A stats.Rate's success share: '100%', '99.9%' (never rounded up to
    100), '67%'; an em dash when nothing ran."""
    value = rate.percent if rate is not None else None
    if value is None:
        return "—"
    if value == 100 or value < 99:
        return f"{value:.0f}%"
    return f"{int(value * 10) / 10:.1f}%"


@register.filter
def rate_tone(rate) -> str:
    """ok at 100 %, warn from 90 %, bad below; idle when nothing ran."""
    value = rate.percent if rate is not None else None
    if value is None:
        return "idle"
    return "ok" if value == 100 else "warn" if value >= 90 else "bad"


# What run.command holds, by the job's kind (services.what_runs).
COMMAND_LABELS = {Job.Kind.SHELL: "Command", Job.Kind.PYTHON: "Callable", Job.Kind.SQL: "SQL"}


@register.filter
def command_label(kind: str) -> str:
    return COMMAND_LABELS.get(kind, "Command")


@register.filter
def rows_exported(rows: int | None) -> str:
    """'12,345 rows exported', '1 row exported'; '' when nothing was recorded."""
    if rows is None:
        return ""
    return f"{rows:,} row{'' if rows == 1 else 's'} exported"


@register.filter
def has_progress(run: Run) -> bool:
    return (
        run.progress_done is not None
        or run.progress_total is not None
        or bool(run.progress_message)
    )


@register.filter
def progress_text(run: Run) -> str:
    """'3 of 10 (30%)', '1,200 done' without a total; '' before any report."""
    done, total = run.progress_done, run.progress_total
    if total:
        done = done or 0
        return f"{done:,} of {total:,} ({min(100, max(0, done * 100 // total))}%)"
    if done is not None:
        return f"{done:,} done"
    return ""


@register.filter
def ago(value: datetime | None, now: datetime | None = None) -> str:
    """'3 minutes ago'; 'just now' under a minute (timesince says '0 minutes')."""
    if value is None:
        return ""
    now = now or timezone.now()
    if now - value < timedelta(minutes=1):
        return "just now"
    return f"{timesince(value, now)} ago"


@register.filter
def from_now(value: datetime | None, now: datetime | None = None) -> str:
    """'in 3 minutes'; 'in under a minute' (timeuntil says '0 minutes')."""
    if value is None:
        return ""
    now = now or timezone.now()
    if value - now < timedelta(minutes=1):
        return "in under a minute"
    return f"in {timeuntil(value, now)}"
