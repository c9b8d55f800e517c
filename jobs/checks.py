"""System checks for configuration mistakes a user could make."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Warning, register


@register()
def check_django_q(app_configs, **kwargs):
    problems = []
    q = settings.Q_CLUSTER
    if q.get("scheduler", True):
        problems.append(
            Warning(
                "django-q2's own scheduler is on; Jobsite runs its own (manage.py scheduler).",
                hint="Set Q_CLUSTER['scheduler'] = False.",
                id="jobs.W001",
            )
        )
    if q.get("retry", 0) <= q.get("timeout", 0):
        problems.append(
            Error(
                "Q_CLUSTER['retry'] must exceed Q_CLUSTER['timeout'] or tasks are delivered twice.",
                id="jobs.E001",
            )
        )
    if settings.CACHES["default"]["BACKEND"].endswith("LocMemCache"):
        problems.append(
            Warning(
                "A per-process cache hides the workers' status from the dashboard.",
                hint="Use the database or Redis cache.",
                id="jobs.W002",
            )
        )
    return problems


@register()
def check_digest_time(app_configs, **kwargs):
    from django.core.exceptions import ImproperlyConfigured

    from jobs import digests

    try:
        digests.digest_clock()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), hint="Use HH:MM, e.g. 08:00, or empty.", id="jobs.E002")]
    return []
