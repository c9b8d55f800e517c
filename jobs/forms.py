"""Forms: the admin's job form with the reliability, dependency and alert checks."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from jobs import services
from jobs.jobfile import validate_email, validate_webhook_url
from jobs.models import Job

_ADDRESS_SEPARATORS = re.compile(r"[\s,;]+")


class EmailListField(forms.Field):
    """Email addresses typed one per line (commas also work), stored as a list.

    Each address is checked with the same validator as job files use; the
    error names every address that is not one.
    """

    widget = forms.Textarea(attrs={"rows": 3, "cols": 60})

    def prepare_value(self, value: Any) -> str:
        if isinstance(value, list | tuple):
            return "\n".join(str(address) for address in value)
        return "" if value is None else str(value)

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, list | tuple):
            return [str(address).strip() for address in value if str(address).strip()]
        addresses: list[str] = []
        for address in _ADDRESS_SEPARATORS.split(value or ""):
            if address and address.lower() not in {a.lower() for a in addresses}:
                addresses.append(address)
        return addresses

    def validate(self, value: list[str]) -> None:
        super().validate(value)
        bad = []
        for address in value:
            try:
                validate_email(address)
            except ValidationError:
                bad.append(address)
        if bad:
            listed = ", ".join(f"“{address}”" for address in bad)
            raise ValidationError(
                f"Not an email address: {listed}.", code="invalid", params={"value": bad}
            )


class WebhookURLField(forms.URLField):
    # Only http(s), since alerts are POSTed as JSON; the field's "invalid"
    # message replaces any validator's, so it says so too.
    default_validators = [validate_webhook_url]
    default_error_messages = {"invalid": validate_webhook_url.message}


class JobAdminForm(forms.ModelForm):
    """Job.clean() checks schedule, zone, timeout, environment and retries;
    this adds what needs the form's data (the dependency graph) and the alert
    settings, checked like a job file's."""

    alert_emails = EmailListField(
        required=False,
        help_text="Who is told when it fails or goes stale: one address per line.",
    )
    webhook_url = WebhookURLField(
        required=False,
        max_length=Job._meta.get_field("webhook_url").max_length,
        assume_scheme="https",
        label="Webhook URL",
        help_text="Also POST alerts here as JSON (Slack-compatible “text”).",
    )

    class Meta:
        model = Job
        # The admin narrows this to its fieldsets (read-only views show fewer).
        fields = [
            *["name", "slug", "description", "owner", "tags"],
            *["kind", "command", "environment", "secret_keys"],
            *["schedule", "timezone", "enabled", "timeout", "queue"],
            *["overlap", "retries", "retry_delay", "retry_backoff", "retry_max_delay", "catchup"],
            *["upstreams", "trigger_on_upstream"],
            *["alert_emails", "alert_after", "webhook_url", "grace"],
        ]

    def clean_alert_after(self) -> int:
        alert_after = self.cleaned_data["alert_after"]
        if alert_after is not None and alert_after < 1:
            raise forms.ValidationError(
                "Alert after at least 1 failure (1 alerts on the first failure)."
            )
        return alert_after

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
