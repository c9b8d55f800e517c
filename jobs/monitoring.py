"""Being watched: /health/ for load balancers, /metrics for Prometheus.

Both are cheap whatever the run history holds: active runs are counted via
the active-runs partial index, run totals come from the daily rollups, and
the only run rows read are the last 24 h of finished runs (per job, via the
(job, finished_at) index) for the duration and lateness histograms.
"""

from __future__ import annotations

import hmac
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from itertools import accumulate
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.cache import cache
from django.db import connection
from django.db.models import Count, FloatField, Func, QuerySet, Sum
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.status import Stat
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from jobs.clock import TICK_KEY
from jobs.models import Job, JobDailyStats, Run

log = logging.getLogger(__name__)

# --- Shared reads ------------------------------------------------------------------------


def active_run_counts(job_ids: list[int]) -> dict[tuple[int, str], int]:
    """{(job_id, status): count} of the jobs' queued and running runs, one query.

    The explicit `job_id IN (...)` makes this a few index seeks per job:
    SQLite does not use the partial run_active_idx when the statuses are
    bound parameters (as Django passes them) and would scan an index over
    every run instead; with the job ids it seeks (job, status) in
    run_job_status_recent_idx.
    """
    rows = (
        Run.objects.filter(job_id__in=job_ids, status__in=Run.ACTIVE)
        .order_by()
        .values_list("job_id", "status")
        .annotate(n=Count("id"))
    )
    return {(job_id, status): n for job_id, status, n in rows}


def last_tick() -> datetime | None:
    """When the scheduler last ticked (it writes this into the shared cache)."""
    value = cache.get(TICK_KEY)
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None


# --- /health/ ----------------------------------------------------------------------------

# Each check and the field that says it passed; all must pass for a 200.
CHECKS = (("database", "reachable"), ("scheduler", "alive"), ("workers", "alive"))


