"""The dashboard pages: thin views over models, runlog, stats and services.

Every page needs a login except /health/. Reads are bounded whatever the
history holds: the overview reads a fixed number of recent runs per job on
its page (and two index probes per job for the counts), the
job page and /failures/ page by id (keyset) instead of COUNT(*) + OFFSET,
rates and charts come from the daily rollups, and staleness is pure maths
on each job (Job.stale_reason), so /stale/ costs the same for any history.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.contrib.auth.views import redirect_to_login
from django.core.paginator import Page, Paginator
from django.core.validators import slug_re
from django.db import connection
from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery
from django.db.models.base import ModelState
from django.db.models.functions import Coalesce
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from jobs import charts, runlog, services, stats
from jobs.models import Artifact, Job, MissedFires, Run, Stale
from jobs.templatetags.jobs_tags import counted

STRIP_LENGTH = 20  # recent runs per job on the overview
JOBS_PAGE_SIZE = 50  # jobs a page on the overview and /stale/
HISTORY_PAGE_SIZE = 25
FLIPS_SHOWN = 10
NOTIFICATIONS_SHOWN = 20
CHART_DAYS = 30
CHART_RUNS = 100
MISSED_SHOWN = 10
NEXT_FIRES = 5
# The stored log is already bounded (head + tail caps); this only guards the
# page against a cap configured far larger.
INLINE_LOG_CHARS = 1024 * 1024


# --- Overview ------------------------------------------------------------------


@dataclass(slots=True)
class StripRun:
    """What the overview needs of a run: far cheaper than 20,000 model instances."""

    pk: int
    status: str
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def is_active(self) -> bool:
        return self.status in Run.ACTIVE

    @property
    def is_failure(self) -> bool:
        return self.status in Run.FAILURES

    def get_absolute_url(self) -> str:
        return reverse("jobs-run-detail", args=[self.pk])


@dataclass
class JobRow:
    """A job with its most recent runs, newest first (at most STRIP_LENGTH)."""

    job: Job
    recent: list[Run] = field(default_factory=list)
    next_fire: datetime | None = None
    stale: Stale | None = None
    rate: stats.Rate | None = None  # success over the last 7 days

    @property
    def last_run(self) -> Run | None:
        return self.recent[0] if self.recent else None

    @property
    def strip(self) -> list[Run]:
        return list(reversed(self.recent))

    @property
    def status(self) -> str:
        """running/queued while a run is active, else the last run's status."""
        active = {r.status for r in self.recent if r.is_active}
        for status in (Run.Status.RUNNING, Run.Status.QUEUED):
            if status in active:
                return status
        return self.last_run.status if self.last_run else "never"


def _recent_runs_lateral(job_ids: list[int]) -> dict[int, list[StripRun]]:
    """PostgreSQL: a LATERAL join reads each job's latest runs straight off
    run_job_recent_idx. (With the correlated-subquery form below its planner
    misestimated the join at 2 M runs and scanned them all: 17 s vs 20 ms.)"""
    sql = """
        SELECT j.id, r.id, r.status, r.queued_at, r.started_at, r.finished_at
        FROM jobs_job j
        CROSS JOIN LATERAL (
            SELECT id, status, queued_at, started_at, finished_at
            FROM jobs_run WHERE job_id = j.id ORDER BY id DESC LIMIT %s
        ) r
        WHERE j.id = ANY(%s)
        ORDER BY j.id, r.id DESC
    """
    recent: dict[int, list[Run]] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, [STRIP_LENGTH, list(job_ids)])
        for job_id, run_id, status, queued_at, started_at, finished_at in cursor.fetchall():
            recent.setdefault(job_id, []).append(
                StripRun(run_id, status, queued_at, started_at, finished_at)
            )
    return recent


