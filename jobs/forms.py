"""Forms: the admin's job form with the reliability and dependency checks."""

from __future__ import annotations

from typing import Any

from django import forms
from django.db.models import QuerySet

from jobs import services
from jobs.models import Job

MAX_RETRIES = 20


class JobAdminForm(forms.ModelForm):
    """Job.clean() checks schedule, zone, timeout and environment; this adds
    what needs the form's data: retry bounds and the dependency graph."""

    class Meta:
        model = Job
        # The admin narrows this to its fieldsets (read-only views show fewer).
        fields = [
            *["name", "slug", "description", "owner", "tags"],
            *["kind", "command", "environment", "secret_keys"],
            *["schedule", "timezone", "enabled", "timeout", "queue"],
            *["overlap", "retries", "retry_delay", "retry_backoff", "retry_max_delay", "catchup"],
            *["upstreams", "trigger_on_upstream"],
        ]

    def clean_retries(self) -> int:
        retries = self.cleaned_data["retries"]
        if retries > MAX_RETRIES:
            raise forms.ValidationError(
                f"At most {MAX_RETRIES} retries; a job failing more often than that needs "
                "fixing, not retrying."
            )
        return retries

    def clean_retry_backoff(self) -> float:
        backoff = self.cleaned_data["retry_backoff"]
        if backoff < 1:
            raise forms.ValidationError(
                "The backoff factor must be at least 1 (1 keeps the same delay for every retry)."
            )
        return backoff

    def clean_upstreams(self) -> QuerySet[Job]:
        upstreams = self.cleaned_data["upstreams"]
        job = self.instance
        if job.pk is None:
            return upstreams  # a new job has no downstreams yet: no cycle possible
        ids = [up.pk for up in upstreams]
        if job.pk in ids:
            raise forms.ValidationError("A job cannot depend on itself.")
        cycle = services.dependency_cycle(job, ids)
        if cycle:
            raise forms.ValidationError(f"Dependency cycle: {' → '.join(cycle)}")
        return upstreams

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        upstreams = cleaned.get("upstreams")  # None after a cycle error: one thing at a time
        if cleaned.get("trigger_on_upstream") and upstreams is not None and not upstreams.exists():
            self.add_error(
                "trigger_on_upstream", "Choose at least one upstream job to be triggered by."
            )
        delay, longest = cleaned.get("retry_delay"), cleaned.get("retry_max_delay")
        if delay is not None and longest is not None and longest < delay:
            self.add_error(
                "retry_max_delay",
                f"The longest retry delay must be at least the first delay ({delay} s).",
            )
        return cleaned