def check_database() -> dict[str, Any]:
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        log.warning("health: database unreachable: %s", exc)
        # The class only: /health/ is public and driver messages name hosts.
        return {"reachable": False, "error": type(exc).__name__}
    return {"reachable": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def check_scheduler(now: datetime) -> dict[str, Any]:
    stale_after = settings.JOBSITE_SCHEDULER_STALE_SECONDS
    try:
        tick = last_tick()
    except Exception as exc:  # a DatabaseCache whose database is down
        log.warning("health: cannot read the scheduler tick: %s", exc)
        return {"alive": False, "last_tick": None, "age_seconds": None, "error": type(exc).__name__}
    age = (now - tick).total_seconds() if tick else None
    return {
        "alive": age is not None and age < stale_after,
        "last_tick": tick.isoformat() if tick else None,
        "age_seconds": round(age, 3) if age is not None else None,
        "stale_after_seconds": stale_after,
    }


def check_workers(*, where: bool = False) -> dict[str, Any]:
    """django-q2 clusters seen in the shared cache (each refreshes its
    status every guard cycle with a 3 s expiry, so a dead one vanishes).
    `where`: each cluster's host and pid too (for signed-in users only:
    /health/ is public, and host names map the network)."""
    try:
        stats = Stat.get_all()
    except Exception as exc:
        log.warning("health: cannot read cluster status: %s", exc)
        return {"alive": False, "clusters": [], "error": type(exc).__name__}
    clusters = [
        {
            "id": str(stat.cluster_id),
            **({"host": stat.host, "pid": stat.pid} if where else {}),
            "status": str(stat.status),
            "workers": len(stat.workers),
        }
        for stat in stats
    ]
    return {"alive": serving_workers(clusters) > 0, "clusters": clusters}


def serving_workers(clusters: list[dict[str, Any]]) -> int:
    """Workers of the clusters (as check_workers lists them) that take tasks."""
    serving = {str(Conf.WORKING), str(Conf.IDLE)}
    return sum(c["workers"] for c in clusters if c["status"] in serving)


def broker_queue_size() -> int | None:
    """Tasks waiting in django-q2's broker: a count on the small OrmQ table
    or a Redis LLEN. None for other brokers (their size can be a slow call)."""
    if not (Conf.ORM or Conf.REDIS):
        return None
    try:
        return get_broker().queue_size()
    except Exception as exc:
        log.warning("health: cannot read the broker queue size: %s", exc)
        return None


def counts() -> dict[str, int]:
    jobs = dict(Job.objects.order_by().values_list("pk", "alert_state"))
    active = active_run_counts(list(jobs))
    states = Counter(jobs.values())
    return {
        "running": sum(n for (_, status), n in active.items() if status == Run.Status.RUNNING),
        "queued": sum(n for (_, status), n in active.items() if status == Run.Status.QUEUED),
        "failing": states[Job.AlertState.FAILING],
        "stale": states[Job.AlertState.STALE],
    }


@require_safe
@never_cache
def health(request: HttpRequest) -> JsonResponse:
    """200 when the database, the scheduler and the workers are alive, else 503
    (with ?scope=web: when the database is).

    "down": the database is unreachable (nothing works); "degraded": it is
    reachable but the scheduler or the workers are not. The body always
    says which checks failed.
    """
    now = timezone.now()
    body: dict[str, Any] = {"database": check_database()}
    body["scheduler"] = check_scheduler(now)
    body["workers"] = check_workers(where=request.user.is_authenticated)
    failing = [name for name, key in CHECKS if not body[name][key]]
    body["queue"] = body["counts"] = None
    if body["database"]["reachable"]:
        try:
            tally = counts()
        except Exception as exc:  # e.g. the database went away after SELECT 1
            log.warning("health: cannot count runs and jobs: %s", exc)
            body["counts_error"] = type(exc).__name__
        else:
            body["queue"] = {"depth": tally["queued"], "django_q": broker_queue_size()}
            body["counts"] = {k: tally[k] for k in ("running", "failing", "stale")}
    if not failing:
        status = "ok"
    elif "database" in failing:
        status = "down"
    else:
        status = "degraded"
    body = {"status": status, "failing": failing, "checked_at": now.isoformat(), **body}
    # ?scope=web: is this web server of use? Only the database decides, so a
    # load balancer keeps the dashboard up while the clock or workers are down,
    # which is when the people on call need it. The body tells all the same.
    usable = status == "ok" or (request.GET.get("scope") == "web" and status != "down")
    return JsonResponse(body, status=200 if usable else 503)


# --- /metrics ----------------------------------------------------------------------------

RECENT_WINDOW = timedelta(hours=24)
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600)
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
ROLLUP_STATUSES = ("succeeded", "failed", "timed_out", "lost", "cancelled", "skipped")
WINDOW_NOTE = (
    "over runs that finished in the last 24 h (a sliding window, not a counter: "
    "use the buckets directly, e.g. histogram_quantile(0.95, ...), not rate())"
)


# Counting them would make the lateness histogram page someone for a rerun.
CARRIED_OVER = Run.CARRIED_OVER


class SecondsBetween(Func):
    """`end - start` in seconds, as a float computed by the database: the
    histograms read two numbers per run instead of three timestamps that
    Python would parse (on SQLite, most of a scrape's time)."""

    arity = 2
    output_field = FloatField()

    def as_sqlite(self, compiler, connection, **extra):
        # julianday() reads the text timestamps Django stores; days -> seconds.
        return self.as_sql(
            compiler,
            connection,
            template="((julianday(%(expressions)s)) * 86400.0)",
            arg_joiner=") - julianday(",
            **extra,
        )

    def as_postgresql(self, compiler, connection, **extra):
        return self.as_sql(
            compiler,
            connection,
            template="EXTRACT(EPOCH FROM (%(expressions)s))::double precision",
            arg_joiner=" - ",
            **extra,
        )


