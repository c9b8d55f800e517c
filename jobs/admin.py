"""Django admin for jobs and runs.

Thin: every state change goes through jobs.services, is a POST with CSRF
(bulk actions, or the per-object buttons in change_form_object_tools.html
aimed at the views added in get_urls), and needs the custom `jobs.run_job`
permission. Editing a job's definition needs `jobs.change_job`: a run-only
user can view, run, pause, resume and rerun, but a POST to the change form
is refused by Django's own permission check.

Runs, missed fires, alert flips, notifications and daily stats are
read-only history: services write them, the admin only shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import get_fields_from_path, unquote
from django.contrib.admin.views.main import SEARCH_VAR, ChangeList, ChangeListSearchForm
from django.contrib.admin.widgets import AutocompleteSelectMultiple
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import URLPattern, path, reverse
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext
from django.views.decorators.http import require_POST

from jobs import runlog, scheduling, services
from jobs.forms import JobAdminForm
from jobs.jobfile import is_reference, password_variable
from jobs.models import AlertFlip, Job, JobDailyStats, MissedFires, Notification, Run
from jobs.templatetags.jobs_tags import counted

RUN_PERMISSION = "jobs.run_job"


def _latest_run() -> QuerySet[Run]:
    # One row per job through run_job_recent_idx (WHERE job_id=? ORDER BY id DESC).
    return Run.objects.filter(job=OuterRef("pk")).order_by("-id")


def _format_duration(value: timedelta | None) -> str | None:
    if value is None:
        return None
    seconds = value.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _local(value: datetime) -> str:
    """A datetime as the admin shows it: in the current time zone, localized."""
    return formats.localize(timezone.template_localtime(value))


def _pre(text: str) -> str:
    """Escaped (unless already safe), in a <pre> that wraps long lines."""
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)


# Failing and stale must stand out in a long list; OK stays quiet.
_ALERT_STATE_STYLE = {
    Job.AlertState.FAILING: "color: #fff; background: #ba2121",
    Job.AlertState.STALE: "color: #000; background: #f0b400",
}


def _alert_state_badge(state: str) -> str:
    label = Job.AlertState(state).label
    style = _ALERT_STATE_STYLE.get(state)
    if style is None:
        return label
    return format_html(
        '<strong style="{}; padding: 1px 6px; border-radius: 3px">{}</strong>', style, label
    )


def _environment_block(environment: dict[str, str]) -> str:
    """KEY=value lines, escaped; callers pass an already masked mapping."""
    if not environment:
        return "(none)"
    return _pre(format_html_join("\n", "{}={}", sorted(environment.items())))


class LastStatusFilter(admin.SimpleListFilter):
    """Filters on the `last_status` annotation made in JobAdmin.get_queryset."""

    title = "last run status"
    parameter_name = "last_status"
    NEVER = "never"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [*Run.Status.choices, (self.NEVER, "Never run")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        value = self.value()
        if value == self.NEVER:
            return queryset.filter(last_status__isnull=True)
        if value in Run.Status.values:
            return queryset.filter(last_status=value)
        return queryset


class RunJobFilter(admin.SimpleListFilter):
    """Runs of one job, offering the jobs that need attention (failing or
    stale, at most 20) and the one chosen: a list of every job rendered a
    link each (1,000 on a busy site) cost the Run list ~100 ms per view.
    Any job's runs are one search (its name) or one click on its page away."""

    title = "job (failing or stale)"
    parameter_name = "job"
    SHOWN = 20

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        attention = Job.objects.exclude(alert_state=Job.AlertState.OK).order_by("name")
        jobs = list(attention.values_list("pk", "name")[: self.SHOWN])
        chosen = self.job_id()
        if chosen is not None and all(pk != chosen for pk, _ in jobs):
            jobs += list(Job.objects.filter(pk=chosen).values_list("pk", "name"))
        return [(str(pk), name) for pk, name in jobs]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Run]) -> QuerySet[Run]:
        chosen = self.job_id()
        if chosen is not None:
            return queryset.filter(job_id=chosen)
        return queryset

    def job_id(self) -> int | None:
        """The chosen job's id; None for anything else ("²".isdigit() is
        true, but int() refuses it)."""
        value = self.value()
        if value and value.isascii() and value.isdigit():
            return int(value)
        return None


