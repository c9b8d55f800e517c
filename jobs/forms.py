"""Forms: the admin's job form with the kind, delivery, reliability, dependency
and alert checks."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.utils.text import normalize_newlines

from jobs import services
from jobs.jobfile import KIND_KEYS, json_problems, validate_email, validate_webhook_url
from jobs.models import SECRET_MASK, Job

_ADDRESS_SEPARATORS = re.compile(r"[\s,;]+")
_KIND_NAMES = {Job.Kind.SHELL: "shell", Job.Kind.PYTHON: "Python", Job.Kind.SQL: "SQL"}


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


class MultilineTextField(forms.CharField):
    """A textarea's text with \\n line ends: browsers post \\r\\n, and
    `cd /tmp\\r` is not `cd /tmp` to /bin/sh. (Job.clean does the same for
    every other path; here it also keeps an unchanged text unchanged.)"""

    def to_python(self, value: Any) -> str:
        return normalize_newlines(super().to_python(value))


class EnvironmentField(forms.JSONField):
    """The environment as JSON, secret values write-only like the delivery
    password: shown as SECRET_MASK (also when the form comes back with an
    error), and a secret still holding the mask keeps its stored value; a
    value typed over the mask replaces it. The form sets `stored` (the
    job's secret values) and `secret_keys` (which keys to mask)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stored: dict[str, str] = {}
        self.secret_keys: set[str] = set()

    # A new secret typed into a form that came back with an error: not shown
    # again, and not mistaken for the mask (which keeps the stored value).
    RETYPE = f"{SECRET_MASK} (type it again)"

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            value = {k: self._shown(k, v) for k, v in value.items()}
        return super().prepare_value(value)

    def _shown(self, key: str, value: Any) -> Any:
        if key not in self.secret_keys or value in (SECRET_MASK, self.RETYPE):
            return value
        return SECRET_MASK if value == self.stored.get(key) else self.RETYPE

    def to_python(self, value: Any) -> Any:
        value = super().to_python(value)
        if isinstance(value, dict):
            value = {k: self.stored.get(k, v) if v == SECRET_MASK else v for k, v in value.items()}
        return value

    def validate(self, value: Any) -> None:
        super().validate(value)
        if not isinstance(value, dict):
            return  # Job.clean says what the environment should be
        retype = sorted(k for k, v in value.items() if v == self.RETYPE)
        if retype:
            raise ValidationError(
                f"Type the new value of {', '.join(retype)} again: a secret is not shown "
                "back when the form has an error."
            )
        masked = sorted(k for k, v in value.items() if v == SECRET_MASK)
        if masked:
            raise ValidationError(
                f"Type the value of {', '.join(masked)}: {SECRET_MASK} stands for a stored "
                "secret, and there is none to keep."
            )


class JobAdminForm(forms.ModelForm):
    """Job.clean() checks schedule, zone, timeout, environment, retries and
    what the job's kind needs; this adds what needs the form's data (the
    dependency graph, fields of another kind), the alert settings, checked
    like a job file's, and the write-only delivery password."""

    # Write-only: never rendered with its value, and empty keeps the stored one.
    deliver_password = forms.CharField(
        required=False,
        strip=False,
        max_length=Job._meta.get_field("deliver_password").max_length,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        label="Delivery password",
        help_text="Best a reference like ${FTP_PASSWORD}, so the password stays in the "
        "server's environment. Leave empty to keep the current one.",
    )
    forget_deliver_password = forms.BooleanField(
        required=False,
        label="Forget the delivery password",
        help_text="Remove the stored password (or reference).",
    )

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
            *["kind", "command", "callable", "kwargs", "database", "sql", "statement_timeout"],
            *["environment", "secret_keys"],
            *["deliver_url", "deliver_password", "deliver_passive"],
            *["deliver_timeout", "deliver_retries"],
            *["schedule", "timezone", "enabled", "timeout", "queue"],
            *["overlap", "retries", "retry_delay", "retry_backoff", "retry_max_delay", "catchup"],
            *["upstreams", "trigger_on_upstream"],
            *["alert_emails", "alert_after", "webhook_url", "grace"],
        ]
        help_texts = {
            "kind": "Shell: fill in the command. Python: the callable (and kwargs). "
            "SQL: the database and the SQL (and a statement timeout). "
            "The fields of the other kinds stay empty.",
        }
        field_classes = {
            "description": MultilineTextField,
            "command": MultilineTextField,
            "sql": MultilineTextField,
            "environment": EnvironmentField,
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The stored password is not the field's initial value: it never
        # reaches the page, and leaving the field empty is "no change".
        self.initial.pop("deliver_password", None)
        if "environment" in self.fields:
            job = self.instance
            secret = set(job.secret_keys) if isinstance(job.secret_keys, list) else set()
            environment = job.environment if isinstance(job.environment, dict) else {}
            self.fields["environment"].stored = {
                k: v for k, v in environment.items() if k in secret
            }
            self.fields["environment"].secret_keys = secret

    def clean_kwargs(self) -> Any:
        kwargs = self.cleaned_data["kwargs"]
        # json.loads takes NaN, Infinity and 1e999, which JSON (and PostgreSQL) do not.
        problems = json_problems(kwargs, "")
        if problems:
            raise forms.ValidationError("; ".join(problems) + ".")
        return {} if kwargs is None else kwargs

    def clean_statement_timeout(self) -> int | None:
        timeout = self.cleaned_data["statement_timeout"]
        if timeout is not None and timeout <= 0:
            raise forms.ValidationError(
                "Give more than 0 seconds, or leave it empty to use the job's timeout."
            )
        return timeout

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
        self._check_other_kinds_fields(cleaned)
        self._keep_or_forget_password(cleaned)
        secret_keys = cleaned.get("secret_keys")
        if "environment" in self.fields and isinstance(secret_keys, list):
            # Shown again with an error: a key just marked secret is masked too.
            self.fields["environment"].secret_keys |= {str(k) for k in secret_keys}
        return cleaned

    def _check_other_kinds_fields(self, cleaned: dict[str, Any]) -> None:
        """A value in a field of another kind would be silently ignored: say so."""
        kind = cleaned.get("kind")
        if kind not in KIND_KEYS:
            return
        for other, fields in KIND_KEYS.items():
            for name in fields:
                value = cleaned.get(name)
                if other == kind or name not in self.fields or name in self.errors:
                    continue
                if value not in (None, "", {}, []) and str(value).strip():
                    self.add_error(
                        name,
                        f"Only {_KIND_NAMES[other]} jobs use this: clear it, or choose "
                        f"the kind “{Job.Kind(other).label}”.",
                    )

    def _keep_or_forget_password(self, cleaned: dict[str, Any]) -> None:
        if "deliver_password" not in self.fields:
            return
        typed = cleaned.get("deliver_password") or ""
        if cleaned.get("forget_deliver_password"):
            if typed:
                self.add_error(
                    "forget_deliver_password",
                    "Either type a new password or forget the stored one, not both.",
                )
            cleaned["deliver_password"] = ""
        elif not typed:
            cleaned["deliver_password"] = self.instance.deliver_password