def _recent_runs(job_ids: list[int]) -> dict[int, list[StripRun]]:
    """The latest STRIP_LENGTH runs of each job, in one query.

    For each job a correlated subquery finds the id of its STRIP_LENGTH-th
    latest run, and the join reads only the runs from that id on: range
    scans on run_job_recent_idx (job, -id) driven by the job table, so the
    cost is jobs x STRIP_LENGTH whatever the length of the history. The
    explicit `pk IN (...)` makes SQLite (which has no table statistics
    unless ANALYZE ran) drive the join from jobs: without it, it scanned all
    runs (0.5 s for 800k runs vs 3 ms). A window function would number every
    run first; an OR of per-job ranges hits SQLite's expression depth limit
    at ~1000 jobs.
    """
    if connection.vendor == "postgresql":
        return _recent_runs_lateral(job_ids)
    nth_latest = (
        Run.objects.filter(job=OuterRef("pk"))
        .order_by("-id")
        .values("id")[STRIP_LENGTH - 1 : STRIP_LENGTH]
    )
    rows = (
        Job.objects.filter(pk__in=job_ids, runs__id__gte=Coalesce(Subquery(nth_latest), 0))
        .order_by()
        .values_list(
            "pk",
            "runs__id",
            "runs__status",
            "runs__queued_at",
            "runs__started_at",
            "runs__finished_at",
        )
    )
    recent: dict[int, list[Run]] = {}
    for job_id, run_id, status, queued_at, started_at, finished_at in rows:
        run = StripRun(run_id, status, queued_at, started_at, finished_at)
        recent.setdefault(job_id, []).append(run)
    for runs in recent.values():
        runs.sort(key=lambda r: r.pk, reverse=True)
    return recent


# The overview's filters: what an engineer on call looks for first.
OVERVIEW_FILTERS = {
    "all": "All jobs",
    "failing": "Failing",
    "stale": "Stale",
    "running": "Running",
    "paused": "Paused",
}
# What /stale/ reads of a job: staleness needs no more, nor does its row.
STALE_FIELDS = [
    "name",
    "slug",
    "schedule",
    "timezone",
    "enabled",
    "grace",
    "created_at",
    "schedule_since",
    "last_scheduled_for",
    "last_success_at",
]
# What the overview reads of every job: the same, plus what its counts,
# filters and rows show (no JSON fields to decode).
OVERVIEW_FIELDS = [*STALE_FIELDS, "tags", "next_fire_at", "fire_basis"]


def _jobs_with_state() -> list[Job]:
    """Every job by name, with the status of its latest run that ran to an
    end (Job.last_end_status, kept as runs end) and whether a run is
    running: one index probe per job (run_job_status_recent_idx), whatever
    the length of the history."""
    running = Run.objects.filter(job=OuterRef("pk"), status=Run.Status.RUNNING)
    jobs = Job.objects.annotate(is_running=Exists(running)).order_by("name")
    return _load_jobs(jobs, [*OVERVIEW_FIELDS, "last_end_status"], ("is_running",))


def _load_jobs(
    jobs: QuerySet[Job], fields: list[str], annotations: tuple[str, ...] = ()
) -> list[Job]:
    """The jobs with only `fields` loaded (and `annotations` as attributes).

    Built from values_list rows without Model.__init__: the instance holds
    the loaded fields, and any other field is deferred (loaded on access),
    as with .only(). For 1,000 jobs .only() took 21 ms and Model.from_db 14,
    since __init__ walks all of Job's 40 fields for every row; this takes
    about 3. Job has no pre_init/post_init receivers to skip.
    """
    names = ["id", *fields, *annotations]
    db = jobs.db
    loaded = []
    new = Job.__new__
    for row in jobs.values_list(*names):
        job = new(Job)
        job.__dict__.update(zip(names, row, strict=True))
        job._state = ModelState()
        job._state.adding, job._state.db = False, db
        loaded.append(job)
    return loaded