class CappedSearchForm(ChangeListSearchForm):
    """The search box, at most MAX_LENGTH characters: each word of a search
    is a LIKE per search field, and SQLite refuses a pattern over 50,000
    bytes ("LIKE or GLOB pattern too complex"). A longer search is shown as
    the field's error and the list unsearched, as for a NUL character."""

    MAX_LENGTH = 200

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields[SEARCH_VAR] = forms.CharField(
            required=False, strip=False, max_length=self.MAX_LENGTH
        )


class CappedSearchChangeList(ChangeList):
    search_form_class = CappedSearchForm


class _NumericAutocomplete(AutocompleteSelectMultiple):
    """Django's autocomplete looks up the posted ids to show them again, and
    a form posted with a non-number there (upstreams=abc) was a server error
    instead of the field's "not a valid value"."""

    def optgroups(self, name: str, value: list, attr: dict | None = None) -> list:
        numbers = [v for v in value if str(v).isascii() and str(v).isdigit()]
        return super().optgroups(name, numbers, attr)


class FilterLookupsOnlyMixin:
    """A change list filtered only by its list_filter and date_hierarchy.

    Django allows a lookup on any of the model's own fields in the query
    string, so someone who may only view jobs could read a secret one
    character at a time (?deliver_password__startswith=h: one row or none),
    and a lookup the database refuses (?tags__regex=( ) was a server error.
    Any other parameter is refused as Django refuses a disallowed lookup
    (400), and so is a NUL character, which PostgreSQL cannot compare.
    """

    model: type
    date_hierarchy: str | None

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup in self.filter_parameters(request) and "\x00" not in value

    def filter_parameters(self, request: HttpRequest | None) -> set[str]:
        """The query string keys the filters in the sidebar (and the date
        hierarchy) use, as Django's list filter classes name them."""
        parameters = set()
        for item in self.get_list_filter(request):
            if isinstance(item, type) and issubclass(item, admin.SimpleListFilter):
                parameters.add(item.parameter_name)
                continue
            path = item[0] if isinstance(item, list | tuple) else item
            parameters |= {path, f"{path}__exact", f"{path}__isnull"}
            field = get_fields_from_path(self.model, path)[-1]
            if field.is_relation:
                parameters.add(f"{path}__{field.target_field.name}__exact")
        if self.date_hierarchy:
            parameters |= {f"{self.date_hierarchy}__{part}" for part in ("year", "month", "day")}
        return parameters

    def get_changelist(self, request: HttpRequest, **kwargs) -> type[ChangeList]:
        return CappedSearchChangeList


