"""Jobs and runs.

Status maths lives here as pure methods (no I/O, `now` passed in); writes and
side effects live in services.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils.text import normalize_newlines

from jobs import scheduling

SECRET_MASK = "••••••"
MAX_RETRIES = 20
# Longest grace, retry delay and delivery timeout: beyond this a setting is
# a typo, and a datetime minus it overflows (e.g. grace = "99999999h").
MAX_DURATION = 30 * 24 * 3600
MAX_BACKOFF = 10


@dataclass(frozen=True)
class Stale:
    due: datetime  # the fire that did not happen (or did not succeed)
    overdue: timedelta  # how long past its grace
    reason: str


class Job(models.Model):
    class Kind(models.TextChoices):
        SHELL = "shell", "Shell command"
        PYTHON = "python", "Python callable"
        SQL = "sql", "SQL script"

    class Overlap(models.TextChoices):
        SKIP = "skip", "Skip: record a skipped run while one is queued or running"
        QUEUE = "queue", "Queue: start when the running one ends (at most one waiting)"
        ALLOW = "allow", "Allow: run side by side"
        REPLACE = "replace", "Replace: cancel the running one, then start"

    class Catchup(models.TextChoices):
        NONE = "none", "None: record missed fires, run nothing"
        LATEST = "latest", "Latest: run the most recent missed fire"
        ALL = "all", "All: one run per missed fire, oldest first"

    name = models.CharField(max_length=200, unique=True)
    slug = models.SlugField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    owner = models.CharField(max_length=200, blank=True, help_text="Person or team.")
    tags = models.CharField(max_length=500, blank=True, help_text="Comma-separated.")

    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.SHELL)
    command = models.TextField(
        blank=True, help_text="Shell jobs: run by /bin/sh -c in its own process group."
    )
    callable = models.CharField(
        max_length=300,
        blank=True,
        help_text='Python jobs: dotted path, e.g. "myteam.jobs.refresh".',
    )
    kwargs = models.JSONField(
        default=dict, blank=True, help_text='Python jobs: keyword arguments, e.g. {"days": 7}.'
    )
    database = models.CharField(
        max_length=200,
        blank=True,
        help_text="SQL jobs: a DATABASES alias, or the name of an environment variable "
        "holding a database URL (e.g. WAREHOUSE_URL).",
    )
    sql = models.TextField(
        blank=True,
        help_text="SQL jobs: statements run in one session; the last one's rows become a CSV.",
    )
    statement_timeout = models.PositiveIntegerField(
        null=True, blank=True, help_text="SQL jobs: seconds per statement (empty: the timeout)."
    )
    deliver_url = models.CharField(
        max_length=500,
        blank=True,
        help_text="Upload the run's files after success: ftp://user@host[:port]/dir "
        "or ftps://… (no password here).",
    )
    deliver_password = models.CharField(
        max_length=300,
        blank=True,
        help_text="Use a reference like ${FTP_PASSWORD}: the value stays in the server's "
        "environment. Never shown.",
    )
    deliver_passive = models.BooleanField(default=True, help_text="Passive mode FTP.")
    deliver_timeout = models.PositiveIntegerField(
        default=30, help_text="Seconds to connect and per transfer operation."
    )
    deliver_retries = models.PositiveSmallIntegerField(
        default=2, help_text="Extra upload attempts after a failure."
    )
    environment = models.JSONField(
        default=dict,
        blank=True,
        help_text='Extra environment, e.g. {"TARGET": "reports", "TOKEN": "${API_TOKEN}"}. '
        "${NAME} is taken from the server's environment when the run starts.",
    )
    secret_keys = models.JSONField(
        default=list,
        blank=True,
        help_text="Environment keys whose values are masked and redacted from logs, "
        'e.g. ["TOKEN"].',
    )

    schedule = models.CharField(
        max_length=200,
        blank=True,
        help_text='Cron expression ("15 2 * * *") or alias ("@daily"). Empty: run only by hand.',
    )
    timezone = models.CharField(max_length=64, default="UTC", help_text="IANA time zone.")
    enabled = models.BooleanField(default=True, help_text="Paused jobs do not fire.")
    timeout = models.PositiveIntegerField(default=3600, help_text="Seconds; SIGTERM, then SIGKILL.")
    overlap = models.CharField(max_length=10, choices=Overlap.choices, default=Overlap.SKIP)
    queue = models.CharField(
        max_length=100, blank=True, help_text="django-q2 cluster name; empty = the default one."
    )
    retries = models.PositiveSmallIntegerField(
        default=0, help_text="Extra attempts after a failure, timeout or lost run."
    )
    retry_delay = models.PositiveIntegerField(
        default=30, help_text="Seconds before the first retry; multiplied by the backoff."
    )
    retry_backoff = models.FloatField(default=2.0, help_text="Delay factor per attempt.")
    retry_max_delay = models.PositiveIntegerField(default=3600, help_text="Longest retry delay.")
    catchup = models.CharField(
        max_length=10,
        choices=Catchup.choices,
        default=Catchup.LATEST,
        help_text="What to do with fires missed while no scheduler was running.",
    )
    upstreams = models.ManyToManyField(
        "self",
        symmetrical=False,
        blank=True,
        related_name="downstreams",
        help_text="Runs only when each of these last succeeded.",
    )
    trigger_on_upstream = models.BooleanField(
        default=False,
        help_text="Also run whenever all upstreams have succeeded since this job's last run.",
    )
    source = models.CharField(
        max_length=500, blank=True, editable=False, help_text="Job file this job was loaded from."
    )

    # Being told.
    grace = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Seconds after a fire before the job counts as stale; "
        "empty = half the interval, between 1 minute and 1 hour.",
    )
    alert_emails = models.JSONField(
        default=list, blank=True, help_text='Who is told when it fails or goes stale: ["a@b.c"].'
    )
    alert_after = models.PositiveSmallIntegerField(
        default=1, help_text="Alert after this many consecutive failures."
    )
    webhook_url = models.URLField(
        blank=True, help_text="Also POST alerts here as JSON (Slack-compatible 'text')."
    )

    # Alert state, flipped by services with conditional UPDATEs (alerts.py).
    class AlertState(models.TextChoices):
        OK = "ok", "OK"
        FAILING = "failing", "Failing"
        STALE = "stale", "Stale"

    alert_state = models.CharField(
        max_length=10, choices=AlertState.choices, default=AlertState.OK, editable=False
    )
    alert_state_since = models.DateTimeField(null=True, blank=True, editable=False)
    consecutive_failures = models.PositiveIntegerField(default=0, editable=False)
    # Kept by services so staleness needs no scan of the run history.
    last_scheduled_for = models.DateTimeField(null=True, blank=True, editable=False)
    last_success_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The outcome of the job's latest run that ran to an end (not active,
    # not skipped), with that run's id: "latest" is by id, as in the run
    # strip, so a run that ends after a newer one has no say. Kept in the
    # UPDATE of the job row that every end of a run makes (services); the
    # overview reads it instead of probing the run history of every job.
    # Pruning or deleting runs leaves it as it was.
    last_end_status = models.CharField(max_length=12, blank=True, editable=False)
    last_end_run_id = models.BigIntegerField(null=True, blank=True, editable=False)

    # The scheduler's state. `fire_basis` is the "schedule|timezone" that
    # next_fire_at was computed from: when it differs from the current
    # definition the scheduler recomputes next_fire_at, so an edit made by
    # any path (admin, loadjobs, shell) takes effect at the next tick.
    next_fire_at = models.DateTimeField(null=True, blank=True, editable=False)
    fire_basis = models.CharField(max_length=300, blank=True, editable=False)
    # Since when the current schedule, time zone and enabled state apply:
    # set when the scheduler recomputes next_fire_at and when the job is
    # resumed. Staleness ignores fires before it (a job paused for days, a
    # schedule edited, owes nothing for the fires of before). Empty: since
    # created_at.
    schedule_since = models.DateTimeField(null=True, blank=True, editable=False)
    # The overlap slot: the run that currently holds this job. Claimed and
    # released with conditional UPDATEs (services.run_claim / run_finish).
    active_run = models.ForeignKey(
        "Run", null=True, blank=True, editable=False, on_delete=models.SET_NULL, related_name="+"
    )

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [("run_job", "Can run jobs and rerun their runs")]
        indexes = [
            # Scheduler: "enabled jobs whose next fire is due" every tick.
            models.Index(
                fields=["next_fire_at"],
                condition=Q(enabled=True),
                name="job_due_idx",
            ),
        ]

    # Kept by the clock and the workers with conditional UPDATEs, never by
    # save(): a save() of a copy read before (the admin's full save, a
    # shell's) would put back the values it read - a next_fire_at that has
    # fired, a slot since freed - unless it names them in update_fields.
    RUNTIME_FIELDS = (
        "alert_state",
        "alert_state_since",
        "consecutive_failures",
        "last_scheduled_for",
        "last_success_at",
        "last_end_status",
        "last_end_run_id",
        "next_fire_at",
        "fire_basis",
        "schedule_since",
        "active_run",
    )

    def __str__(self) -> str:
        return self.name

    def save(self, **kwargs) -> None:
        if not (self._state.adding or kwargs.get("force_insert")) and (
            kwargs.get("update_fields") is None
        ):
            deferred = self.get_deferred_fields()  # as Django does: only what was loaded
            kwargs["update_fields"] = [
                f.name
                for f in self._meta.concrete_fields
                if not f.primary_key
                and f.name not in self.RUNTIME_FIELDS
                and f.attname not in deferred
            ]
        super().save(**kwargs)

    def get_absolute_url(self) -> str:
        return reverse("jobs-job-detail", args=[self.slug])

    def clean(self) -> None:
        """Field checks with messages a user can act on (admin and loadjobs).

        Line ends become \\n first: a browser posts a textarea with \\r\\n,
        and `cd /tmp\\r` is not `cd /tmp` to /bin/sh.
        """
        self.command, self.sql, self.description = (
            normalize_newlines(text or "") for text in (self.command, self.sql, self.description)
        )
        errors: dict[str, str] = {}
        if self.schedule:
            try:
                scheduling.expand(self.schedule)
            except scheduling.ScheduleError as exc:
                errors["schedule"] = str(exc)
        try:
            scheduling.zone(self.timezone)
        except scheduling.ScheduleError as exc:
            errors["timezone"] = str(exc)
        if not self.timeout or self.timeout <= 0:
            errors["timeout"] = "The timeout must be more than 0 seconds."
        elif self.timeout > settings.JOBSITE_MAX_TIMEOUT:
            errors["timeout"] = (
                f"The timeout may be at most {settings.JOBSITE_MAX_TIMEOUT} seconds "
                "(JOBSITE_MAX_TIMEOUT)."
            )
        errors.update(self._environment_errors())
        errors.update(self._kind_errors())
        errors.update(self._alert_errors())
        if self.retries is not None and self.retries > MAX_RETRIES:
            errors["retries"] = (
                f"At most {MAX_RETRIES} retries; a job failing more often than that needs "
                "fixing, not retrying."
            )
        if self.retry_backoff is not None and not 1 <= self.retry_backoff <= MAX_BACKOFF:
            errors["retry_backoff"] = (
                f"The backoff factor must be from 1 to {MAX_BACKOFF} (1 keeps the same delay "
                "for every retry, 2 doubles it)."
            )
        errors.update(self._duration_errors())
        if (
            self.retry_delay is not None
            and self.retry_max_delay is not None
            and self.retry_max_delay < self.retry_delay
        ):
            errors["retry_max_delay"] = (
                f"The longest retry delay must be at least the first delay ({self.retry_delay} s)."
            )
        # Last, so a NUL is the message even where another check also failed.
        errors.update(self._nul_errors())
        if errors:
            raise ValidationError(errors)

    def _environment_errors(self) -> dict[str, str]:
        """A JSON object of strings whose keys can name an environment
        variable (execve takes any but an empty one or one with "="; a run
        would fail to start); secret keys each one of them (a case typo would
        leave the secret unmasked)."""
        errors: dict[str, str] = {}
        environment, secret_keys = self.environment, self.secret_keys
        if not isinstance(environment, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in environment.items()
        ):
            errors["environment"] = 'Use a JSON object of strings, e.g. {"TARGET": "reports"}.'
            environment = None
        else:
            bad = [k for k in environment if not k or "=" in k]
            if bad:
                listed = ", ".join(f"“{k}”" for k in bad)
                errors["environment"] = (
                    f"Not an environment variable name: {listed} (a name cannot be empty "
                    "or hold “=”)."
                )
        if not isinstance(secret_keys, list) or not all(isinstance(k, str) for k in secret_keys):
            errors["secret_keys"] = 'Use a JSON list of key names, e.g. ["TOKEN"].'
        elif environment is not None:
            missing = [k for k in secret_keys if k not in environment]
            if missing:
                listed = ", ".join(f"“{k}”" for k in missing)
                errors["secret_keys"] = (
                    f"Not a key of the environment: {listed} (keys are case-sensitive)."
                )
        return errors

    def _duration_errors(self) -> dict[str, str]:
        """Upper bounds: a setting beyond them is a typo, and would overflow
        the datetime arithmetic of staleness and retries."""
        errors: dict[str, str] = {}
        days = MAX_DURATION // 86400
        for name in ("grace", "retry_delay", "retry_max_delay", "deliver_timeout"):
            value = getattr(self, name)
            if isinstance(value, int) and value > MAX_DURATION:
                errors[name] = f"At most {days} days ({MAX_DURATION} seconds)."
        limit = settings.JOBSITE_MAX_TIMEOUT
        if isinstance(self.statement_timeout, int) and self.statement_timeout > limit:
            errors["statement_timeout"] = (
                f"The statement timeout may be at most {limit} seconds (JOBSITE_MAX_TIMEOUT)."
            )
        return errors

    def _nul_errors(self) -> dict[str, str]:
        """A NUL character anywhere: PostgreSQL cannot store one (SQLite can,
        and the job breaks later)."""
        from jobs.kinds import nul_paths

        errors: dict[str, str] = {}
        for field in self._meta.concrete_fields:
            paths = nul_paths(getattr(self, field.attname), "")
            if paths:
                where = ", ".join(path for path in paths if path)
                errors[field.name] = "A NUL character (\\u0000) cannot be stored: remove it" + (
                    f" from {where}." if where else "."
                )
        return errors

    @property
    def current_fire_basis(self) -> str:
        return f"{self.schedule}|{self.timezone}" if self.schedule else ""

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]

    def describe_schedule(self) -> str:
        if not self.schedule:
            # A downstream job with no clock of its own is not manual: its
            # upstreams' successes start it.
            return "After its upstreams succeed" if self.trigger_on_upstream else "Manual only"
        return scheduling.describe(self.schedule, self.timezone)

    def next_fire_times(self, now: datetime, count: int = 5) -> list[scheduling.Fire]:
        if not self.schedule:
            return []
        return scheduling.next_fires(self.schedule, self.timezone, now, count)

    def masked_environment(self) -> dict[str, str]:
        secret = set(self.secret_keys)
        return {k: (SECRET_MASK if k in secret else v) for k, v in self.environment.items()}

    def _alert_errors(self) -> dict[str, str]:
        from django.core.validators import validate_email

        errors: dict[str, str] = {}
        if not isinstance(self.alert_emails, list):
            errors["alert_emails"] = 'Use a list of addresses, e.g. ["ops@example.com"].'
        else:
            for address in self.alert_emails:
                try:
                    validate_email(address)
                except ValidationError:
                    errors["alert_emails"] = f"Not an email address: “{address}”."
                    break
        if self.alert_after is not None and self.alert_after < 1:
            errors["alert_after"] = "Alert after at least 1 failure."
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            errors["webhook_url"] = "Enter an http:// or https:// URL."
        return errors

    def _kind_errors(self) -> dict[str, str]:
        """What the job's kind needs, with messages naming the field."""
        from jobs import kinds

        return kinds.definition_errors(self)

    def effective_grace(self, now: datetime) -> timedelta:
        """The job's grace, or half its interval clamped to [1 min, 1 h]."""
        if self.grace is not None:
            # Clamped: a row saved before the bound must not break every page.
            return timedelta(seconds=min(self.grace, MAX_DURATION))
        fires = scheduling.previous_fires(self.schedule, self.timezone, now, 2)
        if len(fires) < 2:
            return timedelta(minutes=1)
        half = (fires[0] - fires[1]) / 2
        return min(max(half, timedelta(minutes=1)), timedelta(hours=1))

    def stale_reason(self, now: datetime) -> Stale | None:
        """Why the job is stale at `now`, or None. Pure: reads `now` once.

        Stale means it should have started (its previous fire + grace has
        passed) and no run exists for that fire - which also catches a
        scheduler that is not running - or runs exist but none succeeded
        since the fire before that (e.g. every run skipped, waiting on an
        upstream).
        """
        if not self.enabled or not self.schedule:
            return None
        try:
            grace = self.effective_grace(now)
            fires = scheduling.previous_fires(self.schedule, self.timezone, now - grace, 2)
        except scheduling.ScheduleError:
            return None
        since = self.schedule_since or self.created_at
        if not fires or fires[0] < since:
            return None
        due = fires[0]
        if self.last_scheduled_for is None or self.last_scheduled_for < due:
            return Stale(
                due=due,
                overdue=now - (due + grace),
                reason=f"no run for the fire at {due:%Y-%m-%d %H:%M %Z}",
            )
        if len(fires) > 1 and fires[1] >= since:
            since = self.last_success_at
            if since is None or since < fires[1]:
                last = f"{since:%Y-%m-%d %H:%M %Z}" if since else "never"
                return Stale(
                    due=fires[1],
                    overdue=now - (fires[1] + grace),
                    reason=f"no success since the fire at {fires[1]:%Y-%m-%d %H:%M %Z} "
                    f"(last success: {last})",
                )
        return None


