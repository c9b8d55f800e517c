"""Forms: the admin's job form with the reliability and dependency checks."""

from __future__ import annotations

from typing import Any

from django import forms
from django.db.models import QuerySet

from jobs import services
from jobs.models import Job


class JobAdminForm(forms.ModelForm):
    """Job.clean() checks schedule, zone, timeout, environment and retries;
    this adds what needs the form's data: the dependency graph."""

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
        return cleaned