@dataclass
class Histogram:
    """Counts per bucket (not cumulative: bisect finds the one bucket a
    value falls in), the last entry counting values above every bound."""

    buckets: tuple[float, ...]
    counts: list[int]
    total: float = 0.0

    @classmethod
    def empty(cls, buckets: tuple[float, ...]) -> Histogram:
        return cls(buckets, [0] * (len(buckets) + 1))

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.total += value
        self.counts[bisect_left(self.buckets, value)] += 1  # the first bound >= value

    @property
    def observed(self) -> int:
        return sum(self.counts)

    def family_buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as Prometheus wants them; +Inf is the count."""
        bounds = [*(str(float(b)) for b in self.buckets), "+Inf"]
        return list(zip(bounds, map(float, accumulate(self.counts)), strict=True))


def rollup_totals(rows: QuerySet[JobDailyStats]) -> dict[int, tuple[int, ...]]:
    """{job_id: (a sum per ROLLUP_STATUSES)} over the given rollup rows."""
    sums = rows.order_by().values("job_id").annotate(**{s: Sum(s) for s in ROLLUP_STATUSES})
    return {row["job_id"]: tuple(row[s] or 0 for s in ROLLUP_STATUSES) for row in sums}


CLOSED_TOTALS_KEY = "jobsite:metrics:closed-day-totals:{day}"
CLOSED_TOTALS_TTL = 3600


def closed_day_totals(today: date) -> dict[int, tuple[int, ...]]:
    """Each job's totals over the rollup rows of the days before `today`.

    Those rows no longer change (a run is added to the day it finishes,
    and runs finish now; pruning keeps the rollups), but there is one per
    job and day of history: summed on every scrape they made /metrics
    grow with the history. So they are summed once per day and kept in the
    shared cache for every gunicorn worker; the hour's expiry picks up a
    run that finished just before midnight and was added just after.
    """
    key = CLOSED_TOTALS_KEY.format(day=today.isoformat())
    try:
        cached = cache.get(key)
    except Exception as exc:  # a DatabaseCache whose table is locked: sum them here
        log.warning("metrics: cannot read the cached run totals: %s", exc)
        cached = None
    if cached is not None:
        return cached
    totals = rollup_totals(JobDailyStats.objects.filter(day__lt=today))
    try:
        cache.set(key, totals, timeout=CLOSED_TOTALS_TTL)
    except Exception as exc:
        log.warning("metrics: cannot cache the run totals: %s", exc)
    return totals


class JobsiteCollector:
    """Builds every metric family from the database at collect() time, so
    any gunicorn worker answers a scrape with the same numbers."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def collect(self) -> Iterator[Metric]:
        jobs = list(Job.objects.order_by("pk").values_list("pk", "slug", "alert_state"))
        yield from self.run_totals(jobs)
        yield from self.recent_histograms(jobs)
        yield from self.active_gauges(jobs)
        yield from self.alert_states(jobs)
        yield from self.last_successes()
        yield from self.scheduler_tick()
        yield from self.workers()

    def run_totals(self, jobs: list[tuple[int, str, str]]) -> Iterator[Metric]:
        """All-time totals per job and status, from the daily rollups: the
        closed days' sums (read once a day, see closed_day_totals) plus
        today's rows, so a scrape reads a row per job, not per job and day."""
        today = timezone.localdate(self.now)
        closed = closed_day_totals(today)
        # `job_id IN (...)`: a seek per job in the (job, day) unique index;
        # by day alone SQLite would read every job's every day.
        live = rollup_totals(
            JobDailyStats.objects.filter(job_id__in=[pk for pk, *_ in jobs], day__gte=today)
        )
        family = CounterMetricFamily(
            "jobsite_runs",
            "Runs that reached a final state, by job and status (from the daily rollups).",
            labels=["job", "status"],
        )
        nothing = (0,) * len(ROLLUP_STATUSES)
        for pk, slug, _state in jobs:
            before, now = closed.get(pk, nothing), live.get(pk, nothing)
            for status, old, new in zip(ROLLUP_STATUSES, before, now, strict=True):
                family.add_metric([slug, status], old + new)
        yield family

    def recent_histograms(self, jobs: list[tuple[int, str, str]]) -> Iterator[Metric]:
        # `job_id IN (...)` lets both SQLite and PostgreSQL read each job's
        # slice of run_job_finished_idx (job, -finished_at) instead of
        # scanning runs for a finished_at range.
        slugs = {pk: slug for pk, slug, _ in jobs}
        rows = (
            Run.objects.filter(
                job_id__in=list(slugs),
                finished_at__gte=self.now - RECENT_WINDOW,
                started_at__isnull=False,
            )
            .order_by()
            .annotate(
                duration=SecondsBetween("finished_at", "started_at"),
                lateness=SecondsBetween("started_at", "scheduled_for"),
            )
            .values_list("job_id", "trigger", "duration", "lateness")
        )
        durations: dict[int, Histogram] = {}
        lateness: dict[int, Histogram] = {}
        for job_id, trigger, took, late in rows.iterator(chunk_size=5000):
            if job_id not in durations:
                durations[job_id] = Histogram.empty(DURATION_BUCKETS)
                lateness[job_id] = Histogram.empty(LATENESS_BUCKETS)
            durations[job_id].observe(took)
            if trigger not in CARRIED_OVER:
                lateness[job_id].observe(late)
        for name, what, per_job in (
            ("jobsite_run_duration_seconds", "Run duration (start to finish)", durations),
            (
                "jobsite_run_lateness_seconds",
                "Start lateness (start - scheduled_for; reruns, retries and backfills, "
                "which keep an earlier run's logical time, are left out)",
                lateness,
            ),
        ):
            family = HistogramMetricFamily(name, f"{what}, {WINDOW_NOTE}.", labels=["job"])
            for job_id, hist in sorted(per_job.items()):
                family.add_metric([slugs[job_id]], hist.family_buckets(), sum_value=hist.total)
            yield family

    def active_gauges(self, jobs: list[tuple[int, str, str]]) -> Iterator[Metric]:
        active = active_run_counts([pk for pk, _slug, _state in jobs])
        running = GaugeMetricFamily(
            "jobsite_runs_running", "Runs running now, by job.", labels=["job"]
        )
        queued = GaugeMetricFamily(
            "jobsite_runs_queued",
            "Runs queued (waiting for a worker or their turn), by job.",
            labels=["job"],
        )
        for pk, slug, _state in jobs:
            running.add_metric([slug], active.get((pk, Run.Status.RUNNING), 0))
            queued.add_metric([slug], active.get((pk, Run.Status.QUEUED), 0))
        yield running
        yield queued

    def alert_states(self, jobs: list[tuple[int, str, str]]) -> Iterator[Metric]:
        stale = GaugeMetricFamily("jobsite_jobs_stale", "Jobs whose alert state is stale.")
        stale.add_metric([], sum(1 for *_, state in jobs if state == Job.AlertState.STALE))
        yield stale
        states = GaugeMetricFamily(
            "jobsite_job_alert_state",
            "A job's alert state: 1 for the current one, 0 for the others.",
            labels=["job", "state"],
        )
        for _pk, slug, current in jobs:
            for state in Job.AlertState.values:
                states.add_metric([slug, state], 1 if state == current else 0)
        yield states

    def last_successes(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "jobsite_job_last_success_timestamp_seconds",
            "When a job's last successful run finished (Unix time); absent if it never succeeded.",
            labels=["job"],
        )
        rows = Job.objects.exclude(last_success_at=None).order_by("pk")
        for slug, at in rows.values_list("slug", "last_success_at"):
            family.add_metric([slug], at.timestamp())
        yield family

    def scheduler_tick(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "jobsite_scheduler_last_tick_timestamp_seconds",
            "When a scheduler last ticked (Unix time); absent if none ever did.",
        )
        tick = last_tick()
        if tick is not None:
            family.add_metric([], tick.timestamp())
        yield family

    def workers(self) -> Iterator[Metric]:
        """What /health/ checks, as numbers an alert rule can compare:
        worker processes able to take a run, and tasks waiting for one."""
        serving = GaugeMetricFamily(
            "jobsite_workers",
            "django-q2 worker processes in clusters that are idle or working "
            "(0: no run will start).",
        )
        serving.add_metric([], serving_workers(check_workers()["clusters"]))
        yield serving
        depth = GaugeMetricFamily(
            "jobsite_broker_queue_depth",
            "Tasks waiting in django-q2's broker for a worker "
            "(absent for brokers whose size is costly to read).",
        )
        size = broker_queue_size()
        if size is not None:
            depth.add_metric([], size)
        yield depth


def bearer_token_matches(request: HttpRequest, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # As bytes: compare_digest raises TypeError on a str that is not ASCII ("Bearer é").
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@require_safe
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format. With METRICS_TOKEN set, only a matching
    `Authorization: Bearer <token>` gets in (no login); without it, a login."""
    token = settings.METRICS_TOKEN
    if token:
        if not bearer_token_matches(request, token):
            response = HttpResponse("A valid bearer token is required.\n", status=401)
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    elif not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    # A registry per request: nothing is kept in one gunicorn worker's memory.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsiteCollector(timezone.now()))
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