@login_required
@require_GET
def overview(request: HttpRequest) -> HttpResponse:
    """All jobs by name, JOBS_PAGE_SIZE a page, or only those a filter
    (?show=failing, stale, running, paused) picks.

    The counts cover every job: one query reads the jobs with their state
    (no run history beyond two index probes per job), staleness is pure
    maths on each, and only the page's jobs get their strips and rates.
    """
    show = request.GET.get("show", "").strip() or "all"
    if show not in OVERVIEW_FILTERS:
        return HttpResponseBadRequest(
            f"Unknown filter ?show={show!r}; use one of {', '.join(OVERVIEW_FILTERS)}.",
            content_type="text/plain",
        )
    try:
        number = _page_param(request)
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    now = timezone.now()
    jobs = _jobs_with_state()
    stale = {job.pk: reason for job in jobs if (reason := job.stale_reason(now))}
    picked = {
        "all": jobs,
        "failing": [job for job in jobs if job.last_end_status in Run.FAILURES],
        "stale": [job for job in jobs if job.pk in stale],
        "running": [job for job in jobs if job.is_running],
        "paused": [job for job in jobs if not job.enabled],
    }
    page = _page_of(picked[show], number)
    recent = _recent_runs([job.pk for job in page])
    rates = stats.rates_by_job(list(page), now)
    rows = [
        JobRow(
            job=job,
            recent=recent.get(job.pk, []),
            next_fire=_next_fire(job, now),
            stale=stale.get(job.pk),
            rate=rates.get(job.pk),
        )
        for job in page
    ]
    context = {
        "rows": rows,
        "page": page,
        "page_query": f"show={show}&",
        "show": show,
        "filters": [(key, label, len(picked[key])) for key, label in OVERVIEW_FILTERS.items()],
        "counts": {key: len(found) for key, found in picked.items()},
        "now": now,
    }
    return render(request, "jobs/overview.html", context)


def _page_of(items: list, number: int) -> Page:
    """Page `number` of `items` (a list: counting it costs nothing); past
    the end - the failing jobs recovered meanwhile - the last page."""
    paginator = Paginator(items, JOBS_PAGE_SIZE)
    return paginator.page(min(number, paginator.num_pages))


def _page_param(request: HttpRequest) -> int:
    """?page=, a page number from 1 (1 when absent); ValueError with a message if malformed."""
    raw = request.GET.get("page", "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"?page= must be a page number (1, 2, ...), not {raw!r}.")
    return int(raw)


def _next_fire(job: Job, now: datetime) -> datetime | None:
    """The scheduler's next_fire_at; computed (no I/O) until the scheduler has synced."""
    if not job.enabled or not job.schedule:
        return None
    if job.next_fire_at and job.fire_basis == job.current_fire_basis:
        return job.next_fire_at
    fires = job.next_fire_times(now, 1)
    return fires[0].at if fires else None


# --- What needs attention: stale jobs, recent failures -------------------------------


@dataclass
class StaleRow:
    job: Job
    stale: Stale
    last_run: Run | None


@login_required
@require_GET
def stale(request: HttpRequest) -> HttpResponse:
    """Every stale job, most overdue first, JOBS_PAGE_SIZE a page: with the
    scheduler down, every scheduled job is stale at once.

    Two queries whatever the number of jobs or runs: the scheduled jobs
    (the columns staleness needs), then the latest run of each stale one on
    the page (a correlated subquery per job on run_job_recent_idx).
    Staleness itself is pure maths per job on last_scheduled_for /
    last_success_at.
    """
    try:
        number = _page_param(request)
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    now = timezone.now()
    jobs = _load_jobs(Job.objects.filter(enabled=True).exclude(schedule=""), STALE_FIELDS)
    found = [(job, reason) for job in jobs if (reason := job.stale_reason(now))]
    found.sort(key=lambda pair: (-pair[1].overdue, pair[0].name))
    page = _page_of(found, number)
    last_runs = _latest_runs([job.pk for job, _ in page]) if found else {}
    rows = [StaleRow(job, reason, last_runs.get(job.pk)) for job, reason in page]
    context = {"rows": rows, "page": page, "page_query": "", "now": now}
    return render(request, "jobs/stale.html", context)


def _latest_runs(job_ids: list[int]) -> dict[int, Run]:
    """Each job's latest run, by job id, in one query."""
    latest = Run.objects.filter(job=OuterRef("pk")).order_by("-id").values("id")[:1]
    ids = Job.objects.filter(pk__in=job_ids).values(latest_id=Subquery(latest))
    runs = Run.objects.filter(pk__in=ids).only("job_id", "status", "queued_at")
    return {run.job_id: run for run in runs}


@login_required
@require_GET
def failures(request: HttpRequest) -> HttpResponse:
    """Recent failed, timed-out and lost runs across jobs, newest first.

    WHERE status IN (failed, timed_out, lost) [AND job_id = ?] ORDER BY id
    DESC LIMIT 26, paged by id (keyset), never counted. The partial index
    run_failure_recent_idx (id DESC WHERE status IN failures) serves it
    without a job, run_job_failure_recent_idx ((job, id DESC), same
    condition) with one: a short range scan, however rare failures are among
    millions of runs. Without them the database walks the primary key (or
    run_job_recent_idx) backwards and skips the successes.
    """
    try:
        before, after = _int_param(request, "before"), _int_param(request, "after")
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    runs = Run.objects.filter(status__in=Run.FAILURES).select_related("job")
    job = None
    if slug := request.GET.get("job", "").strip():
        if not slug_re.match(slug):  # a NUL would be a database error on PostgreSQL
            raise Http404("No such job.")
        job = get_object_or_404(Job, slug=slug)
        runs = runs.filter(job=job)
    context = {
        "history": _history_page(runs, before=before, after=after),
        "job": job,
        "jobs": Job.objects.order_by("name").values_list("slug", "name"),
        "now": timezone.now(),
    }
    return render(request, "jobs/failures.html", context)


# --- Job page ------------------------------------------------------------------


@dataclass
class HistoryPage:
    runs: list[Run]
    older: int | None  # ?before= for the next (older) page
    newer: int | None  # ?after= for the previous (newer) page


def _history_page(runs: QuerySet[Run], *, before: int | None, after: int | None) -> HistoryPage:
    """Keyset pagination on id, newest first: never COUNT(*)s the history."""
    size = HISTORY_PAGE_SIZE
    if after is not None:
        page = list(runs.filter(id__gt=after).order_by("id")[: size + 1])
        has_newer = len(page) > size
        page = list(reversed(page[:size]))
        return HistoryPage(
            runs=page,
            older=page[-1].pk if page else after + 1,
            newer=page[0].pk if page and has_newer else None,
        )
    if before is not None:
        runs = runs.filter(id__lt=before)
    page = list(runs.order_by("-id")[: size + 1])
    has_older = len(page) > size
    page = page[:size]
    return HistoryPage(
        runs=page,
        older=page[-1].pk if page and has_older else None,
        newer=page[0].pk if page and before is not None else None,
    )


def _int_param(request: HttpRequest, name: str) -> int | None:
    """A non-negative whole-number query parameter; ValueError with a message if malformed."""
    raw = request.GET.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"?{name}= must be a whole number, not {raw!r}.")
    return int(raw)