class RunPermissionMixin:
    """The custom permission behind Run now, Pause, Resume, Rerun and Cancel."""

    admin_site: admin.AdminSite

    def has_run_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(RUN_PERMISSION)

    def _object_view(self, view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        """Staff login and CSRF (admin_view), POST only, and the run permission."""

        @require_POST
        def guarded(request: HttpRequest, object_id: str) -> HttpResponse:
            if not self.has_run_permission(request):
                raise PermissionDenied
            return view(request, object_id)

        return self.admin_site.admin_view(guarded)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> HttpResponse:
        extra_context = {
            **(extra_context or {}),
            "has_run_permission": self.has_run_permission(request),
        }
        return super().change_view(request, object_id, form_url, extra_context)


class QuickCheckboxMixin:
    """The change list's action checkbox as Django renders it, built as a
    string: Django renders a form widget template for every row, which was
    a fifth of a 50-row list's time."""

    def action_checkbox(self, obj) -> str:
        return format_html(
            '<input type="checkbox" name="{}" value="{}" class="action-select" aria-label="{}">',
            helpers.ACTION_CHECKBOX_NAME,
            obj.pk,
            gettext("Select this object for an action - {}").format(obj),
        )


class DeletesArtifactFilesMixin:
    """Deleting jobs or runs goes through services.jobs_delete / runs_delete,
    which delete their runs' stored files too once the deletion commits; the
    cascade alone would leave them on disk."""

    def delete_model(self, request: HttpRequest, obj: Job | Run) -> None:
        self.delete_queryset(request, type(obj).objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        if queryset.model is Job:
            services.jobs_delete(jobs=queryset)
        else:
            services.runs_delete(runs=queryset)


@admin.register(Job)
class JobAdmin(
    DeletesArtifactFilesMixin,
    FilterLookupsOnlyMixin,
    QuickCheckboxMixin,
    RunPermissionMixin,
    admin.ModelAdmin,
):
    list_display = [
        "name",
        "kind",
        "enabled",
        "alert_state_badge",
        "schedule_in_words",
        "last_status",
        "last_run_at",
        "next_run",
        "owner",
    ]
    list_filter = [
        "alert_state",
        "enabled",
        LastStatusFilter,
        "kind",
        "overlap",
        "catchup",
        "timezone",
    ]
    search_fields = ["name", "slug", "description", "owner", "tags", "command", "callable"]
    list_per_page = 50  # as the overview; 100 rows took ~130 ms to render
    prepopulated_fields = {"slug": ("name",)}
    form = JobAdminForm
    # A search box rather than a <select> of every job (there may be thousands).
    autocomplete_fields = ["upstreams"]
    readonly_fields = [
        "source_note",
        "deliver_password_status",
        "schedule_words",
        "next_fire_at",
        "environment_masked",
        "missed_fires_note",
        "downstream_jobs",
        "alert_state_note",
        "consecutive_failures",
        "last_success_at",
        "grace_in_effect",
        "alert_history",
    ]
    fieldsets = [
        (None, {"fields": ["name", "slug", "description", "owner", "tags", "source_note"]}),
        (
            "What to run",
            {
                "fields": [
                    "kind",
                    "command",
                    "callable",
                    "kwargs",
                    "database",
                    "sql",
                    "statement_timeout",
                    "environment",
                    "secret_keys",
                ],
                "description": "Fill in the fields of the job's kind; the others stay empty.",
            },
        ),
        (
            "Delivery",
            {
                "fields": [
                    "deliver_url",
                    "deliver_password_status",
                    "deliver_password",
                    "forget_deliver_password",
                    "deliver_passive",
                    "deliver_timeout",
                    "deliver_retries",
                ],
                "description": "Optional: upload the run's files (e.g. the SQL job's CSV) "
                "by FTP after it succeeds.",
            },
        ),
        (
            "When",
            {
                "fields": [
                    "schedule",
                    "schedule_words",
                    "timezone",
                    "enabled",
                    "next_fire_at",
                    "timeout",
                    "queue",
                ]
            },
        ),
        (
            "Reliability",
            {
                "fields": [
                    "overlap",
                    "retries",
                    "retry_delay",
                    "retry_backoff",
                    "retry_max_delay",
                    "catchup",
                    "missed_fires_note",
                ]
            },
        ),
        ("Dependencies", {"fields": ["upstreams", "trigger_on_upstream", "downstream_jobs"]}),
        (
            "Alerts",
            {
                "fields": [
                    "alert_state_note",
                    "consecutive_failures",
                    "last_success_at",
                    "alert_emails",
                    "alert_after",
                    "webhook_url",
                    "grace",
                    "grace_in_effect",
                    "alert_history",
                ]
            },
        ),
    ]
    actions = ["run_now", "pause", "resume"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        latest = _latest_run()
        return (
            super()
            .get_queryset(request)
            .annotate(
                last_run_id=Subquery(latest.values("id")[:1]),
                last_status=Subquery(latest.values("status")[:1]),
                last_run_at=Subquery(
                    latest.annotate(at=Coalesce("started_at", "queued_at")).values("at")[:1]
                ),
            )
        )

    def formfield_for_manytomany(self, db_field, request: HttpRequest, **kwargs):
        if db_field.name in self.get_autocomplete_fields(request):
            kwargs.setdefault(
                "widget", _NumericAutocomplete(db_field, self.admin_site, using=kwargs.get("using"))
            )
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: Job | None = None) -> list:
        """Without the change permission every field is shown read-only; show
        the environment with secret values masked instead of the raw JSON, and
        only whether a delivery password is set. A new job has no stored
        password to show or forget."""
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            hidden = {"deliver_password_status", "forget_deliver_password"}
            replaced = {}
        elif self.has_change_permission(request, obj):
            return fieldsets
        else:
            hidden = {"deliver_password", "forget_deliver_password"}
            replaced = {"environment": "environment_masked"}
        return [
            (
                title,
                {
                    **options,
                    "fields": [replaced.get(f, f) for f in options["fields"] if f not in hidden],
                },
            )
            for title, options in fieldsets
        ]

    def save_model(self, request: HttpRequest, obj: Job, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        typed = form.cleaned_data.get("deliver_password")
        if "deliver_password" in form.changed_data and typed and not is_reference(typed):
            name = password_variable(obj.slug)
            self.message_user(
                request,
                "The delivery password is stored in the database as typed. A reference "
                f"like ${{{name}}} keeps it in the server's environment instead.",
                messages.WARNING,
            )

    # --- Displays -------------------------------------------------------------

    @admin.display(description="Schedule")
    def schedule_in_words(self, obj: Job) -> str:
        return obj.describe_schedule()

    @admin.display(description="In words")
    def schedule_words(self, obj: Job) -> str:
        return obj.describe_schedule()

    @admin.display(description="Last status", ordering="last_status")
    def last_status(self, obj: Job) -> str | None:
        status = getattr(obj, "last_status", None)
        if status is None:
            return None
        url = reverse("admin:jobs_run_change", args=[obj.last_run_id])
        return format_html('<a href="{}">{}</a>', url, Run.Status(status).label)

    @admin.display(description="Last run", ordering="last_run_at")
    def last_run_at(self, obj: Job):
        return getattr(obj, "last_run_at", None)

    @admin.display(description="Next run", ordering="next_fire_at")
    def next_run(self, obj: Job):
        if not obj.enabled:
            return "Paused"
        if not obj.schedule:
            return obj.describe_schedule()
        return obj.next_fire_at

    @admin.display(description="Source")
    def source_note(self, obj: Job) -> str:
        if obj.source:
            return (
                f"Loaded from {obj.source}. The next loadjobs of that file overwrites "
                "edits made here."
            )
        return "Defined here (not loaded from a job file)."

    @admin.display(description="Environment")
    def environment_masked(self, obj: Job) -> str:
        return _environment_block(obj.masked_environment())

    @admin.display(description="Delivery password")
    def deliver_password_status(self, obj: Job) -> str:
        """Whether a password is set, and from which variable; never its value."""
        password = obj.deliver_password
        if not password:
            return "not set"
        if is_reference(password):
            return f"set from {password}"
        return "set"

    @admin.display(description="Alert state", ordering="alert_state")
    def alert_state_badge(self, obj: Job) -> str:
        return _alert_state_badge(obj.alert_state)

    @admin.display(description="Alert state")
    def alert_state_note(self, obj: Job) -> str:
        if obj.pk is None:
            return "OK (new job)."
        if obj.alert_state_since is None:
            return _alert_state_badge(obj.alert_state)
        return format_html(
            "{} since {}", _alert_state_badge(obj.alert_state), _local(obj.alert_state_since)
        )

    @admin.display(description="Grace in effect")
    def grace_in_effect(self, obj: Job) -> str:
        """What staleness uses: the set grace, or the one derived from the schedule."""
        if not obj.schedule:
            return "None: a job without a schedule never goes stale."
        try:
            grace = obj.effective_grace(timezone.now())
        except scheduling.ScheduleError:  # a refused edit: its error is on the field
            return "-"
        how = "set above" if obj.grace is not None else "derived: half the interval"
        return f"{_format_duration(grace)} ({how})"

    @admin.display(description="Alert history")
    def alert_history(self, obj: Job) -> str:
        if obj.pk is None:
            return "None yet."
        query = f"?job__id__exact={obj.pk}"
        return format_html(
            '<a href="{}">state changes</a> · <a href="{}">notifications sent</a>',
            reverse("admin:jobs_alertflip_changelist") + query,
            reverse("admin:jobs_notification_changelist") + query,
        )

    @admin.display(description="Downstream jobs")
    def downstream_jobs(self, obj: Job) -> str:
        """The jobs that depend on this one; edited on their own pages."""
        if obj.pk is None:
            return "None yet."
        downstreams = obj.downstreams.order_by("name")
        if not downstreams:
            return "None: no job depends on this one."
        return format_html_join(
            ", ",
            '<a href="{}">{}</a>{}',
            (
                (
                    reverse("admin:jobs_job_change", args=[down.pk]),
                    down.name,
                    " (triggered by its upstreams)" if down.trigger_on_upstream else "",
                )
                for down in downstreams
            ),
        )

    @admin.display(description="Missed fires")
    def missed_fires_note(self, obj: Job) -> str:
        if obj.pk is None:
            return "None yet."
        gaps = obj.missed_fires.count()
        if not gaps:
            return "None recorded."
        url = reverse("admin:jobs_missedfires_changelist") + f"?job__id__exact={obj.pk}"
        return format_html('<a href="{}">{} recorded</a>', url, counted(gaps, "gap"))

    # --- Bulk actions -----------------------------------------------------------

    @admin.action(description="Run now", permissions=["run"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        runs = [
            services.run_create(job=job, trigger=Run.Trigger.MANUAL, by=request.user)
            for job in queryset
        ]
        self._report_runs(request, runs)

    @admin.action(description="Pause", permissions=["run"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._set_enabled(request, queryset, enabled=False)

    @admin.action(description="Resume", permissions=["run"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._set_enabled(request, queryset, enabled=True)

    def _set_enabled(self, request: HttpRequest, jobs: Iterable[Job], *, enabled: bool) -> None:
        names = []
        for job in jobs:
            services.job_set_enabled(job=job, enabled=enabled)
            names.append(job.name)
        verb = "Resumed" if enabled else "Paused"
        self.message_user(request, f"{verb} {counted(len(names), 'job')}: {', '.join(names)}.")

    def _report_runs(self, request: HttpRequest, runs: list[Run]) -> None:
        started = [r for r in runs if r.status != Run.Status.SKIPPED]
        skipped = [r for r in runs if r.status == Run.Status.SKIPPED]
        if started:
            listed = ", ".join(f"{r.job.name} (run #{r.pk})" for r in started)
            self.message_user(request, f"Queued {counted(len(started), 'run')}: {listed}.")
        if skipped:
            listed = "; ".join(f"{r.job.name}: run #{r.pk}, {r.error_summary}" for r in skipped)
            self.message_user(
                request, f"Skipped {counted(len(skipped), 'run')} — {listed}.", messages.WARNING
            )

    # --- Per-object buttons -----------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        return [
            path("<path:object_id>/run/", self._object_view(self.run_view), name="jobs_job_run"),
            path(
                "<path:object_id>/pause/",
                self._object_view(self.pause_view),
                name="jobs_job_pause",
            ),
            path(
                "<path:object_id>/resume/",
                self._object_view(self.resume_view),
                name="jobs_job_resume",
            ),
            *super().get_urls(),
        ]

    def _job_or_404(self, request: HttpRequest, object_id: str) -> Job:
        job = self.get_object(request, unquote(object_id))
        if job is None:
            raise Http404("No such job.")
        return job

    def run_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = self._job_or_404(request, object_id)
        run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, by=request.user)
        self._report_runs(request, [run])
        return redirect("jobs-run-detail", run.pk)

    def pause_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = self._job_or_404(request, object_id)
        self._set_enabled(request, [job], enabled=False)
        return redirect("admin:jobs_job_change", job.pk)

    def resume_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        job = self._job_or_404(request, object_id)
        self._set_enabled(request, [job], enabled=True)
        return redirect("admin:jobs_job_change", job.pk)


class CappedPaginator(Paginator):
    """Counts at most CAP rows: COUNT(*) over millions of runs grows with
    the history (the changelist shows "10,000+" pages' worth instead)."""

    CAP = 10_000

    @cached_property
    def count(self) -> int:
        return self.object_list[: self.CAP].count()


@admin.register(Run)
class RunAdmin(
    DeletesArtifactFilesMixin,
    FilterLookupsOnlyMixin,
    QuickCheckboxMixin,
    RunPermissionMixin,
    admin.ModelAdmin,
):
    list_display = [
        "id",
        "job",
        "status",
        "trigger",
        "triggered_by",
        "scheduled_for",
        "started_at",
        "duration",
        "exit_code",
        "worker",
        "cancelled_by",
    ]
    list_display_links = ["id", "job"]
    list_select_related = ["job", "triggered_by", "cancelled_by"]
    list_filter = ["status", "trigger", RunJobFilter]
    search_fields = ["job__name"]
    # COUNT(*) over the whole history on every page view is what grows with it.
    show_full_result_count = False
    paginator = CappedPaginator
    list_per_page = 50  # rendering 100 rows x 11 columns was ~100 ms a view
    actions = ["rerun", "cancel"]
    fieldsets = [
        (None, {"fields": ["job", "status", "error_summary", "trigger", "triggered_by"]}),
        ("Attempt", {"fields": ["rerun_of", "retry_of", "attempt", "retry_due"]}),
        ("Cancel", {"fields": ["cancel_requested_at", "cancelled_by"]}),
        (
            "Timings",
            {
                "fields": [
                    "scheduled_for",
                    "queued_at",
                    "started_at",
                    "finished_at",
                    "duration",
                    "lateness",
                    "heartbeat_at",
                ]
            },
        ),
        ("Process", {"fields": ["exit_code", "worker", "pid", "command", "environment_masked"]}),
        ("Log", {"fields": ["log_size", "log"]}),
    ]
    readonly_fields = [f for _title, options in fieldsets for f in options["fields"]]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Run | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Run | None = None) -> bool:
        return request.user.is_superuser

    # --- Displays ---------------------------------------------------------------

    @admin.display(description="Duration")
    def duration(self, obj: Run) -> str | None:
        return _format_duration(obj.duration())

    @admin.display(description="Lateness")
    def lateness(self, obj: Run) -> str | None:
        return _format_duration(obj.lateness)

    @admin.display(description="Not before")
    def retry_due(self, obj: Run) -> str | None:
        """When a waiting run (a retry's backoff) may start."""
        if obj.not_before is None:
            return None
        if obj.status == Run.Status.QUEUED and obj.started_at is None:
            return format_html("{} (waiting until then)", _local(obj.not_before))
        return _local(obj.not_before)

    @admin.display(description="Environment")
    def environment_masked(self, obj: Run) -> str:
        # Run.environment is stored with secret values already masked.
        return _environment_block(obj.environment)

    @admin.display(description="Output size")
    def log_size(self, obj: Run) -> str:
        size = f"{obj.log_bytes:,} bytes"
        if obj.log_dropped_bytes:
            size += f" ({obj.log_dropped_bytes:,} dropped by the log cap)"
        return size

    @admin.display(description="Log")
    def log(self, obj: Run) -> str:
        return _pre(runlog.read_log(obj) or "(no output)")

    # --- Rerun ------------------------------------------------------------------

    @admin.action(description="Rerun", permissions=["run"])
    def rerun(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        runs = [
            services.run_rerun(run=run, by=request.user)
            for run in queryset.select_related("job").order_by("id")
        ]
        self._report_reruns(request, runs)

    def _report_reruns(self, request: HttpRequest, runs: list[Run]) -> None:
        for run in runs:
            if run.status == Run.Status.SKIPPED:
                self.message_user(
                    request,
                    f"Rerun of run #{run.rerun_of_id} ({run.job.name}) skipped as run #{run.pk}: "
                    f"{run.error_summary}.",
                    messages.WARNING,
                )
            else:
                self.message_user(
                    request,
                    f"Rerun of run #{run.rerun_of_id} ({run.job.name}) queued as run #{run.pk}.",
                )

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/rerun/",
                self._object_view(self.rerun_view),
                name="jobs_run_rerun",
            ),
            path(
                "<path:object_id>/cancel/",
                self._object_view(self.cancel_view),
                name="jobs_run_cancel",
            ),
            *super().get_urls(),
        ]

    def rerun_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        original = self.get_object(request, unquote(object_id))
        if original is None:
            raise Http404("No such run.")
        run = services.run_rerun(run=original, by=request.user)
        self._report_reruns(request, [run])
        return redirect("jobs-run-detail", run.pk)

    # --- Cancel -----------------------------------------------------------------

    CANCEL_MESSAGES = {
        "cancelled": "Run #{pk} cancelled.",
        "cancelling": "Cancelling run #{pk}: its process group is being stopped.",
        "finished": "Run #{pk} had already finished.",
    }

    def _cancel(self, request: HttpRequest, run: Run) -> str:
        """Cancel one run; report what happened in words a user can act on."""
        outcome = services.run_cancel(run=run, by=request.user)
        if outcome == "finished":
            run.refresh_from_db(fields=["status", "cancel_requested_at"])
            if run.status == Run.Status.RUNNING:
                # run_cancel leaves a pending request alone: it is not finished yet.
                return (
                    f"Cancelling run #{run.pk}: already requested, "
                    "its process group is being stopped."
                )
        return self.CANCEL_MESSAGES[outcome].format(pk=run.pk)

    @admin.action(description="Cancel selected runs", permissions=["run"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        for run in queryset.select_related("job").order_by("id"):
            self.message_user(request, self._cancel(request, run))

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        run = self.get_object(request, unquote(object_id))
        if run is None:
            raise Http404("No such run.")
        text = self._cancel(request, run)
        self.message_user(request, text, messages.WARNING if "finished" in text else messages.INFO)
        return redirect("admin:jobs_run_change", run.pk)


class HistoryAdmin(FilterLookupsOnlyMixin, admin.ModelAdmin):
    """Read-only history written by services: view it, never add or edit it."""

    list_select_related = ["job"]
    search_fields = ["job__name"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        # As for runs: deleting a job deletes its history, so a superuser may.
        return request.user.is_superuser


@admin.register(MissedFires)
class MissedFiresAdmin(HistoryAdmin):
    """Fires missed while no scheduler ran: answers "why didn't it run?"."""

    list_display = ["job", "first", "last", "count", "policy", "recorded_at"]
    list_filter = ["job", "policy"]
    date_hierarchy = "recorded_at"


@admin.register(AlertFlip)
class AlertFlipAdmin(HistoryAdmin):
    """Each change of a job's alert state, and whether it was notified."""

    list_display = ["job", "transition", "at", "reason", "run_link", "notified_at"]
    list_filter = ["new_state", "old_state", "job"]
    date_hierarchy = "at"
    # Grows with every flip: no COUNT(*) of the whole table per page view.
    show_full_result_count = False

    @admin.display(description="Change", ordering="new_state")
    def transition(self, obj: AlertFlip) -> str:
        return format_html(
            "{} → {}", Job.AlertState(obj.old_state).label, _alert_state_badge(obj.new_state)
        )

    @admin.display(description="Run")
    def run_link(self, obj: AlertFlip) -> str | None:
        if obj.run_id is None:
            return None
        url = reverse("admin:jobs_run_change", args=[obj.run_id])
        return format_html('<a href="{}">#{}</a>', url, obj.run_id)


@admin.register(Notification)
class NotificationAdmin(HistoryAdmin):
    """Every email and webhook sent (or tried): when, to whom, what came of it."""

    list_display = [
        "sent_at",
        "job",
        "kind",
        "channel",
        "shown_target",
        "ok",
        "tries",
        "error_short",
    ]
    list_filter = ["ok", "kind", "channel", "job"]
    search_fields = ["job__name", "subject"]
    date_hierarchy = "sent_at"
    show_full_result_count = False
    # A webhook URL's path is often its token: shown as scheme://host/… only.
    exclude = ["target"]
    readonly_fields = ["shown_target"]

    @admin.display(description="To")
    def shown_target(self, obj: Notification) -> str:
        return obj.shown_target

    @admin.display(description="Error")
    def error_short(self, obj: Notification) -> str:
        return obj.error if len(obj.error) <= 120 else obj.error[:119] + "…"


@admin.register(JobDailyStats)
class JobDailyStatsAdmin(HistoryAdmin):
    """The per-day rollups behind success rates and charts."""

    list_display = [
        "job",
        "day",
        "succeeded",
        "failures",
        "failed",
        "timed_out",
        "lost",
        "cancelled",
        "skipped",
        "mean_duration",
        "max_duration",
        "mean_lateness",
    ]
    list_filter = ["job"]
    date_hierarchy = "day"
    ordering = ["-day", "job__name"]
    show_full_result_count = False

    @admin.display(description="Failures")
    def failures(self, obj: JobDailyStats) -> int:
        return obj.failures

    @admin.display(description="Mean duration")
    def mean_duration(self, obj: JobDailyStats) -> str | None:
        if not obj.executed:
            return None
        return _format_duration(timedelta(seconds=obj.duration_total / obj.executed))

    @admin.display(description="Max duration", ordering="duration_max")
    def max_duration(self, obj: JobDailyStats) -> str | None:
        return _format_duration(timedelta(seconds=obj.duration_max)) if obj.executed else None

    @admin.display(description="Mean lateness")
    def mean_lateness(self, obj: JobDailyStats) -> str | None:
        if not obj.executed:
            return None
        return _format_duration(timedelta(seconds=obj.lateness_total / obj.executed))