class Run(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        TIMED_OUT = "timed_out", "Timed out"
        CANCELLED = "cancelled", "Cancelled"
        LOST = "lost", "Lost"
        SKIPPED = "skipped", "Skipped"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINISHED = (
        Status.SUCCEEDED,
        Status.FAILED,
        Status.TIMED_OUT,
        Status.CANCELLED,
        Status.LOST,
        Status.SKIPPED,
    )
    FAILURES = (Status.FAILED, Status.TIMED_OUT, Status.LOST)

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule", "Schedule"
        MANUAL = "manual", "Manual"
        RERUN = "rerun", "Rerun"
        CLI = "cli", "Command line"
        RETRY = "retry", "Retry"
        UPSTREAM = "upstream", "Upstream"
        BACKFILL = "backfill", "Backfill"

    # Runs that carry an earlier run's logical time (a rerun of last week's
    # run, a retry after its backoff, a backfill) start "late" on purpose:
    # lateness figures (metrics, rollups, digests) leave them out.
    CARRIED_OVER = (Trigger.RERUN, Trigger.RETRY, Trigger.BACKFILL)

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    trigger = models.CharField(max_length=12, choices=Trigger.choices)
    triggered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    rerun_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reruns"
    )
    attempt = models.PositiveIntegerField(default=1)
    retry_of = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="retries",
        help_text="The first attempt this run retries.",
    )

    # The logical time the run belongs to; reruns keep the original's.
    scheduled_for = models.DateTimeField()
    queued_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Dispatch: a queued run is handed to django-q2 once not_before has
    # passed and (unless overlap=allow) its job's slot is free.
    not_before = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    enqueue_count = models.PositiveIntegerField(default=0)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancelled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    exit_code = models.IntegerField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="host:pid")
    pid = models.IntegerField(null=True, blank=True, help_text="The child's process group.")
    error_summary = models.TextField(blank=True)
    # What the child was given: command and environment (secret values masked).
    command = models.TextField(blank=True)
    environment = models.JSONField(default=dict, blank=True)

    log_bytes = models.BigIntegerField(default=0, help_text="Bytes of output produced.")
    log_dropped_bytes = models.BigIntegerField(default=0, help_text="Bytes dropped by the cap.")

    # What the job reported (jobs.context.report_progress, or JSON lines on
    # $JOBSITE_PROGRESS_FD), and for SQL jobs the rows written to the CSV.
    progress_done = models.BigIntegerField(null=True, blank=True)
    progress_total = models.BigIntegerField(null=True, blank=True)
    progress_message = models.CharField(max_length=300, blank=True)
    rows = models.BigIntegerField(null=True, blank=True, help_text="SQL jobs: rows exported.")

    class Meta:
        ordering = ["-id"]
        constraints = [
            # A clock fire produces at most one run per (job, scheduled_for):
            # two schedulers claiming the same fire cannot both insert.
            models.UniqueConstraint(
                fields=["job", "scheduled_for", "attempt"],
                condition=Q(trigger="schedule"),
                name="one_run_per_scheduled_fire",
            ),
            # One retry per attempt number of a failed run, whoever finished it.
            models.UniqueConstraint(
                fields=["retry_of", "attempt"],
                condition=Q(trigger="retry"),
                name="one_retry_per_attempt",
            ),
        ]
        indexes = [
            # Job page history and "last run" per job: WHERE job_id=? ORDER BY id DESC.
            models.Index(fields=["job", "-id"], name="run_job_recent_idx"),
            # Active runs (overview counts, overlap checks): WHERE status IN (queued, running).
            models.Index(
                fields=["job", "status"],
                condition=Q(status__in=["queued", "running"]),
                name="run_active_idx",
            ),
            # Job page history filtered by status: WHERE job_id=? AND status=? ORDER BY id DESC.
            models.Index(fields=["job", "status", "-id"], name="run_job_status_recent_idx"),
            # /failures/: WHERE status IN (failed, timed_out, lost) ORDER BY id DESC.
            models.Index(
                fields=["-id"],
                condition=Q(status__in=["failed", "timed_out", "lost"]),
                name="run_failure_recent_idx",
            ),
            # /failures/?job=: the same for one job.
            models.Index(
                fields=["job", "-id"],
                condition=Q(status__in=["failed", "timed_out", "lost"]),
                name="run_job_failure_recent_idx",
            ),
            # A job's run that finished last (dashboard, the job page).
            models.Index(fields=["job", "-finished_at"], name="run_job_finished_idx"),
            # Upstream gating: an upstream's newest run for the latest logical
            # time up to a downstream's: WHERE job_id=? AND scheduled_for <= ?
            # ORDER BY scheduled_for DESC, id DESC.
            models.Index(fields=["job", "-scheduled_for", "-id"], name="run_job_logical_idx"),
            # Sweeper: "running runs whose heartbeat is older than the lease".
            models.Index(
                fields=["heartbeat_at"],
                condition=Q(status="running"),
                name="run_lease_idx",
            ),
            # Dispatcher and requeue: "queued runs by enqueue time".
            models.Index(
                fields=["enqueued_at"],
                condition=Q(status="queued"),
                name="run_queued_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.job.name} #{self.pk}"

    def get_absolute_url(self) -> str:
        return reverse("jobs-run-detail", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def is_failure(self) -> bool:
        return self.status in self.FAILURES

    def duration(self, now: datetime | None = None) -> timedelta | None:
        if not self.started_at:
            return None
        end = self.finished_at or now
        return end - self.started_at if end else None

    @property
    def lateness(self) -> timedelta | None:
        if not self.started_at:
            return None
        return self.started_at - self.scheduled_for


class MissedFires(models.Model):
    """Fires that did not run because no scheduler was running, one row per gap."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="missed_fires")
    first = models.DateTimeField()
    last = models.DateTimeField()
    count = models.PositiveIntegerField()
    policy = models.CharField(max_length=10, choices=Job.Catchup.choices)
    recorded_at = models.DateTimeField()
    # When someone had these fires run after all (a backfill): once.
    backfilled_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-recorded_at"]
        verbose_name_plural = "missed fires"

    def __str__(self) -> str:
        return f"{self.job.name}: {self.count} missed from {self.first:%Y-%m-%d %H:%M}"


class AlertFlip(models.Model):
    """A change of a job's alert state: recorded once, notified once."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="flips")
    old_state = models.CharField(max_length=10, choices=Job.AlertState.choices)
    new_state = models.CharField(max_length=10, choices=Job.AlertState.choices)
    at = models.DateTimeField()
    run = models.ForeignKey(Run, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    reason = models.TextField(blank=True)
    # Claimed (NULL -> now) by whoever sends its notifications: at most once.
    notified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [
            # Job page: a job's recent flips; sweeper: flips not yet notified.
            models.Index(fields=["job", "-at"], name="flip_job_recent_idx"),
            models.Index(fields=["at"], condition=Q(notified_at=None), name="flip_unsent_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.job.name}: {self.old_state} → {self.new_state}"


class Notification(models.Model):
    """Every notification sent (or tried): when, to whom, what came of it."""

    class Kind(models.TextChoices):
        ALERT = "alert", "Alert"
        RECOVERY = "recovery", "Recovery"
        DIGEST = "digest", "Digest"

    class Channel(models.TextChoices):
        EMAIL = "email", "Email"
        WEBHOOK = "webhook", "Webhook"

    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.CASCADE, related_name="notifications"
    )
    flip = models.ForeignKey(
        AlertFlip, null=True, blank=True, on_delete=models.SET_NULL, related_name="notifications"
    )
    kind = models.CharField(max_length=10, choices=Kind.choices)
    channel = models.CharField(max_length=10, choices=Channel.choices)
    target = models.CharField(max_length=500, help_text="Email address or webhook URL.")
    subject = models.CharField(max_length=300, blank=True)
    sent_at = models.DateTimeField()
    ok = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    # A failed send is tried again later (notify.retry_failed): `tries` counts
    # the tries so far; `retried_at` claims a failed row for its next try.
    tries = models.PositiveSmallIntegerField(default=1)
    retried_at = models.DateTimeField(null=True, blank=True)
    digest = models.ForeignKey(
        "DigestSent", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-sent_at", "-id"]
        indexes = [
            models.Index(fields=["job", "-sent_at"], name="notification_job_recent_idx"),
            models.Index(
                fields=["sent_at"],
                condition=models.Q(ok=False, retried_at__isnull=True),
                name="notification_to_retry_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} via {self.channel} to {self.shown_target}"

    @property
    def shown_target(self) -> str:
        """The target as pages show it: a webhook URL without its path and
        query, which often hold the token (Slack, Teams)."""
        if self.channel != self.Channel.WEBHOOK:
            return self.target
        return shown_url(self.target)


def shown_url(url: str) -> str:
    """scheme://host[:port]/… of a URL whose path or query may be a credential."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return "…"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{parts.hostname}{port}{rest}"


class DigestSent(models.Model):
    """One row per (recipient, period): a digest is sent at most once."""

    recipient = models.CharField(max_length=300)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    sent_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["recipient", "period_start", "period_end"], name="one_digest_per_period"
            )
        ]

    def __str__(self) -> str:
        return f"digest to {self.recipient} for {self.period_start:%Y-%m-%d %H:%M}"


class JobDailyStats(models.Model):
    """Per job and day (in TIME_ZONE): counts and timings of finished runs,
    kept up to date as runs finish, so rates and charts never scan history."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="daily_stats")
    day = models.DateField()
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    timed_out = models.PositiveIntegerField(default=0)
    lost = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    executed = models.PositiveIntegerField(default=0, help_text="Runs that started.")
    duration_total = models.FloatField(default=0.0, help_text="Seconds, over executed runs.")
    duration_max = models.FloatField(default=0.0)
    lateness_total = models.FloatField(default=0.0, help_text="Seconds, over executed runs.")
    lateness_max = models.FloatField(default=0.0)

    class Meta:
        ordering = ["job", "day"]
        verbose_name_plural = "job daily stats"
        constraints = [
            # Also the index for "a job's last N days".
            models.UniqueConstraint(fields=["job", "day"], name="one_stats_row_per_job_day")
        ]

    def __str__(self) -> str:
        return f"{self.job_id} {self.day}"

    @property
    def failures(self) -> int:
        return self.failed + self.timed_out + self.lost

    @property
    def finished(self) -> int:
        """Runs that count for the success rate: succeeded or failed."""
        return self.succeeded + self.failures


def _artifact_path(artifact: Artifact, filename: str) -> str:
    return f"artifacts/{artifact.run.job.slug}/{artifact.run_id}/{filename}"


class Artifact(models.Model):
    """A file a run produced (the SQL CSV, files written to
    $JOBSITE_ARTIFACTS_DIR), stored in the default storage."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="artifacts")
    name = models.CharField(max_length=300)
    file = models.FileField(upload_to=_artifact_path, max_length=500)
    size = models.BigIntegerField()
    created_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "name"]
        constraints = [
            models.UniqueConstraint(fields=["run", "name"], name="one_artifact_name_per_run")
        ]

    def __str__(self) -> str:
        return f"{self.name} (run {self.run_id})"

    def get_absolute_url(self) -> str:
        return reverse("jobs-artifact-download", args=[self.run_id, self.pk])


class RunLogChunk(models.Model):
    """A piece of a run's captured output.

    Head chunks are the first JOBSITE_LOG_HEAD_BYTES of output and are never
    dropped; later chunks form the tail, from which the oldest are deleted
    while the tail is over JOBSITE_LOG_TAIL_BYTES (the run counts what was
    dropped). So the stored log is bounded, and still live while running.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="log_chunks")
    seq = models.PositiveIntegerField()
    is_head = models.BooleanField(default=False)
    data = models.TextField()
    size = models.PositiveIntegerField(help_text="Bytes of output this chunk holds.")

    class Meta:
        ordering = ["run", "seq"]
        constraints = [
            # Reading a log in order, and the live tail's "chunks after seq N".
            models.UniqueConstraint(fields=["run", "seq"], name="run_log_chunk_seq"),
        ]

    def __str__(self) -> str:
        return f"run {self.run_id} chunk {self.seq}"