@login_required
@require_GET
def job_detail(request: HttpRequest, slug: str) -> HttpResponse:
    job = get_object_or_404(Job, slug=slug)
    status = request.GET.get("status", "")
    if status and status not in Run.Status.values:
        return HttpResponseBadRequest(
            f"Unknown status {status!r}; use one of {', '.join(Run.Status.values)}.",
            content_type="text/plain",
        )
    try:
        before, after = _int_param(request, "before"), _int_param(request, "after")
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    runs = job.runs.select_related("triggered_by")
    if status:
        runs = runs.filter(status=status)
    now = timezone.now()
    context = {
        "job": job,
        "environment": sorted(job.masked_environment().items()),
        "kwargs_json": json.dumps(job.kwargs, indent=2, sort_keys=True),
        "deliver_password_note": _password_note(job.deliver_password),
        "next_fires": job.next_fire_times(now, NEXT_FIRES) if job.enabled else [],
        "upcoming_if_resumed": [] if job.enabled else job.next_fire_times(now, NEXT_FIRES),
        "upstreams": _with_last_status(job.upstreams.order_by("name")),
        "downstreams": _with_last_status(job.downstreams.order_by("name")),
        "missed_fires": list(job.missed_fires.all()[:MISSED_SHOWN]),
        "history": _history_page(runs, before=before, after=after),
        "status": status,
        "statuses": Run.Status.choices,
        "now": now,
        **_health_context(job, now),
    }
    return render(request, "jobs/job_detail.html", context)


def _health_context(job: Job, now: datetime) -> dict:
    """Rates, charts, alert state, flips and notifications: seven small
    queries, on the rollups and on indexes that bound them (the latest 100
    runs by run_job_recent_idx; flips and notifications by their job indexes)."""
    rates = stats.success_rates(job, now)
    durations = [
        charts.RunPoint(
            run_id=run.pk,
            status=run.status,
            seconds=max(0.0, (run.finished_at - run.started_at).total_seconds()),
            started_at=timezone.localtime(run.started_at),
            href=run.get_absolute_url(),
        )
        for run in stats.recent_durations(job, CHART_RUNS)
    ]
    return {
        "rates": [(label, rates[key]) for key, label in RATE_WINDOWS],
        "failure_chart": charts.failure_rate_chart(stats.daily_failure_rates(job, now, CHART_DAYS)),
        "duration_chart": charts.duration_chart(durations),
        "chart_runs": len(durations),
        "stale_now": job.stale_reason(now),
        "flips": list(job.flips.all()[:FLIPS_SHOWN]),
        "notifications": list(job.notifications.all()[:NOTIFICATIONS_SHOWN]),
    }


RATE_WINDOWS = [("24h", "24 hours"), ("7d", "7 days"), ("30d", "30 days")]

_WHOLE_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def _password_note(password: str) -> str:
    """How the delivery password is given, never its value: a ${NAME}
    reference names where it comes from; anything else is a literal."""
    if not password:
        return "not set"
    if _WHOLE_REFERENCE.match(password.strip()):
        return f"set (from {password.strip()})"
    return "set"


def _with_last_status(jobs) -> list[Job]:
    """Each related job with `.last_run` (the run that finished last), for the
    dependency lists: one small query per related job, of which there are few."""
    related = list(jobs)
    for other in related:
        other.last_run = services.latest_finished(other)
    return related


def login_required_back_to_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """login_required for a button's POST-only URL (/runs/7/cancel/,
    /jobs/x/backfill/3/): someone whose session ended meanwhile logs in and
    lands back on the button's page (/runs/7/, /jobs/x/: a page's URL is its
    first two segments), not on the action, which the browser would GET for
    a 405."""

    @wraps(view)
    def checked(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login("/".join(request.path.split("/")[:3]) + "/")
        return view(request, *args, **kwargs)

    return checked


@login_required_back_to_page
@require_POST
@permission_required("jobs.run_job", raise_exception=True)
def job_run(request: HttpRequest, slug: str) -> HttpResponse:
    job = get_object_or_404(Job, slug=slug)
    run = services.run_create(job=job, trigger=Run.Trigger.MANUAL, by=request.user)
    _say_what_happened(request, run)
    return redirect(run)


@login_required_back_to_page
@require_POST
@permission_required("jobs.run_job", raise_exception=True)
def job_backfill(request: HttpRequest, slug: str, gap_id: int) -> HttpResponse:
    """Run the fires of a gap the scheduler missed (listed on the job page)."""
    job = get_object_or_404(Job, slug=slug)
    gap = get_object_or_404(MissedFires.objects.select_related("job"), pk=gap_id, job=job)
    try:
        runs = services.missed_fires_backfill(gap=gap, by=request.user, now=timezone.now())
    except services.BackfillError as exc:
        messages.error(request, f"Nothing queued: {exc}")
        return redirect(job)
    if runs:
        messages.success(
            request, f"Queued {counted(len(runs), 'backfill run')} of {job.name}, oldest first."
        )
    else:
        messages.info(request, "These fires were backfilled already.")
    return redirect(job)


@login_required_back_to_page
@require_POST
@permission_required("jobs.run_job", raise_exception=True)
def job_pause(request: HttpRequest, slug: str) -> HttpResponse:
    return _set_enabled(request, slug, enabled=False)


@login_required_back_to_page
@require_POST
@permission_required("jobs.run_job", raise_exception=True)
def job_resume(request: HttpRequest, slug: str) -> HttpResponse:
    return _set_enabled(request, slug, enabled=True)


def _set_enabled(request: HttpRequest, slug: str, *, enabled: bool) -> HttpResponse:
    job = get_object_or_404(Job, slug=slug)
    services.job_set_enabled(job=job, enabled=enabled)
    if enabled:
        messages.success(request, f"{job.name} is resumed: its schedule fires again.")
    else:
        messages.success(
            request,
            f"{job.name} is paused: nothing fires, and its waiting retries and queued runs "
            "are skipped until it is resumed.",
        )
    return redirect(job)


def _say_what_happened(request: HttpRequest, run: Run) -> None:
    if run.status == Run.Status.SKIPPED:
        messages.warning(request, f"Run #{run.pk} was skipped: {run.error_summary}.")
    else:
        messages.success(request, f"Run #{run.pk} of {run.job.name} is queued.")


# --- Run page ------------------------------------------------------------------


def _run_or_404(pk: int) -> Run:
    return get_object_or_404(Run.objects.select_related("job", "triggered_by", "rerun_of"), pk=pk)


@login_required
@require_GET
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    run = _run_or_404(pk)
    now = timezone.now()
    log = runlog.read_after(run, limit=INLINE_LOG_CHARS)
    context = {
        "run": run,
        "job": run.job,
        # A queued run has not recorded what it runs yet: the job's
        # definition is what it will run.
        "command": run.command or services.what_runs(run.job),
        "duration": run.duration(now),
        "environment": sorted(run.environment.items()),
        "log": log,
        "artifacts": list(run.artifacts.order_by("name")),
        "followed_by": _followed_by(run),
        "now": now,
    }
    return render(request, "jobs/run_detail.html", context)


def _followed_by(run: Run) -> list[Run]:
    """The retries and reruns of `run`, first ten, so a failed run's page
    says what came of it. The two foreign keys' indexes answer it."""
    return list(
        Run.objects.filter(Q(retry_of=run) | Q(rerun_of=run))
        .only("pk", "status", "trigger", "attempt", "retry_of_id", "rerun_of_id")
        .order_by("pk")[:10]
    )


@login_required
@require_GET
def run_log(request: HttpRequest, pk: int) -> HttpResponse:
    """The live tail: log text after ?after=<seq>, plus the run's current status.
    ?tail_end= is the fragment's (or page's) data-tail-end: where the reader
    is among the bytes past the head, so a marker can say how much output
    was dropped since it last looked."""
    run = _run_or_404(pk)
    try:
        after = _int_param(request, "after") or 0
        tail_end = _int_param(request, "tail_end") or 0
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    context = {
        "run": run,
        "log": runlog.read_after(run, after_seq=after, tail_end=tail_end),
        "duration": run.duration(timezone.now()),
    }
    return render(request, "jobs/_run_log_fragment.html", context)


@login_required
@require_GET
def run_log_download(request: HttpRequest, pk: int) -> StreamingHttpResponse:
    run = _run_or_404(pk)
    response = StreamingHttpResponse(_log_texts(run), content_type="text/plain; charset=utf-8")
    filename = f"{run.job.slug}-run-{run.pk}.log"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _log_texts(run: Run) -> Iterator[str]:
    for _seq, text in runlog.iter_log(run):
        yield text


@login_required
@require_GET
def artifact_download(request: HttpRequest, run_id: int, pk: int) -> FileResponse:
    """A run's file, streamed from storage. Stored files are only served
    here, behind the login: MEDIA_URL is never served."""
    artifact = get_object_or_404(Artifact, pk=pk, run_id=run_id)
    try:
        handle = artifact.file.open("rb")
    except FileNotFoundError as exc:
        raise Http404("The file is no longer in storage.") from exc
    # The content type is guessed from the name (text/csv for .csv).
    filename = posixpath.basename(artifact.name) or f"run-{run_id}-file-{pk}"
    return FileResponse(handle, as_attachment=True, filename=filename)


@login_required_back_to_page
@require_POST
@permission_required("jobs.run_job", raise_exception=True)
def run_rerun(request: HttpRequest, pk: int) -> HttpResponse:
    run = _run_or_404(pk)
    new = services.run_rerun(run=run, by=request.user)
    _say_what_happened(request, new)
    return redirect(new)


CANCEL_MESSAGES = {
    "cancelled": "Run #{pk} is cancelled.",
    "cancelling": "Run #{pk} is being stopped: its worker kills the process group.",
    "finished": "Run #{pk} had already finished; nothing to cancel.",
}


@login_required_back_to_page
@require_POST
@permission_required("jobs.run_job", raise_exception=True)
def run_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    run = _run_or_404(pk)
    outcome = services.run_cancel(run=run, by=request.user)
    messages.info(request, CANCEL_MESSAGES[outcome].format(pk=run.pk))
    return redirect(run)
